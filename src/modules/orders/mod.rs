//! Orders: the flash-sale order path (reserve in Redis, publish with confirms, answer 201),
//! the order-worker that persists, charges and settles, the reconciler, and the read and
//! cancel routes.

mod error;
mod handlers;
mod model;
mod payment;
mod queue;
mod reconciler;
mod store;
mod worker;

use std::sync::Arc;

use bigdecimal::BigDecimal;
use chrono::Utc;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use error::OrdersError;
pub use model::{
    CreateOrderRequest, FlashSaleOrderRequest, Order, OrderEnvelope, OrderItem, OrderKind,
    OrderMessage, OrderStatus,
};
pub use payment::{PaymentGateway, PaymentSimulator, Payments};
pub use queue::QueueNames;
pub use reconciler::{reconcile_once, Repairs};

use crate::app::AppState;
use crate::config::{OrdersSettings, Settings};
use crate::infra::amqp::{Amqp, Publisher};
use crate::infra::db::ReadFrom;
use crate::infra::http::paging::PageRequest;
use crate::infra::redis::{Idempotency, IdempotencyStart, Redis};
use crate::infra::telemetry;
use crate::modules::auth::AuthUser;
use crate::modules::products::{self, Reservation, ReserveRequest};
use model::{MAX_ADDRESS_CHARS, PAYMENT_METHODS};

pub use handlers::configure;

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::OrdersApi as utoipa::OpenApi>::openapi()
}

/// What orders keep for the life of the process.
pub struct OrdersState {
    pub queues: QueueNames,
    idempotency: Idempotency,
    publisher: Arc<Publisher>,
    order_publisher: queue::OrderPublisher,
    pub payments: Payments,
    /// The simulator itself, for fault drills (failure rate at run time).
    pub simulator: Arc<PaymentSimulator>,
}

impl OrdersState {
    /// Declares the queues and opens the confirming publisher.
    pub async fn new(all: &Settings, amqp: &Amqp, redis: &Redis) -> Result<Self, OrdersError> {
        let settings = &all.orders;
        let queues = QueueNames::new(&all.amqp.queue_prefix, settings);
        let publisher = Arc::new(Publisher::open(amqp).await?);
        queue::declare(
            publisher.channel(),
            &queues,
            settings,
            all.amqp.queue_expires_ms,
        )
        .await?;
        let order_publisher = queue::OrderPublisher::start(
            publisher.clone(),
            queues.orders.clone(),
            settings.publish_batch_max,
            std::time::Duration::from_millis(settings.publish_linger_ms),
        );
        let simulator = Arc::new(PaymentSimulator::new(redis.clone(), &settings.payment));
        let payments = Payments::new(simulator.clone(), &settings.payment);
        Ok(Self {
            queues,
            idempotency: Idempotency::default(),
            publisher,
            order_publisher,
            payments,
            simulator,
        })
    }
}

/// The order-worker's consumer; runs until the connection closes or a broker error.
pub async fn run_worker(state: AppState) -> Result<(), OrdersError> {
    worker::run(state).await
}

/// The reconciler and sale scheduler of the worker role; runs for the life of the process.
pub async fn run_reconciler(state: AppState) {
    reconciler::run(state).await
}

const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks an `Idempotency-Key` and returns its digest (keys are stored hashed).
pub fn idempotency_digest(key: Option<&str>) -> Result<String, OrdersError> {
    let key = key.ok_or(OrdersError::IdempotencyKeyRequired)?;
    let valid = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(OrdersError::IdempotencyKeyRequired);
    }
    Ok(hex(&Sha256::digest(key.as_bytes())[..16]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer an idempotent request gave, stored for replays. `state` and `body_hash`
/// are read by the reservation script.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    state: String,
    body_hash: String,
    order: Order,
}

/// The outcome of `POST /orders/flash-sale/{productId}`.
pub struct Placed {
    pub order: Order,
    /// True when this is the stored answer to an earlier request with the same key.
    pub replayed: bool,
}

/// The flash-sale order path: per-user attempt limit, one atomic reservation, a confirmed
/// publish, then the answer. A failed publish gives the units back and answers 503.
pub async fn place_flash_sale_order(
    state: &AppState,
    caller: &AuthUser,
    product: Uuid,
    key_digest: &str,
    request: &FlashSaleOrderRequest,
) -> Result<Placed, OrdersError> {
    let settings = &state.settings.orders;
    let quantity = request.quantity.unwrap_or(1);
    let (payment_method, shipping_address) = check_order_terms(
        settings,
        &[quantity],
        request.payment_method.as_deref(),
        request.shipping_address.as_deref(),
    )?;
    let body_hash = hex(&Sha256::digest(
        format!("{product}|{quantity}|{payment_method}|{shipping_address:?}").as_bytes(),
    ));
    let order_id = Uuid::now_v7();
    let reservation = products::reserve(
        state,
        &ReserveRequest {
            product,
            user: caller.user_id,
            quantity: u32::try_from(quantity).unwrap_or(1),
            order_id,
            body_hash: &body_hash,
            key_digest,
            idempotency_ttl_secs: settings.idempotency_ttl_secs,
            attempts_per_minute: settings.flash_sale_attempts_per_minute,
        },
    )
    .await?;
    let unit_price = match reservation {
        Reservation::Reserved { unit_price } => unit_price,
        Reservation::Replay(stored) => return replay(&stored),
        Reservation::InProgress => return Err(OrdersError::RequestInProgress),
        Reservation::KeyReusedWithOtherBody => return Err(OrdersError::IdempotencyKeyReused),
        Reservation::NotLoaded => return Err(not_loaded_reason(state, product).await),
        Reservation::NotActive => return Err(OrdersError::SaleNotActive),
        Reservation::PurchaseLimit => return Err(OrdersError::PurchaseLimit),
        Reservation::SoldOut => return Err(OrdersError::SoldOut),
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
    };
    let idempotency_key = products::idempotency_key(state, product, caller.user_id, key_digest);
    accept(state, message, &idempotency_key, body_hash).await
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
    let body_hash = hex(&Sha256::digest(
        format!("{items:?}|{payment_method}|{shipping_address:?}").as_bytes(),
    ));
    let idempotency_key = state.redis.key(format_args!(
        "{{u:{}}}:orders-idem:{key_digest}",
        caller.user_id.simple()
    ));
    let started = state
        .orders
        .idempotency
        .begin(
            &state.redis,
            &idempotency_key,
            &body_hash,
            settings.idempotency_ttl_secs,
        )
        .await?;
    match started {
        IdempotencyStart::Fresh => {}
        IdempotencyStart::Replay(stored) => return replay(&stored),
        IdempotencyStart::InProgress => return Err(OrdersError::RequestInProgress),
        IdempotencyStart::KeyReusedWithOtherBody => return Err(OrdersError::IdempotencyKeyReused),
    }
    let order_id = Uuid::now_v7();
    let mut reserved = Vec::with_capacity(items.len());
    for item in &items {
        let units = u32::try_from(item.quantity).unwrap_or(1);
        let refused = match products::reserve_regular(
            state,
            item.product_id,
            caller.user_id,
            units,
            order_id,
        )
        .await
        {
            Ok(Reservation::Reserved { unit_price }) => {
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
            Err(products::ProductsError::NotFound) => OrdersError::ProductNotFound,
            Err(e) => e.into(),
        };
        let partial = new_order(
            order_id,
            caller.user_id,
            reserved,
            payment_method,
            shipping_address,
        );
        give_back(state, &partial, &idempotency_key).await?;
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
    };
    accept(state, message, &idempotency_key, body_hash).await
}

const MAX_ITEMS: usize = 20;

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

fn replay(stored: &str) -> Result<Placed, OrdersError> {
    let answer: StoredAnswer =
        serde_json::from_str(stored).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    Ok(Placed {
        order: answer.order,
        replayed: true,
    })
}

/// Publishes the order; only a confirmed publish accepts it (its status is readable and
/// its answer stored for replays from then on). Otherwise the units and the key go back.
async fn accept(
    state: &AppState,
    message: OrderMessage,
    idempotency_key: &str,
    body_hash: String,
) -> Result<Placed, OrdersError> {
    if let Err(e) = state.orders.order_publisher.publish(message.clone()).await {
        give_back(state, &message.order, idempotency_key).await?;
        return Err(e);
    }
    let answer = StoredAnswer {
        state: "done".to_owned(),
        body_hash,
        order: message.order.clone(),
    };
    let answer = serde_json::to_string(&answer).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    record_accepted(state, &message, idempotency_key, &answer).await?;
    count_order(OrderStatus::Pending, message.kind);
    Ok(Placed {
        order: message.order,
        replayed: false,
    })
}

/// Undoes a request that will not be accepted: its reserved units, and its key (so a
/// retry runs again).
async fn give_back(
    state: &AppState,
    order: &Order,
    idempotency_key: &str,
) -> Result<(), OrdersError> {
    worker::release_stock(state, &[order]).await?;
    redis::cmd("DEL")
        .arg(idempotency_key)
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(())
}

/// Why Redis has no counters for `product`: no such sale (409/404), or a sale whose
/// counters are being restored after a Redis loss (503). Only this rare path reads the
/// database.
async fn not_loaded_reason(state: &AppState, product: Uuid) -> OrdersError {
    match products::find(state, product).await {
        Ok(p) => {
            let now = Utc::now();
            match p.sale_window() {
                Some((start, end)) if start <= now && now < end => OrdersError::StockUnavailable,
                _ => OrdersError::SaleNotActive,
            }
        }
        Err(products::ProductsError::NotFound) => OrdersError::ProductNotFound,
        Err(e) => e.into(),
    }
}

/// Makes the accepted order readable (status) and stores the answer for replays of its
/// idempotency key, in one round trip.
async fn record_accepted(
    state: &AppState,
    message: &OrderMessage,
    idempotency_key: &str,
    answer: &str,
) -> Result<(), OrdersError> {
    let json = serde_json::to_string(message).map_err(|e| OrdersError::Corrupt(e.to_string()))?;
    redis::pipe()
        .cmd("SET")
        .arg(accepted_key(&state.redis, message.order.id))
        .arg(json)
        .arg("EX")
        .arg(state.settings.orders.idempotency_ttl_secs)
        .ignore()
        .cmd("SET")
        .arg(idempotency_key)
        .arg(answer)
        .arg("XX")
        .arg("KEEPTTL")
        .ignore()
        .query_async::<()>(&mut state.redis.conn())
        .await?;
    Ok(())
}

fn accepted_key(redis: &Redis, order: Uuid) -> String {
    redis.key(format_args!("order:{order}"))
}

async fn accepted_order(
    state: &AppState,
    order: Uuid,
) -> Result<Option<OrderMessage>, OrdersError> {
    let json: Option<String> = redis::cmd("GET")
        .arg(accepted_key(&state.redis, order))
        .query_async(&mut state.redis.conn())
        .await?;
    Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
}

/// An order as the caller may see it: from its shard once persisted, from the accepted
/// record before that. Someone else's order is "not found".
pub async fn find_order(
    state: &AppState,
    caller: &AuthUser,
    order: Uuid,
) -> Result<Order, OrdersError> {
    Ok(locate(state, caller, order).await?.0)
}

/// The order and, while it is known from its acceptance record, its kind.
async fn locate(
    state: &AppState,
    caller: &AuthUser,
    order: Uuid,
) -> Result<(Order, Option<OrderKind>), OrdersError> {
    let accepted = accepted_order(state, order).await?;
    let owner = accepted.as_ref().map(|m| m.order.user_id);
    let kind = accepted.as_ref().map(|m| m.kind);
    let persisted = match (owner, caller.is_admin()) {
        (Some(owner), _) => store::find(&state.db, owner, order, ReadFrom::Primary).await?,
        (None, true) => store::find_anywhere(&state.db, order).await?,
        (None, false) => store::find(&state.db, caller.user_id, order, ReadFrom::Primary).await?,
    };
    let found = persisted
        .or(accepted.map(|m| m.order))
        .ok_or(OrdersError::NotFound)?;
    if found.user_id != caller.user_id && !caller.is_admin() {
        return Err(OrdersError::NotFound);
    }
    Ok((found, kind))
}

pub async fn list_user_orders(
    state: &AppState,
    user: Uuid,
    page: PageRequest,
) -> Result<Vec<Order>, OrdersError> {
    store::list_for_user(&state.db, user, page, ReadFrom::Replica).await
}

/// Cancels a pending or paid order: stock back exactly once, a paid order refunded.
/// Cancelling twice answers the cancelled order again.
pub async fn cancel_order(
    state: &AppState,
    caller: &AuthUser,
    order_id: Uuid,
) -> Result<Order, OrdersError> {
    let (order, kind) = locate(state, caller, order_id).await?;
    let already_cancelled = order.status == OrderStatus::Cancelled;
    let traceparent = telemetry::current_traceparent();
    let traceparent = traceparent.as_deref();
    match store::cancel(&state.db, &order, traceparent).await? {
        None => {
            // Accepted but not yet persisted: record it cancelled. The worker finds the row
            // and the released reservation and leaves both alone; if the worker inserted it
            // first, this insert does nothing and the second pass below cancels it.
            let cancelled = store::NewOrder {
                order: &order,
                kind: kind.unwrap_or(OrderKind::Regular),
                status: OrderStatus::Cancelled,
                failure_reason: None,
                traceparent,
            };
            store::insert_batch(&state.db, &[cancelled]).await?;
            if store::cancel(&state.db, &order, traceparent).await? == Some(OrderStatus::Paid) {
                worker::refund(state, order.id).await;
            }
        }
        Some(OrderStatus::Paid) => worker::refund(state, order.id).await,
        Some(OrderStatus::Pending | OrderStatus::Cancelled) => {}
        Some(_) => return Err(OrdersError::NotCancellable),
    }
    let current = store::find(&state.db, order.user_id, order.id, ReadFrom::Primary)
        .await?
        .ok_or(OrdersError::NotFound)?;
    if current.status != OrderStatus::Cancelled {
        return Err(OrdersError::NotCancellable);
    }
    worker::release_stock(state, &[&current]).await?;
    if !already_cancelled {
        count_order(OrderStatus::Cancelled, kind.unwrap_or(OrderKind::Regular));
    }
    let cancelled = worker::Settled {
        order: &current,
        status: OrderStatus::Cancelled,
        traceparent,
    };
    worker::notify_all(state, &[cancelled]).await?;
    Ok(current)
}

/// Every queue of the order path, for the queue-depth gauges.
pub fn queue_names(state: &AppState) -> Vec<String> {
    let queues = &state.orders.queues;
    let mut names = vec![queues.orders.clone(), queues.dead.clone()];
    names.extend(queues.retries.iter().map(|(name, _)| name.clone()));
    names
}

/// `orders_total{status, type}`; an order counts as `accepted` when the API answers 201.
pub(crate) fn count_order(status: OrderStatus, kind: OrderKind) {
    let status = match status {
        OrderStatus::Pending => "accepted",
        other => other.as_str(),
    };
    metrics::counter!("orders_total", "status" => status, "type" => kind.as_str()).increment(1);
}
