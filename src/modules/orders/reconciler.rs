//! The reconciler (worker role): repairs the edges of the order path.
//!
//! - A reservation whose order never reached PostgreSQL within the timeout is released
//!   (the worker that later finds it released marks the order failed).
//! - A sale whose counters Redis lost (no epoch) is rebuilt from PostgreSQL once the order
//!   queue has drained, so no accepted-but-unpersisted order is missing from the count;
//!   until then the flash-sale path answers 503.
//!
//! One reconciler acts per interval, whatever the number of replicas (a Redis lease).

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::acceptance;
use super::error::OrdersError;
use super::model::OrderStatus;
use super::settle::{self, Settled};
use super::store;
use crate::app::AppState;
use crate::modules::products;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repairs {
    pub released: usize,
    pub rebuilt: usize,
    /// Sales whose rebuild waits for the order queue to drain.
    pub waiting: usize,
}

/// Runs the reconciler and the flash-sale scheduler until the process stops.
pub async fn run(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(
        state.settings.orders.reconcile_interval_secs,
    ));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        match products::load_due_sales(&state).await {
            Ok(0) => {}
            Ok(loaded) => tracing::info!(loaded, "flash sales loaded"),
            Err(e) => tracing::warn!(error = %e, "loading due flash sales failed"),
        }
        if !take_lease(&state).await {
            continue;
        }
        match reconcile_once(&state).await {
            Ok(repairs) if repairs != Repairs::default() => {
                record_repairs(&repairs);
                tracing::info!(?repairs, "reconciler repaired")
            }
            Ok(repairs) => record_repairs(&repairs),
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
        }
    }
}

async fn take_lease(state: &AppState) -> bool {
    let lease_ms = state.settings.orders.reconcile_interval_secs * 1000;
    let taken: redis::RedisResult<Option<String>> = redis::cmd("SET")
        .arg(state.redis.key("reconciler:lease"))
        .arg(uuid::Uuid::new_v4().to_string())
        .arg("NX")
        .arg("PX")
        .arg(lease_ms.saturating_sub(100).max(1))
        .query_async(&mut state.redis.conn())
        .await;
    matches!(taken, Ok(Some(_)))
}

/// One pass over every sale that is loaded or due.
pub async fn reconcile_once(state: &AppState) -> Result<Repairs, OrdersError> {
    let mut repairs = Repairs::default();
    // Moves a crashed worker left in a shard reach the books (and precede any rebuild).
    let every_shard = (0..state.db.shard_count()).collect();
    settle::apply_stock_moves(state, &every_shard).await?;
    let timeout = chrono::Duration::seconds(state.settings.orders.reservation_timeout_secs);
    for product in products::due_sales(state).await? {
        if !products::sale_is_loaded(state, product.id).await? {
            if order_queues_drained(state).await? {
                let buyers = store::live_units_by_buyer(&state.db, product.id).await?;
                let stock = products::rebuild_sale(state, product.id, &buyers).await?;
                tracing::warn!(product = %product.id, stock, "flash-sale counters rebuilt after Redis lost them");
                repairs.rebuilt += 1;
            } else {
                repairs.waiting += 1;
            }
            continue;
        }
        let stale = products::stale_reservations(state, product.id, timeout).await?;
        let owners: Vec<store::OrderOwner> = stale
            .iter()
            .map(|s| store::OrderOwner {
                order: s.order,
                user: s.buyer,
            })
            .collect();
        let persisted = store::statuses(&state.db, &owners).await?;
        for stale in stale {
            let order = stale.order;
            if persisted.contains_key(&order) {
                continue;
            }
            if let products::ReleaseOutcome::Released =
                products::release(state, product.id, order).await?
            {
                tracing::warn!(%order, product = %product.id, "released a reservation whose order never arrived");
                abandon(state, order).await?;
                repairs.released += 1;
            }
        }
    }
    Ok(repairs)
}

/// An order whose message never reached the worker (the broker dead-lettered it after its
/// delivery limit): it reads `failed` from now on, and its buyer is told. A message still on
/// its way finds the reservation released and fails the order the same way.
async fn abandon(state: &AppState, order: uuid::Uuid) -> Result<(), OrdersError> {
    let Some(message) = acceptance::find(state, order).await? else {
        return Ok(());
    };
    if message.order.status != OrderStatus::Pending {
        return Ok(());
    }
    acceptance::record_failed(state, &message).await?;
    let failed = Settled {
        order: &message.order,
        status: OrderStatus::Failed,
        traceparent: message.traceparent.as_deref(),
    };
    settle::notify(state, &[failed]).await
}

/// True when no order message waits in the order queue or a retry queue.
async fn order_queues_drained(state: &AppState) -> Result<bool, OrdersError> {
    let channel = state.amqp.connection().create_channel().await?;
    let queues = &state.orders.queues;
    let mut waiting = 0;
    for queue in std::iter::once(&queues.orders).chain(queues.retries.iter().map(|(q, _)| q)) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await?;
        waiting += declared.message_count();
    }
    // Best effort: the broker closes it with the connection anyway.
    let _ = channel.close(200, "done".into()).await;
    Ok(waiting == 0)
}

/// `reconciler_repairs_total{kind}` (registered at zero, so a quiet system shows 0).
fn record_repairs(repairs: &Repairs) {
    metrics::counter!("reconciler_repairs_total", "kind" => "released")
        .increment(repairs.released as u64);
    metrics::counter!("reconciler_repairs_total", "kind" => "rebuilt")
        .increment(repairs.rebuilt as u64);
}
