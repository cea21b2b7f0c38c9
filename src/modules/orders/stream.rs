//! Server-sent events, the pushed twins of the polling routes:
//!
//! - `GET /orders/{id}/events`: the order's status (`event: status`, `id:` the status), then
//!   each change until it is settled (anything but `pending`).
//! - `GET /orders/flash-sale/{product_id}/queue/events`: the caller's place in the sale's
//!   waiting room (`event: position`, `id:` the position), until `event: admitted` (retry the
//!   order now, with its Idempotency-Key) or `event: sold_out`.
//!
//! A client that reconnects with `Last-Event-ID` is sent only what differs from what it saw;
//! when what it saw was the end, it gets 204 (EventSource then stops reconnecting), so a final
//! answer is delivered once. What a stream may cost is bounded: the body is pulled by the
//! connection (nothing is produced while a slow client has not taken the last event), a
//! change only marks the stream (`feed.rs`), a comment every `push.heartbeat_secs` finds dead
//! clients, each stream ends after `push.max_stream_secs` (the client resumes), and a process
//! holds at most `push.max_streams` (503 beyond).

use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use uuid::Uuid;

use super::admission::Ticket;
use super::error::OrdersError;
use super::feed::{Feed, OrderWatch};
use super::lookup;
use super::model::{OrderStatus, OrderStatusView};
use crate::app::AppState;
use crate::config::PushSettings;
use crate::modules::auth::AuthUser;
use crate::modules::products::RoomView;

/// Event-stream chunks, as actix streams a body.
pub type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>>>>;

/// Streams a process holds at once.
pub struct StreamSlots(Arc<Semaphore>);

impl StreamSlots {
    pub fn new(settings: &PushSettings) -> Self {
        Self(Arc::new(Semaphore::new(settings.max_streams)))
    }

    fn take(&self) -> Result<OwnedSemaphorePermit, OrdersError> {
        self.0
            .clone()
            .try_acquire_owned()
            .map_err(|_| OrdersError::Overloaded {
                retry_after_secs: 1,
            })
    }
}

/// One event: `id`, `event` and a JSON `data` line.
fn event(id: &str, name: &str, data: &impl Serialize) -> Bytes {
    let data = serde_json::to_string(data).unwrap_or_default();
    Bytes::from(format!("id: {id}\nevent: {name}\ndata: {data}\n\n"))
}

const HEARTBEAT: &[u8] = b": heartbeat\n\n";
/// How long EventSource waits before it reconnects (sent once, first).
const RECONNECT_MS: u64 = 2_000;

/// What every stream does between its own events.
struct Clock {
    heartbeat: Interval,
    recheck: Interval,
    ends_at: Instant,
    state: AppState,
    /// Given back when the stream is dropped.
    _slot: OwnedSemaphorePermit,
}

impl Drop for Clock {
    fn drop(&mut self) {
        metrics::gauge!("sse_streams_open").decrement(1.0);
    }
}

enum Tick {
    Heartbeat,
    Recheck,
    End,
}

impl Clock {
    fn new(state: &AppState, slot: OwnedSemaphorePermit) -> Self {
        let push = &state.settings.orders.push;
        let every = |secs: u64| {
            let period = Duration::from_secs(secs.max(1));
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        };
        metrics::gauge!("sse_streams_open").increment(1.0);
        Self {
            heartbeat: every(push.heartbeat_secs),
            recheck: every(push.recheck_secs),
            ends_at: Instant::now() + Duration::from_secs(push.max_stream_secs),
            state: state.clone(),
            _slot: slot,
        }
    }

    async fn tick(&mut self) -> Tick {
        tokio::select! {
            _ = self.heartbeat.tick() => Tick::Heartbeat,
            _ = self.recheck.tick() => Tick::Recheck,
            () = tokio::time::sleep_until(self.ends_at) => Tick::End,
            () = self.state.shutdown.cancelled() => Tick::End,
        }
    }
}

/// What a stream's source has to send: `chunk`, known to the client as `id`; the stream
/// ends after it when `last`.
struct Offer {
    id: String,
    chunk: Bytes,
    last: bool,
}

/// What a stream waited for.
enum Woke {
    /// Something may have changed: ask the source again.
    Changed,
    Heartbeat,
    End,
}

/// What differs between the two streams: what they send, and what they wait for.
trait Source {
    /// What to send now, if anything is known without waiting.
    fn offer(&mut self) -> Option<Offer>;
    async fn wait(&mut self, clock: &mut Clock) -> Woke;
}

/// One stream: its source, its clock, and what the client already has.
struct Sse<S> {
    source: S,
    clock: Clock,
    /// The id of the last event the client has (sent here, or before its reconnect).
    last_sent: Option<String>,
    opened: bool,
    done: bool,
}

impl<S: Source + 'static> Sse<S> {
    fn into_events(source: S, clock: Clock, last_seen: Option<String>) -> Events {
        let stream = Self {
            source,
            clock,
            last_sent: last_seen,
            opened: false,
            done: false,
        };
        Box::pin(futures_util::stream::unfold(
            stream,
            |mut stream| async move { stream.next().await.map(|chunk| (Ok(chunk), stream)) },
        ))
    }

    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            return Some(Bytes::from(format!("retry: {RECONNECT_MS}\n\n")));
        }
        loop {
            if self.done {
                return None;
            }
            if let Some(offer) = self.source.offer() {
                self.done = offer.last;
                if self.last_sent.as_deref() != Some(offer.id.as_str()) {
                    self.last_sent = Some(offer.id);
                    return Some(offer.chunk);
                }
                continue;
            }
            match self.source.wait(&mut self.clock).await {
                Woke::Changed => {}
                Woke::Heartbeat => return Some(Bytes::from_static(HEARTBEAT)),
                Woke::End => return None,
            }
        }
    }
}

/// `GET /orders/{id}/events`; `None`: the client already saw the order settled (204).
pub async fn order_events(
    state: &AppState,
    caller: &AuthUser,
    order: Uuid,
    last_seen: Option<String>,
) -> Result<Option<Events>, OrdersError> {
    let slot = state.orders.streams.take()?;
    // Watched before the first read: a change committed in between still wakes the stream.
    let watch = state.orders.feed.watch_order(order);
    let current = lookup::find_order(state, caller, order).await?;
    let settled = current.status != OrderStatus::Pending;
    if settled && last_seen.as_deref() == Some(current.status.as_str()) {
        return Ok(None);
    }
    let source = OrderSource {
        caller: caller.clone(),
        order,
        watch,
        latest: Some(view(&current)),
    };
    Ok(Some(Sse::into_events(
        source,
        Clock::new(state, slot),
        last_seen,
    )))
}

fn view(order: &super::model::Order) -> OrderStatusView {
    OrderStatusView {
        id: order.id,
        status: order.status,
        updated_at: order.updated_at,
    }
}

struct OrderSource {
    caller: AuthUser,
    order: Uuid,
    watch: OrderWatch,
    /// Read and not yet offered.
    latest: Option<OrderStatusView>,
}

impl Source for OrderSource {
    fn offer(&mut self) -> Option<Offer> {
        let latest = self.latest.take()?;
        let id = latest.status.as_str();
        Some(Offer {
            id: id.to_owned(),
            chunk: event(id, "status", &latest),
            last: latest.status != OrderStatus::Pending,
        })
    }

    async fn wait(&mut self, clock: &mut Clock) -> Woke {
        let watch = &mut self.watch;
        let woke = tokio::select! {
            changed = watch.changed.changed() => changed.is_ok(),
            changed = watch.resubscribed.changed() => changed.is_ok(),
            tick = clock.tick() => match tick {
                Tick::Heartbeat => return Woke::Heartbeat,
                Tick::Recheck => true,
                Tick::End => return Woke::End,
            },
        };
        if woke {
            match lookup::find_order(&clock.state, &self.caller, self.order).await {
                Ok(order) => self.latest = Some(view(&order)),
                Err(e) => {
                    tracing::warn!(order = %self.order, error = %e, "an order stream's read failed; the next one retries")
                }
            }
        }
        Woke::Changed
    }
}

/// The ids of the queue stream's final events.
const ADMITTED: &str = "admitted";
const SOLD_OUT: &str = "sold_out";

/// `GET /orders/flash-sale/{product_id}/queue/events`; `None`: the client already saw the
/// caller admitted (204).
pub async fn queue_events(
    state: &AppState,
    caller: &AuthUser,
    product: Uuid,
    last_seen: Option<String>,
) -> Result<Option<Events>, OrdersError> {
    let slot = state.orders.streams.take()?;
    let mut room = Feed::watch_room(state, product);
    // The watcher's view may already be final (sold out) and never change again: the stream
    // reads it once it has sent the caller's place.
    room.mark_changed();
    let ticket = state
        .orders
        .admission
        .ticket(state, product, caller.user_id)
        .await?
        .ok_or(OrdersError::NotFound)?;
    if ticket.position == 0 && last_seen.as_deref() == Some(ADMITTED) {
        return Ok(None);
    }
    let source = QueueSource {
        ticket: ticket.ticket,
        room,
        next: Some(Place::InLine(ticket)),
        state: state.clone(),
    };
    Ok(Some(Sse::into_events(
        source,
        Clock::new(state, slot),
        last_seen,
    )))
}

/// Where the caller stands in the room.
enum Place {
    /// Waiting, or admitted at position 0.
    InLine(Ticket),
    SoldOut,
}

#[derive(Serialize)]
struct TicketOnly {
    ticket: u64,
}

struct QueueSource {
    ticket: u64,
    room: watch::Receiver<Option<RoomView>>,
    /// Found and not yet offered.
    next: Option<Place>,
    state: AppState,
}

impl QueueSource {
    /// Where the room's view puts the caller: admitted, still waiting, or, waiting with
    /// no unit left, sold out (as the polling route answers).
    fn place(&self, view: RoomView) -> Place {
        let position = self.ticket.saturating_sub(view.admitted);
        if position > 0 && view.units_left == 0 {
            return Place::SoldOut;
        }
        Place::InLine(self.state.orders.admission.ticket_at(self.ticket, position))
    }
}

impl Source for QueueSource {
    fn offer(&mut self) -> Option<Offer> {
        let ticket = TicketOnly {
            ticket: self.ticket,
        };
        Some(match self.next.take()? {
            Place::InLine(place) if place.position == 0 => Offer {
                id: ADMITTED.to_owned(),
                chunk: event(ADMITTED, ADMITTED, &ticket),
                last: true,
            },
            Place::InLine(place) => {
                let id = place.position.to_string();
                Offer {
                    chunk: event(&id, "position", &place),
                    id,
                    last: false,
                }
            }
            Place::SoldOut => Offer {
                id: SOLD_OUT.to_owned(),
                chunk: event(SOLD_OUT, SOLD_OUT, &ticket),
                last: true,
            },
        })
    }

    async fn wait(&mut self, clock: &mut Clock) -> Woke {
        let moved = tokio::select! {
            changed = self.room.changed() => changed.is_ok(),
            tick = clock.tick() => match tick {
                Tick::Heartbeat => return Woke::Heartbeat,
                // The room's watcher reads for every stream: nothing to read here.
                Tick::Recheck => return Woke::Changed,
                Tick::End => return Woke::End,
            },
        };
        if !moved {
            return Woke::End;
        }
        let view = *self.room.borrow_and_update();
        if let Some(view) = view {
            self.next = Some(self.place(view));
        }
        Woke::Changed
    }
}
