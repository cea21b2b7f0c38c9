//! Products and the inventory ledger in the global database.

use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::error::ProductsError;
use super::model::Product;
use crate::infra::db::{Databases, DbError, ReadFrom};
use crate::infra::http::paging::PageRequest;
use crate::infra::redis::Redis;
use crate::modules::stock::StockScripts;

diesel::table! {
    products (id) {
        id -> Uuid,
        name -> Text,
        description -> Text,
        price -> Numeric,
        inventory -> Int4,
        category_id -> Nullable<Uuid>,
        is_flash_sale -> Bool,
        flash_sale_price -> Nullable<Numeric>,
        flash_sale_start -> Nullable<Timestamptz>,
        flash_sale_end -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    stock_loads (product_id) {
        product_id -> Uuid,
        sale_start -> Timestamptz,
        loaded_at -> Timestamptz,
        loaded_inventory -> Int4,
        ledger_mark -> Int8,
    }
}

diesel::table! {
    inventory_ledger (id) {
        id -> Int8,
        order_id -> Nullable<Uuid>,
        product_id -> Uuid,
        delta -> Int4,
        reason -> Text,
        source_shard -> Nullable<Int4>,
        source_id -> Nullable<Int8>,
    }
}

/// Filters of `GET /products`.
#[derive(Debug, Default, Clone)]
pub struct ProductFilter {
    pub category_id: Option<Uuid>,
    pub min_price: Option<BigDecimal>,
    pub max_price: Option<BigDecimal>,
}

pub async fn insert(db: &Databases, product: &Product) -> Result<Product, ProductsError> {
    let mut conn = db.global().write_conn().await?;
    Ok(diesel::insert_into(products::table)
        .values(product)
        .returning(Product::as_returning())
        .get_result(&mut conn)
        .await?)
}

/// Bulk insert for seeding; products that exist are left alone. Answers how many were new.
pub async fn insert_many(db: &Databases, batch: &[Product]) -> Result<usize, ProductsError> {
    let mut conn = db.global().write_conn().await?;
    Ok(diesel::insert_into(products::table)
        .values(batch)
        .on_conflict_do_nothing()
        .execute(&mut conn)
        .await?)
}

pub async fn find(db: &Databases, id: Uuid, from: ReadFrom) -> Result<Product, ProductsError> {
    let mut conn = db.global().read_conn(from).await?;
    products::table
        .find(id)
        .select(Product::as_select())
        .first(&mut conn)
        .await
        .optional()?
        .ok_or(ProductsError::NotFound)
}

/// Writes a product's descriptive fields and sale terms. Never `inventory`: the on-hand count
/// changes only by relative, checked updates (`set_inventory`, `apply_moves`), so an edit
/// racing a sale neither brings sold units back nor loses returned ones.
pub async fn update(db: &Databases, product: &Product) -> Result<Product, ProductsError> {
    let mut conn = db.global().write_conn().await?;
    diesel::update(products::table.find(product.id))
        .set((
            products::name.eq(&product.name),
            products::description.eq(&product.description),
            products::price.eq(&product.price),
            products::category_id.eq(product.category_id),
            products::is_flash_sale.eq(product.is_flash_sale),
            products::flash_sale_price.eq(&product.flash_sale_price),
            products::flash_sale_start.eq(product.flash_sale_start),
            products::flash_sale_end.eq(product.flash_sale_end),
            products::updated_at.eq(product.updated_at),
        ))
        .returning(Product::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?
        .ok_or(ProductsError::NotFound)
}

pub async fn list(
    db: &Databases,
    filter: &ProductFilter,
    page: PageRequest,
) -> Result<Vec<Product>, ProductsError> {
    let mut conn = db.global().read_conn(ReadFrom::Replica).await?;
    let mut query = products::table
        .select(Product::as_select())
        .order(products::id.asc())
        .limit(page.limit + 1)
        .into_boxed();
    if let Some(after) = page.after {
        query = query.filter(products::id.gt(after));
    }
    if let Some(category) = filter.category_id {
        query = query.filter(products::category_id.eq(category));
    }
    if let Some(min) = &filter.min_price {
        query = query.filter(products::price.ge(min.clone()));
    }
    if let Some(max) = &filter.max_price {
        query = query.filter(products::price.le(max.clone()));
    }
    Ok(query.load(&mut conn).await?)
}

/// The products most likely to be read first: sales that have not ended, then the most
/// recently changed, `limit` in all.
pub async fn hot(
    db: &Databases,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Product>, ProductsError> {
    let mut conn = db.global().read_conn(ReadFrom::Replica).await?;
    Ok(products::table
        .select(Product::as_select())
        .order((
            (products::is_flash_sale.and(products::flash_sale_end.gt(now))).desc(),
            products::updated_at.desc(),
        ))
        .limit(limit)
        .load(&mut conn)
        .await?)
}

/// Products changed after `after` (a time, and the id of the last row already seen at
/// that time), oldest change first: the search indexer's feed.
pub async fn changed_after(
    db: &Databases,
    after: (DateTime<Utc>, Option<Uuid>),
    limit: i64,
) -> Result<Vec<Product>, ProductsError> {
    let mut conn = db.global().write_conn().await?;
    let (time, last_id) = after;
    let mut query = products::table
        .select(Product::as_select())
        .order((products::updated_at.asc(), products::id.asc()))
        .limit(limit)
        .into_boxed();
    query = match last_id {
        None => query.filter(products::updated_at.gt(time)),
        // The `>=` bound lets PostgreSQL walk the (updated_at, id) index from `time` and
        // stop at the limit; the OR alone made it collect and sort every later row, so a
        // rebuild slowed down quadratically.
        Some(id) => query
            .filter(products::updated_at.ge(time))
            .filter(products::updated_at.gt(time).or(products::id.gt(id))),
    };
    Ok(query.load(&mut conn).await?)
}

/// Sales that have not ended and start before `starts_before`, in id order.
pub async fn sales(
    db: &Databases,
    now: DateTime<Utc>,
    starts_before: DateTime<Utc>,
    page: PageRequest,
) -> Result<Vec<Product>, ProductsError> {
    let mut conn = db.global().read_conn(ReadFrom::Replica).await?;
    let mut query = products::table
        .filter(products::is_flash_sale.eq(true))
        .filter(products::flash_sale_end.gt(now))
        .filter(products::flash_sale_start.lt(starts_before))
        .select(Product::as_select())
        .order(products::id.asc())
        .limit(page.limit + 1)
        .into_boxed();
    if let Some(after) = page.after {
        query = query.filter(products::id.gt(after));
    }
    Ok(query.load(&mut conn).await?)
}

/// Sets the on-hand count under a row lock, mirroring the change into a loaded flash-sale
/// counter inside the same transaction (refused when it would go below the units reserved).
pub async fn set_inventory(
    db: &Databases,
    id: Uuid,
    inventory: i32,
    stock: &StockScripts,
    redis: &Redis,
) -> Result<Product, ProductsError> {
    let mut pooled = db.global().write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction(async |conn| {
        let current: i32 = products::table
            .find(id)
            .select(products::inventory)
            .for_update()
            .first(conn)
            .await
            .optional()?
            .ok_or(ProductsError::NotFound)?;
        let delta = i64::from(inventory) - i64::from(current);
        if let Err(available) = stock.adjust(redis, id, delta).await? {
            return Err(ProductsError::BelowReserved(i64::from(current) - available));
        }
        let adjusted = diesel::insert_into(inventory_ledger::table)
            .values((
                inventory_ledger::product_id.eq(id),
                inventory_ledger::delta.eq(inventory - current),
                inventory_ledger::reason.eq("adjusted"),
            ))
            .execute(conn)
            .await;
        if let Err(e) = adjusted {
            stock.adjust(redis, id, -delta).await?.ok();
            return Err(e.into());
        }
        let updated = diesel::update(products::table.find(id))
            .set((
                products::inventory.eq(inventory),
                products::updated_at.eq(diesel::dsl::now),
            ))
            .returning(Product::as_returning())
            .get_result(conn)
            .await;
        if updated.is_err() {
            // Undo the counter change; the transaction rolls back the row.
            stock.adjust(redis, id, -delta).await?.ok();
        }
        Ok(updated?)
    })
    .await
}

/// Units of one product that left the shelf (negative) or came back (positive) in one
/// transaction of a shard: `source_id` is its row in that shard's `ledger_pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockMove {
    pub source_shard: i32,
    pub source_id: i64,
    pub product_id: Uuid,
    pub delta: i32,
}

/// What one `apply_moves` did.
#[derive(Debug, Default)]
pub struct AppliedMoves {
    /// The products whose on-hand count changed.
    pub changed: Vec<Product>,
    /// Products whose moves would take the count below zero (a row edited by hand): their
    /// moves stay where they were recorded, and nothing of theirs was applied.
    pub refused: std::collections::BTreeSet<Uuid>,
}

/// Records stock moves in the ledger and applies them to the on-hand counts, each once
/// whoever applies it and however often (the ledger is keyed by the move's source). Each
/// product in its own savepoint: one product's count refusing its moves (`CHECK (inventory
/// >= 0)`) never fails another product's.
pub async fn apply_moves(
    db: &Databases,
    moves: &[StockMove],
) -> Result<AppliedMoves, ProductsError> {
    let mut per_product: std::collections::BTreeMap<Uuid, Vec<&StockMove>> = Default::default();
    for m in moves {
        per_product.entry(m.product_id).or_default().push(m);
    }
    if per_product.is_empty() {
        return Ok(AppliedMoves::default());
    }
    let mut pooled = db.global().write_conn().await?;
    let conn: &mut AsyncPgConnection = &mut pooled;
    conn.transaction(async |conn| {
        let mut applied = AppliedMoves::default();
        // In product order, so concurrent appliers never wait on each other in a cycle.
        for (product, moves) in per_product {
            let outcome = conn
                .transaction(async |conn| apply_product_moves(conn, product, &moves).await)
                .await;
            match outcome {
                Ok(Some(changed)) => applied.changed.push(changed),
                Ok(None) => {}
                Err(ProductsError::Db(DbError::Query(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::CheckViolation,
                    _,
                )))) => {
                    tracing::error!(%product, "stock moves would take the on-hand count below zero; held back until the row is mended");
                    metrics::counter!("stock_moves_refused_total").increment(moves.len() as u64);
                    applied.refused.insert(product);
                }
                Err(e) => return Err(e),
            }
        }
        Ok::<_, ProductsError>(applied)
    })
    .await
}

/// One product's moves into the ledger and its count (the caller's savepoint); answers the
/// product when its count changed.
async fn apply_product_moves(
    conn: &mut AsyncPgConnection,
    product: Uuid,
    moves: &[&StockMove],
) -> Result<Option<Product>, ProductsError> {
    let rows: Vec<_> = moves
        .iter()
        .map(|m| {
            (
                inventory_ledger::source_shard.eq(m.source_shard),
                inventory_ledger::source_id.eq(m.source_id),
                inventory_ledger::product_id.eq(m.product_id),
                inventory_ledger::delta.eq(m.delta),
                inventory_ledger::reason.eq(if m.delta < 0 { "sold" } else { "released" }),
            )
        })
        .collect();
    let fresh: Vec<i32> = diesel::insert_into(inventory_ledger::table)
        .values(&rows)
        .on_conflict_do_nothing()
        .returning(inventory_ledger::delta)
        .get_results(conn)
        .await?;
    let delta: i32 = fresh.iter().sum();
    if delta == 0 {
        return Ok(None);
    }
    Ok(Some(
        diesel::update(products::table.find(product))
            .set((
                products::inventory.eq(products::inventory + delta),
                products::updated_at.eq(diesel::dsl::now),
            ))
            .returning(Product::as_returning())
            .get_result(conn)
            .await?,
    ))
}

/// Records that the sale starting at `sale_start` was loaded into Redis, with the on-hand
/// count and the ledger position of that moment (one statement, so both come from one
/// snapshot). Answers false when that sale was loaded before: then Redis holding nothing
/// means Redis lost it.
pub async fn record_load(
    db: &Databases,
    product: Uuid,
    sale_start: DateTime<Utc>,
) -> Result<bool, ProductsError> {
    let mut conn = db.global().write_conn().await?;
    let recorded = diesel::sql_query(
        "INSERT INTO stock_loads (product_id, sale_start, loaded_inventory, ledger_mark) \
         SELECT id, $2, inventory, \
                COALESCE((SELECT max(id) FROM inventory_ledger WHERE product_id = $1), 0) \
         FROM products WHERE id = $1 \
         ON CONFLICT (product_id) DO UPDATE \
         SET sale_start = EXCLUDED.sale_start, loaded_at = now(), \
             loaded_inventory = EXCLUDED.loaded_inventory, ledger_mark = EXCLUDED.ledger_mark \
         WHERE stock_loads.sale_start <> EXCLUDED.sale_start",
    )
    .bind::<diesel::sql_types::Uuid, _>(product)
    .bind::<diesel::sql_types::Timestamptz, _>(sale_start)
    .execute(&mut conn)
    .await?;
    Ok(recorded == 1)
}

/// Whether the sale starting at `sale_start` was loaded into Redis.
pub async fn was_loaded(
    db: &Databases,
    product: Uuid,
    sale_start: DateTime<Utc>,
) -> Result<bool, ProductsError> {
    let mut conn = db.global().read_conn(ReadFrom::Primary).await?;
    let found: Option<Uuid> = stock_loads::table
        .find(product)
        .filter(stock_loads::sale_start.eq(sale_start))
        .select(stock_loads::product_id)
        .first(&mut conn)
        .await
        .optional()?;
    Ok(found.is_some())
}

#[derive(QueryableByName)]
struct BooksOff {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    product_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    units_off: i64,
}

/// Per loaded sale among `products`: the on-hand count minus (the count at load plus every
/// ledger row since): 0 when the count agrees with the ledger.
pub async fn books_off(
    db: &Databases,
    products: &[Uuid],
) -> Result<Vec<(Uuid, i64)>, ProductsError> {
    let mut conn = db.global().read_conn(ReadFrom::Primary).await?;
    let rows: Vec<BooksOff> = diesel::sql_query(
        "SELECT l.product_id, \
                p.inventory::BIGINT - l.loaded_inventory - COALESCE(SUM(e.delta), 0)::BIGINT \
                  AS units_off \
         FROM stock_loads l \
         JOIN products p ON p.id = l.product_id \
         LEFT JOIN inventory_ledger e ON e.product_id = l.product_id AND e.id > l.ledger_mark \
         WHERE l.product_id = ANY($1) \
         GROUP BY l.product_id, p.inventory, l.loaded_inventory",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(products)
    .load(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.product_id, r.units_off))
        .collect())
}
