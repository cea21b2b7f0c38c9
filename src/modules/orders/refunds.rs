//! Refunds never vanish: a refund the gateway fails goes to a retry queue with growing
//! delays (`orders.refund_retry_delays_ms`), consumed by the order-worker; after the last
//! retry it goes to `<prefix>refunds.dead` for an operator, with a log line, the metric
//! `refunds_dead_lettered_total` and an alert. Refunds are idempotent by order id, so a
//! retry never pays back twice.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::OrdersError;
use crate::app::AppState;

/// A refund still owed.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefundMessage {
    pub order: Uuid,
    /// Failed attempts so far.
    pub attempt: u32,
}

/// Refunds a charged order (an order never charged is left alone); if the gateway fails,
/// the refund is retried later.
pub async fn refund(state: &AppState, order: Uuid) {
    let Err(e) = state.orders.payments.refund(order).await else {
        return;
    };
    metrics::counter!("refunds_failed_total").increment(1);
    tracing::warn!(%order, error = %e, "refund failed; retrying later");
    let owed = RefundMessage { order, attempt: 1 };
    if let Err(e) = retry_later(state, &owed).await {
        tracing::error!(%order, error = %e, "refund failed and could not be queued; needs manual follow-up");
    }
}

/// Sends a failed refund to its next retry queue, or to the dead-letter queue after the last.
async fn retry_later(state: &AppState, owed: &RefundMessage) -> Result<(), OrdersError> {
    let queues = &state.orders.queues;
    let queue = match queues.refund_retries.get(owed.attempt as usize - 1) {
        Some((queue, _delay)) => queue,
        None => {
            metrics::counter!("refunds_dead_lettered_total").increment(1);
            tracing::error!(order = %owed.order, attempts = owed.attempt, "refund failed for good; dead-lettered for an operator");
            &queues.refunds_dead
        }
    };
    let payload = serde_json::to_vec(owed).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    state.orders.publisher.publish(queue, &payload).await?;
    Ok(())
}

/// The order-worker's refund consumer; runs until shutdown or a broker error.
pub async fn run(state: AppState) -> Result<(), OrdersError> {
    let queue = &state.orders.queues.refunds;
    let (channel, mut consumer) = state.amqp.consume(queue, 16, "refunds").await?;
    loop {
        let delivery = tokio::select! {
            () = state.shutdown.cancelled() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        let Ok(owed) = serde_json::from_slice::<RefundMessage>(&delivery.data) else {
            tracing::error!("refund message does not parse; dead-lettering");
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            continue;
        };
        match state.orders.payments.refund(owed.order).await {
            Ok(()) => {
                tracing::info!(order = %owed.order, attempt = owed.attempt, "refund retried and done")
            }
            Err(e) => {
                metrics::counter!("refunds_failed_total").increment(1);
                tracing::warn!(order = %owed.order, attempt = owed.attempt, error = %e, "refund failed again");
                let next = RefundMessage {
                    order: owed.order,
                    attempt: owed.attempt + 1,
                };
                retry_later(&state, &next).await?;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    if let Err(e) = channel.close(200, "refunds stopping".into()).await {
        tracing::warn!(error = %e, "closing the refund channel");
    }
    Ok(())
}
