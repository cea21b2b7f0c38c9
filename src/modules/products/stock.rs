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
//! path answers 503 until the reconciler rebuilt the counters from PostgreSQL. A missing
//! counter is never read as 0 or as unlimited.

use chrono::{DateTime, Utc};
use redis::Script;
use uuid::Uuid;

use crate::infra::redis::{IdempotencyStart, Redis};

/// Each script names its KEYS and ARGV at the top; the shared fragments read those names.
const RESERVE_FLASH: &str = concat!(
    include_str!("lua/reserve_flash.lua"),
    include_str!("lua/attempt_limit.lua"),
    include_str!("../../infra/lua/idempotency_check.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/reserve_flash_done.lua"),
);
const RESERVE_ITEM: &str = concat!(
    include_str!("lua/reserve_item.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/reserve_item_done.lua"),
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
}

impl Default for StockScripts {
    fn default() -> Self {
        Self {
            reserve: Script::new(RESERVE_FLASH),
            reserve_item: Script::new(RESERVE_ITEM),
            commit: Script::new(include_str!("lua/commit.lua")),
            late_commit: Script::new(include_str!("lua/late_commit.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            load: Script::new(include_str!("lua/load.lua")),
            adjust: Script::new(include_str!("lua/adjust.lua")),
            rebuild: Script::new(include_str!("lua/rebuild.lua")),
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
    pub idempotency_ttl_secs: u64,
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
            .arg(req.idempotency_ttl_secs)
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
            .arg(reserved.order.to_string())
            .arg(reserved.buyer.simple().to_string())
            .arg(reserved.units)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match late.as_str() {
            "committed" => CommitOutcome::Committed,
            "sold_out" => CommitOutcome::SoldOut,
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
            .arg(delta)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match status.as_str() {
            "ok" => Ok(Some(stock)),
            "below" => Err(stock),
            _ => Ok(None),
        })
    }

    /// Whether the sale's counters are present (the epoch exists).
    pub async fn is_loaded(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<bool> {
        let keys = SaleKeys::new(redis, product);
        let (epoch, stock): (i64, i64) = redis::pipe()
            .exists(&keys.epoch)
            .exists(&keys.stock)
            .query_async(&mut redis.conn())
            .await?;
        Ok(epoch == 1 && stock == 1)
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

    /// Replaces the counters from PostgreSQL's truth after a Redis loss.
    pub async fn rebuild(
        &self,
        redis: &Redis,
        product: Uuid,
        stock: i64,
        buyers: &[(Uuid, i64)],
        terms: &SaleTerms,
    ) -> redis::RedisResult<()> {
        let keys = SaleKeys::new(redis, product);
        let mut invocation = self.rebuild.key(&keys.stock);
        invocation
            .key(&keys.epoch)
            .key(&keys.buyers)
            .arg(stock)
            .arg(Uuid::now_v7().to_string());
        for (user, units) in buyers {
            invocation.arg(user.simple().to_string()).arg(units);
        }
        invocation.invoke_async::<i64>(&mut redis.conn()).await?;
        self.load(redis, product, 0, terms).await.map(drop)
    }
}
