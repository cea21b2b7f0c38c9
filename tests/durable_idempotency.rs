//! PostgreSQL is the arbiter of an Idempotency-Key where Redis can forget it: a retry after
//! the sale's keys were lost replays the first order, and a second order that slipped in
//! while the first was still queued is failed by the worker before any charge.

mod common;

use common::{unique_email, TestApp};
use flashsale::modules::products;
use serde_json::{json, Value};
use uuid::Uuid;

/// The answer's status (200 standing for a 201 marked `Idempotency-Replayed`) and order id.
async fn order_id(res: reqwest::Response) -> (u16, Uuid) {
    let replayed = res.headers().contains_key("idempotency-replayed");
    let status = match res.status().as_u16() {
        201 if replayed => 200,
        status => status,
    };
    let body: Value = res.json().await.expect("order body");
    let id = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}: {body}"));
    (status, id.parse().expect("uuid"))
}

/// Deletes the one Redis key matching `pattern` (asserting there is exactly one).
async fn forget_one_key(app: &TestApp, pattern: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut app.state.redis.conn())
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    redis::cmd("DEL")
        .arg(&keys)
        .query_async::<()>(&mut app.state.redis.conn())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_redis_lost_the_sale_replays_the_paid_order() {
    let app = TestApp::spawn_with(|s| s.orders.reconcile_interval_secs = 1).await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let buyer = app.mint_token(Uuid::now_v7());

    let (status, first) = order_id(app.buy(&buyer, product, "K", &json!({})).await).await;
    assert_eq!(status, 201);
    assert_eq!(app.wait_settled(&buyer, first).await, "paid");

    // Redis loses the sale, Idempotency-Keys and all; the reconciler rebuilds and reopens it.
    app.lose_sale(product).await;
    common::until("the sale to be rebuilt and open", || async {
        products::sale_state(&app.state, product).await.unwrap() == products::SaleState::Open
    })
    .await;

    let (status, replayed) = order_id(app.buy(&buyer, product, "K", &json!({})).await).await;
    assert_eq!(status, 200, "a replay, not a new order");
    assert_eq!(replayed, first);
    // And again, now answered from the key Redis was given back.
    let (status, again) = order_id(app.buy(&buyer, product, "K", &json!({})).await).await;
    assert_eq!((status, again), (200, first));
    let stored = app.orders_by_status(product).await;
    assert_eq!(stored.get("paid"), Some(&(1, 1)), "{stored:?}");
    assert_eq!(stored.len(), 1, "no second order: {stored:?}");
    assert_eq!(app.remaining(product).await, 9, "the replay holds no unit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_order_retried_after_redis_forgot_its_key_replays_it() {
    let app = TestApp::spawn().await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.regular_product(&admin.access, 10, "3.00").await;
    let buyer = app.register(&unique_email("buyer")).await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});

    let (status, first) = order_id(app.order(&buyer.access, "R", &body).await).await;
    assert_eq!(status, 201);
    assert_eq!(app.wait_settled(&buyer.access, first).await, "paid");
    // Redis forgets the key (a restart): PostgreSQL still names the order.
    forget_one_key(&app, &app.state.redis.key("*orders-idem*")).await;

    let (status, replayed) = order_id(app.order(&buyer.access, "R", &body).await).await;
    assert_eq!((status, replayed), (200, first));
    // The ledger lands just after the status: wait for it, then it must stay at 9.
    app.wait_inventory(product, 9).await;
}

/// The key is lost while the first order still waits in the queue (no worker runs): the
/// retry is accepted as a second order, and the worker, which finds the key taken by the
/// first, fails the second before charging it and gives its unit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_order_under_a_forgotten_key_is_failed_before_any_charge() {
    // A limit of two lets the second order through Redis (a limit of one stops it there).
    let app = TestApp::spawn_with(|s| s.sales.purchase_limit = 2).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let buyer = app.mint_token(Uuid::now_v7());

    let (status, first) = order_id(app.buy(&buyer, product, "K", &json!({})).await).await;
    assert_eq!(status, 201);
    forget_one_key(&app, &app.sale_key(product, "idem:*")).await;
    let (status, second) = order_id(app.buy(&buyer, product, "K", &json!({})).await).await;
    assert_eq!(status, 201, "Redis no longer knows the key");
    assert_ne!(first, second);

    let _worker = app.spawn_worker().await;
    let outcomes = [
        app.wait_settled(&buyer, first).await,
        app.wait_settled(&buyer, second).await,
    ];
    let paid: Vec<&common::Settled> = outcomes.iter().filter(|s| **s == "paid").collect();
    assert_eq!(paid.len(), 1, "{outcomes:?}");
    let refused = outcomes
        .iter()
        .find(|s| **s == "failed")
        .expect("one failed");
    assert_eq!(refused.failure_reason.as_deref(), Some("duplicate_request"));
    assert!(app.charged(paid[0].order).await);
    assert!(!app.charged(refused.order).await, "never charged twice");
    common::until("the refused order's unit back", || async {
        app.remaining(product).await == 9
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_accepted_request_after_the_sale_sold_out_replays_its_order() {
    // The pod answers `sold_out` from memory once it knows; a buyer whose 201 was lost (a
    // load balancer restarted) and who retries with the same key must still get the order.
    let app = TestApp::spawn_with(|s| s.orders.admission.sold_out_cache_ms = 600_000).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 1, "1.00").await;
    let buyer = app.mint_token(Uuid::now_v7());
    let (status, order) = order_id(app.buy(&buyer, product, "lost-answer", &json!({})).await).await;
    assert_eq!(status, 201);
    let other = app.mint_token(Uuid::now_v7());
    common::assert_problem(
        app.buy(&other, product, "k", &json!({})).await,
        409,
        "sold_out",
    )
    .await;

    let (status, replayed) =
        order_id(app.buy(&buyer, product, "lost-answer", &json!({})).await).await;
    assert_eq!(
        (status, replayed),
        (200, order),
        "the retry replays the order"
    );
    // The same key with another body is still refused, and a new key is sold out.
    let res = app
        .buy(&buyer, product, "lost-answer", &json!({"quantity": 2}))
        .await;
    assert_eq!(res.status(), 422);
    common::assert_problem(
        app.buy(&buyer, product, "new-key", &json!({})).await,
        409,
        "sold_out",
    )
    .await;
}
