//! The reconciler (worker role): repairs the edges of the order path.
//!
//! - A reservation whose order never reached PostgreSQL within the timeout is released
//!   (the worker that later finds it released marks the order failed).
//! - A sale that was loaded and lost its counters (no epoch) is rebuilt from PostgreSQL a
//!   pass after it was found lost, fenced (see `fences`: a batch that committed before the
//!   loss and writes after the fence takes its units again), and stays closed until the
//!   orders in flight at the loss have settled: the order queues drained, or
//!   `orders.stock_restore_wait_secs` passed. Orders in flight in the lost buckets take their
//!   units at commit, within the purchase limit; buckets the loss spared (a Cluster node lost)
//!   keep theirs. Until it opens the flash-sale path answers 503.
//!
//! - A move of units between two buckets of a sale that its mover left half done (it died
//!   between giving and taking) is finished.
//! - An order committed and never persisted (its message was dead-lettered by the delivery
//!   limit, or lost from a retry queue) is found in its sale's committed set once it is older
//!   than any path from commit to persist, and sent again from its acceptance record; after
//!   `MAX_REDRIVES` sends it is failed (units back, any charge refunded). One whose row is
//!   written (its worker died before persisting) is marked persisted.
//! - A refund owed past its due time (its retry message lost or dead-lettered) is tried
//!   again.
//! - Regular stock's records of orders that ended for good are dropped (they would grow
//!   with every order of a product that stays in Redis).
//!
//! One reconciler acts per interval, whatever the number of replicas (a Redis lease).

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::acceptance;
use super::error::OrdersError;
use super::fences;
use super::holding;
use super::model::OrderStatus;
use super::refunds;
use super::settle::{self, Settled};
use super::store;
use super::worker;
use crate::app::AppState;
use crate::modules::products;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repairs {
    pub released: usize,
    pub rebuilt: usize,
    pub reopened: usize,
    /// Moves of units between a sale's buckets left half done, finished.
    pub moves_finished: usize,
    /// Orders committed and never persisted, sent to a worker again (or failed).
    pub redriven: usize,
    /// Lost sales waiting for their rebuild, or rebuilt ones for the orders in flight.
    pub waiting: usize,
    /// Refunds owed past their due time (their retry messages lost or dead-lettered), done.
    pub refunds: usize,
    /// Records of regular orders that ended for good (failed, cancelled, shipped), dropped.
    pub forgotten: usize,
}

/// How long a lost sale waits before its rebuild: a batch that committed in Redis just
/// before the loss has written its orders by then, rather than find its commits fenced
/// (safe either way; this only spares those orders a round through the retry queue).
const REBUILD_AFTER_MS: i64 = 1_000;

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
        let lease_ms = state.settings.orders.reconcile_interval_secs * 1000;
        if !state
            .redis
            .take_lease("reconciler", lease_ms.saturating_sub(100))
            .await
        {
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

/// One pass over every sale that is loaded or due.
pub async fn reconcile_once(state: &AppState) -> Result<Repairs, OrdersError> {
    let mut repairs = Repairs::default();
    // Moves a crashed worker left in a shard reach the books (and precede any rebuild).
    let every_shard = (0..state.db.shard_count()).collect();
    settle::apply_stock_moves(state, &every_shard).await?;
    let timeout = chrono::Duration::seconds(state.settings.orders.reservation_timeout_secs);
    // Reservations made before it, and still only reserved, are stale.
    let cutoff = chrono::Utc::now() - timeout;
    let lost_before = lost_cutoff(state);
    for product in products::due_sales(state).await? {
        match products::sale_state(state, product.id).await? {
            products::SaleState::Open => {}
            products::SaleState::Missing => {
                // Never loaded: the loader's (not this pass's) to load afresh.
                if products::was_loaded(state, &product).await? {
                    rebuild_lost(state, product.id, &mut repairs).await?;
                }
                continue;
            }
            products::SaleState::Recovering => {
                reopen_when_settled(state, product.id, &mut repairs).await?;
                continue;
            }
        }
        repairs.moves_finished += products::finish_stuck_moves(state, product.id).await?;
        let stale = products::stale_reservations(state, product.id, cutoff).await?;
        repairs.released += release_unpersisted(state, stale).await?;
        let lost = products::stale_committed(state, Some(product.id), lost_before).await?;
        repairs.redriven += redrive(state, lost).await?;
    }
    let stale = products::stale_regular_reservations(state, cutoff).await?;
    repairs.released += release_unpersisted(state, stale).await?;
    let lost = products::stale_committed(state, None, lost_before).await?;
    repairs.redriven += redrive(state, lost).await?;
    repairs.refunds += refunds::retry_due(state).await?;
    repairs.forgotten += forget_ended_regular_orders(state).await?;
    Ok(repairs)
}

/// Drops the Redis records of regular orders that PostgreSQL holds ended for good: a
/// regular product's stock lives on in Redis, and its records would otherwise grow with
/// every order. Released records go once their order is written failed or cancelled (not
/// before: the worker still has to find them released), persisted ones once their order
/// shipped (a paid order, or a cancelled one whose cancel has not yet released it, gives
/// its units back through its record). A message of a dropped order that comes again finds
/// no record and commits late; its row is already final, so the worker gives those units
/// back (`settle`).
async fn forget_ended_regular_orders(state: &AppState) -> Result<usize, OrdersError> {
    let settled = products::settled_regular_records(state).await?;
    if settled.is_empty() {
        return Ok(0);
    }
    let statuses = statuses_of(state, settled.iter().map(|r| (r.order, r.buyer))).await?;
    let ended: Vec<products::SettledRecord> = settled
        .into_iter()
        .filter(|r| {
            statuses.get(&r.order).is_some_and(|status| match status {
                OrderStatus::Failed | OrderStatus::Cancelled => r.released(),
                OrderStatus::Shipped | OrderStatus::Completed => !r.released(),
                OrderStatus::Pending | OrderStatus::Paid => false,
            })
        })
        .collect();
    Ok(products::forget_settled(state, &ended).await?)
}

/// The statuses in PostgreSQL of `orders` (order, buyer; absent: not written).
async fn statuses_of(
    state: &AppState,
    orders: impl Iterator<Item = (uuid::Uuid, uuid::Uuid)>,
) -> Result<std::collections::BTreeMap<uuid::Uuid, OrderStatus>, OrdersError> {
    let owners: Vec<store::OrderOwner> = orders
        .map(|(order, user)| store::OrderOwner { order, user })
        .collect();
    store::statuses(&state.db, &owners).await
}

/// Sends of one committed order before it is failed.
const MAX_REDRIVES: i64 = 3;

/// An order's send count outlives its sends by far (one per reconciler pass past the cutoff).
const REDRIVES_KEPT_SECS: i64 = 86_400;

/// Orders committed before this and not persisted are lost: it is longer ago than any
/// order waits between commit and persist (the reservation timeout, the retry delays and
/// the wait for a rebuilt sale, together).
fn lost_cutoff(state: &AppState) -> chrono::DateTime<chrono::Utc> {
    let orders = &state.settings.orders;
    let retries_ms: u64 = orders.retry_delays_ms.iter().map(|d| u64::from(*d)).sum();
    let patience = chrono::Duration::seconds(orders.reservation_timeout_secs)
        + chrono::Duration::seconds(orders.stock_restore_wait_secs)
        + chrono::Duration::milliseconds(i64::try_from(retries_ms).unwrap_or(i64::MAX));
    chrono::Utc::now() - patience
}

/// Sends committed orders that never reached PostgreSQL to a worker again, from their
/// acceptance records; fails those sent `MAX_REDRIVES` times already. Every step is
/// idempotent for the worker (the commit answers `already`, the charge its first outcome).
async fn redrive(
    state: &AppState,
    lost: Vec<products::StaleReservation>,
) -> Result<usize, OrdersError> {
    if lost.is_empty() {
        return Ok(0);
    }
    let written = statuses_of(state, lost.iter().map(|s| (s.order, s.buyer))).await?;
    let (done, lost): (Vec<_>, Vec<_>) = lost
        .into_iter()
        .partition(|stale| written.contains_key(&stale.order));
    // Their workers wrote them and died before marking them persisted (persisting reads
    // only the order and its buyer).
    let done: Vec<products::ReservedUnits> = done
        .into_iter()
        .map(|stale| products::ReservedUnits {
            order: stale.order,
            product: stale.product,
            buyer: stale.buyer,
            units: 0,
        })
        .collect();
    products::persist(state, &done).await?;
    let mut redriven = 0;
    for stale in lost {
        let Some(message) = acceptance::find(state, stale.order).await? else {
            tracing::error!(order = %stale.order, "a committed order lost its acceptance record; it needs an operator");
            continue;
        };
        let counter = state
            .redis
            .key(format_args!("orders:redriven:{}", stale.order));
        let (sends,): (i64,) = redis::pipe()
            .incr(&counter, 1)
            .expire(&counter, REDRIVES_KEPT_SECS)
            .ignore()
            .query_async(&mut state.redis.conn())
            .await?;
        if sends > MAX_REDRIVES {
            worker::give_up(state, &message, "lost_in_delivery").await?;
        } else {
            tracing::warn!(order = %stale.order, sends, "a committed order never reached PostgreSQL; sent again");
            worker::publish_alone(state, &state.orders.queues.orders, message).await?;
        }
        redriven += 1;
    }
    Ok(redriven)
}

/// Releases the stale reservations whose order never reached PostgreSQL (an API that died
/// before publishing, a message dead-lettered by the broker). The fence comes first: once a
/// reservation is `releasing`, no worker can commit it, so what PostgreSQL says next still
/// holds when the units go back (a worker that committed before the fence keeps them).
async fn release_unpersisted(
    state: &AppState,
    stale: Vec<products::StaleReservation>,
) -> Result<usize, OrdersError> {
    let fenced = products::fence(state, stale).await?;
    let persisted = statuses_of(state, fenced.iter().map(|s| (s.order, s.buyer))).await?;
    let mut released = 0;
    for stale in fenced {
        let (order, product) = (stale.order, stale.product);
        let outcome = products::release(
            state,
            product,
            stale.buyer,
            order,
            products::Releaser::Reconciler,
        )
        .await?;
        // Persisted without a commit: failed or cancelled, and its owner's release did not
        // happen (it died first). The units go back all the same.
        if persisted.contains_key(&order) || outcome != products::ReleaseOutcome::Released {
            continue;
        }
        tracing::warn!(%order, %product, "released a reservation whose order never arrived");
        abandon(state, order).await?;
        released += 1;
    }
    Ok(released)
}

async fn rebuild_lost(
    state: &AppState,
    product: uuid::Uuid,
    repairs: &mut Repairs,
) -> Result<(), OrdersError> {
    let lost_for = products::mark_lost(state, product).await?;
    if lost_for.num_milliseconds() < REBUILD_AFTER_MS {
        repairs.waiting += 1;
        return Ok(());
    }
    let stock = fences::rebuild_stock(state, product).await?;
    tracing::warn!(%product, stock, "flash-sale counters rebuilt after Redis lost them");
    repairs.rebuilt += 1;
    Ok(())
}

/// Opens a rebuilt sale once every order in flight at the loss has had its chance to take
/// its units: the order queues drained, or as long ago as such an order waits for the
/// rebuild (late commits hold the limit either way).
async fn reopen_when_settled(
    state: &AppState,
    product: uuid::Uuid,
    repairs: &mut Repairs,
) -> Result<(), OrdersError> {
    let patience = chrono::Duration::seconds(state.settings.orders.stock_restore_wait_secs);
    let waited_out = products::mark_lost(state, product).await? > patience;
    if waited_out || order_queues_drained(state).await? {
        products::reopen_sale(state, product).await?;
        tracing::warn!(%product, "rebuilt flash sale open again");
        repairs.reopened += 1;
    } else {
        repairs.waiting += 1;
    }
    Ok(())
}

/// An order whose message never reached the worker (the broker dead-lettered it after its
/// delivery limit): it is written `failed` in its shard now, so it has its final state
/// whatever becomes of the message, and its buyer is told. A message still on its way finds
/// the reservation released and the row written, and settles nothing twice. Whoever writes
/// an order's final row counts it out of the admission backlog, once.
async fn abandon(state: &AppState, order: uuid::Uuid) -> Result<(), OrdersError> {
    let Some(message) = acceptance::find(state, order).await? else {
        return Ok(());
    };
    if message.order.status != OrderStatus::Pending {
        return Ok(());
    }
    let row = settle::final_row(&message, OrderStatus::Failed, Some("reservation_released"));
    let inserted = store::insert_batch(&state.db, std::slice::from_ref(&row))
        .await?
        .inserted;
    settle::count_settled(state, inserted.len()).await;
    acceptance::record_failed(state, &message).await?;
    let failed = Settled {
        order: &message.order,
        status: OrderStatus::Failed,
        traceparent: message.traceparent.as_deref(),
    };
    settle::notify(state, &[failed]).await
}

/// True when no order message waits in the order queue or a retry queue, and no worker holds
/// deliveries (in a batch, or prefetched): the queue depth counts only ready messages.
async fn order_queues_drained(state: &AppState) -> Result<bool, OrdersError> {
    if holding::any_held(&state.redis).await? {
        return Ok(false);
    }
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
    metrics::counter!("reconciler_repairs_total", "kind" => "reopened")
        .increment(repairs.reopened as u64);
    metrics::counter!("reconciler_repairs_total", "kind" => "moves_finished")
        .increment(repairs.moves_finished as u64);
    metrics::counter!("reconciler_repairs_total", "kind" => "redriven")
        .increment(repairs.redriven as u64);
    metrics::counter!("reconciler_repairs_total", "kind" => "refunds")
        .increment(repairs.refunds as u64);
    metrics::counter!("reconciler_repairs_total", "kind" => "forgotten")
        .increment(repairs.forgotten as u64);
}
