//! Sessions in Redis: opaque refresh tokens (stored hashed, rotated on every use, a reused
//! token revokes its whole family) and the access-token denylist filled by logout.
//!
//! A refresh token reads `<family id>.<secret>`; the family id is also the access tokens'
//! `sid`. Every key of one family shares the hash tag `{rt:<family>}`, so the rotation
//! script touches one Redis Cluster slot.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use redis::Script;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::AuthError;
use crate::infra::redis::Redis;

/// Atomically: refuse a revoked family; on first use mark the token used and return its
/// owner; a second use within the grace window (a client retrying after a lost answer)
/// gets the pair the first use was given (or `pending` while it is being issued); a second
/// use after it is theft: the family is revoked.
const ROTATE_LUA: &str = r#"
local token_key, revoked_key, successor_key = KEYS[1], KEYS[2], KEYS[3]
local ttl_secs, now_ms, grace_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local owner = redis.call('HGET', token_key, 'uid')
if not owner then return {'missing'} end
if redis.call('EXISTS', revoked_key) == 1 then return {'revoked'} end
local used_at = redis.call('HGET', token_key, 'used_at')
if not used_at then
  redis.call('HSET', token_key, 'used_at', now_ms)
  return {'ok', owner}
end
if now_ms - tonumber(used_at) < grace_ms then
  local successor = redis.call('GET', successor_key)
  if successor then return {'replay', owner, successor} end
  return {'pending'}
end
redis.call('SET', revoked_key, '1', 'EX', ttl_secs)
return {'reused'}
"#;

pub struct Sessions {
    rotate: Script,
    refresh_ttl_secs: u64,
    grace: std::time::Duration,
}

/// What presenting a refresh token gives.
pub enum Rotation {
    /// First use: the owner and family; the caller issues the successor pair and
    /// remembers it (`remember_successor`).
    Fresh { owner: Uuid, family: Uuid },
    /// A repeat within the grace window: the pair the first use was given.
    Repeat { owner: Uuid, successor: IssuedPair },
}

/// The tokens a refresh issued, kept for the grace window.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct IssuedPair {
    pub access_token: String,
    pub refresh_token: String,
}

/// A parsed refresh token.
struct RefreshToken {
    family: Uuid,
    digest: String,
}

impl RefreshToken {
    fn parse(token: &str) -> Result<Self, AuthError> {
        let (family, secret) = token
            .split_once('.')
            .ok_or(AuthError::InvalidRefreshToken)?;
        let family = Uuid::try_parse(family).map_err(|_| AuthError::InvalidRefreshToken)?;
        if secret.is_empty() || secret.len() > 64 {
            return Err(AuthError::InvalidRefreshToken);
        }
        Ok(Self {
            family,
            digest: hex_sha256(secret.as_bytes()),
        })
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Sessions {
    pub fn new(refresh_ttl_secs: u64, grace: std::time::Duration) -> Self {
        Self {
            rotate: Script::new(ROTATE_LUA),
            refresh_ttl_secs,
            grace,
        }
    }

    /// Stores and returns a new refresh token for `user_id` in `family`.
    pub async fn issue(
        &self,
        redis: &Redis,
        user_id: Uuid,
        family: Uuid,
    ) -> Result<String, AuthError> {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let secret = URL_SAFE_NO_PAD.encode(secret);
        let key = token_key(redis, family, &hex_sha256(secret.as_bytes()));
        redis::pipe()
            .atomic()
            .hset(&key, "uid", user_id.to_string())
            .ignore()
            .expire(&key, self.ttl_i64())
            .ignore()
            .query_async::<()>(&mut redis.conn())
            .await?;
        Ok(format!("{}.{}", family.simple(), secret))
    }

    /// Consumes `token` (see `ROTATE_LUA`).
    pub async fn rotate(&self, redis: &Redis, token: &str) -> Result<Rotation, AuthError> {
        let parsed = RefreshToken::parse(token)?;
        let reply: Vec<String> = self
            .rotate
            .key(token_key(redis, parsed.family, &parsed.digest))
            .key(revoked_key(redis, parsed.family))
            .key(successor_key(redis, parsed.family, &parsed.digest))
            .arg(self.refresh_ttl_secs)
            .arg(chrono::Utc::now().timestamp_millis())
            .arg(self.grace.as_millis() as u64)
            .invoke_async(&mut redis.conn())
            .await?;
        let owner = |id: &str| Uuid::try_parse(id).map_err(|_| AuthError::InvalidRefreshToken);
        match reply.as_slice() {
            [status, id] if status == "ok" => Ok(Rotation::Fresh {
                owner: owner(id)?,
                family: parsed.family,
            }),
            [status, id, successor] if status == "replay" => Ok(Rotation::Repeat {
                owner: owner(id)?,
                successor: serde_json::from_str(successor)
                    .map_err(|_| AuthError::InvalidRefreshToken)?,
            }),
            [status] if status == "pending" => Err(AuthError::RefreshInProgress),
            [status] if status == "reused" => {
                tracing::warn!(family = %parsed.family, "refresh token reused; family revoked");
                Err(AuthError::RefreshTokenReused)
            }
            _ => Err(AuthError::InvalidRefreshToken),
        }
    }

    /// Keeps the pair a refresh of `token` issued for the grace window, so a client that
    /// lost the answer and presents `token` again gets the same pair.
    pub async fn remember_successor(
        &self,
        redis: &Redis,
        token: &str,
        successor: &IssuedPair,
    ) -> Result<(), AuthError> {
        let parsed = RefreshToken::parse(token)?;
        let json = serde_json::to_string(successor).map_err(|e| AuthError::Token(e.to_string()))?;
        redis::cmd("SET")
            .arg(successor_key(redis, parsed.family, &parsed.digest))
            .arg(json)
            .arg("PX")
            .arg((self.grace.as_millis() as u64).max(1))
            .query_async::<()>(&mut redis.conn())
            .await?;
        Ok(())
    }

    /// The owner of a refresh token, without consuming it (logout checks ownership).
    pub async fn family_of(
        &self,
        redis: &Redis,
        token: &str,
        owner: Uuid,
    ) -> Result<Option<Uuid>, AuthError> {
        let parsed = RefreshToken::parse(token)?;
        let uid: Option<String> = redis::cmd("HGET")
            .arg(token_key(redis, parsed.family, &parsed.digest))
            .arg("uid")
            .query_async(&mut redis.conn())
            .await?;
        Ok((uid == Some(owner.to_string())).then_some(parsed.family))
    }

    pub async fn revoke_family(&self, redis: &Redis, family: Uuid) -> Result<(), AuthError> {
        redis::cmd("SET")
            .arg(revoked_key(redis, family))
            .arg(1)
            .arg("EX")
            .arg(self.refresh_ttl_secs)
            .query_async::<()>(&mut redis.conn())
            .await?;
        Ok(())
    }

    /// Denies one access token until it would have expired anyway.
    pub async fn deny_access_token(
        &self,
        redis: &Redis,
        jti: Uuid,
        exp: i64,
    ) -> Result<(), AuthError> {
        let remaining = (exp - chrono::Utc::now().timestamp()).max(1);
        redis::cmd("SET")
            .arg(denied_key(redis, jti))
            .arg(1)
            .arg("EX")
            .arg(remaining)
            .query_async::<()>(&mut redis.conn())
            .await?;
        Ok(())
    }

    fn ttl_i64(&self) -> i64 {
        i64::try_from(self.refresh_ttl_secs).unwrap_or(i64::MAX)
    }
}

fn token_key(redis: &Redis, family: Uuid, digest: &str) -> String {
    redis.key(format_args!("{{rt:{}}}:token:{digest}", family.simple()))
}

fn successor_key(redis: &Redis, family: Uuid, digest: &str) -> String {
    redis.key(format_args!(
        "{{rt:{}}}:successor:{digest}",
        family.simple()
    ))
}

pub(super) fn revoked_key(redis: &Redis, family: Uuid) -> String {
    redis.key(format_args!("{{rt:{}}}:revoked", family.simple()))
}

pub(super) fn denied_key(redis: &Redis, jti: Uuid) -> String {
    redis.key(format_args!("denied-jti:{}", jti.simple()))
}
