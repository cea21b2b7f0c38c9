//! Cancelling an order: stock back exactly once, a paid order refunded.

use uuid::Uuid;

use super::error::OrdersError;
use super::lookup;
use super::metrics;
use super::model::{Order, OrderKind, OrderStatus};
use super::refunds;
use super::settle::{self, Settled};
use super::store;
use crate::app::AppState;
use crate::infra::db::ReadFrom;
use crate::infra::telemetry;
use crate::modules::auth::AuthUser;

/// Cancels a pending or paid order. Cancelling twice answers the cancelled order again.
pub async fn cancel_order(
    state: &AppState,
    caller: &AuthUser,
    order_id: Uuid,
) -> Result<Order, OrdersError> {
    let (order, kind) = lookup::locate(state, caller, order_id).await?;
    let kind = kind.unwrap_or(OrderKind::Regular);
    let already_cancelled = order.status == OrderStatus::Cancelled;
    let traceparent = telemetry::current_traceparent();
    let traceparent = traceparent.as_deref();
    let grace = refunds::debt_grace(state);
    let end = || {
        store::end(
            &state.db,
            &order,
            OrderStatus::Cancelled,
            None,
            traceparent,
            grace,
        )
    };
    match end().await? {
        None => {
            // Accepted but not yet persisted: record it cancelled. The worker finds the row
            // and the released reservation and leaves both alone; if the worker inserted it
            // first, this insert does nothing and the second pass below cancels it.
            let cancelled = store::NewOrder {
                order: &order,
                kind,
                status: OrderStatus::Cancelled,
                failure_reason: None,
                traceparent,
                // The worker's row, if it comes later, is the one that claims the key.
                idempotency_key: None,
                sold_under: &[],
            };
            // Whoever writes an order's final row counts it out of the admission backlog
            // (the worker that finds the row later counts nothing).
            let inserted = store::insert_batch(&state.db, &[cancelled]).await?.inserted;
            settle::count_settled(state, inserted.len()).await;
            end().await?;
            // Pending or paid: a charge may have landed during a gateway timeout, with the
            // order still waiting for its retry (a refund of no charge does nothing).
            refunds::refund(state, &order).await?;
        }
        Some(OrderStatus::Paid) => refunds::refund(state, &order).await?,
        Some(OrderStatus::Pending | OrderStatus::Cancelled) => {}
        Some(_) => return Err(OrdersError::NotCancellable),
    }
    let current = store::find(&state.db, order.user_id, order.id, ReadFrom::Primary)
        .await?
        .ok_or(OrdersError::NotFound)?;
    if current.status != OrderStatus::Cancelled {
        return Err(OrdersError::NotCancellable);
    }
    settle::apply_stock_moves_of(state, &current).await?;
    settle::release_stock(state, &[&current]).await?;
    if !already_cancelled {
        metrics::count_order(OrderStatus::Cancelled, kind);
    }
    let cancelled = Settled {
        order: &current,
        status: OrderStatus::Cancelled,
        traceparent,
    };
    settle::notify(state, &[cancelled]).await?;
    Ok(current)
}
