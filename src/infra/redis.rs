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

    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await
            .map(drop)
    }
}
