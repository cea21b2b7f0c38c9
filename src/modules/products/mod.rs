//! Products: the catalogue (global database) and flash-sale stock (Redis). Orders reserve,
//! commit and release units only through the functions here.

mod auditor;
mod cache;
mod error;
mod handlers;
mod model;
mod search;
mod snapshot;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

pub use crate::modules::stock::{
    new_epoch, CommitEpoch, CommitOutcome, Holding, ReleaseOutcome, Releaser, Reservation,
    ReserveRequest, ReservedUnits, RoomAnswer, RoomReply, RoomRequest, RoomView, SaleKind,
    SaleState, SaleTerms, SettledRecord, StaleReservation,
};
pub use auditor::{audit_once, run as run_auditor, SaleFindings};
pub use error::ProductsError;
pub use model::{FlashSaleItem, NewProduct, Product, ProductPatch};
pub use store::StockMove;

use crate::app::AppState;
use crate::config::{SalesSettings, Settings};
use crate::infra::db::ReadFrom;
use crate::infra::http::paging::PageRequest;
use crate::modules::stock::StockScripts;
use cache::ProductCache;
use search::{IndexPass, SearchIndex};

pub use handlers::configure;

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::ProductsApi as utoipa::OpenApi>::openapi()
}

/// What products keep for the life of the process.
pub struct ProductsState {
    stock: StockScripts,
    pub cache: ProductCache,
    search: Arc<SearchIndex>,
    indexer: AtomicU8,
    settings: SalesSettings,
}

/// Where this process's indexer is (`ProductsState::indexer`).
const INDEXER_NOT_RUN: u8 = 0;
const INDEXER_CATCHING_UP: u8 = 1;
const INDEXER_CURRENT: u8 = 2;

/// Whether this process's search index can answer for the whole catalogue (`/ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchReadiness {
    /// This process runs no indexer (a worker role): it serves no search.
    NotServed,
    /// The indexer has not yet read every change since the index's watermark.
    CatchingUp,
    Current,
}

impl ProductsState {
    /// Opens the search index, first copying in the newest snapshot from
    /// `search.snapshot_dir` when it is newer than this machine's index.
    pub async fn open(settings: &Settings) -> Result<Self, ProductsError> {
        let search = settings.search.clone();
        let index = tokio::task::spawn_blocking(move || {
            if let Some(snapshots) = &search.snapshot_dir {
                let started = std::time::Instant::now();
                match snapshot::restore_if_newer(snapshots, &search.index_dir) {
                    Ok(Some(watermark)) => tracing::info!(
                        %watermark,
                        seconds = started.elapsed().as_secs_f64(),
                        "search index restored from a snapshot"
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        error = %e,
                        "search snapshot not restored; the indexer builds what is missing"
                    ),
                }
            }
            SearchIndex::open(&search.index_dir)
        })
        .await
        .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
        Ok(Self {
            stock: StockScripts::new(settings.sales.stock_buckets),
            cache: ProductCache::new(&settings.catalog),
            search: Arc::new(index),
            indexer: AtomicU8::new(INDEXER_NOT_RUN),
            settings: settings.sales.clone(),
        })
    }

    pub fn search_readiness(&self) -> SearchReadiness {
        match self.indexer.load(Ordering::Acquire) {
            INDEXER_NOT_RUN => SearchReadiness::NotServed,
            INDEXER_CATCHING_UP => SearchReadiness::CatchingUp,
            _ => SearchReadiness::Current,
        }
    }
}

/// Ids of the products best matching `query` (on the blocking pool).
pub async fn search(
    state: &AppState,
    query: String,
    limit: usize,
    offset: usize,
) -> Result<Vec<Uuid>, ProductsError> {
    let index = state.products.search.clone();
    tokio::task::spawn_blocking(move || index.search(&query, limit, offset))
        .await
        .map_err(|e| ProductsError::Unavailable(e.to_string()))?
}

/// Rows per indexing step.
const INDEX_BATCH: i64 = 5_000;
/// A rebuild commits every this many documents (and at the end).
const COMMIT_EVERY_DOCS: usize = 500_000;
/// Transactions that commit late carry an earlier `updated_at` than rows already indexed;
/// re-reading this much of the recent past catches them.
const LATE_COMMIT_WINDOW_SECS: i64 = 2;

/// Indexes every product changed since the index's watermark; with an empty index that is
/// the whole catalogue. Calls `progress` with the running total. Answers how many.
pub async fn index_changes(
    state: &AppState,
    progress: impl Fn(usize),
) -> Result<usize, ProductsError> {
    let recent = Utc::now() - Duration::seconds(LATE_COMMIT_WINDOW_SECS);
    let since = state
        .products
        .search
        .watermark()
        .map(|watermark| watermark.min(recent));
    index_since(state, since, progress).await
}

/// Indexes every product changed after `since` (all of them, into an index known to be
/// empty, when `None`).
async fn index_since(
    state: &AppState,
    since: Option<chrono::DateTime<Utc>>,
    progress: impl Fn(usize),
) -> Result<usize, ProductsError> {
    let index = state.products.search.clone();
    let fresh = since.is_none();
    let mut after = (since.unwrap_or(chrono::DateTime::<Utc>::UNIX_EPOCH), None);
    let mut total = 0;
    let mut uncommitted = 0;
    loop {
        let rows = store::changed_after(&state.db, after, INDEX_BATCH).await?;
        let Some(last) = rows.last() else {
            if uncommitted > 0 {
                // The previous batch was full and the last: commit what it left pending.
                let (writer, watermark) = (index.clone(), after.0);
                let pass = IndexPass {
                    fresh,
                    commit: true,
                };
                tokio::task::spawn_blocking(move || writer.upsert(&[], watermark, pass))
                    .await
                    .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
            }
            return Ok(total);
        };
        after = (last.updated_at, Some(last.id));
        let (count, watermark, writer) = (rows.len(), last.updated_at, index.clone());
        let finished = (count as i64) < INDEX_BATCH;
        uncommitted += count;
        let commit = finished || uncommitted >= COMMIT_EVERY_DOCS;
        if commit {
            uncommitted = 0;
        }
        let pass = IndexPass { fresh, commit };
        tokio::task::spawn_blocking(move || writer.upsert(&rows, watermark, pass))
            .await
            .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
        total += count;
        progress(total);
        if finished {
            return Ok(total);
        }
    }
}

/// `flashsale search reindex`: empties the index and builds it again from PostgreSQL.
pub async fn reindex(state: &AppState, progress: impl Fn(usize)) -> Result<usize, ProductsError> {
    let index = state.products.search.clone();
    tokio::task::spawn_blocking(move || index.clear())
        .await
        .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
    let indexed = index_since(state, None, progress).await?;
    let index = state.products.search.clone();
    tokio::task::spawn_blocking(move || index.merge_all())
        .await
        .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
    Ok(indexed)
}

/// Starts the API role's indexer: keeps this process's index within `search.refresh_ms` of
/// the catalogue, building what is missing first. Until its first pass has read every change,
/// `/ready` answers 503.
pub fn spawn_indexer(state: AppState) -> tokio::task::JoinHandle<()> {
    state
        .products
        .indexer
        .store(INDEXER_CATCHING_UP, Ordering::Release);
    tokio::spawn(run_indexer(state))
}

async fn run_indexer(state: AppState) {
    let pause = std::time::Duration::from_millis(state.settings.search.refresh_ms);
    loop {
        let started = std::time::Instant::now();
        match index_changes(&state, |_| {}).await {
            Ok(indexed) => {
                let was = state
                    .products
                    .indexer
                    .swap(INDEXER_CURRENT, Ordering::AcqRel);
                if was == INDEXER_CATCHING_UP {
                    tracing::info!(
                        indexed,
                        seconds = started.elapsed().as_secs_f64(),
                        "search index is current"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "search indexing failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// `flashsale search snapshot`: brings this machine's index up to date (building it when it
/// is empty), merges it and publishes a copy into `to`. Answers how many products the
/// catch-up indexed and where the snapshot went (`None`: the catalogue is empty).
pub async fn publish_snapshot(
    state: &AppState,
    to: &Path,
    progress: impl Fn(usize),
) -> Result<(usize, Option<PathBuf>), ProductsError> {
    let indexed = index_changes(state, progress).await?;
    let (index, from, to) = (
        state.products.search.clone(),
        state.settings.search.index_dir.clone(),
        to.to_owned(),
    );
    let published = tokio::task::spawn_blocking(move || {
        index.merged(|watermark| {
            let Some(watermark) = watermark else {
                return Ok(None);
            };
            snapshot::publish(&from, &to, watermark)
                .map(Some)
                .map_err(|e| ProductsError::Unavailable(format!("search snapshot: {e}")))
        })
    })
    .await
    .map_err(|e| ProductsError::Unavailable(e.to_string()))??;
    Ok((indexed, published))
}

fn terms(state: &AppState, product: &Product) -> Option<SaleTerms> {
    let (start, end) = product.sale_window()?;
    Some(SaleTerms {
        kind: SaleKind::Flash,
        start,
        end,
        per_user_limit: state.products.settings.purchase_limit,
        price: product.flash_sale_price.as_ref()?.to_string(),
    })
}

/// Regular orders: always open, no per-user limit, the list price.
fn regular_terms(product: &Product) -> SaleTerms {
    let now = Utc::now();
    SaleTerms {
        kind: SaleKind::Regular,
        start: now - Duration::days(1),
        // Renewed by every write to the product; a year keeps idle keys from living forever.
        end: now + Duration::days(365),
        per_user_limit: u32::MAX,
        price: product.price.to_string(),
    }
}

/// Brings Redis in line with a product's sale after a write. A sale in Redis gets the new
/// terms in one step (window, price, limit; an ended or postponed sale stops selling at
/// once); one not there yet is loaded when it starts within the preload window (buyable as
/// soon as the write returns). An unscheduled sale hands its units to regular orders (the
/// flash-sale path then answers `sale_not_active`).
async fn sync_sale(state: &AppState, product: &Product) -> Result<(), ProductsError> {
    let now = Utc::now();
    let preload = Duration::seconds(state.products.settings.preload_secs);
    let stock = &state.products.stock;
    let in_redis = stock.state(&state.redis, product.id).await? != SaleState::Missing;
    match terms(state, product) {
        Some(terms) if in_redis => {
            // A moved start is the same sale: were it lost later, it is rebuilt.
            store::record_load(&state.db, product.id, terms.start).await?;
            stock
                .load(&state.redis, product.id, product.inventory, &terms)
                .await?;
        }
        Some(terms) if terms.end > now && terms.start - preload <= now => {
            load_first_time(state, product, &terms).await?;
        }
        Some(_) => {}
        None if in_redis => {
            let terms = regular_terms(product);
            stock
                .load(&state.redis, product.id, product.inventory, &terms)
                .await?;
        }
        None => {}
    }
    Ok(())
}

/// Loads a sale's counter the first time it is due. A sale loaded before and missing from
/// Redis now was lost: the reconciler rebuilds it from the orders, never from the shelf
/// count alone (that would forget its buyers). Answers whether it loaded.
async fn load_first_time(
    state: &AppState,
    product: &Product,
    terms: &SaleTerms,
) -> Result<bool, ProductsError> {
    if !store::record_load(&state.db, product.id, terms.start).await? {
        return Ok(false);
    }
    state
        .products
        .stock
        .load(&state.redis, product.id, product.inventory, terms)
        .await
        .map_err(Into::into)
}

/// Loads every due sale not in Redis yet; idempotent, so several worker replicas may run
/// it at once. Answers how many counters it loaded.
pub async fn load_due_sales(state: &AppState) -> Result<usize, ProductsError> {
    let mut loaded = 0;
    for product in due_sales(state).await? {
        let Some(terms) = terms(state, &product) else {
            continue;
        };
        if sale_state(state, product.id).await? == SaleState::Missing
            && load_first_time(state, &product, &terms).await?
        {
            tracing::info!(product = %product.id, stock = product.inventory, "flash-sale stock loaded");
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// Sales that have not ended and start within the preload window.
pub async fn due_sales(state: &AppState) -> Result<Vec<Product>, ProductsError> {
    let now = Utc::now();
    let horizon = now + Duration::seconds(state.products.settings.preload_secs);
    let mut all = vec![];
    let mut page = PageRequest {
        limit: 100,
        after: None,
    };
    loop {
        let mut rows = store::sales(&state.db, now, horizon, page).await?;
        let more = rows.len() as i64 > page.limit;
        rows.truncate(page.limit as usize);
        page.after = rows.last().map(|p| p.id);
        all.extend(rows);
        if !more {
            return Ok(all);
        }
    }
}

/// Seeds products in bulk (existing ids are skipped) and loads the stock of the flash sales
/// among them. Answers how many were new.
pub async fn create_many(state: &AppState, batch: &[Product]) -> Result<usize, ProductsError> {
    let created = store::insert_many(&state.db, batch).await?;
    for product in batch.iter().filter(|p| p.is_flash_sale) {
        sync_sale(state, product).await?;
    }
    Ok(created)
}

/// How many products the API preloads into Redis at start, and for how long.
const HOT_PRODUCTS: i64 = 1_000;
const HOT_TTL_SECS: u64 = 3_600;

/// Preloads the hot top-1000 (live sales first, then the most recently changed) into
/// Redis for an hour, so a fresh deployment does not meet a flash crowd with cold caches.
pub async fn preload_hot(state: &AppState) -> Result<usize, ProductsError> {
    let hot = store::hot(&state.db, Utc::now(), HOT_PRODUCTS).await?;
    state
        .products
        .cache
        .preload(&state.redis, &hot, HOT_TTL_SECS)
        .await?;
    Ok(hot.len())
}

/// A product through the three-tier read path.
pub async fn find(state: &AppState, id: Uuid) -> Result<Arc<Product>, ProductsError> {
    state.products.cache.get(&state.db, &state.redis, id).await
}

/// After any write to products: the new versions through every cache tier.
async fn written(state: &AppState, products: &[Product]) -> Result<(), ProductsError> {
    for product in products {
        state.products.cache.put(&state.redis, product).await?;
    }
    Ok(())
}

pub async fn reserve(
    state: &AppState,
    request: &ReserveRequest<'_>,
) -> Result<Reservation, ProductsError> {
    Ok(state.products.stock.reserve(&state.redis, request).await?)
}

/// The Redis key holding the idempotency record of (`product`, `user`, key digest); the
/// reservation script writes it, orders store the final answer in it.
pub async fn idempotency_key(
    state: &AppState,
    product: Uuid,
    user: Uuid,
    key_digest: &str,
) -> Result<String, ProductsError> {
    Ok(state
        .products
        .stock
        .idempotency_key(&state.redis, product, user, key_digest)
        .await?)
}

/// Commits the reservations behind `lines`; one call per product. Answers one outcome per
/// line, in order.
pub async fn commit(
    state: &AppState,
    lines: &[ReservedUnits],
) -> Result<Vec<CommitOutcome>, ProductsError> {
    let mut by_product: std::collections::BTreeMap<Uuid, Vec<usize>> = Default::default();
    for (i, line) in lines.iter().enumerate() {
        by_product.entry(line.product).or_default().push(i);
    }
    let calls = by_product.iter().map(|(product, indexes)| {
        let orders: Vec<&ReservedUnits> = indexes.iter().map(|i| &lines[*i]).collect();
        async move {
            state
                .products
                .stock
                .commit(&state.redis, *product, &orders)
                .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut outcomes = vec![CommitOutcome::NotLoaded; lines.len()];
    for (indexes, result) in by_product.values().zip(results) {
        for (i, outcome) in indexes.iter().zip(result?) {
            outcomes[*i] = outcome;
        }
    }
    Ok(outcomes)
}

/// Releases the units `buyer` reserved for `order`, if `by` may (see `Releaser`).
pub async fn release(
    state: &AppState,
    product: Uuid,
    buyer: Uuid,
    order: Uuid,
    by: Releaser,
) -> Result<ReleaseOutcome, ProductsError> {
    Ok(state
        .products
        .stock
        .release(&state.redis, product, buyer, order, by)
        .await?)
}

/// committed -> persisted for `lines` whose orders' final rows are in PostgreSQL.
pub async fn persist(state: &AppState, lines: &[ReservedUnits]) -> Result<(), ProductsError> {
    let mut by_product: std::collections::BTreeMap<Uuid, Vec<&ReservedUnits>> = Default::default();
    for line in lines {
        by_product.entry(line.product).or_default().push(line);
    }
    let stock = &state.products.stock;
    futures_util::future::try_join_all(
        by_product
            .iter()
            .map(|(product, lines)| stock.persist(&state.redis, *product, lines)),
    )
    .await?;
    Ok(())
}

/// Orders committed before `cutoff` and never persisted: of `product`'s sale, or (None) of
/// every product whose regular stock is in Redis.
pub async fn stale_committed(
    state: &AppState,
    product: Option<Uuid>,
    cutoff: DateTime<Utc>,
) -> Result<Vec<StaleReservation>, ProductsError> {
    let stock = &state.products.stock;
    Ok(match product {
        Some(product) => stock.stale_committed(&state.redis, product, cutoff).await?,
        None => stock.stale_regular_committed(&state.redis, cutoff).await?,
    })
}

/// Fences stale reservations for the reconciler's release; answers those fenced.
pub async fn fence(
    state: &AppState,
    stale: Vec<StaleReservation>,
) -> Result<Vec<StaleReservation>, ProductsError> {
    Ok(state.products.stock.fence(&state.redis, stale).await?)
}

/// Finishes moves of units between a sale's buckets that a process left half done;
/// answers how many.
pub async fn finish_stuck_moves(state: &AppState, product: Uuid) -> Result<usize, ProductsError> {
    Ok(state
        .products
        .stock
        .finish_stuck_moves(&state.redis, product)
        .await?)
}

/// Moves stock moves recorded in a shard into the ledger and the on-hand counts, once each.
/// Answers the products whose moves were refused (their count would go below zero): those
/// moves stay where they were recorded.
pub async fn apply_stock_moves(
    state: &AppState,
    moves: &[StockMove],
) -> Result<std::collections::BTreeSet<Uuid>, ProductsError> {
    let applied = store::apply_moves(&state.db, moves).await?;
    written(state, &applied.changed).await?;
    Ok(applied.refused)
}

pub async fn sale_state(state: &AppState, product: Uuid) -> Result<SaleState, ProductsError> {
    Ok(state.products.stock.state(&state.redis, product).await?)
}

/// Whether a product's current sale was loaded into Redis (so missing keys mean a loss).
pub async fn was_loaded(state: &AppState, product: &Product) -> Result<bool, ProductsError> {
    match product.sale_window() {
        Some((start, _)) => store::was_loaded(&state.db, product.id, start).await,
        None => Ok(false),
    }
}

/// Notes a sale found lost; answers how long ago it was first found.
pub async fn mark_lost(state: &AppState, product: Uuid) -> Result<Duration, ProductsError> {
    let first_ms = state
        .products
        .stock
        .mark_lost(&state.redis, product)
        .await?;
    Ok(Duration::milliseconds(
        Utc::now().timestamp_millis() - first_ms,
    ))
}

/// Opens a rebuilt sale to buyers again.
pub async fn reopen_sale(state: &AppState, product: Uuid) -> Result<(), ProductsError> {
    Ok(state.products.stock.reopen(&state.redis, product).await?)
}

/// Per loaded sale among `products`: how far the on-hand count is off the ledger.
async fn books_off(state: &AppState, products: &[Uuid]) -> Result<Vec<(Uuid, i64)>, ProductsError> {
    store::books_off(&state.db, products).await
}

/// The reservations of `product` made before `cutoff` and still only reserved.
pub async fn stale_reservations(
    state: &AppState,
    product: Uuid,
    cutoff: DateTime<Utc>,
) -> Result<Vec<StaleReservation>, ProductsError> {
    Ok(state
        .products
        .stock
        .stale_reservations(&state.redis, product, cutoff)
        .await?)
}

/// Takes a buyer through a sale's waiting room.
pub async fn enter_room(
    state: &AppState,
    request: &RoomRequest<'_>,
) -> Result<RoomReply<RoomAnswer>, ProductsError> {
    Ok(state
        .products
        .stock
        .enter_room(&state.redis, request)
        .await?)
}

/// Moves a sale's waiting room on and reads it, for a process pushing positions to the
/// shoppers waiting in it (`None`: the sale is not loaded).
pub async fn watch_room(
    state: &AppState,
    request: &RoomRequest<'_>,
) -> Result<Option<RoomReply<RoomView>>, ProductsError> {
    Ok(state
        .products
        .stock
        .watch_room(&state.redis, request)
        .await?)
}

/// A buyer's (ticket, position) in a sale's waiting room, if they hold one.
pub async fn room_ticket(
    state: &AppState,
    product: Uuid,
    buyer: Uuid,
) -> Result<Option<(u64, u64)>, ProductsError> {
    Ok(state
        .products
        .stock
        .room_ticket(&state.redis, product, buyer)
        .await?)
}

/// The stale reservations of every product whose regular-order stock is in Redis (read a
/// page of products per round trip).
pub async fn stale_regular_reservations(
    state: &AppState,
    cutoff: DateTime<Utc>,
) -> Result<Vec<StaleReservation>, ProductsError> {
    Ok(state
        .products
        .stock
        .stale_regular_reservations(&state.redis, cutoff)
        .await?)
}

/// Released and persisted records of regular products' orders, a page per product holding
/// more than a few: only PostgreSQL can say whether each is still needed.
pub async fn settled_regular_records(
    state: &AppState,
) -> Result<Vec<SettledRecord>, ProductsError> {
    Ok(state
        .products
        .stock
        .settled_regular_records(&state.redis)
        .await?)
}

/// Drops records whose orders are final and can give no units back; answers how many went.
pub async fn forget_settled(
    state: &AppState,
    records: &[SettledRecord],
) -> Result<usize, ProductsError> {
    Ok(state
        .products
        .stock
        .forget_settled(&state.redis, records)
        .await?)
}

/// What a rebuild of a product's stock replaces: the buckets to fence in PostgreSQL (with
/// `epoch`) before its numbers are read.
pub struct RebuildPlan {
    pub product: Uuid,
    pub kind: SaleKind,
    pub buckets: u32,
    pub epoch: Uuid,
}

/// Plans the rebuild of `product`'s stock in Redis, of the kind the product sells as now.
pub async fn plan_rebuild(state: &AppState, product: Uuid) -> Result<RebuildPlan, ProductsError> {
    let found = store::find(&state.db, product, ReadFrom::Primary).await?;
    let kind = if found.is_flash_sale {
        SaleKind::Flash
    } else {
        SaleKind::Regular
    };
    let buckets = state
        .products
        .stock
        .buckets_to_rebuild(&state.redis, product, kind)
        .await?;
    Ok(RebuildPlan {
        product,
        kind,
        buckets,
        epoch: new_epoch(),
    })
}

/// Rebuilds a product's counters from PostgreSQL after Redis lost them, under the plan's
/// epoch (the caller fenced every shard with it, then applied every recorded stock move):
/// the stock is the on-hand inventory (persisted orders are already off it) and `holdings`
/// the units of the live orders. A flash sale stays closed until `reopen_sale`;
/// orders in flight take their units at commit. Answers the stock it rebuilt with.
pub async fn rebuild_stock(
    state: &AppState,
    plan: &RebuildPlan,
    holdings: &[Holding],
) -> Result<i64, ProductsError> {
    let product = store::find(&state.db, plan.product, ReadFrom::Primary).await?;
    let terms = match plan.kind {
        SaleKind::Flash => match terms(state, &product) {
            Some(terms) => terms,
            // No window any more: nothing to sell, nothing to rebuild.
            None => return Ok(0),
        },
        SaleKind::Regular => regular_terms(&product),
    };
    let stock = i64::from(product.inventory);
    let engine = &state.products.stock;
    engine
        .rebuild(
            &state.redis,
            product.id,
            stock,
            holdings,
            &terms,
            plan.epoch,
        )
        .await?;
    if terms.kind == SaleKind::Regular {
        engine.track_regular(&state.redis, product.id).await?;
    }
    Ok(stock)
}

/// Reserves units of one item of a regular order. `NotLoaded`: the product's stock is not
/// in Redis (its first order, or a Redis loss); the caller rebuilds it (fenced, see
/// `plan_rebuild`) and tries again. A product on flash sale is bought through the flash-sale
/// path only.
pub async fn reserve_regular(
    state: &AppState,
    product: Uuid,
    user: Uuid,
    quantity: u32,
    order: Uuid,
) -> Result<Reservation, ProductsError> {
    let reserved = state
        .products
        .stock
        .reserve_item(&state.redis, product, user, quantity, order)
        .await?;
    if reserved == Reservation::NotLoaded {
        let found = store::find(&state.db, product, ReadFrom::Primary).await?;
        if found.is_flash_sale {
            return Ok(Reservation::NotActive);
        }
    }
    Ok(reserved)
}

/// Remaining units of each sale on now (at most `limit` sales) whose stock is loaded: what
/// the `inventory_available` gauge shows.
pub async fn live_stock(state: &AppState, limit: i64) -> Result<Vec<(Uuid, i64)>, ProductsError> {
    let now = chrono::Utc::now();
    let page = crate::infra::http::paging::PageRequest { limit, after: None };
    let ids: Vec<Uuid> = store::sales(&state.db, now, now, page)
        .await?
        .iter()
        .map(|p| p.id)
        .collect();
    let live = state.products.stock.remaining(&state.redis, &ids).await?;
    Ok(ids
        .into_iter()
        .zip(live)
        .filter_map(|(id, remaining)| remaining.map(|r| (id, r.max(0))))
        .collect())
}
