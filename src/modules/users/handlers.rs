use actix_web::{web, HttpResponse};
use uuid::Uuid;

use super::model::{Address, NewAddress, UpdateUser, User};
use super::store;
use crate::app::AppState;
use crate::infra::http::paging::{Page, PageQuery};
use crate::infra::http::problem::ProblemBody;
use crate::infra::http::Problem;
use crate::modules::auth::AuthUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/users")
            .route("/{id}", web::get().to(get_user))
            .route("/{id}", web::put().to(update_user))
            .route("/{id}/addresses", web::get().to(list_addresses))
            .route("/{id}/addresses", web::post().to(add_address)),
    );
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(get_user, update_user, list_addresses, add_address))]
pub struct UsersApi;

#[utoipa::path(get, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, body = User), (status = 400, body = ProblemBody, content_type = "application/problem+json"), (status = 401, body = ProblemBody, content_type = "application/problem+json"),
              (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 404, body = ProblemBody, content_type = "application/problem+json")))]
async fn get_user(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
) -> Result<web::Json<User>, Problem> {
    let id = id.into_inner();
    caller.require_self_or_admin(id)?;
    Ok(web::Json(super::find(&state, id).await?))
}

#[utoipa::path(put, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")), request_body = UpdateUser,
    responses((status = 200, body = User), (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 422, body = ProblemBody, content_type = "application/problem+json")))]
async fn update_user(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    body: web::Json<UpdateUser>,
) -> Result<web::Json<User>, Problem> {
    let id = id.into_inner();
    caller.require_self_or_admin(id)?;
    body.validate()?;
    let user = store::update_user(&state.db, id, &body).await?;
    super::mark_written(&state, id).await?;
    Ok(web::Json(user))
}

#[utoipa::path(get, path = "/users/{id}/addresses", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id"), PageQuery),
    responses((status = 200, body = Page<Address>), (status = 400, body = ProblemBody, content_type = "application/problem+json"), (status = 403, body = ProblemBody, content_type = "application/problem+json")))]
async fn list_addresses(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    page: web::Query<PageQuery>,
) -> Result<web::Json<Page<Address>>, Problem> {
    let id = id.into_inner();
    caller.require_self_or_admin(id)?;
    let page = page.validate()?;
    let from = store::recently_wrote(&state.redis, id).await?;
    let rows = store::list_addresses(&state.db, id, page, from).await?;
    Ok(web::Json(Page::from_rows(rows, page, |a| a.id)))
}

#[utoipa::path(post, path = "/users/{id}/addresses", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")), request_body = NewAddress,
    responses((status = 201, body = Address), (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 422, body = ProblemBody, content_type = "application/problem+json")))]
async fn add_address(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    body: web::Json<NewAddress>,
) -> Result<HttpResponse, Problem> {
    let id = id.into_inner();
    caller.require_self_or_admin(id)?;
    body.validate()?;
    let max = state.settings.users.max_addresses;
    let address = store::insert_address(&state.db, id, &body, max).await?;
    super::mark_written(&state, id).await?;
    Ok(HttpResponse::Created().json(address))
}
