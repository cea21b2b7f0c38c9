//! The order-worker: consumes the order queue in batches, commits reservations, persists
//! orders into their shards, records the ledger, charges payment, settles statuses,
//! enqueues notifications, and acks only after all of that is committed.
//!
//! Every step is idempotent (ON CONFLICT DO NOTHING, reservation state machine, ledger
//! uniqueness, payment idempotent by order id, status transitions guarded by the current
//! status), so a message redelivered at any point creates no duplicate and no second charge.

use std::time::Duration;

use bigdecimal::{BigDecimal, ToPrimitive};
use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tracing::Instrument;
use uuid::Uuid;

use super::error::OrdersError;
use super::model::{Order, OrderEnvelope, OrderMessage, OrderStatus};
use super::payment::ChargeOutcome;
use super::store::{self, NewOrder};
use crate::app::AppState;
use crate::infra::telemetry;
use crate::modules::notifications::{self, Channel, Notification, Priority};
use crate::modules::products::{self, CommitOutcome, LedgerLine};

/// Consumes until shutdown (the batch in hand is finished and acked first), the connection
/// closes, or a broker error.
pub async fn run(state: AppState) -> Result<(), OrdersError> {
    let settings = &state.settings.orders;
    let stopping = &state.shutdown;
    let (channel, mut consumer) = state
        .amqp
        .consume(
            &state.orders.queues.orders,
            settings.prefetch,
            "order-worker",
        )
        .await?;
    tracing::info!(queue = %state.orders.queues.orders, "order-worker consuming");
    let linger = Duration::from_millis(settings.batch_linger_ms);
    loop {
        let first = tokio::select! {
            biased;
            () = stopping.cancelled() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        // A batch holds whole deliveries until it has batch_size orders (or the linger ends).
        let mut batch = vec![parse(first)];
        let deadline = tokio::time::sleep(linger);
        tokio::pin!(deadline);
        while orders_in(&batch) < settings.batch_size {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(delivery) => batch.push(parse(delivery?)),
                    None => break,
                },
                _ = &mut deadline => break,
                () = stopping.cancelled() => break,
            }
        }
        process_batch(&state, batch).await?;
    }
    // Prefetched deliveries not yet taken go back to the queue now, not at disconnect.
    if let Err(e) = channel.close(200, "order-worker stopping".into()).await {
        tracing::warn!(error = %e, "closing the order channel");
    }
    tracing::info!("order-worker stopped");
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
    match handle(state, &messages)
        .instrument(batch_span(&messages))
        .await
    {
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

/// One span per batch (see `telemetry::join_batch`).
fn batch_span(messages: &[OrderMessage]) -> tracing::Span {
    let span = tracing::info_span!("order batch", orders = messages.len());
    telemetry::join_batch(
        &span,
        messages.iter().filter_map(|m| m.traceparent.as_deref()),
    );
    span
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

/// One batch, end to end. The order of steps is what makes redelivery safe:
/// 1. commit reservations (a released one means the order may not proceed);
/// 2. look up which orders already have a row (settled before a crash, or cancelled
///    before the worker reached them): those are not charged again;
/// 3. charge the rest (idempotent by order id, so a crash after charging and before
///    step 4 charges nothing twice);
/// 4. write every order in its final state, one insert per shard (ON CONFLICT DO NOTHING);
/// 5. ledger, stock releases and notifications, each idempotent, for this batch's and
///    for earlier-settled orders alike; then the caller acks.
async fn handle(state: &AppState, messages: &[OrderMessage]) -> Result<(), OrdersError> {
    let commits = commit_orders(state, messages).await?;
    let mut rows = Vec::with_capacity(messages.len());
    let mut committed = vec![];
    for (message, outcome) in messages.iter().zip(commits) {
        let reason = match outcome {
            CommitOutcome::Committed => {
                committed.push(message);
                continue;
            }
            CommitOutcome::Released => "reservation_released",
            CommitOutcome::SoldOut => "sold_out",
            CommitOutcome::NotLoaded => {
                // Stock not restored yet after a Redis loss: come back after a delay.
                retry_later(state, message).await?;
                continue;
            }
        };
        rows.push(final_row(message, OrderStatus::Failed, Some(reason)));
    }

    let owners: Vec<(Uuid, Uuid)> = committed.iter().map(|m| owner(&m.order)).collect();
    let existing = store::statuses(&state.db, &owners).await?;
    let (seen, fresh): (Vec<&OrderMessage>, Vec<&OrderMessage>) = committed
        .into_iter()
        .partition(|m| existing.contains_key(&m.order.id));

    let charged = charge(state, &fresh).await?;
    for (message, status, reason) in &charged {
        rows.push(final_row(message, *status, *reason));
    }
    let inserted = store::insert_batch(&state.db, &rows).await?;

    // Settled now, or settled by an earlier delivery that crashed before finishing.
    let mut settled: Vec<Settled> = vec![];
    for row in rows.iter().filter(|row| inserted.contains(&row.order.id)) {
        record_settled(row);
        settled.push(Settled {
            order: row.order,
            status: row.status,
            traceparent: row.traceparent,
        });
    }
    for (message, status, _) in &charged {
        if *status == OrderStatus::Paid && !inserted.contains(&message.order.id) {
            // Someone cancelled it while it was being charged: give the money back.
            refund(state, message.order.id).await;
        }
    }
    for message in seen {
        if let Some(status @ (OrderStatus::Paid | OrderStatus::Failed)) =
            existing.get(&message.order.id)
        {
            settled.push(Settled {
                order: &message.order,
                status: *status,
                traceparent: message.traceparent.as_deref(),
            });
        }
    }
    let sold: Vec<LedgerLine> = settled
        .iter()
        .filter(|s| s.status == OrderStatus::Paid)
        .flat_map(|s| lines(s.order))
        .collect();
    products::record_sold(state, &sold).await?;
    let failed: Vec<&Order> = settled
        .iter()
        .filter(|s| s.status == OrderStatus::Failed)
        .map(|s| s.order)
        .collect();
    release_stock(state, &failed).await?;
    notify_all(state, &settled).await
}

/// An order in a final state, and the trace its notification joins.
pub(super) struct Settled<'a> {
    pub order: &'a Order,
    pub status: OrderStatus,
    pub traceparent: Option<&'a str>,
}

/// `orders_total` and the accept-to-settled time, once per order (the insert that wrote it).
fn record_settled(row: &NewOrder<'_>) {
    super::count_order(row.status, row.kind);
    let waited = chrono::Utc::now() - row.order.created_at;
    metrics::histogram!("order_duration_seconds", "type" => row.kind.as_str())
        .record(waited.as_seconds_f64().max(0.0));
    if row.status == OrderStatus::Paid {
        // Cents, for the revenue panel; the ledger and the orders table are the books.
        let cents = (&row.order.total_amount * BigDecimal::from(100))
            .to_u64()
            .unwrap_or(0);
        metrics::counter!("order_revenue_cents_total", "type" => row.kind.as_str())
            .increment(cents);
    }
}

fn owner(order: &Order) -> (Uuid, Uuid) {
    (order.id, order.user_id)
}

fn final_row<'a>(
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
    }
}

/// Charges every order at once (through the breaker). Answers the final status of each
/// order that is settled; an order whose charge failed goes to a retry queue, or, once its
/// retries are used up, to the dead-letter queue as failed.
async fn charge<'a>(
    state: &AppState,
    to_charge: &[&'a OrderMessage],
) -> Result<Vec<(&'a OrderMessage, OrderStatus, Option<&'static str>)>, OrdersError> {
    let charges = join_all(
        to_charge
            .iter()
            .map(|m| state.orders.payments.charge(&m.order, m.attempt)),
    )
    .await;
    let mut settled = Vec::with_capacity(to_charge.len());
    for (message, charge) in to_charge.iter().zip(charges) {
        match charge {
            Ok(ChargeOutcome::Approved) => settled.push((*message, OrderStatus::Paid, None)),
            Ok(ChargeOutcome::Declined) => {
                settled.push((*message, OrderStatus::Failed, Some("payment_declined")))
            }
            Err(e) => {
                tracing::warn!(order = %message.order.id, attempt = message.attempt, error = %e, "charge failed");
                if !retry_later(state, message).await? {
                    let payload = serde_json::to_vec(&OrderEnvelope::new(vec![(*message).clone()]))
                        .map_err(corrupt)?;
                    state
                        .orders
                        .publisher
                        .publish(&state.orders.queues.dead, &payload)
                        .await?;
                    settled.push((*message, OrderStatus::Failed, Some("payment_unavailable")));
                }
            }
        }
    }
    Ok(settled)
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
    // A redelivered batch builds the same key, so the buyer hears about each change once.
    notification.dedupe_key = format!("order:{}:{}", order.id, status.as_str());
    notification.traceparent = settled.traceparent.map(str::to_owned);
    notification
}

/// Enqueues order-lifecycle notifications (high priority) as one message.
pub(super) async fn notify_all(
    state: &AppState,
    settled: &[Settled<'_>],
) -> Result<(), OrdersError> {
    let batch = settled.iter().map(notification).collect();
    notifications::enqueue(state, Priority::High, batch).await?;
    Ok(())
}
