//! Notification providers. The real ones (an email API, an SMS gateway, a push service) are
//! outside this system; `Simulator` stands in for each behind the `Provider` trait, with the
//! latency, failures and rate limit a real provider has.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use uuid::Uuid;

use super::model::{Channel, Notification};
use crate::config::ProviderSettings;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// Worth trying again (timeouts, 5xx, throttling).
    #[error("transient provider failure: {0}")]
    Transient(String),
    /// Trying again cannot help (bad address, unsubscribed).
    #[error("permanent provider failure: {0}")]
    Permanent(String),
}

impl SendError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SendError::Transient(_))
    }
}

pub trait Provider: Send + Sync {
    /// Sends one notification. `notification.id` is passed as the provider's idempotency
    /// key, so a send repeated after a crash is not delivered twice.
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Result<(), SendError>>;
}

/// A delivery the simulator made, for tests and drills.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub id: Uuid,
    pub channel: Channel,
    pub at: Instant,
}

/// Deliveries kept for inspection; older ones are dropped so a long run stays bounded.
const LOG_CAPACITY: usize = 100_000;

pub struct Simulator {
    channel: Channel,
    settings: ProviderSettings,
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
    /// Senders queue here for the limiter one at a time: a batch of sends all polling it
    /// would each arm a timer per permit handed out, a herd of wake-ups per send.
    turn: tokio::sync::Mutex<()>,
    /// Ids already delivered (the provider-side idempotency window).
    delivered: moka::sync::Cache<Uuid, ()>,
    /// Failed attempts per id, for `fail_first_attempts`.
    attempts: moka::sync::Cache<Uuid, u32>,
    log: Arc<Mutex<VecDeque<Delivery>>>,
    failures: Arc<AtomicU64>,
    delivered_count: Arc<AtomicU64>,
}

impl Simulator {
    fn new(channel: Channel, settings: &ProviderSettings, shared: &Providers) -> Self {
        let per_second = NonZeroU32::new(settings.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
        let idempotency_window = || {
            moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build()
        };
        Self {
            channel,
            settings: settings.clone(),
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            clock: DefaultClock::default(),
            turn: tokio::sync::Mutex::new(()),
            delivered: idempotency_window(),
            attempts: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            log: shared.log.clone(),
            failures: shared.failures.clone(),
            delivered_count: shared.delivered.clone(),
        }
    }

    fn failure(&self, id: Uuid) -> Option<SendError> {
        let mut rng = rand::rng();
        if rng.random::<f64>() < self.settings.permanent_failure_rate {
            return Some(SendError::Permanent("recipient rejected".into()));
        }
        if self.settings.fail_first_attempts > 0 {
            let failed = self.attempts.get(&id).unwrap_or(0);
            if failed < self.settings.fail_first_attempts {
                self.attempts.insert(id, failed + 1);
                return Some(SendError::Transient("provider timed out".into()));
            }
        }
        if rng.random::<f64>() < self.settings.failure_rate {
            return Some(SendError::Transient("provider answered 503".into()));
        }
        None
    }
}

impl Provider for Simulator {
    fn send<'a>(&'a self, notification: &'a Notification) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.deliver(notification))
    }
}

impl Simulator {
    async fn deliver(&self, notification: &Notification) -> Result<(), SendError> {
        // The provider's own limit: a real one answers 429 above it, so wait our turn.
        if self.limiter.check().is_err() {
            let _turn = self.turn.lock().await;
            // On the runtime's own timer: governor's `until_ready` sleeps on a timer thread
            // of its own, a thread crossing per permit.
            while let Err(not_until) = self.limiter.check() {
                tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
            }
        }
        if self.settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
        }
        if let Some(failure) = self.failure(notification.id) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(failure);
        }
        if self.delivered.contains_key(&notification.id) {
            return Ok(());
        }
        self.delivered.insert(notification.id, ());
        self.delivered_count.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(Delivery {
            id: notification.id,
            channel: self.channel,
            at: Instant::now(),
        });
        Ok(())
    }
}

/// One provider per channel, and the shared log of simulated deliveries.
pub struct Providers {
    by_channel: Vec<Arc<dyn Provider>>,
    log: Arc<Mutex<VecDeque<Delivery>>>,
    failures: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
}

impl Providers {
    pub fn simulated(settings: &crate::config::ProvidersSettings) -> Self {
        let mut providers = Self {
            by_channel: vec![],
            log: Arc::new(Mutex::new(VecDeque::new())),
            failures: Arc::new(AtomicU64::new(0)),
            delivered: Arc::new(AtomicU64::new(0)),
        };
        for (channel, s) in
            Channel::ALL
                .into_iter()
                .zip([&settings.email, &settings.sms, &settings.push])
        {
            let simulator = Simulator::new(channel, s, &providers);
            providers.by_channel.push(Arc::new(simulator));
        }
        providers
    }

    /// Notifications delivered (each id once).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Attempts the providers failed (transiently or for good).
    pub fn failed_attempts(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn for_channel(&self, channel: Channel) -> &dyn Provider {
        let index = Channel::ALL
            .iter()
            .position(|c| *c == channel)
            .unwrap_or_default();
        self.by_channel[index].as_ref()
    }

    /// Every simulated delivery so far (oldest first, bounded).
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}
