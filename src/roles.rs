//! `flashsale serve --role ...`: which parts of the platform this process runs.

use std::net::TcpListener;

use crate::app::{self, AppState, StartupError};

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
    fn runs_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }

    fn workers(self) -> &'static [&'static str] {
        match self {
            Role::Api => &[],
            Role::OrderWorker => &["order-worker"],
            Role::NotifyWorker => &["notify-worker"],
            Role::All => &["order-worker", "notify-worker"],
        }
    }
}

pub async fn serve(state: AppState, role: Role) -> Result<(), StartupError> {
    let http = state.settings.http.clone();
    let server = if role.runs_api() {
        let listener = TcpListener::bind((http.host.as_str(), http.port))?;
        tracing::info!(address = %listener.local_addr()?, "api listening");
        tokio::spawn(app::api_upkeep(state.clone()));
        Some(app::http_server(state, listener)?)
    } else {
        None
    };
    for worker in role.workers() {
        // The queues these workers consume arrive with the orders and notifications
        // features; until then the role starts, reports itself, and waits for shutdown.
        tracing::info!(worker, "worker started; no queue to consume yet");
    }
    match server {
        Some(server) => {
            let handle = server.handle();
            let running = tokio::spawn(server);
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            handle.stop(true).await;
            running.await.map_err(std::io::Error::other)??;
        }
        None => shutdown_signal().await,
    }
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
