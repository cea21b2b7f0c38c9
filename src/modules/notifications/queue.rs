//! RabbitMQ topology for notifications: one durable queue per priority
//! (`<prefix>notifications.high|normal|low`) and `<prefix>notifications.dead`. Messages the
//! worker cannot parse are rejected and dead-lettered by the broker; notifications whose
//! last retry failed are published to the dead queue with the reason.

use lapin::Channel;

use super::model::Priority;
use crate::config::AmqpSettings;
use crate::infra::amqp::{durable, queue_args, text};

#[derive(Debug, Clone)]
pub struct NotificationQueues {
    by_priority: [String; 3],
    pub dead: String,
}

impl NotificationQueues {
    pub fn new(prefix: &str) -> Self {
        Self {
            by_priority: Priority::ALL.map(|p| format!("{prefix}notifications.{}", p.as_str())),
            dead: format!("{prefix}notifications.dead"),
        }
    }

    pub fn for_priority(&self, priority: Priority) -> &str {
        &self.by_priority[priority.index()]
    }
}

/// Declares the queues; idempotent.
pub async fn declare(
    channel: &Channel,
    queues: &NotificationQueues,
    amqp: &AmqpSettings,
) -> Result<(), lapin::Error> {
    let expires = amqp.queue_expires_ms;
    channel
        .queue_declare(
            queues.dead.as_str().into(),
            durable(),
            queue_args(&[], expires),
        )
        .await?;
    for queue in &queues.by_priority {
        let args = queue_args(
            &[
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&queues.dead)),
            ],
            expires,
        );
        channel
            .queue_declare(queue.as_str().into(), durable(), args)
            .await?;
    }
    Ok(())
}
