//! Users: profiles and addresses in the user's shard. Profiles are cached in Redis
//! (cache-aside, invalidated on write); a user's reads go to the primary for a short window
//! after they write, and to a replica otherwise.

mod error;
mod handlers;
mod model;
mod store;

use actix_web::web;
use uuid::Uuid;

pub use error::UsersError;
pub use model::{Address, Credentials, NewUser, Role, User};

use crate::app::AppState;
use crate::infra::db::ReadFrom;

pub fn configure(cfg: &mut web::ServiceConfig) {
    handlers::configure(cfg);
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::UsersApi as utoipa::OpenApi>::openapi()
}

/// Checks the optional profile fields registration accepts.
pub fn validate_profile(full_name: Option<&str>, phone: Option<&str>) -> Result<(), UsersError> {
    full_name.map(model::check_name).transpose()?;
    phone.map(model::check_phone).transpose()?;
    Ok(())
}

pub async fn create(state: &AppState, new: &NewUser) -> Result<User, UsersError> {
    let user = store::insert_user(&state.db, new).await?;
    mark_written(state, user.id).await?;
    Ok(user)
}

/// Seeds users in bulk; existing ones are left alone. Answers how many were new.
pub async fn create_many(state: &AppState, batch: &[NewUser]) -> Result<usize, UsersError> {
    store::insert_users_batch(&state.db, batch).await
}

/// A profile through the cache: Redis first, then the shard (a replica unless the user has
/// just written), then back into Redis.
pub async fn find(state: &AppState, id: Uuid) -> Result<User, UsersError> {
    let (cached, from) = store::cached_user(&state.redis, id).await?;
    if let Some(user) = cached {
        return Ok(user);
    }
    let user = store::load_user(&state.db, id, from).await?;
    store::cache_user(&state.redis, &user, state.settings.users.cache_ttl_secs).await?;
    Ok(user)
}

/// A profile straight from the primary, for decisions that must not be stale (the role put
/// into a new token).
pub async fn find_fresh(state: &AppState, id: Uuid) -> Result<User, UsersError> {
    store::load_user(&state.db, id, ReadFrom::Primary).await
}

pub async fn credentials(state: &AppState, id: Uuid) -> Result<Option<Credentials>, UsersError> {
    store::load_credentials(&state.db, id).await
}

pub async fn set_role(state: &AppState, id: Uuid, role: Role) -> Result<(), UsersError> {
    store::set_role(&state.db, id, role).await?;
    mark_written(state, id).await
}

async fn mark_written(state: &AppState, id: Uuid) -> Result<(), UsersError> {
    store::after_write(
        &state.redis,
        id,
        state.settings.database.read_your_writes_secs,
    )
    .await
}
