//! Acceptance: an order is accepted once the broker confirmed its message. From then on
//! its acceptance record (in Redis, keyed by order id) makes it readable until the worker
//! persisted it, and its answer is stored for replays of the Idempotency-Key.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use uuid::Uuid;

use super::error::OrdersError;
use super::idempotency;
use super::metrics;
use super::model::{Order, OrderMessage, OrderStatus};
use super::placement::Placed;
use super::settle;
use crate::app::AppState;
use crate::infra::redis::Redis;

/// Publishes the order; only a confirmed publish accepts it. Otherwise the units and the
/// key go back, so a retry runs again.
pub async fn accept(
    state: &AppState,
    message: OrderMessage,
    idempotency_key: &str,
    body_hash: &str,
) -> Result<Placed, OrdersError> {
    if let Err(e) = state.orders.order_publisher.publish(message.clone()).await {
        give_back(state, &message.order, idempotency_key).await?;
        return Err(e);
    }
    let answer = idempotency::answer(&message.order, body_hash)?;
    // Accepted now: a blip must not turn it into an error the client would retry.
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_times(3);
    (|| record(state, &message, idempotency_key, &answer))
        .retry(policy)
        .sleep(tokio::time::sleep)
        .await?;
    metrics::count_order(OrderStatus::Pending, message.kind);
    Ok(Placed {
        order: message.order,
        replayed: false,
    })
}

/// Undoes a request that will not be accepted: its reserved units, and its key.
pub async fn give_back(
    state: &AppState,
    order: &Order,
    idempotency_key: &str,
) -> Result<(), OrdersError> {
    settle::release_stock(state, &[order]).await?;
    redis::cmd("DEL")
        .arg(idempotency_key)
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(())
}

/// Makes the accepted order readable (status) and stores the answer for replays of its
/// idempotency key (replacing the short-lived `in progress` marker), in one round trip.
async fn record(
    state: &AppState,
    message: &OrderMessage,
    idempotency_key: &str,
    answer: &str,
) -> Result<(), OrdersError> {
    let mut pipe = redis::pipe();
    state.orders.admission.count_accepted(&mut pipe);
    pipe.add_command(store_record(state, message)?)
        .ignore()
        .cmd("SET")
        .arg(idempotency_key)
        .arg(answer)
        .arg("EX")
        .arg(state.settings.orders.idempotency_ttl_secs)
        .ignore()
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(())
}

/// Records an order the worker gave up on and could not persist as `failed`, so its
/// status reads `failed` rather than `pending` forever.
pub async fn record_failed(state: &AppState, message: &OrderMessage) -> Result<(), OrdersError> {
    let mut failed = message.clone();
    failed.order.status = OrderStatus::Failed;
    failed.order.updated_at = chrono::Utc::now();
    store_record(state, &failed)?
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(())
}

/// The command that stores `message` as its order's acceptance record.
fn store_record(state: &AppState, message: &OrderMessage) -> Result<redis::Cmd, OrdersError> {
    let json = serde_json::to_string(message).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    let mut set = redis::cmd("SET");
    set.arg(record_key(&state.redis, message.order.id))
        .arg(json)
        .arg("EX")
        .arg(state.settings.orders.idempotency_ttl_secs);
    Ok(set)
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
