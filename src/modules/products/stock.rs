//! Flash-sale stock in Redis: the only place units are reserved, committed and released.
//!
//! Every key of one product shares the hash tag `{p:<id>}`, so each script touches one
//! Redis Cluster slot. A reservation moves through one atomic state change:
//! `r` (reserved) -> `c` (committed, by the worker before it persists the order) or
//! `r`/`c` -> `x` (released: reconciler, cancel, failure). Whoever changes it first decides;
//! the loser sees the new state and backs off.
//!
//! The counter `stock` is the units neither reserved nor sold. It exists only while the
//! `epoch` key does: a missing epoch means Redis lost the sale (a restart), and the order
//! path answers 503 until the reconciler rebuilt the counters from PostgreSQL and the orders
//! in flight at the loss have settled (the sale is `recovering` meanwhile). A missing
//! counter is never read as 0 or as unlimited.

use chrono::{DateTime, Utc};
use redis::Script;
use uuid::Uuid;

use crate::infra::redis::{IdempotencyStart, Redis};

/// Regular stock stays in Redis this long after its last load (see `regular_terms`).
pub const REGULAR_TTL_SECS: i64 = 366 * 86_400;

/// A waiting room outlives any sale's crowd.
const ROOM_TTL_SECS: u64 = 86_400;

/// A lost-sale note outlives any rebuild; it only has to span two reconciler passes.
const LOST_MARK_TTL_SECS: u64 = 3_600;

/// Each script names its KEYS and ARGV at the top; the shared fragments read those names.
const RESERVE_FLASH: &str = concat!(
    include_str!("lua/reserve_flash.lua"),
    include_str!("lua/attempt_limit.lua"),
    include_str!("../../infra/lua/idempotency_check.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/reserve_flash_done.lua"),
);
const RESERVE_ITEM: &str = concat!(
    include_str!("lua/reserve_item.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/reserve_item_done.lua"),
);
const LATE_COMMIT: &str = concat!(
    include_str!("lua/late_commit.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/late_commit_done.lua"),
);

pub struct StockScripts {
    reserve: Script,
    reserve_item: Script,
    commit: Script,
    late_commit: Script,
    release: Script,
    load: Script,
    adjust: Script,
    rebuild: Script,
    reopen: Script,
    audit: Script,
    room: Script,
}

impl Default for StockScripts {
    fn default() -> Self {
        Self {
            reserve: Script::new(RESERVE_FLASH),
            reserve_item: Script::new(RESERVE_ITEM),
            commit: Script::new(include_str!("lua/commit.lua")),
            late_commit: Script::new(LATE_COMMIT),
            release: Script::new(include_str!("lua/release.lua")),
            load: Script::new(include_str!("lua/load.lua")),
            adjust: Script::new(include_str!("lua/adjust.lua")),
            rebuild: Script::new(include_str!("lua/rebuild.lua")),
            reopen: Script::new(include_str!("lua/reopen.lua")),
            audit: Script::new(include_str!("lua/audit.lua")),
            room: Script::new(include_str!("lua/room.lua")),
        }
    }
}

/// The keys of one product's sale.
struct SaleKeys {
    tagged_prefix: String,
    stock: String,
    epoch: String,
    sale: String,
    buyers: String,
    reservations: String,
    pending: String,
    /// When the reconciler first found the sale lost (it rebuilds a pass later).
    lost: String,
    /// The waiting room: tickets, the admitted horizon.
    room: String,
}

impl SaleKeys {
    fn new(redis: &Redis, product: Uuid) -> Self {
        let tagged_prefix = tagged_prefix(redis, product);
        let key = |name: &str| format!("{tagged_prefix}:{name}");
        Self {
            tagged_prefix: tagged_prefix.clone(),
            stock: key("stock"),
            epoch: key("epoch"),
            sale: key("sale"),
            buyers: key("buyers"),
            reservations: key("res"),
            pending: key("pending"),
            lost: key("lost"),
            room: key("room"),
        }
    }

    /// Starts an invocation of `script` with the six sale keys, in the order every script
    /// that takes them reads them (KEYS[1..6]).
    fn invoke<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.key(&self.stock);
        invocation
            .key(&self.epoch)
            .key(&self.sale)
            .key(&self.buyers)
            .key(&self.reservations)
            .key(&self.pending);
        invocation
    }

    /// Flash-sale attempts of `user` on this product in one minute window.
    fn attempts(&self, user: Uuid, minute: i64) -> String {
        format!("{}:attempts:{}:{minute}", self.tagged_prefix, user.simple())
    }

    fn idempotency(&self, user: Uuid, key_digest: &str) -> String {
        idempotency_in(&self.tagged_prefix, user, key_digest)
    }
}

/// `<prefix>{p:<id>}`: every key of one product's sale starts with it (one cluster slot).
fn tagged_prefix(redis: &Redis, product: Uuid) -> String {
    redis.key(format_args!("{{p:{}}}", product.simple()))
}

fn idempotency_in(tagged_prefix: &str, user: Uuid, key_digest: &str) -> String {
    // Same hash tag as the rest, so the reserve script stays in one slot.
    format!("{tagged_prefix}:idem:{}:{key_digest}", user.simple())
}

/// Built on its own: the order path needs this one key, not all six of the sale's.
pub fn idempotency_key(redis: &Redis, product: Uuid, user: Uuid, key_digest: &str) -> String {
    idempotency_in(&tagged_prefix(redis, product), user, key_digest)
}

/// What a sale looks like in Redis.
#[derive(Debug, Clone)]
pub struct SaleTerms {
    pub kind: SaleKind,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub per_user_limit: u32,
    pub price: String,
}

/// Which path may take units: a flash sale's, or regular orders'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleKind {
    Flash,
    Regular,
}

impl SaleKind {
    fn as_str(self) -> &'static str {
        match self {
            SaleKind::Flash => "flash",
            SaleKind::Regular => "regular",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved; carries the unit price the sale charges.
    Reserved {
        unit_price: String,
    },
    /// The same idempotency key already created an order; here is its stored answer.
    Replay(String),
    InProgress,
    KeyReusedWithOtherBody,
    NotLoaded,
    NotActive,
    PurchaseLimit,
    SoldOut,
    /// Too many attempts by this user on this sale in the current minute.
    RateLimited {
        retry_after_secs: u64,
    },
}

/// Units of one product reserved for one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedUnits {
    pub order: Uuid,
    pub product: Uuid,
    pub buyer: Uuid,
    pub units: u32,
}

/// A reservation still only reserved after the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleReservation {
    pub order: Uuid,
    pub buyer: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Released before the worker got to it (timeout, cancel): the order must not proceed.
    Released,
    /// Redis lost the sale and has not been rebuilt yet: try again later.
    NotLoaded,
    /// Redis lost the reservation and the rebuilt counter has no units left for it.
    SoldOut,
    /// Redis lost the reservation, and the buyer bought up to the limit since the rebuild.
    OverLimit,
}

/// A buyer at a sale's waiting room.
pub struct RoomRequest<'a> {
    pub product: Uuid,
    pub buyer: Uuid,
    pub key_digest: &'a str,
    /// Orders the admission controller lets in now (0 or less: none).
    pub capacity: i64,
    /// The horizon moves at most once per tick, across every pod.
    pub tick_ms: u64,
    /// Tickets admitted beyond the units left (some admitted buyers fail or go away).
    pub slack: i64,
}

/// The room's answer to a buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomAnswer {
    /// No one waits and there is capacity: go on to reserve.
    Pass,
    /// The buyer's ticket is within the admitted horizon: go on to reserve.
    Admitted,
    /// The Idempotency-Key already has an answer: the reservation replays it.
    Replay,
    SoldOut,
    Waiting {
        ticket: u64,
        position: u64,
    },
}

/// Where a sale stands in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleState {
    /// No counters: never loaded, or lost.
    Missing,
    /// Rebuilt after a loss; closed until the orders in flight then have settled.
    Recovering,
    Open,
}

/// The auditor's look at one sale in Redis, taken atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleAudit {
    pub state: SaleState,
    /// available + reserved + committed - the units the sale holds: 0 when healthy.
    pub units_off: i64,
    /// Buyers holding more units than the limit.
    pub over_limit: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Units given back (the shelf in PostgreSQL follows the order's status).
    Released,
    AlreadyReleased,
    Unknown,
}

fn reservation_from(reply: &[String], now: DateTime<Utc>) -> Reservation {
    match reply {
        [ok, price] if ok == "ok" => Reservation::Reserved {
            unit_price: price.clone(),
        },
        [s] if s == "not_active" => Reservation::NotActive,
        [s] if s == "limit" => Reservation::PurchaseLimit,
        [s] if s == "sold_out" => Reservation::SoldOut,
        [s] if s == "rate_limited" => Reservation::RateLimited {
            retry_after_secs: (60 - now.timestamp() % 60).unsigned_abs(),
        },
        _ => Reservation::NotLoaded,
    }
}

pub struct ReserveRequest<'a> {
    pub product: Uuid,
    pub user: Uuid,
    pub quantity: u32,
    pub order_id: Uuid,
    pub body_hash: &'a str,
    pub key_digest: &'a str,
    /// How long the key stays `in progress` if the request never finishes.
    pub in_flight_ttl_secs: u64,
    pub attempts_per_minute: u32,
}

impl StockScripts {
    pub async fn reserve(
        &self,
        redis: &Redis,
        req: &ReserveRequest<'_>,
    ) -> redis::RedisResult<Reservation> {
        let keys = SaleKeys::new(redis, req.product);
        let now = Utc::now();
        let reply: Vec<String> = keys
            .invoke(&self.reserve)
            .key(keys.idempotency(req.user, req.key_digest))
            .key(keys.attempts(req.user, now.timestamp() / 60))
            .arg(req.user.simple().to_string())
            .arg(req.quantity)
            .arg(req.order_id.to_string())
            .arg(now.timestamp_millis())
            .arg(SaleKind::Flash.as_str())
            .arg(req.body_hash)
            .arg(req.in_flight_ttl_secs)
            .arg(req.attempts_per_minute)
            .invoke_async(&mut redis.conn())
            .await?;
        if let Some(started) = IdempotencyStart::from_reply(&reply) {
            return Ok(match started {
                IdempotencyStart::Replay(stored) => Reservation::Replay(stored),
                IdempotencyStart::InProgress => Reservation::InProgress,
                _ => Reservation::KeyReusedWithOtherBody,
            });
        }
        Ok(reservation_from(&reply, now))
    }

    /// Reserves units of one item of a regular order.
    pub async fn reserve_item(
        &self,
        redis: &Redis,
        product: Uuid,
        user: Uuid,
        quantity: u32,
        order: Uuid,
    ) -> redis::RedisResult<Reservation> {
        let keys = SaleKeys::new(redis, product);
        let now = Utc::now();
        let reply: Vec<String> = keys
            .invoke(&self.reserve_item)
            .arg(user.simple().to_string())
            .arg(quantity)
            .arg(order.to_string())
            .arg(now.timestamp_millis())
            .arg(SaleKind::Regular.as_str())
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(reservation_from(&reply, now))
    }

    /// Commits the reservations of several orders of one product.
    pub async fn commit(
        &self,
        redis: &Redis,
        product: Uuid,
        orders: &[&ReservedUnits],
    ) -> redis::RedisResult<Vec<CommitOutcome>> {
        if orders.is_empty() {
            return Ok(vec![]);
        }
        let keys = SaleKeys::new(redis, product);
        let mut invocation = self.commit.key(&keys.reservations);
        invocation.key(&keys.pending);
        for reserved in orders {
            invocation.arg(reserved.order.to_string());
        }
        let outcomes: Vec<String> = invocation.invoke_async(&mut redis.conn()).await?;
        let mut committed = Vec::with_capacity(orders.len());
        for (reserved, outcome) in orders.iter().zip(outcomes) {
            committed.push(match outcome.as_str() {
                "committed" | "already" => CommitOutcome::Committed,
                "released" => CommitOutcome::Released,
                _ => self.late_commit(redis, &keys, reserved).await?,
            });
        }
        Ok(committed)
    }

    async fn late_commit(
        &self,
        redis: &Redis,
        keys: &SaleKeys,
        reserved: &ReservedUnits,
    ) -> redis::RedisResult<CommitOutcome> {
        let late: String = self
            .late_commit
            .key(&keys.stock)
            .key(&keys.epoch)
            .key(&keys.reservations)
            .key(&keys.buyers)
            .key(&keys.sale)
            .key(&keys.pending)
            .arg(reserved.order.to_string())
            .arg(reserved.buyer.simple().to_string())
            .arg(reserved.units)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match late.as_str() {
            "committed" => CommitOutcome::Committed,
            "sold_out" => CommitOutcome::SoldOut,
            "limit" => CommitOutcome::OverLimit,
            _ => CommitOutcome::NotLoaded,
        })
    }

    pub async fn release(
        &self,
        redis: &Redis,
        product: Uuid,
        order: Uuid,
    ) -> redis::RedisResult<ReleaseOutcome> {
        let keys = SaleKeys::new(redis, product);
        let outcome: String = self
            .release
            .key(&keys.stock)
            .key(&keys.buyers)
            .key(&keys.reservations)
            .key(&keys.pending)
            .arg(order.to_string())
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match outcome.as_str() {
            "r" | "c" => ReleaseOutcome::Released,
            "already" => ReleaseOutcome::AlreadyReleased,
            _ => ReleaseOutcome::Unknown,
        })
    }

    /// Loads a sale's terms, and its counter (= `inventory`) unless already loaded.
    pub async fn load(
        &self,
        redis: &Redis,
        product: Uuid,
        inventory: i32,
        terms: &SaleTerms,
    ) -> redis::RedisResult<bool> {
        let keys = SaleKeys::new(redis, product);
        // Kept a day past the end so late workers and the reconciler still find the records.
        let expire_at = terms.end.timestamp() + 86_400;
        let loaded: i64 = keys
            .invoke(&self.load)
            .arg(inventory)
            .arg(Uuid::now_v7().to_string())
            .arg(terms.start.timestamp_millis())
            .arg(terms.end.timestamp_millis())
            .arg(terms.per_user_limit)
            .arg(&terms.price)
            .arg(expire_at)
            .arg(terms.kind.as_str())
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(loaded == 1)
    }

    /// Applies `delta` units to a loaded counter. `Ok(None)` when nothing is loaded;
    /// `Err(stock)` when the change would take it below zero.
    pub async fn adjust(
        &self,
        redis: &Redis,
        product: Uuid,
        delta: i64,
    ) -> redis::RedisResult<Result<Option<i64>, i64>> {
        let keys = SaleKeys::new(redis, product);
        let (status, stock): (String, i64) = self
            .adjust
            .key(&keys.stock)
            .key(&keys.epoch)
            .key(&keys.sale)
            .arg(delta)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match status.as_str() {
            "ok" => Ok(Some(stock)),
            "below" => Err(stock),
            _ => Ok(None),
        })
    }

    /// Whether the sale's counters are present (the epoch exists), and open.
    pub async fn state(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<SaleState> {
        let keys = SaleKeys::new(redis, product);
        let (epoch, stock, recovering): (i64, i64, i64) = redis::pipe()
            .exists(&keys.epoch)
            .exists(&keys.stock)
            .hexists(&keys.sale, "recovering")
            .query_async(&mut redis.conn())
            .await?;
        Ok(match (epoch == 1 && stock == 1, recovering == 1) {
            (false, _) => SaleState::Missing,
            (true, true) => SaleState::Recovering,
            (true, false) => SaleState::Open,
        })
    }

    /// Takes a buyer through the sale's waiting room (one script, so every pod sees one
    /// order of arrival).
    pub async fn enter_room(
        &self,
        redis: &Redis,
        req: &RoomRequest<'_>,
    ) -> redis::RedisResult<RoomAnswer> {
        let keys = SaleKeys::new(redis, req.product);
        let reply: Vec<String> = self
            .room
            .key(&keys.stock)
            .key(&keys.room)
            .key(keys.idempotency(req.buyer, req.key_digest))
            .arg(req.buyer.simple().to_string())
            .arg(req.key_digest)
            .arg(Utc::now().timestamp_millis())
            .arg(req.capacity)
            .arg(req.tick_ms)
            .arg(req.slack)
            .arg(ROOM_TTL_SECS)
            .invoke_async(&mut redis.conn())
            .await?;
        let number = |i: usize| reply.get(i).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(match reply.first().map(String::as_str) {
            Some("admitted") => RoomAnswer::Admitted,
            Some("replay") => RoomAnswer::Replay,
            Some("sold_out") => RoomAnswer::SoldOut,
            Some("waiting") => RoomAnswer::Waiting {
                ticket: number(1),
                position: number(2),
            },
            _ => RoomAnswer::Pass,
        })
    }

    /// A buyer's ticket in the sale's room and how far the horizon is from it: (ticket,
    /// position, 0 once admitted).
    pub async fn room_ticket(
        &self,
        redis: &Redis,
        product: Uuid,
        buyer: Uuid,
    ) -> redis::RedisResult<Option<(u64, u64)>> {
        let keys = SaleKeys::new(redis, product);
        let (ticket, admitted): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(&keys.room)
            .arg(format!("t:{}", buyer.simple()))
            .arg("admitted")
            .query_async(&mut redis.conn())
            .await?;
        Ok(ticket.map(|t| (t, t.saturating_sub(admitted.unwrap_or(0)))))
    }

    /// Notes a product whose regular stock is in Redis, for the reconciler.
    pub async fn track_regular(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<()> {
        let set = redis.key("stock:regular");
        redis::pipe()
            .sadd(&set, product.simple().to_string())
            .ignore()
            .expire(&set, REGULAR_TTL_SECS)
            .ignore()
            .query_async(&mut redis.conn())
            .await
    }

    /// Products whose regular stock is in Redis; forgets those whose keys expired.
    pub async fn regular_stock(&self, redis: &Redis) -> redis::RedisResult<Vec<Uuid>> {
        let set = redis.key("stock:regular");
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&set)
            .query_async(&mut redis.conn())
            .await?;
        let mut tracked = Vec::with_capacity(members.len());
        for product in members.iter().filter_map(|m| Uuid::try_parse(m).ok()) {
            if self.state(redis, product).await? == SaleState::Missing {
                redis::cmd("SREM")
                    .arg(&set)
                    .arg(product.simple().to_string())
                    .query_async::<()>(&mut redis.conn())
                    .await?;
            } else {
                tracked.push(product);
            }
        }
        Ok(tracked)
    }

    /// Notes that the sale was found lost (once); answers when it was first found, in ms.
    pub async fn mark_lost(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<i64> {
        let keys = SaleKeys::new(redis, product);
        let now_ms = Utc::now().timestamp_millis();
        let (_, first): ((), i64) = redis::pipe()
            .cmd("SET")
            .arg(&keys.lost)
            .arg(now_ms)
            .arg("NX")
            .arg("EX")
            .arg(LOST_MARK_TTL_SECS)
            .get(&keys.lost)
            .query_async(&mut redis.conn())
            .await?;
        Ok(first)
    }

    /// Opens a rebuilt sale.
    pub async fn reopen(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<()> {
        let keys = SaleKeys::new(redis, product);
        self.reopen
            .key(&keys.sale)
            .key(&keys.lost)
            .invoke_async::<i64>(&mut redis.conn())
            .await
            .map(drop)
    }

    /// Checks the sale's own books (one script, so nothing moves while it counts).
    pub async fn audit(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<SaleAudit> {
        let keys = SaleKeys::new(redis, product);
        let (state, units_off, over_limit): (String, i64, i64) = self
            .audit
            .key(&keys.stock)
            .key(&keys.epoch)
            .key(&keys.sale)
            .key(&keys.buyers)
            .key(&keys.reservations)
            .invoke_async(&mut redis.conn())
            .await?;
        let state = match state.as_str() {
            "open" => SaleState::Open,
            "recovering" => SaleState::Recovering,
            _ => SaleState::Missing,
        };
        Ok(SaleAudit {
            state,
            units_off,
            over_limit,
        })
    }

    /// Live remaining units of several products (None where not loaded).
    pub async fn remaining(
        &self,
        redis: &Redis,
        products: &[Uuid],
    ) -> redis::RedisResult<Vec<Option<i64>>> {
        if products.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for product in products {
            pipe.get(SaleKeys::new(redis, *product).stock);
        }
        pipe.query_async(&mut redis.conn()).await
    }

    /// Reservations older than `cutoff` that are still only reserved: (order, user).
    pub async fn stale_reservations(
        &self,
        redis: &Redis,
        product: Uuid,
        cutoff: DateTime<Utc>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let keys = SaleKeys::new(redis, product);
        let orders: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&keys.pending)
            .arg("-inf")
            .arg(cutoff.timestamp_millis())
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(&mut redis.conn())
            .await?;
        let mut stale = Vec::with_capacity(orders.len());
        for order in orders {
            let record: Option<String> = redis::cmd("HGET")
                .arg(&keys.reservations)
                .arg(&order)
                .query_async(&mut redis.conn())
                .await?;
            let parsed = record.as_deref().and_then(|r| {
                let mut parts = r.split(':');
                let (_state, user) = (parts.next()?, parts.next()?);
                Some(StaleReservation {
                    order: Uuid::try_parse(&order).ok()?,
                    buyer: Uuid::try_parse(user).ok()?,
                })
            });
            stale.extend(parsed);
        }
        Ok(stale)
    }

    /// Replaces the counters from PostgreSQL's truth after a Redis loss; the sale stays
    /// closed until `reopen`.
    pub async fn rebuild(
        &self,
        redis: &Redis,
        product: Uuid,
        stock: i64,
        buyers: &[(Uuid, i64)],
        terms: &SaleTerms,
    ) -> redis::RedisResult<()> {
        let keys = SaleKeys::new(redis, product);
        let mut invocation = keys.invoke(&self.rebuild);
        invocation.arg(stock).arg(Uuid::now_v7().to_string());
        for (user, units) in buyers {
            invocation.arg(user.simple().to_string()).arg(units);
        }
        invocation.invoke_async::<i64>(&mut redis.conn()).await?;
        self.load(redis, product, 0, terms).await.map(drop)
    }
}
