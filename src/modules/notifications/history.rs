//! Notification history in Redis, per user: a sorted set of ids (all scored 0, so ordered
//! by id; ids are UUIDv7 and sort by creation time) capped at `history_cap` entries, and
//! one hash per notification with its status. Both expire `history_ttl_secs` after the
//! last write. A user's keys share their hash tag, so a user's history lives in one Redis
//! Cluster slot.

use chrono::{DateTime, Utc};
use futures_util::future::try_join_all;
use redis::Script;
use uuid::Uuid;

use super::error::NotificationsError;
use super::model::{DeliveryStatus, HistoryItem, Notification};
use crate::config::NotificationsSettings;
use crate::infra::http::paging::{encode_cursor, Page, PageRequest};
use crate::infra::redis::Redis;

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
            finish: Script::new(FINISH),
            cap: settings.history_cap,
            ttl_secs: settings.history_ttl_secs,
            dedupe_ttl_secs: settings.dedupe_ttl_secs,
        }
    }

    /// Tells the worker what to do with each notification: `Send` (queued, not yet sent),
    /// `Done` (sent or failed already) or `Duplicate` (another notification holds its dedupe
    /// key). A notification seen for the first time takes its dedupe key and enters its
    /// user's history as `queued`. Plain commands in two pipelined round trips for the whole
    /// batch: a script per notification cost Redis twice the CPU.
    pub async fn admit(
        &self,
        redis: &Redis,
        notifications: &[&Notification],
    ) -> Result<Vec<Admission>, NotificationsError> {
        let ids: Vec<String> = notifications.iter().map(|n| n.id.to_string()).collect();
        let items: Vec<String> = notifications
            .iter()
            .map(|n| redis.key(item_key(n.user_id, n.id)))
            .collect();
        // Who holds each dedupe key (taking it when free: `SET NX GET` answers the holder
        // before, nil if none), and how far each notification got.
        let mut look = redis::pipe();
        for ((n, id), item) in notifications.iter().zip(&ids).zip(&items) {
            look.cmd("SET")
                .arg(redis.key(dedupe_key(n.user_id, &n.dedupe_key)))
                .arg(id)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(self.dedupe_ttl_secs)
                .hget(item, "status");
        }
        let seen: Vec<Option<String>> = look.query_async(&mut redis.conn()).await?;
        if seen.len() != 2 * notifications.len() {
            return Err(NotificationsError::Corrupt(format!(
                "admit: {} replies for {} notifications",
                seen.len(),
                notifications.len()
            )));
        }
        let (mut queue, mut entering) = (redis::pipe(), false);
        let mut admissions = Vec::with_capacity(notifications.len());
        let entries = notifications.iter().zip(&ids).zip(&items);
        for (((n, id), item), reply) in entries.zip(seen.chunks_exact(2)) {
            let (holder, status) = (reply[0].as_deref(), reply[1].as_deref());
            admissions.push(match status {
                _ if holder.is_some_and(|holder| holder != id) => Admission::Duplicate,
                Some("sent" | "failed") => Admission::Done,
                Some(_) => Admission::Send,
                None => {
                    self.enter_history(&mut queue, redis, n, id, item);
                    entering = true;
                    Admission::Send
                }
            });
        }
        if entering {
            queue.query_async::<()>(&mut redis.conn()).await?;
        }
        Ok(admissions)
    }

    /// Adds a new notification to its user's history as `queued` (never over a status a
    /// concurrent delivery of it already wrote), keeping the newest `history_cap`.
    fn enter_history(
        &self,
        pipe: &mut redis::Pipeline,
        redis: &Redis,
        n: &Notification,
        id: &str,
        item: &str,
    ) {
        let list = redis.key(list_key(n.user_id));
        let ttl = i64::try_from(self.ttl_secs).unwrap_or(i64::MAX);
        let keep = isize::try_from(self.cap).unwrap_or(isize::MAX);
        pipe.hset_nx(item, "status", "queued")
            .ignore()
            .hset_multiple(
                item,
                &[
                    ("channel", n.channel.as_str().to_owned()),
                    ("priority", n.priority.as_str().to_owned()),
                    ("subject", n.subject.clone().unwrap_or_default()),
                    ("created_at", n.created_at.to_rfc3339()),
                ],
            )
            .ignore()
            .expire(item, ttl)
            .ignore()
            .zadd(&list, id, 0)
            .ignore()
            .zremrangebyrank(&list, 0, -(keep + 1))
            .ignore()
            .expire(&list, ttl)
            .ignore();
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
