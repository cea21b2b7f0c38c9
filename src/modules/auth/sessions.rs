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

/// Atomically: refuse a revoked family, treat a second use as theft (revoke the family),
/// otherwise mark the token used and return its owner.
const ROTATE_LUA: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'uid')
if not owner then return {'missing'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'revoked'} end
if redis.call('HSETNX', KEYS[1], 'used', '1') == 0 then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
  return {'reused'}
end
return {'ok', owner}
"#;

pub struct Sessions {
    rotate: Script,
    refresh_ttl_secs: u64,
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
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Sessions {
    pub fn new(refresh_ttl_secs: u64) -> Self {
        Self {
            rotate: Script::new(ROTATE_LUA),
            refresh_ttl_secs,
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

    /// Consumes `token` and answers its owner and family; the caller issues the successor.
    pub async fn rotate(&self, redis: &Redis, token: &str) -> Result<(Uuid, Uuid), AuthError> {
        let parsed = RefreshToken::parse(token)?;
        let reply: Vec<String> = self
            .rotate
            .key(token_key(redis, parsed.family, &parsed.digest))
            .key(revoked_key(redis, parsed.family))
            .arg(self.refresh_ttl_secs)
            .invoke_async(&mut redis.conn())
            .await?;
        match reply.as_slice() {
            [status, owner] if status == "ok" => {
                let owner = Uuid::try_parse(owner).map_err(|_| AuthError::InvalidRefreshToken)?;
                Ok((owner, parsed.family))
            }
            [status] if status == "reused" => {
                tracing::warn!(family = %parsed.family, "refresh token reused; family revoked");
                Err(AuthError::RefreshTokenReused)
            }
            _ => Err(AuthError::InvalidRefreshToken),
        }
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

pub(super) fn revoked_key(redis: &Redis, family: Uuid) -> String {
    redis.key(format_args!("{{rt:{}}}:revoked", family.simple()))
}

pub(super) fn denied_key(redis: &Redis, jti: Uuid) -> String {
    redis.key(format_args!("denied-jti:{}", jti.simple()))
}
