//! No order holds another back: a batch that fails is settled order by order, an order
//! that fails on its own ends `failed` with its units back and a copy in the dead-letter
//! queue, an order whose retries are used up ends `failed`, and an order whose total the
//! books cannot hold is refused before anything is reserved.

mod common;

use bigdecimal::BigDecimal;
use chrono::Utc;
use common::{assert_problem, unique_email, until, TestApp};
use flashsale::infra::amqp::Publisher;
use flashsale::modules::orders::{
    Order, OrderEnvelope, OrderItem, OrderKind, OrderMessage, OrderStatus,
};
use lapin::options::BasicGetOptions;
use serde_json::json;
use uuid::Uuid;

/// Reserves one unit for a new buyer, as the API would; answers the order to publish.
async fn reserved_order(app: &TestApp, product: Uuid, unit_price: &str, total: &str) -> Order {
    let (order, user) = (Uuid::now_v7(), Uuid::now_v7());
    let key_digest = order.simple().to_string();
    app.reserve_unpublished(product, user, order, "h", &key_digest)
        .await;
    let now = Utc::now();
    Order {
        id: order,
        user_id: user,
        status: OrderStatus::Pending,
        total_amount: total.parse::<BigDecimal>().unwrap(),
        payment_method: "card".into(),
        shipping_address: None,
        items: vec![OrderItem {
            product_id: product,
            quantity: 1,
            price: unit_price.parse().unwrap(),
        }],
        created_at: now,
        updated_at: now,
    }
}

/// Publishes the orders as one message on the order queue, as the API's coalescing does.
async fn publish_together(app: &TestApp, orders: Vec<Order>) {
    let messages = orders
        .into_iter()
        .map(|order| OrderMessage {
            order,
            kind: OrderKind::FlashSale,
            attempt: 0,
            traceparent: None,
            failure_reason: None,
            idempotency_key: None,
            charge_sent: false,
        })
        .collect();
    let payload = serde_json::to_vec(&OrderEnvelope::new(messages)).unwrap();
    let publisher = Publisher::open(&app.state.amqp).await.unwrap();
    publisher
        .publish(&app.state.orders.queues.orders, &payload)
        .await
        .unwrap();
}

/// The order's status as its buyer reads it, once the worker settled it.
async fn status_once_settled(app: &TestApp, order: &Order) -> String {
    let token = app.mint_token(order.user_id);
    let path = format!("/orders/{}/status", order.id);
    let read = || async {
        let res = app.get(&path, Some(&token)).await;
        if res.status() != 200 {
            return None;
        }
        let body: serde_json::Value = res.json().await.unwrap();
        Some(body["status"].as_str().unwrap().to_owned())
    };
    until("the order to settle", || async {
        read().await.is_some_and(|status| status != "pending")
    })
    .await;
    read().await.unwrap()
}

/// The dead-lettered order messages, taken off the dead-letter queue.
async fn take_dead_letters(app: &TestApp) -> Vec<OrderMessage> {
    let channel = app.state.amqp.connection().create_channel().await.unwrap();
    let queue = app.state.orders.queues.dead.as_str();
    let mut dead = vec![];
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let envelope: OrderEnvelope = serde_json::from_slice(&message.delivery.data).unwrap();
        dead.extend(envelope.orders);
    }
    dead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_order_fails_alone_and_the_orders_beside_it_are_paid() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let mut batch = vec![];
    for _ in 0..6 {
        batch.push(reserved_order(&app, product, "1.00", "1.00").await);
    }
    // A total NUMERIC(12, 2) cannot hold: any batch holding it fails every time.
    let poison = reserved_order(&app, product, "1.00", "100000000000.00").await;
    batch.insert(4, poison.clone());
    assert_eq!(app.remaining(product).await, 3);
    publish_together(&app, batch.clone()).await;

    let _worker = app.spawn_consumer().await;
    // Published straight to the queue, so no acceptance record: readable once settled.
    for order in batch.iter().filter(|o| o.id != poison.id) {
        assert_eq!(status_once_settled(&app, order).await, "paid");
    }
    assert_eq!(status_once_settled(&app, &poison).await, "failed");
    until("the poison order's unit to come back", || async {
        app.remaining(product).await == 4
    })
    .await;
    until("the dead letter", || async {
        app.queue_depth(&app.state.orders.queues.dead).await >= 1
    })
    .await;
    let dead = take_dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "dead-lettered once, not requeued in a loop");
    assert_eq!(dead[0].order.id, poison.id);
    assert_eq!(dead[0].failure_reason.as_deref(), Some("unprocessable"));
    assert_eq!(
        app.queue_depth(&app.state.orders.queues.orders).await,
        0,
        "nothing left on the order queue"
    );
    assert!(
        !app.charged(poison.id).await
            || app
                .redis_exists(&format!("{{paysim}}:refund:{}", poison.id))
                .await,
        "a charge of the poison order was refunded"
    );
    app.wait_inventory(product, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_retries_are_used_up_ends_failed() {
    // It waits a second for its sale's stock to be restored, then its retries run out.
    let app = TestApp::builder()
        .configure(|s| s.orders.stock_restore_wait_secs = 1)
        .spawn()
        .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let buyer = app.mint_token(Uuid::now_v7());
    let res = app.buy(&buyer, product, "k", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Uuid = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Redis loses the sale and nothing rebuilds it (no reconciler runs): every commit
    // finds the stock not loaded and sends the order to the next retry queue.
    app.lose_sale(product).await;

    let _worker = app.spawn_consumer().await;
    assert_eq!(app.wait_settled(&buyer, order).await, "failed");
    // The copy for operators goes out after the order is recorded failed.
    until("the dead letter", || async {
        app.queue_depth(&app.state.orders.queues.dead).await == 1
    })
    .await;
    let dead = take_dead_letters(&app).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].failure_reason.as_deref(), Some("stock_unavailable"));
    assert!(dead[0].attempt >= 3, "every retry was used");
    let mut failed = 0;
    for shard in 0..4 {
        let sql = format!(
            "SELECT count(*) AS n FROM orders WHERE id = '{order}' AND status = 'failed' \
             AND failure_reason = 'stock_unavailable'"
        );
        failed += app.count(&mut app.shard_conn(shard).await, &sql).await;
    }
    assert_eq!(failed, 1, "persisted as failed with its reason");
    assert!(!app.charged(order).await, "never charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_total_cannot_be_stored_is_refused_before_anything_is_reserved() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let buyer = app.mint_token(Uuid::now_v7());

    let regular = app
        .regular_product(&admin.access, 100, "1000000000.00")
        .await;
    let res = app
        .order(
            &buyer,
            "big",
            &json!({"items": [{"product_id": regular, "quantity": 10}]}),
        )
        .await;
    assert_problem(res, 422, "total_too_large").await;
    assert!(
        !app.redis_exists(&format!("{{p:{}}}:stock", regular.simple()))
            .await,
        "no stock was loaded or reserved"
    );
    // A total that fits is taken.
    let res = app
        .order(
            &buyer,
            "fits",
            &json!({"items": [{"product_id": regular, "quantity": 9}]}),
        )
        .await;
    assert_eq!(res.status(), 201);

    let now = Utc::now();
    let body = json!({
        "name": "Gold bar", "price": "9000000000.00", "inventory": 10, "is_flash_sale": true,
        "flash_sale_price": "5000000000.00",
        "flash_sale_start": now - chrono::Duration::minutes(1),
        "flash_sale_end": now + chrono::Duration::hours(1),
    });
    let res = app.post_json("/products", &body, Some(&admin.access)).await;
    assert_eq!(res.status(), 201);
    let flash: Uuid = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let res = app
        .buy(&buyer, flash, "gold", &json!({"quantity": 2}))
        .await;
    assert_problem(res, 422, "total_too_large").await;
    assert_eq!(app.remaining(flash).await, 10, "nothing reserved");
}
