//! Operational endpoints (liveness, readiness, `/metrics`, the OpenAPI document) and the
//! metrics sampler every role runs.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{OpenApi, ToSchema};

use crate::app::AppState;
use crate::modules::products::SearchReadiness;
use crate::modules::{auth, notifications, orders, products, users};

/// The API port's probes and docs, and `/metrics` unless it is kept to the ops port
/// (`http.metrics_on_api_port = false`, production: revenue and stock are not for the
/// ingress).
pub fn configure(cfg: &mut web::ServiceConfig, metrics_on_api_port: bool) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/docs", web::get().to(docs_redirect));
    if metrics_on_api_port {
        cfg.route("/metrics", web::get().to(metrics));
    }
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
    document_shared_errors(&mut doc);
    doc
}

/// Answers any operation can give besides its own, each a problem+json body: what the
/// extractors, middleware and limits answer before (or instead of) the handler.
fn document_shared_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let problem = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ProblemBody")))
                    .build(),
            )
            .build()
    };
    let everywhere = [
        (
            "400",
            "invalid_request: a malformed path or query parameter",
        ),
        ("404", "not_found"),
        ("429", "rate_limited (Retry-After)"),
        (
            "503",
            "overloaded or a dependency unavailable (Retry-After)",
        ),
    ];
    let with_body = [
        ("413", "payload_too_large"),
        (
            "415",
            "unsupported_media_type: the body must be application/json",
        ),
        (
            "422",
            "validation_failed: well-formed JSON of the wrong shape",
        ),
    ];
    let secured = [(
        "401",
        "unauthorized: a missing, invalid, expired or revoked token",
    )];
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            let mut shared: Vec<(&str, &str)> = everywhere.to_vec();
            if operation.request_body.is_some() {
                shared.extend(with_body);
            }
            if operation.security.is_some() {
                shared.extend(secured);
            }
            for (status, description) in shared {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(description).into());
            }
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    status: &'static str,
    /// The global database (catalogue, directory, ledger).
    postgres: &'static str,
    /// Each user shard; one that is down makes only its users' orders answer 503.
    shards: Vec<&'static str>,
    redis: &'static str,
    rabbitmq: &'static str,
    /// The product search index (only where this process serves search): `catching_up`
    /// until the indexer has read every change since the index's watermark.
    #[serde(skip_serializing_if = "Option::is_none")]
    search: Option<&'static str>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = Health)))]
async fn health() -> web::Json<Health> {
    web::Json(Health { status: "ok" })
}

/// Readiness: this pod can serve. The global database, Redis and RabbitMQ answer and, where
/// the process serves search, its index is current (a new pod restores a snapshot, then
/// catches up, before it takes traffic); a shard
/// that is down is reported but keeps the pod ready (the catalogue and every other shard's
/// users are still served; its own users' orders answer 503).
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let ((postgres, shards), redis) = tokio::join!(state.db.ping_each(), state.redis.ping());
    let verdict = |ok: bool| if ok { "ok" } else { "unavailable" };
    if let Err(e) = &postgres {
        tracing::warn!(error = %e, "readiness: postgres");
    }
    for (shard, e) in shards
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.as_ref().err()?)))
    {
        tracing::warn!(shard, error = %e, "readiness: a shard is down; its users' orders answer 503");
    }
    if let Err(e) = &redis {
        tracing::warn!(error = %e, "readiness: redis");
    }
    let amqp_ok = state.amqp.is_connected();
    let search = state.products.search_readiness();
    let search_ok = search != SearchReadiness::CatchingUp;
    let all_ok = postgres.is_ok() && redis.is_ok() && amqp_ok && search_ok;
    let body = Readiness {
        status: verdict(all_ok),
        postgres: verdict(postgres.is_ok()),
        shards: shards.iter().map(|s| verdict(s.is_ok())).collect(),
        redis: verdict(redis.is_ok()),
        rabbitmq: verdict(amqp_ok),
        search: match search {
            SearchReadiness::NotServed => None,
            SearchReadiness::CatchingUp => Some("catching_up"),
            SearchReadiness::Current => Some("ok"),
        },
    };
    if all_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text format of every metric this process recorded.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// The probes and `/metrics`: what a worker role serves on `ops.port`.
pub fn configure_probes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics));
}

/// What a role samples besides what its request and message paths record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// `inventory_available{product_id}` of live sales (the API).
    pub stock: bool,
    /// Order queues and the outbox backlog (the order-worker).
    pub order_queues: bool,
    /// Notification queues (the notify-worker).
    pub notification_queues: bool,
}

/// Live sales shown as gauges; bounds the label set of `inventory_available`.
const MAX_STOCK_GAUGES: i64 = 100;

/// Samples pool usage, replication lag, process CPU and memory, and what `sampled` asks,
/// every `interval`, until shutdown; also runs the exporter's upkeep.
pub async fn run_sampler(state: AppState, sampled: Sampled, interval: std::time::Duration) {
    let process = metrics_process::Collector::default();
    process.describe();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        process.collect();
        state.metrics.run_upkeep();
        sample_pools(&state).await;
        if sampled.stock {
            match products::live_stock(&state, MAX_STOCK_GAUGES).await {
                Ok(stock) => {
                    for (product, remaining) in stock {
                        metrics::gauge!("inventory_available", "product_id" => product.to_string())
                            .set(remaining as f64);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sampling flash-sale stock failed"),
            }
        }
        let mut queues = vec![];
        if sampled.order_queues {
            queues.extend(orders::queue_names(&state));
            match crate::infra::events::backlog(&state.db).await {
                Ok(backlog) => metrics::gauge!("outbox_backlog").set(backlog as f64),
                Err(e) => tracing::warn!(error = %e, "sampling the outbox backlog failed"),
            }
        }
        if sampled.notification_queues {
            queues.extend(notifications::queue_names(&state));
        }
        if !queues.is_empty() {
            match state.amqp.queue_depths(&queues).await {
                Ok(depths) => {
                    for (queue, (messages, consumers)) in queues.into_iter().zip(depths) {
                        metrics::gauge!("rabbitmq_queue_depth", "queue" => queue.clone())
                            .set(f64::from(messages));
                        metrics::gauge!("rabbitmq_queue_consumers", "queue" => queue)
                            .set(f64::from(consumers));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sampling queue depths failed"),
            }
        }
    }
}

async fn sample_pools(state: &AppState) {
    for node in state.db.nodes() {
        let pools = std::iter::once(("primary", node.primary()))
            .chain(node.replicas().iter().map(|pool| ("replica", pool)));
        for (role, pool) in pools {
            let pool_state = pool.state();
            let labels = [("db", node.name().to_owned()), ("role", role.to_owned())];
            let in_use = pool_state.connections - pool_state.idle_connections;
            metrics::gauge!("db_pool_connections_in_use", &labels).set(f64::from(in_use));
            metrics::gauge!("db_pool_connections_idle", &labels)
                .set(f64::from(pool_state.idle_connections));
            metrics::gauge!("db_pool_max_size", &labels)
                .set(f64::from(state.settings.database.pool_max_size));
            metrics::counter!("db_pool_waits_total", &labels)
                .absolute(pool_state.statistics.get_waited);
            metrics::counter!("db_pool_timeouts_total", &labels)
                .absolute(pool_state.statistics.get_timed_out);
        }
        for replica in node.replicas() {
            match replication_lag(replica).await {
                Ok(lag) => {
                    metrics::gauge!("db_replication_lag_seconds", "db" => node.name().to_owned())
                        .set(lag)
                }
                Err(e) => {
                    tracing::warn!(error = %e, db = node.name(), "sampling replication lag failed")
                }
            }
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Lag {
    #[diesel(sql_type = diesel::sql_types::Double)]
    seconds: f64,
}

/// Seconds since the replica last replayed a transaction (0 when it replays nothing, e.g.
/// a standalone database standing in for a replica).
async fn replication_lag(
    pool: &crate::infra::db::PgPool,
) -> Result<f64, crate::infra::db::DbError> {
    use diesel_async::RunQueryDsl;
    let mut conn = pool.get().await?;
    let lag: Lag = diesel::sql_query(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)::float8 AS seconds",
    )
    .get_result(&mut conn)
    .await?;
    Ok(lag.seconds)
}
