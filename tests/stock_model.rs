//! A model test of the stock protocol: random interleavings of reserve, commit, persist
//! (written, then `committed -> persisted`), decline, the reconciler's fence and release,
//! cancel, a retry with the same key, a request giving up on a publish never confirmed, a
//! lost bucket or a whole flush, rebuild and reopen, driven through the real Lua scripts on the real Redis. PostgreSQL's
//! part (which orders are written, in which state, the on-hand count the rebuild reads and
//! the stock fence that voids a commit made before the rebuild) is modelled in memory: the
//! engine is told those numbers the same way in production. A rebuild may come while
//! orders are committed and not yet written (the race of finding 3).
//!
//! After every step it checks the promises:
//! - units sold (paid, or committed on their way to paid) never exceed the stock;
//! - no buyer holds more than the limit;
//! - no order is both paid and released (its units back on the shelf);
//! - the sale's own books balance (the auditor's check) whenever it is open;
//!
//! and at the end, after the workers and the reconciler have run to completion, that every
//! accepted order ended paid, failed or cancelled.
//!
//! `STOCK_MODEL_CASES` sets the number of cases (default 64); the test prints the cases and
//! steps it ran.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{Duration, Utc};
use flashsale::infra::redis::Redis;
use flashsale::modules::stock::{
    CommitOutcome, Holding, ReleaseOutcome, Releaser, Reservation, ReserveRequest, ReservedUnits,
    SaleKind, SaleState, SaleTerms, StaleReservation, StockScripts,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use uuid::Uuid;

const STOCK: i64 = 6;
const LIMIT: u32 = 2;
const BUYERS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    Reserve {
        buyer: usize,
        units: u32,
    },
    /// The buyer of an order retries it with the same key once the first try is surely
    /// over (its reply was lost): it takes over a held reservation (or one a rebuild
    /// forgot), replays a committed one, and reserves afresh only once the first try's
    /// units were released.
    Retry(usize),
    /// The request that reserved gives up: its publish was never confirmed, but the message
    /// may have reached the queue (a late confirm), so a worker may commit it before or after.
    GiveUp(usize),
    /// The worker's first step: reserved -> committed.
    Commit(usize),
    /// The worker's last step for a committed order: written paid.
    Persist(usize),
    /// The gateway declined a committed order: written failed, units back.
    Decline(usize),
    /// The reconciler finds the order stale and fences it...
    Fence(usize),
    /// ...then reads PostgreSQL and releases what it fenced.
    ReconcileRelease(usize),
    Cancel(usize),
    /// Redis loses one bucket of the sale (a Cluster node), or all of it.
    Lose {
        bucket: Option<u32>,
    },
    Rebuild,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let order = 0..64usize;
    prop_oneof![
        4 => (0..BUYERS, 1..=2u32).prop_map(|(buyer, units)| Step::Reserve { buyer, units }),
        1 => order.clone().prop_map(Step::Retry),
        1 => order.clone().prop_map(Step::GiveUp),
        3 => order.clone().prop_map(Step::Commit),
        3 => order.clone().prop_map(Step::Persist),
        1 => order.clone().prop_map(Step::Decline),
        2 => order.clone().prop_map(Step::Fence),
        2 => order.clone().prop_map(Step::ReconcileRelease),
        1 => order.clone().prop_map(Step::Cancel),
        1 => prop::option::of(0..3u32).prop_map(|bucket| Step::Lose { bucket }),
        1 => Just(Step::Rebuild),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    Paid,
    Failed,
    Cancelled,
}

#[derive(Debug)]
struct Order {
    id: Uuid,
    buyer: Uuid,
    units: u32,
    /// Its Idempotency-Key's digest.
    key: String,
    /// The worker committed it and holds it, not yet written.
    committed: bool,
    /// The epoch its commit answered (for the fence check when it is written).
    committed_under: Uuid,
    /// The reconciler fenced it and has not yet released it.
    fenced: bool,
    /// Its units are back on the shelf.
    released: bool,
}

/// One case: the engine, one sale, and PostgreSQL's part in memory.
struct Model<'a> {
    engine: StockScripts,
    redis: &'a Redis,
    app: &'a common::TestApp,
    product: Uuid,
    buckets: u32,
    terms: SaleTerms,
    buyers: Vec<Uuid>,
    orders: Vec<Order>,
    written: BTreeMap<Uuid, Final>,
    /// The newest rebuild's epoch, as written into the shards' stock fences.
    fence: Uuid,
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

impl<'a> Model<'a> {
    async fn new(app: &'a common::TestApp, buckets: u32) -> Model<'a> {
        let now = Utc::now();
        let model = Model {
            engine: StockScripts::new(buckets),
            redis: &app.state.redis,
            app,
            product: Uuid::now_v7(),
            buckets,
            terms: SaleTerms {
                kind: SaleKind::Flash,
                start: now - Duration::hours(1),
                end: now + Duration::hours(1),
                per_user_limit: LIMIT,
                price: "1.00".into(),
            },
            buyers: (0..BUYERS).map(|_| Uuid::now_v7()).collect(),
            orders: vec![],
            written: BTreeMap::new(),
            fence: Uuid::nil(),
        };
        model
            .engine
            .load(model.redis, model.product, STOCK as i32, &model.terms)
            .await
            .expect("load the sale");
        model
    }

    fn pick(&self, index: usize) -> Option<usize> {
        (!self.orders.is_empty()).then(|| index % self.orders.len())
    }

    fn reserved_units(&self, i: usize) -> ReservedUnits {
        let order = &self.orders[i];
        ReservedUnits {
            order: order.id,
            product: self.product,
            buyer: order.buyer,
            units: order.units,
        }
    }

    /// Writes an order's final row unless one exists (ON CONFLICT DO NOTHING).
    fn write(&mut self, i: usize, status: Final) -> bool {
        let id = self.orders[i].id;
        if self.written.contains_key(&id) {
            return false;
        }
        self.written.insert(id, status);
        true
    }

    async fn release(&mut self, i: usize, by: Releaser) -> Result<(), TestCaseError> {
        let order = &self.orders[i];
        let outcome = self
            .engine
            .release(self.redis, self.product, order.buyer, order.id, by)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if outcome == ReleaseOutcome::Released {
            self.orders[i].released = true;
        }
        Ok(())
    }

    /// Reserves as the flash-sale route does; a new reservation becomes an order of the
    /// model. `in_flight_secs` 0: any earlier try with the key is over.
    async fn reserve(
        &mut self,
        buyer: Uuid,
        units: u32,
        key: String,
        in_flight_secs: u64,
    ) -> Result<Reservation, TestCaseError> {
        let id = Uuid::now_v7();
        let reserved = self
            .engine
            .reserve(
                self.redis,
                &ReserveRequest {
                    product: self.product,
                    user: buyer,
                    quantity: units,
                    order_id: id,
                    body_hash: "h",
                    key_digest: &key,
                    in_flight_secs,
                    key_ttl_secs: 60,
                    attempts_per_minute: 1_000_000,
                    verify_window_ms: 0,
                },
            )
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Reservation::Reserved { .. } = reserved {
            self.orders.push(Order {
                id,
                buyer,
                units,
                key,
                committed: false,
                committed_under: Uuid::nil(),
                fenced: false,
                released: false,
            });
        }
        Ok(reserved)
    }

    /// Whether Redis holds a marker for the buyer's key.
    async fn marked(&self, buyer: Uuid, key: &str) -> bool {
        let marker = self
            .engine
            .idempotency_key(self.redis, self.product, buyer, key)
            .await
            .expect("the key's name");
        redis::cmd("EXISTS")
            .arg(marker)
            .query_async(&mut self.redis.conn())
            .await
            .expect("read the marker")
    }

    async fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let fail = |e: redis::RedisError| TestCaseError::fail(e.to_string());
        match *step {
            Step::Reserve { buyer, units } => {
                let key = Uuid::now_v7().simple().to_string();
                self.reserve(self.buyers[buyer], units, key, 60).await?;
            }
            Step::Retry(index) => {
                let Some(picked) = self.pick(index) else {
                    return Ok(());
                };
                // The key's marker names the newest order made under it.
                let key = &self.orders[picked].key;
                let Some(i) = self.orders.iter().rposition(|o| &o.key == key) else {
                    return Ok(());
                };
                let (buyer, units, key) = {
                    let first = &self.orders[i];
                    (first.buyer, first.units, first.key.clone())
                };
                let first_try = self.orders[i].id;
                // Once a loss took the key's marker, PostgreSQL answers for the key (the
                // durable idempotency tests); while Redis keeps it, the script must.
                let marked = self.marked(buyer, &key).await;
                match self.reserve(buyer, units, key, 0).await? {
                    // Held, or its record gone with a rebuild: the key keeps naming one order,
                    // which takes its units at commit.
                    Reservation::Resumed { order, .. } => {
                        check(order == first_try.to_string(), || {
                            format!("a retry resumed {order}, not {first_try}")
                        })?;
                    }
                    Reservation::Reserved { .. } => {
                        let first = &self.orders[i];
                        check(first.released || !marked, || {
                            format!("a retry reserved again while {first:?} holds its units")
                        })?;
                    }
                    _ => {}
                }
            }
            Step::GiveUp(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                // Released, the order fails when its message reaches a worker; kept (a
                // worker committed it), it goes on.
                self.release(i, Releaser::Unaccepted).await?;
            }
            Step::Commit(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                if self.orders[i].committed || self.written.contains_key(&self.orders[i].id) {
                    return Ok(());
                }
                let units = self.reserved_units(i);
                let outcome = self
                    .engine
                    .commit(self.redis, self.product, &[&units])
                    .await
                    .map_err(fail)?[0];
                match outcome {
                    CommitOutcome::Committed(under) => {
                        self.orders[i].committed = true;
                        self.orders[i].committed_under = under.epoch;
                        // A late commit (Redis lost the released record) took its units
                        // off the shelf again.
                        self.orders[i].released = false;
                    }
                    CommitOutcome::Released | CommitOutcome::SoldOut | CommitOutcome::OverLimit => {
                        self.write(i, Final::Failed);
                        self.release(i, Releaser::Owner).await?;
                    }
                    // Deferred: the message comes back after the rebuild.
                    CommitOutcome::NotLoaded => {}
                }
            }
            Step::Persist(index) | Step::Decline(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                if !self.orders[i].committed {
                    return Ok(());
                }
                self.orders[i].committed = false;
                if matches!(step, Step::Persist(_)) && self.voided(i) {
                    // A rebuild since counted its units back on the shelf: the write is
                    // refused, and the message comes back to commit again (a late commit).
                    return Ok(());
                }
                if matches!(step, Step::Persist(_)) {
                    // Written before (cancelled meanwhile): the charge is refunded, and the
                    // cancel released the units.
                    self.write(i, Final::Paid);
                } else if self.write(i, Final::Failed) {
                    self.release(i, Releaser::Owner).await?;
                }
                // committed -> persisted, once its row is written.
                let units = self.reserved_units(i);
                self.engine
                    .persist(self.redis, self.product, &[&units])
                    .await
                    .map_err(fail)?;
            }
            Step::Fence(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                let order = &self.orders[i];
                let stale = StaleReservation {
                    product: self.product,
                    order: order.id,
                    buyer: order.buyer,
                };
                let fenced = self
                    .engine
                    .fence(self.redis, vec![stale])
                    .await
                    .map_err(fail)?;
                self.orders[i].fenced = !fenced.is_empty();
            }
            Step::ReconcileRelease(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                if !self.orders[i].fenced {
                    return Ok(());
                }
                self.orders[i].fenced = false;
                let persisted = self.written.contains_key(&self.orders[i].id);
                let was_released = self.orders[i].released;
                self.release(i, Releaser::Reconciler).await?;
                if !persisted && self.orders[i].released && !was_released {
                    self.write(i, Final::Failed);
                }
            }
            Step::Cancel(index) => {
                let Some(i) = self.pick(index) else {
                    return Ok(());
                };
                let id = self.orders[i].id;
                match self.written.get(&id) {
                    None => {
                        self.written.insert(id, Final::Cancelled);
                    }
                    Some(Final::Paid) => {
                        self.written.insert(id, Final::Cancelled);
                    }
                    Some(Final::Cancelled) => {}
                    Some(Final::Failed) => return Ok(()),
                }
                self.release(i, Releaser::Owner).await?;
            }
            Step::Lose { bucket } => self.lose(bucket).await,
            Step::Rebuild => {
                // The reconciler rebuilds a sale found lost, whatever is in flight: it fences
                // the shards with its epoch first, then reads them.
                let lost = self
                    .engine
                    .state(self.redis, self.product)
                    .await
                    .map_err(fail)?
                    == SaleState::Missing;
                if lost {
                    let epoch = flashsale::modules::stock::new_epoch();
                    self.fence = epoch;
                    let on_hand = STOCK - self.units_where(|s| s == Final::Paid);
                    let holdings: Vec<Holding> = self
                        .orders
                        .iter()
                        .filter(|order| self.written.get(&order.id) == Some(&Final::Paid))
                        .map(|order| Holding {
                            order: order.id,
                            buyer: order.buyer,
                            units: order.units,
                        })
                        .collect();
                    self.engine
                        .rebuild(
                            self.redis,
                            self.product,
                            on_hand,
                            &holdings,
                            &self.terms,
                            epoch,
                        )
                        .await
                        .map_err(fail)?;
                    // Reservations the loss took are gone with it: their orders fail at
                    // commit (a late commit finds the units or not).
                }
            }
            Step::Reopen => {
                if self
                    .engine
                    .state(self.redis, self.product)
                    .await
                    .map_err(fail)?
                    == SaleState::Recovering
                {
                    self.engine
                        .reopen(self.redis, self.product)
                        .await
                        .map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    async fn lose(&mut self, bucket: Option<u32>) {
        let buckets = self.app.sale_buckets(self.product);
        let lost: Vec<&String> = match bucket {
            Some(b) => buckets
                .iter()
                .skip((b % self.buckets) as usize)
                .take(1)
                .collect(),
            None => buckets.iter().collect(),
        };
        for prefix in lost {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut self.redis.conn())
                .await
                .expect("list keys");
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut self.redis.conn())
                    .await
                    .expect("delete keys");
            }
        }
    }

    /// Whether a rebuild fenced the shards since the order's commit: it cannot be written.
    fn voided(&self, i: usize) -> bool {
        self.orders[i].committed_under < self.fence
    }

    fn units_where(&self, status: impl Fn(Final) -> bool) -> i64 {
        self.orders
            .iter()
            .filter(|o| self.written.get(&o.id).is_some_and(|s| status(*s)))
            .map(|o| i64::from(o.units))
            .sum()
    }

    async fn check_promises(&self, trail: &[Step]) -> Result<(), TestCaseError> {
        // A commit a rebuild voided will never be written paid: not selling.
        let sold_or_selling = |o: &Order| {
            o.committed && o.committed_under >= self.fence && !self.written.contains_key(&o.id)
                || self.written.get(&o.id) == Some(&Final::Paid)
        };
        let sold: i64 = self
            .orders
            .iter()
            .filter(|o| sold_or_selling(o))
            .map(|o| i64::from(o.units))
            .sum();
        check(sold <= STOCK, || {
            format!("oversold: {sold} of {STOCK} after {trail:?}")
        })?;
        let mut per_buyer: BTreeMap<Uuid, u32> = BTreeMap::new();
        for order in self.orders.iter().filter(|o| sold_or_selling(o)) {
            *per_buyer.entry(order.buyer).or_default() += order.units;
        }
        check(per_buyer.values().all(|units| *units <= LIMIT), || {
            format!("a buyer over the limit {per_buyer:?} after {trail:?}")
        })?;
        for order in &self.orders {
            let paid = self.written.get(&order.id) == Some(&Final::Paid);
            check(!(paid && order.released), || {
                format!("order {} paid and released after {trail:?}", order.id)
            })?;
        }
        let audit = self
            .engine
            .audit(self.redis, self.product)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if audit.state == SaleState::Open {
            check(audit.units_off == 0 && audit.over_limit == 0, || {
                format!("the sale's books are off: {audit:?} after {trail:?}")
            })?;
        }
        Ok(())
    }

    /// The workers and the reconciler run until nothing is left in flight.
    async fn drain(&mut self, trail: &mut Vec<Step>) -> Result<(), TestCaseError> {
        for round in 0..4 {
            for step in [Step::Rebuild, Step::Reopen] {
                self.run(&step).await?;
                trail.push(step);
            }
            for i in 0..self.orders.len() {
                let steps = if round < 2 {
                    vec![Step::Commit(i), Step::Persist(i)]
                } else {
                    vec![
                        Step::Fence(i),
                        Step::ReconcileRelease(i),
                        Step::Commit(i),
                        Step::Persist(i),
                    ]
                };
                for step in steps {
                    self.run(&step).await?;
                    trail.push(step);
                    self.check_promises(trail).await?;
                }
            }
        }
        for order in &self.orders {
            check(self.written.contains_key(&order.id), || {
                format!("order {} never ended after {trail:?}", order.id)
            })?;
        }
        Ok(())
    }
}

#[test]
fn the_stock_protocol_keeps_its_promises_under_random_interleavings_and_losses() {
    let cases: u32 = std::env::var("STOCK_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = runtime.block_on(common::TestApp::spawn());
    let steps_run = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![Just(1u32), Just(3u32)],
        prop::collection::vec(step(), 1..60),
    );
    let result = runner.run(&strategy, |(buckets, steps)| {
        runtime.block_on(async {
            let mut model = Model::new(&app, buckets).await;
            let mut trail = vec![];
            for step in steps {
                model.run(&step).await?;
                trail.push(step);
                model.check_promises(&trail).await?;
            }
            model.drain(&mut trail).await?;
            steps_run.fetch_add(trail.len(), Ordering::Relaxed);
            Ok(())
        })
    });
    println!(
        "stock model: {cases} cases, {} steps",
        steps_run.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
