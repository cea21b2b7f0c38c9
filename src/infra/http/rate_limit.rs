//! Per-IP limits for unauthenticated routes (login, register), in process with governor.
//! Per-user limits must hold across pods, so they live in Redis (see the auth extractor).

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::Problem;

pub struct IpRateLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl IpRateLimiter {
    pub fn per_minute(limit: NonZeroU32) -> Self {
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(limit)),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one cell for `ip`, or answers 429 with the wait until the next cell.
    pub fn check(&self, ip: IpAddr) -> Result<(), Problem> {
        self.limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Problem::rate_limited(wait.as_secs().saturating_add(1))
        })
    }

    /// Forgets addresses whose buckets are full again, so memory stays bounded.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
