//! RabbitMQ: one connection per process; channels are opened from it by the roles that
//! publish or consume.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

use std::time::Duration;

use crate::config::AmqpSettings;

#[derive(Clone)]
pub struct Amqp {
    conn: std::sync::Arc<Connection>,
    confirm_timeout: Duration,
}

impl Amqp {
    pub async fn connect(settings: &AmqpSettings) -> Result<Self, lapin::Error> {
        // Auto-recovery reconnects after a broker restart and re-opens channels, consumers
        // and declared topology.
        let props = ConnectionProperties::default()
            .with_connection_name(settings.connection_name.as_str().into())
            .enable_auto_recover();
        let conn = Connection::connect(&settings.url, props).await?;
        Ok(Self {
            conn: std::sync::Arc::new(conn),
            confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Messages waiting in each queue and its consumers (a passive declare per queue, on a
    /// channel of its own: a missing queue closes the channel it was asked on).
    pub async fn queue_depths(&self, queues: &[String]) -> Result<Vec<(u32, u32)>, lapin::Error> {
        let channel = self.conn.create_channel().await?;
        let mut depths = Vec::with_capacity(queues.len());
        for queue in queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            depths.push((declared.message_count(), declared.consumer_count()));
        }
        let _ = channel.close(200, "sampled".into()).await;
        Ok(depths)
    }

    /// Consumes `queue` on a channel of its own with at most `prefetch` unacked deliveries.
    /// The channel is returned too: deliveries are acked on it, so it must outlive them.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<(Channel, Consumer), lapin::Error> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}: message returned as unroutable")]
    Unroutable(String),
    #[error("{0}: broker refused the message")]
    Refused(String),
    #[error("publisher confirms are off")]
    NoConfirms,
    #[error("{0}: no confirm within the timeout")]
    TimedOut(String),
}

/// Publishes with confirms: persistent, mandatory, and only `Ok` once the broker has taken
/// responsibility for the message. Concurrent publishes share the channel, so their
/// confirms are pipelined rather than waited for one by one.
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn open(amqp: &Amqp) -> Result<Self, lapin::Error> {
        let channel = amqp.connection().create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            confirm_timeout: amqp.confirm_timeout,
        })
    }

    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub async fn publish(&self, queue: &str, payload: &[u8]) -> Result<(), PublishError> {
        self.publish_with(queue, payload, FieldTable::default())
            .await
    }

    /// Publishes with message headers (the W3C trace context rides in them). A confirm that
    /// does not come within the timeout is a failure: the message may still arrive, and its
    /// consumer must find the order's reservation released (the caller gives it back).
    pub async fn publish_with(
        &self,
        queue: &str,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        tokio::time::timeout(
            self.confirm_timeout,
            self.publish_confirmed(queue, payload, headers),
        )
        .await
        .map_err(|_| PublishError::TimedOut(queue.to_owned()))?
    }

    async fn publish_confirmed(
        &self,
        queue: &str,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
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
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(queue.to_owned())),
            Confirmation::Nack(_) => Err(PublishError::Refused(queue.to_owned())),
            Confirmation::NotRequested => Err(PublishError::NoConfirms),
        }
    }
}

/// Queue arguments from `pairs`, plus `x-expires` when set (tests let unused queues vanish).
pub fn queue_args(pairs: &[(&str, AMQPValue)], expires_ms: Option<u32>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(*key), value.clone());
    }
    if let Some(ms) = expires_ms {
        table.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    table
}

/// Message headers carrying a W3C trace context, when there is one.
pub fn trace_headers(traceparent: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(traceparent) = traceparent {
        headers.insert("traceparent".into(), text(traceparent));
    }
    headers
}

pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}
