use actix_web::{web, HttpResponse};
use uuid::Uuid;

use super::model::{HistoryItem, SendAccepted, SendRequest};
use crate::app::AppState;
use crate::infra::http::paging::{Page, PageQuery};
use crate::infra::http::problem::ProblemBody;
use crate::infra::http::Problem;
use crate::modules::auth::AuthUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/notifications")
            .route("/send", web::post().to(send))
            .route("/user/{user_id}", web::get().to(history)),
    );
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(send, history))]
pub struct NotificationsApi;

#[utoipa::path(post, path = "/notifications/send", tag = "notifications", security(("bearer" = [])),
    request_body = SendRequest,
    responses((status = 202, body = SendAccepted, description = "queued; the notify-worker sends it"),
              (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "admins only"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "no such user"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json"), (status = 503, body = ProblemBody, content_type = "application/problem+json")))]
async fn send(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<SendRequest>,
) -> Result<HttpResponse, Problem> {
    caller.require_admin()?;
    let accepted = super::send(&state, body.into_inner()).await?;
    Ok(HttpResponse::Accepted().json(accepted))
}

#[utoipa::path(get, path = "/notifications/user/{user_id}", tag = "notifications", security(("bearer" = [])),
    params(("user_id" = Uuid, Path), PageQuery),
    responses((status = 200, body = Page<HistoryItem>, description = "newest first"),
              (status = 403, body = ProblemBody, content_type = "application/problem+json", description = "not yours")))]
async fn history(
    state: web::Data<AppState>,
    caller: AuthUser,
    user: web::Path<Uuid>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let user = user.into_inner();
    caller.require_self_or_admin(user)?;
    let page = query.validate()?;
    let items = state
        .notifications
        .history
        .page(&state.redis, user, page)
        .await?;
    Ok(HttpResponse::Ok().json(items))
}
