//! How a status change or a waiting room's move reaches the shoppers streaming it from this
//! process (`stream.rs`), with one shared source per process, never one per shopper:
//!
//! - **Order status**: whoever tells a buyer about a change (`settle::notify`, the one place
//!   every final state and lifecycle step goes through, after its commit) also publishes it on
//!   the Redis channel `<prefix>orders:status`. Each API process holds one subscription to it
//!   and wakes the streams of the orders named. Pub/sub forgets what it sent while a
//!   subscriber was away, so a reconnect wakes every stream to read its order again, and each
//!   stream also reads its order every `push.recheck_secs` (a publish lost with its process).
//! - **Waiting rooms**: one watcher task per sale that this process has shoppers waiting in
//!   moves the room's horizon (as a retrying buyer would) and reads it every
//!   `orders.admission.sample_ms`, telling admission while the room has unserved tickets
//!   (so the admitted, coming back, go through the room); it ends with the last of those
//!   shoppers.
//!
//! A stream holds a `watch` receiver: a change marks it, nothing queues, so a slow client
//! costs one value however fast things change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use uuid::Uuid;

use super::model::OrderStatus;
use crate::app::AppState;
use crate::infra::redis::Redis;
use crate::modules::products::{self, RoomView};

/// A backoff between attempts to subscribe again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

pub struct Feed {
    orders: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    rooms: Mutex<HashMap<Uuid, watch::Sender<Option<RoomView>>>>,
    /// Moves on each (re)subscription: messages may have been missed meanwhile.
    resubscribed: watch::Sender<u64>,
    channel: String,
}

/// An order stream's wake-ups; dropping it forgets the order when no other stream has it.
pub struct OrderWatch {
    feed: Arc<Feed>,
    order: Uuid,
    pub changed: watch::Receiver<u64>,
    pub resubscribed: watch::Receiver<u64>,
}

impl Drop for OrderWatch {
    fn drop(&mut self) {
        let mut orders = lock(&self.feed.orders);
        // Ours is still counted while this runs.
        if orders
            .get(&self.order)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            orders.remove(&self.order);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Feed {
    pub fn new(redis: &Redis) -> Arc<Self> {
        Arc::new(Self {
            orders: Mutex::default(),
            rooms: Mutex::default(),
            resubscribed: watch::Sender::new(0),
            channel: redis.key("orders:status"),
        })
    }

    /// Wake-ups for `order`'s stream. Taken before the stream reads the order, so a change
    /// committed in between still wakes it.
    pub fn watch_order(self: &Arc<Self>, order: Uuid) -> OrderWatch {
        let changed = lock(&self.orders)
            .entry(order)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        OrderWatch {
            feed: self.clone(),
            order,
            changed,
            resubscribed: self.resubscribed.subscribe(),
        }
    }

    /// The room of `product` as this process's watcher last read it (`None` until its first
    /// read, or while the sale is not loaded); starts the watcher for the first shopper.
    pub fn watch_room(state: &AppState, product: Uuid) -> watch::Receiver<Option<RoomView>> {
        let feed = &state.orders.feed;
        let mut rooms = lock(&feed.rooms);
        if let Some(sender) = rooms.get(&product) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        rooms.insert(product, sender.clone());
        tokio::spawn(run_room_watcher(state.clone(), product, sender));
        receiver
    }

    fn wake(&self, order: Uuid) {
        if let Some(sender) = lock(&self.orders).get(&order) {
            sender.send_modify(|generation| *generation += 1);
        }
    }
}

/// Publishes status changes to every API process's subscription, after their commit. A
/// failure only delays the streams to their next read (`push.recheck_secs`).
pub async fn announce(state: &AppState, changes: impl Iterator<Item = (Uuid, OrderStatus)>) {
    let payload: Vec<String> = changes
        .map(|(order, status)| format!("{} {}", order.simple(), status.as_str()))
        .collect();
    if payload.is_empty() {
        return;
    }
    let published: redis::RedisResult<()> = redis::cmd("PUBLISH")
        .arg(&state.orders.feed.channel)
        .arg(payload.join("\n"))
        .query_async(&mut state.redis.conn())
        .await;
    if let Err(e) = published {
        tracing::warn!(error = %e, "publishing order status changes; streams read them later");
    }
}

/// The API role's subscription: wakes the streams of the orders each message names, and
/// every stream after a (re)subscription.
pub async fn run_subscription(state: AppState) {
    let feed = state.orders.feed.clone();
    loop {
        let subscribed = async {
            let mut pubsub = state.redis.pubsub().await?;
            pubsub.subscribe(&feed.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            subscribed = subscribed => subscribed,
            () = state.shutdown.cancelled() => return,
        };
        match pubsub {
            Ok(pubsub) => {
                feed.resubscribed.send_modify(|generation| *generation += 1);
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        () = state.shutdown.cancelled() => return,
                    };
                    let Some(message) = message else { break };
                    let payload: String = message.get_payload().unwrap_or_default();
                    for line in payload.lines() {
                        let order = line
                            .split(' ')
                            .next()
                            .and_then(|id| Uuid::try_parse(id).ok());
                        if let Some(order) = order {
                            feed.wake(order);
                        }
                    }
                }
                tracing::warn!("order status subscription ended; subscribing again");
            }
            Err(e) => tracing::warn!(error = %e, "subscribing to order status changes"),
        }
        tokio::select! {
            () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Keeps one sale's room moving and its view current while this process has shoppers
/// waiting in it.
async fn run_room_watcher(state: AppState, product: Uuid, view: watch::Sender<Option<RoomView>>) {
    let admission = &state.orders.admission;
    let mut tick = tokio::time::interval(Duration::from_millis(admission.sample_ms()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        {
            let mut rooms = lock(&state.orders.feed.rooms);
            if view.receiver_count() == 0 {
                // No stream here waits in this room any more.
                rooms.remove(&product);
                return;
            }
        }
        let request = admission.room_request(product);
        match products::watch_room(&state, &request).await {
            Ok(reply) => {
                if let Some(reply) = reply {
                    admission
                        .note_room(&state.redis, product, reply.unserved)
                        .await;
                }
                let read = reply.map(|reply| reply.answer);
                view.send_if_modified(|current| {
                    let changed = *current != read;
                    *current = read;
                    changed
                });
            }
            Err(e) => tracing::warn!(%product, error = %e, "watching a waiting room"),
        }
    }
}
