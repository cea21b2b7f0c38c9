//! Auth: registration, login, token refresh and logout; the `AuthUser` extractor every other
//! module uses. Passwords are argon2id (blocking pool); access tokens are HS256 JWTs;
//! refresh tokens are opaque, hashed in Redis and rotated on every use.

mod error;
mod extractor;
mod handlers;
mod model;
mod password;
mod sessions;
mod store;
mod tokens;

use std::num::NonZeroU32;

use actix_web::web;
use uuid::Uuid;

pub use error::AuthError;
pub use extractor::AuthUser;
pub use model::{normalize_email, AuthResponse, VerifyResponse};
pub use tokens::{AccessClaims, TokenKeys};

use crate::app::AppState;
use crate::config::{AuthSettings, RateLimitSettings};
use crate::infra::http::rate_limit::IpRateLimiter;
use crate::modules::users::{self, NewUser, Role};
use password::PasswordHasher;
use sessions::{IssuedPair, Rotation, Sessions};

/// Everything auth keeps for the life of the process; built once at start.
pub struct AuthState {
    pub keys: TokenKeys,
    hasher: PasswordHasher,
    sessions: Sessions,
    ip_limiter: IpRateLimiter,
    user_requests_per_minute: u32,
}

impl AuthState {
    pub fn new(auth: &AuthSettings, limits: &RateLimitSettings) -> Result<Self, AuthError> {
        let per_ip = NonZeroU32::new(limits.auth_per_ip_per_minute).ok_or(AuthError::Config(
            "rate_limit.auth_per_ip_per_minute must be positive",
        ))?;
        Ok(Self {
            keys: TokenKeys::new(auth)?,
            hasher: PasswordHasher::new(&auth.argon2)?,
            sessions: Sessions::new(
                auth.refresh_ttl_secs,
                std::time::Duration::from_secs(auth.refresh_grace_secs),
            ),
            ip_limiter: IpRateLimiter::per_minute(per_ip),
            user_requests_per_minute: limits.user_per_minute,
        })
    }

    /// Drops idle per-IP limiter entries; the API role calls this periodically.
    pub fn forget_idle_clients(&self) {
        self.ip_limiter.forget_idle();
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    handlers::configure(cfg);
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::AuthApi as utoipa::OpenApi>::openapi()
}

/// The user id registered under `email`, if any.
pub async fn user_id_for_email(state: &AppState, email: &str) -> Result<Option<Uuid>, AuthError> {
    store::user_id_for_email(&state.db, &normalize_email(email)?).await
}

/// Creates a user: claims the email in the global directory, then writes the user row to
/// its shard (undoing the claim if that fails).
pub async fn register_user(
    state: &AppState,
    email: String,
    password: String,
    full_name: Option<String>,
    phone: Option<String>,
) -> Result<users::User, AuthError> {
    let email = normalize_email(&email)?;
    model::check_password(&password)?;
    users::validate_profile(full_name.as_deref(), phone.as_deref())?;
    let password_hash = state.auth.hasher.hash(password).await?;
    let id = Uuid::now_v7();
    if !store::claim_email(&state.db, &email, id).await? {
        return Err(AuthError::EmailTaken);
    }
    let new_user = NewUser {
        id,
        email: email.clone(),
        password_hash,
        full_name,
        phone,
    };
    match users::create(state, &new_user).await {
        Ok(user) => Ok(user),
        Err(e) => {
            if let Err(undo) = store::release_email(&state.db, &email, id).await {
                tracing::error!(error = %undo, %email, "could not release email after failed registration");
            }
            Err(e.into())
        }
    }
}

/// Starts a new session (refresh-token family) for `user` and returns the token pair.
async fn start_session(state: &AppState, user: users::User) -> Result<AuthResponse, AuthError> {
    issue_pair(state, user, Uuid::new_v4()).await
}

async fn issue_pair(
    state: &AppState,
    user: users::User,
    family: Uuid,
) -> Result<AuthResponse, AuthError> {
    let refresh_token = state
        .auth
        .sessions
        .issue(&state.redis, user.id, family)
        .await?;
    let access_token = state.auth.keys.issue(user.id, user.role, family)?;
    Ok(AuthResponse {
        user,
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.auth.keys.access_ttl_secs(),
    })
}

pub async fn login(
    state: &AppState,
    email: &str,
    password: String,
) -> Result<AuthResponse, AuthError> {
    // An unparsable email is simply unknown: same answer, same cost, as a wrong password.
    let user_id = match normalize_email(email) {
        Ok(email) => store::user_id_for_email(&state.db, &email).await?,
        Err(_) => None,
    };
    let credentials = match user_id {
        Some(id) => users::credentials(state, id).await?,
        None => None,
    };
    let stored = credentials.map(|c| c.password_hash);
    let matched = state.auth.hasher.verify(password, stored).await?;
    let Some(user_id) = user_id.filter(|_| matched) else {
        return Err(AuthError::InvalidCredentials);
    };
    let user = users::find_fresh(state, user_id).await?;
    start_session(state, user).await
}

/// Exchanges a refresh token for a new pair. Presenting it again within
/// `auth.refresh_grace_secs` answers the same pair (a client retrying after a lost answer
/// keeps its session); after that, a repeat revokes the family.
pub async fn refresh(state: &AppState, refresh_token: &str) -> Result<AuthResponse, AuthError> {
    let sessions = &state.auth.sessions;
    match sessions.rotate(&state.redis, refresh_token).await? {
        Rotation::Fresh { owner, family } => {
            // The role is read again so `admin grant` takes effect at the next refresh.
            let user = users::find_fresh(state, owner).await?;
            let pair = issue_pair(state, user, family).await?;
            let successor = IssuedPair {
                access_token: pair.access_token.clone(),
                refresh_token: pair.refresh_token.clone(),
            };
            sessions
                .remember_successor(&state.redis, refresh_token, &successor)
                .await?;
            Ok(pair)
        }
        Rotation::Repeat { owner, successor } => Ok(AuthResponse {
            user: users::find_fresh(state, owner).await?,
            access_token: successor.access_token,
            refresh_token: successor.refresh_token,
            token_type: "Bearer",
            expires_in: state.auth.keys.access_ttl_secs(),
        }),
    }
}

pub async fn logout(
    state: &AppState,
    caller: &AuthUser,
    refresh_token: Option<&str>,
) -> Result<(), AuthError> {
    let sessions = &state.auth.sessions;
    sessions
        .deny_access_token(&state.redis, caller.jti, caller.exp)
        .await?;
    sessions.revoke_family(&state.redis, caller.sid).await?;
    if let Some(token) = refresh_token {
        if let Some(family) = sessions
            .family_of(&state.redis, token, caller.user_id)
            .await?
        {
            sessions.revoke_family(&state.redis, family).await?;
        }
    }
    Ok(())
}

/// Hashes a password with the configured parameters (seeding shares one hash).
pub async fn hash_password(state: &AppState, password: &str) -> Result<String, AuthError> {
    model::check_password(password)?;
    state.auth.hasher.hash(password.to_owned()).await
}

/// Claims many emails at once for seeded users.
pub async fn claim_emails(state: &AppState, claims: &[(String, Uuid)]) -> Result<usize, AuthError> {
    store::claim_emails(&state.db, claims).await
}

/// Gives the user registered under `email` the admin role (`flashsale admin grant`).
pub async fn grant_admin(state: &AppState, email: &str) -> Result<Uuid, AuthError> {
    let user_id = user_id_for_email(state, email)
        .await?
        .ok_or(AuthError::Users(users::UsersError::NotFound))?;
    users::set_role(state, user_id, Role::Admin).await?;
    Ok(user_id)
}
