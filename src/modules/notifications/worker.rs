//! The notify-worker: consumes the three priority queues, sends in batches through the
//! providers, records each notification's status, and acks only after that.
//!
//! Priority without starvation: each queue has its own consumer and channel (so acks of
//! one queue never cover another's deliveries) feeding a small local buffer. A batch first
//! gives up to `low_share` slots to low and `normal_share` to normal when they have work
//! waiting, then fills the rest with high, then with whatever is left. Under a backlog high
//! gets most of every batch and is sent first within it, and low still moves at a bounded
//! minimum rate.

use std::collections::VecDeque;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::NotificationsError;
use super::history::Admission;
use super::model::{DeadNotification, DeliveryStatus, Notification, NotificationBatch, Priority};
use super::providers::SendError;
use crate::app::AppState;
use crate::config::NotificationsSettings;
use crate::infra::telemetry;

/// A delivery and the notifications it carried (`None` when it does not parse).
struct Received {
    delivery: Delivery,
    batch: Option<NotificationBatch>,
}

impl Received {
    fn size(&self) -> usize {
        self.batch
            .as_ref()
            .map_or(1, |b| b.notifications.len().max(1))
    }
}

/// Deliveries waiting per priority, fed by one consumer task per queue.
struct Inbox {
    incoming: [mpsc::Receiver<Received>; 3],
    waiting: [VecDeque<Received>; 3],
    /// Whether a batch has been taken. The first one always lingers: one queue's consumer
    /// may already be delivering while another is still being set up, and weighing
    /// priorities before every backlog arrived would send only the first queue's work.
    started: bool,
}

pub async fn run(state: AppState) -> Result<(), NotificationsError> {
    let settings = &state.settings.notifications;
    let mut receivers = vec![];
    let mut channels = vec![];
    for priority in Priority::ALL {
        let (sender, receiver) = mpsc::channel(usize::from(settings.prefetch));
        let queue = state.notifications.queues.for_priority(priority).to_owned();
        let (channel, mut consumer) = state
            .amqp
            .consume(&queue, settings.prefetch, "notify-worker")
            .await?;
        channels.push(channel);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let batch = serde_json::from_slice(&delivery.data).ok();
                if sender.send(Received { delivery, batch }).await.is_err() {
                    break;
                }
            }
        });
        receivers.push(receiver);
    }
    let Ok(incoming) = <[mpsc::Receiver<Received>; 3]>::try_from(receivers) else {
        return Err(NotificationsError::Queue(
            "three priority consumers expected".into(),
        ));
    };
    let mut inbox = Inbox {
        incoming,
        waiting: Default::default(),
        started: false,
    };
    tracing::info!("notify-worker consuming");
    let linger = Duration::from_millis(settings.batch_linger_ms);
    while inbox.wait_for_work(linger, &state.shutdown).await {
        let batch = inbox.take_batch(settings);
        process_batch(&state, batch).await?;
    }
    // Buffered deliveries not yet taken go back to their queues now, not at disconnect.
    for channel in channels {
        if let Err(e) = channel.close(200, "notify-worker stopping".into()).await {
            tracing::warn!(error = %e, "closing a notification channel");
        }
    }
    tracing::info!("notify-worker stopped");
    Ok(())
}

impl Inbox {
    /// Waits until something is waiting (then lingers briefly so a batch can fill); false
    /// on shutdown or once every consumer has stopped.
    async fn wait_for_work(&mut self, linger: Duration, stopping: &CancellationToken) -> bool {
        if stopping.is_cancelled() {
            return false;
        }
        self.drain();
        let idle = self.waiting.iter().all(VecDeque::is_empty);
        if idle {
            let [high, normal, low] = &mut self.incoming;
            let first = tokio::select! {
                biased;
                () = stopping.cancelled() => return false,
                Some(r) = high.recv() => (Priority::High, r),
                Some(r) = normal.recv() => (Priority::Normal, r),
                Some(r) = low.recv() => (Priority::Low, r),
                else => return false,
            };
            self.waiting[first.0.index()].push_back(first.1);
        }
        if idle || !self.started {
            self.started = true;
            tokio::time::sleep(linger).await;
            self.drain();
        }
        true
    }

    fn drain(&mut self) {
        for (incoming, waiting) in self.incoming.iter_mut().zip(self.waiting.iter_mut()) {
            while let Ok(received) = incoming.try_recv() {
                waiting.push_back(received);
            }
        }
    }

    /// Takes whole deliveries up to `batch_size` notifications (at least one delivery).
    fn take_batch(&mut self, settings: &NotificationsSettings) -> Vec<(Priority, Received)> {
        let mut batch = vec![];
        let mut room = settings.batch_size;
        let plan = [
            (Priority::Low, settings.low_share),
            (Priority::Normal, settings.normal_share),
            (Priority::High, usize::MAX),
            (Priority::Normal, usize::MAX),
            (Priority::Low, usize::MAX),
        ];
        for (priority, share) in plan {
            let mut budget = share.min(room);
            let waiting = &mut self.waiting[priority.index()];
            while let Some(next) = waiting.front() {
                let size = next.size();
                if size > budget {
                    break;
                }
                let Some(received) = waiting.pop_front() else {
                    break;
                };
                budget = budget.saturating_sub(size);
                room = room.saturating_sub(size);
                batch.push((priority, received));
            }
        }
        if batch.is_empty() {
            // One delivery larger than a whole batch still has to go.
            if let Some((priority, waiting)) = Priority::ALL
                .into_iter()
                .zip(self.waiting.iter_mut())
                .find(|(_, waiting)| !waiting.is_empty())
            {
                batch.extend(waiting.pop_front().map(|r| (priority, r)));
            }
        }
        // Highest priority first: within a batch, high is sent before the others.
        batch.sort_by_key(|(priority, _)| *priority);
        batch
    }
}

/// Sends one batch and settles its deliveries with the broker.
async fn process_batch(
    state: &AppState,
    batch: Vec<(Priority, Received)>,
) -> Result<(), NotificationsError> {
    let mut notifications = vec![];
    let mut last_of_queue: [Option<&Delivery>; 3] = [None, None, None];
    for (priority, received) in &batch {
        match &received.batch {
            Some(parsed) => {
                notifications.extend(parsed.notifications.iter());
                last_of_queue[priority.index()] = Some(&received.delivery);
            }
            None => {
                tracing::error!("notification message does not parse; dead-lettering");
                received
                    .delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
    }
    state.notifications.stats.record_batch(notifications.len());
    metrics::histogram!("notification_batch_size").record(notifications.len() as f64);
    let span = tracing::info_span!("notification batch", notifications = notifications.len());
    telemetry::join_batch(
        &span,
        notifications
            .iter()
            .filter_map(|n| n.traceparent.as_deref()),
    );
    let outcome = send_all(state, &notifications).instrument(span).await;
    for delivery in last_of_queue.into_iter().flatten() {
        match &outcome {
            Ok(()) => {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?
            }
            Err(_) => {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await?
            }
        };
    }
    if let Err(e) = outcome {
        // Redis or the broker failed mid-batch: everything comes back; what was sent is
        // recorded or deduplicated by the provider's idempotency key.
        tracing::error!(error = %e, "notification batch failed; requeued");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

async fn send_all(
    state: &AppState,
    notifications: &[&Notification],
) -> Result<(), NotificationsError> {
    let notify = &state.notifications;
    let admissions = notify.history.admit(&state.redis, notifications).await?;
    let to_send: Vec<&Notification> = notifications
        .iter()
        .zip(admissions)
        .filter(|(_, admission)| *admission == Admission::Send)
        .map(|(n, _)| *n)
        .collect();
    let results = join_all(to_send.iter().map(|n| send_one(state, n))).await;
    let mut outcomes = Vec::with_capacity(to_send.len());
    let mut dead = vec![];
    for (notification, result) in to_send.into_iter().zip(results) {
        let status = if result.is_ok() { "sent" } else { "failed" };
        metrics::counter!("notifications_total", "channel" => notification.channel.as_str(), "status" => status)
            .increment(1);
        match result {
            Ok(()) => outcomes.push((notification, DeliveryStatus::Sent)),
            Err(e) => {
                tracing::warn!(id = %notification.id, error = %e, "notification not sent");
                outcomes.push((notification, DeliveryStatus::Failed));
                dead.push(DeadNotification {
                    notification: notification.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }
    if !dead.is_empty() {
        let payload =
            serde_json::to_vec(&dead).map_err(|e| NotificationsError::Corrupt(e.to_string()))?;
        notify
            .publisher
            .publish(&notify.queues.dead, &payload)
            .await?;
    }
    notify.history.finish(&state.redis, &outcomes).await
}

/// One send with retries on transient failures (exponential backoff with jitter).
async fn send_one(state: &AppState, notification: &Notification) -> Result<(), SendError> {
    let settings = &state.settings.notifications;
    let provider = state
        .notifications
        .providers
        .for_channel(notification.channel);
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(settings.retry_min_delay_ms))
        .with_max_delay(Duration::from_millis(settings.retry_max_delay_ms))
        .with_max_times(settings.max_attempts.saturating_sub(1))
        .with_jitter();
    (|| provider.send(notification))
        .retry(policy)
        .when(SendError::is_transient)
        .await
}
