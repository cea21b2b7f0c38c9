//! Structured logs through tracing: JSON lines in production, readable lines for people.
//! `RUST_LOG` overrides the configured filter.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The OTLP exporter's provider, when tracing export is configured; kept to flush at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Logs to stderr and, when `telemetry.otlp_endpoint` is set, spans to an OTLP collector
/// (Jaeger, Tempo...) as `service_name`. A second init (tests build many apps in one
/// process) keeps the first subscriber.
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings, service_name: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log.filter.as_str()));
    let logs = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let spans = otlp_tracer(telemetry, service_name)
        .map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init();
}

fn otlp_tracer(
    settings: &TelemetrySettings,
    service_name: &str,
) -> Option<opentelemetry_sdk::trace::Tracer> {
    if settings.otlp_endpoint.is_empty() {
        return None;
    }
    let exporter = match SpanExporter::builder()
        .with_http()
        .with_endpoint(settings.otlp_endpoint.as_str())
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("flashsale: OTLP exporter not started ({e}); spans are not exported");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("flashsale");
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// Flushes buffered spans; called once when the process stops.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(e) = provider.shutdown() {
            eprintln!("flashsale: flushing spans failed: {e}");
        }
    }
}

/// Makes `span` part of the caller's trace (`traceparent` header) and answers the trace
/// context to hand on to queues and events. With span export on, that is the span's own
/// context (same trace, this span as parent); without, the caller's context passes through
/// unchanged, or a new trace starts.
pub fn join_trace(span: &tracing::Span, traceparent: Option<&str>) -> String {
    let incoming = continue_or_start_trace(traceparent);
    if PROVIDER.get().is_none() {
        return incoming;
    }
    let propagator = TraceContextPropagator::new();
    let carrier = HashMap::from([("traceparent".to_owned(), incoming.clone())]);
    let _ = span.set_parent(propagator.extract(&carrier));
    let mut outgoing = HashMap::new();
    propagator.inject_context(&span.context(), &mut outgoing);
    outgoing.remove("traceparent").unwrap_or(incoming)
}

/// Puts a batch's span in the trace of its first item and links it to the others' traces.
pub fn join_batch<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    let mut traces = traceparents.into_iter();
    join_trace(span, traces.next());
    for traceparent in traces {
        link_trace(span, traceparent);
    }
}

/// Links `span` to another trace.
fn link_trace(span: &tracing::Span, traceparent: &str) {
    if PROVIDER.get().is_none() || !is_valid_traceparent(traceparent) {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let linked = TraceContextPropagator::new().extract(&carrier);
    span.add_link(linked.span().span_context().clone());
}

tokio::task_local! {
    /// The W3C trace context of the request being served.
    static TRACEPARENT: String;
}

/// The trace context of the current request (set by the HTTP middleware), to be carried
/// into queue messages and events so one order is one trace across the roles.
pub fn current_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok()
}

/// Runs `work` with `traceparent` as the current trace context.
pub async fn with_traceparent<F: std::future::Future>(traceparent: String, work: F) -> F::Output {
    TRACEPARENT.scope(traceparent, work).await
}

/// A caller's `traceparent` header when it is valid W3C (version 00), else a new trace.
pub fn continue_or_start_trace(header: Option<&str>) -> String {
    header
        .filter(|value| is_valid_traceparent(value))
        .map(str::to_owned)
        .unwrap_or_else(start_trace)
}

fn start_trace() -> String {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace_id}-{span_id}-01")
}

fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let non_zero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, span, flags]
        if *version == "00" && hex(trace, 32) && non_zero(trace) && hex(span, 16) && non_zero(span) && hex(flags, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_continued_when_valid_and_started_otherwise() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(continue_or_start_trace(Some(valid)), valid);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let started = continue_or_start_trace(Some(bad));
            assert_ne!(started, bad);
            assert!(is_valid_traceparent(&started), "{started}");
        }
    }
}
