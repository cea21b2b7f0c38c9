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

use failsafe::futures::CircuitBreaker as _;
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

pub trait PaymentGateway: Send + Sync {
    /// Charges the order's total once per order id; a repeat answers the first outcome.
    fn charge<'a>(
        &'a self,
        order: &'a Order,
        attempt: u32,
    ) -> BoxFuture<'a, Result<ChargeOutcome, PaymentError>>;
    /// Refunds a charged order once.
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

    async fn record_once(
        &self,
        kind: &str,
        order: Uuid,
        value: &str,
    ) -> Result<String, PaymentError> {
        let key = self.redis.key(format_args!("paysim:{kind}:{order}"));
        let transient = |e: redis::RedisError| PaymentError::Transient(e.to_string());
        // SET ... NX GET: the earlier value when there was one, else ours was stored.
        let earlier: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(7 * 86_400)
            .query_async(&mut self.redis.conn())
            .await
            .map_err(transient)?;
        Ok(earlier.unwrap_or_else(|| value.to_owned()))
    }
}

impl PaymentGateway for PaymentSimulator {
    fn charge<'a>(
        &'a self,
        order: &'a Order,
        attempt: u32,
    ) -> BoxFuture<'a, Result<ChargeOutcome, PaymentError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let flaky = order.payment_method == "card_flaky" && attempt < FLAKY_FAILURES;
            if flaky || rand::rng().random_bool(self.failure_rate()) {
                return Err(PaymentError::Transient("simulated gateway failure".into()));
            }
            let outcome = if order.payment_method == "card_declined" {
                "declined"
            } else {
                "approved"
            };
            let recorded = self.record_once("charge", order.id, outcome).await?;
            Ok(if recorded == "declined" {
                ChargeOutcome::Declined
            } else {
                ChargeOutcome::Approved
            })
        })
    }

    fn refund(&self, order: Uuid) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move {
            self.record_once("refund", order, "refunded")
                .await
                .map(drop)
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
        }
    }

    pub async fn charge(&self, order: &Order, attempt: u32) -> Result<ChargeOutcome, PaymentError> {
        self.breaker
            .call(self.gateway.charge(order, attempt))
            .await
            .map_err(|e| match e {
                failsafe::Error::Inner(e) => e,
                failsafe::Error::Rejected => PaymentError::CircuitOpen,
            })
    }

    pub async fn refund(&self, order: Uuid) -> Result<(), PaymentError> {
        self.gateway.refund(order).await
    }

    pub fn circuit_open(&self) -> bool {
        !self.breaker.is_call_permitted()
    }

    /// How many times the circuit has opened since start.
    pub fn times_opened(&self) -> u64 {
        self.events.opened.load(Ordering::Relaxed)
    }
}
