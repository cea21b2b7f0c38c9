//! Keyset pagination shared by every list: `limit` (1..=100, default 20) and an opaque
//! `cursor` naming the last row of the previous page. Lists answer `{items, next_cursor}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Problem;

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items per page, 1..=100 (default 20).
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

/// A validated page request: how many rows, and the id to continue after.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub limit: i64,
    pub after: Option<Uuid>,
}

impl PageQuery {
    pub fn validate(&self) -> Result<PageRequest, Problem> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Problem::bad_request(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        let after = self.cursor.as_deref().map(decode_cursor).transpose()?;
        Ok(PageRequest { limit, after })
    }
}

fn decode_cursor(cursor: &str) -> Result<Uuid, Problem> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok())
        .ok_or_else(|| Problem::bad_request("cursor is not valid"))
}

pub fn encode_cursor(last: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(last.as_bytes())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows fetched in key order: the extra row only
    /// tells that another page exists.
    pub fn from_rows(mut rows: Vec<T>, request: PageRequest, key: impl Fn(&T) -> Uuid) -> Self {
        let has_more = rows.len() as i64 > request.limit;
        rows.truncate(request.limit as usize);
        let next_cursor = if has_more {
            rows.last().map(|last| encode_cursor(key(last)))
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }
}
