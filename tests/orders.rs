//! The flash-sale order path against real Redis, RabbitMQ and PostgreSQL: the invariants
//! (no oversell, no lost order, idempotent replay, cancel releases once) under concurrency.

mod common;

use std::sync::Arc;

use common::{assert_problem, unique_email, TestApp};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

/// Fires `attempts` flash-sale purchases by distinct users, `concurrency` at a time.
/// Returns (status, order id, token) per attempt.
async fn stampede(
    app: &Arc<TestApp>,
    product: Uuid,
    attempts: usize,
    concurrency: usize,
    quantity_of: impl Fn(usize) -> i64,
) -> Vec<(u16, Option<Uuid>, String, i64)> {
    let requests = (0..attempts).map(|i| {
        let app = app.clone();
        let quantity = quantity_of(i);
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let res = app
                .buy(
                    &token,
                    product,
                    &format!("k-{i}"),
                    &json!({"quantity": quantity}),
                )
                .await;
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let order = body["id"].as_str().and_then(|id| id.parse().ok());
            (status, order, token, quantity)
        }
    });
    stream::iter(requests)
        .buffer_unordered(concurrency)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_buyers_for_a_hundred_units_buy_exactly_a_hundred() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 100, "9.99").await;

    let results = stampede(&app, product, 2000, 200, |_| 1).await;
    let accepted: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    assert_eq!(accepted.len(), 100, "accepted");
    assert!(
        results.iter().all(|r| r.0 == 201 || r.0 == 409),
        "only 201 and 409 sold_out"
    );
    for (_, order, token, _) in &accepted {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    assert_eq!(app.remaining(product).await, 0);
    app.wait_inventory(product, 0).await;
    let stored = app.orders_by_status(product).await;
    assert_eq!(stored.get("paid"), Some(&(100, 100)), "{stored:?}");
    assert_eq!(stored.len(), 1, "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_quantities_and_limits_never_oversell() {
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| {
                s.sales.purchase_limit = 3;
                s.orders.max_quantity = 5;
            })
            .spawn()
            .await,
    );
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 50, "5.00").await;

    // Quantities 1..=4: the 4s break the limit of 3, the rest compete for 50 units.
    let results = stampede(&app, product, 300, 100, |i| (i % 4) as i64 + 1).await;
    let units: i64 = results.iter().filter(|r| r.0 == 201).map(|r| r.3).sum();
    assert!(units <= 50, "sold {units} of 50");
    assert!(
        units >= 48,
        "demand far exceeds stock; only an odd remainder may stay: {units}"
    );
    for (status, _, _, quantity) in &results {
        if *quantity == 4 {
            assert_eq!(*status, 409, "over the per-user limit");
        }
        assert!([201, 409].contains(status), "{status}");
    }
    for (_, order, token, _) in results.iter().filter(|r| r.0 == 201) {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    assert_eq!(app.remaining(product).await, 50 - units);
    app.wait_inventory(product, 50 - units).await;

    // One user, limit 3, on a sale with units to spare: 2 then 2 again is over the limit;
    // 1 more fits, and then nothing more.
    let product = app.flash_sale_product(&admin.access, 10, "5.00").await;
    let token = app.mint_token(Uuid::now_v7());
    let buy = |key: &'static str, quantity: i64| {
        let (app, token) = (app.clone(), token.clone());
        async move {
            app.buy(&token, product, key, &json!({"quantity": quantity}))
                .await
        }
    };
    assert_eq!(buy("a", 2).await.status(), 201);
    assert_problem(buy("b", 2).await, 409, "purchase_limit").await;
    assert_eq!(buy("c", 1).await.status(), 201);
    assert_problem(buy("d", 1).await, 409, "purchase_limit").await;
    assert_eq!(app.remaining(product).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_edits_reach_redis_at_once() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "5.00").await;
    let path = format!("/products/{product}");
    let buy = |key: &'static str| {
        let app = app.clone();
        async move {
            let token = app.mint_token(Uuid::now_v7());
            app.buy(&token, product, key, &json!({})).await
        }
    };
    let now = chrono::Utc::now();
    let edit = |body: Value| {
        let (app, path, admin) = (app.clone(), path.clone(), admin.access.clone());
        async move {
            let res = app.patch_json(&path, &body, &admin).await;
            assert_eq!(res.status(), 200, "{:?}", res.text().await);
        }
    };

    // A new price is charged from the next order on.
    edit(json!({"flash_sale_price": "3.50"})).await;
    let order: Value = buy("price").await.json().await.unwrap();
    assert_eq!(order["total_amount"], "3.50", "{order}");

    // Ending the sale now stops it at once.
    edit(json!({"flash_sale_end": now - chrono::Duration::seconds(1)})).await;
    assert_problem(buy("ended").await, 409, "sale_not_active").await;

    // Reopened, then postponed: not on until the new start.
    edit(json!({"flash_sale_end": now + chrono::Duration::hours(1)})).await;
    assert_eq!(buy("reopened").await.status(), 201);
    edit(json!({"flash_sale_start": now + chrono::Duration::minutes(30)})).await;
    assert_problem(buy("postponed").await, 409, "sale_not_active").await;

    // Switched off: the flash-sale path is closed.
    edit(json!({"flash_sale_start": now - chrono::Duration::minutes(1)})).await;
    assert_eq!(buy("on-again").await.status(), 201);
    edit(json!({"is_flash_sale": false})).await;
    assert_problem(buy("off").await, 409, "sale_not_active").await;
    assert_eq!(app.remaining(product).await, 7, "units taken only by 201s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_the_same_order_and_guards_the_body() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.50").await;
    let buyer = app.register(&unique_email("buyer")).await;
    let body = json!({"quantity": 1, "payment_method": "card"});

    let first = app.buy(&buyer.access, product, "same-key", &body).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotency-replayed").is_none());
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["total_amount"], "1.50");
    assert_eq!(
        location,
        format!("/orders/{}", first["id"].as_str().unwrap())
    );

    let replay = app.buy(&buyer.access, product, "same-key", &body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotency-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);

    let other_body = app
        .buy(
            &buyer.access,
            product,
            "same-key",
            &json!({"quantity": 1, "payment_method": "card_flaky"}),
        )
        .await;
    assert_problem(other_body, 422, "idempotency_key_reused").await;
    let res = app
        .client
        .post(app.url(&format!("/orders/flash-sale/{product}")))
        .bearer_auth(&buyer.access)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "idempotency_key_required").await;
    for bad_key in ["", &"k".repeat(256), "has space", "ключ"] {
        let res = app
            .client
            .post(app.url(&format!("/orders/flash-sale/{product}")))
            .bearer_auth(&buyer.access)
            .header("idempotency-key", bad_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "key {bad_key:?}");
    }
    // Only one unit left the shelf for all of that.
    assert_eq!(app.remaining(product).await, 9);

    // Two requests racing with one key: one order at most, the other replays or waits.
    let racer = app.mint_token(Uuid::now_v7());
    let (a, b) = tokio::join!(
        app.buy(&racer, product, "race", &body),
        app.buy(&racer, product, "race", &body)
    );
    let (sa, sb) = (a.status().as_u16(), b.status().as_u16());
    let (ba, bb): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    match (sa, sb) {
        (201, 201) => assert_eq!(ba["id"], bb["id"]),
        (201, 409) => assert_eq!(bb["code"], "request_in_progress"),
        (409, 201) => assert_eq!(ba["code"], "request_in_progress"),
        other => panic!("unexpected pair {other:?}"),
    }
    assert_eq!(app.remaining(product).await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_the_record_is_gone_reads_the_persisted_order() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 3, "2.00").await;
    let buyer = app.register(&unique_email("buyer")).await;
    let body = json!({"quantity": 1});
    let first = app.buy(&buyer.access, product, "kept-key", &body).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let id: Uuid = first["id"].as_str().unwrap().parse().unwrap();
    let _worker = app.spawn_worker().await;
    assert_eq!(app.wait_settled(&buyer.access, id).await, "paid");

    // The key outlives the acceptance record (expired, or lost with a Redis node): the
    // replay answers the order from its shard.
    let _: () = redis::cmd("DEL")
        .arg(app.state.redis.key(format_args!("order:{id}")))
        .query_async(&mut app.state.redis.conn())
        .await
        .unwrap();
    let replay = app.buy(&buyer.access, product, "kept-key", &body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotency-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);
    assert_eq!(replay["status"], "paid");
    assert_eq!(app.remaining(product).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_releases_stock_exactly_once_and_refunds_paid_orders() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "3.00").await;
    let buyer = app.register(&unique_email("buyer")).await;

    // Cancelled while still pending (no worker yet): the worker later leaves it alone.
    let res = app.buy(&buyer.access, product, "early", &json!({})).await;
    let early: Value = res.json().await.unwrap();
    let early_id: Uuid = early["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.remaining(product).await, 4);
    let res = app
        .send(
            reqwest::Method::PUT,
            &format!("/orders/{early_id}/cancel"),
            &buyer.access,
            None,
        )
        .await;
    assert_eq!(res.status(), 200);
    let cancelled: Value = res.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(app.remaining(product).await, 5);

    let worker = app.spawn_worker().await;
    // The allowance came back with the cancel: the same buyer may buy again.
    let res = app.buy(&buyer.access, product, "late", &json!({})).await;
    assert_eq!(res.status(), 201);
    let late: Value = res.json().await.unwrap();
    let late_id: Uuid = late["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.wait_settled(&buyer.access, late_id).await, "paid");
    assert_eq!(app.wait_settled(&buyer.access, early_id).await, "cancelled");
    assert!(
        !app.charged(early_id).await,
        "a cancelled pending order is never charged"
    );
    app.wait_inventory(product, 4).await;

    for _ in 0..3 {
        let res = app
            .send(
                reqwest::Method::PUT,
                &format!("/orders/{late_id}/cancel"),
                &buyer.access,
                None,
            )
            .await;
        assert_eq!(res.status(), 200, "cancel is repeatable");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], "cancelled");
    }
    assert_eq!(app.remaining(product).await, 5, "released once");
    app.wait_inventory(product, 5).await;
    assert!(
        app.redis_exists(&format!("{{paysim}}:refund:{late_id}"))
            .await,
        "paid order refunded"
    );
    worker.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_cards_fail_and_flaky_cards_succeed_after_retries() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "2.00").await;
    let declined = app.register(&unique_email("declined")).await;
    let flaky = app.register(&unique_email("flaky")).await;

    let res = app
        .buy(
            &declined.access,
            product,
            "d",
            &json!({"payment_method": "card_declined"}),
        )
        .await;
    let order: Value = res.json().await.unwrap();
    let declined_id: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    let res = app
        .buy(
            &flaky.access,
            product,
            "f",
            &json!({"payment_method": "card_flaky"}),
        )
        .await;
    let order: Value = res.json().await.unwrap();
    let flaky_id: Uuid = order["id"].as_str().unwrap().parse().unwrap();

    assert_eq!(
        app.wait_settled(&declined.access, declined_id).await,
        "failed"
    );
    assert_eq!(app.wait_settled(&flaky.access, flaky_id).await, "paid");
    assert_eq!(app.remaining(product).await, 4, "the declined unit is back");
    app.wait_inventory(product, 4).await;
    // The declined buyer's allowance is back too.
    assert_eq!(
        app.buy(&declined.access, product, "d2", &json!({}))
            .await
            .status(),
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_cannot_see_or_cancel_an_order_and_bad_input_is_4xx() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "2.00").await;
    let alice = app.register(&unique_email("alice")).await;
    let mallory = app.register(&unique_email("mallory")).await;
    let res = app.buy(&alice.access, product, "a", &json!({})).await;
    let order: Value = res.json().await.unwrap();
    let id = order["id"].as_str().unwrap();

    for path in [format!("/orders/{id}"), format!("/orders/{id}/status")] {
        assert_problem(
            app.get(&path, Some(&mallory.access)).await,
            404,
            "not_found",
        )
        .await;
        assert_eq!(app.get(&path, Some(&alice.access)).await.status(), 200);
        assert_eq!(app.get(&path, Some(&admin.access)).await.status(), 200);
    }
    let res = app
        .send(
            reqwest::Method::PUT,
            &format!("/orders/{id}/cancel"),
            &mallory.access,
            None,
        )
        .await;
    assert_problem(res, 404, "not_found").await;
    let res = app
        .get(
            &format!("/orders/user/{}", alice.user_id),
            Some(&mallory.access),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;

    let cases = [
        (json!({"quantity": -1}), 422),
        (json!({"quantity": 0}), 422),
        (json!({"quantity": 1000}), 422),
        (json!({"quantity": "two"}), 422),
        (json!({"payment_method": "cash"}), 422),
        (json!({"shipping_address": ""}), 422),
        (json!({"quantity": 1, "price": "0.01"}), 422),
    ];
    for (i, (body, status)) in cases.iter().enumerate() {
        let res = app
            .buy(&mallory.access, product, &format!("bad-{i}"), body)
            .await;
        assert_eq!(res.status().as_u16(), *status, "{body}");
    }
    let res = app
        .client
        .post(app.url(&format!("/orders/flash-sale/{product}")))
        .bearer_auth(&mallory.access)
        .header("idempotency-key", "malformed")
        .header("content-type", "application/json")
        .body("{\"quantity\":")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_request").await;
    let res = app
        .buy(&mallory.access, Uuid::now_v7(), "nope", &json!({}))
        .await;
    assert_problem(res, 404, "not_found").await;
    assert_eq!(
        app.buy(&mallory.access, product, "valid", &json!({}))
            .await
            .status(),
        201
    );
    assert_problem(
        app.get("/orders/not-a-uuid", Some(&mallory.access)).await,
        400,
        "invalid_request",
    )
    .await;
    let res = app
        .client
        .post(app.url("/orders/flash-sale/not-a-uuid"))
        .bearer_auth(&mallory.access)
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_request").await;
    let res = app
        .client
        .post(app.url(&format!("/orders/flash-sale/{product}")))
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "unauthorized").await;
    // Nothing bad input did moved stock: alice's unit and mallory's one valid order only.
    assert_eq!(app.remaining(product).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_that_are_not_on_answer_409_and_attempts_are_rate_limited() {
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| s.orders.flash_sale_attempts_per_minute = 3)
            .spawn()
            .await,
    );
    let admin = app.register_admin(&unique_email("admin")).await;
    let now = chrono::Utc::now();
    let upcoming = json!({
        "name": "Later", "price": "10.00", "inventory": 5, "is_flash_sale": true, "flash_sale_price": "5.00",
        "flash_sale_start": now + chrono::Duration::hours(3), "flash_sale_end": now + chrono::Duration::hours(4),
    });
    let res = app
        .post_json("/products", &upcoming, Some(&admin.access))
        .await;
    let upcoming: Value = res.json().await.unwrap();
    let upcoming_id: Uuid = upcoming["id"].as_str().unwrap().parse().unwrap();
    let buyer = app.mint_token(Uuid::now_v7());
    assert_problem(
        app.buy(&buyer, upcoming_id, "u", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;
    let list: Value = app.get_json("/products/flash-sale", None).await;
    let listed = &list["items"][0];
    assert_eq!(listed["sale_status"], "upcoming");
    assert_eq!(listed["remaining"], 5);

    assert_problem(
        app.buy(&buyer, upcoming_id, "u", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;
    assert_eq!(
        app.buy(&buyer, upcoming_id, "u", &json!({})).await.status(),
        409
    );
    let res = app.buy(&buyer, upcoming_id, "u", &json!({})).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
}

/// The attempt limit counts attempts, not replays: an accepted request retried past the
/// limit is still answered with its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_an_accepted_request_are_replayed_past_the_attempt_limit() {
    let app = TestApp::spawn_with(|s| s.orders.flash_sale_attempts_per_minute = 2).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let buyer = app.mint_token(Uuid::now_v7());
    let first = app.buy(&buyer, product, "once", &json!({})).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    for _ in 0..4 {
        let res = app.buy(&buyer, product, "once", &json!({})).await;
        assert_eq!(res.status(), 201);
        assert!(res.headers().contains_key("idempotency-replayed"));
        let again: Value = res.json().await.unwrap();
        assert_eq!(again["id"], first["id"]);
    }
}

/// Finding 5 of issue 24: an admin moves a paid order on, paid -> shipped -> completed, each
/// step with its event and the buyer's notification; a shipped order is no longer
/// cancellable, and no other move is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_ships_then_completes_a_paid_order_and_cancel_follows_the_rules() {
    let app = TestApp::spawn().await;
    let _worker = app.spawn_worker().await;
    let _notify = app.spawn_notify_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let (buyer, order, status) = app.buy_and_settle(product, "card").await;
    assert_eq!(status, "paid");
    let path = format!("/orders/{order}/status");
    let set = |token: String, status: &'static str| {
        let (app, path) = (&app, path.clone());
        async move {
            app.put_json(&path, &json!({ "status": status }), &token)
                .await
        }
    };

    let res = set(buyer.access.clone(), "shipped").await;
    assert_problem(res, 403, "forbidden").await;
    let res = set(admin.access.clone(), "completed").await;
    let problem = assert_problem(res, 409, "invalid_transition").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("paid"),
        "{problem}"
    );
    for status in ["paid", "cancelled", "pending", "failed"] {
        let res = set(admin.access.clone(), status).await;
        assert_problem(res, 422, "validation_failed").await;
    }
    let unknown = format!("/orders/{}/status", Uuid::now_v7());
    let res = app
        .put_json(&unknown, &json!({"status": "shipped"}), &admin.access)
        .await;
    assert_problem(res, 404, "not_found").await;

    for _ in 0..2 {
        // The second time: already shipped, answered again, nothing more written.
        let res = set(admin.access.clone(), "shipped").await;
        assert_eq!(res.status(), 200);
        let shipped: Value = res.json().await.unwrap();
        assert_eq!(shipped["status"], "shipped");
    }
    let res = app.cancel(&buyer.access, order).await;
    assert_problem(res, 409, "not_cancellable").await;
    let res = set(admin.access.clone(), "completed").await;
    assert_eq!(res.status(), 200);
    let res = set(admin.access.clone(), "shipped").await;
    assert_problem(res, 409, "invalid_transition").await;
    let res = app.cancel(&buyer.access, order).await;
    assert_problem(res, 409, "not_cancellable").await;
    let seen = app
        .get_json(&format!("/orders/{order}"), Some(&buyer.access))
        .await;
    assert_eq!(seen["status"], "completed");

    let mut events = 0;
    for shard in 0..app.state.db.shard_count() {
        let sql = format!(
            "SELECT count(*) AS n FROM outbox WHERE aggregate_id = '{order}' \
             AND event_type IN ('order.shipped', 'order.completed')"
        );
        events += app.count(&mut app.shard_conn(shard).await, &sql).await;
    }
    assert_eq!(events, 2, "one event per move");
    common::until("the buyer told of both moves", || async {
        let history = app
            .get_json(
                &format!("/notifications/user/{}", buyer.user_id),
                Some(&buyer.access),
            )
            .await;
        let subjects: Vec<String> = history["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["subject"].as_str().map(str::to_owned))
            .collect();
        subjects.contains(&"Your order is on its way".to_owned())
            && subjects.contains(&"Your order is complete".to_owned())
    })
    .await;
    let res = app
        .client
        .put(app.url(&path))
        .bearer_auth(&admin.access)
        .header("content-type", "application/json")
        .body("{\"status\": ")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_request").await;
}

/// Issue 23, finding 11: a sale whose end is edited days into the past stops selling at
/// once, but its keys stay for the orders still in flight: the one accepted before the edit
/// is paid when its worker gets to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_ended_days_ago_by_an_edit_keeps_its_keys_for_the_orders_in_flight() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let token = app.mint_token(Uuid::now_v7());
    let res = app
        .buy(&token, product, "before-the-edit", &json!({}))
        .await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();

    let ended = chrono::Utc::now() - chrono::Duration::days(3);
    let res = app
        .patch_json(
            &format!("/products/{product}"),
            &json!({"flash_sale_start": ended - chrono::Duration::hours(1), "flash_sale_end": ended}),
            &admin.access,
        )
        .await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let late = app.mint_token(Uuid::now_v7());
    assert_problem(
        app.buy(&late, product, "after", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;
    assert!(
        app.redis_exists(&format!("{{p:{}}}:res", product.simple()))
            .await
    );

    let _worker = app.spawn_worker().await;
    assert_eq!(app.wait_settled(&token, order).await, "paid");
}
