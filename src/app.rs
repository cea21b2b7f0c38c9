//! The application state, built once before the HTTP server so every actix worker shares
//! the same pools and clients, and the HTTP app every role and test serves.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Settings;
use crate::infra::amqp::Amqp;
use crate::infra::db::{Databases, DbError};
use crate::infra::http::{extract, middleware};
use crate::infra::redis::Redis;
use crate::modules::{auth, notifications, orders, products, users};
use crate::ops;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Arc<Databases>,
    pub redis: Redis,
    pub amqp: Amqp,
    pub auth: Arc<auth::AuthState>,
    pub products: Arc<products::ProductsState>,
    pub orders: Arc<orders::OrdersState>,
    pub notifications: Arc<notifications::NotificationsState>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled on SIGTERM: workers stop taking messages, loops end.
    pub shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("auth: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("products: {0}")]
    Products(#[from] products::ProductsError),
    #[error("orders: {0}")]
    Orders(#[from] orders::OrdersError),
    #[error("notifications: {0}")]
    Notifications(#[from] notifications::NotificationsError),
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
}

impl AppState {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let db = Databases::connect(&settings.database).await?;
        let redis = Redis::connect(&settings.redis).await?;
        let amqp = Amqp::connect(&settings.amqp).await?;
        let auth = auth::AuthState::new(&settings.auth, &settings.rate_limit)?;
        let products = products::ProductsState::open(&settings).await?;
        let orders = orders::OrdersState::new(&settings, &amqp, &redis).await?;
        let notifications = notifications::NotificationsState::new(&settings, &amqp).await?;
        Ok(Self {
            settings: Arc::new(settings),
            db: Arc::new(db),
            redis,
            amqp,
            auth: Arc::new(auth),
            products: Arc::new(products),
            orders: Arc::new(orders),
            notifications: Arc::new(notifications),
            metrics: crate::infra::metrics::install(),
            shutdown: CancellationToken::new(),
        })
    }
}

/// Starts the HTTP API on `listener`. The server does not install signal handlers: the
/// caller decides when to stop it (see `roles`).
pub fn http_server(state: AppState, listener: TcpListener) -> std::io::Result<Server> {
    let http = state.settings.http.clone();
    let data = web::Data::new(state);
    let openapi = ops::openapi();
    let in_flight = middleware::InFlightLimit(Arc::new(Semaphore::new(http.max_in_flight)));
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(in_flight.clone())
            .app_data(extract::json_config(http.body_limit_bytes))
            .app_data(web::PayloadConfig::new(http.body_limit_bytes))
            .app_data(extract::path_config())
            .app_data(extract::query_config())
            .wrap(from_fn(middleware::limit_in_flight))
            .wrap(from_fn(middleware::request_context))
            .configure(|cfg| ops::configure(cfg, http.metrics_on_api_port))
            .configure(auth::configure)
            .configure(users::configure)
            .configure(products::configure)
            .configure(orders::configure)
            .configure(notifications::configure)
            .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi.clone()))
            .default_service(web::to(extract::not_found))
    })
    .keep_alive(Duration::from_secs(http.keep_alive_secs))
    .client_request_timeout(Duration::from_millis(http.client_request_timeout_ms))
    .shutdown_timeout(http.shutdown_grace_secs)
    .disable_signals();
    if http.workers > 0 {
        server = server.workers(http.workers);
    }
    Ok(server.listen(listener)?.run())
}

/// The probes and `/metrics` on their own port, for roles without the API.
pub fn ops_server(state: AppState, listener: TcpListener) -> std::io::Result<Server> {
    let grace = state.settings.http.shutdown_grace_secs;
    let data = web::Data::new(state);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(ops::configure_probes)
            .default_service(web::to(extract::not_found))
    })
    .workers(1)
    .shutdown_timeout(grace)
    .disable_signals()
    .listen(listener)?
    .run())
}

/// Background upkeep the API role runs while it serves: the hot catalogue preloaded once,
/// then idle rate-limiter entries dropped every minute.
pub async fn api_upkeep(state: AppState) {
    match products::preload_hot(&state).await {
        Ok(count) => tracing::info!(count, "hot products preloaded into Redis"),
        Err(e) => {
            tracing::warn!(error = %e, "preloading hot products failed; caches fill on demand")
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        state.auth.forget_idle_clients();
    }
}
