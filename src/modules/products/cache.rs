//! The catalogue's read path in three tiers: this process (moka, bounded, short TTL), then
//! Redis (shared by every pod), then PostgreSQL (a replica when configured).
//!
//! Concurrent misses for one product cause one load: moka runs a single initialiser per
//! key and hands its result to every waiter. Writes go through both tiers at once; Redis
//! keeps only the newest version (a slow reader cannot put back an older copy), and other
//! pods' in-process copies expire within `catalog.local_ttl_ms`, inside the 5 s window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use super::error::ProductsError;
use super::model::Product;
use super::store;
use crate::config::CatalogSettings;
use crate::infra::db::{Databases, ReadFrom};
use crate::infra::redis::Redis;

/// Stores a product unless Redis already holds a newer version of it.
const STORE_IF_NEWER: &str = r#"
local held = redis.call('HGET', KEYS[1], 'v')
if held and tonumber(held) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'json', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

pub struct ProductCache {
    local: moka::future::Cache<Uuid, Arc<Product>>,
    store_if_newer: Script,
    redis_ttl_secs: u64,
    database_loads: AtomicU64,
}

impl ProductCache {
    pub fn new(settings: &CatalogSettings) -> Self {
        Self {
            local: moka::future::Cache::builder()
                .max_capacity(settings.local_capacity)
                .time_to_live(Duration::from_millis(settings.local_ttl_ms))
                .build(),
            store_if_newer: Script::new(STORE_IF_NEWER),
            redis_ttl_secs: settings.redis_ttl_secs,
            database_loads: AtomicU64::new(0),
        }
    }

    pub async fn get(
        &self,
        db: &Databases,
        redis: &Redis,
        id: Uuid,
    ) -> Result<Arc<Product>, ProductsError> {
        metrics::counter!("cache_requests_total", "cache" => "product", "tier" => "local")
            .increment(1);
        self.local
            .try_get_with(id, self.load(db, redis, id))
            .await
            .map_err(|shared| match &*shared {
                ProductsError::NotFound => ProductsError::NotFound,
                other => ProductsError::Unavailable(other.to_string()),
            })
    }

    async fn load(
        &self,
        db: &Databases,
        redis: &Redis,
        id: Uuid,
    ) -> Result<Arc<Product>, ProductsError> {
        metrics::counter!("cache_misses_total", "cache" => "product", "tier" => "local")
            .increment(1);
        metrics::counter!("cache_requests_total", "cache" => "product", "tier" => "redis")
            .increment(1);
        let cached: Option<String> = redis::cmd("HGET")
            .arg(key(redis, id))
            .arg("json")
            .query_async(&mut redis.conn())
            .await?;
        // An entry that does not decode (an older format) is a miss; the reload replaces it.
        if let Some(product) = cached.and_then(|json| serde_json::from_str(&json).ok()) {
            return Ok(Arc::new(product));
        }
        self.database_loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cache_misses_total", "cache" => "product", "tier" => "redis")
            .increment(1);
        let product = store::find(db, id, ReadFrom::Replica).await?;
        self.store(redis, &product).await?;
        Ok(Arc::new(product))
    }

    /// After a write: the new version into Redis, this process's copy dropped.
    pub async fn put(&self, redis: &Redis, product: &Product) -> Result<(), ProductsError> {
        self.store(redis, product).await?;
        self.local.invalidate(&product.id).await;
        Ok(())
    }

    async fn store(&self, redis: &Redis, product: &Product) -> Result<(), ProductsError> {
        self.store_for(redis, product, self.redis_ttl_secs).await
    }

    /// Puts the products most likely to be read into Redis ahead of the first request, for
    /// `ttl_secs` (longer than an ordinary entry: they are read all the time).
    pub async fn preload(
        &self,
        redis: &Redis,
        hot: &[Product],
        ttl_secs: u64,
    ) -> Result<(), ProductsError> {
        for product in hot {
            self.store_for(redis, product, ttl_secs).await?;
        }
        Ok(())
    }

    async fn store_for(
        &self,
        redis: &Redis,
        product: &Product,
        ttl_secs: u64,
    ) -> Result<(), ProductsError> {
        let json = serde_json::to_string(product)
            .map_err(|e| ProductsError::Unavailable(e.to_string()))?;
        self.store_if_newer
            .key(key(redis, product.id))
            .arg(json)
            .arg(product.updated_at.timestamp_micros())
            .arg(ttl_secs)
            .invoke_async::<i64>(&mut redis.conn())
            .await?;
        Ok(())
    }

    /// Reads that had to go to PostgreSQL since start.
    pub fn database_loads(&self) -> u64 {
        self.database_loads.load(Ordering::Relaxed)
    }

    /// Drops this process's tier (tests, and operators after a bulk import).
    pub fn clear_local(&self) {
        self.local.invalidate_all();
    }
}

fn key(redis: &Redis, id: Uuid) -> String {
    redis.key(format_args!("product:{}", id.simple()))
}
