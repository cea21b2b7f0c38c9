//! Redis: one auto-reconnecting multiplexed connection per process (it pipelines concurrent
//! requests by itself), and the key prefix that keeps environments and tests apart.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisSettings;

#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
    prefix: String,
}

impl Redis {
    pub async fn connect(settings: &RedisSettings) -> redis::RedisResult<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(3);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            conn,
            prefix: settings.key_prefix.clone(),
        })
    }

    /// A connection handle; cheap to clone, all clones share one multiplexed socket.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
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
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await
            .map(drop)
    }
}

/// Where an idempotent request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyStart {
    /// First time: the key is now marked in progress.
    Fresh,
    /// Done before: the stored answer.
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
