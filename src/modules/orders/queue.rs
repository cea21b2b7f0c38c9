//! RabbitMQ topology and publishing for orders.
//!
//! `<prefix>orders` (quorum or classic, durable) is consumed by the order-worker. A failed
//! attempt goes to `<prefix>orders.retry.<n>`, a queue with a message TTL that dead-letters
//! back into the order queue (so delays grow with n); after the last retry the message goes
//! to `<prefix>orders.dead`. Messages the worker cannot even parse are rejected and
//! dead-lettered by the broker into the same dead queue.
//!
//! Refunds that failed take the same shape: `<prefix>refunds` (consumed by the order-worker),
//! `<prefix>refunds.retry.<n>` and `<prefix>refunds.dead`.

use lapin::types::AMQPValue;

use serde_json::value::RawValue;

use super::model::OrderEnvelope;
use crate::config::OrdersSettings;
use crate::infra::amqp::{durable, queue_args as args, text, trace_headers, Amqp, Publisher};

#[derive(Debug, Clone)]
pub struct QueueNames {
    pub orders: String,
    pub dead: String,
    pub retries: Vec<(String, u32)>,
    pub refunds: String,
    pub refunds_dead: String,
    pub refund_retries: Vec<(String, u32)>,
}

/// `<base>.retry.<n>` for each delay.
fn retry_queues(base: &str, delays_ms: &[u32]) -> Vec<(String, u32)> {
    delays_ms
        .iter()
        .enumerate()
        .map(|(i, delay)| (format!("{base}.retry.{}", i + 1), *delay))
        .collect()
}

impl QueueNames {
    pub fn new(prefix: &str, settings: &OrdersSettings) -> Self {
        let (orders, refunds) = (format!("{prefix}orders"), format!("{prefix}refunds"));
        Self {
            dead: format!("{orders}.dead"),
            retries: retry_queues(&orders, &settings.retry_delays_ms),
            refunds_dead: format!("{refunds}.dead"),
            refund_retries: retry_queues(&refunds, &settings.refund_retry_delays_ms),
            orders,
            refunds,
        }
    }

    /// Every queue, for the depth gauges.
    pub fn all(&self) -> Vec<String> {
        let mut names = vec![
            self.orders.clone(),
            self.dead.clone(),
            self.refunds.clone(),
            self.refunds_dead.clone(),
        ];
        names.extend(
            self.retries
                .iter()
                .chain(&self.refund_retries)
                .map(|(name, _)| name.clone()),
        );
        names
    }
}

/// Retry queues: each holds a message for its delay, then dead-letters it into `target`.
async fn declare_retries(
    channel: &lapin::Channel,
    retries: &[(String, u32)],
    target: &str,
    expires: Option<u32>,
) -> Result<(), lapin::Error> {
    for (queue, delay_ms) in retries {
        channel
            .queue_declare(
                queue.as_str().into(),
                durable(),
                args(
                    &[
                        ("x-message-ttl", AMQPValue::LongUInt(*delay_ms)),
                        ("x-dead-letter-exchange", text("")),
                        ("x-dead-letter-routing-key", text(target)),
                    ],
                    expires,
                ),
            )
            .await?;
    }
    Ok(())
}

/// Declares every queue the order path uses; idempotent.
pub async fn declare(
    amqp: &Amqp,
    names: &QueueNames,
    settings: &OrdersSettings,
    expires: Option<u32>,
) -> Result<(), lapin::Error> {
    let channel = amqp.connection().create_channel().await?;
    for dead in [&names.dead, &names.refunds_dead] {
        channel
            .queue_declare(dead.as_str().into(), durable(), args(&[], expires))
            .await?;
    }
    declare_retries(&channel, &names.retries, &names.orders, expires).await?;
    declare_retries(&channel, &names.refund_retries, &names.refunds, expires).await?;
    channel
        .queue_declare(
            names.refunds.as_str().into(),
            durable(),
            args(
                &[
                    ("x-queue-type", text(&settings.queue_type)),
                    ("x-dead-letter-exchange", text("")),
                    ("x-dead-letter-routing-key", text(&names.refunds_dead)),
                ],
                expires,
            ),
        )
        .await?;
    let mut order_queue = vec![
        ("x-queue-type", text(&settings.queue_type)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&names.dead)),
    ];
    // The backstop for a message that kills its worker every time: after this many
    // deliveries the broker dead-letters it (quorum queues only count deliveries).
    if settings.queue_type == "quorum" {
        order_queue.push((
            "x-delivery-limit",
            AMQPValue::LongUInt(settings.delivery_limit),
        ));
    }
    let declared = channel
        .queue_declare(
            names.orders.as_str().into(),
            durable(),
            args(&order_queue, expires),
        )
        .await;
    match declared {
        Ok(_) => channel.close(200, "declared".into()).await,
        // A queue declared with other arguments (by a version without the delivery limit):
        // arguments of an existing queue cannot change, so it keeps working as it is (the
        // refusal closed this channel only).
        Err(e) if is_precondition_failed(&e) => {
            tracing::warn!(
                queue = %names.orders,
                "the order queue exists with other arguments, likely without a delivery limit; \
                 set one with a broker policy \
                 (rabbitmqctl set_policy --apply-to queues order-delivery-limit '^{}$' \
                 '{{\"delivery-limit\": {}}}')",
                names.orders,
                settings.delivery_limit
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Publishes orders accepted together (each an `OrderMessage` already serialized) as one
/// message with `traceparent` in its headers, and waits for the broker's confirm (bounded by
/// the publisher's confirm timeout).
pub async fn publish_orders(
    publisher: &Publisher,
    queue: &str,
    orders: &[&RawValue],
    traceparent: Option<&str>,
) -> Result<(), String> {
    let headers = trace_headers(traceparent);
    let payload =
        serde_json::to_vec(&OrderEnvelope::new(orders.to_vec())).map_err(|e| e.to_string())?;
    publisher
        .publish_with(queue, &payload, headers)
        .await
        .map_err(|e| e.to_string())
}
