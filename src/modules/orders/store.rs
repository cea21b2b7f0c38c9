//! Orders and their items in the buyer's shard.

use std::collections::{BTreeMap, BTreeSet};

use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Integer, Nullable, Numeric, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::future::try_join_all;
use uuid::Uuid;

use super::error::OrdersError;
use super::fences;
use super::model::{Order, OrderItem, OrderKind, OrderStatus};
use super::refunds;
use crate::infra::db::{shard_index, Databases, ReadFrom};
use crate::infra::events::{self, Change, OrderEvent, EVENT_VERSION};
use crate::infra::http::paging::PageRequest;
use crate::modules::products::{CommitEpoch, Holding, StockMove};

diesel::table! {
    orders (id) {
        id -> Uuid,
        user_id -> Uuid,
        status -> Text,
        kind -> Text,
        total_amount -> Numeric,
        payment_method -> Text,
        shipping_address -> Nullable<Text>,
        failure_reason -> Nullable<Text>,
        created_at -> Timestamptz,
        idempotency_key -> Nullable<Text>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    order_items (order_id, product_id) {
        order_id -> Uuid,
        product_id -> Uuid,
        quantity -> Int4,
        price -> Numeric,
    }
}

diesel::table! {
    /// Stock moves on their way to the global ledger (see `pending_moves`).
    ledger_pending (id) {
        id -> Int8,
        product_id -> Uuid,
        delta -> Int4,
    }
}

diesel::joinable!(order_items -> orders (order_id));
diesel::allow_tables_to_appear_in_same_query!(orders, order_items);

#[derive(Queryable, Selectable)]
#[diesel(table_name = orders)]
struct OrderRow {
    id: Uuid,
    user_id: Uuid,
    status: String,
    total_amount: BigDecimal,
    payment_method: String,
    shipping_address: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = order_items)]
struct ItemRow {
    order_id: Uuid,
    product_id: Uuid,
    quantity: i32,
    price: BigDecimal,
}

/// An order to persist, with the status it starts in.
#[derive(Clone, Copy)]
pub struct NewOrder<'a> {
    pub order: &'a Order,
    pub kind: OrderKind,
    pub status: OrderStatus,
    pub failure_reason: Option<&'static str>,
    /// Trace context carried into the order's events.
    pub traceparent: Option<&'a str>,
    /// The request's scoped Idempotency-Key (None: a row that must not claim it).
    pub idempotency_key: Option<&'a str>,
    /// Where a paid order's units were committed in Redis: it is written only if no rebuild
    /// has fenced them since (see `fences`). Empty for a row that sells nothing.
    pub sold_under: &'a [CommitEpoch],
}

/// What a batch write did: the orders it inserted, and the paid ones it did not write
/// because a rebuild of their stock voided their commits.
#[derive(Debug, Default)]
pub struct Written {
    pub inserted: BTreeSet<Uuid>,
    pub voided: BTreeSet<Uuid>,
}

/// An `order.<event>` event of `order` now in `status`.
fn event(order: &Order, status: OrderStatus, name: &str, traceparent: Option<&str>) -> OrderEvent {
    OrderEvent {
        v: EVENT_VERSION,
        id: Uuid::now_v7(),
        event_type: format!("order.{name}"),
        order_id: order.id,
        user_id: order.user_id,
        status: status.as_str().to_owned(),
        total_amount: order.total_amount.to_string(),
        occurred_at: Utc::now(),
        traceparent: traceparent.map(str::to_owned),
    }
}

/// `order.created`, then the event of the status the order was written in.
fn events_of_new(new: &NewOrder<'_>) -> Vec<OrderEvent> {
    let mut events = vec![event(
        new.order,
        OrderStatus::Pending,
        "created",
        new.traceparent,
    )];
    if new.status != OrderStatus::Pending {
        events.push(event(
            new.order,
            new.status,
            new.status.as_str(),
            new.traceparent,
        ));
    }
    events
}

/// Writes orders into their shards, one transaction per shard (the shards at once), with
/// their events and the stock their paid orders took (one move per product); orders that
/// exist are left as they are (a redelivered message inserts nothing), and so are paid
/// orders whose commits a rebuild fenced since.
pub async fn insert_batch(db: &Databases, batch: &[NewOrder<'_>]) -> Result<Written, OrdersError> {
    let mut by_shard: BTreeMap<usize, Vec<&NewOrder<'_>>> = BTreeMap::new();
    for new in batch {
        by_shard
            .entry(shard_index(new.order.user_id, db.shard_count()))
            .or_default()
            .push(new);
    }
    let per_shard = try_join_all(
        by_shard
            .into_iter()
            .map(|(shard, orders)| insert_into_shard(db, shard, orders)),
    )
    .await?;
    let mut written = Written::default();
    for shard in per_shard {
        written.inserted.extend(shard.inserted);
        written.voided.extend(shard.voided);
    }
    Ok(written)
}

#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

async fn insert_into_shard(
    db: &Databases,
    shard: usize,
    batch: Vec<&NewOrder<'_>>,
) -> Result<Written, OrdersError> {
    let mut pooled = db.shards()[shard].write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction(async |conn| {
        let sold_under: Vec<(Uuid, CommitEpoch)> = batch
            .iter()
            .filter(|n| n.status == OrderStatus::Paid)
            .flat_map(|n| n.sold_under.iter().map(|under| (n.order.id, *under)))
            .collect();
        let voided = fences::voided(conn, &sold_under).await?;
        let batch: Vec<&NewOrder<'_>> = batch
            .into_iter()
            .filter(|n| !voided.contains(&n.order.id))
            .collect();
        let fresh = insert_orders(conn, &batch).await?;
        // Only the orders written now: a redelivered one has its items, and a row refused
        // for its Idempotency-Key (another order holds it) has no order to hang them on.
        let written: Vec<&NewOrder<'_>> = batch
            .iter()
            .copied()
            .filter(|n| fresh.contains(&n.order.id))
            .collect();
        insert_items(conn, &written).await?;
        let written: Vec<&&NewOrder<'_>> = written.iter().collect();
        let events: Vec<Vec<OrderEvent>> = written.iter().map(|n| events_of_new(n)).collect();
        let changes: Vec<Change<'_>> = events.iter().map(|e| Change { events: e }).collect();
        events::append(conn, &changes).await?;
        let sold = written
            .iter()
            .filter(|n| n.status == OrderStatus::Paid)
            .map(|n| n.order);
        record_moves(conn, &units_by_product(sold, -1)).await?;
        Ok::<_, OrdersError>(Written {
            inserted: fresh.into_iter().collect(),
            voided,
        })
    })
    .await
}

/// One statement per batch whose text does not grow with it (columns as arrays): parsing
/// and planning a multi-row VALUES list cost PostgreSQL more than the rows themselves.
async fn insert_orders(
    conn: &mut AsyncPgConnection,
    batch: &[&NewOrder<'_>],
) -> Result<Vec<Uuid>, OrdersError> {
    let inserted: Vec<Inserted> = diesel::sql_query(
        "INSERT INTO orders (id, user_id, status, kind, total_amount, payment_method, \
                             shipping_address, failure_reason, created_at, idempotency_key) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::numeric[], \
                              $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::text[]) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind::<Array<SqlUuid>, _>(batch.iter().map(|n| n.order.id).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>(batch.iter().map(|n| n.order.user_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(batch.iter().map(|n| n.status.as_str()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(batch.iter().map(|n| n.kind.as_str()).collect::<Vec<_>>())
    .bind::<Array<Numeric>, _>(
        batch
            .iter()
            .map(|n| &n.order.total_amount)
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Text>, _>(
        batch
            .iter()
            .map(|n| n.order.payment_method.as_str())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Nullable<Text>>, _>(
        batch
            .iter()
            .map(|n| n.order.shipping_address.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Nullable<Text>>, _>(batch.iter().map(|n| n.failure_reason).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>(batch.iter().map(|n| n.order.created_at).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(batch.iter().map(|n| n.idempotency_key).collect::<Vec<_>>())
    .load(conn)
    .await?;
    Ok(inserted.into_iter().map(|row| row.id).collect())
}

async fn insert_items(
    conn: &mut AsyncPgConnection,
    batch: &[&NewOrder<'_>],
) -> Result<(), OrdersError> {
    let items: Vec<(Uuid, &OrderItem)> = batch
        .iter()
        .flat_map(|n| n.order.items.iter().map(|item| (n.order.id, item)))
        .collect();
    diesel::sql_query(
        "INSERT INTO order_items (order_id, product_id, quantity, price) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::numeric[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(items.iter().map(|(order, _)| *order).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>(items.iter().map(|(_, i)| i.product_id).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(items.iter().map(|(_, i)| i.quantity).collect::<Vec<_>>())
    .bind::<Array<Numeric>, _>(items.iter().map(|(_, i)| &i.price).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// An order and the user who owns it (whose shard holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderOwner {
    pub order: Uuid,
    pub user: Uuid,
}

impl From<&Order> for OrderOwner {
    fn from(order: &Order) -> Self {
        Self {
            order: order.id,
            user: order.user_id,
        }
    }
}

/// Current statuses of some orders (on one or more shards); absent ones are not persisted.
pub async fn statuses(
    db: &Databases,
    owners: &[OrderOwner],
) -> Result<BTreeMap<Uuid, OrderStatus>, OrdersError> {
    let mut by_shard: BTreeMap<usize, Vec<Uuid>> = BTreeMap::new();
    for owner in owners {
        by_shard
            .entry(shard_index(owner.user, db.shard_count()))
            .or_default()
            .push(owner.order);
    }
    let mut found = BTreeMap::new();
    for (shard, ids) in by_shard {
        let mut conn = db.shards()[shard].write_conn().await?;
        let rows: Vec<(Uuid, String)> = orders::table
            .filter(orders::id.eq_any(&ids))
            .select((orders::id, orders::status))
            .load(&mut conn)
            .await?;
        for (id, status) in rows {
            let status =
                OrderStatus::parse(&status).ok_or_else(|| OrdersError::Corrupt(status.clone()))?;
            found.insert(id, status);
        }
    }
    Ok(found)
}

/// A user's request identified by its scoped Idempotency-Key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyOwner<'a> {
    pub user: Uuid,
    pub key: &'a str,
}

/// The orders that hold some users' Idempotency-Keys (from their shards' primaries): the
/// key of each found, and the order holding it.
pub async fn orders_holding<'a>(
    db: &Databases,
    keys: &[KeyOwner<'a>],
) -> Result<BTreeMap<KeyOwner<'a>, Uuid>, OrdersError> {
    let mut by_shard: BTreeMap<usize, Vec<KeyOwner<'a>>> = BTreeMap::new();
    for owner in keys {
        by_shard
            .entry(shard_index(owner.user, db.shard_count()))
            .or_default()
            .push(*owner);
    }
    let mut found = BTreeMap::new();
    for (shard, owners) in by_shard {
        let mut conn = db.shards()[shard].write_conn().await?;
        // Pairs, one index probe each: `user_id = ANY(..) AND key = ANY(..)` probes every
        // user with every key (a batch of 250 orders: 62,500 probes).
        let rows: Vec<KeyHolder> = diesel::sql_query(
            "SELECT o.id, o.user_id, o.idempotency_key \
             FROM unnest($1::uuid[], $2::text[]) AS k (user_id, key) \
             JOIN orders o ON o.user_id = k.user_id AND o.idempotency_key = k.key",
        )
        .bind::<Array<SqlUuid>, _>(owners.iter().map(|o| o.user).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(owners.iter().map(|o| o.key).collect::<Vec<_>>())
        .load(&mut conn)
        .await?;
        for row in rows {
            if let Some(owner) = owners
                .iter()
                .find(|o| o.user == row.user_id && o.key == row.idempotency_key)
            {
                found.insert(*owner, row.id);
            }
        }
    }
    Ok(found)
}

#[derive(QueryableByName)]
struct KeyHolder {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    user_id: Uuid,
    #[diesel(sql_type = Text)]
    idempotency_key: String,
}

pub async fn find(
    db: &Databases,
    user: Uuid,
    order: Uuid,
    from: ReadFrom,
) -> Result<Option<Order>, OrdersError> {
    let mut conn = db.shard_for(user).read_conn(from).await?;
    let row: Option<OrderRow> = orders::table
        .filter(orders::id.eq(order))
        .filter(orders::user_id.eq(user))
        .select(OrderRow::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut assembled = assemble(&mut conn, vec![row]).await?;
    Ok(assembled.pop())
}

/// Finds an order without knowing its owner (admins): every shard is asked.
pub async fn find_anywhere(db: &Databases, order: Uuid) -> Result<Option<Order>, OrdersError> {
    for shard in db.shards() {
        let mut conn = shard.write_conn().await?;
        let row: Option<OrderRow> = orders::table
            .find(order)
            .select(OrderRow::as_select())
            .first(&mut conn)
            .await
            .optional()?;
        if let Some(row) = row {
            return Ok(assemble(&mut conn, vec![row]).await?.pop());
        }
    }
    Ok(None)
}

/// A user's orders, newest first.
pub async fn list_for_user(
    db: &Databases,
    user: Uuid,
    page: PageRequest,
    from: ReadFrom,
) -> Result<Vec<Order>, OrdersError> {
    let mut conn = db.shard_for(user).read_conn(from).await?;
    let mut query = orders::table
        .filter(orders::user_id.eq(user))
        .select(OrderRow::as_select())
        .order(orders::id.desc())
        .limit(page.limit + 1)
        .into_boxed();
    if let Some(after) = page.after {
        query = query.filter(orders::id.lt(after));
    }
    let rows = query.load(&mut conn).await?;
    assemble(&mut conn, rows).await
}

async fn assemble(
    conn: &mut AsyncPgConnection,
    rows: Vec<OrderRow>,
) -> Result<Vec<Order>, OrdersError> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let items: Vec<ItemRow> = order_items::table
        .filter(order_items::order_id.eq_any(&ids))
        .select(ItemRow::as_select())
        .order((order_items::order_id, order_items::product_id))
        .load(conn)
        .await?;
    let mut items_by_order: BTreeMap<Uuid, Vec<OrderItem>> = BTreeMap::new();
    for item in items {
        items_by_order
            .entry(item.order_id)
            .or_default()
            .push(OrderItem {
                product_id: item.product_id,
                quantity: item.quantity,
                price: item.price,
            });
    }
    rows.into_iter()
        .map(|row| {
            let status = OrderStatus::parse(&row.status)
                .ok_or_else(|| OrdersError::Corrupt(row.status.clone()))?;
            Ok(Order {
                id: row.id,
                user_id: row.user_id,
                status,
                total_amount: row.total_amount,
                payment_method: row.payment_method,
                shipping_address: row.shipping_address,
                items: items_by_order.remove(&row.id).unwrap_or_default(),
                created_at: row.created_at,
                updated_at: row.updated_at,
            })
        })
        .collect()
}

/// Which orders a rebuild after a Redis loss gives their records back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holders {
    /// Every live (not cancelled or failed) order: a flash sale's buyers' allowances.
    Live,
    /// Paid orders only: the ones a cancel may still give units back through. Regular stock
    /// has no allowances, and shipped orders stay sold.
    Cancellable,
}

/// The units of `product` in each of its `holders`' orders, in every shard.
pub async fn holdings(
    db: &Databases,
    product: Uuid,
    holders: Holders,
) -> Result<Vec<Holding>, OrdersError> {
    let mut all = vec![];
    for shard in db.shards() {
        let mut conn = shard.write_conn().await?;
        let of_product = orders::table
            .inner_join(order_items::table)
            .filter(order_items::product_id.eq(product))
            .select((orders::id, orders::user_id, order_items::quantity))
            .into_boxed();
        let held = match holders {
            Holders::Live => of_product.filter(orders::status.ne_all(["cancelled", "failed"])),
            Holders::Cancellable => of_product.filter(orders::status.eq("paid")),
        };
        let rows: Vec<(Uuid, Uuid, i32)> = held.load(&mut conn).await?;
        all.extend(rows.into_iter().map(|(order, buyer, units)| Holding {
            order,
            buyer,
            units: u32::try_from(units).unwrap_or(0),
        }));
    }
    Ok(all)
}

/// Moves an order on in its lifecycle (paid -> shipped -> completed) under a row lock,
/// with its `order.<to>` event. Answers the status it had (`to` itself: already there,
/// nothing written), or None when there is no such order; an order not in `from` is left
/// as it is.
pub async fn advance(
    db: &Databases,
    order: &Order,
    from: OrderStatus,
    to: OrderStatus,
    traceparent: Option<&str>,
) -> Result<Option<OrderStatus>, OrdersError> {
    let mut pooled = db.shard_for(order.user_id).write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction(async |conn| {
        let Some(status) = locked_status(conn, order.id).await? else {
            return Ok(None);
        };
        if status == from {
            write_status(conn, order, to, None, traceparent).await?;
        }
        Ok(Some(status))
    })
    .await
}

/// Writes a locked order's new status (and failure reason: None for any status but
/// failed) with its `order.<to>` event, in the caller's transaction.
async fn write_status(
    conn: &mut AsyncPgConnection,
    order: &Order,
    to: OrderStatus,
    reason: Option<&str>,
    traceparent: Option<&str>,
) -> Result<(), OrdersError> {
    diesel::update(orders::table.find(order.id))
        .set((
            orders::status.eq(to.as_str()),
            orders::failure_reason.eq(reason),
            orders::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    let changed = event(order, to, to.as_str(), traceparent);
    let change = Change {
        events: std::slice::from_ref(&changed),
    };
    events::append(conn, &[change]).await?;
    Ok(())
}

/// The status of an order, locked until the transaction ends; None when there is no such
/// order.
async fn locked_status(
    conn: &mut AsyncPgConnection,
    order: Uuid,
) -> Result<Option<OrderStatus>, OrdersError> {
    let current: Option<String> = orders::table
        .find(order)
        .select(orders::status)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    current
        .map(|s| OrderStatus::parse(&s).ok_or(OrdersError::Corrupt(s)))
        .transpose()
}

/// Units per product of `orders`, times `sign` (-1: off the shelf, 1: back on it).
fn units_by_product<'a>(
    orders: impl IntoIterator<Item = &'a Order>,
    sign: i32,
) -> Vec<(Uuid, i32)> {
    let mut units: BTreeMap<Uuid, i32> = BTreeMap::new();
    for item in orders.into_iter().flat_map(|o| &o.items) {
        *units.entry(item.product_id).or_default() += sign * item.quantity;
    }
    units.into_iter().collect()
}

/// Records stock moves in the caller's transaction, one row per product.
async fn record_moves(
    conn: &mut AsyncPgConnection,
    moves: &[(Uuid, i32)],
) -> Result<(), OrdersError> {
    if moves.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = moves
        .iter()
        .map(|(product, delta)| {
            (
                ledger_pending::product_id.eq(product),
                ledger_pending::delta.eq(delta),
            )
        })
        .collect();
    diesel::insert_into(ledger_pending::table)
        .values(&rows)
        .execute(conn)
        .await?;
    Ok(())
}

/// The oldest stock moves recorded in `shard` and not yet in the global ledger.
pub async fn pending_moves(
    db: &Databases,
    shard: usize,
    limit: i64,
) -> Result<Vec<StockMove>, OrdersError> {
    let mut conn = db.shards()[shard].write_conn().await?;
    let rows: Vec<(i64, Uuid, i32)> = ledger_pending::table
        .select((
            ledger_pending::id,
            ledger_pending::product_id,
            ledger_pending::delta,
        ))
        .order(ledger_pending::id)
        .limit(limit)
        .load(&mut conn)
        .await?;
    let source_shard = i32::try_from(shard).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    Ok(rows
        .into_iter()
        .map(|(source_id, product_id, delta)| StockMove {
            source_shard,
            source_id,
            product_id,
            delta,
        })
        .collect())
}

/// Forgets stock moves the global ledger holds now.
pub async fn clear_moves(
    db: &Databases,
    shard: usize,
    moves: &[StockMove],
) -> Result<(), OrdersError> {
    let ids: Vec<i64> = moves.iter().map(|m| m.source_id).collect();
    let mut conn = db.shards()[shard].write_conn().await?;
    diesel::delete(ledger_pending::table.filter(ledger_pending::id.eq_any(ids)))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Ends a pending or paid order in `to` (cancelled, or failed with `reason`) under a row
/// lock, with its `order.<to>` event; a paid order's units go back on the shelf, and its
/// refund is owed in the same transaction (due for the reconciler after `refund_grace`).
/// Answers the status it had, or None when there is no such order; an order in any other
/// status is left as it is.
pub async fn end(
    db: &Databases,
    order: &Order,
    to: OrderStatus,
    reason: Option<&str>,
    traceparent: Option<&str>,
    refund_grace: std::time::Duration,
) -> Result<Option<OrderStatus>, OrdersError> {
    let mut pooled = db.shard_for(order.user_id).write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction(async |conn| {
        let Some(status) = locked_status(conn, order.id).await? else {
            return Ok(None);
        };
        if matches!(status, OrderStatus::Pending | OrderStatus::Paid) {
            write_status(conn, order, to, reason, traceparent).await?;
        }
        if status == OrderStatus::Paid {
            record_moves(conn, &units_by_product([order], 1)).await?;
            refunds::owe(conn, order.id, order.user_id, refund_grace).await?;
        }
        Ok(Some(status))
    })
    .await
}
