//! Refunds never vanish. A refund owed is written in the order's shard before the gateway is
//! asked (in the very transaction that ends a charged order, where there is one), and
//! deleted once the gateway answered. A refund the gateway fails goes to a retry queue with
//! growing delays (`orders.refund_retry_delays_ms`), consumed by the order-worker; after the
//! last retry it goes to `<prefix>refunds.dead` for an operator, with a log line, the metric
//! `refunds_dead_lettered_total` and an alert. Whatever becomes of the messages (a lost
//! publish, a crash, the dead-letter queue), the reconciler retries every debt past its due
//! time until the gateway takes it. Refunds are idempotent by order id, so a retry never
//! pays back twice.

use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::OrdersError;
use super::model::Order;
use crate::app::AppState;
use crate::infra::db::Databases;

/// A refund still owed.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefundMessage {
    pub order: Uuid,
    /// The order's buyer: the shard holding the debt.
    #[serde(default)]
    pub user: Uuid,
    /// Failed attempts so far.
    pub attempt: u32,
}

/// Refunds a charged order (an order never charged is left alone): the debt first, then the
/// gateway; if the gateway fails, the refund is retried later.
pub async fn refund(state: &AppState, order: &Order) -> Result<(), OrdersError> {
    let mut conn = state.db.shard_for(order.user_id).write_conn().await?;
    owe(&mut conn, order.id, order.user_id, debt_grace(state)).await?;
    drop(conn);
    let owed = RefundMessage {
        order: order.id,
        user: order.user_id,
        attempt: 0,
    };
    if attempt(state, &owed).await? {
        return Ok(());
    }
    let next = RefundMessage { attempt: 1, ..owed };
    if let Err(e) = retry_later(state, &next).await {
        // The debt stays; the reconciler retries it when due.
        tracing::error!(order = %order.id, error = %e, "refund failed and could not be queued; the reconciler retries it");
    }
    Ok(())
}

/// Records that `order` is owed a refund, due for the reconciler after `grace` (the retry
/// queues have it until then). A debt already there stays as it is.
pub async fn owe(
    conn: &mut AsyncPgConnection,
    order: Uuid,
    user: Uuid,
    grace: Duration,
) -> Result<(), OrdersError> {
    diesel::sql_query(
        "INSERT INTO refunds_owed (order_id, user_id, due_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind::<SqlUuid, _>(order)
    .bind::<SqlUuid, _>(user)
    .bind::<BigInt, _>(millis(grace))
    .execute(conn)
    .await?;
    Ok(())
}

/// How long a debt is left to the retry queues before the reconciler takes it: their
/// whole schedule, and a second.
pub fn debt_grace(state: &AppState) -> Duration {
    let delays: u64 = state
        .settings
        .orders
        .refund_retry_delays_ms
        .iter()
        .map(|d| u64::from(*d))
        .sum();
    Duration::from_millis(delays + 1000)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One gateway attempt; true when done (the debt is cleared).
async fn attempt(state: &AppState, owed: &RefundMessage) -> Result<bool, OrdersError> {
    match state.orders.payments.refund(owed.order).await {
        Ok(()) => {
            clear(&state.db, owed.user, owed.order).await?;
            Ok(true)
        }
        Err(e) => {
            metrics::counter!("refunds_failed_total").increment(1);
            tracing::warn!(order = %owed.order, attempt = owed.attempt, error = %e, "refund failed; retrying later");
            Ok(false)
        }
    }
}

async fn clear(db: &Databases, user: Uuid, order: Uuid) -> Result<(), OrdersError> {
    let mut conn = db.shard_for(user).write_conn().await?;
    diesel::sql_query("DELETE FROM refunds_owed WHERE order_id = $1")
        .bind::<SqlUuid, _>(order)
        .execute(&mut conn)
        .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Due {
    #[diesel(sql_type = SqlUuid)]
    order_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    user_id: Uuid,
}

/// Debts retried per shard per reconciler pass.
const DUE_PER_PASS: i32 = 100;

/// The reconciler's part: every debt past its due time, in every shard, goes to the gateway
/// again; one it fails is due again after the longest retry delay. Answers how many it
/// settled.
pub async fn retry_due(state: &AppState) -> Result<usize, OrdersError> {
    let backoff = state
        .settings
        .orders
        .refund_retry_delays_ms
        .iter()
        .max()
        .map_or(Duration::from_secs(60), |d| {
            Duration::from_millis(u64::from(*d))
        });
    let mut settled = 0;
    for shard in state.db.shards() {
        let mut conn = shard.write_conn().await?;
        let due: Vec<Due> = diesel::sql_query(
            "SELECT order_id, user_id FROM refunds_owed WHERE due_at <= now() \
             ORDER BY due_at LIMIT $1",
        )
        .bind::<Integer, _>(DUE_PER_PASS)
        .load(&mut conn)
        .await?;
        drop(conn);
        for debt in due {
            let owed = RefundMessage {
                order: debt.order_id,
                user: debt.user_id,
                attempt: 0,
            };
            if attempt(state, &owed).await? {
                tracing::warn!(order = %owed.order, "a refund left to the reconciler is done");
                settled += 1;
                continue;
            }
            let mut conn = shard.write_conn().await?;
            diesel::sql_query("UPDATE refunds_owed SET due_at = now() + $2 * interval '1 millisecond' WHERE order_id = $1")
                .bind::<SqlUuid, _>(owed.order)
                .bind::<BigInt, _>(millis(backoff))
                .execute(&mut conn)
                .await?;
        }
    }
    Ok(settled)
}

/// Sends a failed refund to its next retry queue, or to the dead-letter queue after the last.
async fn retry_later(state: &AppState, owed: &RefundMessage) -> Result<(), OrdersError> {
    let queues = &state.orders.queues;
    let queue = match queues.refund_retries.get(owed.attempt as usize - 1) {
        Some((queue, _delay)) => queue,
        None => {
            metrics::counter!("refunds_dead_lettered_total").increment(1);
            tracing::error!(order = %owed.order, attempts = owed.attempt, "refund failed for good; dead-lettered for an operator");
            &queues.refunds_dead
        }
    };
    let payload = serde_json::to_vec(owed).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    state.orders.publisher.publish(queue, &payload).await?;
    Ok(())
}

/// The order-worker's refund consumer; runs until shutdown or a broker error.
pub async fn run(state: AppState) -> Result<(), OrdersError> {
    let queue = &state.orders.queues.refunds;
    let (channel, mut consumer) = state.amqp.consume(queue, 16, "refunds").await?;
    loop {
        let delivery = tokio::select! {
            () = state.shutdown.cancelled() => break,
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        let Ok(owed) = serde_json::from_slice::<RefundMessage>(&delivery.data) else {
            tracing::error!("refund message does not parse; dead-lettering");
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            continue;
        };
        if attempt(&state, &owed).await? {
            tracing::info!(order = %owed.order, attempt = owed.attempt, "refund retried and done");
        } else {
            let next = RefundMessage {
                attempt: owed.attempt + 1,
                ..owed
            };
            retry_later(&state, &next).await?;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    if let Err(e) = channel.close(200, "refunds stopping".into()).await {
        tracing::warn!(error = %e, "closing the refund channel");
    }
    Ok(())
}
