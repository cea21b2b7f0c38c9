use actix_web::{web, HttpRequest, HttpResponse};

use super::model::{LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest};
use super::{AuthResponse, AuthUser, VerifyResponse};
use crate::app::AppState;
use crate::infra::http::client_ip::client_ip;
use crate::infra::http::extract::parse_optional_json;
use crate::infra::http::problem::ProblemBody;
use crate::infra::http::Problem;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/auth")
            .route("/register", web::post().to(register))
            .route("/login", web::post().to(login))
            .route("/refresh", web::post().to(refresh))
            .route("/logout", web::post().to(logout))
            .route("/verify", web::get().to(verify)),
    );
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(register, login, refresh, logout, verify))]
pub struct AuthApi;

/// Register/login are unauthenticated, so they are limited per client address.
fn limit_by_ip(state: &AppState, req: &HttpRequest) -> Result<(), Problem> {
    match client_ip(req, &state.settings.http.trusted_proxies) {
        Some(ip) => state.auth.ip_limiter.check(ip),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = AuthResponse), (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "email_taken"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json"), (status = 429, body = ProblemBody, content_type = "application/problem+json")))]
async fn register(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, Problem> {
    limit_by_ip(&state, &req)?;
    let body = body.into_inner();
    let user = super::register_user(
        &state,
        body.email,
        body.password,
        body.full_name,
        body.phone,
    )
    .await?;
    let response = super::start_session(&state, user).await?;
    Ok(HttpResponse::Created().json(response))
}

#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = AuthResponse), (status = 401, body = ProblemBody, content_type = "application/problem+json", description = "invalid_credentials"),
              (status = 429, body = ProblemBody, content_type = "application/problem+json")))]
async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<web::Json<AuthResponse>, Problem> {
    limit_by_ip(&state, &req)?;
    let body = body.into_inner();
    Ok(web::Json(
        super::login(&state, &body.email, body.password).await?,
    ))
}

#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = AuthResponse), (status = 401, body = ProblemBody, content_type = "application/problem+json")))]
async fn refresh(
    state: web::Data<AppState>,
    body: web::Json<RefreshRequest>,
) -> Result<web::Json<AuthResponse>, Problem> {
    Ok(web::Json(
        super::refresh(&state, &body.refresh_token).await?,
    ))
}

#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body(content = Option<LogoutRequest>),
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ProblemBody, content_type = "application/problem+json")))]
async fn logout(
    state: web::Data<AppState>,
    caller: AuthUser,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, Problem> {
    let body: LogoutRequest = parse_optional_json(&req, &body)?.unwrap_or_default();
    super::logout(&state, &caller, body.refresh_token.as_deref()).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/auth/verify", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = VerifyResponse), (status = 401, body = ProblemBody, content_type = "application/problem+json")))]
async fn verify(caller: AuthUser) -> web::Json<VerifyResponse> {
    web::Json(VerifyResponse {
        user_id: caller.user_id,
        role: caller.role,
        exp: caller.exp,
    })
}
