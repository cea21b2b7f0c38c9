use bigdecimal::BigDecimal;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    Shipped,
    Completed,
    Cancelled,
    Failed,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Completed => "completed",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending" => OrderStatus::Pending,
            "paid" => OrderStatus::Paid,
            "shipped" => OrderStatus::Shipped,
            "completed" => OrderStatus::Completed,
            "cancelled" => OrderStatus::Cancelled,
            "failed" => OrderStatus::Failed,
            _ => return None,
        })
    }

    /// Final states: the order will not move again by itself.
    pub fn is_final(self) -> bool {
        !matches!(self, OrderStatus::Pending)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    FlashSale,
    Regular,
}

impl OrderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderKind::FlashSale => "flash_sale",
            OrderKind::Regular => "regular",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderItem {
    pub product_id: Uuid,
    pub quantity: i32,
    /// Unit price charged, decimal string.
    #[schema(value_type = String)]
    pub price: BigDecimal,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: OrderStatus,
    #[schema(value_type = String)]
    pub total_amount: BigDecimal,
    pub payment_method: String,
    pub shipping_address: Option<String>,
    pub items: Vec<OrderItem>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /orders/flash-sale/{productId}`.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlashSaleOrderRequest {
    /// Units, default 1.
    pub quantity: Option<i64>,
    /// "card" (default), "card_declined" or "card_flaky" with the payment simulator.
    pub payment_method: Option<String>,
    pub shipping_address: Option<String>,
}

/// One line of `POST /orders`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// `POST /orders`: several regular products in one order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    pub items: Vec<OrderLine>,
    /// "card" (default), "card_declined" or "card_flaky" with the payment simulator.
    pub payment_method: Option<String>,
    pub shipping_address: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderStatusView {
    pub id: Uuid,
    pub status: OrderStatus,
    pub updated_at: DateTime<Utc>,
}

/// An admin moving an order on: `shipped` (from paid) or `completed` (from shipped).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderStatusChange {
    pub status: OrderStatus,
}

/// One order on the queue: everything the worker needs, nothing it must look up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderMessage {
    pub order: Order,
    pub kind: OrderKind,
    /// Delivery attempts so far (0 on the first delivery).
    #[serde(default)]
    pub attempt: u32,
    /// W3C trace context of the request that placed the order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Why the worker gave up on it (set on the copy in the dead-letter queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The request's Idempotency-Key, scoped to its route (see `idempotency::scoped`): the
    /// order is written with it, and one user's key names one order in PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// An earlier delivery sent the order to the payment gateway, which may have charged it
    /// (an answer lost to a timeout, a commit a rebuild voided): should it end failed, it is
    /// refunded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charge_sent: bool,
}

/// What one AMQP message carries: the orders the API accepted within a few milliseconds.
/// The broker's cost is per message, so coalescing cuts it by the batch size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderEnvelope<M = OrderMessage> {
    /// Schema version.
    pub v: u32,
    pub orders: Vec<M>,
}

impl<M> OrderEnvelope<M> {
    pub const VERSION: u32 = 1;

    /// `M` is an `OrderMessage`, or one already serialized when publishing.
    pub fn new(orders: Vec<M>) -> Self {
        Self {
            v: Self::VERSION,
            orders,
        }
    }
}

/// The largest total `orders.total_amount` (NUMERIC(12, 2)) holds, in cents.
const MAX_ORDER_TOTAL_CENTS: i64 = 999_999_999_999;

/// The largest total an order may have: the books must be able to hold it.
pub fn max_order_total() -> BigDecimal {
    BigDecimal::new(MAX_ORDER_TOTAL_CENTS.into(), 2)
}

pub const PAYMENT_METHODS: [&str; 3] = ["card", "card_declined", "card_flaky"];
pub const MAX_ADDRESS_CHARS: usize = 500;
