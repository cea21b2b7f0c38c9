use std::sync::Arc;

use actix_web::{web, HttpResponse};
use bigdecimal::BigDecimal;
use chrono::Utc;
use futures_util::future::join_all;
use serde::Deserialize;
use uuid::Uuid;

use super::model::{self, FlashSaleItem, InventoryUpdate, NewProduct, Product, ProductPatch};
use super::{store, sync_sale, ProductsError};
use crate::app::AppState;
use crate::infra::db::ReadFrom;
use crate::infra::http::paging::{Page, PageQuery};
use crate::infra::http::problem::ProblemBody;
use crate::infra::http::Problem;
use crate::modules::auth::AuthUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/products")
            .route("", web::get().to(list_products))
            .route("", web::post().to(create_product))
            .route("/flash-sale", web::get().to(list_flash_sales))
            .route("/search", web::get().to(search_products))
            .route("/{id}", web::get().to(get_product))
            .route("/{id}", web::patch().to(patch_product))
            .route("/{id}/inventory", web::put().to(set_inventory)),
    );
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(
    search_products,
    list_products,
    create_product,
    list_flash_sales,
    get_product,
    patch_product,
    set_inventory
))]
pub struct ProductsApi;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ProductQuery {
    /// Items per page, 1..=100 (default 20).
    limit: Option<i64>,
    cursor: Option<String>,
    category_id: Option<Uuid>,
    /// Decimal, at most 10 integer digits and 2 decimals.
    min_price: Option<String>,
    /// Decimal, at most 10 integer digits and 2 decimals.
    max_price: Option<String>,
}

/// A price filter as a price column can hold it (NUMERIC(12,2)); anything else is refused
/// before it costs a parse of a huge number or reaches the database.
fn price_filter(name: &str, raw: Option<&str>) -> Result<Option<BigDecimal>, Problem> {
    const MAX_CHARS: usize = 32;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let invalid = || {
        Problem::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            "validation_failed",
            format!("{name} must be a non-negative decimal with at most 10 integer digits and 2 decimals"),
        )
    };
    if raw.len() > MAX_CHARS {
        return Err(invalid());
    }
    let price: BigDecimal = raw.parse().map_err(|_| invalid())?;
    // Digits and scale only: comparing 1e131000 with anything would expand it.
    let price = price.normalized();
    let integer_digits = price.digits() as i64 - price.fractional_digit_count();
    let fits = price.fractional_digit_count() <= 2 && integer_digits <= 10;
    if !fits || price.sign() == bigdecimal::num_bigint::Sign::Minus {
        return Err(invalid());
    }
    Ok(Some(price))
}

#[utoipa::path(get, path = "/products", tag = "products", params(ProductQuery),
    responses((status = 200, body = Page<Product>), (status = 400, body = ProblemBody, content_type = "application/problem+json")))]
async fn list_products(
    state: web::Data<AppState>,
    query: web::Query<ProductQuery>,
) -> Result<web::Json<Page<Product>>, Problem> {
    let query = query.into_inner();
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .validate()?;
    let filter = store::ProductFilter {
        category_id: query.category_id,
        min_price: price_filter("min_price", query.min_price.as_deref())?,
        max_price: price_filter("max_price", query.max_price.as_deref())?,
    };
    let rows = store::list(&state.db, &filter, page).await?;
    Ok(web::Json(Page::from_rows(rows, page, |p| p.id)))
}

#[utoipa::path(get, path = "/products/{id}", tag = "products",
    params(("id" = Uuid, Path, description = "product id")),
    responses((status = 200, body = Product), (status = 400, body = ProblemBody, content_type = "application/problem+json"), (status = 404, body = ProblemBody, content_type = "application/problem+json")))]
async fn get_product(
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<web::Json<Arc<Product>>, Problem> {
    Ok(web::Json(super::find(&state, id.into_inner()).await?))
}

#[utoipa::path(post, path = "/products", tag = "products", security(("bearer" = [])), request_body = NewProduct,
    responses((status = 201, body = Product), (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 422, body = ProblemBody, content_type = "application/problem+json")))]
async fn create_product(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<NewProduct>,
) -> Result<HttpResponse, Problem> {
    caller.require_admin()?;
    let product = body.into_inner().into_product(Uuid::now_v7(), Utc::now());
    model::validate(&product)?;
    let product = store::insert(&state.db, &product).await?;
    super::written(&state, std::slice::from_ref(&product)).await?;
    sync_sale(&state, &product).await?;
    Ok(HttpResponse::Created()
        .insert_header((
            actix_web::http::header::LOCATION,
            format!("/products/{}", product.id),
        ))
        .json(product))
}

#[utoipa::path(patch, path = "/products/{id}", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "product id")), request_body = ProductPatch,
    responses((status = 200, body = Product), (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 404, body = ProblemBody, content_type = "application/problem+json"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json")))]
async fn patch_product(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    body: web::Json<ProductPatch>,
) -> Result<web::Json<Product>, Problem> {
    caller.require_admin()?;
    let current = store::find(&state.db, id.into_inner(), ReadFrom::Primary).await?;
    let product = body.into_inner().apply(current, Utc::now());
    model::validate(&product)?;
    let product = store::update(&state.db, &product).await?;
    super::written(&state, std::slice::from_ref(&product)).await?;
    sync_sale(&state, &product).await?;
    Ok(web::Json(product))
}

#[utoipa::path(put, path = "/products/{id}/inventory", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "product id")), request_body = InventoryUpdate,
    responses((status = 200, body = Product), (status = 403, body = ProblemBody, content_type = "application/problem+json"), (status = 409, body = ProblemBody, content_type = "application/problem+json",
               description = "inventory_below_reserved"), (status = 422, body = ProblemBody, content_type = "application/problem+json")))]
async fn set_inventory(
    state: web::Data<AppState>,
    caller: AuthUser,
    id: web::Path<Uuid>,
    body: web::Json<InventoryUpdate>,
) -> Result<web::Json<Product>, Problem> {
    caller.require_admin()?;
    model::check_inventory(body.inventory)?;
    let stock = &state.products.stock;
    let product = store::set_inventory(
        &state.db,
        id.into_inner(),
        body.inventory,
        stock,
        &state.redis,
    )
    .await?;
    super::written(&state, std::slice::from_ref(&product)).await?;
    Ok(web::Json(product))
}

#[utoipa::path(get, path = "/products/flash-sale", tag = "products", params(PageQuery),
    responses((status = 200, body = Page<FlashSaleItem>), (status = 400, body = ProblemBody, content_type = "application/problem+json")))]
async fn list_flash_sales(
    state: web::Data<AppState>,
    query: web::Query<PageQuery>,
) -> Result<web::Json<Page<FlashSaleItem>>, Problem> {
    let page = query.validate()?;
    let now = Utc::now();
    let far_future = now + chrono::Duration::days(366 * 100);
    let rows = store::sales(&state.db, now, far_future, page).await?;
    let ids: Vec<Uuid> = rows.iter().map(|p| p.id).collect();
    let live = state
        .products
        .stock
        .remaining(&state.redis, &ids)
        .await
        .map_err(ProductsError::from)?;
    let items = rows
        .into_iter()
        .zip(live)
        .map(|(product, live)| {
            let active = product.flash_sale_start.is_some_and(|start| start <= now);
            FlashSaleItem {
                // Not loaded yet (far from its start): everything on hand is still for sale.
                remaining: live.unwrap_or(i64::from(product.inventory)).max(0),
                sale_status: if active { "active" } else { "upcoming" },
                product,
            }
        })
        .collect();
    Ok(web::Json(Page::from_rows(items, page, |i| i.product.id)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    /// Words to look for in name, description and category; typos and prefixes match too.
    q: String,
    /// Items per page, 1..=100 (default 20).
    limit: Option<i64>,
    /// `next_cursor` from the previous page.
    cursor: Option<String>,
}

const MAX_QUERY_CHARS: usize = 200;
/// Deep pages cost the index linearly; nobody reads past this.
const MAX_SEARCH_OFFSET: usize = 10_000;

fn decode_offset(cursor: &str) -> Result<usize, Problem> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("o:").and_then(|n| n.parse().ok()))
        .filter(|offset| *offset <= MAX_SEARCH_OFFSET)
        .ok_or_else(|| Problem::bad_request("cursor is not valid"))
}

fn encode_offset(offset: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("o:{offset}"))
}

#[utoipa::path(get, path = "/products/search", tag = "products", params(SearchQuery),
    responses((status = 200, body = Page<Product>), (status = 400, body = ProblemBody, content_type = "application/problem+json")))]
async fn search_products(
    state: web::Data<AppState>,
    query: web::Query<SearchQuery>,
) -> Result<web::Json<Page<Arc<Product>>>, Problem> {
    let query = query.into_inner();
    let chars = query.q.trim().chars().count();
    if chars == 0 || chars > MAX_QUERY_CHARS {
        return Err(Problem::bad_request(format!(
            "q must be 1 to {MAX_QUERY_CHARS} characters"
        )));
    }
    let limit = PageQuery {
        limit: query.limit,
        cursor: None,
    }
    .validate()?
    .limit as usize;
    let offset = query
        .cursor
        .as_deref()
        .map(decode_offset)
        .transpose()?
        .unwrap_or(0);
    // One extra hit tells whether another page exists.
    let ids = super::search(&state, query.q, limit + 1, offset).await?;
    let more = ids.len() > limit;
    // Fetched concurrently: misses share the pipelined Redis connection.
    let found = join_all(
        ids.into_iter()
            .take(limit)
            .map(|id| super::find(&state, id)),
    )
    .await;
    let mut items = Vec::with_capacity(limit);
    for product in found {
        match product {
            Ok(product) => items.push(product),
            // Deleted since it was indexed: the next refresh drops it.
            Err(ProductsError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let next_cursor = more.then(|| encode_offset(offset + limit));
    Ok(web::Json(Page { items, next_cursor }))
}
