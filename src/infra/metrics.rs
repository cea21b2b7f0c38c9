//! Prometheus metrics. The `metrics` facade has one recorder per process by design, so it is
//! installed once (the first `AppState` does it) and every `AppState` keeps a handle to
//! render `/metrics`. Names and labels are listed in README.md; label values are bounded
//! (routes are patterns, products only those on flash sale).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Accept-to-settled time of an order (the seed's buckets).
pub const ORDER_DURATION_BUCKETS: [f64; 6] = [0.1, 0.3, 0.5, 1.0, 2.0, 5.0];
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder on first use and answers its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // A gauge nobody sets any more (an ended sale's stock) drops out of the scrape.
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
                .set_buckets_for_metric(
                    Matcher::Full("order_duration_seconds".into()),
                    &ORDER_DURATION_BUCKETS,
                )
                .and_then(|b| b.set_buckets(&LATENCY_BUCKETS));
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => handle,
                Err(e) => {
                    // Another recorder owns the process (a library user's): render an
                    // empty page rather than fail the service.
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Times every query of a connection into `db_query_duration_seconds{db}`.
pub struct QueryTimer {
    db: String,
    started: Option<std::time::Instant>,
}

impl QueryTimer {
    pub fn new(db: &str) -> Self {
        // Registered at zero, so "no errors" is a 0 on the dashboard rather than no data.
        metrics::counter!("db_query_errors_total", "db" => db.to_owned()).increment(0);
        Self {
            db: db.to_owned(),
            started: None,
        }
    }
}

impl diesel::connection::Instrumentation for QueryTimer {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent;
        match event {
            InstrumentationEvent::StartQuery { .. } => {
                self.started = Some(std::time::Instant::now());
            }
            InstrumentationEvent::FinishQuery { error, .. } => {
                if let Some(started) = self.started.take() {
                    metrics::histogram!("db_query_duration_seconds", "db" => self.db.clone())
                        .record(started.elapsed().as_secs_f64());
                }
                if error.is_some() {
                    metrics::counter!("db_query_errors_total", "db" => self.db.clone())
                        .increment(1);
                }
            }
            _ => {}
        }
    }
}
