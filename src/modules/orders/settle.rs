//! Settling orders: the worker's batch pipeline, and what every final state needs
//! (units released, refunds, the buyer told), shared with cancel.
//!
//! Every step is idempotent (reservation state machine, payment idempotent by order id,
//! ON CONFLICT DO NOTHING, stock moves keyed by their source row, notification dedupe keys),
//! so a batch redone after a crash at any point creates nothing twice and charges nobody
//! twice.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::{join_all, try_join_all};
use uuid::Uuid;

use super::error::OrdersError;
use super::feed;
use super::metrics;
use super::model::{Order, OrderMessage, OrderStatus};
use super::payment::{Charge, ChargeOutcome};
use super::refunds;
use super::store::{self, NewOrder};
use crate::app::AppState;
use crate::infra::db::shard_index;
use crate::modules::notifications::{self, Channel, Notification, Priority};
use crate::modules::products::{self, CommitEpoch, CommitOutcome, ReservedUnits, StockMove};

/// An order in a final state, and the trace its notification joins.
pub struct Settled<'a> {
    pub order: &'a Order,
    pub status: OrderStatus,
    pub traceparent: Option<&'a str>,
}

/// An order this batch could not settle yet: it goes to a retry queue.
pub struct Deferred<'a> {
    pub message: &'a OrderMessage,
    pub reason: DeferReason,
    /// The order went to the gateway in this delivery (its charge may stand): should it
    /// end failed, it is refunded.
    pub charge_sent: bool,
}

impl<'a> Deferred<'a> {
    fn new(message: &'a OrderMessage, reason: DeferReason) -> Self {
        Self {
            message,
            reason,
            charge_sent: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// Redis lost the sale and the reconciler has not restored it yet: the order waits for
    /// that (up to `orders.stock_restore_wait_secs`), however many retries it takes.
    StockRestoring,
    /// The payment gateway failed or its circuit is open: the retry schedule applies.
    PaymentUnavailable,
}

impl DeferReason {
    /// The failure reason of an order that waited in vain.
    pub fn failure_reason(self) -> &'static str {
        match self {
            DeferReason::StockRestoring => "stock_unavailable",
            DeferReason::PaymentUnavailable => "payment_unavailable",
        }
    }
}

/// One batch, end to end; answers the orders to try again later. The order of steps is
/// what makes a redo safe:
/// 1. commit reservations (a released one means the order may not proceed);
/// 2. charge the committed orders, in one round trip (a repeat answers the first outcome);
/// 3. write every order in its final state, one transaction per shard, with its events;
/// 4. orders that were already written (an earlier delivery, or a cancel) are not settled
///    twice: a charge for an order cancelled meanwhile is refunded;
/// 5. ledger, stock releases and notifications, each idempotent.
pub async fn settle_batch<'a>(
    state: &AppState,
    messages: &'a [OrderMessage],
) -> Result<Vec<Deferred<'a>>, OrdersError> {
    let commits = commit_reservations(state, messages).await?;
    let committed: Vec<&OrderMessage> = messages
        .iter()
        .zip(&commits)
        .filter(|(_, commit)| commit.is_ok())
        .map(|(message, _)| message)
        .collect();
    let mut rows = Vec::with_capacity(messages.len());
    let mut to_charge = vec![];
    let mut deferred = vec![];
    for (message, commit) in messages.iter().zip(&commits) {
        let refused = match commit {
            Ok(under) => {
                to_charge.push((message, under.as_slice()));
                continue;
            }
            Err(CommitOutcome::Released) => "reservation_released",
            Err(CommitOutcome::SoldOut) => "sold_out",
            Err(CommitOutcome::OverLimit) => "purchase_limit",
            // Stock not restored yet after a Redis loss: come back after a delay (a commit
            // never stops an order; it only joins the arm for completeness).
            Err(CommitOutcome::NotLoaded | CommitOutcome::Committed(_)) => {
                deferred.push(Deferred::new(message, DeferReason::StockRestoring));
                continue;
            }
        };
        rows.push(final_row(message, OrderStatus::Failed, Some(refused)));
    }
    // A second order under a key another order holds (Redis forgot the key while the first
    // was on its way) fails here, before any charge.
    let keyed: Vec<&OrderMessage> = to_charge.iter().map(|(m, _)| *m).collect();
    let duplicates = held_by_others(state, &keyed).await?;
    let (duplicate, to_charge): (Vec<_>, Vec<_>) = to_charge
        .into_iter()
        .partition(|(m, _)| duplicates.contains(&m.order.id));
    rows.extend(
        duplicate
            .into_iter()
            .map(|(m, _)| refused_for_key(final_row(m, OrderStatus::Failed, None))),
    );
    let charges: Vec<Charge<'_>> = to_charge
        .iter()
        .map(|(m, _)| Charge {
            order: &m.order,
            attempt: m.attempt,
        })
        .collect();
    let results = state.orders.payments.charge_batch(&charges).await;
    let mut charged = BTreeSet::new();
    for ((message, under), result) in to_charge.into_iter().zip(results) {
        match result {
            Ok(ChargeOutcome::Approved) => {
                charged.insert(message.order.id);
                rows.push(NewOrder {
                    sold_under: under,
                    ..final_row(message, OrderStatus::Paid, None)
                });
            }
            Ok(ChargeOutcome::Declined) => rows.push(final_row(
                message,
                OrderStatus::Failed,
                Some("payment_declined"),
            )),
            Err(e) => {
                tracing::warn!(order = %message.order.id, attempt = message.attempt, error = %e, "charge failed");
                // The gateway may have charged before its answer was lost.
                deferred.push(Deferred {
                    charge_sent: true,
                    ..Deferred::new(message, DeferReason::PaymentUnavailable)
                });
            }
        }
    }

    let written = store::insert_batch(&state.db, &rows).await?;
    // Paid orders a rebuild of their stock voided: charged, and back to take their units
    // again under the new epoch (or fail, refunded).
    let by_id: BTreeMap<Uuid, &'a OrderMessage> =
        messages.iter().map(|m| (m.order.id, m)).collect();
    for order in &written.voided {
        tracing::warn!(%order, "a rebuild of the stock voided this order's commit; it takes its units again");
        if let Some(message) = by_id.get(order) {
            deferred.push(Deferred {
                charge_sent: true,
                ..Deferred::new(message, DeferReason::StockRestoring)
            });
        }
    }
    let (fresh, written_before): (Vec<&NewOrder<'_>>, Vec<&NewOrder<'_>>) = rows
        .iter()
        .filter(|row| !written.voided.contains(&row.order.id))
        .partition(|row| written.inserted.contains(&row.order.id));
    let mut settled: Vec<Settled<'_>> = Vec::with_capacity(rows.len());
    let mut settled_now = fresh.len();
    for row in fresh {
        metrics::record_settled(row.order, row.status, row.kind);
        settled.push(row.into());
        // Failed after an earlier delivery went to the gateway: that charge may stand.
        if row.status == OrderStatus::Failed && charge_sent(&by_id, row.order.id) {
            refunds::refund(state, row.order).await?;
        }
    }
    // Rare: a redelivery, or a cancel that got there first.
    let owners: Vec<store::OrderOwner> = written_before.iter().map(|r| r.order.into()).collect();
    let existing = store::statuses(&state.db, &owners).await?;
    let mut refused = vec![];
    let mut ended_before = vec![];
    for row in written_before {
        let charged = charged.contains(&row.order.id) || charge_sent(&by_id, row.order.id);
        match existing.get(&row.order.id) {
            Some(status) if *status == row.status => settled.push(row.into()),
            Some(status) => {
                if charged {
                    refunds::refund(state, row.order).await?;
                }
                // Ended failed or cancelled before: units this delivery took (a late commit
                // after a rebuild forgot its released record) go back, once.
                if matches!(status, OrderStatus::Failed | OrderStatus::Cancelled) {
                    ended_before.push(row.order);
                }
            }
            // Not written, and no row of its own: another order took its key meanwhile (a
            // worker beside this one). It fails; a charge it got is refunded.
            None => {
                if charged {
                    refunds::refund(state, row.order).await?;
                }
                refused.push(refused_for_key(*row));
            }
        }
    }
    release_stock(state, &ended_before).await?;
    let inserted = store::insert_batch(&state.db, &refused).await?.inserted;
    settled_now += inserted.len();
    settled.extend(refused.iter().map(Settled::from));
    // Committed orders now final in PostgreSQL leave the set the reconciler scans for orders
    // lost between commit and persist (those sent to retry are still on their way).
    let waiting: BTreeSet<Uuid> = deferred.iter().map(|d| d.message.order.id).collect();
    let persisted: Vec<ReservedUnits> = committed
        .iter()
        .filter(|m| !waiting.contains(&m.order.id))
        .flat_map(|m| reserved_lines(m))
        .collect();
    products::persist(state, &persisted).await?;
    finish(state, &settled).await?;
    count_settled(state, settled_now).await;
    Ok(deferred)
}

/// Whether an earlier delivery of `order` went to the gateway (its charge may stand).
fn charge_sent(messages: &BTreeMap<Uuid, &OrderMessage>, order: Uuid) -> bool {
    messages.get(&order).is_some_and(|m| m.charge_sent)
}

/// Orders that left the backlog, for admission control; a miss only skews its estimate.
pub async fn count_settled(state: &AppState, orders: usize) {
    let counted = state
        .orders
        .admission
        .count_settled(&state.redis, orders)
        .await;
    if let Err(e) = counted {
        tracing::warn!(error = %e, orders, "counting settled orders for admission control");
    }
}

/// What follows a final state: the stock moves of paid orders into the ledger, units of
/// failed orders back in the sale, the buyer told.
pub async fn finish(state: &AppState, settled: &[Settled<'_>]) -> Result<(), OrdersError> {
    let shards_sold_on: BTreeSet<usize> = settled
        .iter()
        .filter(|s| s.status == OrderStatus::Paid)
        .map(|s| shard_index(s.order.user_id, state.db.shard_count()))
        .collect();
    apply_stock_moves(state, &shards_sold_on).await?;
    let failed: Vec<&Order> = settled
        .iter()
        .filter(|s| s.status == OrderStatus::Failed)
        .map(|s| s.order)
        .collect();
    release_stock(state, &failed).await?;
    notify(state, settled).await
}

/// Stock moves applied per round trip.
const MOVES_PER_PASS: i64 = 1000;

/// Moves the stock moves recorded in `shards` (in the transactions that changed orders)
/// into the global ledger and the on-hand counts, in one transaction. Whoever gets there
/// first applies a move; a move is never applied twice.
pub async fn apply_stock_moves(
    state: &AppState,
    shards: &BTreeSet<usize>,
) -> Result<(), OrdersError> {
    loop {
        let pending = try_join_all(
            shards
                .iter()
                .map(|shard| store::pending_moves(&state.db, *shard, MOVES_PER_PASS)),
        )
        .await?;
        let moves: Vec<StockMove> = pending.iter().flatten().copied().collect();
        if moves.is_empty() {
            return Ok(());
        }
        let refused = products::apply_stock_moves(state, &moves).await?;
        // A refused product's moves stay recorded (and are tried again); the rest go.
        let applied: Vec<Vec<StockMove>> = pending
            .iter()
            .map(|moves| {
                moves
                    .iter()
                    .filter(|m| !refused.contains(&m.product_id))
                    .copied()
                    .collect()
            })
            .collect();
        try_join_all(
            shards
                .iter()
                .zip(&applied)
                .filter(|(_, moves)| !moves.is_empty())
                .map(|(shard, moves)| store::clear_moves(&state.db, *shard, moves)),
        )
        .await?;
        // Another page only while pages came full and this one moved something.
        let full = pending.iter().any(|m| (m.len() as i64) >= MOVES_PER_PASS);
        if !full || applied.iter().all(Vec::is_empty) {
            return Ok(());
        }
    }
}

impl<'a> From<&NewOrder<'a>> for Settled<'a> {
    fn from(row: &NewOrder<'a>) -> Self {
        Settled {
            order: row.order,
            status: row.status,
            traceparent: row.traceparent,
        }
    }
}

/// Commits the reservations of every item of every order (one Redis call per product).
/// Per order: where each item was committed, or the first outcome that stops it (an order
/// proceeds only if all its items were committed).
async fn commit_reservations(
    state: &AppState,
    messages: &[OrderMessage],
) -> Result<Vec<Result<Vec<CommitEpoch>, CommitOutcome>>, OrdersError> {
    let mut units = vec![];
    let mut owner_of_line = vec![];
    for (index, message) in messages.iter().enumerate() {
        for line in reserved_lines(message) {
            units.push(line);
            owner_of_line.push(index);
        }
    }
    let per_line = products::commit(state, &units).await?;
    let mut per_order: Vec<Result<Vec<CommitEpoch>, CommitOutcome>> =
        vec![Ok(vec![]); messages.len()];
    for (index, outcome) in owner_of_line.into_iter().zip(per_line) {
        match (&mut per_order[index], outcome) {
            (Ok(under), CommitOutcome::Committed(epoch)) => under.push(epoch),
            (order @ Ok(_), stopped) => *order = Err(stopped),
            (Err(_), _) => {}
        }
    }
    Ok(per_order)
}

/// The units each item of `message`'s order reserved.
fn reserved_lines(message: &OrderMessage) -> impl Iterator<Item = ReservedUnits> + '_ {
    message.order.items.iter().map(|item| ReservedUnits {
        order: message.order.id,
        product: item.product_id,
        buyer: message.order.user_id,
        units: u32::try_from(item.quantity).unwrap_or(0),
    })
}

/// The final row of an order refused because another order holds its Idempotency-Key: it
/// does not claim the key.
fn refused_for_key(row: NewOrder<'_>) -> NewOrder<'_> {
    NewOrder {
        status: OrderStatus::Failed,
        failure_reason: Some("duplicate_request"),
        idempotency_key: None,
        ..row
    }
}

/// Of `messages`, the orders whose Idempotency-Key another order holds: one written
/// already, or one earlier in this batch.
async fn held_by_others(
    state: &AppState,
    messages: &[&OrderMessage],
) -> Result<BTreeSet<Uuid>, OrdersError> {
    let keyed: Vec<(store::KeyOwner<'_>, Uuid)> = messages
        .iter()
        .filter_map(|m| {
            let key = m.idempotency_key.as_deref()?;
            Some((
                store::KeyOwner {
                    user: m.order.user_id,
                    key,
                },
                m.order.id,
            ))
        })
        .collect();
    if keyed.is_empty() {
        return Ok(BTreeSet::new());
    }
    let owners: Vec<store::KeyOwner<'_>> = keyed.iter().map(|(owner, _)| *owner).collect();
    let mut holders = store::orders_holding(&state.db, &owners).await?;
    let mut duplicates = BTreeSet::new();
    for (owner, order) in keyed {
        if *holders.entry(owner).or_insert(order) != order {
            duplicates.insert(order);
        }
    }
    Ok(duplicates)
}

pub fn final_row<'a>(
    message: &'a OrderMessage,
    status: OrderStatus,
    failure_reason: Option<&'static str>,
) -> NewOrder<'a> {
    NewOrder {
        order: &message.order,
        kind: message.kind,
        status,
        failure_reason,
        traceparent: message.traceparent.as_deref(),
        idempotency_key: message.idempotency_key.as_deref(),
        sold_under: &[],
    }
}

/// Gives every item's reserved units of `orders` back to the sale in Redis (the shelf in
/// PostgreSQL follows the order's status). Only for orders that end failed or cancelled: it
/// releases committed units too. The reservation state machine makes a repeat a no-op.
pub async fn release_stock(state: &AppState, orders: &[&Order]) -> Result<(), OrdersError> {
    release_as(state, orders, products::Releaser::Owner)
        .await
        .map(|_| ())
}

/// Releases every item's reservation of `orders` that `by` may release. Answers whether any
/// was kept: a worker committed it, so its order is on its way to being paid.
pub async fn release_as(
    state: &AppState,
    orders: &[&Order],
    by: products::Releaser,
) -> Result<bool, OrdersError> {
    let releases = orders.iter().flat_map(|order| {
        order
            .items
            .iter()
            .map(|item| products::release(state, item.product_id, order.user_id, order.id, by))
    });
    let mut kept = false;
    for released in join_all(releases).await {
        kept |= released? == products::ReleaseOutcome::Kept;
    }
    Ok(kept)
}

fn notification(settled: &Settled<'_>) -> Notification {
    let (order, status) = (settled.order, settled.status);
    let (subject, body) = match status {
        OrderStatus::Paid => (
            "Your order is confirmed",
            format!("Order {} is paid: {}.", order.id, order.total_amount),
        ),
        OrderStatus::Cancelled => (
            "Your order was cancelled",
            format!("Order {} was cancelled.", order.id),
        ),
        OrderStatus::Shipped => (
            "Your order is on its way",
            format!("Order {} has shipped.", order.id),
        ),
        OrderStatus::Completed => (
            "Your order is complete",
            format!("Order {} was delivered.", order.id),
        ),
        _ => (
            "Your order could not be completed",
            format!("Order {} failed; you were not charged.", order.id),
        ),
    };
    let mut notification = Notification::new(
        order.user_id,
        Channel::Email,
        Priority::High,
        Some(subject.to_owned()),
        body,
    );
    // A redone batch builds the same key, so the buyer hears about each change once.
    notification.dedupe_key = format!("order:{}:{}", order.id, status.as_str());
    notification.traceparent = settled.traceparent.map(str::to_owned);
    notification
}

/// Enqueues order-lifecycle notifications (high priority) as one message.
/// Also pushes each change to the streams following it (every change a buyer hears of
/// comes through here, after its commit).
pub async fn notify(state: &AppState, settled: &[Settled<'_>]) -> Result<(), OrdersError> {
    feed::announce(state, settled.iter().map(|s| (s.order.id, s.status))).await;
    let batch = settled.iter().map(notification).collect();
    notifications::enqueue(state, Priority::High, batch).await?;
    Ok(())
}

/// Applies the stock moves of the shard holding `order`.
pub async fn apply_stock_moves_of(state: &AppState, order: &Order) -> Result<(), OrdersError> {
    let shard = shard_index(order.user_id, state.db.shard_count());
    apply_stock_moves(state, &BTreeSet::from([shard])).await
}
