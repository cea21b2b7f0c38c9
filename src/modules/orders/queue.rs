//! RabbitMQ topology and publishing for orders.
//!
//! `<prefix>orders` (quorum or classic, durable) is consumed by the order-worker. A failed
//! attempt goes to `<prefix>orders.retry.<n>`, a queue with a message TTL that dead-letters
//! back into the order queue (so delays grow with n); after the last retry the message goes
//! to `<prefix>orders.dead`. Messages the worker cannot even parse are rejected and
//! dead-lettered by the broker into the same dead queue.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel};

use super::error::OrdersError;
use crate::config::OrdersSettings;
use crate::infra::amqp::Amqp;

#[derive(Debug, Clone)]
pub struct QueueNames {
    pub orders: String,
    pub dead: String,
    pub retries: Vec<(String, u32)>,
    /// High-priority notifications (order confirmations); consumed by the notify-worker.
    pub notifications_high: String,
}

impl QueueNames {
    pub fn new(settings: &OrdersSettings) -> Self {
        let prefix = &settings.amqp_prefix;
        Self {
            orders: format!("{prefix}orders"),
            dead: format!("{prefix}orders.dead"),
            retries: settings
                .retry_delays_ms
                .iter()
                .enumerate()
                .map(|(i, delay)| (format!("{prefix}orders.retry.{}", i + 1), *delay))
                .collect(),
            notifications_high: format!("{prefix}notifications.high"),
        }
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn args(pairs: &[(&str, AMQPValue)], expires_ms: Option<u32>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(*key), value.clone());
    }
    if let Some(ms) = expires_ms {
        table.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// Declares every queue the order path uses; idempotent.
pub async fn declare(
    channel: &Channel,
    names: &QueueNames,
    settings: &OrdersSettings,
) -> Result<(), lapin::Error> {
    let expires = settings.queue_expires_ms;
    channel
        .queue_declare(names.dead.as_str().into(), durable(), args(&[], expires))
        .await?;
    channel
        .queue_declare(
            names.orders.as_str().into(),
            durable(),
            args(
                &[
                    ("x-queue-type", text(&settings.queue_type)),
                    ("x-dead-letter-exchange", text("")),
                    ("x-dead-letter-routing-key", text(&names.dead)),
                ],
                expires,
            ),
        )
        .await?;
    for (queue, delay_ms) in &names.retries {
        channel
            .queue_declare(
                queue.as_str().into(),
                durable(),
                args(
                    &[
                        ("x-message-ttl", AMQPValue::LongUInt(*delay_ms)),
                        ("x-dead-letter-exchange", text("")),
                        ("x-dead-letter-routing-key", text(&names.orders)),
                    ],
                    expires,
                ),
            )
            .await?;
    }
    channel
        .queue_declare(
            names.notifications_high.as_str().into(),
            durable(),
            args(&[], expires),
        )
        .await?;
    Ok(())
}

/// Publishes with confirms: persistent, mandatory, and only `Ok` once the broker has taken
/// responsibility for the message. Concurrent publishes share the channel, so their
/// confirms are pipelined rather than waited for one by one.
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(amqp: &Amqp) -> Result<Self, lapin::Error> {
        let channel = amqp.connection().create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub async fn publish(&self, queue: &str, payload: &[u8]) -> Result<(), OrdersError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(OrdersError::Queue(format!(
                "{queue}: message returned as unroutable"
            ))),
            Confirmation::Nack(_) => Err(OrdersError::Queue(format!(
                "{queue}: broker refused the message"
            ))),
            Confirmation::NotRequested => {
                Err(OrdersError::Queue("publisher confirms are off".into()))
            }
        }
    }
}
