//! The stock engine: the only place units are reserved, committed and released, for flash
//! sales and regular products alike. It takes the Redis handle it works on (never the
//! application's state); products and orders call this public API, and PostgreSQL stays
//! theirs (the engine is told the numbers it rebuilds from).
//!
//! A sale's stock is split into buckets (`sales.stock_buckets`, fixed at the sale's first
//! load), so one hot sale spreads over several Redis Cluster nodes. Every key of one bucket
//! shares a hash tag (`{p:<id>}` for bucket 0, `{p:<id>:<n>}` for the others), so each
//! script touches one slot. A buyer's purchase record, reservations and Idempotency-Key live
//! in the buyer's home bucket (hash(buyer) mod buckets), so the limit and the reservation stay
//! one atomic script. A bucket that runs dry borrows from the fullest other bucket: a move is
//! two scripts (give, then take, recorded so a crash in between is finished by the
//! reconciler), and each bucket's books balance at every step. Bucket 0 also holds what
//! belongs to the sale as a whole: the waiting room and the lost note.
//! ## A reservation's states
//!
//! Every transition is one compare-and-set inside one script; whoever changes a record
//! first decides, and the loser sees the new state and backs off:
//!
//! ```text
//!              commit (worker, before it persists the order)
//!   reserve -> r ─────────────────────────────────────────────> c   units sold
//!              │ \                                              │
//!              │  fence (reconciler, before it reads PostgreSQL) │ release (owner: the order
//!              │   \                                            │ is failed or cancelled in
//!              │    f ──── release (fenced) ──> x <──────────────┘ PostgreSQL)
//!              │                                ^
//!              └──── release (owner) ───────────┘
//! ```
//!
//! - `r` reserved, `c` committed, `f` releasing (fenced), `x` released.
//! - A commit finds `f` or `x` and answers `released`: the order fails, its units go back.
//! - The reconciler's release takes only `f`: it never hands back units a worker committed
//!   (it answers `kept`). Only an order's owner (its failure, its cancel), which knows the
//!   order's final state in PostgreSQL, releases a committed one. A request that gives up
//!   before its order was accepted (its publish was never confirmed) releases only `r`: a
//!   late confirm's message may have reached a worker, and a `c` means the order goes on.
//! - A release of `x` does nothing (`already`): units go back exactly once.
//!
//! The counter `stock` is the units neither reserved nor sold. It exists only while the
//! `epoch` key does: a missing epoch means Redis lost the sale (a restart), and the order
//! path answers 503 until the reconciler rebuilt the counters from PostgreSQL and the orders
//! in flight at the loss have settled (the sale is `recovering` meanwhile). A missing
//! counter is never read as 0 or as unlimited.
//!
//! ## Epochs and the stock fence
//!
//! Every load or rebuild writes a new epoch (a UUIDv7: later compares greater) and every
//! commit answers the epoch it was made under (`CommitEpoch`). A rebuild counts the units of
//! orders committed and not yet written back on the shelf, so such a commit must never be
//! written sold: the caller writes the rebuild's epoch into every shard's `stock_fences`
//! before it reads PostgreSQL, and the worker writes an order paid only if no fence is newer
//! than its commit (orders' `fences`). A voided order takes its units again (a late commit)
//! or fails sold out, refunded. A rebuild never goes back: a bucket already at a newer
//! epoch is left alone, and regular stock another order loaded meanwhile keeps its
//! reservations and only moves to the new epoch.
//!
//! A flash sale's bucket that a loss spared (one Cluster node restarted empty) keeps its
//! records: its committed orders answer the new epoch when they commit again after the
//! fence voided their write (`already`), and its counter is its share of the on-hand units
//! less the units its orders in flight hold, so those are counted once. Only the lost
//! buckets' orders in flight commit late.

use std::time::Duration;

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

/// A sale's bucket count never changes while it is loaded; a process re-reads it this often
/// (and whenever a script says its layout is stale).
const LAYOUT_TTL: Duration = Duration::from_secs(30);

/// A move between buckets older than this was interrupted (the mover died between its two
/// halves); the reconciler finishes it.
const MOVE_STUCK_MS: i64 = 2_000;

/// Borrowing rounds for one reservation: other buyers of the home bucket may take the units
/// a round moved in before this one gets to them. Every round sells units to someone, so
/// this bound is only a guard; a sale runs dry well within it.
const BORROW_ROUNDS: usize = 64;

/// How long a borrower that found every bucket dry but moves in flight waits for them to land.
const MOVE_LANDING: Duration = Duration::from_millis(2);

/// Each script names its KEYS and ARGV at the top; the shared fragments read those names.
const RESERVE_FLASH: &str = concat!(
    include_str!("lua/reserve_flash.lua"),
    // A replay first: an accepted request's retries are answered, never counted as attempts.
    include_str!("lua/resume_check.lua"),
    include_str!("../../infra/lua/idempotency_check.lua"),
    include_str!("lua/attempt_limit.lua"),
    include_str!("lua/take_units.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/reserve_flash_done.lua"),
);
const RESERVE_ITEM: &str = concat!(
    include_str!("lua/reserve_item.lua"),
    include_str!("lua/take_units.lua"),
    include_str!("lua/reserve_units.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/reserve_item_done.lua"),
);
const TAKE: &str = concat!(
    include_str!("lua/take.lua"),
    include_str!("lua/take_units.lua"),
    include_str!("lua/take_done.lua"),
);
// The auditor and a spared bucket's rebuild count the units orders in flight hold alike.
const AUDIT: &str = concat!(
    include_str!("lua/units_held.lua"),
    include_str!("lua/audit.lua")
);
const REBUILD_KEPT: &str = concat!(
    include_str!("lua/units_held.lua"),
    include_str!("lua/rebuild_kept.lua")
);
const LATE_COMMIT: &str = concat!(
    include_str!("lua/late_commit.lua"),
    include_str!("lua/take_units.lua"),
    include_str!("lua/late_commit_units.lua"),
    include_str!("lua/expire_with_sale.lua"),
    include_str!("lua/late_commit_done.lua"),
);

/// The stock engine's scripts and its cache of sale layouts.
pub struct StockScripts {
    /// Buckets a new flash sale is split into.
    flash_buckets: u32,
    /// product -> the bucket count its loaded sale uses.
    layouts: moka::sync::Cache<Uuid, u32>,
    reserve: Script,
    reserve_item: Script,
    commit: Script,
    late_commit: Script,
    release: Script,
    fence: Script,
    persist: Script,
    load: Script,
    adjust: Script,
    rebuild: Script,
    rebuild_kept: Script,
    rebuild_holdings: Script,
    forget: Script,
    reopen: Script,
    audit: Script,
    room: Script,
    give: Script,
    take: Script,
}

impl StockScripts {
    pub fn new(flash_buckets: u32) -> Self {
        Self {
            persist: Script::new(include_str!("lua/persist.lua")),
            flash_buckets: flash_buckets.max(1),
            layouts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(LAYOUT_TTL)
                .build(),
            reserve: Script::new(RESERVE_FLASH),
            reserve_item: Script::new(RESERVE_ITEM),
            commit: Script::new(include_str!("lua/commit.lua")),
            late_commit: Script::new(LATE_COMMIT),
            release: Script::new(include_str!("lua/release.lua")),
            fence: Script::new(include_str!("lua/fence.lua")),
            load: Script::new(include_str!("lua/load.lua")),
            adjust: Script::new(include_str!("lua/adjust.lua")),
            rebuild: Script::new(include_str!("lua/rebuild.lua")),
            rebuild_kept: Script::new(REBUILD_KEPT),
            rebuild_holdings: Script::new(include_str!("lua/rebuild_holdings.lua")),
            forget: Script::new(include_str!("lua/forget.lua")),
            reopen: Script::new(include_str!("lua/reopen.lua")),
            audit: Script::new(AUDIT),
            room: Script::new(include_str!("lua/room.lua")),
            give: Script::new(include_str!("lua/give.lua")),
            take: Script::new(TAKE),
        }
    }
}

/// How one sale's stock is split.
#[derive(Debug, Clone, Copy)]
struct Layout {
    product: Uuid,
    buckets: u32,
}

impl Layout {
    /// The bucket holding `buyer`'s purchases (a UUID's low bits are random, v4 or v7).
    fn home(&self, buyer: Uuid) -> u32 {
        (buyer.as_u128() % u128::from(self.buckets)) as u32
    }

    fn bucket(&self, redis: &Redis, bucket: u32) -> SaleKeys {
        SaleKeys::new(redis, self.product, bucket)
    }

    fn home_keys(&self, redis: &Redis, buyer: Uuid) -> SaleKeys {
        self.bucket(redis, self.home(buyer))
    }

    fn every(&self, redis: &Redis) -> Vec<SaleKeys> {
        (0..self.buckets).map(|b| self.bucket(redis, b)).collect()
    }

    /// `units` dealt out over the buckets, the first ones taking the remainder.
    fn shares(&self, units: i64) -> Vec<i64> {
        deal(units, self.buckets as usize)
    }
}

/// `units` dealt out over `n` parts, the first ones taking the remainder.
fn deal(units: i64, n: usize) -> Vec<i64> {
    let n = n as i64;
    (0..n)
        .map(|b| units / n + i64::from(b < units % n))
        .collect()
}

/// Units given by one bucket and not yet taken by another.
struct Move {
    id: String,
    from: u32,
    units: i64,
    /// The sale's epoch when given: a rebuild since voids the move.
    epoch: String,
}

/// What a borrower found.
enum Borrowed {
    Move(Move),
    /// Units reached the borrower's own bucket meanwhile.
    AtHome,
    /// Every bucket is dry.
    Nothing,
}

/// The keys of one bucket of a product's sale.
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
    /// Moves of units out of this bucket not yet taken by the receiving bucket.
    moves_out: String,
    /// Moves taken into this bucket (so a repeated take adds nothing).
    moves_in: String,
    /// Orders committed and not yet persisted, scored by commit time.
    committed: String,
}

impl SaleKeys {
    fn new(redis: &Redis, product: Uuid, bucket: u32) -> Self {
        let tagged_prefix = tagged_prefix(redis, product, bucket);
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
            moves_out: key("out"),
            moves_in: key("in"),
            committed: key("committed"),
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

    /// Starts an invocation of a rebuild script: the six sale keys, then the moves and the
    /// committed set (KEYS[7..9]), which a rebuild replaces too.
    fn invoke_rebuild<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.invoke(script);
        invocation
            .key(&self.moves_out)
            .key(&self.moves_in)
            .key(&self.committed);
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

/// `<prefix>{p:<id>}` (bucket 0) or `<prefix>{p:<id>:<bucket>}`: every key of one bucket of a
/// product's sale starts with it (one cluster slot).
fn tagged_prefix(redis: &Redis, product: Uuid, bucket: u32) -> String {
    if bucket == 0 {
        redis.key(format_args!("{{p:{}}}", product.simple()))
    } else {
        redis.key(format_args!("{{p:{}:{bucket}}}", product.simple()))
    }
}

fn idempotency_in(tagged_prefix: &str, user: Uuid, key_digest: &str) -> String {
    // Same hash tag as the buyer's home bucket, so the reserve script stays in one slot.
    format!("{tagged_prefix}:idem:{}:{key_digest}", user.simple())
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
    /// A retry after the in-flight window found its first try's reservation still held
    /// (the reply was lost, or the process died before publishing): the retry carries on
    /// with that order.
    Resumed {
        /// The order's id, as the key's marker holds it.
        order: String,
        unit_price: String,
    },
    /// The sale was rebuilt after a Redis loss within `verify_window_ms`: Redis may have
    /// forgotten the key, so nothing was reserved. The caller asks PostgreSQL, then tries
    /// again with a window of 0.
    Unverified,
    /// The same idempotency key already created an order; what the key holds (its id).
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

/// A reservation still only reserved (or fenced, not yet released) after the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleReservation {
    pub product: Uuid,
    pub order: Uuid,
    pub buyer: Uuid,
}

/// Products whose regular stock one reconciler round trip looks at.
const REGULAR_PAGE: usize = 500;

/// Records a regular product keeps before the reconciler looks for ones to drop: a small
/// hash costs little, and looking costs a read of PostgreSQL.
const SETTLED_CHECK_ABOVE: i64 = 256;

/// Records of one regular product the reconciler reads per pass (it goes on from there on
/// the next).
const SETTLED_CHECK_PAGE: usize = 1000;

/// A regular order's record that only PostgreSQL can say is still needed: released, or
/// persisted (its order may be cancelled, and then its units come back through it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledRecord {
    pub product: Uuid,
    pub order: Uuid,
    pub buyer: Uuid,
    /// The record as read: it is dropped only while unchanged.
    record: String,
}

impl SettledRecord {
    /// Released (its units went back), rather than persisted (sold).
    pub fn released(&self) -> bool {
        self.record.starts_with('x')
    }
}

/// A live order's units of a product, as PostgreSQL has them: what a rebuild gives back to
/// its buyer's allowance, with the order's record (persisted) so a later cancel releases them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    pub order: Uuid,
    pub buyer: Uuid,
    pub units: u32,
}

/// Where a reservation was committed: its bucket and the bucket's epoch then. A rebuild of
/// that bucket since (after a Redis loss) voids the commit: the rebuild counted the units
/// back on the shelf, so the order must take them again before it is written sold (the
/// rebuild fences PostgreSQL with its new epoch first; see the orders' stock fences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitEpoch {
    pub product: Uuid,
    pub bucket: u32,
    /// Nil when the bucket had lost its epoch: any fence voids it.
    pub epoch: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed(CommitEpoch),
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
    /// An admitted ticket holds a unit this long at least; then it counts as served.
    pub hold_ms: u64,
}

/// The room's answer to a buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomAnswer {
    /// No one waits and there is capacity: go on to reserve.
    Pass,
    /// The buyer's ticket is within the admitted horizon: go on to reserve.
    Admitted,
    /// The Idempotency-Key was used: the reservation replays its answer, or resumes,
    /// answers or frees what its unanswered request reserved.
    Replay,
    SoldOut,
    Waiting {
        ticket: u64,
        position: u64,
    },
}

/// What the room script answered, and the room's unserved tickets: taken and not yet back
/// through an admission. While there are any, every attempt at the sale must go through the
/// room (`orders::admission`), or a returning holder is never counted and the horizon stops
/// short of the units left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomReply<T> {
    pub answer: T,
    pub unserved: u64,
}

/// The last number of a room script's reply that read the room (0 when it did not).
fn unserved(reply: &[String]) -> u64 {
    match reply.first().map(String::as_str) {
        None | Some("replay") => 0,
        Some(_) if reply.len() < 2 => 0,
        Some(_) => reply.last().and_then(|n| n.parse().ok()).unwrap_or(0),
    }
}

/// A sale's waiting room as a process watching it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomView {
    /// Tickets up to this one are admitted.
    pub admitted: u64,
    pub units_left: u64,
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
    /// A worker committed the reservation, which this release may not take back: nothing
    /// changed.
    Kept,
    /// The reconciler fenced the reservation, to release it itself: nothing changed.
    Fenced,
    Unknown,
}

/// Who releases a reservation, and so from which states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Releaser {
    /// The order's own end, known final in PostgreSQL (failed, cancelled): from any live
    /// state.
    Owner,
    /// The request that reserved, giving up before its order was accepted: only from `r`.
    /// A publish whose confirm never came may still have reached a worker, which committed
    /// it: then the order goes on, and the units stay sold.
    Unaccepted,
    /// The reconciler, after its fence: only from `f` (releasing).
    Reconciler,
}

impl Releaser {
    fn allowed_states(self) -> &'static str {
        match self {
            Releaser::Owner => "rcfp",
            Releaser::Unaccepted => "r",
            Releaser::Reconciler => "f",
        }
    }
}

/// A sale's units left over its buckets' counters; None when bucket 0 (the sale's home) is
/// not loaded.
fn units_left(counters: &[Option<i64>]) -> Option<i64> {
    counters
        .first()
        .copied()
        .flatten()
        .map(|_| counters.iter().flatten().sum())
}

/// A commit's epoch as a script answered it ('' when the bucket had none).
fn commit_epoch(product: Uuid, bucket: u32, epoch: Option<&String>) -> CommitEpoch {
    CommitEpoch {
        product,
        bucket,
        epoch: epoch
            .and_then(|e| Uuid::try_parse(e).ok())
            .unwrap_or(Uuid::nil()),
    }
}

/// A new epoch for a load or a rebuild. Epochs are UUIDv7: a later one compares greater,
/// which is what the stock fences rely on.
pub fn new_epoch() -> Uuid {
    Uuid::now_v7()
}

/// Live orders one rebuild call gives back (two Redis commands each inside one script: a
/// big sale's rebuild is many short calls, not one long one).
const REBUILD_HOLDINGS_CHUNK: usize = 500;

/// The move (if any) whose units a script takes first: id, units, epoch.
fn add_move_args(invocation: &mut redis::ScriptInvocation<'_>, borrowed: Option<&Move>) {
    match borrowed {
        Some(given) => invocation.arg(&given.id).arg(given.units).arg(&given.epoch),
        None => invocation.arg("").arg(0).arg(""),
    };
}

fn reservation_from(reply: &[String], now: DateTime<Utc>) -> Reservation {
    match reply {
        [ok, price] if ok == "ok" => Reservation::Reserved {
            unit_price: price.clone(),
        },
        [s, order, price] if s == "resume" => Reservation::Resumed {
            order: order.clone(),
            unit_price: price.clone(),
        },
        [s] if s == "verify" => Reservation::Unverified,
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
    /// How long the request that reserved may still be working on it; a retry with the same
    /// key gets `InProgress` until then, and resumes the reservation after.
    pub in_flight_secs: u64,
    /// How long the key's marker is kept (as long as an accepted key's answer).
    pub key_ttl_secs: u64,
    pub attempts_per_minute: u32,
    /// A sale rebuilt less than this long ago answers `Unverified` to a key it does not
    /// know (the Idempotency-Key's lifetime; 0 once PostgreSQL was asked).
    pub verify_window_ms: u64,
}

impl StockScripts {
    /// The layout of `product`'s loaded sale (one bucket when nothing is loaded: every
    /// script then answers `not_loaded`).
    async fn layout(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<Layout> {
        Ok(self.stored_layout(redis, product).await?.unwrap_or(Layout {
            product,
            buckets: 1,
        }))
    }

    /// The layout bucket 0 records (cached), if bucket 0 is there.
    async fn stored_layout(
        &self,
        redis: &Redis,
        product: Uuid,
    ) -> redis::RedisResult<Option<Layout>> {
        if let Some(buckets) = self.layouts.get(&product) {
            return Ok(Some(Layout { product, buckets }));
        }
        let stored: Option<u32> = redis::cmd("HGET")
            .arg(SaleKeys::new(redis, product, 0).sale)
            .arg("buckets")
            .query_async(&mut redis.conn())
            .await?;
        Ok(stored.map(|buckets| {
            let buckets = buckets.max(1);
            self.layouts.insert(product, buckets);
            Layout { product, buckets }
        }))
    }

    /// The layout a load of `kind` gives a sale that is not loaded yet.
    fn new_layout(&self, product: Uuid, kind: SaleKind) -> Layout {
        let buckets = match kind {
            SaleKind::Flash => self.flash_buckets,
            SaleKind::Regular => 1,
        };
        Layout { product, buckets }
    }

    /// The Redis key holding the idempotency record of (`product`, `user`, key digest).
    pub async fn idempotency_key(
        &self,
        redis: &Redis,
        product: Uuid,
        user: Uuid,
        key_digest: &str,
    ) -> redis::RedisResult<String> {
        let layout = self.layout(redis, product).await?;
        // Only the one key: the order path builds it per request.
        let home = tagged_prefix(redis, product, layout.home(user));
        Ok(idempotency_in(&home, user, key_digest))
    }

    pub async fn reserve(
        &self,
        redis: &Redis,
        req: &ReserveRequest<'_>,
    ) -> redis::RedisResult<Reservation> {
        let layout = self.layout(redis, req.product).await?;
        let (reply, now) = self
            .reserve_borrowing(
                redis,
                layout,
                req.user,
                req.quantity,
                |keys, borrowed, now| {
                    let mut invocation = keys.invoke(&self.reserve);
                    invocation
                        .key(keys.idempotency(req.user, req.key_digest))
                        .key(keys.attempts(req.user, now.timestamp() / 60))
                        .key(&keys.moves_in)
                        .arg(req.user.simple().to_string())
                        .arg(req.quantity)
                        .arg(req.order_id.to_string())
                        .arg(now.timestamp_millis())
                        .arg(SaleKind::Flash.as_str())
                        .arg(req.body_hash)
                        .arg(req.key_ttl_secs)
                        .arg(req.attempts_per_minute)
                        .arg(layout.buckets);
                    add_move_args(&mut invocation, borrowed);
                    invocation
                        .arg(req.verify_window_ms)
                        .arg(req.in_flight_secs.saturating_mul(1000));
                    invocation
                },
            )
            .await?;
        if let Some(started) = IdempotencyStart::from_reply(&reply) {
            return Ok(match started {
                IdempotencyStart::Replay(stored) => Reservation::Replay(stored),
                IdempotencyStart::InProgress => Reservation::InProgress,
                _ => Reservation::KeyReusedWithOtherBody,
            });
        }
        Ok(self.seen(req.product, reservation_from(&reply, now)))
    }

    /// Runs a script that takes units in the buyer's home bucket (a reservation, a late
    /// commit); while it answers sold out and another bucket has units, borrows them and runs
    /// it again. The borrowed units go into the same script that takes them, so no other
    /// buyer of the home bucket takes them first. Answers the last reply and when it was made.
    async fn reserve_borrowing<'s>(
        &'s self,
        redis: &Redis,
        layout: Layout,
        buyer: Uuid,
        quantity: u32,
        invocation: impl Fn(&SaleKeys, Option<&Move>, DateTime<Utc>) -> redis::ScriptInvocation<'s>,
    ) -> redis::RedisResult<(Vec<String>, DateTime<Utc>)> {
        let home = layout.home(buyer);
        let keys = layout.bucket(redis, home);
        let mut borrowed: Option<Move> = None;
        let mut rounds = 0;
        loop {
            let now = Utc::now();
            let reply: Vec<String> = invocation(&keys, borrowed.as_ref(), now)
                .invoke_async(&mut redis.conn())
                .await?;
            if let Some(done) = borrowed.take() {
                // Taken by the script unless it answered before reserving.
                self.finish_move(redis, &layout.bucket(redis, done.from), &keys, &done)
                    .await?;
            }
            rounds += 1;
            if reply.first().map(String::as_str) != Some("sold_out") || rounds >= BORROW_ROUNDS {
                return Ok((reply, now));
            }
            match self.borrow(redis, layout, home, quantity).await? {
                Borrowed::Move(given) => borrowed = Some(given),
                Borrowed::AtHome => {}
                Borrowed::Nothing => return Ok((reply, now)),
            }
        }
    }

    /// Forgets the cached layout when a script found none loaded: it may have changed.
    fn seen(&self, product: Uuid, reservation: Reservation) -> Reservation {
        if reservation == Reservation::NotLoaded {
            self.layouts.invalidate(&product);
        }
        reservation
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
        let layout = self.layout(redis, product).await?;
        let (reply, now) = self
            .reserve_borrowing(redis, layout, user, quantity, |keys, borrowed, now| {
                let mut invocation = keys.invoke(&self.reserve_item);
                invocation
                    .key(&keys.moves_in)
                    .arg(user.simple().to_string())
                    .arg(quantity)
                    .arg(order.to_string())
                    .arg(now.timestamp_millis())
                    .arg(SaleKind::Regular.as_str())
                    .arg(layout.buckets);
                add_move_args(&mut invocation, borrowed);
                invocation
            })
            .await?;
        Ok(self.seen(product, reservation_from(&reply, now)))
    }

    /// Gives units for bucket `to` from the fullest other bucket: at least `want` when it
    /// has them, and half of what it holds. Nothing when every bucket is dry (after moves in
    /// flight, which may be bringing units somewhere, have landed).
    async fn borrow(
        &self,
        redis: &Redis,
        layout: Layout,
        to: u32,
        want: u32,
    ) -> redis::RedisResult<Borrowed> {
        if layout.buckets < 2 {
            return Ok(Borrowed::Nothing);
        }
        let buckets = layout.every(redis);
        for _ in 0..BORROW_ROUNDS {
            let (stocks, in_flight) = self.bucket_stocks(redis, &buckets).await?;
            if stocks[to as usize].unwrap_or(0) >= i64::from(want) {
                return Ok(Borrowed::AtHome);
            }
            let fullest = stocks
                .iter()
                .enumerate()
                .filter(|(b, _)| *b as u32 != to)
                .filter_map(|(b, stock)| stock.map(|units| (b, units)))
                .max_by_key(|(_, units)| *units);
            match fullest {
                Some((from, units)) if units > 0 => {
                    let amount = i64::from(want).max((units + 1) / 2);
                    if let Some(given) = self
                        .give(redis, &buckets[from], from as u32, to, amount)
                        .await?
                    {
                        return Ok(Borrowed::Move(given));
                    }
                }
                _ if in_flight > 0 => tokio::time::sleep(MOVE_LANDING).await,
                _ => return Ok(Borrowed::Nothing),
            }
        }
        Ok(Borrowed::Nothing)
    }

    /// The counters of `buckets` (None where missing) and the moves out of them not yet
    /// taken, in one read.
    async fn bucket_stocks(
        &self,
        redis: &Redis,
        buckets: &[SaleKeys],
    ) -> redis::RedisResult<(Vec<Option<i64>>, i64)> {
        let mut pipe = redis::pipe();
        for keys in buckets {
            pipe.get(&keys.stock).hlen(&keys.moves_out);
        }
        let read: Vec<(Option<i64>, i64)> = pipe.query_async(&mut redis.conn()).await?;
        let in_flight = read.iter().map(|(_, moves)| moves).sum();
        Ok((
            read.into_iter().map(|(stock, _)| stock).collect(),
            in_flight,
        ))
    }

    /// The first half of a move: up to `amount` units off bucket `from`, recorded as on
    /// their way to bucket `to`. None when it had none left.
    async fn give(
        &self,
        redis: &Redis,
        keys: &SaleKeys,
        from: u32,
        to: u32,
        amount: i64,
    ) -> redis::RedisResult<Option<Move>> {
        let id = Uuid::now_v7().simple().to_string();
        let (units, epoch): (i64, String) = self
            .give
            .key(&keys.stock)
            .key(&keys.epoch)
            .key(&keys.sale)
            .key(&keys.moves_out)
            .arg(&id)
            .arg(to)
            .arg(amount)
            .arg(Utc::now().timestamp_millis())
            .invoke_async(&mut redis.conn())
            .await?;
        if units <= 0 {
            return Ok(None);
        }
        metrics::counter!("stock_bucket_moves_total").increment(1);
        Ok(Some(Move {
            id,
            from,
            units,
            epoch,
        }))
    }

    /// Moves up to `amount` units from bucket `from` to bucket `to` (both halves); answers
    /// the units moved.
    async fn move_units(
        &self,
        redis: &Redis,
        layout: Layout,
        from: u32,
        to: u32,
        amount: i64,
    ) -> redis::RedisResult<i64> {
        let giver = layout.bucket(redis, from);
        let Some(given) = self.give(redis, &giver, from, to, amount).await? else {
            return Ok(0);
        };
        self.finish_move(redis, &giver, &layout.bucket(redis, to), &given)
            .await?;
        Ok(given.units)
    }

    /// The take half of a move (a no-op when a reservation took it already), then its
    /// record goes (unless the receiver is lost: the rebuild that follows drops every move).
    async fn finish_move(
        &self,
        redis: &Redis,
        giver: &SaleKeys,
        taker: &SaleKeys,
        given: &Move,
    ) -> redis::RedisResult<()> {
        let taken: String = self
            .take
            .key(&taker.stock)
            .key(&taker.epoch)
            .key(&taker.sale)
            .key(&taker.moves_in)
            .arg(&given.id)
            .arg(given.units)
            .arg(&given.epoch)
            .invoke_async(&mut redis.conn())
            .await?;
        if taken != "not_loaded" {
            redis::cmd("HDEL")
                .arg(&giver.moves_out)
                .arg(&given.id)
                .query_async::<()>(&mut redis.conn())
                .await?;
        }
        Ok(())
    }

    /// Finishes moves between buckets that a process left half done; answers how many.
    pub async fn finish_stuck_moves(
        &self,
        redis: &Redis,
        product: Uuid,
    ) -> redis::RedisResult<usize> {
        let layout = self.layout(redis, product).await?;
        if layout.buckets < 2 {
            return Ok(0);
        }
        let buckets = layout.every(redis);
        let mut pipe = redis::pipe();
        for keys in &buckets {
            pipe.hgetall(&keys.moves_out);
        }
        // Every bucket's moves out, in one read.
        let moves_out: Vec<Vec<(String, String)>> = pipe.query_async(&mut redis.conn()).await?;
        let now_ms = Utc::now().timestamp_millis();
        let mut finished = 0;
        for ((from, giver), moves) in buckets.iter().enumerate().zip(moves_out) {
            for (id, record) in moves {
                let mut parts = record.split(':');
                let (Some(to), Some(units), Some(epoch), Some(at_ms)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let (Ok(to), Ok(units), Ok(at_ms)) =
                    (to.parse::<usize>(), units.parse(), at_ms.parse::<i64>())
                else {
                    continue;
                };
                if now_ms - at_ms < MOVE_STUCK_MS {
                    continue;
                }
                if let Some(taker) = buckets.get(to) {
                    let stuck = Move {
                        id,
                        from: from as u32,
                        units,
                        epoch: epoch.to_owned(),
                    };
                    self.finish_move(redis, giver, taker, &stuck).await?;
                    finished += 1;
                }
            }
        }
        Ok(finished)
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
        let layout = self.layout(redis, product).await?;
        let mut by_bucket: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, reserved) in orders.iter().enumerate() {
            by_bucket
                .entry(layout.home(reserved.buyer))
                .or_default()
                .push(i);
        }
        let mut committed = vec![CommitOutcome::NotLoaded; orders.len()];
        for (bucket, indexes) in by_bucket {
            let keys = layout.bucket(redis, bucket);
            let mut invocation = self.commit.key(&keys.reservations);
            invocation
                .key(&keys.pending)
                .key(&keys.sale)
                .key(&keys.committed)
                .key(&keys.epoch);
            for i in &indexes {
                invocation.arg(orders[*i].order.to_string());
            }
            // The bucket's epoch first, read in the same script as the commits.
            let reply: Vec<String> = invocation.invoke_async(&mut redis.conn()).await?;
            let under = commit_epoch(product, bucket, reply.first());
            for (i, outcome) in indexes.into_iter().zip(reply.iter().skip(1)) {
                committed[i] = match outcome.as_str() {
                    "committed" | "already" => CommitOutcome::Committed(under),
                    "released" => CommitOutcome::Released,
                    _ => self.late_commit(redis, layout, orders[i]).await?,
                };
            }
        }
        Ok(committed)
    }

    async fn late_commit(
        &self,
        redis: &Redis,
        layout: Layout,
        reserved: &ReservedUnits,
    ) -> redis::RedisResult<CommitOutcome> {
        let (reply, _) = self
            .reserve_borrowing(
                redis,
                layout,
                reserved.buyer,
                reserved.units,
                |keys, borrowed, _| {
                    let mut invocation = self.late_commit.key(&keys.stock);
                    invocation
                        .key(&keys.epoch)
                        .key(&keys.reservations)
                        .key(&keys.buyers)
                        .key(&keys.sale)
                        .key(&keys.pending)
                        .key(&keys.moves_in)
                        .key(&keys.committed)
                        .arg(reserved.order.to_string())
                        .arg(reserved.buyer.simple().to_string())
                        .arg(reserved.units);
                    add_move_args(&mut invocation, borrowed);
                    invocation
                },
            )
            .await?;
        Ok(match reply.first().map(String::as_str) {
            Some("committed") => CommitOutcome::Committed(commit_epoch(
                reserved.product,
                layout.home(reserved.buyer),
                reply.get(1),
            )),
            Some("released") => CommitOutcome::Released,
            Some("sold_out") => CommitOutcome::SoldOut,
            Some("limit") => CommitOutcome::OverLimit,
            _ => CommitOutcome::NotLoaded,
        })
    }

    pub async fn release(
        &self,
        redis: &Redis,
        product: Uuid,
        buyer: Uuid,
        order: Uuid,
        by: Releaser,
    ) -> redis::RedisResult<ReleaseOutcome> {
        let keys = self.layout(redis, product).await?.home_keys(redis, buyer);
        let outcome: String = self
            .release
            .key(&keys.stock)
            .key(&keys.buyers)
            .key(&keys.reservations)
            .key(&keys.pending)
            .key(&keys.sale)
            .key(&keys.committed)
            .arg(order.to_string())
            .arg(by.allowed_states())
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(match outcome.as_str() {
            "r" | "c" | "f" | "p" => ReleaseOutcome::Released,
            "already" => ReleaseOutcome::AlreadyReleased,
            "kept:f" => ReleaseOutcome::Fenced,
            kept if kept.starts_with("kept:") => ReleaseOutcome::Kept,
            _ => ReleaseOutcome::Unknown,
        })
    }

    /// The reconciler's fence: `reserved -> releasing` for each of `stale` (one script per
    /// bucket). Answers those now fenced (by this call or an earlier pass): only they may be
    /// released by the reconciler, and no worker can commit them any more.
    pub async fn fence(
        &self,
        redis: &Redis,
        stale: Vec<StaleReservation>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let mut by_bucket: std::collections::BTreeMap<(Uuid, u32), Vec<StaleReservation>> =
            Default::default();
        for reservation in stale {
            let layout = self.layout(redis, reservation.product).await?;
            by_bucket
                .entry((reservation.product, layout.home(reservation.buyer)))
                .or_default()
                .push(reservation);
        }
        let mut fenced = vec![];
        for ((product, bucket), reservations) in by_bucket {
            let keys = SaleKeys::new(redis, product, bucket);
            let mut invocation = self.fence.key(&keys.reservations);
            for reservation in &reservations {
                invocation.arg(reservation.order.to_string());
            }
            let outcomes: Vec<String> = invocation.invoke_async(&mut redis.conn()).await?;
            fenced.extend(
                reservations
                    .into_iter()
                    .zip(outcomes)
                    .filter(|(_, outcome)| outcome == "fenced")
                    .map(|(reservation, _)| reservation),
            );
        }
        Ok(fenced)
    }

    /// committed -> persisted for orders whose final row is in PostgreSQL (one script per
    /// bucket): they leave the committed set the reconciler scans.
    pub async fn persist(
        &self,
        redis: &Redis,
        product: Uuid,
        orders: &[&ReservedUnits],
    ) -> redis::RedisResult<()> {
        if orders.is_empty() {
            return Ok(());
        }
        let layout = self.layout(redis, product).await?;
        let mut by_bucket: std::collections::BTreeMap<u32, Vec<Uuid>> = Default::default();
        for reserved in orders {
            by_bucket
                .entry(layout.home(reserved.buyer))
                .or_default()
                .push(reserved.order);
        }
        for (bucket, orders) in by_bucket {
            let keys = layout.bucket(redis, bucket);
            let mut invocation = self.persist.key(&keys.reservations);
            invocation.key(&keys.committed);
            for order in orders {
                invocation.arg(order.to_string());
            }
            invocation.invoke_async::<i64>(&mut redis.conn()).await?;
        }
        Ok(())
    }

    /// Orders of `product` committed before `cutoff` and still not persisted: their worker
    /// wrote nothing (its message was lost or dead-lettered), or died before persisting.
    pub async fn stale_committed(
        &self,
        redis: &Redis,
        product: Uuid,
        cutoff: DateTime<Utc>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let buckets: Vec<(Uuid, SaleKeys)> = self
            .layout(redis, product)
            .await?
            .every(redis)
            .into_iter()
            .map(|keys| (product, keys))
            .collect();
        committed_before(redis, &buckets, cutoff).await
    }

    /// `stale_committed` for every product whose regular stock is in Redis, a page of
    /// products per round trip.
    pub async fn stale_regular_committed(
        &self,
        redis: &Redis,
        cutoff: DateTime<Utc>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let mut stale = vec![];
        for page in self.regular_products(redis).await?.chunks(REGULAR_PAGE) {
            let buckets: Vec<(Uuid, SaleKeys)> = page
                .iter()
                .map(|p| (*p, SaleKeys::new(redis, *p, 0)))
                .collect();
            stale.extend(committed_before(redis, &buckets, cutoff).await?);
        }
        Ok(stale)
    }

    /// The products whose regular stock is in Redis (see `track_regular`).
    async fn regular_products(&self, redis: &Redis) -> redis::RedisResult<Vec<Uuid>> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(redis.key("stock:regular"))
            .query_async(&mut redis.conn())
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| Uuid::try_parse(m).ok())
            .collect())
    }

    /// Loads a sale's terms into every bucket, and its counters (`inventory` dealt out over
    /// the buckets) unless already loaded.
    pub async fn load(
        &self,
        redis: &Redis,
        product: Uuid,
        inventory: i32,
        terms: &SaleTerms,
    ) -> redis::RedisResult<bool> {
        let fresh = self.new_layout(product, terms.kind);
        let shares = fresh.shares(i64::from(inventory));
        let epoch = Uuid::now_v7().to_string();
        // Bucket 0 decides: loaded now (the others follow with their shares), or before (with
        // the bucket count it was loaded with; the others get the terms only).
        let (loaded, buckets) = self
            .load_bucket(
                redis,
                &fresh.bucket(redis, 0),
                Some(shares[0]),
                &epoch,
                terms,
                fresh.buckets,
            )
            .await?;
        let layout = Layout {
            product,
            buckets: if loaded {
                fresh.buckets
            } else {
                buckets.max(1)
            },
        };
        for bucket in 1..layout.buckets {
            let share = loaded.then(|| shares[bucket as usize]);
            self.load_bucket(
                redis,
                &layout.bucket(redis, bucket),
                share,
                &epoch,
                terms,
                layout.buckets,
            )
            .await?;
        }
        self.layouts.insert(product, layout.buckets);
        Ok(loaded)
    }

    /// One bucket's load (`units` None: terms only). Answers (loaded, the sale's buckets).
    async fn load_bucket(
        &self,
        redis: &Redis,
        keys: &SaleKeys,
        units: Option<i64>,
        epoch: &str,
        terms: &SaleTerms,
        buckets: u32,
    ) -> redis::RedisResult<(bool, u32)> {
        // Kept a day past the end so late workers and the reconciler still find the records;
        // an end edited into the past counts from now, so the keys never vanish under the
        // orders still in flight.
        let expire_at = terms.end.max(Utc::now()).timestamp() + 86_400;
        let (loaded, stored): (i64, u32) = keys
            .invoke(&self.load)
            .key(&keys.moves_out)
            .key(&keys.moves_in)
            .arg(units.map_or_else(|| "-".to_owned(), |u| u.to_string()))
            .arg(epoch)
            .arg(terms.start.timestamp_millis())
            .arg(terms.end.timestamp_millis())
            .arg(terms.per_user_limit)
            .arg(&terms.price)
            .arg(expire_at)
            .arg(terms.kind.as_str())
            .arg(buckets)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok((loaded == 1, stored))
    }

    /// Applies `delta` units to a loaded sale (a decrease first gathers units into bucket 0).
    /// `Ok(None)` when nothing is loaded; `Err(stock)` when the change would take it below
    /// zero.
    pub async fn adjust(
        &self,
        redis: &Redis,
        product: Uuid,
        delta: i64,
    ) -> redis::RedisResult<Result<Option<i64>, i64>> {
        let layout = self.layout(redis, product).await?;
        let buckets = layout.every(redis);
        if delta < 0 {
            let (stocks, _) = self.bucket_stocks(redis, &buckets).await?;
            let mut gathered = stocks[0].unwrap_or(0);
            for (bucket, stock) in stocks.iter().enumerate().skip(1) {
                if gathered >= -delta {
                    break;
                }
                let want = (-delta - gathered).min(stock.unwrap_or(0));
                if want > 0 {
                    gathered += self
                        .move_units(redis, layout, bucket as u32, 0, want)
                        .await?;
                }
            }
        }
        let first = &buckets[0];
        let (status, _): (String, i64) = self
            .adjust
            .key(&first.stock)
            .key(&first.epoch)
            .key(&first.sale)
            .arg(delta)
            .invoke_async(&mut redis.conn())
            .await?;
        let total: i64 = self
            .bucket_stocks(redis, &buckets)
            .await?
            .0
            .into_iter()
            .flatten()
            .sum();
        Ok(match status.as_str() {
            "ok" => Ok(Some(total)),
            "below" => Err(total),
            _ => Ok(None),
        })
    }

    /// Whether every bucket's counters are present (the epoch exists), and open.
    pub async fn state(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<SaleState> {
        let layout = self.layout(redis, product).await?;
        let mut pipe = redis::pipe();
        for keys in layout.every(redis) {
            pipe.exists(&keys.epoch)
                .exists(&keys.stock)
                .hexists(&keys.sale, "recovering");
        }
        let flags: Vec<bool> = pipe.query_async(&mut redis.conn()).await?;
        let mut state = SaleState::Open;
        for bucket in flags.chunks(3) {
            match bucket {
                [true, true, false] => {}
                [true, true, true] => state = SaleState::Recovering,
                _ => {
                    self.layouts.invalidate(&product);
                    return Ok(SaleState::Missing);
                }
            }
        }
        Ok(state)
    }

    /// Takes a buyer through the sale's waiting room (one script on bucket 0, so every pod
    /// sees one order of arrival).
    pub async fn enter_room(
        &self,
        redis: &Redis,
        req: &RoomRequest<'_>,
    ) -> redis::RedisResult<RoomReply<RoomAnswer>> {
        let reply = self
            .run_room(redis, req, Some((req.buyer, req.key_digest)))
            .await?;
        let number = |i: usize| reply.get(i).and_then(|n| n.parse().ok()).unwrap_or(0);
        let answer = match reply.first().map(String::as_str) {
            Some("admitted") => RoomAnswer::Admitted,
            Some("replay") => RoomAnswer::Replay,
            Some("sold_out") => RoomAnswer::SoldOut,
            Some("waiting") => RoomAnswer::Waiting {
                ticket: number(1),
                position: number(2),
            },
            _ => RoomAnswer::Pass,
        };
        Ok(RoomReply {
            answer,
            unserved: unserved(&reply),
        })
    }

    /// Moves a sale's horizon as a buyer's attempt would (`req.buyer` is not used) and
    /// answers where it stands: how an API process keeps the rooms its shoppers watch moving
    /// when they wait on a pushed stream instead of retrying. `None`: the sale is not loaded.
    pub async fn watch_room(
        &self,
        redis: &Redis,
        req: &RoomRequest<'_>,
    ) -> redis::RedisResult<Option<RoomReply<RoomView>>> {
        let reply = self.run_room(redis, req, None).await?;
        let number = |i: usize| reply.get(i).and_then(|n| n.parse().ok());
        Ok(match reply.first().map(String::as_str) {
            Some("tick") => number(1)
                .zip(number(2))
                .map(|(admitted, units_left)| RoomReply {
                    answer: RoomView {
                        admitted,
                        units_left,
                    },
                    unserved: unserved(&reply),
                }),
            _ => None,
        })
    }

    async fn run_room(
        &self,
        redis: &Redis,
        req: &RoomRequest<'_>,
        buyer: Option<(Uuid, &str)>,
    ) -> redis::RedisResult<Vec<String>> {
        let layout = self.layout(redis, req.product).await?;
        let room = SaleKeys::new(redis, req.product, 0);
        let mut invocation = self.room.key(&room.room);
        let (stock, key_used) = if layout.buckets == 1 {
            // One slot: the script reads the counter and the key itself (one round trip).
            invocation.key(&room.stock).key(match buyer {
                Some((buyer, digest)) => room.idempotency(buyer, digest),
                None => room.stock.clone(),
            });
            (String::new(), false)
        } else {
            self.room_view(redis, layout, buyer).await?
        };
        invocation
            .arg(buyer.map_or_else(String::new, |(buyer, _)| buyer.simple().to_string()))
            .arg(buyer.map_or("", |(_, digest)| digest))
            .arg(Utc::now().timestamp_millis())
            .arg(req.capacity)
            .arg(req.tick_ms)
            .arg(req.slack)
            .arg(ROOM_TTL_SECS)
            .arg(stock)
            .arg(if key_used { "1" } else { "0" })
            .arg(req.hold_ms)
            .invoke_async(&mut redis.conn())
            .await
    }

    /// What the room of a sale in several buckets needs from slots other than its own: the
    /// units left over every bucket ('' when not loaded), and whether the buyer's
    /// Idempotency-Key was used (answered, or left by a request that reserved).
    async fn room_view(
        &self,
        redis: &Redis,
        layout: Layout,
        buyer: Option<(Uuid, &str)>,
    ) -> redis::RedisResult<(String, bool)> {
        let mut pipe = redis::pipe();
        for keys in layout.every(redis) {
            pipe.get(keys.stock);
        }
        if let Some((buyer, digest)) = buyer {
            pipe.get(layout.home_keys(redis, buyer).idempotency(buyer, digest));
        }
        let mut read: Vec<Option<String>> = pipe.query_async(&mut redis.conn()).await?;
        let idempotency = if buyer.is_some() {
            read.pop().flatten()
        } else {
            None
        };
        let key_used = idempotency.is_some();
        let counters: Vec<Option<i64>> = read
            .iter()
            .map(|units| units.as_deref().and_then(|u| u.parse().ok()))
            .collect();
        let stock = units_left(&counters).map_or_else(String::new, |units| units.to_string());
        Ok((stock, key_used))
    }

    /// A buyer's ticket in the sale's room and how far the horizon is from it: (ticket,
    /// position, 0 once admitted).
    pub async fn room_ticket(
        &self,
        redis: &Redis,
        product: Uuid,
        buyer: Uuid,
    ) -> redis::RedisResult<Option<(u64, u64)>> {
        let keys = SaleKeys::new(redis, product, 0);
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

    /// The stale reservations (see `stale_reservations`) of every product whose regular stock
    /// is in Redis, a page of products per round trip; forgets the products whose keys
    /// expired.
    pub async fn stale_regular_reservations(
        &self,
        redis: &Redis,
        cutoff: DateTime<Utc>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let set = redis.key("stock:regular");
        let products = self.regular_products(redis).await?;
        let (mut stale, mut candidates, mut gone) = (vec![], vec![], vec![]);
        for page in products.chunks(REGULAR_PAGE) {
            let keys: Vec<SaleKeys> = page.iter().map(|p| SaleKeys::new(redis, *p, 0)).collect();
            let mut pipe = redis::pipe();
            for bucket in &keys {
                pipe.hget(&bucket.sale, "buckets")
                    .exists(&bucket.epoch)
                    .exists(&bucket.stock);
                pending_before(&mut pipe, bucket, cutoff);
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut redis.conn()).await?;
            for ((&product, bucket), reply) in page.iter().zip(keys).zip(replies.chunks(4)) {
                let [buckets, epoch, stock, pending] = reply else {
                    continue;
                };
                let buckets: Option<u32> = redis::from_redis_value_ref(buckets)?;
                if buckets.unwrap_or(1) > 1 {
                    // Loaded in buckets (as a flash sale once): every bucket is read.
                    match self.state(redis, product).await? {
                        SaleState::Missing => gone.push(product),
                        _ => stale.extend(self.stale_reservations(redis, product, cutoff).await?),
                    }
                    continue;
                }
                let loaded: (bool, bool) = (
                    redis::from_redis_value_ref(epoch)?,
                    redis::from_redis_value_ref(stock)?,
                );
                if loaded != (true, true) {
                    self.layouts.invalidate(&product);
                    gone.push(product);
                    continue;
                }
                let orders: Vec<String> = redis::from_redis_value_ref(pending)?;
                candidates.extend(
                    orders
                        .into_iter()
                        .map(|order| (bucket.reservations.clone(), product, order)),
                );
            }
        }
        if !gone.is_empty() {
            let gone: Vec<String> = gone.iter().map(|p| p.simple().to_string()).collect();
            redis::cmd("SREM")
                .arg(&set)
                .arg(gone)
                .query_async::<()>(&mut redis.conn())
                .await?;
        }
        stale.extend(still_reserved(redis, candidates).await?);
        Ok(stale)
    }

    /// A page of the released and persisted records of each regular product holding more
    /// than a few; each product's scan goes on from where the last call left it, to the end
    /// of the hash once begun.
    pub async fn settled_regular_records(
        &self,
        redis: &Redis,
    ) -> redis::RedisResult<Vec<SettledRecord>> {
        let cursors_key = redis.key("stock:regular:scanned");
        let mut found = vec![];
        for page in self.regular_products(redis).await?.chunks(REGULAR_PAGE) {
            let keys: Vec<SaleKeys> = page.iter().map(|p| SaleKeys::new(redis, *p, 0)).collect();
            let mut pipe = redis::pipe();
            for (product, bucket) in page.iter().zip(&keys) {
                pipe.hlen(&bucket.reservations)
                    .hget(&cursors_key, product.simple().to_string());
            }
            let read: Vec<(i64, Option<u64>)> = pipe.query_async(&mut redis.conn()).await?;
            for ((&product, bucket), (size, cursor)) in page.iter().zip(&keys).zip(read) {
                let cursor = cursor.unwrap_or(0);
                if size <= SETTLED_CHECK_ABOVE && cursor == 0 {
                    continue;
                }
                let field = product.simple().to_string();
                let (next, records): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                    .arg(&bucket.reservations)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SETTLED_CHECK_PAGE)
                    .query_async(&mut redis.conn())
                    .await?;
                redis::pipe()
                    .hset(&cursors_key, &field, next)
                    .ignore()
                    .expire(&cursors_key, REGULAR_TTL_SECS)
                    .ignore()
                    .query_async::<()>(&mut redis.conn())
                    .await?;
                found.extend(records.into_iter().filter_map(|(order, record)| {
                    let (order, buyer) = record_in(&order, &record, &["x", "p"])?;
                    Some(SettledRecord {
                        product,
                        order,
                        buyer,
                        record,
                    })
                }));
            }
        }
        Ok(found)
    }

    /// Drops `records` (their orders are final in PostgreSQL and can give no units back),
    /// each only if unchanged since it was read; answers how many went.
    pub async fn forget_settled(
        &self,
        redis: &Redis,
        records: &[SettledRecord],
    ) -> redis::RedisResult<usize> {
        let mut by_product: std::collections::BTreeMap<Uuid, Vec<&SettledRecord>> =
            Default::default();
        for record in records {
            by_product.entry(record.product).or_default().push(record);
        }
        let mut dropped = 0;
        for (product, records) in by_product {
            let keys = SaleKeys::new(redis, product, 0);
            let mut invocation = self.forget.key(&keys.reservations);
            for record in records {
                invocation.arg(record.order.to_string()).arg(&record.record);
            }
            dropped += invocation.invoke_async::<usize>(&mut redis.conn()).await?;
        }
        Ok(dropped)
    }

    /// Notes that the sale was found lost (once); answers when it was first found, in ms.
    pub async fn mark_lost(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<i64> {
        let keys = SaleKeys::new(redis, product, 0);
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

    /// Opens a rebuilt sale: every bucket, bucket 0 (with the lost note) last.
    pub async fn reopen(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<()> {
        let layout = self.layout(redis, product).await?;
        for keys in layout.every(redis).iter().rev() {
            self.reopen
                .key(&keys.sale)
                .key(&keys.lost)
                .invoke_async::<i64>(&mut redis.conn())
                .await?;
        }
        Ok(())
    }

    /// Checks the sale's own books, bucket by bucket: the units in one script each (so
    /// nothing moves in a bucket while it counts; a move keeps both buckets' books balanced),
    /// then the buyers over the limit, read in pages between other clients' commands (each
    /// buyer's count is a finding on its own, whenever it is read).
    pub async fn audit(&self, redis: &Redis, product: Uuid) -> redis::RedisResult<SaleAudit> {
        let layout = self.layout(redis, product).await?;
        let mut sum = SaleAudit {
            state: SaleState::Open,
            units_off: 0,
            over_limit: 0,
        };
        for keys in layout.every(redis) {
            let (state, units_off, limit): (String, i64, i64) = self
                .audit
                .key(&keys.stock)
                .key(&keys.epoch)
                .key(&keys.sale)
                .key(&keys.reservations)
                .key(&keys.pending)
                .invoke_async(&mut redis.conn())
                .await?;
            match state.as_str() {
                "open" => sum.over_limit += buyers_over(redis, &keys.buyers, limit).await?,
                "recovering" => sum.state = SaleState::Recovering,
                _ => sum.state = SaleState::Missing,
            }
            sum.units_off += units_off;
        }
        Ok(sum)
    }

    /// Live remaining units of several products (None where not loaded), in one read of
    /// every bucket.
    pub async fn remaining(
        &self,
        redis: &Redis,
        products: &[Uuid],
    ) -> redis::RedisResult<Vec<Option<i64>>> {
        if products.is_empty() {
            return Ok(vec![]);
        }
        let layouts = futures_util::future::try_join_all(
            products.iter().map(|product| self.layout(redis, *product)),
        )
        .await?;
        let mut pipe = redis::pipe();
        for layout in &layouts {
            for keys in layout.every(redis) {
                pipe.get(keys.stock);
            }
        }
        let counters: Vec<Option<i64>> = pipe.query_async(&mut redis.conn()).await?;
        let mut counters = counters.into_iter();
        Ok(layouts
            .iter()
            .map(|layout| {
                let buckets: Vec<Option<i64>> =
                    counters.by_ref().take(layout.buckets as usize).collect();
                units_left(&buckets)
            })
            .collect())
    }

    /// Reservations of `product` older than `cutoff` that are still only reserved.
    pub async fn stale_reservations(
        &self,
        redis: &Redis,
        product: Uuid,
        cutoff: DateTime<Utc>,
    ) -> redis::RedisResult<Vec<StaleReservation>> {
        let every = self.layout(redis, product).await?.every(redis);
        let mut pipe = redis::pipe();
        for bucket in &every {
            pending_before(&mut pipe, bucket, cutoff);
        }
        let pending: Vec<Vec<String>> = pipe.query_async(&mut redis.conn()).await?;
        let candidates = every
            .into_iter()
            .zip(pending)
            .flat_map(|(bucket, orders)| {
                orders
                    .into_iter()
                    .map(move |order| (bucket.reservations.clone(), product, order))
            })
            .collect();
        still_reserved(redis, candidates).await
    }

    /// The buckets a rebuild of `product` replaces (what survived of the sale tells its
    /// bucket count; nothing did: a new layout's). The caller fences them before it reads
    /// PostgreSQL.
    pub async fn buckets_to_rebuild(
        &self,
        redis: &Redis,
        product: Uuid,
        kind: SaleKind,
    ) -> redis::RedisResult<u32> {
        Ok(self.rebuild_layout(redis, product, kind).await?.buckets)
    }

    async fn rebuild_layout(
        &self,
        redis: &Redis,
        product: Uuid,
        kind: SaleKind,
    ) -> redis::RedisResult<Layout> {
        Ok(self
            .stored_layout(redis, product)
            .await?
            .unwrap_or_else(|| self.new_layout(product, kind)))
    }

    /// Replaces the counters from PostgreSQL's truth after a Redis loss (the stock dealt out
    /// over the buckets, each live order's record back in its buyer's home bucket, with the
    /// buyer's allowance where the sale has a limit), under `epoch`, which the caller fenced
    /// PostgreSQL with before it read the numbers. A flash sale stays closed until `reopen`;
    /// regular stock opens at once (it has no buyers' allowance to forget). Buckets already
    /// at `epoch` or a later one are left alone.
    ///
    /// A flash sale's buckets that the loss spared (a Cluster node lost, not all of Redis)
    /// keep their records, buyers and orders in flight, and take their share less what those
    /// orders hold (`rebuild_kept.lua`); only the lost buckets start from nothing, with what
    /// is left to deal, and only their orders in flight commit late.
    pub async fn rebuild(
        &self,
        redis: &Redis,
        product: Uuid,
        stock: i64,
        holdings: &[Holding],
        terms: &SaleTerms,
        epoch: Uuid,
    ) -> redis::RedisResult<()> {
        let layout = self.rebuild_layout(redis, product, terms.kind).await?;
        let closed = if terms.kind == SaleKind::Flash { 1 } else { 0 };
        let epoch = epoch.to_string();
        let mut undealt = stock;
        let mut lost = vec![];
        for (bucket, share) in (0..layout.buckets).zip(layout.shares(stock)) {
            let keys = layout.bucket(redis, bucket);
            // The terms first (window, limit, price): a commit that finds the counters must
            // find the limit they are sold under, never a missing one.
            self.load_bucket(redis, &keys, None, &epoch, terms, layout.buckets)
                .await?;
            if terms.kind == SaleKind::Flash {
                let mut invocation = keys.invoke_rebuild(&self.rebuild_kept);
                invocation.arg(share).arg(undealt).arg(&epoch);
                let (outcome, taken): (String, i64) =
                    invocation.invoke_async(&mut redis.conn()).await?;
                match outcome.as_str() {
                    "kept" => undealt -= taken,
                    "lost" => lost.push(bucket),
                    _ => {}
                }
            } else {
                lost.push(bucket);
            }
        }
        let shares = deal(undealt.max(0), lost.len());
        for (bucket, share) in lost.into_iter().zip(shares) {
            let keys = layout.bucket(redis, bucket);
            let mut invocation = keys.invoke_rebuild(&self.rebuild);
            invocation
                .arg(share)
                .arg(&epoch)
                .arg(layout.buckets)
                .arg(closed);
            let rebuilt: i64 = invocation.invoke_async(&mut redis.conn()).await?;
            if rebuilt != 1 {
                continue;
            }
            let homed: Vec<&Holding> = holdings
                .iter()
                .filter(|held| layout.home(held.buyer) == bucket)
                .collect();
            for chunk in homed.chunks(REBUILD_HOLDINGS_CHUNK) {
                let mut invocation = self.rebuild_holdings.key(&keys.buyers);
                invocation
                    .key(&keys.epoch)
                    .key(&keys.reservations)
                    .arg(&epoch)
                    .arg(if terms.kind == SaleKind::Flash {
                        "1"
                    } else {
                        "0"
                    });
                for held in chunk {
                    invocation
                        .arg(held.order.to_string())
                        .arg(held.buyer.simple().to_string())
                        .arg(held.units);
                }
                invocation.invoke_async::<i64>(&mut redis.conn()).await?;
            }
        }
        self.layouts.insert(product, layout.buckets);
        self.load(redis, product, 0, terms).await.map(drop)
    }
}

/// Adds to `pipe` the read of `bucket`'s orders pending since before `cutoff` (a bounded page:
/// the next pass takes the rest).
fn pending_before(pipe: &mut redis::Pipeline, bucket: &SaleKeys, cutoff: DateTime<Utc>) {
    page_before(pipe, &bucket.pending, cutoff);
}

/// Adds to `pipe` the read of the oldest members of the sorted set `key` scored before
/// `cutoff`, a bounded page.
fn page_before(pipe: &mut redis::Pipeline, key: &str, cutoff: DateTime<Utc>) {
    pipe.cmd("ZRANGEBYSCORE")
        .arg(key)
        .arg("-inf")
        .arg(cutoff.timestamp_millis())
        .arg("LIMIT")
        .arg(0)
        .arg(1000);
}

/// Of `candidates` (reservations key, product, order), those still reserved (or fenced),
/// read in one round trip.
async fn still_reserved(
    redis: &Redis,
    candidates: Vec<(String, Uuid, String)>,
) -> redis::RedisResult<Vec<StaleReservation>> {
    // Reserved, or fenced by a reconciler pass that did not get to release it.
    records_in(redis, candidates, &["r", "f"]).await
}

/// Of `candidates` (reservations key, product, order), those whose record is in one of
/// `states`, read in one round trip.
async fn records_in(
    redis: &Redis,
    candidates: Vec<(String, Uuid, String)>,
    states: &[&str],
) -> redis::RedisResult<Vec<StaleReservation>> {
    if candidates.is_empty() {
        return Ok(vec![]);
    }
    let mut pipe = redis::pipe();
    for (reservations, _, order) in &candidates {
        pipe.hget(reservations, order);
    }
    let records: Vec<Option<String>> = pipe.query_async(&mut redis.conn()).await?;
    Ok(candidates
        .into_iter()
        .zip(records)
        .filter_map(|((_, product, order), record)| {
            let (order, buyer) = record_in(&order, &record?, states)?;
            Some(StaleReservation {
                product,
                order,
                buyer,
            })
        })
        .collect())
}

/// The order and buyer of a reservation record (`state:buyer:units`) in one of `states`.
fn record_in(order: &str, record: &str, states: &[&str]) -> Option<(Uuid, Uuid)> {
    let mut parts = record.split(':');
    let (state, buyer) = (parts.next()?, parts.next()?);
    if !states.contains(&state) {
        return None;
    }
    Some((Uuid::try_parse(order).ok()?, Uuid::try_parse(buyer).ok()?))
}

/// The orders committed before `cutoff` in `buckets` (product, keys) and still committed:
/// a page per bucket from the committed sets, then their records, two round trips in all.
async fn committed_before(
    redis: &Redis,
    buckets: &[(Uuid, SaleKeys)],
    cutoff: DateTime<Utc>,
) -> redis::RedisResult<Vec<StaleReservation>> {
    let mut pipe = redis::pipe();
    for (_, keys) in buckets {
        page_before(&mut pipe, &keys.committed, cutoff);
    }
    let orders: Vec<Vec<String>> = pipe.query_async(&mut redis.conn()).await?;
    let candidates = buckets
        .iter()
        .zip(orders)
        .flat_map(|((product, keys), orders)| {
            orders
                .into_iter()
                .map(move |order| (keys.reservations.clone(), *product, order))
        })
        .collect();
    records_in(redis, candidates, &["c"]).await
}

/// Buyers in `buyers_key` holding more than `limit` units, read a page at a time.
async fn buyers_over(redis: &Redis, buyers_key: &str, limit: i64) -> redis::RedisResult<i64> {
    const PAGE: usize = 1000;
    let mut cursor = 0_u64;
    let mut over = 0;
    loop {
        let (next, page): (u64, Vec<(String, i64)>) = redis::cmd("HSCAN")
            .arg(buyers_key)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut redis.conn())
            .await?;
        over += page.iter().filter(|(_, units)| *units > limit).count() as i64;
        if next == 0 {
            return Ok(over);
        }
        cursor = next;
    }
}
