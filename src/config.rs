//! Typed, layered configuration: `config/default.toml`, then `config/{FLASHSALE_ENV}.toml`
//! (optional, `development` when unset), then `FLASHSALE__SECTION__KEY` environment variables.
//! The result is validated once at start and passed down; nothing reads it globally.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub amqp: AmqpSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub users: UsersSettings,
    pub catalog: CatalogSettings,
    pub search: SearchSettings,
    pub sales: SalesSettings,
    pub orders: OrdersSettings,
    pub notifications: NotificationsSettings,
    pub kafka: KafkaSettings,
    pub telemetry: TelemetrySettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub body_limit_bytes: usize,
    /// Requests one process serves at once; beyond it, 503 + Retry-After at once.
    pub max_in_flight: usize,
    /// An idle keep-alive connection stays open this long (shoppers in a waiting room poll
    /// every few seconds; reconnecting each time costs more than the idle socket).
    pub keep_alive_secs: u64,
    /// A new connection's first request head must arrive within this (408 past it). Behind a
    /// load balancer that times slow clients out itself, raise it: under a CPU crush a head
    /// already in the socket can wait longer than the default to be read.
    pub client_request_timeout_ms: u64,
    /// Connections the kernel holds for the API before it accepts them (capped by the
    /// kernel's `net.core.somaxconn`). A full queue drops a shopper's SYN, and their client
    /// tries again only after a second.
    pub listen_backlog: u32,
    /// The API also serves `/metrics` on its own port (development); production keeps it
    /// to `ops_port`, which no ingress routes.
    pub metrics_on_api_port: bool,
    /// Peers whose X-Forwarded-For is believed: addresses or CIDR ranges (an ingress
    /// controller's pod network).
    #[serde(deserialize_with = "addresses_or_ranges")]
    pub trusted_proxies: Vec<IpNet>,
    /// On SIGTERM: how long in-flight requests and batches get before the process exits.
    pub shutdown_grace_secs: u64,
    /// Worker roles serve `/health`, `/ready` and `/metrics` here (the API serves them on
    /// `port`).
    pub ops_port: u16,
    /// How often gauges (pools, queues, stock, outbox) are sampled.
    pub metrics_sample_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `serve` creates and migrates the databases first (local development; production runs
    /// `flashsale migrate` as its own step).
    pub migrate_on_start: bool,
    pub pool_max_size: u32,
    pub pool_timeout_ms: u64,
    /// PostgreSQL cancels any statement running longer (statement_timeout).
    pub statement_timeout_ms: u64,
    pub read_your_writes_secs: u64,
    /// The password of every database URL that names a user and carries no password. The
    /// URLs live in the deployment's ConfigMap, the password only in its Secret
    /// (`FLASHSALE__DATABASE__PASSWORD`); libpq's `PGPASSWORD` is not read.
    #[serde(default)]
    pub password: Option<String>,
    pub global: DatabaseNode,
    pub shards: Vec<DatabaseNode>,
}

impl DatabaseSettings {
    /// Every URL of every node (primaries, replicas, direct URLs), for rewriting.
    fn urls_mut(&mut self) -> impl Iterator<Item = &mut String> {
        std::iter::once(&mut self.global)
            .chain(&mut self.shards)
            .flat_map(|node| {
                std::iter::once(&mut node.primary)
                    .chain(&mut node.replicas)
                    .chain(&mut node.direct)
            })
    }

    /// Puts `password` into every URL that names a user without one.
    fn apply_password(&mut self) -> Result<(), ConfigError> {
        let Some(password) = self.password.clone() else {
            return Ok(());
        };
        for url in self.urls_mut() {
            let mut parsed = url::Url::parse(url).map_err(|e| ConfigError::Invalid {
                key: "database",
                reason: format!("a database URL does not parse: {e}"),
            })?;
            if parsed.username().is_empty() || parsed.password().is_some() {
                continue;
            }
            parsed
                .set_password(Some(&password))
                .map_err(|()| ConfigError::Invalid {
                    key: "database.password",
                    reason: "a database URL cannot take a password".to_owned(),
                })?;
            *url = parsed.into();
        }
        Ok(())
    }
}

/// One logical database: a primary and zero or more read replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseNode {
    /// What the request path connects to (in production a transaction-mode PgBouncer).
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The primary server itself, bypassing any pooler: what `migrate` connects to
    /// (migrations through a transaction-mode pooler are unsafe). Unset: `primary`.
    #[serde(default)]
    pub direct: Option<String>,
}

impl DatabaseNode {
    /// The URL migrations run against.
    pub fn migration_url(&self) -> &str {
        self.direct.as_deref().unwrap_or(&self.primary)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// One node's URL, or with `cluster` the seed nodes separated by commas.
    pub url: String,
    pub key_prefix: String,
    /// Talk to a Redis Cluster through the cluster client.
    #[serde(default)]
    pub cluster: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    /// Shown in the broker's connection list (operators find a pod's connections by it).
    pub connection_name: String,
    /// Queues are named `<queue_prefix>orders`, `<queue_prefix>notifications.high` etc.
    /// (tests isolate by prefix).
    pub queue_prefix: String,
    /// A publish not confirmed within this long fails (the order is refused with 503).
    pub confirm_timeout_ms: u64,
    /// Deletes queues unused for this long (tests; unset in production).
    #[serde(default)]
    pub queue_expires_ms: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub access_ttl_secs: u64,
    pub refresh_ttl_secs: u64,
    /// Presenting a refresh token again this soon answers the same new pair; later, the
    /// session is revoked (a stolen token).
    pub refresh_grace_secs: u64,
    pub active_kid: String,
    #[serde(default)]
    pub keys: HashMap<String, String>,
    pub argon2: Argon2Settings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub auth_per_ip_per_minute: u32,
    pub user_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersSettings {
    pub cache_ttl_secs: u64,
    pub max_addresses: i64,
}

/// The catalogue's read path: in-process cache, then Redis, then PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSettings {
    /// Products held in each process.
    pub local_capacity: u64,
    /// How long a process may serve a product without asking Redis; bounds how long another
    /// pod's write takes to show here (the consistency window is 5 s).
    pub local_ttl_ms: u64,
    pub redis_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// Where the product index lives on disk (each pod keeps its own).
    pub index_dir: std::path::PathBuf,
    /// How often the indexer picks up product changes (a change is searchable within this
    /// plus a commit).
    pub refresh_ms: u64,
    /// Where `flashsale search snapshot` publishes copies of its index and where a starting
    /// API process restores the newest one from (a volume they share). Unset: each process
    /// builds its index from the catalogue.
    #[serde(default)]
    pub snapshot_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesSettings {
    /// Units one user may hold in live orders of one sale.
    pub purchase_limit: u32,
    /// How long before its start a sale's stock is loaded into Redis.
    pub preload_secs: i64,
    /// How often the worker role loads due sales.
    pub scheduler_interval_secs: u64,
    /// How often the invariant auditor checks every live sale (one replica per interval).
    pub audit_interval_secs: u64,
    /// Buckets a flash sale's stock is split into, each under its own hash tag, so one hot
    /// sale spreads over several Redis Cluster nodes (1 on a single node). A sale keeps the
    /// count it was loaded with.
    #[serde(default = "one_bucket")]
    pub stock_buckets: u32,
}

/// More buckets than nodes buys nothing; each one costs a read when a bucket runs dry.
const MAX_STOCK_BUCKETS: u32 = 64;

fn one_bucket() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersSettings {
    pub flash_sale_attempts_per_minute: u32,
    /// How long an Idempotency-Key's answer is kept for replays.
    pub idempotency_ttl_secs: u64,
    /// How long a request may still be working on what it reserved. A retry with the same
    /// key gets 409 `request_in_progress` only this long; then a flash-sale retry takes over
    /// the reservation its first try left (a lost Redis reply, a process that died
    /// mid-request), and a regular order's key is free again.
    pub in_flight_ttl_secs: u64,
    pub max_quantity: u32,
    /// "quorum" (replicated, survives a node loss) or "classic".
    pub queue_type: String,
    /// Orders accepted within this window share one AMQP message and one Redis pipeline of
    /// acceptance records (at most publish_batch_max).
    pub publish_linger_ms: u64,
    pub publish_batch_max: usize,
    pub prefetch: u16,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    /// Delays of the retry queues, in order; after the last one a message is dead-lettered.
    pub retry_delays_ms: Vec<u32>,
    /// Deliveries of one order message before the broker dead-letters it (quorum queues):
    /// the backstop for a message that kills its worker every time.
    pub delivery_limit: u32,
    /// A reservation whose order has not reached PostgreSQL after this long is released.
    /// Delays between the attempts of a refund that failed; after the last, its dead-letter
    /// queue (an operator's, with an alert).
    pub refund_retry_delays_ms: Vec<u32>,
    /// How long an order whose sale Redis lost waits for the rebuild before it fails.
    pub stock_restore_wait_secs: i64,
    pub reservation_timeout_secs: i64,
    pub reconcile_interval_secs: u64,
    pub payment: PaymentSettings,
    pub admission: AdmissionSettings,
    pub push: PushSettings,
}

/// The pushed streams (server-sent events) of order status and waiting rooms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSettings {
    /// A comment this often keeps proxies from timing the stream out and finds dead clients.
    pub heartbeat_secs: u64,
    /// An order stream also reads its order this often (a change whose publish was lost).
    pub recheck_secs: u64,
    /// A stream ends after this long; the client reconnects with Last-Event-ID.
    pub max_stream_secs: u64,
    /// Streams one process holds at once (each a connection and a little memory); 503 beyond.
    pub max_streams: usize,
}

/// The payment gateway simulator and the circuit breaker in front of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    pub latency_ms: u64,
    /// Share of charges that fail transiently (0.0..=1.0), on top of `card_flaky`.
    pub failure_rate: f64,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    /// A gateway call not answered within this long fails (and counts towards the breaker).
    pub timeout_ms: u64,
}

/// Admission control and the waiting room of the flash-sale path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    pub enabled: bool,
    /// Beyond the allowed backlog: a ticket in the sale's waiting room (202), or 503 when off.
    pub waiting_room: bool,
    /// The backlog allowed is this many seconds of settling at the measured rate.
    pub max_settle_secs: f64,
    /// ...and never less than this many orders (an idle system learns its rate from them).
    pub min_backlog: i64,
    /// How often each API pod samples the backlog; the room's horizon moves at most this often.
    pub sample_ms: u64,
    /// How long a pod answers `sold_out` from memory after it learned a sale sold out.
    pub sold_out_cache_ms: u64,
    /// Tickets admitted beyond the units left, for admitted buyers who fail or go away.
    pub stock_slack: i64,
    /// How long an admitted ticket holds its unit (this to twice this): after that, a holder
    /// who has not bought no longer holds up the room.
    pub admitted_hold_secs: u64,
    /// The longest Retry-After a ticket is given.
    pub max_retry_after_ms: u64,
}

/// Span export; logs are `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/HTTP traces endpoint (e.g. `http://jaeger:4318/v1/traces`); empty turns span
    /// export off. Trace context is carried through queues and events either way.
    pub otlp_endpoint: String,
}

/// Order events: the outbox relay to Kafka.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list; empty turns the relay off (events stay in the outbox).
    pub brokers: String,
    pub topic: String,
    /// How long the relay naps when the outbox is empty.
    pub relay_interval_ms: u64,
    /// Events per relay pass and shard.
    pub batch_size: i64,
    /// How long the producer keeps trying one event before the relay gives up on the pass.
    pub delivery_timeout_ms: u64,
    /// Sent rows are deleted after this long.
    pub retention_hours: i64,
}

/// The notify-worker and the notification history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsSettings {
    /// Unacked deliveries per priority queue.
    pub prefetch: u16,
    /// Notifications per batch.
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    /// Slots of every batch kept for normal and low while they have work waiting, so a
    /// backlog of high never starves them.
    pub normal_share: usize,
    pub low_share: usize,
    /// Tries per notification (transient failures only), with exponential backoff.
    pub max_attempts: usize,
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Newest entries kept per user.
    pub history_cap: usize,
    pub history_ttl_secs: u64,
    /// How long a dedupe key (e.g. `order:<id>:paid`) suppresses a second notification.
    pub dedupe_ttl_secs: u64,
    pub providers: ProvidersSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSettings {
    pub email: ProviderSettings,
    pub sms: ProviderSettings,
    pub push: ProviderSettings,
}

/// A provider simulator: how slow, how unreliable, and the provider's rate limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub latency_ms: u64,
    /// Share of sends that fail transiently (0.0..=1.0).
    pub failure_rate: f64,
    /// Share of sends the provider rejects for good (bad address).
    pub permanent_failure_rate: f64,
    /// Every notification's first N tries fail transiently (drills and tests).
    #[serde(default)]
    pub fail_first_attempts: u32,
    /// Sends per second the provider allows this process, and the burst above it.
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// `10.0.0.1` (one address) or `10.244.0.0/16` (a range), each.
fn addresses_or_ranges<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<IpNet>, D::Error> {
    let written = Vec::<String>::deserialize(deserializer)?;
    written
        .iter()
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{entry}` is neither an IP address nor a CIDR range"
                    ))
                })
        })
        .collect()
}

const MIN_KEY_BYTES: usize = 32;
const PRODUCTION: &str = "production";

/// Every configuration file in this repository: a signing key written in one is public.
const REPOSITORY_LAYERS: [&str; 6] = [
    include_str!("../config/default.toml"),
    include_str!("../config/development.toml"),
    include_str!("../config/test.toml"),
    include_str!("../config/production.example.toml"),
    include_str!("../deploy/compose/compose.toml"),
    include_str!("../deploy/compose/compose-direct.toml"),
];

/// The `[auth.keys]` values of every repository layer.
fn published_keys() -> Vec<String> {
    REPOSITORY_LAYERS
        .iter()
        .filter_map(|text| {
            config::Config::builder()
                .add_source(config::File::from_str(text, config::FileFormat::Toml))
                .build()
                .ok()?
                .get_table("auth.keys")
                .ok()
        })
        .flat_map(|keys| keys.into_values().filter_map(|v| v.into_string().ok()))
        .collect()
}

impl Settings {
    /// Loads the layered configuration from `dir` (normally `./config`) for the environment
    /// named by `FLASHSALE_ENV` (default `development`).
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let env = std::env::var("FLASHSALE_ENV").unwrap_or_else(|_| "development".to_owned());
        Self::load_for(dir, &env)
    }

    /// Loads the layered configuration for environment `env`.
    pub fn load_for(dir: &Path, env: &str) -> Result<Self, ConfigError> {
        let mut settings: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .add_source(config::File::from(dir.join(format!("{env}.toml"))).required(false))
            .add_source(
                config::Environment::with_prefix("FLASHSALE")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("http.trusted_proxies")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.database.apply_password()?;
        settings.validate()?;
        if env == PRODUCTION {
            settings.refuse_unsafe_for_production()?;
        }
        Ok(settings)
    }

    /// Production runs only with settings that are safe there: no signing key that is
    /// published in a configuration file of this repository, nothing meant for development
    /// or tests.
    fn refuse_unsafe_for_production(&self) -> Result<(), ConfigError> {
        let published = published_keys();
        if let Some((kid, _)) = self
            .auth
            .keys
            .iter()
            .find(|(_, key)| published.contains(key))
        {
            return Err(ConfigError::Invalid {
                key: "auth.keys",
                reason: format!(
                    "key `{kid}` is published in this repository's configuration; set \
                     FLASHSALE__AUTH__KEYS__<KID> to a secret of at least {MIN_KEY_BYTES} bytes"
                ),
            });
        }
        if self.http.metrics_on_api_port {
            return Err(ConfigError::Invalid {
                key: "http.metrics_on_api_port",
                reason: "metrics (revenue, stock) would be reachable through the ingress; \
                         scrape the ops port"
                    .into(),
            });
        }
        if self.database.migrate_on_start {
            return Err(ConfigError::Invalid {
                key: "database.migrate_on_start",
                reason: "development only: production runs `flashsale migrate` as its own step"
                    .into(),
            });
        }
        if self.amqp.queue_expires_ms.is_some() {
            return Err(ConfigError::Invalid {
                key: "amqp.queue_expires_ms",
                reason: "tests only: unused queues (and the orders in them) would be deleted"
                    .into(),
            });
        }
        Ok(())
    }

    /// Checks what types alone cannot; each failure names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.database.shards.is_empty() {
            return invalid("database.shards", "at least one shard is required");
        }
        if self.database.pool_max_size == 0 {
            return invalid("database.pool_max_size", "must be at least 1");
        }
        if self.http.max_in_flight == 0 {
            return invalid("http.max_in_flight", "must be at least 1");
        }
        if self.http.body_limit_bytes == 0 {
            return invalid("http.body_limit_bytes", "must be at least 1");
        }
        match self.auth.keys.get(&self.auth.active_kid) {
            None => return invalid("auth.active_kid", "names no key in auth.keys"),
            Some(_) if self.auth.keys.values().any(|k| k.len() < MIN_KEY_BYTES) => {
                return invalid("auth.keys", "every key must be at least 32 bytes");
            }
            Some(_) => {}
        }
        if self.auth.access_ttl_secs == 0 || self.auth.refresh_ttl_secs == 0 {
            return invalid("auth.access_ttl_secs", "token lifetimes must be positive");
        }
        if self.auth.argon2.max_concurrent == 0 {
            return invalid("auth.argon2.max_concurrent", "must be at least 1");
        }
        if !(1..=MAX_STOCK_BUCKETS).contains(&self.sales.stock_buckets) {
            return invalid("sales.stock_buckets", "must be 1 to 64");
        }
        if self.catalog.local_ttl_ms > 5_000 {
            return invalid(
                "catalog.local_ttl_ms",
                "must be at most 5000 (the consistency window)",
            );
        }
        if self.orders.in_flight_ttl_secs * 1000 <= self.amqp.confirm_timeout_ms {
            return invalid(
                "orders.in_flight_ttl_secs",
                "must outlast amqp.confirm_timeout_ms, or a retry could place a second order \
                 while the first waits for its confirm",
            );
        }
        if self.orders.retry_delays_ms.is_empty() {
            return invalid(
                "orders.retry_delays_ms",
                "at least one retry delay is required",
            );
        }
        if !matches!(self.orders.queue_type.as_str(), "quorum" | "classic") {
            return invalid("orders.queue_type", "must be \"quorum\" or \"classic\"");
        }
        if !(0.0..=1.0).contains(&self.orders.payment.failure_rate) {
            return invalid("orders.payment.failure_rate", "must be between 0 and 1");
        }
        if self.orders.batch_size == 0 || self.orders.prefetch == 0 || self.orders.max_quantity == 0
        {
            return invalid(
                "orders.batch_size",
                "batch_size, prefetch and max_quantity must be positive",
            );
        }
        let n = &self.notifications;
        if n.batch_size == 0 || n.prefetch == 0 || n.max_attempts == 0 || n.history_cap == 0 {
            return invalid(
                "notifications.batch_size",
                "batch_size, prefetch, max_attempts and history_cap must be positive",
            );
        }
        for p in [&n.providers.email, &n.providers.sms, &n.providers.push] {
            let rates = [p.failure_rate, p.permanent_failure_rate];
            if rates.iter().any(|r| !(0.0..=1.0).contains(r)) {
                return invalid(
                    "notifications.providers",
                    "failure rates must be between 0 and 1",
                );
            }
            if p.per_second == 0 || p.burst == 0 {
                return invalid(
                    "notifications.providers",
                    "per_second and burst must be positive",
                );
            }
        }
        if self.rate_limit.auth_per_ip_per_minute == 0 || self.rate_limit.user_per_minute == 0 {
            return invalid("rate_limit", "limits must be at least 1 per minute");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str) -> DatabaseNode {
        DatabaseNode {
            primary: url.to_owned(),
            replicas: vec![format!("{url}_ro")],
            direct: Some(url.replace(":6432", ":5432")),
        }
    }

    #[test]
    fn the_secret_password_goes_into_every_url_that_names_a_user_without_one() {
        let mut database = Settings::load_for(Path::new("config"), "test")
            .expect("test settings")
            .database;
        database.password = Some("p@ss/word".to_owned());
        database.global = node("postgres://flashsale@pgbouncer:6432/global");
        database.shards = vec![
            node("postgres://flashsale:own@pgbouncer:6432/shard_0"),
            node("postgres://pgbouncer:6432/shard_1"),
        ];
        database.apply_password().expect("applied");
        assert_eq!(
            database.global.primary,
            "postgres://flashsale:p%40ss%2Fword@pgbouncer:6432/global"
        );
        assert_eq!(
            database.global.replicas[0],
            "postgres://flashsale:p%40ss%2Fword@pgbouncer:6432/global_ro"
        );
        assert_eq!(
            database.global.migration_url(),
            "postgres://flashsale:p%40ss%2Fword@pgbouncer:5432/global"
        );
        assert_eq!(
            database.shards[0].primary, "postgres://flashsale:own@pgbouncer:6432/shard_0",
            "a URL's own password stays"
        );
        assert_eq!(
            database.shards[1].primary, "postgres://pgbouncer:6432/shard_1",
            "no user, no password"
        );
    }
}
