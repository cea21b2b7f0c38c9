//! Order events through a transactional outbox: the code that changes an order appends the
//! change's events to its shard's `outbox` table in the same transaction, one row per change
//! (a settled order's `order.created` and `order.paid` share one); the relay publishes unsent
//! rows to Kafka in id order, one message per event (keyed by order id, idempotent
//! producer), and marks them sent.
//!
//! One relay per shard at a time (a transaction-scoped advisory lock), so replicas of the
//! worker role never publish one shard's events out of order. A broker outage holds rows
//! back; nothing is lost. Without `kafka.brokers` the relay is off and rows accumulate
//! until a broker is configured.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::KafkaSettings;
use crate::infra::db::{Databases, DbError, NodePools};

/// Schema version of every event payload.
pub const EVENT_VERSION: u32 = 1;

/// The payload of an `order.*` event (also what consumers of the topic parse).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderEvent {
    pub v: u32,
    /// Unique per event: consumers deduplicate on it.
    pub id: Uuid,
    /// `order.created`, `order.paid`, `order.failed` or `order.cancelled`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub status: String,
    /// Decimal string.
    pub total_amount: String,
    pub occurred_at: DateTime<Utc>,
    /// W3C trace context of the request that caused the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The events of one order change, in order: one outbox row, published as one Kafka message
/// per event.
pub struct Change<'a> {
    pub events: &'a [OrderEvent],
}

/// Appends order changes in the caller's transaction, one row each, in one statement whose
/// text does not grow with the batch (columns as arrays, `unnest`ed): PostgreSQL parses and
/// plans it in no time.
pub async fn append(
    conn: &mut AsyncPgConnection,
    changes: &[Change<'_>],
) -> Result<(), diesel::result::Error> {
    let changes: Vec<&Change<'_>> = changes.iter().filter(|c| !c.events.is_empty()).collect();
    if changes.is_empty() {
        return Ok(());
    }
    let mut payloads = Vec::with_capacity(changes.len());
    for change in &changes {
        payloads.push(
            serde_json::to_string(change.events)
                .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?,
        );
    }
    let firsts: Vec<&OrderEvent> = changes.iter().map(|c| &c.events[0]).collect();
    diesel::sql_query(
        "INSERT INTO outbox (event_id, aggregate_id, event_type, payload, traceparent) \
         SELECT id, aggregate, kind, payload::json, traceparent \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[]) \
              AS e(id, aggregate, kind, payload, traceparent)",
    )
    .bind::<Array<SqlUuid>, _>(firsts.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>(firsts.iter().map(|e| e.order_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(
        changes
            .iter()
            .map(|c| {
                let types: Vec<&str> = c.events.iter().map(|e| e.event_type.as_str()).collect();
                types.join(",")
            })
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Text>, _>(payloads)
    .bind::<Array<Nullable<Text>>, _>(
        firsts
            .iter()
            .map(|e| e.traceparent.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct Unsent {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = SqlUuid)]
    aggregate_id: Uuid,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    payload: String,
    #[diesel(sql_type = Nullable<Text>)]
    traceparent: Option<String>,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Any 64-bit constant; names the relay's per-shard lock.
const RELAY_LOCK: i64 = 0x0e7e_0b0c;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// A row the relay cannot read: it holds back its shard's later rows until it is fixed.
    #[error("{0}")]
    Corrupt(String),
}

impl From<diesel::result::Error> for RelayError {
    fn from(e: diesel::result::Error) -> Self {
        RelayError::Db(e.into())
    }
}

pub struct Relay {
    producer: FutureProducer,
    settings: KafkaSettings,
}

impl Relay {
    pub fn new(settings: &KafkaSettings) -> Result<Self, RelayError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                settings.delivery_timeout_ms.to_string(),
            )
            .create()?;
        Ok(Self {
            producer,
            settings: settings.clone(),
        })
    }

    /// Publishes up to one batch of a shard's unsent events; answers how many it marked sent.
    /// Only the longest run of delivered events is marked, so a failure never lets a later
    /// event of an order overtake an earlier one.
    pub async fn relay_shard(&self, shard: &NodePools) -> Result<usize, RelayError> {
        let mut pooled = shard.write_conn().await?;
        let conn: &mut AsyncPgConnection = &mut pooled;
        let (sent, failure) = conn
            .transaction(async |conn| {
                let lock = diesel::sql_query(format!(
                    "SELECT pg_try_advisory_xact_lock({RELAY_LOCK}) AS locked"
                ))
                .get_result::<Locked>(conn)
                .await?;
                if !lock.locked {
                    return Ok::<_, RelayError>((0, None));
                }
                let rows: Vec<Unsent> = diesel::sql_query(
                    "SELECT id, aggregate_id, event_type, payload::text AS payload, traceparent \
                     FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
                )
                .bind::<BigInt, _>(self.settings.batch_size)
                .load(conn)
                .await?;
                let (delivered, failure) = self.publish_rows(&rows).await;
                diesel::sql_query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
                    .bind::<diesel::sql_types::Array<BigInt>, _>(&delivered)
                    .execute(conn)
                    .await?;
                Ok((delivered.len(), failure))
            })
            .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Publishes every event of `rows`, one message each, queued in row order (so an order's
    /// events keep their order on its partition) and sent concurrently. Answers the ids of the
    /// longest run of rows whose every event was delivered, and the failure that ended it (a
    /// row sent again may repeat some events: consumers deduplicate on event ids).
    async fn publish_rows(&self, rows: &[Unsent]) -> (Vec<i64>, Option<RelayError>) {
        let keys: Vec<String> = rows
            .iter()
            .map(|row| row.aggregate_id.to_string())
            .collect();
        let mut outcomes: Vec<Result<(), RelayError>> = Vec::with_capacity(rows.len());
        let mut outgoing = vec![];
        for (index, row) in rows.iter().enumerate() {
            match serde_json::from_str::<Vec<&RawValue>>(&row.payload) {
                Ok(events) => {
                    outcomes.push(Ok(()));
                    for (event, event_type) in events.iter().zip(row.event_type.split(',')) {
                        outgoing.push((index, event_type, event.get()));
                    }
                }
                Err(e) => {
                    outcomes.push(Err(RelayError::Corrupt(format!(
                        "outbox row {}: {e}",
                        row.id
                    ))));
                    break;
                }
            }
        }
        let sends = outgoing.iter().map(|(index, event_type, payload)| {
            let row = &rows[*index];
            self.publish(
                &keys[*index],
                event_type,
                payload,
                row.traceparent.as_deref(),
            )
        });
        for ((index, ..), sent) in outgoing.iter().zip(join_all(sends).await) {
            if let (Err(e), outcome @ Ok(())) = (sent, &mut outcomes[*index]) {
                *outcome = Err(e.into());
            }
        }
        let mut delivered = vec![];
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok(()) => delivered.push(row.id),
                Err(e) => return (delivered, Some(e)),
            }
        }
        (delivered, None)
    }

    async fn publish(
        &self,
        key: &str,
        event_type: &str,
        payload: &str,
        traceparent: Option<&str>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "event-type",
            value: Some(event_type),
        });
        if let Some(traceparent) = traceparent {
            headers = headers.insert(Header {
                key: "traceparent",
                value: Some(traceparent),
            });
        }
        let record = FutureRecord::to(&self.settings.topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        self.producer
            .send(
                record,
                Duration::from_millis(self.settings.delivery_timeout_ms),
            )
            .await
            .map(drop)
            .map_err(|(e, _)| e)
    }

    /// Drops sent rows older than the retention window.
    async fn prune(&self, shard: &NodePools) -> Result<(), RelayError> {
        let mut conn = shard.write_conn().await?;
        diesel::sql_query(
            "DELETE FROM outbox WHERE sent_at < now() - make_interval(hours => $1::int)",
        )
        .bind::<BigInt, _>(self.settings.retention_hours)
        .execute(&mut conn)
        .await?;
        Ok(())
    }
}

/// Unsent order changes across every shard (the outbox backlog; a change holds one or more
/// events), from the span of unsent ids: two
/// index lookups per shard whatever the backlog, where a count would read every unsent row
/// at each scrape. Ids a rolled-back transaction took make it an upper bound.
pub async fn backlog(db: &Databases) -> Result<i64, DbError> {
    let mut total = 0;
    for shard in db.shards() {
        let mut conn = shard.write_conn().await?;
        total += diesel::sql_query(
            "SELECT coalesce(max(id) - min(id) + 1, 0) AS n FROM outbox WHERE sent_at IS NULL",
        )
        .get_result::<Count>(&mut conn)
        .await?
        .n;
    }
    Ok(total)
}

/// The relay loop of the worker role: drains every shard, naps when there is nothing to
/// send, and backs off while Kafka or a database is down. Order processing never waits on it.
pub async fn run_relay(
    db: std::sync::Arc<Databases>,
    settings: KafkaSettings,
    stopping: tokio_util::sync::CancellationToken,
) {
    if settings.brokers.is_empty() {
        tracing::info!(
            "kafka.brokers is empty: the outbox relay is off; events stay in the outbox"
        );
        return;
    }
    let relay = match Relay::new(&settings) {
        Ok(relay) => relay,
        Err(e) => {
            tracing::error!(error = %e, "outbox relay cannot start");
            return;
        }
    };
    let idle = Duration::from_millis(settings.relay_interval_ms);
    let policy = ExponentialBuilder::default()
        .with_min_delay(idle)
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let mut backoff = policy.build();
    let mut last_prune = Instant::now();
    while !stopping.is_cancelled() {
        let mut sent = 0;
        let mut failed = false;
        for shard in db.shards() {
            match relay.relay_shard(shard).await {
                Ok(n) => sent += n,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay could not publish; will retry");
                    failed = true;
                }
            }
        }
        if last_prune.elapsed() > PRUNE_EVERY {
            last_prune = Instant::now();
            for shard in db.shards() {
                if let Err(e) = relay.prune(shard).await {
                    tracing::warn!(error = %e, "outbox prune failed");
                }
            }
        }
        let pause = if failed {
            backoff.next().unwrap_or(idle)
        } else {
            backoff = policy.build();
            if sent > 0 {
                continue;
            }
            idle
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stopping.cancelled() => return,
        }
    }
}
