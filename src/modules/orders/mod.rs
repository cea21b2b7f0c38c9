//! Orders: the flash-sale order path (reserve in Redis, publish with confirms, answer 201),
//! the order-worker that persists, charges and settles, the reconciler, and the read and
//! cancel routes.
//!
//! One file per concern: `placement` (validation and reservation), `admission` (admission
//! control and the waiting room of the flash-sale path), `idempotency` (both
//! routes' keys and what an accepted one keeps), `acceptance` (the confirmed publish and the acceptance
//! record, batched), `worker` (consuming and failure isolation), `settle` (a batch end to end, and
//! what every final state needs), `refunds` (retried until done or dead-lettered), `cancel`,
//! `lookup` (reads), `metrics`.

mod acceptance;
mod admission;
mod cancel;
mod error;
mod feed;
mod fences;
mod handlers;
mod holding;
mod idempotency;
mod lifecycle;
mod lookup;
mod metrics;
mod model;
mod payment;
mod placement;
mod queue;
mod reconciler;
mod refunds;
mod settle;
mod store;
mod stream;
mod worker;

use std::sync::Arc;

pub use admission::Ticket;
pub use cancel::cancel_order;
pub use error::OrdersError;
pub use fences::rebuild_stock;
pub use handlers::configure;
pub use idempotency::key_digest as idempotency_digest;
pub use lifecycle::advance_order;
pub use lookup::{find_order, list_user_orders};
pub use model::{
    CreateOrderRequest, FlashSaleOrderRequest, Order, OrderEnvelope, OrderItem, OrderKind,
    OrderMessage, OrderStatus,
};
pub use payment::{Charge, ChargeResults, PaymentGateway, PaymentSimulator, Payments};
pub use placement::{
    place_flash_sale_order, place_order, reserve_regular, FlashSaleAnswer, Placed,
};
pub use queue::QueueNames;
pub use reconciler::{reconcile_once, Repairs};

use crate::app::AppState;
use crate::config::Settings;
use crate::infra::amqp::{Amqp, Publisher};
use crate::infra::redis::{Idempotency, Redis};
use admission::Admission;

pub fn openapi() -> utoipa::openapi::OpenApi {
    <handlers::OrdersApi as utoipa::OpenApi>::openapi()
}

/// What orders keep for the life of the process.
pub struct OrdersState {
    pub queues: QueueNames,
    idempotency: Idempotency,
    publisher: Arc<Publisher>,
    acceptor: acceptance::Acceptor,
    pub payments: Payments,
    /// The simulator itself, for fault drills (failure rate at run time).
    pub simulator: Arc<PaymentSimulator>,
    pub admission: Arc<Admission>,
    /// Status changes and waiting rooms, for this process's pushed streams.
    feed: Arc<feed::Feed>,
    /// Pushed streams this process may still open.
    streams: stream::StreamSlots,
}

impl OrdersState {
    /// Declares the queues and opens the confirming publisher.
    pub async fn new(all: &Settings, amqp: &Amqp, redis: &Redis) -> Result<Self, OrdersError> {
        let settings = &all.orders;
        let queues = QueueNames::new(&all.amqp.queue_prefix, settings);
        let publisher = Arc::new(Publisher::open(amqp).await?);
        queue::declare(amqp, &queues, settings, all.amqp.queue_expires_ms).await?;
        let admission = Arc::new(Admission::new(&settings.admission, redis));
        let acceptor = acceptance::Acceptor::start(
            publisher.clone(),
            queues.orders.clone(),
            settings,
            redis.clone(),
            admission.clone(),
        );
        let simulator = Arc::new(PaymentSimulator::new(redis.clone(), &settings.payment));
        let payments = Payments::new(simulator.clone(), &settings.payment);
        Ok(Self {
            queues,
            idempotency: Idempotency::default(),
            publisher,
            acceptor,
            payments,
            simulator,
            admission,
            feed: feed::Feed::new(redis),
            streams: stream::StreamSlots::new(&settings.push),
        })
    }
}

/// The API role's one subscription to order status changes (for its pushed streams).
pub async fn run_feed(state: AppState) {
    feed::run_subscription(state).await
}

/// The order-worker's consumer; runs until the connection closes or a broker error.
pub async fn run_worker(state: AppState) -> Result<(), OrdersError> {
    worker::run(state).await
}

/// The API role's admission sampler (backlog and settle rate); runs for the life of the
/// process.
pub async fn run_admission(state: AppState) {
    admission::run_sampler(state).await
}

/// The order-worker's consumer of refunds to retry; runs until the connection closes.
pub async fn run_refunds(state: AppState) -> Result<(), OrdersError> {
    refunds::run(state).await
}

/// The reconciler and sale scheduler of the worker role; runs for the life of the process.
pub async fn run_reconciler(state: AppState) {
    reconciler::run(state).await
}

/// Every queue of the order path, for the queue-depth gauges.
pub fn queue_names(state: &AppState) -> Vec<String> {
    state.orders.queues.all()
}
