//! Faults on the order path: a worker killed mid-batch, Redis losing the sale, the broker
//! connection dropping under load, a failing payment gateway, reservations whose order
//! never arrived. Accepted orders are never lost and stock is never oversold.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_problem, unique_email, TestApp};
use flashsale::modules::orders::{self, reconcile_once};
use flashsale::modules::products;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Places one order per fresh user; returns (status, order, token) per request.
async fn buy_many(
    app: &Arc<TestApp>,
    product: Uuid,
    count: usize,
    concurrency: usize,
) -> Vec<(u16, Option<Uuid>, String)> {
    buy_many_counting(app, product, count, concurrency, &AtomicUsize::new(0)).await
}

/// `buy_many`, counting the orders accepted so far in `accepted` as the answers come.
async fn buy_many_counting(
    app: &Arc<TestApp>,
    product: Uuid,
    count: usize,
    concurrency: usize,
    accepted: &AtomicUsize,
) -> Vec<(u16, Option<Uuid>, String)> {
    let requests = (0..count).map(|i| {
        let app = app.clone();
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let res = app.buy(&token, product, &format!("k{i}"), &json!({})).await;
            let status = res.status().as_u16();
            if status == 201 {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
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
    let refused: Vec<u16> = results.iter().map(|r| r.0).filter(|s| *s != 201).collect();
    assert!(refused.is_empty(), "refused: {refused:?}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_a_sale_mid_flight_rebuilds_it_from_the_orders() {
    let app = TestApp::spawn_with(|s| s.orders.reconcile_interval_secs = 1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 20, "1.00").await;
    // Three buyers' orders are paid; three more are accepted and still in flight (no worker
    // runs) when Redis loses the sale.
    let consumer = app.spawn_consumer().await;
    let settled = buy_many(&app, product, 3, 3).await;
    for (_, order, token) in &settled {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    consumer.kill().await;
    let in_flight = buy_many(&app, product, 3, 3).await;
    assert!(in_flight.iter().all(|r| r.0 == 201));
    app.lose_sale(product).await;

    let buyer = app.mint_token(Uuid::now_v7());
    let res = app.buy(&buyer, product, "during-loss", &json!({})).await;
    assert_eq!(
        res.status(),
        503,
        "a missing counter is neither 0 nor unlimited"
    );
    assert!(res.headers().contains_key("retry-after"));

    // The worker and the reconciler come back: the sale is rebuilt from the orders, the
    // orders in flight are paid, and only then does it open again.
    let _worker = app.spawn_worker().await;
    common::until("the sale to open again", || async {
        let state = products::sale_state(&app.state, product).await.unwrap();
        state == products::SaleState::Open
    })
    .await;
    let res = app.buy(&buyer, product, "after-rebuild", &json!({})).await;
    let status = res.status();
    assert_eq!(status, 201, "{}", res.text().await.unwrap_or_default());
    for (_, order, token) in settled.iter().chain(&in_flight) {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
        // Every earlier buyer is still at the limit, whether paid before or after the loss.
        let res = app.buy(token, product, "again", &json!({})).await;
        assert_problem(res, 409, "purchase_limit").await;
    }
    assert_eq!(app.remaining(product).await, 13, "20 - 6 earlier - 1 after");
    app.wait_inventory(product, 13).await;
    // The rebuilt books balance: each late commit counted its units as committed.
    let findings = products::audit_once(&app.state).await.unwrap();
    let sale = findings.iter().find(|f| f.product == product).unwrap();
    assert_eq!(sale.violations(), 0, "{sale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_reports_units_conjured_into_a_sale_within_two_intervals() {
    let app = TestApp::spawn_with(|s| s.sales.audit_interval_secs = 1).await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 30, "1.00").await;
    let results = buy_many(&app, product, 4, 4).await;
    for (_, order, token) in &results {
        assert_eq!(app.wait_settled(token, order.unwrap()).await, "paid");
    }
    let healthy = products::audit_once(&app.state).await.unwrap();
    let sale = healthy.iter().find(|f| f.product == product).unwrap();
    assert_eq!(sale.violations(), 0, "{sale:?}");

    let _auditor = app.spawn_auditor().await;
    redis::cmd("INCRBY")
        .arg(app.sale_key(product, "stock"))
        .arg(5)
        .query_async::<i64>(&mut app.state.redis.conn())
        .await
        .unwrap();
    let conjured_at = Instant::now();
    let gauge = format!("inventory_invariant_violations{{product_id=\"{product}\"}} 5");
    common::until("the auditor to report 5 units", || async {
        let metrics = app.get("/metrics", None).await.text().await.unwrap();
        metrics.contains(&gauge)
    })
    .await;
    assert!(conjured_at.elapsed() < Duration::from_secs(2) + Duration::from_millis(500));
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(metrics.contains("inventory_audit_runs_total"), "{metrics}");
}

/// A flash-sale app whose requests may be in flight for 1 s (and that answers a sold-out
/// sale from memory for a minute), with a sale of `units`, a buyer, and a reservation an API
/// pod made for the buyer's key `retry-me` before it died (or lost Redis's reply): the key is
/// marked in progress, and nothing was published.
async fn a_request_that_never_finished(units: i32) -> (Arc<TestApp>, Uuid, Uuid, String) {
    let app = Arc::new(
        TestApp::builder()
            .configure(|s| {
                s.orders.in_flight_ttl_secs = 1;
                s.amqp.confirm_timeout_ms = 500;
                s.orders.reservation_timeout_secs = 0;
                s.orders.admission.sold_out_cache_ms = 60_000;
            })
            .spawn()
            .await,
    );
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, units, "1.00").await;
    let user = Uuid::now_v7();
    let token = app.mint_token(user);
    // The body digest is the one the flash-sale route computes for `{}`.
    let body_hash = hex::encode(Sha256::digest(format!("{product}|1|card|None").as_bytes()));
    let key_digest = orders::idempotency_digest(Some("retry-me")).unwrap();
    let first_try = Uuid::now_v7();
    app.reserve_unpublished(product, user, first_try, &body_hash, &key_digest)
        .await;
    let res = app.buy(&token, product, "retry-me", &json!({})).await;
    assert_problem(res, 409, "request_in_progress").await;
    (app, product, first_try, token)
}

/// Buys with the key `retry-me` until the answer is no longer `request_in_progress`.
async fn retry_until_answered(app: &TestApp, product: Uuid, token: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = app.buy(token, product, "retry-me", &json!({})).await;
        if res.status() != 409 {
            return res;
        }
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "request_in_progress", "{problem}");
        assert!(Instant::now() < deadline, "the key is still in progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_takes_over_the_reservation_its_unfinished_first_try_left() {
    let (app, product, first_try, token) = a_request_that_never_finished(5).await;
    let _worker = app
        .spawn_worker_with(|s| s.orders.reservation_timeout_secs = 300)
        .await;

    // Past the in-flight window the retry carries on with the first try's order and unit
    // (reserving again would read `purchase_limit`, the buyer's one unit being held).
    let started = Instant::now();
    let res = retry_until_answered(&app, product, &token).await;
    assert_eq!(res.status(), 201);
    assert!(started.elapsed() < Duration::from_secs(3));
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["id"], first_try.to_string());
    assert_eq!(app.remaining(product).await, 4);
    assert_eq!(app.wait_settled(&token, first_try).await.status, "paid");

    // A replay answers that order; the reconciler finds nothing left to free.
    let res = app.buy(&token, product, "retry-me", &json!({})).await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.json::<Value>().await.unwrap()["id"],
        first_try.to_string()
    );
    assert_eq!(reconcile_once(&app.state).await.unwrap().released, 0);
    assert_eq!(app.remaining(product).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_first_tries_units_were_freed_reserves_afresh() {
    let (app, product, first_try, token) = a_request_that_never_finished(5).await;
    // The reconciler frees the dead request's unit first (no order of it reached PostgreSQL).
    let repairs = reconcile_once(&app.state).await.unwrap();
    assert_eq!(repairs.released, 1, "{repairs:?}");
    assert_eq!(app.remaining(product).await, 5);

    // The key's marker names a released reservation: the retry reserves again, with the
    // buyer's allowance back.
    let res = retry_until_answered(&app, product, &token).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    assert_ne!(order["id"], first_try.to_string());
    assert_eq!(app.remaining(product).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_resumes_its_reservation_of_the_last_unit_after_the_sale_sold_out() {
    let (app, product, first_try, token) = a_request_that_never_finished(1).await;
    let _worker = app
        .spawn_worker_with(|s| s.orders.reservation_timeout_secs = 300)
        .await;
    // The unfinished request holds the last unit: everyone else hears sold out, and the API
    // remembers it.
    let other = app.mint_token(Uuid::now_v7());
    assert_problem(
        app.buy(&other, product, "someone-else", &json!({})).await,
        409,
        "sold_out",
    )
    .await;

    // The retry is not told sold out from memory, nor by the waiting room: it carries on
    // with the unit its first try holds.
    let res = retry_until_answered(&app, product, &token).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["id"], first_try.to_string());
    assert_eq!(app.wait_settled(&token, first_try).await.status, "paid");
    assert_eq!(app.remaining(product).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_a_confirm_in_time_is_503_with_the_units_back() {
    // The batch lingers longer than the confirm may take.
    let app = TestApp::spawn_with(|s| {
        s.orders.publish_linger_ms = 300;
        s.amqp.confirm_timeout_ms = 50;
    })
    .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let token = app.mint_token(Uuid::now_v7());
    let res = app.buy(&token, product, "slow-broker", &json!({})).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 503, "service_unavailable").await;
    assert_eq!(app.remaining(product).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regular_reservations_whose_order_never_arrived_are_released() {
    let app = TestApp::spawn_with(|s| s.orders.reservation_timeout_secs = 0).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    // One pass reads every product's reservations together: two products with requests
    // that died after reserving, and one whose stock Redis no longer holds.
    let mut products_with_stock = vec![];
    for held in [3, 1] {
        let product = app.regular_product(&admin.access, 4, "2.00").await;
        for _ in 0..held {
            let reserved =
                orders::reserve_regular(&app.state, product, Uuid::now_v7(), 1, Uuid::now_v7())
                    .await
                    .unwrap();
            assert!(matches!(reserved, products::Reservation::Reserved { .. }));
        }
        assert_eq!(app.remaining(product).await, 4 - held);
        products_with_stock.push(product);
    }
    let expired = app.regular_product(&admin.access, 4, "2.00").await;
    orders::reserve_regular(&app.state, expired, Uuid::now_v7(), 1, Uuid::now_v7())
        .await
        .unwrap();
    app.lose_sale(expired).await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let repairs = reconcile_once(&app.state).await.unwrap();
    assert_eq!(repairs.released, 4, "{repairs:?}");
    for product in &products_with_stock {
        assert_eq!(app.remaining(*product).await, 4);
    }
    // The product whose keys are gone is no longer tracked; the others still are.
    let tracked: Vec<String> = redis::cmd("SMEMBERS")
        .arg(app.state.redis.key("stock:regular"))
        .query_async(&mut app.state.redis.conn())
        .await
        .unwrap();
    let tracked: Vec<Uuid> = tracked.iter().map(|m| m.parse().unwrap()).collect();
    assert!(!tracked.contains(&expired));
    assert!(products_with_stock.iter().all(|p| tracked.contains(p)));
    let again = reconcile_once(&app.state).await.unwrap();
    assert_eq!(again.released, 0, "released exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_under_load_confirms_or_compensates_every_order() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 300, "1.00").await;

    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    let load = {
        let (app, accepted) = (app.clone(), accepted_so_far.clone());
        tokio::spawn(async move { buy_many_counting(&app, product, 300, 20, &accepted).await })
    };
    // The drop comes mid-load, once some orders went through (a slow machine takes a while
    // for its first ones).
    common::until("some orders accepted", || {
        let accepted = accepted_so_far.load(Ordering::Relaxed);
        async move { accepted >= 20 }
    })
    .await;
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
    let app = TestApp::spawn_with(|s| s.orders.reservation_timeout_secs = 0).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 3, "1.00").await;
    // An API pod died between reserving and publishing: the units are held by nobody.
    for _ in 0..2 {
        app.reserve_unpublished(product, Uuid::now_v7(), Uuid::now_v7(), "h", "d")
            .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_answers_in_time_fails_the_charge_not_the_worker() {
    let app = TestApp::spawn_with(|s| {
        s.orders.payment.latency_ms = 2_000;
        s.orders.payment.timeout_ms = 20;
    })
    .await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let (_, order, token) = buy_many(&app, product, 1, 1).await.remove(0);
    // Every charge times out: the retries run out quickly, not after 2 s each.
    let started = Instant::now();
    assert_eq!(app.wait_settled(&token, order.unwrap()).await, "failed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.remaining(product).await, 5, "the unit went back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_carries_the_statement_timeout() {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement_timeout: String,
    }
    let app = TestApp::spawn_with(|s| s.database.statement_timeout_ms = 1234).await;
    let pools = std::iter::once(app.state.db.global()).chain(app.state.db.shards());
    for pool in pools {
        let mut conn = pool.write_conn().await.unwrap();
        let shown: Setting = diesel::sql_query("SHOW statement_timeout")
            .get_result(&mut conn)
            .await
            .unwrap();
        assert_eq!(shown.statement_timeout, "1234ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refund_is_retried_and_one_that_keeps_failing_is_dead_lettered() {
    let app = TestApp::spawn().await;
    let worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let refunded = |order: Uuid| app.refunded(order);

    // The gateway fails the cancel's refund; the worker's retry gets it through.
    let (buyer, order, status) = app.buy_and_settle(product, "card").await;
    assert_eq!(status, "paid");
    app.state.orders.simulator.set_failure_rate(1.0);
    assert_eq!(app.cancel(&buyer.access, order).await.status(), 200);
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(metrics.contains("refunds_failed_total 1"), "{metrics}");
    common::until("the retried refund", || refunded(order)).await;

    // A gateway that keeps failing: the refund ends in the dead-letter queue, counted.
    let (buyer, order, _) = app.buy_and_settle(product, "card").await;
    worker.state.orders.simulator.set_failure_rate(1.0);
    assert_eq!(app.cancel(&buyer.access, order).await.status(), 200);
    let dead = &app.state.orders.queues.refunds_dead;
    common::until("the dead-lettered refund", || async {
        app.queue_depth(dead).await == 1
    })
    .await;
    assert!(!refunded(order).await);
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains("refunds_dead_lettered_total 1"),
        "{metrics}"
    );
}

/// A count edited by hand below what was sold refuses that product's stock moves only: the
/// buyer's other orders (same shard, other product) settle and reach the books, the refused
/// moves wait in their shard, and once the row is mended the reconciler applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_whose_count_refuses_its_moves_stalls_no_other_product() {
    let app = TestApp::spawn().await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let edited = app.regular_product(&admin.access, 10, "2.00").await;
    let other = app.regular_product(&admin.access, 10, "3.00").await;
    let buyer = app.register(&unique_email("buyer")).await;
    let one_of = |product: Uuid| json!({"items": [{"product_id": product, "quantity": 1}]});
    let place = |key: &'static str, product: Uuid| {
        let (app, token, body) = (&app, buyer.access.clone(), one_of(product));
        async move {
            let res = app.order(&token, key, &body).await;
            assert_eq!(res.status(), 201);
            let order: Value = res.json().await.unwrap();
            let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
            app.wait_settled(&token, order).await
        }
    };
    assert_eq!(place("first", edited).await, "paid");
    app.wait_inventory(edited, 9).await;
    let mut global = app.global_conn().await;
    let set_count = |n: i32| format!("UPDATE products SET inventory = {n} WHERE id = '{edited}'");
    diesel_async::RunQueryDsl::execute(diesel::sql_query(set_count(0)), &mut global)
        .await
        .unwrap();

    assert_eq!(place("second", edited).await, "paid");
    assert_eq!(place("third", other).await, "paid");
    app.wait_inventory(other, 9).await;
    assert_eq!(
        app.inventory(edited).await,
        0,
        "the refused move was not applied"
    );

    diesel_async::RunQueryDsl::execute(diesel::sql_query(set_count(5)), &mut global)
        .await
        .unwrap();
    reconcile_once(&app.state).await.unwrap();
    assert_eq!(
        app.inventory(edited).await,
        4,
        "the held-back move, applied once"
    );
}

/// A rebuilt sale stays closed while a worker still holds an order that was in flight at the
/// loss (its charge is slow: the delivery is unacked, and the queue shows nothing ready), and
/// opens once that order has settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_sale_waits_for_deliveries_a_worker_still_holds() {
    let app = TestApp::spawn_with(|s| {
        s.orders.payment.latency_ms = 4_000;
        s.orders.payment.timeout_ms = 10_000;
    })
    .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let _worker = app
        .spawn_worker_with(|s| s.orders.reconcile_interval_secs = 3_600)
        .await;
    let buyer = app.mint_token(Uuid::now_v7());
    let res = app.buy(&buyer, product, "slow", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    common::until("the worker to take the order", || async {
        app.queue_depth(&app.state.orders.queues.orders).await == 0
    })
    .await;

    app.lose_sale(product).await;
    common::until("the sale rebuilt", || async {
        reconcile_once(&app.state).await.unwrap();
        products::sale_state(&app.state, product).await.unwrap() != products::SaleState::Missing
    })
    .await;
    reconcile_once(&app.state).await.unwrap();
    assert_eq!(
        products::sale_state(&app.state, product).await.unwrap(),
        products::SaleState::Recovering,
        "reopened while a worker held an order in flight"
    );

    assert_eq!(app.wait_settled(&buyer, order).await, "paid");
    common::until("the sale open again", || async {
        reconcile_once(&app.state).await.unwrap();
        products::sale_state(&app.state, product).await.unwrap() == products::SaleState::Open
    })
    .await;
}

/// An order whose worker committed its reservation and whose message was then lost (the
/// broker dead-lettered it, or a retry queue lost it) is neither pending nor persisted: the
/// reconciler finds it in the committed set, sends it again and a worker pays it. One sent
/// too often already is failed, its unit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_order_whose_message_was_lost_is_sent_again_or_failed() {
    let app = TestApp::spawn_with(|s| {
        s.orders.reservation_timeout_secs = 0;
        s.orders.stock_restore_wait_secs = 0;
        s.orders.retry_delays_ms = vec![1];
    })
    .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let mut lost = vec![];
    for key in ["redriven", "given-up"] {
        let token = app.mint_token(Uuid::now_v7());
        let res = app.buy(&token, product, key, &json!({})).await;
        assert_eq!(res.status(), 201);
        let order: Value = res.json().await.unwrap();
        let id: Uuid = order["id"].as_str().unwrap().parse().unwrap();
        let buyer: Uuid = order["user_id"].as_str().unwrap().parse().unwrap();
        lost.push((id, buyer, token));
    }
    // A worker committed both, then their messages were lost.
    let lines: Vec<products::ReservedUnits> = lost
        .iter()
        .map(|(order, buyer, _)| products::ReservedUnits {
            order: *order,
            product,
            buyer: *buyer,
            units: 1,
        })
        .collect();
    let outcomes = products::commit(&app.state, &lines).await.unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, products::CommitOutcome::Committed(_))));
    let channel = app.state.amqp.connection().create_channel().await.unwrap();
    channel
        .queue_purge(
            app.state.orders.queues.orders.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    // The second was sent as often as it may be.
    redis::cmd("SET")
        .arg(
            app.state
                .redis
                .key(format_args!("orders:redriven:{}", lost[1].0)),
        )
        .arg(3)
        .query_async::<()>(&mut app.state.redis.conn())
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(5)).await; // past the (1 ms) cutoff
    let repairs = reconcile_once(&app.state).await.unwrap();
    assert_eq!(repairs.redriven, 2, "{repairs:?}");
    let _worker = app
        .spawn_worker_with(|s| s.orders.reconcile_interval_secs = 3_600)
        .await;
    let (redriven, given_up) = (&lost[0], &lost[1]);
    assert_eq!(app.wait_settled(&redriven.2, redriven.0).await, "paid");
    assert!(app.charged(redriven.0).await);
    let failed = app.wait_settled(&given_up.2, given_up.0).await;
    assert_eq!(failed, "failed");
    assert_eq!(failed.failure_reason.as_deref(), Some("lost_in_delivery"));
    assert_eq!(app.remaining(product).await, 4, "one sold, one back");
    // Both are out of the committed set: the next pass finds nothing.
    let repairs = reconcile_once(&app.state).await.unwrap();
    assert_eq!(repairs.redriven, 0, "{repairs:?}");
}

/// Finding 3: a regular order committed in Redis before a loss and written sold after the
/// rebuild put its unit back on the shelf. The rebuild (here: the next buyer's order finds
/// the stock gone and loads it) fences the shards first, so the late write is void: the
/// first order takes its unit again, finds it sold to the second, fails and is refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_from_before_a_redis_loss_cannot_sell_a_unit_the_rebuild_put_back() {
    let app = TestApp::spawn_with(|s| {
        s.orders.payment.latency_ms = 1_500;
        s.orders.payment.timeout_ms = 10_000;
    })
    .await;
    let worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.regular_product(&admin.access, 1, "2.00").await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
    let place = |key: &'static str| {
        let (app, body) = (&app, body.clone());
        async move {
            let token = app.mint_token(Uuid::now_v7());
            let res = app.order(&token, key, &body).await;
            assert_eq!(res.status(), 201, "{key}");
            let order: Value = res.json().await.unwrap();
            (
                token,
                order["id"].as_str().unwrap().parse::<Uuid>().unwrap(),
            )
        }
    };
    let (first_token, first) = place("first").await;
    // Committed, and at the (slow) gateway: not yet written sold.
    common::until("the first order at the gateway", || async {
        worker.state.orders.simulator.attempts() >= 1
    })
    .await;
    app.lose_sale(product).await;
    let (second_token, second) = place("second").await;

    assert_eq!(app.wait_settled(&second_token, second).await, "paid");
    let failed = app.wait_settled(&first_token, first).await;
    assert_eq!(failed, "failed");
    assert_eq!(failed.failure_reason.as_deref(), Some("sold_out"));
    // The debt is written with the failure; the gateway is asked after that commit.
    common::until("its charge paid back", || app.refunded(first)).await;
    app.wait_inventory(product, 0).await;
    common::until("no refund owed", || async { app.refunds_owed().await == 0 }).await;
}

/// Finding 7: the gateway charged, but its answer came after the worker stopped waiting;
/// the buyer cancels before the worker tries again. The cancel refunds the charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_that_landed_during_a_gateway_timeout_is_refunded_on_cancel() {
    let app = TestApp::spawn_with(|s| {
        s.orders.payment.latency_ms = 5_000;
        s.orders.payment.timeout_ms = 50;
    })
    .await;
    let worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let buyer = app.register(&unique_email("buyer")).await;
    let res = app.buy(&buyer.access, product, "k", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    common::until("the charge landed", || app.charged(order)).await;
    worker.kill().await;

    assert_eq!(app.cancel(&buyer.access, order).await.status(), 200);
    assert!(app.refunded(order).await, "the cancel paid the charge back");
    assert_eq!(app.refunds_owed().await, 0);
    assert_eq!(app.wait_settled(&buyer.access, order).await, "cancelled");
}

/// Finding 7: a refund the gateway failed, whose retry messages were then lost, is still
/// owed in PostgreSQL and paid back by the reconciler once due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_whose_retry_messages_were_lost_is_paid_back_by_the_reconciler() {
    let app = TestApp::spawn().await;
    let worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let (buyer, order, status) = app.buy_and_settle(product, "card").await;
    assert_eq!(status, "paid");
    worker.kill().await;

    app.state.orders.simulator.set_failure_rate(1.0);
    assert_eq!(app.cancel(&buyer.access, order).await.status(), 200);
    assert!(!app.refunded(order).await);
    assert_eq!(app.refunds_owed().await, 1, "the debt is on the books");
    let queues = &app.state.orders.queues;
    let channel = app.state.amqp.connection().create_channel().await.unwrap();
    let retries = queues.refund_retries.iter().map(|(queue, _)| queue);
    for queue in retries.chain([&queues.refunds]) {
        channel
            .queue_purge(
                queue.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await
            .unwrap();
    }

    app.state.orders.simulator.set_failure_rate(0.0);
    common::until("the reconciler paid the debt back", || async {
        reconcile_once(&app.state).await.unwrap();
        app.refunded(order).await
    })
    .await;
    assert_eq!(app.refunds_owed().await, 0);
}

/// Finding 11: the rebuild after a Redis loss gives each live order its record back, so a
/// buyer who cancels a paid order afterwards gets the unit back on sale and the allowance back,
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_a_rebuild_gives_the_unit_and_the_allowance_back_once() {
    let app = TestApp::spawn_with(|s| s.orders.reconcile_interval_secs = 1).await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let (buyer, order, status) = app.buy_and_settle(product, "card").await;
    assert_eq!(status, "paid");
    app.lose_sale(product).await;
    common::until("the sale rebuilt and open again", || async {
        products::sale_state(&app.state, product).await.unwrap() == products::SaleState::Open
    })
    .await;
    assert_eq!(app.remaining(product).await, 4);
    let res = app.buy(&buyer.access, product, "again", &json!({})).await;
    assert_problem(res, 409, "purchase_limit").await;

    for _ in 0..2 {
        assert_eq!(app.cancel(&buyer.access, order).await.status(), 200);
        assert_eq!(app.remaining(product).await, 5, "the unit is back, once");
    }
    let res = app
        .buy(&buyer.access, product, "after-cancel", &json!({}))
        .await;
    assert_eq!(
        res.status(),
        201,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let findings = products::audit_once(&app.state).await.unwrap();
    let sale = findings.iter().find(|f| f.product == product).unwrap();
    assert_eq!(sale.violations(), 0, "{sale:?}");
}
