//! The order-worker: consumes the order queue in batches, commits reservations, persists
//! orders into their shards, records the ledger, charges payment, settles statuses,
//! enqueues notifications, and acks only after all of that is committed.
//!
//! Every step is idempotent (ON CONFLICT DO NOTHING, reservation state machine, ledger
//! uniqueness, payment idempotent by order id, status transitions guarded by the current
//! status), so a message redelivered at any point creates no duplicate and no second charge.

use std::time::Duration;

use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use serde::Serialize;
use uuid::Uuid;

use super::error::OrdersError;
use super::model::{Order, OrderEnvelope, OrderMessage, OrderStatus};
use super::payment::ChargeOutcome;
use super::store::{self, NewOrder};
use crate::app::AppState;
use crate::modules::products::{self, CommitOutcome, LedgerLine};

/// Consumes until the connection closes (the process is stopping) or a broker error.
pub async fn run(state: AppState) -> Result<(), OrdersError> {
    let settings = &state.settings.orders;
    let channel = state.amqp.connection().create_channel().await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            state.orders.queues.orders.as_str().into(),
            "order-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %state.orders.queues.orders, "order-worker consuming");
    let linger = Duration::from_millis(settings.batch_linger_ms);
    while let Some(first) = consumer.next().await {
        // A batch holds whole deliveries until it has batch_size orders (or the linger ends).
        let mut batch = vec![parse(first?)];
        let deadline = tokio::time::sleep(linger);
        tokio::pin!(deadline);
        while orders_in(&batch) < settings.batch_size {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(delivery) => batch.push(parse(delivery?)),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        process_batch(&state, batch).await?;
    }
    Ok(())
}

type Parsed = (Delivery, Result<OrderEnvelope, serde_json::Error>);

fn parse(delivery: Delivery) -> Parsed {
    let envelope = serde_json::from_slice(&delivery.data);
    (delivery, envelope)
}

fn orders_in(batch: &[Parsed]) -> usize {
    batch
        .iter()
        .map(|(_, envelope)| envelope.as_ref().map_or(0, |e| e.orders.len()))
        .sum()
}

/// Settles one batch of deliveries with the broker.
async fn process_batch(state: &AppState, deliveries: Vec<Parsed>) -> Result<(), OrdersError> {
    let mut messages = Vec::with_capacity(orders_in(&deliveries));
    let mut last_kept = None;
    for (delivery, envelope) in deliveries {
        match envelope {
            Ok(envelope) => {
                messages.extend(envelope.orders);
                last_kept = Some(delivery);
            }
            Err(e) => {
                // Unparsable forever: let the broker dead-letter it rather than loop.
                tracing::error!(error = %e, "order message does not parse; dead-lettering");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
    }
    let Some(last) = last_kept else {
        return Ok(());
    };
    match handle(state, &messages).await {
        Ok(()) => {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Err(e) => {
            // A dependency failed mid-batch. Nothing is acked; every step is idempotent, so
            // the redelivery redoes only what did not happen. Pause so a dead database
            // is not hammered.
            tracing::error!(error = %e, orders = messages.len(), "order batch failed; requeueing");
            tokio::time::sleep(Duration::from_secs(1)).await;
            last.acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await?;
        }
    }
    Ok(())
}

fn lines(order: &Order) -> Vec<LedgerLine> {
    order
        .items
        .iter()
        .map(|item| LedgerLine {
            order_id: order.id,
            product_id: item.product_id,
            quantity: item.quantity,
        })
        .collect()
}

/// Commits the reservations of every item of every order (one Redis call per product);
/// an order proceeds only if all its items were committed.
async fn commit_orders(
    state: &AppState,
    messages: &[OrderMessage],
) -> Result<Vec<CommitOutcome>, OrdersError> {
    let mut item_lines = vec![];
    let mut owner_of_line = vec![];
    for (index, message) in messages.iter().enumerate() {
        for line in lines(&message.order) {
            item_lines.push((line, message.order.user_id));
            owner_of_line.push(index);
        }
    }
    let per_line = products::commit(state, &item_lines).await?;
    let mut per_order = vec![CommitOutcome::Committed; messages.len()];
    for (index, outcome) in owner_of_line.into_iter().zip(per_line) {
        if outcome != CommitOutcome::Committed {
            per_order[index] = outcome;
        }
    }
    Ok(per_order)
}

async fn handle(state: &AppState, messages: &[OrderMessage]) -> Result<(), OrdersError> {
    let commits = commit_orders(state, messages).await?;
    let mut to_persist = Vec::with_capacity(messages.len());
    let mut committed = vec![];
    let mut not_loaded = vec![];
    for (message, outcome) in messages.iter().zip(commits) {
        let (status, reason) = match outcome {
            CommitOutcome::Committed => {
                committed.push(message);
                (OrderStatus::Pending, None)
            }
            CommitOutcome::Released => (OrderStatus::Failed, Some("reservation_released")),
            CommitOutcome::SoldOut => (OrderStatus::Failed, Some("sold_out")),
            CommitOutcome::NotLoaded => {
                not_loaded.push(message);
                continue;
            }
        };
        to_persist.push(NewOrder {
            order: &message.order,
            kind: message.kind,
            status,
            failure_reason: reason,
        });
    }
    store::insert_batch(&state.db, &to_persist).await?;

    // Stock not restored yet after a Redis loss: come back after a delay.
    for message in not_loaded {
        retry_later(state, message).await?;
    }

    // Units leave the shelf only for orders still live: one cancelled before it was
    // persisted already had its reservation released.
    let owners: Vec<(Uuid, Uuid)> = committed.iter().map(|m| owner(&m.order)).collect();
    let current = store::statuses(&state.db, &owners).await?;
    let sold: Vec<LedgerLine> = committed
        .iter()
        .filter(|m| {
            matches!(
                current.get(&m.order.id),
                Some(OrderStatus::Pending | OrderStatus::Paid)
            )
        })
        .flat_map(|m| lines(&m.order))
        .collect();
    products::record_sold(state, &sold).await?;

    let mut to_charge = vec![];
    let mut renotify = vec![];
    for message in committed {
        match current.get(&message.order.id) {
            Some(OrderStatus::Pending) => to_charge.push(message),
            // Redelivered after it was settled: notify again (the consumer deduplicates).
            Some(status @ (OrderStatus::Paid | OrderStatus::Failed)) => {
                renotify.push((&message.order, *status))
            }
            _ => {}
        }
    }
    notify_all(state, &renotify).await?;
    settle_payments(state, &to_charge).await
}

fn owner(order: &Order) -> (Uuid, Uuid) {
    (order.id, order.user_id)
}

/// Charges every pending order at once (through the breaker) and settles the outcomes in
/// one status update per shard and outcome.
async fn settle_payments(state: &AppState, to_charge: &[&OrderMessage]) -> Result<(), OrdersError> {
    let charges = join_all(
        to_charge
            .iter()
            .map(|m| state.orders.payments.charge(&m.order, m.attempt)),
    )
    .await;
    let (mut approved, mut declined, mut unavailable) = (vec![], vec![], vec![]);
    for (message, charge) in to_charge.iter().zip(charges) {
        match charge {
            Ok(ChargeOutcome::Approved) => approved.push(&message.order),
            Ok(ChargeOutcome::Declined) => declined.push(&message.order),
            Err(e) => {
                tracing::warn!(order = %message.order.id, attempt = message.attempt, error = %e, "charge failed");
                unavailable.push(*message);
            }
        }
    }

    let owners: Vec<(Uuid, Uuid)> = approved.iter().map(|o| owner(o)).collect();
    let paid = store::transition(
        &state.db,
        &owners,
        &[OrderStatus::Pending],
        OrderStatus::Paid,
        None,
    )
    .await?;
    let (paid_now, cancelled_meanwhile): (Vec<&Order>, Vec<&Order>) =
        approved.into_iter().partition(|o| paid.contains(&o.id));
    // Cancelled while the charge was in flight: give the money back.
    join_all(cancelled_meanwhile.iter().map(|o| refund(state, o.id))).await;
    let paid_now: Vec<(&Order, OrderStatus)> = paid_now
        .into_iter()
        .map(|o| (o, OrderStatus::Paid))
        .collect();
    notify_all(state, &paid_now).await?;

    fail(state, &declined, "payment_declined").await?;

    let retried = join_all(unavailable.iter().map(|m| retry_later(state, m))).await;
    let mut exhausted = vec![];
    for (message, retried) in unavailable.into_iter().zip(retried) {
        if !retried? {
            exhausted.push(message);
        }
    }
    let dead_letters = join_all(exhausted.iter().map(|m| async move {
        let payload =
            serde_json::to_vec(&OrderEnvelope::new(vec![(*m).clone()])).map_err(corrupt)?;
        state
            .orders
            .publisher
            .publish(&state.orders.queues.dead, &payload)
            .await
    }))
    .await;
    dead_letters.into_iter().collect::<Result<Vec<()>, _>>()?;
    let exhausted: Vec<&Order> = exhausted.iter().map(|m| &m.order).collect();
    fail(state, &exhausted, "payment_unavailable").await
}

fn corrupt(e: serde_json::Error) -> OrdersError {
    OrdersError::Corrupt(e.to_string())
}

/// Sends the message to the next retry queue; false when the retries are used up.
async fn retry_later(state: &AppState, message: &OrderMessage) -> Result<bool, OrdersError> {
    let queues = &state.orders.queues;
    let Some((queue, _delay)) = queues.retries.get(message.attempt as usize) else {
        return Ok(false);
    };
    let next = OrderMessage {
        attempt: message.attempt + 1,
        ..message.clone()
    };
    let payload = serde_json::to_vec(&OrderEnvelope::new(vec![next])).map_err(corrupt)?;
    state.orders.publisher.publish(queue, &payload).await?;
    Ok(true)
}

/// Marks pending orders failed and gives their units back (once).
async fn fail(
    state: &AppState,
    orders: &[&Order],
    reason: &'static str,
) -> Result<(), OrdersError> {
    if orders.is_empty() {
        return Ok(());
    }
    let owners: Vec<(Uuid, Uuid)> = orders.iter().map(|o| owner(o)).collect();
    let failed = store::transition(
        &state.db,
        &owners,
        &[OrderStatus::Pending],
        OrderStatus::Failed,
        Some(reason),
    )
    .await?;
    release_stock(state, orders).await?;
    let failed: Vec<(&Order, OrderStatus)> = orders
        .iter()
        .filter(|o| failed.contains(&o.id))
        .map(|o| (*o, OrderStatus::Failed))
        .collect();
    notify_all(state, &failed).await
}

/// Releases every item's reservation of `orders`; units of persisted orders go back on
/// the shelf in PostgreSQL too. The reservation state machine makes a repeat a no-op.
pub(super) async fn release_stock(state: &AppState, orders: &[&Order]) -> Result<(), OrdersError> {
    let all_lines: Vec<LedgerLine> = orders.iter().flat_map(|o| lines(o)).collect();
    let released = join_all(
        all_lines
            .iter()
            .map(|line| products::release(state, line.product_id, line.order_id)),
    )
    .await;
    let mut restock = vec![];
    for (line, outcome) in all_lines.into_iter().zip(released) {
        if let products::ReleaseOutcome::Released {
            was_committed: true,
        } = outcome?
        {
            restock.push(line);
        }
    }
    products::record_released(state, &restock).await?;
    Ok(())
}

pub(super) async fn refund(state: &AppState, order: Uuid) {
    if let Err(e) = state.orders.payments.refund(order).await {
        tracing::error!(%order, error = %e, "refund failed; needs manual follow-up");
    }
}

#[derive(Serialize)]
struct Notification {
    /// The notify-worker drops a second notification with the same key.
    dedupe_key: String,
    user_id: Uuid,
    channel: &'static str,
    priority: &'static str,
    subject: String,
    body: String,
    order_id: Uuid,
    status: &'static str,
}

/// One message carries every notification a batch produced: the broker's cost is per
/// message, so a batch of 100 orders costs one publish, not 100.
#[derive(Serialize)]
struct NotificationBatch {
    v: u32,
    notifications: Vec<Notification>,
}

fn notification(order: &Order, status: OrderStatus) -> Notification {
    let (subject, body) = match status {
        OrderStatus::Paid => (
            "Your order is confirmed",
            format!("Order {} is paid: {}.", order.id, order.total_amount),
        ),
        OrderStatus::Cancelled => (
            "Your order was cancelled",
            format!("Order {} was cancelled.", order.id),
        ),
        _ => (
            "Your order could not be completed",
            format!("Order {} failed; you were not charged.", order.id),
        ),
    };
    Notification {
        dedupe_key: format!("order:{}:{}", order.id, status.as_str()),
        user_id: order.user_id,
        channel: "email",
        priority: "high",
        subject: subject.to_owned(),
        body,
        order_id: order.id,
        status: status.as_str(),
    }
}

/// Enqueues order-lifecycle notifications (high priority) as one message.
async fn notify_all(
    state: &AppState,
    settled: &[(&Order, OrderStatus)],
) -> Result<(), OrdersError> {
    if settled.is_empty() {
        return Ok(());
    }
    let batch = NotificationBatch {
        v: 1,
        notifications: settled
            .iter()
            .map(|(order, status)| notification(order, *status))
            .collect(),
    };
    let payload = serde_json::to_vec(&batch).map_err(corrupt)?;
    state
        .orders
        .publisher
        .publish(&state.orders.queues.notifications_high, &payload)
        .await
}
