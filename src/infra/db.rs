//! PostgreSQL: the global database plus N user shards, each a primary with optional replicas.
//!
//! Users (and everything they own) live on `shard_index(user_id)`; the mapping is a stable
//! hash of the UUID bytes so every process, on every version, agrees on it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection, RunError};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};

use crate::infra::metrics::QueryTimer;
use diesel_async::{
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use uuid::Uuid;

use crate::config::{DatabaseNode, DatabaseSettings};

pub type PgPool = Pool<AsyncPgConnection>;
pub type PgConn<'a> = PooledConnection<'a, AsyncPgConnection>;

pub const GLOBAL_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/global");
pub const SHARD_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/shard");

/// How PostgreSQL words a statement cancelled by `statement_timeout`.
const STATEMENT_TIMED_OUT: &str = "canceling statement due to statement timeout";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
    Pool(#[from] RunError),
    #[error("database pool setup: {0}")]
    PoolSetup(#[from] diesel_async::pooled_connection::PoolError),
    #[error("database query: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database connection: {0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("migration: {0}")]
    Migration(String),
    #[error("invalid database url `{0}`")]
    Url(String),
}

impl DbError {
    /// True when the database could not be reached or answer in time (a 503, not a bug).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(_) | DbError::Connection(_) => true,
            DbError::Query(diesel::result::Error::DatabaseError(_, info)) => {
                info.message().starts_with(STATEMENT_TIMED_OUT)
            }
            _ => false,
        }
    }
}

/// Maps a user to its shard: xxh3 of the UUID bytes, modulo the shard count.
pub fn shard_index(user_id: Uuid, shard_count: usize) -> usize {
    // Lossless on 64-bit targets; the modulo keeps the value below shard_count anyway.
    (xxhash_rust::xxh3::xxh3_64(user_id.as_bytes()) % shard_count as u64) as usize
}

/// Where a read may be served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// Any replica (the primary when none is configured).
    Replica,
    /// The primary, because the caller has just written and must see its write.
    Primary,
}

/// One logical database: its primary pool and its replica pools.
pub struct NodePools {
    /// `global` or `shard_<n>`: the `db` label of this node's metrics.
    name: String,
    primary: PgPool,
    replicas: Vec<PgPool>,
    next_replica: AtomicUsize,
}

impl NodePools {
    async fn connect(
        name: String,
        node: &DatabaseNode,
        settings: &DatabaseSettings,
    ) -> Result<Self, DbError> {
        let primary = build_pool(&node.primary, &name, settings).await?;
        let mut replicas = Vec::with_capacity(node.replicas.len());
        for url in &node.replicas {
            replicas.push(build_pool(url, &format!("{name}_replica"), settings).await?);
        }
        Ok(Self {
            name,
            primary,
            replicas,
            next_replica: AtomicUsize::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn replicas(&self) -> &[PgPool] {
        &self.replicas
    }

    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// The pool a read should use; replicas are taken round-robin.
    pub fn reader(&self, from: ReadFrom) -> &PgPool {
        if from == ReadFrom::Primary || self.replicas.is_empty() {
            return &self.primary;
        }
        let i = self.next_replica.fetch_add(1, Ordering::Relaxed) % self.replicas.len();
        &self.replicas[i]
    }

    pub async fn write_conn(&self) -> Result<PgConn<'_>, DbError> {
        Ok(self.primary.get().await?)
    }

    pub async fn read_conn(&self, from: ReadFrom) -> Result<PgConn<'_>, DbError> {
        Ok(self.reader(from).get().await?)
    }

    async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.primary.get().await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }
}

async fn build_pool(url: &str, name: &str, settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    let name = name.to_owned();
    // No statement may hold a connection (and the request behind it) longer than this.
    let set_timeout = format!("SET statement_timeout = {}", settings.statement_timeout_ms);
    config.custom_setup = Box::new(move |url| {
        let name = name.clone();
        let set_timeout = set_timeout.clone();
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(url).await?;
            conn.batch_execute(&set_timeout)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            conn.set_instrumentation(QueryTimer::new(&name));
            Ok(conn)
        })
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
    Ok(Pool::builder()
        .max_size(settings.pool_max_size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(settings.pool_timeout_ms))
        // A checkout-time ping doubles round trips; broken connections surface on use instead.
        .test_on_check_out(false)
        .build(manager)
        .await?)
}

/// Every database the process talks to.
pub struct Databases {
    global: NodePools,
    shards: Vec<NodePools>,
}

impl Databases {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, DbError> {
        let global = NodePools::connect("global".into(), &settings.global, settings).await?;
        let mut shards = Vec::with_capacity(settings.shards.len());
        for (i, node) in settings.shards.iter().enumerate() {
            shards.push(NodePools::connect(format!("shard_{i}"), node, settings).await?);
        }
        Ok(Self { global, shards })
    }

    pub fn global(&self) -> &NodePools {
        &self.global
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn shard_for(&self, user_id: Uuid) -> &NodePools {
        &self.shards[shard_index(user_id, self.shards.len())]
    }

    pub fn shards(&self) -> &[NodePools] {
        &self.shards
    }

    /// The global node and every shard.
    pub fn nodes(&self) -> impl Iterator<Item = &NodePools> {
        std::iter::once(&self.global).chain(&self.shards)
    }

    /// Pings the global primary and every shard primary, each on its own.
    pub async fn ping_each(&self) -> (Result<(), DbError>, Vec<Result<(), DbError>>) {
        let shards = futures_util::future::join_all(self.shards.iter().map(NodePools::ping));
        tokio::join!(self.global.ping(), shards)
    }
}

/// Creates every configured database that does not exist yet, then runs the embedded
/// migrations on each primary. Safe to run again and from several processes at once.
pub async fn migrate(settings: &DatabaseSettings) -> Result<(), DbError> {
    create_and_migrate(settings.global.migration_url(), GLOBAL_MIGRATIONS).await?;
    for shard in &settings.shards {
        create_and_migrate(shard.migration_url(), SHARD_MIGRATIONS).await?;
    }
    Ok(())
}

async fn create_and_migrate(url: &str, migrations: EmbeddedMigrations) -> Result<(), DbError> {
    create_database_if_missing(url).await?;
    run_migrations(url, migrations).await?;
    tracing::info!(database = %database_name(url)?, "migrated");
    Ok(())
}

pub async fn run_migrations(url: &str, migrations: EmbeddedMigrations) -> Result<(), DbError> {
    let conn = AsyncPgConnection::establish(url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    harness
        .run_pending_migrations(migrations)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(())
}

/// Splits `postgres://host/db?opts` into the server URL (pointing at `postgres`) and `db`.
pub fn split_database_url(url: &str) -> Result<(String, String), DbError> {
    let (base, rest) = url
        .rsplit_once('/')
        .filter(|(base, _)| base.contains("://"))
        .ok_or_else(|| DbError::Url(url.to_owned()))?;
    let (name, query) = match rest.split_once('?') {
        Some((name, query)) => (name, format!("?{query}")),
        None => (rest, String::new()),
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(DbError::Url(url.to_owned()));
    }
    Ok((format!("{base}/postgres{query}"), name.to_owned()))
}

fn database_name(url: &str) -> Result<String, DbError> {
    Ok(split_database_url(url)?.1)
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    exists: bool,
}

/// Creates the database named in `url` unless it exists. A database that exists is found
/// by connecting to it, so a role that may not open the server's `postgres` database (the
/// databases made beforehand by an operator) migrates all the same.
pub async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
    if AsyncPgConnection::establish(url).await.is_ok() {
        return Ok(());
    }
    create_database(url, None).await
}

/// Creates the database named in `url` (from `template` when given) unless it exists.
pub async fn create_database(url: &str, template: Option<&str>) -> Result<(), DbError> {
    let (server_url, name) = split_database_url(url)?;
    let mut conn = AsyncPgConnection::establish(&server_url).await?;
    let found: Exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
            .bind::<diesel::sql_types::Text, _>(&name)
            .get_result(&mut conn)
            .await?;
    if found.exists {
        return Ok(());
    }
    // Names were checked to be [A-Za-z0-9_-] above, so quoting them is enough.
    let template = template
        .map(|t| format!(" TEMPLATE \"{t}\""))
        .unwrap_or_default();
    let created = diesel::sql_query(format!("CREATE DATABASE \"{name}\"{template}"))
        .execute(&mut conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        // Another process created it between our check and our CREATE: that is success.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("already exists") =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
