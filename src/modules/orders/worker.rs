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
use super::model::{Order, OrderMessage, OrderStatus};
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
        let mut batch = vec![first?];
        let deadline = tokio::time::sleep(linger);
        tokio::pin!(deadline);
        while batch.len() < settings.batch_size {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(delivery) => batch.push(delivery?),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        process_batch(&state, batch).await?;
    }
    Ok(())
}

/// Settles one batch of deliveries with the broker.
async fn process_batch(state: &AppState, deliveries: Vec<Delivery>) -> Result<(), OrdersError> {
    let mut messages = Vec::with_capacity(deliveries.len());
    let mut last_kept = None;
    for delivery in deliveries {
        match serde_json::from_slice::<OrderMessage>(&delivery.data) {
            Ok(message) => {
                messages.push(message);
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

/// Commits every item's reservation; the order proceeds only if all were committed.
async fn commit_order(state: &AppState, order: &Order) -> Result<CommitOutcome, OrdersError> {
    let mut outcome = CommitOutcome::Committed;
    for line in lines(order) {
        match products::commit(state, line, order.user_id).await? {
            CommitOutcome::Committed => {}
            other => outcome = other,
        }
    }
    Ok(outcome)
}

async fn handle(state: &AppState, messages: &[OrderMessage]) -> Result<(), OrdersError> {
    let commits = join_all(messages.iter().map(|m| commit_order(state, &m.order))).await;
    let mut to_persist = Vec::with_capacity(messages.len());
    let mut committed = vec![];
    let mut not_loaded = vec![];
    for (message, outcome) in messages.iter().zip(commits) {
        let (status, reason) = match outcome? {
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
    let owners: Vec<(Uuid, Uuid)> = committed
        .iter()
        .map(|m| (m.order.id, m.order.user_id))
        .collect();
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
    for message in committed {
        match current.get(&message.order.id) {
            Some(OrderStatus::Pending) => to_charge.push(message),
            // Redelivered after it was settled: notify again (the consumer deduplicates).
            Some(status @ (OrderStatus::Paid | OrderStatus::Failed)) => {
                notify(state, &message.order, *status).await?
            }
            _ => {}
        }
    }
    let charges = join_all(
        to_charge
            .iter()
            .map(|m| state.orders.payments.charge(&m.order, m.attempt)),
    )
    .await;
    for (message, charge) in to_charge.into_iter().zip(charges) {
        let order = &message.order;
        match charge {
            Ok(ChargeOutcome::Approved) => {
                let paid = store::transition(
                    &state.db,
                    order.user_id,
                    order.id,
                    &[OrderStatus::Pending],
                    OrderStatus::Paid,
                    None,
                )
                .await?;
                if paid {
                    notify(state, order, OrderStatus::Paid).await?;
                } else {
                    // Cancelled while the charge was in flight: give the money back.
                    refund(state, order.id).await;
                }
            }
            Ok(ChargeOutcome::Declined) => fail(state, order, "payment_declined").await?,
            Err(e) => {
                tracing::warn!(order = %order.id, attempt = message.attempt, error = %e, "charge failed");
                if !retry_later(state, message).await? {
                    state
                        .orders
                        .publisher
                        .publish(
                            &state.orders.queues.dead,
                            &serde_json::to_vec(message).map_err(corrupt)?,
                        )
                        .await?;
                    fail(state, order, "payment_unavailable").await?;
                }
            }
        }
    }
    Ok(())
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
    state
        .orders
        .publisher
        .publish(queue, &serde_json::to_vec(&next).map_err(corrupt)?)
        .await?;
    Ok(true)
}

/// Marks a pending order failed and gives its units back (once).
async fn fail(state: &AppState, order: &Order, reason: &'static str) -> Result<(), OrdersError> {
    let failed = store::transition(
        &state.db,
        order.user_id,
        order.id,
        &[OrderStatus::Pending],
        OrderStatus::Failed,
        Some(reason),
    )
    .await?;
    release_stock(state, order).await?;
    if failed {
        notify(state, order, OrderStatus::Failed).await?;
    }
    Ok(())
}

/// Releases every item's reservation; units of persisted orders go back on the shelf in
/// PostgreSQL too. The reservation state machine makes a second call a no-op.
pub(super) async fn release_stock(state: &AppState, order: &Order) -> Result<(), OrdersError> {
    let mut restock = vec![];
    for line in lines(order) {
        if let products::ReleaseOutcome::Released {
            was_committed: true,
        } = products::release(state, line.product_id, order.id).await?
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
struct Notification<'a> {
    v: u32,
    /// The notify-worker drops a second message with the same key.
    dedupe_key: String,
    user_id: Uuid,
    channel: &'static str,
    priority: &'static str,
    subject: String,
    body: String,
    order_id: Uuid,
    status: &'a str,
}

/// Enqueues the order-lifecycle notification (high priority).
pub(super) async fn notify(
    state: &AppState,
    order: &Order,
    status: OrderStatus,
) -> Result<(), OrdersError> {
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
    let message = Notification {
        v: 1,
        dedupe_key: format!("order:{}:{}", order.id, status.as_str()),
        user_id: order.user_id,
        channel: "email",
        priority: "high",
        subject: subject.to_owned(),
        body,
        order_id: order.id,
        status: status.as_str(),
    };
    let payload = serde_json::to_vec(&message).map_err(corrupt)?;
    state
        .orders
        .publisher
        .publish(&state.orders.queues.notifications_high, &payload)
        .await
}
