//! Redis: one auto-reconnecting multiplexed connection per process (it pipelines concurrent
//! requests by itself), and the key prefix that keeps environments and tests apart.
//!
//! On a Redis Cluster (`redis.cluster`) the same handle goes through the cluster client. Every
//! script and transaction keeps its keys under one hash tag (one slot); a plain pipeline may
//! span slots, and is split here per tag and sent to each slot's node concurrently.
//!
//! The cluster client can wedge: after a node paused its writers (`CLIENT PAUSE`) and then
//! crashed, its slot refresh never ended and every request timed out until the process
//! restarted. A watchdog replaces such a client with a new one (`Redis::connect`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::RedisSettings;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
const RETRIES: u32 = 3;
/// How often the watchdog pings the cluster, and how long a ping may take.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Failed pings in a row after which the watchdog tries a new cluster client.
const WEDGED_AFTER_PINGS: u32 = 3;

#[derive(Clone)]
pub struct Redis {
    /// Swapped whole by the cluster watchdog; every clone sees the swap.
    conn: Arc<ArcSwap<RedisConnection>>,
    prefix: String,
    /// Where subscriptions go: a node's URL (on a cluster, the first seed; a classic
    /// PUBLISH reaches every node's subscribers).
    pubsub_url: String,
}

/// A single node's connection or a cluster's; cheap to clone, every clone shares the sockets.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Redis {
    pub async fn connect(settings: &RedisSettings) -> redis::RedisResult<Self> {
        if settings.cluster {
            let seeds = settings.url.split(',').map(str::trim);
            let client = ClusterClient::builder(seeds)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(RETRIES)
                .build()?;
            let conn = RedisConnection::Cluster(client.get_async_connection().await?);
            let redis = Self::with(conn, settings);
            // It stops once every handle is gone.
            tokio::spawn(watch_cluster(Arc::downgrade(&redis.conn), client));
            Ok(redis)
        } else {
            let client = redis::Client::open(settings.url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(RETRIES as usize);
            let conn =
                RedisConnection::Single(client.get_connection_manager_with_config(config).await?);
            Ok(Self::with(conn, settings))
        }
    }

    fn with(conn: RedisConnection, settings: &RedisSettings) -> Self {
        Self {
            conn: Arc::new(ArcSwap::from_pointee(conn)),
            prefix: settings.key_prefix.clone(),
            pubsub_url: settings
                .url
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }

    /// A connection of its own for subscriptions (one per process: see orders' feed).
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        redis::Client::open(self.pubsub_url.as_str())?
            .get_async_pubsub()
            .await
    }

    /// A connection handle; cheap to clone, all clones share one multiplexed socket (per node).
    pub fn conn(&self) -> RedisConnection {
        RedisConnection::clone(&self.conn.load())
    }

    /// The full key for `suffix` under this process's prefix.
    pub fn key(&self, suffix: impl std::fmt::Display) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    /// Takes the lease `name` for `ms` milliseconds unless another process holds it: how one
    /// replica of many does a periodic job per interval. False also when Redis is down.
    pub async fn take_lease(&self, name: &str, ms: u64) -> bool {
        let lease = self.key(format_args!("{name}:lease"));
        let taken: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(lease)
            .arg(uuid::Uuid::new_v4().to_string())
            .arg("NX")
            .arg("PX")
            .arg(ms.max(1))
            .query_async(&mut self.conn())
            .await;
        matches!(taken, Ok(Some(_)))
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        ping(&mut self.conn()).await
    }
}

async fn ping(conn: &mut RedisConnection) -> redis::RedisResult<()> {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .map(drop)
}

/// Pings the cluster through the shared client every `WATCH_INTERVAL`. After
/// `WEDGED_AFTER_PINGS` failures in a row it opens a new client; if that one answers, it
/// takes the old one's place. A cluster that is really down answers neither, and the old
/// client, which repairs itself from such outages, stays.
async fn watch_cluster(shared: Weak<ArcSwap<RedisConnection>>, client: ClusterClient) {
    // Registered at zero, so "never replaced" is a 0 on the dashboard rather than no data.
    metrics::counter!("redis_cluster_client_replaced_total").increment(0);
    let mut failed_pings = 0;
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut current = RedisConnection::clone(&shared.load());
        if answers(&mut current).await {
            failed_pings = 0;
            continue;
        }
        failed_pings += 1;
        if failed_pings < WEDGED_AFTER_PINGS {
            continue;
        }
        let fresh = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection()).await;
        let Ok(Ok(fresh)) = fresh else {
            continue;
        };
        let mut fresh = RedisConnection::Cluster(fresh);
        if answers(&mut fresh).await {
            shared.store(Arc::new(fresh));
            failed_pings = 0;
            metrics::counter!("redis_cluster_client_replaced_total").increment(1);
            tracing::warn!(
                "Redis Cluster client replaced: it stopped answering while a new one could"
            );
        }
    }
}

async fn answers(conn: &mut RedisConnection) -> bool {
    matches!(
        tokio::time::timeout(WATCH_INTERVAL, ping(conn)).await,
        Ok(Ok(()))
    )
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => {
                let groups = slot_groups(pipeline);
                if pipeline.is_transaction() || groups.len() < 2 {
                    // A transaction must be one slot: the cluster refuses it otherwise.
                    conn.req_packed_commands(pipeline, offset, count)
                } else {
                    Box::pin(split_pipeline(conn.clone(), pipeline, groups))
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The indices of a pipeline's commands grouped by the hash tag (or whole key) of their first
/// key: each group stays in one slot and keeps its commands' order.
fn slot_groups(pipeline: &Pipeline) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = vec![];
    let mut by_tag: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let key = match cmd.args_iter().nth(1) {
            Some(redis::Arg::Simple(key)) => hash_tag(key).to_vec(),
            _ => vec![],
        };
        let group = *by_tag.entry(key).or_insert_with(|| {
            groups.push(vec![]);
            groups.len() - 1
        });
        groups[group].push(i);
    }
    groups
}

/// What Redis Cluster hashes: the part between the first `{` and the next `}` when non-empty.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// Sends each slot's part of a pipeline as its own pipeline, concurrently, and answers the
/// replies in the original order.
async fn split_pipeline(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    groups: Vec<Vec<usize>>,
) -> redis::RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let parts = groups.iter().map(|indices| {
        let mut part = Pipeline::with_capacity(indices.len());
        for &i in indices {
            part.add_command(cmds[i].clone());
        }
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(&part, 0, part.len()).await }
    });
    let replies = try_join_all(parts).await?;
    let mut ordered = vec![Value::Nil; cmds.len()];
    for (indices, values) in groups.iter().zip(replies) {
        for (&i, value) in indices.iter().zip(values) {
            ordered[i] = value;
        }
    }
    Ok(ordered)
}

/// Where an idempotent request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyStart {
    /// First time: the key is now marked in progress.
    Fresh,
    /// Accepted before: what the key holds (the order's id).
    Replay(String),
    InProgress,
    KeyReusedWithOtherBody,
}

impl IdempotencyStart {
    /// Reads a script reply that began with the idempotency check; `None` when the reply
    /// is the script's own.
    pub fn from_reply(reply: &[String]) -> Option<Self> {
        match reply {
            [status, stored] if status == "replay" => Some(Self::Replay(stored.clone())),
            [status] if status == "in_progress" => Some(Self::InProgress),
            [status] if status == "mismatch" => Some(Self::KeyReusedWithOtherBody),
            _ => None,
        }
    }
}

/// Starts an idempotent request whose work spans several Redis slots: check the key, and
/// mark it in progress when it is new, atomically.
pub struct Idempotency {
    begin: redis::Script,
}

impl Default for Idempotency {
    fn default() -> Self {
        Self {
            begin: redis::Script::new(concat!(
                include_str!("lua/idempotency_begin.lua"),
                include_str!("lua/idempotency_check.lua"),
                include_str!("lua/idempotency_begin_done.lua"),
            )),
        }
    }
}

impl Idempotency {
    pub async fn begin(
        &self,
        redis: &Redis,
        key: &str,
        body_hash: &str,
        ttl_secs: u64,
    ) -> redis::RedisResult<IdempotencyStart> {
        let reply: Vec<String> = self
            .begin
            .key(key)
            .arg(body_hash)
            .arg(ttl_secs)
            .invoke_async(&mut redis.conn())
            .await?;
        Ok(IdempotencyStart::from_reply(&reply).unwrap_or(IdempotencyStart::Fresh))
    }
}
