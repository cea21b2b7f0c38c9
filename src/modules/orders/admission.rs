//! Admission control of the flash-sale path: accept only what the workers settle within
//! `orders.admission.max_settle_secs`, and queue the rest fairly in the sale's waiting room.
//!
//! Every API pod samples two cluster-wide Redis counters each `sample_ms`: orders accepted
//! and orders settled. The backlog is their difference, the settle rate the settled counter's
//! growth (quick to rise, slow to fall). The backlog allowed is that rate times half of
//! `max_settle_secs` (waiting plus settling stays within it), and at least
//! `min_backlog` so an idle system admits a first wave and learns its rate: a limit that
//! follows what the workers actually settle, not a fixed number. Between samples each pod
//! spends its share of the room left.
//!
//! When nothing is left, a flash-sale attempt takes a ticket in the sale's waiting room (or
//! 503 + Retry-After with the room off); the room admits tickets in order of arrival as
//! capacity frees, never more than the units left can serve, and answers everyone `sold_out`
//! once the stock is gone. A sale known sold out is answered from memory for a moment.
//!
//! A sale is "crowded" while its room has unserved tickets (taken, and the holder not yet
//! back through an admission): then every attempt at it, on every pod, goes through the room,
//! whose count of served tickets bounds the horizon. A pod that sees unserved tickets says so
//! in a shared sorted set, which every pod's sampler reads; a holder coming back to a pod
//! that never saw the room (a pushed `admitted`, then a POST the load balancer sends
//! elsewhere) still goes through it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::OrdersError;
use crate::app::AppState;
use crate::config::AdmissionSettings;
use crate::infra::redis::Redis;
use crate::modules::products::{self, RoomAnswer, RoomReply, RoomRequest};

/// A place in a sale's waiting room (`202 Accepted`): retry the same request, with the same
/// Idempotency-Key, after `retry_after_ms`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ticket {
    /// Order of first arrival in this sale's room (one ticket per buyer).
    pub ticket: u64,
    /// Tickets ahead of this one that are not admitted yet (0: admitted, retry now).
    pub position: u64,
    pub retry_after_ms: u64,
}

/// What the flash-sale path does with an attempt.
pub enum Entry {
    Go,
    Wait(Ticket),
    SoldOut,
}

pub struct Admission {
    settings: AdmissionSettings,
    /// Orders this pod may still let in before the next sample (the allowed backlog minus
    /// the backlog); unlimited until the first sample.
    capacity: AtomicI64,
    /// Settle rate in orders per 1000 s (an integer, so it can be atomic).
    rate_milli: AtomicI64,
    sold_out: moka::sync::Cache<Uuid, ()>,
    /// Sales whose room this pod saw with unserved tickets: their attempts go through it.
    crowded: moka::sync::Cache<Uuid, ()>,
    /// Sales another pod saw so (read from `crowded_key` by the sampler).
    told_crowded: moka::sync::Cache<Uuid, ()>,
    accepted_key: String,
    settled_key: String,
    /// Sorted set: crowded sale -> Unix ms until which it is.
    crowded_key: String,
}

/// The counters outlive any backlog; they are cluster-wide and only their difference counts.
const COUNTER_TTL_SECS: i64 = 7 * 86_400;
/// The settle rate follows a higher sample at once and a lower one slowly: it estimates what
/// the workers can settle, and orders arriving slower than that, or buyers who took a ticket
/// and never came back, must not read as slow workers (that shrinks the limit, which
/// admits fewer, which settles fewer: a spiral to nothing, measured).
const RATE_DECAY: f64 = 0.9;
/// Share of `max_settle_secs` the backlog may hold: an order waits for the backlog ahead of
/// it, then for its own batch, and the rate is a peak. Measured on the 2-core box: 2 s of
/// backlog gave an accept-to-paid p95 of 3.3 s, 1 s gave 1.3 s.
const BACKLOG_SHARE: f64 = 0.5;
/// A sale stays "crowded" this long after a pod last saw its room with unserved tickets.
const CROWDED_FOR: Duration = Duration::from_secs(2);

impl Admission {
    pub fn new(settings: &AdmissionSettings, redis: &Redis) -> Self {
        let cache = |ttl| moka::sync::Cache::builder().time_to_live(ttl).build();
        Self {
            settings: settings.clone(),
            capacity: AtomicI64::new(i64::MAX),
            rate_milli: AtomicI64::new(0),
            sold_out: cache(Duration::from_millis(settings.sold_out_cache_ms)),
            crowded: cache(CROWDED_FOR),
            told_crowded: cache(CROWDED_FOR),
            // One hash tag: on a Redis Cluster both live on one node, so a node lost takes
            // both (the backlog starts again from 0) and never one (a phantom backlog).
            accepted_key: redis.key("{admission}:accepted"),
            settled_key: redis.key("{admission}:settled"),
            crowded_key: redis.key("{admission}:crowded"),
        }
    }

    /// True while this pod knows the sale sold out (no Redis round trip).
    pub fn known_sold_out(&self, product: Uuid) -> bool {
        self.settings.enabled && self.sold_out.contains_key(&product)
    }

    pub fn note_sold_out(&self, product: Uuid) {
        self.sold_out.insert(product, ());
    }

    /// Lets an attempt go on to its reservation, or gives it a ticket.
    pub async fn enter(
        &self,
        state: &AppState,
        product: Uuid,
        buyer: Uuid,
        key_digest: &str,
    ) -> Result<Entry, OrdersError> {
        if !self.settings.enabled {
            return Ok(Entry::Go);
        }
        if !self.crowded(product) && self.take_capacity() {
            metrics::counter!("admission_admitted_total").increment(1);
            return Ok(Entry::Go);
        }
        if !self.settings.waiting_room {
            metrics::counter!("admission_shed_total").increment(1);
            return Err(OrdersError::Overloaded {
                retry_after_secs: 1,
            });
        }
        let RoomReply { answer, unserved } = products::enter_room(
            state,
            &RoomRequest {
                buyer,
                key_digest,
                ..self.room_request(product)
            },
        )
        .await?;
        self.note_room(&state.redis, product, unserved).await;
        Ok(match answer {
            RoomAnswer::Pass | RoomAnswer::Admitted | RoomAnswer::Replay => {
                if answer != RoomAnswer::Replay {
                    self.capacity.fetch_sub(1, Ordering::Relaxed);
                }
                metrics::counter!("admission_admitted_total").increment(1);
                Entry::Go
            }
            RoomAnswer::SoldOut => {
                self.note_sold_out(product);
                Entry::SoldOut
            }
            RoomAnswer::Waiting { ticket, position } => {
                metrics::counter!("admission_queued_total").increment(1);
                Entry::Wait(Ticket {
                    ticket,
                    position,
                    retry_after_ms: self.retry_after_ms(position),
                })
            }
        })
    }

    /// What a room read said about its unserved tickets: while there are any, the sale is
    /// crowded here and, through the shared set, on every pod. A failed write only leaves
    /// other pods to learn it from their own room reads.
    pub async fn note_room(&self, redis: &Redis, product: Uuid, unserved: u64) {
        if unserved == 0 || self.crowded.contains_key(&product) {
            return;
        }
        self.crowded.insert(product, ());
        let until = Utc::now().timestamp_millis() + CROWDED_FOR.as_millis() as i64;
        let shared: redis::RedisResult<()> = redis::pipe()
            .zadd(&self.crowded_key, product.simple().to_string(), until)
            .ignore()
            .expire(&self.crowded_key, COUNTER_TTL_SECS)
            .ignore()
            .query_async(&mut redis.conn())
            .await;
        if let Err(e) = shared {
            tracing::warn!(%product, error = %e, "sharing a crowded sale with the other pods");
        }
    }

    /// True while attempts at the sale go through its room (this pod or another saw it with
    /// unserved tickets).
    pub fn crowded(&self, product: Uuid) -> bool {
        self.crowded.contains_key(&product) || self.told_crowded.contains_key(&product)
    }

    /// Orders this pod may still let in before its next sample (0: none).
    pub fn capacity(&self) -> i64 {
        self.capacity.load(Ordering::Relaxed).max(0)
    }

    pub fn sample_ms(&self) -> u64 {
        self.settings.sample_ms
    }

    /// What this pod passes the room script for `product` (this pod's capacity, its tick,
    /// slack and hold); as it is, without a buyer, for a process watching the room for its
    /// pushed streams.
    pub fn room_request(&self, product: Uuid) -> RoomRequest<'static> {
        RoomRequest {
            product,
            buyer: Uuid::nil(),
            key_digest: "",
            capacity: self.capacity(),
            tick_ms: self.settings.sample_ms,
            slack: self.settings.stock_slack,
            hold_ms: self.settings.admitted_hold_secs.saturating_mul(1000),
        }
    }

    fn take_capacity(&self) -> bool {
        self.capacity.fetch_sub(1, Ordering::Relaxed) > 0
    }

    /// About when the horizon reaches `position`, at the current settle rate.
    fn retry_after_ms(&self, position: u64) -> u64 {
        let per_sec = (self.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0).max(1.0);
        let eta_ms = position as f64 / per_sec * 1000.0;
        (eta_ms as u64).clamp(
            self.settings.sample_ms,
            self.settings
                .max_retry_after_ms
                .max(self.settings.sample_ms),
        )
    }

    /// The caller's place in a sale's room, if they hold a ticket.
    pub async fn ticket(
        &self,
        state: &AppState,
        product: Uuid,
        buyer: Uuid,
    ) -> Result<Option<Ticket>, OrdersError> {
        Ok(products::room_ticket(state, product, buyer)
            .await?
            .map(|(ticket, position)| self.ticket_at(ticket, position)))
    }

    /// A ticket `position` places from the horizon (0: admitted, retry now).
    pub fn ticket_at(&self, ticket: u64, position: u64) -> Ticket {
        Ticket {
            ticket,
            position,
            retry_after_ms: if position == 0 {
                0
            } else {
                self.retry_after_ms(position)
            },
        }
    }

    /// Counts accepted orders (into the pipeline that records them).
    pub fn count_accepted(&self, pipe: &mut redis::Pipeline, orders: usize) {
        pipe.incr(&self.accepted_key, orders)
            .ignore()
            .expire(&self.accepted_key, COUNTER_TTL_SECS)
            .ignore();
    }

    /// Counts orders that reached a final state.
    pub async fn count_settled(&self, redis: &Redis, orders: usize) -> redis::RedisResult<()> {
        if orders == 0 {
            return Ok(());
        }
        redis::pipe()
            .incr(&self.settled_key, orders)
            .ignore()
            .expire(&self.settled_key, COUNTER_TTL_SECS)
            .ignore()
            .query_async(&mut redis.conn())
            .await
    }
}

/// Orders accepted and settled (`None`: none yet).
type Counters = (Option<i64>, Option<i64>);

/// The API role's sampler: every `sample_ms`, the backlog and the settle rate, and from them
/// what this pod may let in; exported as `admission_backlog`, `admission_settle_rate` and
/// `admission_horizon_seconds`.
pub async fn run_sampler(state: AppState) {
    let admission = &state.orders.admission;
    let settings = &admission.settings;
    let mut tick = tokio::time::interval(Duration::from_millis(settings.sample_ms));
    let mut last: Option<(i64, Instant)> = None;
    let mut rate = 0.0_f64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let now_ms = Utc::now().timestamp_millis();
        let sample: redis::RedisResult<(Counters, Vec<String>)> = redis::pipe()
            .cmd("MGET")
            .arg(&admission.accepted_key)
            .arg(&admission.settled_key)
            .zrembyscore(&admission.crowded_key, "-inf", now_ms)
            .ignore()
            .zrangebyscore(&admission.crowded_key, now_ms, "+inf")
            .query_async(&mut state.redis.conn())
            .await;
        let (accepted, settled) = match sample {
            Ok(((accepted, settled), crowded)) => {
                for product in crowded.iter().filter_map(|id| Uuid::try_parse(id).ok()) {
                    admission.told_crowded.insert(product, ());
                }
                (accepted.unwrap_or(0), settled.unwrap_or(0))
            }
            Err(e) => {
                tracing::warn!(error = %e, "admission sample failed; keeping the last limit");
                continue;
            }
        };
        let now = Instant::now();
        if let Some((before, at)) = last {
            let seconds = now.duration_since(at).as_secs_f64().max(1e-3);
            let measured = (settled - before).max(0) as f64 / seconds;
            rate = if measured > rate {
                measured
            } else {
                RATE_DECAY * rate + (1.0 - RATE_DECAY) * measured
            };
        }
        last = Some((settled, now));
        let backlog = (accepted - settled).max(0);
        let allowed = (rate * settings.max_settle_secs * BACKLOG_SHARE)
            .max(settings.min_backlog as f64) as i64;
        admission
            .capacity
            .store(allowed - backlog, Ordering::Relaxed);
        admission
            .rate_milli
            .store((rate * 1000.0) as i64, Ordering::Relaxed);
        metrics::gauge!("admission_backlog").set(backlog as f64);
        metrics::gauge!("admission_allowed_backlog").set(allowed as f64);
        metrics::gauge!("admission_settle_rate").set(rate);
        metrics::gauge!("admission_horizon_seconds").set(backlog as f64 / rate.max(1.0));
    }
}
