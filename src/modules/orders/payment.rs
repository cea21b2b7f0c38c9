//! The payment gateway: a trait, the simulator that stands in for the external provider,
//! and the circuit breaker every charge goes through.
//!
//! The simulator approves `card`, declines `card_declined`, and fails `card_flaky`
//! transiently on its first two attempts. Charges are idempotent by order id (recorded in
//! Redis, as a real gateway's idempotency keys would be), so a redelivered order is never
//! charged twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use failsafe::{backoff, failure_policy, Config, StateMachine};
use rand::Rng;
use uuid::Uuid;

use super::model::Order;
use crate::config::PaymentSettings;
use crate::infra::redis::Redis;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeOutcome {
    Approved,
    Declined,
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("payment gateway unavailable: {0}")]
    Transient(String),
    #[error("payment circuit open")]
    CircuitOpen,
}

/// One order to charge, and how many times it was tried before.
pub struct Charge<'a> {
    pub order: &'a Order,
    pub attempt: u32,
}

/// Each charge's outcome, in the order they were asked.
pub type ChargeResults = Vec<Result<ChargeOutcome, PaymentError>>;

pub trait PaymentGateway: Send + Sync {
    /// Charges each order's total once per order id (a repeat answers the first outcome),
    /// all in one round trip; `Err` when the gateway answered none of them.
    fn charge_batch<'a>(
        &'a self,
        charges: &'a [Charge<'a>],
    ) -> BoxFuture<'a, Result<ChargeResults, PaymentError>>;
    /// Refunds a charged order once; an order never charged is left alone.
    fn refund(&self, order: Uuid) -> BoxFuture<'_, Result<(), PaymentError>>;
}

pub struct PaymentSimulator {
    redis: Redis,
    latency: Duration,
    failure_rate_bits: AtomicU64,
    attempts: AtomicU64,
}

/// Attempts of `card_flaky` that fail before one succeeds.
const FLAKY_FAILURES: u32 = 2;

impl PaymentSimulator {
    pub fn new(redis: Redis, settings: &PaymentSettings) -> Self {
        Self {
            redis,
            latency: Duration::from_millis(settings.latency_ms),
            failure_rate_bits: AtomicU64::new(settings.failure_rate.to_bits()),
            attempts: AtomicU64::new(0),
        }
    }

    /// Changes the share of transient failures at run time (fault drills, tests).
    pub fn set_failure_rate(&self, rate: f64) {
        self.failure_rate_bits
            .store(rate.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Charges attempted since start (fault drills watch this to time a recovery).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    fn failure_rate(&self) -> f64 {
        f64::from_bits(self.failure_rate_bits.load(Ordering::Relaxed))
    }

    // The simulator stands in for an external gateway: its records share one hash tag, so on
    // a Redis Cluster they live on one node, apart from the nodes a fault test takes down.
    fn charge_key(&self, order: Uuid) -> String {
        self.redis.key(format_args!("{{paysim}}:charge:{order}"))
    }

    /// Whether this attempt fails before reaching the (simulated) bank.
    fn fails_transiently(&self, charge: &Charge<'_>) -> bool {
        let flaky = charge.order.payment_method == "card_flaky" && charge.attempt < FLAKY_FAILURES;
        flaky || rand::rng().random_bool(self.failure_rate())
    }
}

/// How long the simulator remembers a charge or a refund.
const RECORD_SECS: u64 = 7 * 86_400;

fn transient(e: redis::RedisError) -> PaymentError {
    PaymentError::Transient(e.to_string())
}

impl PaymentGateway for PaymentSimulator {
    fn charge_batch<'a>(
        &'a self,
        charges: &'a [Charge<'a>],
    ) -> BoxFuture<'a, Result<ChargeResults, PaymentError>> {
        Box::pin(async move {
            self.attempts
                .fetch_add(charges.len() as u64, Ordering::Relaxed);
            let reaching: Vec<bool> = charges.iter().map(|c| !self.fails_transiently(c)).collect();
            // SET ... NX GET: the earlier outcome when there was one, else ours was stored.
            let mut pipe = redis::pipe();
            for (charge, _) in charges
                .iter()
                .zip(&reaching)
                .filter(|(_, reaches)| **reaches)
            {
                let outcome = if charge.order.payment_method == "card_declined" {
                    "declined"
                } else {
                    "approved"
                };
                pipe.cmd("SET")
                    .arg(self.charge_key(charge.order.id))
                    .arg(outcome)
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(RECORD_SECS);
            }
            let earlier: Vec<Option<String>> = pipe
                .query_async(&mut self.redis.conn())
                .await
                .map_err(transient)?;
            // The bank has the charge before the answer travels back: a caller that times
            // out meanwhile leaves a charge standing, as a real gateway can.
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let mut earlier = earlier.into_iter();
            let outcomes = charges
                .iter()
                .zip(reaching)
                .map(|(charge, reaches)| {
                    if !reaches {
                        return Err(PaymentError::Transient("simulated gateway failure".into()));
                    }
                    let declined = match earlier.next().flatten() {
                        Some(first) => first == "declined",
                        None => charge.order.payment_method == "card_declined",
                    };
                    Ok(if declined {
                        ChargeOutcome::Declined
                    } else {
                        ChargeOutcome::Approved
                    })
                })
                .collect();
            Ok(outcomes)
        })
    }

    fn refund(&self, order: Uuid) -> BoxFuture<'_, Result<(), PaymentError>> {
        let refund_key = self.redis.key(format_args!("{{paysim}}:refund:{order}"));
        Box::pin(async move {
            if rand::rng().random_bool(self.failure_rate()) {
                return Err(PaymentError::Transient("simulated gateway failure".into()));
            }
            let charged: Option<String> = redis::cmd("GET")
                .arg(self.charge_key(order))
                .query_async(&mut self.redis.conn())
                .await
                .map_err(transient)?;
            if charged.as_deref() != Some("approved") {
                return Ok(());
            }
            redis::cmd("SET")
                .arg(refund_key)
                .arg("refunded")
                .arg("NX")
                .arg("EX")
                .arg(RECORD_SECS)
                .query_async::<()>(&mut self.redis.conn())
                .await
                .map_err(transient)
        })
    }
}

/// `payment_circuit_state` values.
const CIRCUIT_CLOSED: f64 = 0.0;
const CIRCUIT_HALF_OPEN: f64 = 1.0;
const CIRCUIT_OPEN: f64 = 2.0;

/// Counts and logs the breaker's state changes (they are rare and worth a log line).
#[derive(Clone, Default)]
pub struct BreakerEvents {
    opened: std::sync::Arc<AtomicU64>,
}

impl failsafe::Instrument for BreakerEvents {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("payment_circuit_opened_total").increment(1);
        metrics::gauge!("payment_circuit_state").set(CIRCUIT_OPEN);
        tracing::warn!("payment circuit opened: charges fail fast until it half-opens");
    }

    fn on_half_open(&self) {
        metrics::gauge!("payment_circuit_state").set(CIRCUIT_HALF_OPEN);
        tracing::info!("payment circuit half-open: probing the gateway");
    }

    fn on_closed(&self) {
        metrics::gauge!("payment_circuit_state").set(CIRCUIT_CLOSED);
        tracing::info!("payment circuit closed");
    }
}

type Breaker = StateMachine<failure_policy::ConsecutiveFailures<backoff::Constant>, BreakerEvents>;

/// The gateway behind a circuit breaker: after `breaker_failures` consecutive transient
/// failures, charges fail fast for `breaker_open_ms` instead of piling onto a sick gateway.
pub struct Payments {
    gateway: std::sync::Arc<dyn PaymentGateway>,
    breaker: Breaker,
    events: BreakerEvents,
    /// A gateway call not answered within this long counts as a transient failure.
    timeout: Duration,
}

impl Payments {
    pub fn new(gateway: std::sync::Arc<dyn PaymentGateway>, settings: &PaymentSettings) -> Self {
        let policy = failure_policy::consecutive_failures(
            settings.breaker_failures,
            backoff::constant(Duration::from_millis(settings.breaker_open_ms)),
        );
        let events = BreakerEvents::default();
        metrics::gauge!("payment_circuit_state").set(CIRCUIT_CLOSED);
        Self {
            gateway,
            breaker: Config::new()
                .failure_policy(policy)
                .instrument(events.clone())
                .build(),
            events,
            timeout: Duration::from_millis(settings.timeout_ms),
        }
    }

    /// Charges a batch through the breaker: while it is open every charge fails fast;
    /// each answer counts towards opening or closing it.
    pub async fn charge_batch(&self, charges: &[Charge<'_>]) -> ChargeResults {
        if charges.is_empty() {
            return vec![];
        }
        if !self.breaker.is_call_permitted() {
            return charges
                .iter()
                .map(|_| Err(PaymentError::CircuitOpen))
                .collect();
        }
        let answered = tokio::time::timeout(self.timeout, self.gateway.charge_batch(charges))
            .await
            .unwrap_or_else(|_| Err(PaymentError::Transient("no answer in time".into())));
        let results = match answered {
            Ok(results) => results,
            Err(e) => charges
                .iter()
                .map(|_| Err(PaymentError::Transient(e.to_string())))
                .collect(),
        };
        for result in &results {
            match result {
                Ok(_) => self.breaker.on_success(),
                Err(_) => self.breaker.on_error(),
            }
        }
        results
    }

    pub async fn refund(&self, order: Uuid) -> Result<(), PaymentError> {
        tokio::time::timeout(self.timeout, self.gateway.refund(order))
            .await
            .unwrap_or_else(|_| Err(PaymentError::Transient("no answer in time".into())))
    }

    pub fn circuit_open(&self) -> bool {
        !self.breaker.is_call_permitted()
    }

    /// How many times the circuit has opened since start.
    pub fn times_opened(&self) -> u64 {
        self.events.opened.load(Ordering::Relaxed)
    }
}
