//! Notifications: `POST /notifications/send` and the per-user history, the priority queues,
//! and the notify-worker that sends through the providers (simulators behind one trait).

mod error;
mod handlers;
mod history;
mod model;
mod providers;
mod queue;
mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use actix_web::web;

pub use error::NotificationsError;
pub use model::{
    Channel, DeadNotification, DeliveryStatus, HistoryItem, Notification, NotificationBatch,
    Priority, SendAccepted, SendRequest,
};
pub use providers::{Delivery, Provider, Providers, SendError};
pub use queue::NotificationQueues;

use crate::app::AppState;
use crate::config::Settings;
use crate::infra::amqp::{trace_headers, Amqp, Publisher};
use model::{MAX_BODY_CHARS, MAX_SUBJECT_CHARS, WIRE_VERSION};

pub fn configure(cfg: &mut web::ServiceConfig) {
    handlers::configure(cfg);
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::NotificationsApi as utoipa::OpenApi>::openapi()
}

/// What notifications keep for the life of the process.
pub struct NotificationsState {
    pub queues: NotificationQueues,
    publisher: Publisher,
    history: history::History,
    pub providers: Providers,
    pub stats: WorkerStats,
}

/// What the notify-worker has done in this process.
#[derive(Default)]
pub struct WorkerStats {
    batches: AtomicU64,
    largest_batch: AtomicUsize,
}

impl WorkerStats {
    fn record_batch(&self, notifications: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.largest_batch
            .fetch_max(notifications, Ordering::Relaxed);
    }

    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::Relaxed)
    }
}

impl NotificationsState {
    /// Declares the queues and opens a confirming publisher.
    pub async fn new(settings: &Settings, amqp: &Amqp) -> Result<Self, NotificationsError> {
        let queues = NotificationQueues::new(&settings.amqp.queue_prefix);
        let publisher = Publisher::open(amqp).await?;
        queue::declare(publisher.channel(), &queues, &settings.amqp).await?;
        Ok(Self {
            queues,
            publisher,
            history: history::History::new(&settings.notifications),
            providers: Providers::simulated(&settings.notifications.providers),
            stats: WorkerStats::default(),
        })
    }
}

/// The notify-worker role.
pub async fn run_worker(state: AppState) -> Result<(), NotificationsError> {
    worker::run(state).await
}

/// Queues `notifications` (all of one priority) as one message, confirmed by the broker.
pub async fn enqueue(
    state: &AppState,
    priority: Priority,
    notifications: Vec<Notification>,
) -> Result<(), NotificationsError> {
    if notifications.is_empty() {
        return Ok(());
    }
    let headers = trace_headers(notifications[0].traceparent.as_deref());
    let batch = NotificationBatch {
        v: WIRE_VERSION,
        notifications,
    };
    let payload =
        serde_json::to_vec(&batch).map_err(|e| NotificationsError::Corrupt(e.to_string()))?;
    let notify = &state.notifications;
    notify
        .publisher
        .publish_with(notify.queues.for_priority(priority), &payload, headers)
        .await?;
    Ok(())
}

fn validate(request: &SendRequest) -> Result<(), NotificationsError> {
    let invalid = |m: &str| Err(NotificationsError::Validation(m.to_owned()));
    if request.body.trim().is_empty() {
        return invalid("body must not be empty");
    }
    if request.body.chars().count() > MAX_BODY_CHARS {
        return invalid("body is longer than 4000 characters");
    }
    if request
        .subject
        .as_deref()
        .is_some_and(|s| s.chars().count() > MAX_SUBJECT_CHARS)
    {
        return invalid("subject is longer than 200 characters");
    }
    Ok(())
}

/// `POST /notifications/send`: recorded as queued in the user's history, then queued.
pub async fn send(
    state: &AppState,
    request: SendRequest,
) -> Result<SendAccepted, NotificationsError> {
    validate(&request)?;
    crate::modules::users::find(state, request.user_id).await?;
    let mut notification = Notification::new(
        request.user_id,
        request.channel,
        request.priority,
        request.subject,
        request.body,
    );
    notification.traceparent = crate::infra::telemetry::current_traceparent();
    let notify = &state.notifications;
    notify.history.admit(&state.redis, &[&notification]).await?;
    let id = notification.id;
    let priority = notification.priority;
    if let Err(e) = enqueue(state, priority, vec![notification.clone()]).await {
        notify
            .history
            .finish(&state.redis, &[(&notification, DeliveryStatus::Failed)])
            .await?;
        return Err(e);
    }
    Ok(SendAccepted {
        id,
        status: DeliveryStatus::Queued,
    })
}

/// Every notification queue, for the queue-depth gauges.
pub fn queue_names(state: &AppState) -> Vec<String> {
    let queues = &state.notifications.queues;
    Priority::ALL
        .iter()
        .map(|p| queues.for_priority(*p).to_owned())
        .chain([queues.dead.clone()])
        .collect()
}
