//! Reading orders: from their shard once persisted, from the acceptance record before.

use uuid::Uuid;

use super::acceptance;
use super::error::OrdersError;
use super::model::{Order, OrderKind};
use super::store;
use crate::app::AppState;
use crate::infra::db::ReadFrom;
use crate::infra::http::paging::PageRequest;
use crate::modules::auth::AuthUser;

/// An order as the caller may see it. Someone else's order is "not found".
pub async fn find_order(
    state: &AppState,
    caller: &AuthUser,
    order: Uuid,
) -> Result<Order, OrdersError> {
    Ok(locate(state, caller, order).await?.0)
}

/// The order and, while it is known from its acceptance record, its kind.
pub async fn locate(
    state: &AppState,
    caller: &AuthUser,
    order: Uuid,
) -> Result<(Order, Option<OrderKind>), OrdersError> {
    let accepted = acceptance::find(state, order).await?;
    let owner = accepted.as_ref().map(|m| m.order.user_id);
    let kind = accepted.as_ref().map(|m| m.kind);
    let persisted = match (owner, caller.is_admin()) {
        (Some(owner), _) => store::find(&state.db, owner, order, ReadFrom::Primary).await?,
        (None, true) => store::find_anywhere(&state.db, order).await?,
        (None, false) => store::find(&state.db, caller.user_id, order, ReadFrom::Primary).await?,
    };
    let found = persisted
        .or(accepted.map(|m| m.order))
        .ok_or(OrdersError::NotFound)?;
    if found.user_id != caller.user_id && !caller.is_admin() {
        return Err(OrdersError::NotFound);
    }
    Ok((found, kind))
}

/// `buyer`'s own order: its acceptance record while Redis keeps it (one round trip), else
/// its shard.
pub async fn find_own(
    state: &AppState,
    buyer: Uuid,
    order: Uuid,
) -> Result<Option<Order>, OrdersError> {
    match acceptance::find(state, order).await? {
        Some(accepted) if accepted.order.user_id == buyer => Ok(Some(accepted.order)),
        _ => store::find(&state.db, buyer, order, ReadFrom::Primary).await,
    }
}

pub async fn list_user_orders(
    state: &AppState,
    user: Uuid,
    page: PageRequest,
) -> Result<Vec<Order>, OrdersError> {
    store::list_for_user(&state.db, user, page, ReadFrom::Replica).await
}
