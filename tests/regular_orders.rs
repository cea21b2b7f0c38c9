//! `POST /orders`: several regular products, reserved through the same Redis machinery
//! as flash sales, all or nothing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_problem, unique_email, TestApp};
use flashsale::modules::orders::reconcile_once;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_item_order_is_paid_and_takes_every_item_off_the_shelf() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let lamp = app.regular_product(&admin.access, 10, "19.99").await;
    let bulb = app.regular_product(&admin.access, 10, "2.50").await;
    let buyer = app.register(&unique_email("buyer")).await;

    let body = json!({"items": [{"product_id": lamp, "quantity": 1}, {"product_id": bulb, "quantity": 4}],
                      "shipping_address": "1 Main St, Berlin"});
    let res = app.order(&buyer.access, "o-1", &body).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["total_amount"], "29.99");
    assert_eq!(order["items"].as_array().unwrap().len(), 2);
    let id: Uuid = order["id"].as_str().unwrap().parse().unwrap();

    let replay = app.order(&buyer.access, "o-1", &body).await;
    assert_eq!(replay.headers()["idempotency-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], order["id"]);
    let other = json!({"items": [{"product_id": lamp, "quantity": 2}]});
    assert_problem(
        app.order(&buyer.access, "o-1", &other).await,
        422,
        "idempotency_key_reused",
    )
    .await;

    assert_eq!(app.wait_settled(&buyer.access, id).await, "paid");
    app.wait_inventory(lamp, 9).await;
    app.wait_inventory(bulb, 6).await;

    // Cancelling gives every item back once.
    for _ in 0..2 {
        let res = app
            .send(
                reqwest::Method::PUT,
                &format!("/orders/{id}/cancel"),
                &buyer.access,
                None,
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    app.wait_inventory(lamp, 10).await;
    app.wait_inventory(bulb, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_cannot_be_had_refuses_the_whole_order_and_gives_the_rest_back() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let plenty = app.regular_product(&admin.access, 10, "1.00").await;
    let scarce = app.regular_product(&admin.access, 1, "1.00").await;
    let flash = app.flash_sale_product(&admin.access, 5, "0.50").await;
    let buyer = app.mint_token(Uuid::now_v7());

    let body = json!({"items": [{"product_id": plenty, "quantity": 3}, {"product_id": scarce, "quantity": 2}]});
    assert_problem(app.order(&buyer, "a", &body).await, 409, "sold_out").await;
    // Nothing held: the full 10 and the single scarce unit can still be bought.
    let body = json!({"items": [{"product_id": plenty, "quantity": 10}, {"product_id": scarce, "quantity": 1}]});
    assert_eq!(app.order(&buyer, "b", &body).await.status(), 201);

    // Products on flash sale are bought through the flash-sale path only, and the other way round.
    let res = app
        .order(
            &buyer,
            "d",
            &json!({"items": [{"product_id": flash, "quantity": 1}]}),
        )
        .await;
    assert_problem(res, 409, "sale_not_active").await;
    assert_problem(
        app.buy(&buyer, plenty, "e", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;
    assert_eq!(app.remaining(flash).await, 5);

    let bad = [
        (json!({"items": []}), 422),
        (
            json!({"items": [{"product_id": plenty, "quantity": -1}]}),
            422,
        ),
        (
            json!({"items": [{"product_id": plenty, "quantity": 1}, {"product_id": plenty, "quantity": 1}]}),
            422,
        ),
        (
            json!({"items": [{"product_id": plenty, "quantity": 1}], "payment_method": "iou"}),
            422,
        ),
        (
            json!({"items": [{"product_id": "nope", "quantity": 1}]}),
            422,
        ),
        (json!({"items": [{"product_id": plenty}]}), 422),
        (
            json!({"items": [{"product_id": Uuid::now_v7(), "quantity": 1}]}),
            404,
        ),
    ];
    for (i, (body, status)) in bad.iter().enumerate() {
        let res = app.order(&buyer, &format!("bad-{i}"), body).await;
        assert_eq!(res.status().as_u16(), *status, "{body}");
    }
    let res = app
        .client
        .post(app.url("/orders"))
        .bearer_auth(&buyer)
        .json(&json!({"items": []}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "idempotency_key_required").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_multi_item_orders_never_oversell_any_item() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let a = app.regular_product(&admin.access, 40, "1.00").await;
    let b = app.regular_product(&admin.access, 25, "1.00").await;

    let requests = (0..120).map(|i| {
        let app = app.clone();
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let body = json!({"items": [{"product_id": a, "quantity": 1}, {"product_id": b, "quantity": 1}]});
            let res = app.order(&token, &format!("k{i}"), &body).await;
            let status = res.status().as_u16();
            let order: Value = res.json().await.unwrap();
            (status, order["id"].as_str().and_then(|id| id.parse::<Uuid>().ok()), token)
        }
    });
    let results: Vec<_> = stream::iter(requests).buffer_unordered(30).collect().await;
    let accepted: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    assert_eq!(accepted.len(), 25, "b runs out first");
    assert!(results.iter().all(|r| r.0 == 201 || r.0 == 409));
    for (_, order, token) in &accepted {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    assert_eq!(
        app.inventory(a).await,
        15,
        "a gave back every unit of a refused order"
    );
    app.wait_inventory(b, 0).await;
}

/// Places `count` one-unit orders of `product`, each by a buyer of its own, and waits for each
/// to be paid: (order, the buyer's token).
async fn paid_orders(app: &Arc<TestApp>, product: Uuid, count: usize) -> Vec<(Uuid, String)> {
    let requests = (0..count).map(|i| {
        let app = app.clone();
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let body = json!({"items": [{"product_id": product, "quantity": 1}]});
            let res = app.order(&token, &format!("k{i}"), &body).await;
            assert_eq!(res.status(), 201);
            let order: Value = res.json().await.unwrap();
            let id: Uuid = order["id"].as_str().unwrap().parse().unwrap();
            assert_eq!(app.wait_settled(&token, id).await, "paid");
            (id, token)
        }
    });
    stream::iter(requests).buffer_unordered(32).collect().await
}

async fn cancel(app: &TestApp, order: Uuid, token: &str) {
    let path = format!("/orders/{order}/cancel");
    let res = app.send(reqwest::Method::PUT, &path, token, None).await;
    assert_eq!(res.status(), 200);
}

/// Cancels, then cancels again (a retry answers the cancelled order).
async fn cancel_twice(app: &TestApp, order: Uuid, token: &str) {
    cancel(app, order, token).await;
    cancel(app, order, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regular_stock_keeps_no_allowances_and_only_the_records_a_cancel_still_needs() {
    let app = Arc::new(TestApp::spawn().await);
    // This test runs the reconciler's passes itself.
    let _worker = app
        .spawn_worker_with(|s| s.orders.reconcile_interval_secs = 3_600)
        .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.regular_product(&admin.access, 1_000, "1.00").await;
    let orders = paid_orders(&app, product, 300).await;

    // A hundred are cancelled, a hundred shipped, a hundred stay paid.
    for (order, token) in &orders[..100] {
        cancel(&app, *order, token).await;
    }
    for (order, _) in &orders[100..200] {
        let path = format!("/orders/{order}/status");
        let res = app
            .put_json(&path, &json!({"status": "shipped"}), &admin.access)
            .await;
        assert_eq!(res.status(), 200);
    }
    let mut redis = app.state.redis.conn();
    let allowances: bool = redis::cmd("EXISTS")
        .arg(app.sale_key(product, "buyers"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!allowances, "regular stock has no per-buyer limit to count");

    // A product holding more than a few hundred records is looked at: the reconciler drops
    // the records of orders that ended for good; the paid ones stay.
    let records = app.sale_key(product, "res");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut forgotten = 0;
    loop {
        forgotten += reconcile_once(&app.state).await.unwrap().forgotten;
        let left: usize = redis::cmd("HLEN")
            .arg(&records)
            .query_async(&mut redis)
            .await
            .unwrap();
        if left == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} records left");
    }
    assert_eq!(forgotten, 200);

    // A paid order still gives its unit back once when cancelled.
    assert_eq!(app.remaining(product).await, 800);
    let (order, token) = &orders[200];
    cancel_twice(&app, *order, token).await;
    assert_eq!(app.remaining(product).await, 801);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_cancelled_after_redis_lost_regular_stock_gives_its_unit_back_once() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.regular_product(&admin.access, 10, "1.00").await;
    let orders = paid_orders(&app, product, 2).await;
    app.wait_inventory(product, 8).await;

    // Redis loses the product's stock; the next order loads it again from PostgreSQL.
    app.lose_sale(product).await;
    paid_orders(&app, product, 1).await;
    assert_eq!(app.remaining(product).await, 7);

    // The rebuild gave the paid orders their records back: a cancel returns the unit to
    // Redis too, not only to PostgreSQL, and only once.
    let (order, token) = &orders[0];
    cancel_twice(&app, *order, token).await;
    assert_eq!(app.remaining(product).await, 8);
    app.wait_inventory(product, 8).await;
}
