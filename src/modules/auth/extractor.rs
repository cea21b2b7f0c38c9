//! `AuthUser`: the extractor every protected route takes. It checks the bearer token, the
//! denylist and the session's revocation, and counts the caller against the per-user limit,
//! all in one Redis round trip.

use std::future::Future;
use std::pin::Pin;

use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use uuid::Uuid;

use super::error::AuthError;
use super::sessions::{denied_key, revoked_key};
use super::tokens::AccessClaims;
use crate::app::AppState;
use crate::infra::http::Problem;
use crate::modules::users::Role;

const RATE_WINDOW_SECS: i64 = 60;

#[derive(Debug, Clone)]
pub struct AuthUser {
    pub user_id: Uuid,
    pub role: Role,
    pub jti: Uuid,
    pub sid: Uuid,
    pub exp: i64,
}

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn require_admin(&self) -> Result<(), AuthError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(AuthError::AdminOnly)
        }
    }

    /// The caller is `owner` or an admin.
    pub fn require_self_or_admin(&self, owner: Uuid) -> Result<(), AuthError> {
        if self.user_id == owner || self.is_admin() {
            Ok(())
        } else {
            Err(AuthError::NotOwner)
        }
    }
}

impl From<AccessClaims> for AuthUser {
    fn from(c: AccessClaims) -> Self {
        AuthUser {
            user_id: c.sub,
            role: c.role,
            jti: c.jti,
            sid: c.sid,
            exp: c.exp,
        }
    }
}

fn bearer(req: &HttpRequest) -> Result<String, AuthError> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::MissingToken)
}

impl FromRequest for AuthUser {
    type Error = Problem;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Problem>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| Problem::internal(&"AppState is not registered"))?;
            let claims = state.auth.keys.verify(&token?)?;
            let user = AuthUser::from(claims);
            admit(&state, &user).await?;
            Ok(user)
        })
    }
}

/// Refuses denied tokens and revoked sessions, and applies the per-user request limit
/// (a fixed one-minute window shared by every pod; admins are exempt).
async fn admit(state: &AppState, user: &AuthUser) -> Result<(), Problem> {
    let redis = &state.redis;
    let now = chrono::Utc::now().timestamp();
    let window = now / RATE_WINDOW_SECS;
    let counter = redis.key(format_args!("rate:user:{}:{window}", user.user_id.simple()));
    let mut pipe = redis::pipe();
    pipe.exists(denied_key(redis, user.jti))
        .exists(revoked_key(redis, user.sid));
    if !user.is_admin() {
        pipe.incr(&counter, 1)
            .expire(&counter, RATE_WINDOW_SECS)
            .ignore();
    }
    let replies: Vec<i64> = pipe.query_async(&mut redis.conn()).await?;
    let [denied, revoked, rest @ ..] = replies.as_slice() else {
        return Err(Problem::internal(&"short reply to the admission pipeline"));
    };
    if *denied == 1 || *revoked == 1 {
        return Err(AuthError::InvalidToken.into());
    }
    let used = rest.first().copied().unwrap_or(0);
    if used > i64::from(state.auth.user_requests_per_minute) {
        let retry_after = RATE_WINDOW_SECS - now % RATE_WINDOW_SECS;
        return Err(Problem::rate_limited(retry_after.unsigned_abs()));
    }
    Ok(())
}
