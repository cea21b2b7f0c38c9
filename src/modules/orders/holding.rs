//! Which order-workers hold deliveries: in a batch, or prefetched and not yet taken. The
//! broker's queue depth counts only ready messages, so a rebuilt sale would reopen while a
//! worker still held orders in flight at the loss, whose late commits then found their units
//! sold to newer buyers. Each worker marks itself here (one hash field, with a lease) while it
//! holds any (renewed while it does, so a dead worker's mark lapses within seconds), and
//! clears the mark once its consumer has nothing buffered; the reconciler
//! reopens a sale only when no mark is live and no message waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use crate::infra::redis::Redis;

/// A mark lives this long unless renewed: a worker that dies holds a rebuilt sale closed
/// for no longer.
const LEASE_MS: i64 = 5_000;

/// While marked, the mark is renewed this often (well within its lease, however long a
/// batch takes).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_millis(1_500);

/// One worker's mark, renewed in the background while it is set.
pub struct Holding {
    redis: Redis,
    key: String,
    worker: String,
    marked: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

fn key(redis: &Redis) -> String {
    redis.key("orders:holding")
}

async fn write_mark(redis: &Redis, key: &str, worker: &str) -> redis::RedisResult<()> {
    let until = chrono::Utc::now().timestamp_millis() + LEASE_MS;
    // The marks expire together once no worker renewed its own for a lease: then every
    // one in the hash has run out anyway. One transaction, so the hash never lacks a TTL.
    redis::pipe()
        .atomic()
        .hset(key, worker, until)
        .ignore()
        .pexpire(key, LEASE_MS)
        .ignore()
        .query_async(&mut redis.conn())
        .await
}

impl Holding {
    pub fn new(redis: &Redis) -> Self {
        let (key, worker) = (key(redis), Uuid::now_v7().simple().to_string());
        let marked = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn({
            let (redis, key, worker, marked) =
                (redis.clone(), key.clone(), worker.clone(), marked.clone());
            async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    if marked.load(Ordering::Relaxed) {
                        if let Err(e) = write_mark(&redis, &key, &worker).await {
                            tracing::warn!(error = %e, "renewing this worker's holding mark");
                        }
                    }
                }
            }
        });
        Self {
            redis: redis.clone(),
            key,
            worker,
            marked,
            renewer,
        }
    }

    /// Marks (or renews) this worker as holding deliveries.
    pub async fn hold(&self) {
        match write_mark(&self.redis, &self.key, &self.worker).await {
            Ok(()) => self.marked.store(true, Ordering::Relaxed),
            // A rebuilt sale then waits out its patience instead.
            Err(e) => tracing::warn!(error = %e, "marking the deliveries this worker holds"),
        }
    }

    /// Clears the mark: the worker holds nothing.
    pub async fn release(&self) {
        if !self.marked.swap(false, Ordering::Relaxed) {
            return;
        }
        let cleared: redis::RedisResult<()> = redis::cmd("HDEL")
            .arg(&self.key)
            .arg(&self.worker)
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(e) = cleared {
            // It expires with its lease.
            tracing::warn!(error = %e, "clearing this worker's holding mark");
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.renewer.abort();
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
