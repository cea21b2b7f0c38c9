//! The order-worker: consumes the order queue in batches and settles them so that no order
//! holds another back, acking only after everything a batch did is committed.
//!
//! - A dependency that is down (database, Redis, broker) stalls the batch in hand, which is
//!   tried again with backoff until it is back; nothing is failed for an outage.
//! - A batch that fails for any other reason is split in halves, down to single orders; an
//!   order that still fails on its own is given up on: `failed` with its reason, units released,
//!   any charge refunded, the buyer told, a copy on the dead-letter queue.
//! - An order that cannot be settled yet (payment gateway failing, stock being restored)
//!   goes to a retry queue; once its retries are used up it is given up on the same way.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tracing::Instrument;

use super::acceptance;
use super::error::OrdersError;
use super::holding::Holding;
use super::metrics;
use super::model::{OrderEnvelope, OrderMessage, OrderStatus};
use super::refunds;
use super::settle::{self, DeferReason, Deferred, Settled};
use super::store;
use crate::app::AppState;
use crate::infra::telemetry;

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
    let holding = Holding::new(&state.redis);
    loop {
        // Stopping comes first: prefetched deliveries go back to the queue with the channel.
        if stopping.is_cancelled() {
            break;
        }
        // A delivery already buffered (prefetched) is taken at once; only a consumer with
        // nothing buffered holds nothing, and says so before it waits.
        let buffered = tokio::time::timeout(Duration::ZERO, consumer.next()).await;
        let next = match buffered {
            Ok(next) => next,
            Err(_) => {
                holding.release().await;
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => break,
                    next = consumer.next() => next,
                }
            }
        };
        let first = match next {
            Some(delivery) => delivery?,
            None => break,
        };
        holding.hold().await;
        // A batch holds whole deliveries until it has batch_size orders (or the linger
        // ends); under a backlog the prefetched deliveries fill it at once.
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
    holding.release().await;
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
    match settle_isolated(state, &messages)
        .instrument(batch_span(&messages))
        .await
    {
        Ok(()) => {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Err(e) => {
            // Stopping while a dependency is down: the batch goes back for the next worker.
            tracing::warn!(error = %e, orders = messages.len(), "order batch interrupted; requeueing");
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

/// Settles a batch so that no order holds another back: a batch that fails for anything
/// but an outage is split in halves, and failing halves again, down to single orders; one
/// bad order among a thousand costs about twenty small batches, not a thousand. Fails only
/// when stopping while a dependency is down.
fn settle_isolated<'a>(
    state: &'a AppState,
    messages: &'a [OrderMessage],
) -> futures_util::future::BoxFuture<'a, Result<(), OrdersError>> {
    Box::pin(async move {
        if let [message] = messages {
            return settle_alone(state, message).await;
        }
        match settle_through_outages(state, messages).await {
            Err(e) if !e.is_outage() => {
                tracing::warn!(error = %e, orders = messages.len(), "order batch failed; splitting it");
                metrics::count_split_batch();
                let (first, second) = messages.split_at(messages.len() / 2);
                settle_isolated(state, first).await?;
                settle_isolated(state, second).await
            }
            other => other,
        }
    })
}

/// One order on its own; if it still fails (twice, so a fault that merely coincided with
/// it does not fail it), it is given up on.
async fn settle_alone(state: &AppState, message: &OrderMessage) -> Result<(), OrdersError> {
    let alone = std::slice::from_ref(message);
    let mut outcome = settle_through_outages(state, alone).await;
    if outcome.as_ref().is_err_and(|e| !e.is_outage()) {
        outcome = settle_through_outages(state, alone).await;
    }
    match outcome {
        Err(e) if !e.is_outage() => {
            tracing::error!(order = %message.order.id, error = %e, "order cannot be settled on its own");
            give_up(state, message, "unprocessable").await
        }
        other => other,
    }
}

/// Settles `messages` and sends on what must wait; while a dependency is down, tries
/// again with backoff until it is back or the process stops.
async fn settle_through_outages(
    state: &AppState,
    messages: &[OrderMessage],
) -> Result<(), OrdersError> {
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times();
    (|| settle_and_defer(state, messages))
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(|e| e.is_outage() && !state.shutdown.is_cancelled())
        .notify(|e, wait| tracing::warn!(error = %e, ?wait, orders = messages.len(), "a dependency is down; the batch waits"))
        .await
}

async fn settle_and_defer(state: &AppState, messages: &[OrderMessage]) -> Result<(), OrdersError> {
    for deferred in settle::settle_batch(state, messages).await? {
        if !retry_later(state, &deferred).await? {
            give_up(state, deferred.message, deferred.reason.failure_reason()).await?;
        }
    }
    Ok(())
}

/// Sends the order to the next retry queue; false when its retries are used up. An order
/// waiting for its sale's stock to be restored keeps retrying at the longest delay until
/// `orders.stock_restore_wait_secs` after it was placed: a rebuild takes two reconciler
/// passes, longer than the retry schedule may be.
async fn retry_later(state: &AppState, deferred: &Deferred<'_>) -> Result<bool, OrdersError> {
    let message = deferred.message;
    let queues = &state.orders.queues;
    let mut step = message.attempt as usize;
    if deferred.reason == DeferReason::StockRestoring {
        let waited = chrono::Utc::now() - message.order.created_at;
        let patience = chrono::Duration::seconds(state.settings.orders.stock_restore_wait_secs);
        if waited < patience {
            step = step.min(queues.retries.len().saturating_sub(1));
        }
    }
    let Some((queue, _delay)) = queues.retries.get(step) else {
        return Ok(false);
    };
    let next = OrderMessage {
        attempt: message.attempt + 1,
        charge_sent: message.charge_sent || deferred.charge_sent,
        ..message.clone()
    };
    publish_alone(state, queue, next).await?;
    Ok(true)
}

pub(super) async fn publish_alone(
    state: &AppState,
    queue: &str,
    message: OrderMessage,
) -> Result<(), OrdersError> {
    let payload = serde_json::to_vec(&OrderEnvelope::new(vec![message]))
        .map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    state.orders.publisher.publish(queue, &payload).await?;
    Ok(())
}

/// Ends an order that cannot be settled: any charge refunded, its units released, recorded
/// `failed` with `reason` (in its shard, or in its acceptance record when the shard cannot
/// hold it), the buyer told, and a copy on the dead-letter queue for an operator.
pub(super) async fn give_up(
    state: &AppState,
    message: &OrderMessage,
    reason: &'static str,
) -> Result<(), OrdersError> {
    tracing::error!(order = %message.order.id, reason, "order failed for good; dead-lettered");
    metrics::count_dead_lettered(reason);
    let order = &message.order;
    refunds::refund(state, order).await?;
    if let Err(e) = settle::release_stock(state, &[order]).await {
        if e.is_outage() {
            return Err(e);
        }
        // Left for the reconciler, which releases reservations whose order never settled.
        tracing::error!(order = %order.id, error = %e, "releasing the units of a failed order");
    }
    let row = settle::final_row(message, OrderStatus::Failed, Some(reason));
    match store::insert_batch(&state.db, std::slice::from_ref(&row)).await {
        Ok(written) if written.inserted.contains(&order.id) => {}
        Ok(_) => {
            let traceparent = message.traceparent.as_deref();
            let grace = refunds::debt_grace(state);
            store::end(
                &state.db,
                order,
                OrderStatus::Failed,
                Some(reason),
                traceparent,
                grace,
            )
            .await?;
        }
        Err(e) if e.is_outage() => return Err(e),
        Err(e) => {
            tracing::warn!(order = %order.id, error = %e, "the shard cannot hold the order; failed in its acceptance record");
            acceptance::record_failed(state, message).await?;
        }
    }
    settle::apply_stock_moves_of(state, order).await?;
    metrics::record_settled(order, OrderStatus::Failed, message.kind);
    settle::count_settled(state, 1).await;
    settle::notify(state, &[Settled::from(&row)]).await?;
    let dead = OrderMessage {
        failure_reason: Some(reason.to_owned()),
        ..message.clone()
    };
    publish_alone(state, &state.orders.queues.dead, dead).await
}
