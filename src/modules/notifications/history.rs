//! Notification history in Redis, per user: a sorted set of ids (all scored 0, so ordered
//! by id; ids are UUIDv7 and sort by creation time) capped at `history_cap` entries, and
//! one hash per notification with its status. Both expire `history_ttl_secs` after the
//! last write. The three keys of a notification share the user's hash tag, so each script
//! touches one Redis Cluster slot.

use chrono::{DateTime, Utc};
use futures_util::future::try_join_all;
use redis::Script;
use uuid::Uuid;

use super::error::NotificationsError;
use super::model::{DeliveryStatus, HistoryItem, Notification};
use crate::config::NotificationsSettings;
use crate::infra::http::paging::{encode_cursor, Page, PageRequest};
use crate::infra::redis::Redis;

/// Records a notification the first time its dedupe key is seen, and tells the worker what
/// to do with it: `send` (queued, not yet sent), `done` (sent or failed already) or
/// `duplicate` (another notification holds the dedupe key).
const ADMIT: &str = r#"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 'duplicate' end
if not owner then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4]) end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'sent' or status == 'failed' then return 'done' end
if not status then
  redis.call('HSET', KEYS[2], 'status', 'queued', unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 'send'
"#;

/// Moves a queued notification to its final status (never back).
const FINISH: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'sent_at', ARGV[2])
return 1
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Send,
    Done,
    Duplicate,
}

pub struct History {
    admit: Script,
    finish: Script,
    cap: usize,
    ttl_secs: u64,
    dedupe_ttl_secs: u64,
}

fn item_key(user: Uuid, id: Uuid) -> String {
    format!("n:{{{user}}}:{id}")
}

fn list_key(user: Uuid) -> String {
    format!("nh:{{{user}}}")
}

fn dedupe_key(user: Uuid, key: &str) -> String {
    format!("nd:{{{user}}}:{key}")
}

impl History {
    pub fn new(settings: &NotificationsSettings) -> Self {
        Self {
            admit: Script::new(ADMIT),
            finish: Script::new(FINISH),
            cap: settings.history_cap,
            ttl_secs: settings.history_ttl_secs,
            dedupe_ttl_secs: settings.dedupe_ttl_secs,
        }
    }

    /// Admits every notification (concurrent calls share one pipelined connection).
    pub async fn admit(
        &self,
        redis: &Redis,
        notifications: &[&Notification],
    ) -> Result<Vec<Admission>, NotificationsError> {
        let replies = try_join_all(notifications.iter().map(|n| {
            let mut invocation = self.admit.prepare_invoke();
            invocation
                .key(redis.key(dedupe_key(n.user_id, &n.dedupe_key)))
                .key(redis.key(item_key(n.user_id, n.id)))
                .key(redis.key(list_key(n.user_id)))
                .arg(n.id.to_string())
                .arg(self.ttl_secs)
                .arg(self.cap)
                .arg(self.dedupe_ttl_secs)
                .arg("channel")
                .arg(n.channel.as_str())
                .arg("priority")
                .arg(n.priority.as_str())
                .arg("subject")
                .arg(n.subject.as_deref().unwrap_or(""))
                .arg("created_at")
                .arg(n.created_at.to_rfc3339());
            let mut conn = redis.conn();
            async move { invocation.invoke_async::<String>(&mut conn).await }
        }))
        .await?;
        replies
            .into_iter()
            .map(|reply| match reply.as_str() {
                "send" => Ok(Admission::Send),
                "done" => Ok(Admission::Done),
                "duplicate" => Ok(Admission::Duplicate),
                other => Err(NotificationsError::Corrupt(format!(
                    "admit replied {other}"
                ))),
            })
            .collect()
    }

    pub async fn finish(
        &self,
        redis: &Redis,
        outcomes: &[(&Notification, DeliveryStatus)],
    ) -> Result<(), NotificationsError> {
        let now = Utc::now().to_rfc3339();
        try_join_all(outcomes.iter().map(|(n, status)| {
            let mut invocation = self.finish.prepare_invoke();
            invocation
                .key(redis.key(item_key(n.user_id, n.id)))
                .arg(status.as_str())
                .arg(if *status == DeliveryStatus::Sent {
                    now.as_str()
                } else {
                    ""
                });
            let mut conn = redis.conn();
            async move { invocation.invoke_async::<i64>(&mut conn).await }
        }))
        .await?;
        Ok(())
    }

    /// A page of `user`'s history, newest first. An item whose hash expired before its id
    /// left the list is skipped; the cursor still follows the list.
    pub async fn page(
        &self,
        redis: &Redis,
        user: Uuid,
        page: PageRequest,
    ) -> Result<Page<HistoryItem>, NotificationsError> {
        let upper = match page.after {
            Some(after) => format!("({after}"),
            None => "+".to_owned(),
        };
        let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
            .arg(redis.key(list_key(user)))
            .arg(upper)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(page.limit + 1)
            .query_async(&mut redis.conn())
            .await?;
        if ids.is_empty() {
            return Ok(Page {
                items: vec![],
                next_cursor: None,
            });
        }
        let has_more = ids.len() as i64 > page.limit;
        let mut pipe = redis::pipe();
        let mut parsed_ids = Vec::with_capacity(ids.len());
        for id in ids.iter().take(page.limit as usize) {
            let id: Uuid = id
                .parse()
                .map_err(|_| NotificationsError::Corrupt(format!("history id {id}")))?;
            pipe.hgetall(redis.key(item_key(user, id)));
            parsed_ids.push(id);
        }
        let hashes: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut redis.conn()).await?;
        let next_cursor = match parsed_ids.last() {
            Some(last) if has_more => Some(encode_cursor(*last)),
            _ => None,
        };
        let items = parsed_ids
            .into_iter()
            .zip(hashes)
            .filter_map(|(id, fields)| item_from(id, &fields))
            .collect();
        Ok(Page { items, next_cursor })
    }
}

/// Reads an enum stored by its serde name.
fn parse_enum<T: serde::de::DeserializeOwned>(value: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::from(value)).ok()
}

fn item_from(id: Uuid, fields: &std::collections::HashMap<String, String>) -> Option<HistoryItem> {
    let field = |name: &str| fields.get(name).map(String::as_str);
    let time = |name: &str| {
        field(name)
            .filter(|v| !v.is_empty())
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    Some(HistoryItem {
        id,
        channel: parse_enum(field("channel")?)?,
        priority: parse_enum(field("priority")?)?,
        subject: field("subject")
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        status: DeliveryStatus::parse(field("status")?)?,
        created_at: time("created_at")?,
        sent_at: time("sent_at"),
    })
}
