//! Idempotency of both order routes: the `Idempotency-Key` digest, the digest of a request's
//! body, what an accepted key keeps for replays, and the key of a regular order.
//!
//! The flash-sale route checks and marks its key inside the reservation script (one round
//! trip); `POST /orders` spans several products, so it marks its key first, here.
//!
//! Redis can forget a key (a restart, a lost node). PostgreSQL cannot: each order is written
//! with its request's key (scoped to the route), unique per user. A regular order's fresh key
//! is looked up there every time; a flash sale's only while Redis may have forgotten it (its
//! sale was rebuilt within the key's lifetime), which keeps the hot path off PostgreSQL. A
//! second order that slips through (a key lost while its first order was still queued) is
//! stopped by the worker before any charge (`settle`).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::OrdersError;
use super::store;
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
    Ok(hex::encode(&Sha256::digest(key.as_bytes())[..16]))
}

/// What identifies a request's body: the same key with another body is refused.
pub fn body_digest(canonical_body: &str) -> String {
    hex::encode(Sha256::digest(canonical_body.as_bytes()))
}

/// What an Idempotency-Key holds once its request was accepted: the order it made, by id.
/// The order itself is stored once, as its acceptance record (then in its shard), and a
/// replay reads it from there. `state` and `body_hash` are read by the Lua idempotency check.
#[derive(serde::Serialize)]
struct AcceptedKey<'a> {
    state: &'static str,
    body_hash: &'a str,
    order_id: Uuid,
}

/// The stored form of an accepted key for a request with `body_hash`.
pub fn accepted(order: Uuid, body_hash: &str) -> Result<String, OrdersError> {
    let key = AcceptedKey {
        state: "done",
        body_hash,
        order_id: order,
    };
    serde_json::to_string(&key).map_err(|e| OrdersError::Corrupt(e.to_string()))
}

/// What an Idempotency-Key holds in Redis.
pub enum StoredKey {
    /// A request with this key is being answered.
    InProgress,
    /// A request with this key was accepted; its body's digest (keys of old releases may not
    /// hold it).
    Accepted { body_hash: Option<String> },
}

/// Reads an Idempotency-Key's stored value.
pub fn read_stored(stored: &str) -> Result<StoredKey, OrdersError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        state: Option<String>,
        body_hash: Option<String>,
    }
    let stored: Stored =
        serde_json::from_str(stored).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    Ok(match stored.state.as_deref() {
        Some("in_progress") => StoredKey::InProgress,
        _ => StoredKey::Accepted {
            body_hash: stored.body_hash,
        },
    })
}

/// The order an accepted key names. Keys stored before the order was kept only once held
/// the whole order; they replay for as long as they live (`orders.idempotency_ttl_secs`).
pub fn replayed_order_id(stored: &str) -> Result<Uuid, OrdersError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        order_id: Option<Uuid>,
        order: Option<EmbeddedOrder>,
    }
    #[derive(serde::Deserialize)]
    struct EmbeddedOrder {
        id: Uuid,
    }
    let stored: Stored =
        serde_json::from_str(stored).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    stored
        .order_id
        .or(stored.order.map(|order| order.id))
        .ok_or_else(|| OrdersError::Corrupt("an accepted idempotency key names no order".into()))
}

/// A flash-sale request's key as its order keeps it in PostgreSQL (one per user and key).
pub fn durable_flash(product: Uuid, key_digest: &str) -> String {
    format!("flash:{}:{key_digest}", product.simple())
}

/// A regular order's request key as its order keeps it in PostgreSQL.
pub fn durable_regular(key_digest: &str) -> String {
    format!("orders:{key_digest}")
}

/// The order PostgreSQL says holds `user`'s durable key, if any; Redis's key is set to name
/// it again, so the next replay is answered from Redis.
pub async fn held_in_db(
    state: &AppState,
    user: Uuid,
    durable_key: &str,
    redis_key: &str,
    body_hash: &str,
) -> Result<Option<Uuid>, OrdersError> {
    let owner = store::KeyOwner {
        user,
        key: durable_key,
    };
    let Some(order) = store::orders_holding(&state.db, &[owner])
        .await?
        .get(&owner)
        .copied()
    else {
        return Ok(None);
    };
    redis::cmd("SET")
        .arg(redis_key)
        .arg(accepted(order, body_hash)?)
        .arg("EX")
        .arg(state.settings.orders.idempotency_ttl_secs)
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(Some(order))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepted_key_names_its_order() {
        let order = Uuid::now_v7();
        let stored = accepted(order, "digest").unwrap();
        assert!(stored.len() < 160, "{stored}");
        assert_eq!(replayed_order_id(&stored).unwrap(), order);
    }

    #[test]
    fn a_key_that_embeds_the_whole_order_still_replays() {
        let order = Uuid::now_v7();
        let stored = format!(
            r#"{{"state":"done","body_hash":"d","order":{{"id":"{order}","status":"pending"}}}}"#
        );
        assert_eq!(replayed_order_id(&stored).unwrap(), order);
        assert!(replayed_order_id(r#"{"state":"done","body_hash":"d"}"#).is_err());
    }
}
