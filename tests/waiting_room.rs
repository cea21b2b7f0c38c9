//! Admission control and the stock-aware waiting room of the flash-sale path: tickets when
//! the backlog is full, admission in order of arrival, the room closing at sell-out and
//! reopening when a unit comes back, one ticket per buyer, and a complete sell-out to buyers
//! who keep coming back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_problem, unique_email, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

/// An app whose backlog may hold `backlog` orders, whatever the workers settle.
async fn app_admitting(backlog: i64) -> Arc<TestApp> {
    let app = TestApp::spawn_with(move |s| {
        let admission = &mut s.orders.admission;
        admission.min_backlog = backlog;
        admission.max_settle_secs = 0.0;
        admission.sample_ms = 50;
        admission.stock_slack = 0;
        admission.sold_out_cache_ms = 100;
    })
    .await;
    wait_sampled(&app, &format!("admission_allowed_backlog {backlog}")).await;
    app
}

/// Waits until an admission sample shows `line` (a pod's view is only as fresh as its last
/// sample: orders it let in since are counted there, not yet in the backlog).
async fn wait_sampled(app: &TestApp, line: &str) {
    common::until(line, || async {
        let metrics = app.get("/metrics", None).await.text().await.unwrap();
        metrics.contains(line)
    })
    .await;
}

/// A buyer, and the answer to one attempt.
struct Buyer {
    token: String,
}

impl Buyer {
    fn new(app: &TestApp) -> Self {
        Self {
            token: app.mint_token(Uuid::now_v7()),
        }
    }

    async fn attempt(&self, app: &TestApp, product: Uuid, key: &str) -> (u16, Value) {
        let res = app.buy(&self.token, product, key, &json!({})).await;
        let status = res.status().as_u16();
        if status == 202 {
            let retry_after = res.headers().get("retry-after").expect("Retry-After");
            assert!(retry_after.to_str().unwrap().parse::<u64>().unwrap() >= 1);
        }
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Retries with the same key until a final answer (a real client following Retry-After,
    /// sped up for the test).
    async fn follow(&self, app: &TestApp, product: Uuid, key: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, _) = self.attempt(app, product, key).await;
            if status != 202 {
                return status;
            }
            assert!(Instant::now() < deadline, "never admitted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_hands_out_tickets_and_admits_them_in_order_of_arrival() {
    let app = app_admitting(2).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 50, "1.00").await;
    let buyers: Vec<Buyer> = (0..6).map(|_| Buyer::new(&app)).collect();

    // No worker: the first two fill the backlog, the next four wait in arrival order.
    for buyer in &buyers[..2] {
        assert_eq!(buyer.attempt(&app, product, "k").await.0, 201);
    }
    wait_sampled(&app, "admission_backlog 2").await;
    for (i, buyer) in buyers[2..].iter().enumerate() {
        let (status, ticket) = buyer.attempt(&app, product, "k").await;
        assert_eq!(status, 202, "{ticket}");
        assert_eq!(ticket["ticket"], i as u64 + 1, "{ticket}");
        assert_eq!(ticket["position"], i as u64 + 1, "{ticket}");
        assert!(ticket["retry_after_ms"].as_u64().unwrap() > 0);
    }
    // One ticket per buyer: another key (or the queue route) shows the same place.
    let (status, again) = buyers[3].attempt(&app, product, "other-key").await;
    assert_eq!((status, again["ticket"].as_u64()), (202, Some(2)));
    let place = app
        .get_json(
            &format!("/orders/flash-sale/{product}/queue"),
            Some(&buyers[3].token),
        )
        .await;
    assert_eq!(place["ticket"], 2, "{place}");
    let res = app
        .get(
            &format!("/orders/flash-sale/{product}/queue"),
            Some(&app.mint_token(Uuid::now_v7())),
        )
        .await;
    assert_problem(res, 404, "not_found").await;
    // Nobody new gets past the room while it is full.
    assert_eq!(Buyer::new(&app).attempt(&app, product, "k").await.0, 202);

    // The worker settles the backlog: two more are let in, the earliest tickets first,
    // whichever of them asks first.
    let _worker = app.spawn_worker().await;
    assert_eq!(buyers[3].follow(&app, product, "k").await, 201);
    assert_eq!(buyers[2].follow(&app, product, "k").await, 201);
    let (status, ticket) = buyers[5].attempt(&app, product, "k").await;
    if status == 202 {
        assert!(ticket["position"].as_u64().unwrap() <= 2, "{ticket}");
    }
    for buyer in &buyers[4..] {
        assert_eq!(buyer.follow(&app, product, "k").await, 201);
    }
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    for name in [
        "admission_admitted_total",
        "admission_queued_total",
        "admission_backlog",
        "admission_horizon_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_accepted_in_one_batch_are_each_counted_once() {
    // A linger long enough that the six share one message and one record pipeline.
    let app = TestApp::spawn_with(|s| {
        s.orders.publish_linger_ms = 200;
        s.orders.admission.sample_ms = 50;
    })
    .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let buyers: Vec<Buyer> = (0..6).map(|_| Buyer::new(&app)).collect();
    let answers = futures_util::future::join_all(
        buyers
            .iter()
            .map(|buyer| buyer.attempt(&app, product, "one-batch")),
    )
    .await;
    assert!(
        answers.iter().all(|(status, _)| *status == 201),
        "{answers:?}"
    );
    // No worker settles them: the backlog is exactly the six.
    wait_sampled(&app, "admission_backlog 6\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_answers_sold_out_to_every_waiter_and_reopens_when_a_unit_comes_back() {
    let app = app_admitting(2).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 3, "1.00").await;
    let first = Buyer::new(&app);
    let (status, order) = first.attempt(&app, product, "k").await;
    assert_eq!(status, 201);
    assert_eq!(Buyer::new(&app).attempt(&app, product, "k").await.0, 201);
    wait_sampled(&app, "admission_backlog 2").await;
    let (third, fourth) = (Buyer::new(&app), Buyer::new(&app));
    assert_eq!(third.attempt(&app, product, "k").await.0, 202);
    assert_eq!(fourth.attempt(&app, product, "k").await.0, 202);

    // One unit left: the room admits the third buyer only; once it is taken every waiter
    // hears sold_out at once.
    let worker = app.spawn_worker().await;
    assert_eq!(third.follow(&app, product, "k").await, 201);
    assert_eq!(app.remaining(product).await, 0);
    assert_problem(
        app.buy(&fourth.token, product, "k", &json!({})).await,
        409,
        "sold_out",
    )
    .await;
    assert_eq!(Buyer::new(&app).attempt(&app, product, "k").await.0, 409);

    // A cancelled order gives its unit back: the next ticket is admitted.
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.wait_settled(&first.token, order).await, "paid");
    assert_eq!(app.cancel(&first.token, order).await.status(), 200);
    let started = Instant::now();
    let status = loop {
        let (status, _) = fourth.attempt(&app, product, "k").await;
        if status != 409 || started.elapsed() > Duration::from_secs(10) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 201, "the returned unit reopened the room");
    assert_eq!(app.remaining(product).await, 0);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_who_keep_coming_back_buy_every_unit_and_no_more() {
    let app = app_admitting(3).await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let buyers: Vec<Buyer> = (0..40).map(|_| Buyer::new(&app)).collect();
    let answers =
        futures_util::future::join_all(buyers.iter().map(|buyer| buyer.follow(&app, product, "k")))
            .await;
    let sold = answers.iter().filter(|s| **s == 201).count();
    assert_eq!(sold, 10, "{answers:?}");
    assert!(
        answers.iter().all(|s| [201, 409].contains(s)),
        "{answers:?}"
    );
    assert_eq!(app.remaining(product).await, 0);
    app.wait_inventory(product, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_known_sold_out_is_answered_from_memory() {
    let app = TestApp::spawn_with(|s| s.orders.admission.sold_out_cache_ms = 60_000).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 1, "1.00").await;
    assert_eq!(Buyer::new(&app).attempt(&app, product, "k").await.0, 201);
    let (status, body) = Buyer::new(&app).attempt(&app, product, "k").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("sold_out")));

    // Without its counter Redis would answer 503; the process remembers the sell-out.
    redis::cmd("DEL")
        .arg(app.sale_key(product, "stock"))
        .arg(app.sale_key(product, "epoch"))
        .query_async::<()>(&mut app.state.redis.conn())
        .await
        .unwrap();
    let (status, body) = Buyer::new(&app).attempt(&app, product, "k").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("sold_out")));
}

/// Orders cancelled before any worker settled them leave the backlog: their cancel wrote the
/// final row and counted it, and the worker that meets their messages later counts nothing
/// again. Before, each one stayed in the backlog for good, and enough of them closed the
/// waiting room to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_cancelled_before_settling_leave_no_backlog_behind() {
    let app = TestApp::spawn_with(|s| s.orders.admission.sample_ms = 50).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "1.00").await;
    let buyers: Vec<Buyer> = (0..4).map(|_| Buyer::new(&app)).collect();
    for buyer in &buyers {
        let (status, order) = buyer.attempt(&app, product, "cancel-me").await;
        assert_eq!(status, 201, "{order}");
        let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(app.cancel(&buyer.token, order).await.status(), 200);
    }
    wait_sampled(&app, "admission_backlog 0\n").await;
    // The worker meets the four messages, finds their rows cancelled and counts none again;
    // a fifth order, queued behind them, is settled once they were.
    let _worker = app.spawn_worker().await;
    let fifth = Buyer::new(&app);
    let (status, order) = fifth.attempt(&app, product, "fifth").await;
    assert_eq!(status, 201, "{order}");
    let order: Uuid = order["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.wait_settled(&fifth.token, order).await, "paid");
    let settled = || async {
        redis::cmd("GET")
            .arg(app.state.redis.key("{admission}:settled"))
            .query_async::<Option<i64>>(&mut app.state.redis.conn())
            .await
            .unwrap()
    };
    common::until("five orders counted out", || async {
        settled().await == Some(5)
    })
    .await;
    common::until("the order queue to drain", || async {
        app.queue_depth(&app.state.orders.queues.orders).await == 0
    })
    .await;
    assert_eq!(
        settled().await,
        Some(5),
        "each order counted out exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_first_written_by_its_hold_mark_still_expires() {
    // A room read with capacity and no ticket yet answers `pass`, but it writes the room's
    // hold mark: that first write must carry the room's expiry (Redis runs `noeviction`).
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let reply = flashsale::modules::products::enter_room(
        &app.state,
        &flashsale::modules::products::RoomRequest {
            buyer: Uuid::now_v7(),
            key_digest: "k",
            ..app.state.orders.admission.room_request(product)
        },
    )
    .await
    .unwrap();
    assert_eq!(reply.answer, flashsale::modules::products::RoomAnswer::Pass);
    let ttl: i64 = redis::cmd("TTL")
        .arg(app.sale_key(product, "room"))
        .query_async(&mut app.state.redis.conn())
        .await
        .unwrap();
    assert!(ttl > 0, "the room's TTL: {ttl}");
}
