//! The order path's metrics: `orders_total{status,type}`, `order_duration_seconds`,
//! revenue, and the worker's failure isolation.

use bigdecimal::{BigDecimal, ToPrimitive};

use super::model::{Order, OrderKind, OrderStatus};

/// `orders_total{status, type}`; an order counts as `accepted` when the API answers 201.
pub fn count_order(status: OrderStatus, kind: OrderKind) {
    let status = match status {
        OrderStatus::Pending => "accepted",
        other => other.as_str(),
    };
    metrics::counter!("orders_total", "status" => status, "type" => kind.as_str()).increment(1);
}

/// `orders_total` and the accept-to-settled time, once per order (the insert that wrote it).
pub fn record_settled(order: &Order, status: OrderStatus, kind: OrderKind) {
    count_order(status, kind);
    let waited = chrono::Utc::now() - order.created_at;
    metrics::histogram!("order_duration_seconds", "type" => kind.as_str())
        .record(waited.as_seconds_f64().max(0.0));
    if status == OrderStatus::Paid {
        // Cents, for the revenue panel; the ledger and the orders table are the books.
        let cents = (&order.total_amount * BigDecimal::from(100))
            .to_u64()
            .unwrap_or(0);
        metrics::counter!("order_revenue_cents_total", "type" => kind.as_str()).increment(cents);
    }
}

/// `order_batches_split_total`: batches (or halves of them) that failed as a whole and
/// were split.
pub fn count_split_batch() {
    metrics::counter!("order_batches_split_total").increment(1);
}

/// `orders_dead_lettered_total{reason}`: orders the worker gave up on.
pub fn count_dead_lettered(reason: &'static str) {
    metrics::counter!("orders_dead_lettered_total", "reason" => reason).increment(1);
}

/// An accepted order whose acceptance record (Redis) could not be written: answered 201, and
/// readable once the worker has persisted it.
pub fn count_unrecorded() {
    metrics::counter!("orders_unrecorded_total").increment(1);
}
