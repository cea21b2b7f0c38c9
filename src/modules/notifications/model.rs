use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub const MAX_SUBJECT_CHARS: usize = 200;
pub const MAX_BODY_CHARS: usize = 4_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Push,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Sms, Channel::Push];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Push => "push",
        }
    }
}

/// Served in this order; see `worker` for how low is kept from starving.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Queued,
    Sent,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "queued" => DeliveryStatus::Queued,
            "sent" => DeliveryStatus::Sent,
            "failed" => DeliveryStatus::Failed,
            _ => return None,
        })
    }
}

/// `POST /notifications/send`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub user_id: Uuid,
    pub channel: Channel,
    pub priority: Priority,
    pub subject: Option<String>,
    pub body: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SendAccepted {
    pub id: Uuid,
    pub status: DeliveryStatus,
}

/// One notification on the wire and in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    /// The history id (UUIDv7, so ids sort by creation time).
    pub id: Uuid,
    /// Two notifications with the same key are one: the second is dropped. Order
    /// notifications use `order:<id>:<status>`, so a redelivered order batch notifies once.
    pub dedupe_key: String,
    pub user_id: Uuid,
    pub channel: Channel,
    pub priority: Priority,
    pub subject: Option<String>,
    pub body: String,
    pub created_at: DateTime<Utc>,
    /// W3C trace context of what caused it (an order's request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Notification {
    /// A new notification whose dedupe key is its own id.
    pub fn new(
        user_id: Uuid,
        channel: Channel,
        priority: Priority,
        subject: Option<String>,
        body: String,
    ) -> Self {
        let id = Uuid::now_v7();
        Self {
            id,
            dedupe_key: id.to_string(),
            user_id,
            channel,
            priority,
            subject,
            body,
            created_at: Utc::now(),
            traceparent: None,
        }
    }
}

/// One AMQP message: a batch costs the broker one publish, not one per notification.
#[derive(Debug, Serialize, Deserialize)]
pub struct NotificationBatch {
    pub v: u32,
    pub notifications: Vec<Notification>,
}

pub const WIRE_VERSION: u32 = 1;

/// What the dead-letter queue keeps of a notification that could not be sent.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadNotification {
    pub notification: Notification,
    pub reason: String,
}

/// An item of `GET /notifications/user/{userId}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryItem {
    pub id: Uuid,
    pub channel: Channel,
    pub priority: Priority,
    pub subject: Option<String>,
    pub status: DeliveryStatus,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}
