//! Extractor configuration shared by every route: body limits, JSON, path and query errors
//! all become problem bodies with a 4xx status, never a 5xx.

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest};

use super::problem::Problem;

pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _req| json_problem(&err).into())
}

fn json_problem(err: &JsonPayloadError) -> Problem {
    match err {
        JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is too large",
            )
        }
        JsonPayloadError::ContentType => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ),
        // Well-formed JSON of the wrong shape (unknown field, wrong type, missing field).
        JsonPayloadError::Deserialize(e) if e.is_data() => Problem::validation(e.to_string()),
        JsonPayloadError::Deserialize(e) => Problem::bad_request(format!("malformed JSON: {e}")),
        other => Problem::bad_request(format!("unreadable body: {other}")),
    }
}

pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err: PathError, _req: &HttpRequest| {
        Problem::bad_request(format!("invalid path parameter: {err}")).into()
    })
}

pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err: QueryPayloadError, _req: &HttpRequest| {
        Problem::bad_request(format!("invalid query parameter: {err}")).into()
    })
}

/// Answers routes that do not exist with a problem body instead of an empty 404.
pub async fn not_found() -> Result<actix_web::HttpResponse, Problem> {
    Err(Problem::not_found("route"))
}

/// Parses an optional JSON body (empty means `None`) with the same errors as `web::Json`.
pub fn parse_optional_json<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    body: &[u8],
) -> Result<Option<T>, Problem> {
    let empty = body.iter().all(u8::is_ascii_whitespace);
    // A body, or a declared type, must be JSON: text/plain is refused even when empty.
    let declared = req.headers().get(actix_web::http::header::CONTENT_TYPE);
    let is_json = declared
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<actix_web::mime::Mime>().ok())
        .is_some_and(|m| {
            m.subtype() == actix_web::mime::JSON || m.suffix() == Some(actix_web::mime::JSON)
        });
    if (declared.is_some() || !empty) && !is_json {
        return Err(json_problem(&JsonPayloadError::ContentType));
    }
    if empty {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| json_problem(&JsonPayloadError::Deserialize(e)))
}
