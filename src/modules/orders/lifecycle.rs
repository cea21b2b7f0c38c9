//! After payment: an admin moves an order on, paid -> shipped -> completed, each step with its
//! `order.<status>` event and a notification to the buyer. A shipped or completed order can
//! no longer be cancelled (its goods left the shelf); moving to the status an order already
//! has answers it again and changes nothing, so a retried request is harmless.

use uuid::Uuid;

use super::error::OrdersError;
use super::lookup;
use super::model::{Order, OrderStatus};
use super::settle::{self, Settled};
use super::store;
use crate::app::AppState;
use crate::infra::db::ReadFrom;
use crate::infra::telemetry;
use crate::modules::auth::AuthUser;

/// The status an order must have to move to `to`, for the statuses an admin may set.
fn comes_after(to: OrderStatus) -> Option<OrderStatus> {
    match to {
        OrderStatus::Shipped => Some(OrderStatus::Paid),
        OrderStatus::Completed => Some(OrderStatus::Shipped),
        _ => None,
    }
}

/// Moves an order to `to` (shipped or completed); the caller is an admin.
pub async fn advance_order(
    state: &AppState,
    caller: &AuthUser,
    order_id: Uuid,
    to: OrderStatus,
) -> Result<Order, OrdersError> {
    let from = comes_after(to).ok_or_else(|| {
        OrdersError::Validation("status: an admin sets `shipped` or `completed`".into())
    })?;
    let (order, _) = lookup::locate(state, caller, order_id).await?;
    let traceparent = telemetry::current_traceparent();
    let traceparent = traceparent.as_deref();
    // No row yet: the order is still pending, on its way to its worker.
    let had = store::advance(&state.db, &order, from, to, traceparent)
        .await?
        .unwrap_or(OrderStatus::Pending);
    if had != from && had != to {
        return Err(OrdersError::InvalidTransition {
            from: had.as_str(),
            to: to.as_str(),
        });
    }
    let current = store::find(&state.db, order.user_id, order.id, ReadFrom::Primary)
        .await?
        .ok_or(OrdersError::NotFound)?;
    if had == from {
        let moved = Settled {
            order: &current,
            status: to,
            traceparent,
        };
        settle::notify(state, &[moved]).await?;
    }
    Ok(current)
}
