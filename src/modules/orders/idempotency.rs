//! Idempotency of both order routes: the `Idempotency-Key` digest, the digest of a request's
//! body, the answer stored for replays, and the key of a regular order.
//!
//! The flash-sale route checks and marks its key inside the reservation script (one round
//! trip); `POST /orders` spans several products, so it marks its key first, here.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::OrdersError;
use super::model::Order;
use crate::app::AppState;
use crate::infra::redis::IdempotencyStart;

const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks an `Idempotency-Key` and returns its digest (keys are stored hashed).
pub fn key_digest(key: Option<&str>) -> Result<String, OrdersError> {
    let key = key.ok_or(OrdersError::IdempotencyKeyRequired)?;
    let valid = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(OrdersError::IdempotencyKeyRequired);
    }
    Ok(hex(&Sha256::digest(key.as_bytes())[..16]))
}

/// What identifies a request's body: the same key with another body is refused.
pub fn body_digest(canonical_body: &str) -> String {
    hex(&Sha256::digest(canonical_body.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer an idempotent request gave, stored for replays. `state` and `body_hash`
/// are read by the Lua idempotency check.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    state: String,
    body_hash: String,
    order: Order,
}

/// The stored form of the answer `order` for a request with `body_hash`.
pub fn answer(order: &Order, body_hash: &str) -> Result<String, OrdersError> {
    let answer = StoredAnswer {
        state: "done".to_owned(),
        body_hash: body_hash.to_owned(),
        order: order.clone(),
    };
    serde_json::to_string(&answer).map_err(|e| OrdersError::Corrupt(e.to_string()))
}

/// The order of a stored answer.
pub fn replay(stored: &str) -> Result<Order, OrdersError> {
    let answer: StoredAnswer =
        serde_json::from_str(stored).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    Ok(answer.order)
}

/// The key of a regular order's request (scoped per user).
pub fn regular_key(state: &AppState, user: Uuid, key_digest: &str) -> String {
    state.redis.key(format_args!(
        "{{u:{}}}:orders-idem:{key_digest}",
        user.simple()
    ))
}

/// Marks a regular order's key in progress, or answers how it stands.
pub async fn begin_regular(
    state: &AppState,
    key: &str,
    body_hash: &str,
) -> Result<IdempotencyStart, OrdersError> {
    Ok(state
        .orders
        .idempotency
        .begin(
            &state.redis,
            key,
            body_hash,
            state.settings.orders.in_flight_ttl_secs,
        )
        .await?)
}
