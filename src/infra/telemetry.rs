//! Structured logs through tracing: JSON lines in production, readable lines for people.
//! `RUST_LOG` overrides the configured filter.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.filter.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests build many apps in one process) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Flushes what telemetry still buffers; called once when the process stops.
pub fn shutdown() {}

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
