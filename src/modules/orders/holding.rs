//! Which order-workers hold deliveries: in a batch, or prefetched and not yet taken. The
//! broker's queue depth counts only ready messages, so a rebuilt sale would reopen while a
//! worker still held orders in flight at the loss, whose late commits then found their units
//! sold to newer buyers. Each worker marks itself here (one hash field, with a lease) while it
//! holds any, and clears the mark once its consumer has nothing buffered; the reconciler
//! reopens a sale only when no mark is live and no message waits.

use uuid::Uuid;

use crate::infra::redis::Redis;

/// One worker's mark.
pub struct Holding {
    key: String,
    worker: String,
    /// A worker that dies keeps its mark this long: as long as a rebuilt sale waits anyway.
    lease_ms: i64,
    marked: bool,
}

fn key(redis: &Redis) -> String {
    redis.key("orders:holding")
}

impl Holding {
    pub fn new(redis: &Redis, lease_secs: i64) -> Self {
        Self {
            key: key(redis),
            worker: Uuid::now_v7().simple().to_string(),
            lease_ms: lease_secs.saturating_mul(1000),
            marked: false,
        }
    }

    /// Marks (or renews) this worker as holding deliveries.
    pub async fn hold(&mut self, redis: &Redis) {
        let until = chrono::Utc::now().timestamp_millis() + self.lease_ms;
        let marked: redis::RedisResult<()> = redis::cmd("HSET")
            .arg(&self.key)
            .arg(&self.worker)
            .arg(until)
            .query_async(&mut redis.conn())
            .await;
        match marked {
            Ok(()) => self.marked = true,
            // A rebuilt sale then waits out its patience instead.
            Err(e) => tracing::warn!(error = %e, "marking the deliveries this worker holds"),
        }
    }

    /// Clears the mark: the worker holds nothing.
    pub async fn release(&mut self, redis: &Redis) {
        if !self.marked {
            return;
        }
        let cleared: redis::RedisResult<()> = redis::cmd("HDEL")
            .arg(&self.key)
            .arg(&self.worker)
            .query_async(&mut redis.conn())
            .await;
        match cleared {
            Ok(()) => self.marked = false,
            Err(e) => tracing::warn!(error = %e, "clearing this worker's holding mark"),
        }
    }
}

/// Whether any worker's mark is live; marks of workers long gone are dropped.
pub async fn any_held(redis: &Redis) -> redis::RedisResult<bool> {
    let key = key(redis);
    let marks: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut redis.conn())
        .await?;
    let now = chrono::Utc::now().timestamp_millis();
    let (live, expired): (Vec<_>, Vec<_>) = marks.into_iter().partition(|(_, until)| *until > now);
    if !expired.is_empty() {
        let mut forget = redis::cmd("HDEL");
        forget.arg(&key);
        for (worker, _) in expired {
            forget.arg(worker);
        }
        forget.query_async::<()>(&mut redis.conn()).await?;
    }
    Ok(!live.is_empty())
}
