//! `flashsale serve --role ...`: which parts of the platform this process runs.

use std::net::TcpListener;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::app::{self, AppState, StartupError};
use crate::infra::{events, telemetry};
use crate::modules::{notifications, orders, products};
use crate::ops;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API (every domain's routes).
    Api,
    /// Consumes the order queue: persist, pay, notify, emit events.
    OrderWorker,
    /// Consumes the notification queues and calls the providers.
    NotifyWorker,
    /// Everything in one process (local development, demos).
    All,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::OrderWorker => "order-worker",
            Role::NotifyWorker => "notify-worker",
            Role::All => "all",
        }
    }

    fn runs_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }

    fn runs_order_worker(self) -> bool {
        matches!(self, Role::OrderWorker | Role::All)
    }

    fn runs_notify_worker(self) -> bool {
        matches!(self, Role::NotifyWorker | Role::All)
    }
}

/// Keeps a worker consuming: a broker or database failure restarts it with exponential
/// backoff instead of ending the process.
async fn supervise<F, Fut, E>(name: &'static str, state: AppState, run: F)
where
    F: Fn(AppState) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let stopping = state.shutdown.clone();
    let outcome = (|| run(state.clone()))
        .retry(policy)
        .when(|_| !stopping.is_cancelled())
        .notify(|e, wait| tracing::error!(worker = name, error = %e, ?wait, "worker stopped; restarting"))
        .await;
    if let Err(e) = outcome {
        tracing::error!(worker = name, error = %e, "worker gave up");
    }
}

pub async fn serve(state: AppState, role: Role) -> Result<(), StartupError> {
    let http = state.settings.http.clone();
    let mut workers = vec![];
    let sampled = ops::Sampled {
        stock: role.runs_api(),
        order_queues: role.runs_order_worker(),
        notification_queues: role.runs_notify_worker(),
    };
    tokio::spawn(ops::run_sampler(
        state.clone(),
        sampled,
        Duration::from_millis(http.metrics_sample_ms),
    ));
    let mut servers = vec![];
    if role.runs_api() {
        let listener = crate::infra::http::listen(&http.host, http.port, http.listen_backlog)?;
        tracing::info!(address = %listener.local_addr()?, "api listening");
        tokio::spawn(app::api_upkeep(state.clone()));
        products::spawn_indexer(state.clone());
        tokio::spawn(orders::run_admission(state.clone()));
        tokio::spawn(orders::run_feed(state.clone()));
        servers.push(app::http_server(state.clone(), listener)?);
    }
    // Every role but an API that serves its own /metrics has the ops port.
    if !role.runs_api() || !http.metrics_on_api_port {
        let listener = TcpListener::bind((http.host.as_str(), http.ops_port))?;
        tracing::info!(address = %listener.local_addr()?, "probes and metrics listening");
        servers.push(app::ops_server(state.clone(), listener)?);
    }
    if role.runs_order_worker() {
        tokio::spawn(orders::run_reconciler(state.clone()));
        tokio::spawn(products::run_auditor(state.clone()));
        tokio::spawn(events::run_relay(
            state.db.clone(),
            state.settings.kafka.clone(),
            state.shutdown.clone(),
        ));
        workers.push(tokio::spawn(supervise(
            "order-worker",
            state.clone(),
            orders::run_worker,
        )));
        workers.push(tokio::spawn(supervise(
            "refunds",
            state.clone(),
            orders::run_refunds,
        )));
    }
    if role.runs_notify_worker() {
        workers.push(tokio::spawn(supervise(
            "notify-worker",
            state.clone(),
            notifications::run_worker,
        )));
    }
    let handles: Vec<_> = servers.iter().map(|s| s.handle()).collect();
    let running: Vec<_> = servers.into_iter().map(tokio::spawn).collect();
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests and batches");
    // Workers stop taking messages and finish the batch in hand; the HTTP server stops
    // accepting and finishes in-flight requests (each waits for its broker confirm).
    state.shutdown.cancel();
    let grace = Duration::from_secs(http.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        futures_util::future::join_all(handles.iter().map(|h| h.stop(true))).await;
        futures_util::future::join_all(workers).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "grace period over; unacked messages return to their queues"
        );
    }
    for server in running {
        server.await.map_err(std::io::Error::other)??;
    }
    telemetry::shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
