//! Request middleware: a request id on every request and response, a tracing span that
//! carries it, the W3C trace context continued or started, and one structured access-log
//! line per request.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::ResponseError;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::infra::http::problem::Problem;
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

/// The requests this process serves at once (`http.max_in_flight`), shared by every
/// actix worker.
#[derive(Clone)]
pub struct InFlightLimit(pub Arc<Semaphore>);

/// Paths a probe or a scraper calls: never refused, or an overloaded pod would be restarted
/// or go dark just when it is watched most.
const ALWAYS_SERVED: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Refuses a request beyond the in-flight limit with 503 + Retry-After at once, so an
/// overload waits in clients rather than in this process's memory and queues.
pub async fn limit_in_flight(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let permit = match req.app_data::<InFlightLimit>() {
        Some(limit) if !ALWAYS_SERVED.contains(&req.path()) => {
            match limit.0.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    metrics::counter!("http_requests_shed_total").increment(1);
                    let refused = Problem::overloaded().error_response();
                    return Ok(req.into_response(refused));
                }
            }
        }
        _ => None,
    };
    let res = next.call(req).await?.map_into_boxed_body();
    drop(permit);
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

#[cfg(test)]
mod tests {
    use actix_web::{http::StatusCode, middleware::from_fn, test, web, App};

    use super::*;

    #[actix_web::test]
    async fn requests_beyond_the_limit_are_refused_at_once_but_probes_are_served() {
        let limit = InFlightLimit(Arc::new(Semaphore::new(1)));
        let app = test::init_service(
            App::new()
                .app_data(limit.clone())
                .wrap(from_fn(limit_in_flight))
                .route("/orders", web::get().to(|| async { "ok" }))
                .route("/health", web::get().to(|| async { "ok" })),
        )
        .await;
        let get = |path: &str| test::TestRequest::get().uri(path).to_request();

        // One request is in flight: the next is refused, the probe is not.
        let busy = limit.0.clone().try_acquire_owned().expect("a free slot");
        let refused = test::call_service(&app, get("/orders")).await;
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.headers().contains_key("retry-after"));
        let probe = test::call_service(&app, get("/health")).await;
        assert_eq!(probe.status(), StatusCode::OK);

        drop(busy);
        let served = test::call_service(&app, get("/orders")).await;
        assert_eq!(served.status(), StatusCode::OK);
        assert_eq!(limit.0.available_permits(), 1, "the slot is given back");
    }
}
