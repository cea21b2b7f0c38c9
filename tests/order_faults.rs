//! Faults on the order path: a worker killed mid-batch, Redis losing the sale, the broker
//! connection dropping under load, a failing payment gateway, reservations whose order
//! never arrived. Accepted orders are never lost and stock is never oversold.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{unique_email, TestApp};
use flashsale::modules::orders::reconcile_once;
use flashsale::modules::products::{self, ReserveRequest};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

/// Places one order per fresh user; returns (status, order, token) per request.
async fn buy_many(
    app: &Arc<TestApp>,
    product: Uuid,
    count: usize,
    concurrency: usize,
) -> Vec<(u16, Option<Uuid>, String)> {
    let requests = (0..count).map(|i| {
        let app = app.clone();
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let res = app.buy(&token, product, &format!("k{i}"), &json!({})).await;
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (
                status,
                body["id"].as_str().and_then(|id| id.parse().ok()),
                token,
            )
        }
    });
    stream::iter(requests)
        .buffer_unordered(concurrency)
        .collect()
        .await
}

async fn paid_count(app: &TestApp, product: Uuid) -> i64 {
    app.orders_by_status(product)
        .await
        .get("paid")
        .map_or(0, |(orders, _)| *orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_and_duplicates_nothing() {
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| {
                s.orders.payment.latency_ms = 5;
                s.orders.batch_size = 20;
            })
            .spawn()
            .await,
    );
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 200, "1.00").await;
    let results = buy_many(&app, product, 200, 50).await;
    assert!(results.iter().all(|r| r.0 == 201));

    let worker = app.spawn_worker().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while paid_count(&app, product).await < 40 {
        assert!(Instant::now() < deadline, "worker made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.kill().await;
    let paid_at_kill = paid_count(&app, product).await;
    assert!(
        paid_at_kill < 200,
        "the kill should land mid-run ({paid_at_kill} paid)"
    );

    let _restarted = app.spawn_worker().await;
    for (_, order, token) in &results {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    let stored = app.orders_by_status(product).await;
    assert_eq!(
        stored.get("paid"),
        Some(&(200, 200)),
        "every order exactly once: {stored:?}"
    );
    app.wait_inventory(product, 0).await;
    let sold_units = app
        .count(
            &mut app.global_conn().await,
            &format!("SELECT coalesce(-sum(delta), 0)::bigint AS n FROM inventory_ledger WHERE product_id = '{product}' AND reason = 'sold'"),
        )
        .await;
    assert_eq!(sold_units, 200, "every unit on the books exactly once");
    for (_, order, _) in &results {
        assert!(app.charged(order.unwrap()).await);
    }
}

/// Deletes every Redis key of one product's sale, as a Redis restart would.
async fn lose_sale_in_redis(app: &TestApp, product: Uuid) {
    let pattern = app
        .state
        .redis
        .key(format_args!("{{p:{}}}*", product.simple()));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut app.state.redis.conn())
        .await
        .unwrap();
    assert!(!keys.is_empty());
    redis::cmd("DEL")
        .arg(keys)
        .query_async::<()>(&mut app.state.redis.conn())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_the_sale_means_503_until_the_reconciler_rebuilds_it() {
    // The background reconciler stays out of the way; the test runs its pass by hand.
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| s.orders.reconcile_interval_secs = 3600)
            .spawn()
            .await,
    );
    let worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 20, "1.00").await;
    let results = buy_many(&app, product, 5, 5).await;
    for (_, order, token) in &results {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }

    lose_sale_in_redis(&app, product).await;
    let buyer = app.mint_token(Uuid::now_v7());
    let res = app.buy(&buyer, product, "during-loss", &json!({})).await;
    assert_eq!(
        res.status(),
        503,
        "a missing counter is neither 0 nor unlimited"
    );
    assert!(res.headers().contains_key("retry-after"));

    let repairs = reconcile_once(&worker.state).await.unwrap();
    assert_eq!(repairs.rebuilt, 1, "{repairs:?}");
    assert_eq!(app.remaining(product).await, 15);
    // The per-user allowance was rebuilt too: an earlier buyer is still at the limit.
    let (_, _, earlier) = &results[0];
    assert_eq!(
        app.buy(earlier, product, "again", &json!({}))
            .await
            .status(),
        409
    );
    let res = app.buy(&buyer, product, "after-rebuild", &json!({})).await;
    assert_eq!(res.status(), 201);
    assert_eq!(app.remaining(product).await, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_under_load_confirms_or_compensates_every_order() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 300, "1.00").await;

    let load = {
        let app = app.clone();
        tokio::spawn(async move { buy_many(&app, product, 300, 20).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    app.state
        .amqp
        .connection()
        .close(320, "test drops the connection".into())
        .await
        .unwrap();
    let results = load.await.unwrap();

    let accepted: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    let refused = results.iter().filter(|r| r.0 == 503).count();
    assert_eq!(accepted.len() + refused, 300, "only 201 or 503");
    assert!(refused > 0, "the drop should have hit some requests");
    // Refused orders gave their units back; accepted ones are all on their way.
    assert_eq!(app.remaining(product).await, 300 - accepted.len() as i64);

    let _worker = app.spawn_worker().await;
    for (_, order, token) in &accepted {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    let stored = app.orders_by_status(product).await;
    let n = accepted.len() as i64;
    assert_eq!(stored.get("paid"), Some(&(n, n)), "{stored:?}");
    app.wait_inventory(product, 300 - n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gateway_opens_the_circuit_retries_then_dead_letters_with_stock_released() {
    let app = Arc::new(TestApp::spawn().await);
    let worker = app.spawn_worker().await;
    worker.state.orders.simulator.set_failure_rate(1.0);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;

    let results = buy_many(&app, product, 4, 4).await;
    for (_, order, token) in &results {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "failed");
    }
    assert!(
        worker.state.orders.payments.times_opened() >= 1,
        "the circuit opened"
    );
    assert_eq!(
        app.queue_depth(&app.state.orders.queues.dead).await,
        4,
        "dead-lettered"
    );
    assert_eq!(app.remaining(product).await, 10, "stock released");
    app.wait_inventory(product, 10).await;
    let mut unavailable = 0;
    for shard in 0..4 {
        let sql = "SELECT count(*) AS n FROM orders WHERE failure_reason = 'payment_unavailable'";
        unavailable += app.count(&mut app.shard_conn(shard).await, sql).await;
    }
    assert_eq!(unavailable, 4);

    // The gateway heals while an order is between retries: the retry succeeds.
    let payments = &worker.state.orders.payments;
    let simulator = &worker.state.orders.simulator;
    let deadline = Instant::now() + Duration::from_secs(10);
    while payments.circuit_open() {
        assert!(Instant::now() < deadline, "circuit never half-opened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let attempts_before = simulator.attempts();
    let token = app.mint_token(Uuid::now_v7());
    let res = app.buy(&token, product, "heals", &json!({})).await;
    let order: Value = res.json().await.unwrap();
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    while simulator.attempts() == attempts_before {
        assert!(Instant::now() < deadline, "the order was never charged");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    worker.state.orders.simulator.set_failure_rate(0.0);
    assert_eq!(app.wait_settled(&token, order).await, "paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_whose_order_never_arrived_are_released_once() {
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| s.orders.reservation_timeout_secs = 0)
            .spawn()
            .await,
    );
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 3, "1.00").await;
    // An API pod died between reserving and publishing: the units are held by nobody.
    for _ in 0..2 {
        let reserved = products::reserve(
            &app.state,
            &ReserveRequest {
                product,
                user: Uuid::now_v7(),
                quantity: 1,
                order_id: Uuid::now_v7(),
                body_hash: "h",
                key_digest: "d",
                idempotency_ttl_secs: 60,
                attempts_per_minute: 10,
            },
        )
        .await
        .unwrap();
        assert!(matches!(reserved, products::Reservation::Reserved { .. }));
    }
    assert_eq!(app.remaining(product).await, 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let repairs = reconcile_once(&app.state).await.unwrap();
    assert_eq!(repairs.released, 2, "{repairs:?}");
    assert_eq!(app.remaining(product).await, 3);
    let again = reconcile_once(&app.state).await.unwrap();
    assert_eq!(again.released, 0, "released exactly once");
    assert_eq!(app.remaining(product).await, 3);
}

/// Asks the broker to close this test's connections, as a broker restart would.
fn broker_closes_connections(name: &str) {
    let listed = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&listed.stdout);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(name))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "no connection named {name} in {listing}");
    for pid in pids {
        let closed = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: broker-side close"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(closed.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_connection_recovers_by_itself_after_the_broker_drops_it() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 50, "1.00").await;
    assert_eq!(buy_many(&app, product, 1, 1).await[0].0, 201);

    broker_closes_connections(&app.state.settings.amqp.connection_name);

    // Requests during the outage are refused with 503 (stock given back); once the
    // connection is back, orders are accepted again without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut accepted = vec![];
    loop {
        let token = app.mint_token(Uuid::now_v7());
        let res = app.buy(&token, product, "after-drop", &json!({})).await;
        let status = res.status().as_u16();
        assert!(status == 201 || status == 503, "{status}");
        if status == 201 {
            let body: Value = res.json().await.unwrap();
            accepted.push((body["id"].as_str().unwrap().parse::<Uuid>().unwrap(), token));
            break;
        }
        assert!(Instant::now() < deadline, "publishing never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (order, token) in &accepted {
        assert_eq!(app.wait_settled(token, *order).await, "paid");
    }
    assert_eq!(app.remaining(product).await, 48);
}
