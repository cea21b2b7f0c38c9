use actix_web::http::StatusCode;

use crate::infra::amqp::PublishError;
use crate::infra::db::DbError;
use crate::infra::http::Problem;
use crate::modules::notifications::NotificationsError;
use crate::modules::products::ProductsError;

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("order not found")]
    NotFound,
    #[error("product not found")]
    ProductNotFound,
    #[error("{0}")]
    Validation(String),
    #[error("Idempotency-Key header is required (1 to 255 visible ASCII characters)")]
    IdempotencyKeyRequired,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still in progress")]
    RequestInProgress,
    #[error("sold out")]
    SoldOut,
    #[error("the sale is not active")]
    SaleNotActive,
    #[error("purchase limit reached for this sale")]
    PurchaseLimit,
    #[error("the order's total is larger than an order can hold")]
    TotalTooLarge,
    #[error("the order can no longer be cancelled")]
    NotCancellable,
    #[error("an order that is {from} cannot become {to}")]
    InvalidTransition {
        from: &'static str,
        to: &'static str,
    },
    #[error("too many flash-sale attempts")]
    RateLimited { retry_after_secs: u64 },
    #[error("flash-sale stock is being restored")]
    StockUnavailable,
    #[error("more orders are waiting to be settled than the platform settles in time")]
    Overloaded { retry_after_secs: u64 },
    #[error("order queue: {0}")]
    Queue(String),
    #[error("corrupt order data: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Products(#[from] ProductsError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl OrdersError {
    /// True when a dependency (database, Redis, broker) could not be reached: the same work
    /// succeeds once it is back. Anything else is about the data, and may be one order's.
    pub fn is_outage(&self) -> bool {
        match self {
            OrdersError::Queue(_) => true,
            OrdersError::Db(e) | OrdersError::Products(ProductsError::Db(e)) => {
                e.is_unavailable() || db_connection_lost(e)
            }
            OrdersError::Redis(e) | OrdersError::Products(ProductsError::Redis(e)) => {
                redis_unreachable(e)
            }
            _ => false,
        }
    }
}

fn db_connection_lost(e: &DbError) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        e,
        DbError::Query(
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
                | Error::BrokenTransactionManager
        )
    )
}

fn redis_unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

impl From<diesel::result::Error> for OrdersError {
    fn from(e: diesel::result::Error) -> Self {
        OrdersError::Db(e.into())
    }
}

impl From<lapin::Error> for OrdersError {
    fn from(e: lapin::Error) -> Self {
        OrdersError::Queue(e.to_string())
    }
}

impl From<PublishError> for OrdersError {
    fn from(e: PublishError) -> Self {
        OrdersError::Queue(e.to_string())
    }
}

impl From<NotificationsError> for OrdersError {
    fn from(e: NotificationsError) -> Self {
        OrdersError::Queue(e.to_string())
    }
}

impl From<OrdersError> for Problem {
    fn from(e: OrdersError) -> Self {
        let detail = e.to_string();
        match e {
            OrdersError::NotFound => Problem::not_found("order"),
            OrdersError::ProductNotFound => Problem::not_found("product"),
            OrdersError::Validation(detail) => Problem::validation(detail),
            OrdersError::IdempotencyKeyRequired => {
                Problem::new(StatusCode::BAD_REQUEST, "idempotency_key_required", detail)
            }
            OrdersError::IdempotencyKeyReused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                detail,
            ),
            OrdersError::RequestInProgress => Problem::conflict("request_in_progress", detail),
            OrdersError::TotalTooLarge => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "total_too_large", detail)
            }
            OrdersError::SoldOut => Problem::conflict("sold_out", detail),
            OrdersError::SaleNotActive => Problem::conflict("sale_not_active", detail),
            OrdersError::PurchaseLimit => Problem::conflict("purchase_limit", detail),
            OrdersError::NotCancellable => Problem::conflict("not_cancellable", detail),
            OrdersError::InvalidTransition { .. } => {
                Problem::conflict("invalid_transition", detail)
            }
            OrdersError::RateLimited { retry_after_secs } => {
                Problem::rate_limited(retry_after_secs)
            }
            OrdersError::StockUnavailable | OrdersError::Queue(_) => Problem::unavailable(&detail),
            OrdersError::Overloaded { retry_after_secs } => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail)
                    .with_retry_after(retry_after_secs)
            }
            OrdersError::Corrupt(_) => Problem::internal(&detail),
            OrdersError::Products(e) => e.into(),
            OrdersError::Db(e) => e.into(),
            OrdersError::Redis(e) => e.into(),
        }
    }
}
