//! Stock fences: what keeps a rebuild of a product's stock in Redis from racing the orders
//! committed before it.
//!
//! A worker commits an order's units in Redis, charges it, then writes it sold in its shard.
//! Redis may lose the product between the commit and the write; the rebuild then reads the
//! shelf from PostgreSQL, where that order is not yet sold, and puts its units back on sale.
//! Were the order written sold afterwards, its units would be sold twice. So the rebuild
//! first writes its new epoch into every shard (`fence`), under an exclusive advisory lock
//! per (product, bucket), and only then applies the recorded stock moves and reads. The
//! worker's write checks, in its own transaction and under the same lock taken shared, that
//! no fence is newer than the epoch its commit answered (`voided`). Whichever comes second
//! sees the first: a write that committed before the fence is on the books the rebuild
//! reads; one after it finds its commit void, and its order goes back to take its units
//! again under the new epoch (a late commit), or fails sold out.

use std::collections::BTreeSet;

use diesel::sql_types::{Array, Integer, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::try_join_all;
use uuid::Uuid;

use super::error::OrdersError;
use super::settle;
use super::store;
use crate::app::AppState;
use crate::infra::db::Databases;
use crate::modules::products::{self, CommitEpoch, RebuildPlan, SaleKind};

/// Rebuilds `product`'s stock in Redis from PostgreSQL after a loss (or loads regular
/// stock the first time), fenced: every shard learns the new epoch first, then the stock
/// moves recorded so far reach the shelf, then the numbers are read. Answers the stock it
/// rebuilt with.
pub async fn rebuild_stock(state: &AppState, product: Uuid) -> Result<i64, OrdersError> {
    let plan = products::plan_rebuild(state, product).await?;
    fence(&state.db, &plan).await?;
    let every_shard = (0..state.db.shard_count()).collect();
    settle::apply_stock_moves(state, &every_shard).await?;
    // Regular stock has no per-buyer limit to restore, only the records cancels need.
    let holders = match plan.kind {
        SaleKind::Flash => store::Holders::Live,
        SaleKind::Regular => store::Holders::Cancellable,
    };
    let holdings = store::holdings(&state.db, product, holders).await?;
    Ok(products::rebuild_stock(state, &plan, &holdings).await?)
}

/// Writes the plan's epoch as the fence of each of its buckets, in every shard.
async fn fence(db: &Databases, plan: &RebuildPlan) -> Result<(), OrdersError> {
    let buckets = i32::try_from(plan.buckets).unwrap_or(i32::MAX);
    try_join_all(db.shards().iter().map(|shard| async move {
        let mut pooled = shard.write_conn().await?;
        let conn: &mut AsyncPgConnection = &mut pooled;
        conn.transaction(async |conn| {
            // Waits for every write that checked an older fence to commit.
            diesel::sql_query(
                "SELECT pg_advisory_xact_lock(hashtext($1::text), b) \
                 FROM generate_series(0, $2 - 1) AS b",
            )
            .bind::<SqlUuid, _>(plan.product)
            .bind::<Integer, _>(buckets)
            .execute(conn)
            .await?;
            diesel::sql_query(
                "INSERT INTO stock_fences (product_id, bucket, epoch) \
                 SELECT $1, b, $3 FROM generate_series(0, $2 - 1) AS b \
                 ON CONFLICT (product_id, bucket) \
                 DO UPDATE SET epoch = GREATEST(stock_fences.epoch, excluded.epoch)",
            )
            .bind::<SqlUuid, _>(plan.product)
            .bind::<Integer, _>(buckets)
            .bind::<SqlUuid, _>(plan.epoch)
            .execute(conn)
            .await?;
            Ok::<_, OrdersError>(())
        })
        .await
    }))
    .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Voided {
    #[diesel(sql_type = SqlUuid)]
    order_id: Uuid,
}

/// Of the orders about to be written sold in this transaction, with the epochs their units
/// were committed under, those a rebuild has fenced since: they must not be written. Takes
/// the shared lock first, in a statement of its own, so the read that follows sees any
/// fence committed while it waited.
pub async fn voided(
    conn: &mut AsyncPgConnection,
    sold: &[(Uuid, CommitEpoch)],
) -> Result<BTreeSet<Uuid>, OrdersError> {
    if sold.is_empty() {
        return Ok(BTreeSet::new());
    }
    let products: Vec<Uuid> = sold.iter().map(|(_, c)| c.product).collect();
    let buckets: Vec<i32> = sold
        .iter()
        .map(|(_, c)| i32::try_from(c.bucket).unwrap_or(i32::MAX))
        .collect();
    // In lock order (the fence takes its buckets in order too), so no two wait on each other.
    diesel::sql_query(
        "SELECT pg_advisory_xact_lock_shared(k, b) FROM ( \
             SELECT DISTINCT hashtext(p::text) AS k, b \
             FROM unnest($1::uuid[], $2::int4[]) AS t(p, b) ORDER BY 1, 2) AS locks",
    )
    .bind::<Array<SqlUuid>, _>(&products)
    .bind::<Array<Integer>, _>(&buckets)
    .execute(conn)
    .await?;
    let voided: Vec<Voided> = diesel::sql_query(
        "SELECT DISTINCT c.order_id \
         FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::uuid[]) \
              AS c(order_id, product_id, bucket, epoch) \
         JOIN stock_fences f ON f.product_id = c.product_id AND f.bucket = c.bucket \
                            AND f.epoch > c.epoch",
    )
    .bind::<Array<SqlUuid>, _>(sold.iter().map(|(order, _)| *order).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>(&products)
    .bind::<Array<Integer>, _>(&buckets)
    .bind::<Array<SqlUuid>, _>(sold.iter().map(|(_, c)| c.epoch).collect::<Vec<_>>())
    .load(conn)
    .await?;
    Ok(voided.into_iter().map(|v| v.order_id).collect())
}
