//! Acceptance: an order is accepted once the broker confirmed its message; then its acceptance
//! record is written (retried; a record that still fails is counted, and the order stays
//! accepted). The record (in Redis, keyed by order id) makes the order readable until
//! the worker persisted it, and replays of its Idempotency-Key read it there.
//!
//! Orders accepted together travel together: the ones that arrive within
//! `orders.publish_linger_ms` (at most `orders.publish_batch_max`) share one message, and once
//! the broker confirmed it their records go to Redis in one pipeline. Only then is each
//! request answered, so a request waits for no round trip of its own after its reservation.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::admission::Admission;
use super::error::OrdersError;
use super::idempotency;
use super::metrics;
use super::model::{Order, OrderMessage, OrderStatus};
use super::placement::Placed;
use super::queue;
use super::settle;
use crate::app::AppState;
use crate::infra::amqp::Publisher;
use crate::infra::redis::Redis;
use crate::modules::products;

/// Publishes the order and records it; only a confirmed publish accepts it. Otherwise the
/// units and the key go back, so a retry runs again.
pub async fn accept(
    state: &AppState,
    message: OrderMessage,
    idempotency_key: &str,
    body_hash: &str,
) -> Result<Placed, OrdersError> {
    let accepted_key = idempotency::accepted(message.order.id, body_hash)?;
    // Serialized once: the same JSON is the order's part of the broker message and its
    // acceptance record.
    let record = serde_json::value::to_raw_value(&message)
        .map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    let accepting = Accepting {
        order_id: message.order.id,
        traceparent: message.traceparent,
        record,
        idempotency_key: idempotency_key.to_owned(),
        accepted_key,
    };
    let (kind, order) = (message.kind, message.order);
    let unrecorded = match state.orders.acceptor.accept(accepting).await {
        Ok(()) => None,
        Err(Failure::NotPublished(reason)) => {
            match give_back(state, &order, idempotency_key).await? {
                GaveBack::Everything => return Err(OrdersError::Queue(reason)),
                // The broker had it after all (the confirm was late, not missing).
                GaveBack::WorkerHasIt => Some(reason),
            }
        }
        Err(Failure::NotRecorded(reason)) => Some(reason),
    };
    // Published, so accepted: the worker settles it, and the buyer is told so. An error here
    // would be retried, and a retry without the record is not a replay (it reads
    // `purchase_limit`, or `sold_out` once the sale is gone). Until the worker persists the
    // order, reads of it may answer 404 for a moment.
    if let Some(reason) = unrecorded {
        metrics::count_unrecorded();
        tracing::warn!(order = %order.id, reason, "accepted, but its record could not be written");
    }
    metrics::count_order(OrderStatus::Pending, kind);
    Ok(Placed {
        order,
        replayed: false,
    })
}

/// What undoing a request that was not accepted found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveBack {
    /// Its units and its key are free again: a retry runs afresh.
    Everything,
    /// A worker committed the order (its message reached the queue though its confirm never
    /// came): the order goes on, its units stay sold, and its key stays for the retries.
    WorkerHasIt,
}

/// Undoes a request that will not be accepted: its reserved units, and its key, unless a
/// worker has its order already.
pub async fn give_back(
    state: &AppState,
    order: &Order,
    idempotency_key: &str,
) -> Result<GaveBack, OrdersError> {
    if settle::release_as(state, &[order], products::Releaser::Unaccepted).await? {
        return Ok(GaveBack::WorkerHasIt);
    }
    redis::cmd("DEL")
        .arg(idempotency_key)
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(GaveBack::Everything)
}

/// An order on its way to acceptance, and what its Idempotency-Key will hold.
struct Accepting {
    order_id: Uuid,
    traceparent: Option<String>,
    /// The order's message as JSON: published, then stored as its acceptance record.
    record: Box<RawValue>,
    idempotency_key: String,
    /// The key's value once accepted: the order's id, which replays read the record by.
    accepted_key: String,
}

/// Why an order was not accepted.
#[derive(Debug, Clone)]
enum Failure {
    /// The broker did not confirm its message: the order is not accepted.
    NotPublished(String),
    /// Published, but its record could not be written: accepted, and not readable yet.
    NotRecorded(String),
}

struct Waiting {
    order: Accepting,
    outcome: oneshot::Sender<Result<(), Failure>>,
}

/// Where a batch's records go: Redis, for as long as an Idempotency-Key is kept.
struct Records {
    redis: Redis,
    ttl_secs: u64,
    admission: Arc<Admission>,
}

/// The batching task's handle: hands orders to it and waits for their outcome.
pub struct Acceptor {
    waiting: mpsc::Sender<Waiting>,
}

impl Acceptor {
    pub fn start(
        publisher: Arc<Publisher>,
        queue: String,
        settings: &crate::config::OrdersSettings,
        redis: Redis,
        admission: Arc<Admission>,
    ) -> Self {
        let max_batch = settings.publish_batch_max.max(1);
        let linger = Duration::from_millis(settings.publish_linger_ms);
        let records = Arc::new(Records {
            redis,
            ttl_secs: settings.idempotency_ttl_secs,
            admission,
        });
        let (waiting, mut inbox) = mpsc::channel::<Waiting>(max_batch * 64);
        tokio::spawn(async move {
            while let Some(first) = inbox.recv().await {
                // The confirm timeout runs from the first order's handover, linger included.
                let confirm_by = tokio::time::Instant::now() + publisher.confirm_timeout();
                let mut batch = vec![first];
                let lingered = tokio::time::sleep(linger);
                tokio::pin!(lingered);
                while batch.len() < max_batch {
                    tokio::select! {
                        next = inbox.recv() => match next {
                            Some(next) => batch.push(next),
                            None => break,
                        },
                        _ = &mut lingered => break,
                    }
                }
                // Batches go concurrently, so confirms pipeline.
                tokio::spawn(accept_batch(
                    publisher.clone(),
                    queue.clone(),
                    records.clone(),
                    batch,
                    confirm_by,
                ));
            }
        });
        Self { waiting }
    }

    /// Returns once the order is accepted (published and recorded), or why not. Every step
    /// of a batch is bounded (the confirm timeout from handover, the record's retries), so
    /// this always returns.
    async fn accept(&self, order: Accepting) -> Result<(), Failure> {
        let (outcome, answered) = oneshot::channel();
        self.waiting
            .send(Waiting { order, outcome })
            .await
            .map_err(|_| Failure::NotPublished("order acceptor stopped".into()))?;
        answered
            .await
            .map_err(|_| Failure::NotPublished("order acceptor dropped the order".into()))?
    }
}

async fn accept_batch(
    publisher: Arc<Publisher>,
    queue: String,
    records: Arc<Records>,
    batch: Vec<Waiting>,
    confirm_by: tokio::time::Instant,
) {
    let (orders, outcomes): (Vec<Accepting>, Vec<_>) =
        batch.into_iter().map(|w| (w.order, w.outcome)).unzip();
    let messages: Vec<&RawValue> = orders.iter().map(|o| o.record.as_ref()).collect();
    // Each order carries its own trace context; the message's header names the first one's,
    // so tools that read only headers still join the trace.
    let traceparent = orders.first().and_then(|o| o.traceparent.as_deref());
    let published = tokio::time::timeout_at(
        confirm_by,
        queue::publish_orders(&publisher, &queue, &messages, traceparent),
    )
    .await
    .unwrap_or_else(|_| Err("no confirm within the timeout".into()));
    let outcome = match published {
        // The message may still arrive: its consumer finds the units given back and fails
        // the order.
        Err(reason) => Err(Failure::NotPublished(reason)),
        // Accepted now: a blip must not turn it into an error the client would retry.
        Ok(()) => (|| records.write(&orders))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_times(3),
            )
            .sleep(tokio::time::sleep)
            .await
            .map_err(|e| Failure::NotRecorded(e.to_string())),
    };
    for answer in outcomes {
        // A request that stopped waiting is gone; nothing to tell it.
        let _ = answer.send(outcome.clone());
    }
    if !matches!(outcome, Err(Failure::NotPublished(_))) {
        records.count_accepted(orders.len()).await;
    }
}

impl Records {
    /// Makes the accepted orders readable (status) and marks their idempotency keys
    /// accepted (replacing the short-lived `in progress` markers), in one round trip. Each
    /// record goes first: a key marked accepted names an order that can be read.
    async fn write(&self, orders: &[Accepting]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for order in orders {
            let record = order.record.get();
            pipe.add_command(store_record(
                &self.redis,
                order.order_id,
                record,
                self.ttl_secs,
            ))
            .ignore()
            .cmd("SET")
            .arg(&order.idempotency_key)
            .arg(&order.accepted_key)
            .arg("EX")
            .arg(self.ttl_secs)
            .ignore();
        }
        pipe.query_async::<()>(&mut self.redis.conn()).await
    }

    /// Counts published orders for admission control, once: a pipeline is not atomic, and a
    /// retry of one that had counted already would leave the backlog larger for good.
    async fn count_accepted(&self, orders: usize) {
        let mut pipe = redis::pipe();
        self.admission.count_accepted(&mut pipe, orders);
        if let Err(e) = pipe.query_async::<()>(&mut self.redis.conn()).await {
            tracing::warn!(error = %e, orders, "accepted orders not counted for admission control");
        }
    }
}

/// Records an order the worker gave up on and could not persist as `failed`, so its
/// status reads `failed` rather than `pending` forever.
pub async fn record_failed(state: &AppState, message: &OrderMessage) -> Result<(), OrdersError> {
    let mut failed = message.clone();
    failed.order.status = OrderStatus::Failed;
    failed.order.updated_at = chrono::Utc::now();
    let json = serde_json::to_string(&failed).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    store_record(
        &state.redis,
        failed.order.id,
        &json,
        state.settings.orders.idempotency_ttl_secs,
    )
    .query_async::<()>(&mut state.redis.conn())
    .await?;
    Ok(())
}

/// The command that stores `json` as the acceptance record of `order`.
fn store_record(redis: &Redis, order: Uuid, json: &str, ttl_secs: u64) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(record_key(redis, order))
        .arg(json)
        .arg("EX")
        .arg(ttl_secs);
    set
}

fn record_key(redis: &Redis, order: Uuid) -> String {
    redis.key(format_args!("order:{order}"))
}

/// The acceptance record of `order`, while Redis keeps it.
pub async fn find(state: &AppState, order: Uuid) -> Result<Option<OrderMessage>, OrdersError> {
    let json: Option<String> = redis::cmd("GET")
        .arg(record_key(&state.redis, order))
        .query_async(&mut state.redis.conn())
        .await?;
    Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
}
