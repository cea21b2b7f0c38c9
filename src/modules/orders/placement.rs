//! Placing orders: validation, the reservation, and handing the order to acceptance.

use bigdecimal::BigDecimal;
use chrono::Utc;
use uuid::Uuid;

use super::acceptance;
use super::admission::{Entry, Ticket};
use super::error::OrdersError;
use super::fences;
use super::idempotency;
use super::lookup;
use super::model::{
    max_order_total, CreateOrderRequest, FlashSaleOrderRequest, Order, OrderItem, OrderKind,
    OrderMessage, OrderStatus, MAX_ADDRESS_CHARS, PAYMENT_METHODS,
};
use crate::app::AppState;
use crate::config::OrdersSettings;
use crate::infra::redis::IdempotencyStart;
use crate::infra::telemetry;
use crate::modules::auth::AuthUser;
use crate::modules::products::{self, Reservation, ReserveRequest};

/// The outcome of an order request.
pub struct Placed {
    pub order: Order,
    /// True when this answers again an earlier request with the same key.
    pub replayed: bool,
}

impl Placed {
    /// The order PostgreSQL says holds the key (Redis forgot it), if any.
    async fn replayed_from_db(
        state: &AppState,
        buyer: Uuid,
        durable_key: &str,
        redis_key: &str,
        body_hash: &str,
    ) -> Result<Option<Self>, OrdersError> {
        match idempotency::held_in_db(state, buyer, durable_key, redis_key, body_hash).await? {
            Some(order) => Ok(Some(Self {
                order: lookup::find_own(state, buyer, order)
                    .await?
                    .ok_or(OrdersError::RequestInProgress)?,
                replayed: true,
            })),
            None => Ok(None),
        }
    }

    /// The order an earlier request with the same key made. Its key was marked accepted
    /// after its record was written, so the order is readable unless Redis lost the record
    /// before the worker persisted it: then it is still on its way.
    async fn replayed(state: &AppState, buyer: Uuid, stored: &str) -> Result<Self, OrdersError> {
        let order = idempotency::replayed_order_id(stored)?;
        let order = lookup::find_own(state, buyer, order)
            .await?
            .ok_or(OrdersError::RequestInProgress)?;
        Ok(Self {
            order,
            replayed: true,
        })
    }
}

/// What a request's Idempotency-Key says once its sale sold out.
enum KeyAfterSellOut {
    /// An earlier request with the key was accepted: its order.
    Accepted(Placed),
    /// No request with the key reserved anything.
    Unused,
    /// A request with the key reserved and has not been answered: only the reservation
    /// script can tell whether it is still in flight, to be resumed, or released.
    InProgress,
}

/// Reads the key a request carries, while Redis keeps it.
async fn key_after_sell_out(
    state: &AppState,
    buyer: Uuid,
    idempotency_key: &str,
    body_hash: &str,
) -> Result<KeyAfterSellOut, OrdersError> {
    let stored: Option<String> = redis::cmd("GET")
        .arg(idempotency_key)
        .query_async(&mut state.redis.conn())
        .await?;
    let Some(stored) = stored else {
        return Ok(KeyAfterSellOut::Unused);
    };
    match idempotency::read_stored(&stored)? {
        idempotency::StoredKey::InProgress => Ok(KeyAfterSellOut::InProgress),
        idempotency::StoredKey::Accepted {
            body_hash: stored_hash,
        } => {
            if stored_hash.is_some_and(|stored_hash| stored_hash != body_hash) {
                return Err(OrdersError::IdempotencyKeyReused);
            }
            Placed::replayed(state, buyer, &stored)
                .await
                .map(KeyAfterSellOut::Accepted)
        }
    }
}

/// The flash-sale route's answer: the order, or a place in the sale's waiting room.
pub enum FlashSaleAnswer {
    Placed(Placed),
    Waiting(Ticket),
}

/// The flash-sale order path: admission (or a ticket in the waiting room), per-user attempt
/// limit, one atomic reservation, a confirmed publish, then the answer. A failed publish
/// gives the units back and answers 503.
pub async fn place_flash_sale_order(
    state: &AppState,
    caller: &AuthUser,
    product: Uuid,
    key_digest: &str,
    request: &FlashSaleOrderRequest,
) -> Result<FlashSaleAnswer, OrdersError> {
    let settings = &state.settings.orders;
    let quantity = request.quantity.unwrap_or(1);
    let (payment_method, shipping_address) = check_order_terms(
        settings,
        &[quantity],
        request.payment_method.as_deref(),
        request.shipping_address.as_deref(),
    )?;
    let body_hash = idempotency::body_digest(&format!(
        "{product}|{quantity}|{payment_method}|{shipping_address:?}"
    ));
    // The cheapest answer first: after a sell-out, most of a crowd gets it. One read of the
    // key first: a retry of a request that was accepted (its answer lost to a dropped
    // connection) gets its order, not `sold_out`.
    let admission = &state.orders.admission;
    if admission.known_sold_out(product) {
        let key = products::idempotency_key(state, product, caller.user_id, key_digest).await?;
        match key_after_sell_out(state, caller.user_id, &key, &body_hash).await? {
            KeyAfterSellOut::Accepted(placed) => return Ok(FlashSaleAnswer::Placed(placed)),
            KeyAfterSellOut::Unused => return Err(OrdersError::SoldOut),
            KeyAfterSellOut::InProgress => {}
        }
    }
    let listed = find_product(state, product).await?;
    let sale_price = listed.flash_sale_price.as_ref().unwrap_or(&listed.price);
    check_total(&[(sale_price, quantity)])?;
    match admission
        .enter(state, product, caller.user_id, key_digest)
        .await?
    {
        Entry::Go => {}
        Entry::Wait(ticket) => return Ok(FlashSaleAnswer::Waiting(ticket)),
        Entry::SoldOut => return Err(OrdersError::SoldOut),
    }
    let order_id = Uuid::now_v7();
    let mut request = ReserveRequest {
        product,
        user: caller.user_id,
        quantity: u32::try_from(quantity).unwrap_or(1),
        order_id,
        body_hash: &body_hash,
        key_digest,
        in_flight_secs: settings.in_flight_ttl_secs,
        key_ttl_secs: settings.idempotency_ttl_secs,
        attempts_per_minute: settings.flash_sale_attempts_per_minute,
        verify_window_ms: settings.idempotency_ttl_secs.saturating_mul(1000),
    };
    let idempotency_key =
        products::idempotency_key(state, product, caller.user_id, key_digest).await?;
    let durable_key = idempotency::durable_flash(product, key_digest);
    let mut reservation = products::reserve(state, &request).await?;
    if reservation == Reservation::Unverified {
        let replayed = Placed::replayed_from_db(
            state,
            caller.user_id,
            &durable_key,
            &idempotency_key,
            &body_hash,
        )
        .await?;
        if let Some(replayed) = replayed {
            return Ok(FlashSaleAnswer::Placed(replayed));
        }
        request.verify_window_ms = 0;
        reservation = products::reserve(state, &request).await?;
    }
    let (order_id, unit_price) = match reservation {
        Reservation::Reserved { unit_price } => (order_id, unit_price),
        Reservation::Resumed { order, unit_price } => (
            Uuid::try_parse(&order)
                .map_err(|_| OrdersError::Corrupt(format!("resumed order `{order}`")))?,
            unit_price,
        ),
        Reservation::Replay(stored) => {
            return Placed::replayed(state, caller.user_id, &stored)
                .await
                .map(FlashSaleAnswer::Placed)
        }
        Reservation::InProgress => return Err(OrdersError::RequestInProgress),
        Reservation::KeyReusedWithOtherBody => return Err(OrdersError::IdempotencyKeyReused),
        // PostgreSQL was asked already; a sale rebuilt again meanwhile is not worth a loop.
        Reservation::Unverified => return Err(OrdersError::StockUnavailable),
        Reservation::NotLoaded => return Err(not_loaded_reason(&listed)),
        Reservation::NotActive => return Err(OrdersError::SaleNotActive),
        Reservation::PurchaseLimit => return Err(OrdersError::PurchaseLimit),
        Reservation::SoldOut => {
            admission.note_sold_out(product);
            return Err(OrdersError::SoldOut);
        }
        Reservation::RateLimited { retry_after_secs } => {
            return Err(OrdersError::RateLimited { retry_after_secs })
        }
    };
    let item = OrderItem {
        product_id: product,
        quantity: i32::try_from(quantity).unwrap_or(1),
        price: parse_price(&unit_price)?,
    };
    let order = new_order(
        order_id,
        caller.user_id,
        vec![item],
        payment_method,
        shipping_address,
    );
    let message = OrderMessage {
        order,
        kind: OrderKind::FlashSale,
        attempt: 0,
        traceparent: telemetry::current_traceparent(),
        failure_reason: None,
        idempotency_key: Some(durable_key),
        charge_sent: false,
    };
    acceptance::accept(state, message, &idempotency_key, &body_hash)
        .await
        .map(FlashSaleAnswer::Placed)
}

/// `POST /orders`: several items of regular (not flash-sale) products. Each item is
/// reserved through the same Redis machinery; if one cannot be, the others are given back.
pub async fn place_order(
    state: &AppState,
    caller: &AuthUser,
    key_digest: &str,
    request: &CreateOrderRequest,
) -> Result<Placed, OrdersError> {
    let settings = &state.settings.orders;
    let mut items = request.items.clone();
    items.sort_by_key(|item| item.product_id);
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(OrdersError::Validation(format!(
            "items must hold 1 to {MAX_ITEMS} products"
        )));
    }
    if items
        .windows(2)
        .any(|pair| pair[0].product_id == pair[1].product_id)
    {
        return Err(OrdersError::Validation(
            "each product may appear once in items".into(),
        ));
    }
    let quantities: Vec<i64> = items.iter().map(|item| item.quantity).collect();
    let (payment_method, shipping_address) = check_order_terms(
        settings,
        &quantities,
        request.payment_method.as_deref(),
        request.shipping_address.as_deref(),
    )?;
    let listed = futures_util::future::try_join_all(
        items
            .iter()
            .map(|item| find_product(state, item.product_id)),
    )
    .await?;
    let priced: Vec<(&BigDecimal, i64)> = listed
        .iter()
        .zip(&quantities)
        .map(|(product, quantity)| (&product.price, *quantity))
        .collect();
    check_total(&priced)?;
    let body_hash =
        idempotency::body_digest(&format!("{items:?}|{payment_method}|{shipping_address:?}"));
    let idempotency_key = idempotency::regular_key(state, caller.user_id, key_digest);
    let durable_key = idempotency::durable_regular(key_digest);
    match idempotency::begin_regular(state, &idempotency_key, &body_hash).await? {
        IdempotencyStart::Fresh => {
            let replayed = Placed::replayed_from_db(
                state,
                caller.user_id,
                &durable_key,
                &idempotency_key,
                &body_hash,
            )
            .await?;
            if let Some(replayed) = replayed {
                return Ok(replayed);
            }
        }
        IdempotencyStart::Replay(stored) => {
            return Placed::replayed(state, caller.user_id, &stored).await
        }
        IdempotencyStart::InProgress => return Err(OrdersError::RequestInProgress),
        IdempotencyStart::KeyReusedWithOtherBody => return Err(OrdersError::IdempotencyKeyReused),
    }
    let order_id = Uuid::now_v7();
    let mut reserved = Vec::with_capacity(items.len());
    for item in &items {
        let units = u32::try_from(item.quantity).unwrap_or(1);
        let refused =
            match reserve_regular(state, item.product_id, caller.user_id, units, order_id).await {
                Ok(Reservation::Reserved { unit_price, .. }) => {
                    reserved.push(OrderItem {
                        product_id: item.product_id,
                        quantity: i32::try_from(item.quantity).unwrap_or(1),
                        price: parse_price(&unit_price)?,
                    });
                    continue;
                }
                Ok(Reservation::SoldOut) => OrdersError::SoldOut,
                Ok(Reservation::PurchaseLimit) => OrdersError::PurchaseLimit,
                Ok(Reservation::NotLoaded) => OrdersError::StockUnavailable,
                Ok(_) => OrdersError::SaleNotActive,
                Err(OrdersError::Products(products::ProductsError::NotFound)) => {
                    OrdersError::ProductNotFound
                }
                Err(e) => e,
            };
        let partial = new_order(
            order_id,
            caller.user_id,
            reserved,
            payment_method,
            shipping_address,
        );
        acceptance::give_back(state, &partial, &idempotency_key).await?;
        return Err(refused);
    }
    let order = new_order(
        order_id,
        caller.user_id,
        reserved,
        payment_method,
        shipping_address,
    );
    let message = OrderMessage {
        order,
        kind: OrderKind::Regular,
        attempt: 0,
        traceparent: telemetry::current_traceparent(),
        failure_reason: None,
        idempotency_key: Some(durable_key),
        charge_sent: false,
    };
    acceptance::accept(state, message, &idempotency_key, &body_hash).await
}

/// Reserves one item of a regular order; a product whose stock is not in Redis (its first
/// order, or a Redis loss) is loaded from PostgreSQL first, fenced like any rebuild (see
/// `fences`), so units an order committed before a loss are never on sale twice.
pub async fn reserve_regular(
    state: &AppState,
    product: Uuid,
    user: Uuid,
    units: u32,
    order: Uuid,
) -> Result<Reservation, OrdersError> {
    let first = products::reserve_regular(state, product, user, units, order).await?;
    if first != Reservation::NotLoaded {
        return Ok(first);
    }
    fences::rebuild_stock(state, product).await?;
    Ok(products::reserve_regular(state, product, user, units, order).await?)
}

const MAX_ITEMS: usize = 20;

async fn find_product(
    state: &AppState,
    product: Uuid,
) -> Result<std::sync::Arc<products::Product>, OrdersError> {
    products::find(state, product).await.map_err(|e| match e {
        products::ProductsError::NotFound => OrdersError::ProductNotFound,
        other => other.into(),
    })
}

/// Checks what both order routes take besides their items; answers the payment method
/// (default `card`) and the trimmed shipping address.
fn check_order_terms(
    settings: &OrdersSettings,
    quantities: &[i64],
    payment_method: Option<&str>,
    shipping_address: Option<&str>,
) -> Result<(String, Option<String>), OrdersError> {
    if quantities
        .iter()
        .any(|q| *q < 1 || *q > i64::from(settings.max_quantity))
    {
        return Err(OrdersError::Validation(format!(
            "quantity must be 1 to {}",
            settings.max_quantity
        )));
    }
    let payment_method = payment_method.unwrap_or("card");
    if !PAYMENT_METHODS.contains(&payment_method) {
        return Err(OrdersError::Validation(format!(
            "payment_method must be one of {PAYMENT_METHODS:?}"
        )));
    }
    let shipping_address = shipping_address.map(str::trim);
    if let Some(address) = shipping_address {
        let chars = address.chars().count();
        if chars == 0 || chars > MAX_ADDRESS_CHARS {
            return Err(OrdersError::Validation(format!(
                "shipping_address must be 1 to {MAX_ADDRESS_CHARS} characters"
            )));
        }
    }
    Ok((
        payment_method.to_owned(),
        shipping_address.map(str::to_owned),
    ))
}

/// Refuses an order whose total the books cannot hold, before any unit is reserved: the
/// worker could never persist it.
fn check_total(lines: &[(&BigDecimal, i64)]) -> Result<(), OrdersError> {
    let total: BigDecimal = lines
        .iter()
        .map(|(price, quantity)| *price * BigDecimal::from(*quantity))
        .sum();
    if total > max_order_total() {
        return Err(OrdersError::TotalTooLarge);
    }
    Ok(())
}

fn parse_price(unit_price: &str) -> Result<BigDecimal, OrdersError> {
    unit_price
        .parse()
        .map_err(|_| OrdersError::Corrupt(format!("sale price `{unit_price}`")))
}

fn new_order(
    id: Uuid,
    user_id: Uuid,
    items: Vec<OrderItem>,
    payment_method: String,
    shipping_address: Option<String>,
) -> Order {
    let total: BigDecimal = items
        .iter()
        .map(|item| &item.price * BigDecimal::from(item.quantity))
        .sum();
    let now = Utc::now();
    Order {
        id,
        user_id,
        status: OrderStatus::Pending,
        total_amount: total.with_scale(2),
        payment_method,
        shipping_address,
        items,
        created_at: now,
        updated_at: now,
    }
}

/// Why Redis has no counters for a product on sale now: they are being restored after a
/// Redis loss (503); otherwise there is no sale on (409).
fn not_loaded_reason(product: &products::Product) -> OrdersError {
    let now = Utc::now();
    match product.sale_window() {
        Some((start, end)) if start <= now && now < end => OrdersError::StockUnavailable,
        _ => OrdersError::SaleNotActive,
    }
}
