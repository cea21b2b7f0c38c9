//! Request middleware: a request id on every request and response, a tracing span that
//! carries it, the W3C trace context continued or started, and one structured access-log
//! line per request.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument;

use crate::infra::telemetry;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const MAX_REQUEST_ID_LEN: usize = 128;

pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // Honour a caller's id (a gateway's) when it is short and printable; otherwise mint one.
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = tracing::info_span!(
        "http",
        request_id = %request_id,
        method = %req.method(),
        path = %req.path(),
    );
    let traceparent = telemetry::join_trace(
        &span,
        req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()),
    );
    let started = Instant::now();
    let mut res =
        telemetry::with_traceparent(traceparent, next.call(req).instrument(span.clone())).await?;
    let status = res.status().as_u16();
    record_request(&res, started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(res)
}

/// `http_requests_total{method, route, status}` and `http_request_duration_seconds{method,
/// route}`. The route is the matched pattern (`/orders/{id}`), so ids never become labels.
fn record_request<B>(res: &ServiceResponse<B>, seconds: f64) {
    let request = res.request();
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    metrics::counter!(
        "http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => res.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(seconds);
}
