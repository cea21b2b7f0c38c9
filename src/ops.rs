//! Operational endpoints: liveness, readiness and the OpenAPI document.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{OpenApi, ToSchema};

use crate::app::AppState;
use crate::modules::{auth, notifications, orders, products, users};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/docs", web::get().to(docs_redirect));
}

/// Swagger UI lives under `/docs/`; the bare path is what people type.
async fn docs_redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((actix_web::http::header::LOCATION, "/docs/"))
        .finish()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flashsale",
        description = "Flash-sale e-commerce platform API"
    ),
    paths(health, ready)
)]
struct OpsApi;

/// The whole API description: every module's routes plus these.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = OpsApi::openapi();
    doc.merge(auth::openapi());
    doc.merge(users::openapi());
    doc.merge(products::openapi());
    doc.merge(orders::openapi());
    doc.merge(notifications::openapi());
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    doc
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    status: &'static str,
    postgres: &'static str,
    redis: &'static str,
    rabbitmq: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = Health)))]
async fn health() -> web::Json<Health> {
    web::Json(Health { status: "ok" })
}

/// Readiness: PostgreSQL (global and every shard), Redis and RabbitMQ all answer.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let (postgres, redis) = tokio::join!(state.db.ping(), state.redis.ping());
    let verdict = |ok: bool| if ok { "ok" } else { "unavailable" };
    if let Err(e) = &postgres {
        tracing::warn!(error = %e, "readiness: postgres");
    }
    if let Err(e) = &redis {
        tracing::warn!(error = %e, "readiness: redis");
    }
    let amqp_ok = state.amqp.is_connected();
    let all_ok = postgres.is_ok() && redis.is_ok() && amqp_ok;
    let body = Readiness {
        status: verdict(all_ok),
        postgres: verdict(postgres.is_ok()),
        redis: verdict(redis.is_ok()),
        rabbitmq: verdict(amqp_ok),
    };
    if all_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
