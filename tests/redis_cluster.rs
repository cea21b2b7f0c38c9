//! The platform on a local 3-node Redis Cluster (`scripts/services.sh` starts it), with a
//! flash sale's stock split into buckets spread over the nodes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{unique_email, TestApp};
use flashsale::modules::orders::reconcile_once;
use flashsale::modules::products;
use futures_util::{stream, StreamExt};
use serde_json::json;
use uuid::Uuid;

const BUCKETS: u32 = 8;
const NODES: [&str; 3] = [
    "redis://127.0.0.1:7101",
    "redis://127.0.0.1:7102",
    "redis://127.0.0.1:7103",
];

async fn cluster_app(purchase_limit: u32) -> Arc<TestApp> {
    Arc::new(
        TestApp::builder()
            .redis_cluster()
            .configure(move |s| {
                s.sales.stock_buckets = BUCKETS;
                s.sales.purchase_limit = purchase_limit;
                s.orders.flash_sale_attempts_per_minute = 1_000;
                s.orders.reconcile_interval_secs = 1;
            })
            .spawn()
            .await,
    )
}

/// A buyer whose home bucket is `bucket`.
fn buyer_homed_at(bucket: u32) -> Uuid {
    loop {
        let buyer = Uuid::now_v7();
        if buyer.as_u128() % u128::from(BUCKETS) == u128::from(bucket) {
            return buyer;
        }
    }
}

/// Every buyer tries `attempts` times at once (each its own Idempotency-Key); answers the
/// statuses by buyer.
async fn stampede(
    app: &Arc<TestApp>,
    product: Uuid,
    buyers: &[Uuid],
    attempts: usize,
) -> HashMap<Uuid, Vec<u16>> {
    let requests = buyers.iter().flat_map(|buyer| {
        (0..attempts).map(move |attempt| {
            let app = app.clone();
            let buyer = *buyer;
            async move {
                let token = app.mint_token(buyer);
                let res = app
                    .buy(&token, product, &format!("k{attempt}"), &json!({}))
                    .await;
                (buyer, res.status().as_u16())
            }
        })
    });
    let answers: Vec<(Uuid, u16)> = stream::iter(requests).buffer_unordered(64).collect().await;
    let mut by_buyer: HashMap<Uuid, Vec<u16>> = HashMap::new();
    for (buyer, status) in answers {
        by_buyer.entry(buyer).or_default().push(status);
    }
    by_buyer
}

fn sold(answers: &HashMap<Uuid, Vec<u16>>) -> usize {
    answers.values().flatten().filter(|s| **s == 201).count()
}

async fn assert_books_balance(app: &TestApp, product: Uuid) {
    let findings = products::audit_once(&app.state).await.expect("audit");
    let sale = findings
        .iter()
        .find(|f| f.product == product)
        .expect("the sale is audited");
    assert_eq!(sale.violations(), 0, "{sale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucketed_sale_never_oversells_holds_the_limit_and_sells_out() {
    let app = cluster_app(2).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 100, "1.00").await;
    // 80 buyers, 3 attempts each, a limit of 2: demand of 160 for 100 units.
    let buyers: Vec<Uuid> = (0..80).map(|_| Uuid::now_v7()).collect();
    let answers = stampede(&app, product, &buyers, 3).await;

    assert_eq!(sold(&answers), 100, "every unit sold, none twice");
    for (buyer, statuses) in &answers {
        let bought = statuses.iter().filter(|s| **s == 201).count();
        assert!(bought <= 2, "{buyer} bought {bought} over a limit of 2");
        assert!(
            statuses.iter().all(|s| [201, 409].contains(s)),
            "{statuses:?}"
        );
    }
    assert_eq!(app.remaining(product).await, 0);
    assert_books_balance(&app, product).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_who_all_share_one_bucket_still_buy_every_unit() {
    let app = cluster_app(1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 40, "1.00").await;
    // Bucket 3 holds 5 of the 40 units; its 60 buyers borrow the other 35 from the rest.
    let buyers: Vec<Uuid> = (0..60).map(|_| buyer_homed_at(3)).collect();
    let answers = stampede(&app, product, &buyers, 1).await;

    assert_eq!(sold(&answers), 40, "no unit left behind in another bucket");
    assert_eq!(app.remaining(product).await, 0);
    assert_books_balance(&app, product).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sales_keys_live_on_more_than_one_node() {
    let app = cluster_app(1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 80, "1.00").await;
    let token = app.mint_token(Uuid::now_v7());
    assert_eq!(
        app.buy(&token, product, "k", &json!({})).await.status(),
        201
    );

    let pattern = app
        .state
        .redis
        .key(format_args!("{{p:{}*", product.simple()));
    let mut nodes_holding = 0;
    for node in NODES {
        let client = redis::Client::open(node).expect("node url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("the node answers");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .expect("keys");
        if !keys.is_empty() {
            nodes_holding += 1;
        }
    }
    assert!(
        nodes_holding > 1,
        "{BUCKETS} buckets of one sale all landed on one node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_between_buckets_cut_in_half_is_finished_by_the_reconciler() {
    let app = cluster_app(1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 16, "1.00").await;
    let buckets = app.sale_buckets(product);
    let (giver, taker) = (&buckets[1], &buckets[2]);
    // A mover gave 2 units of bucket 1 to bucket 2 and died before bucket 2 took them.
    let epoch: String = redis::cmd("GET")
        .arg(format!("{taker}:epoch"))
        .query_async(&mut app.state.redis.conn())
        .await
        .expect("epoch");
    let long_ago = chrono::Utc::now().timestamp_millis() - 60_000;
    let mut conn = app.state.redis.conn();
    redis::pipe()
        .atomic()
        .decr(format!("{giver}:stock"), 2)
        .hincr(format!("{giver}:sale"), "units", -2)
        .hset(
            format!("{giver}:out"),
            "m1",
            format!("2:2:{epoch}:{long_ago}"),
        )
        .query_async::<()>(&mut conn)
        .await
        .expect("half a move");
    assert_eq!(app.remaining(product).await, 14, "2 units on their way");
    assert_books_balance(&app, product).await;

    let repairs = reconcile_once(&app.state).await.expect("reconcile");
    assert_eq!(repairs.moves_finished, 1);
    assert_eq!(app.remaining(product).await, 16, "the units arrived");
    let again = reconcile_once(&app.state).await.expect("reconcile");
    assert_eq!(again.moves_finished, 0, "a move lands once");
    assert_eq!(app.remaining(product).await, 16);
    assert_books_balance(&app, product).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_losing_one_bucket_closes_the_sale_until_it_is_rebuilt() {
    let app = cluster_app(1).await;
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 24, "1.00").await;
    let buyers: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let answers = stampede(&app, product, &buyers, 1).await;
    assert_eq!(sold(&answers), 6);
    common::until("the six orders to be paid", || async {
        app.orders_by_status(product)
            .await
            .get("paid")
            .map(|(orders, _)| *orders)
            == Some(6)
    })
    .await;

    // One bucket's keys go, as when the node holding its slot restarts empty.
    lose_bucket(&app, product, 5).await;
    assert_eq!(
        products::sale_state(&app.state, product).await.unwrap(),
        products::SaleState::Missing
    );

    common::until("the sale to be rebuilt and open", || async {
        products::sale_state(&app.state, product).await.unwrap() == products::SaleState::Open
    })
    .await;
    assert_eq!(
        app.remaining(product).await,
        18,
        "the units not sold, no more"
    );
    for buyer in &buyers {
        let token = app.mint_token(*buyer);
        let res = app.buy(&token, product, "again", &json!({})).await;
        common::assert_problem(res, 409, "purchase_limit").await;
    }
    let late: Vec<Uuid> = (0..30).map(|_| Uuid::now_v7()).collect();
    assert_eq!(sold(&stampede(&app, product, &late, 1).await), 18);
    assert_books_balance(&app, product).await;
}

/// Deletes every key of one bucket of the sale, as when the node holding its slot restarts
/// empty.
async fn lose_bucket(app: &TestApp, product: Uuid, bucket: usize) {
    let lost = &app.sale_buckets(product)[bucket];
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{lost}:*"))
        .query_async(&mut app.state.redis.conn())
        .await
        .expect("keys");
    redis::cmd("DEL")
        .arg(keys)
        .query_async::<()>(&mut app.state.redis.conn())
        .await
        .expect("lose a bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_rebuilds_only_its_buckets_and_orders_in_flight_elsewhere_keep_their_units() {
    let app = cluster_app(1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 24, "1.00").await;
    // Two orders in flight (reserved, their workers not there yet), homed in buckets 2 and 5.
    let (kept, gone) = (buyer_homed_at(2), buyer_homed_at(5));
    let (kept_order, gone_order) = (Uuid::now_v7(), Uuid::now_v7());
    app.reserve_unpublished(product, kept, kept_order, "h", "k2")
        .await;
    app.reserve_unpublished(product, gone, gone_order, "h", "k5")
        .await;

    lose_bucket(&app, product, 5).await;
    common::until("the lost bucket to be rebuilt", || async {
        reconcile_once(&app.state).await.expect("reconcile");
        products::sale_state(&app.state, product).await.unwrap() != products::SaleState::Missing
    })
    .await;

    // Bucket 2 kept its order's reservation and its buyer's allowance: that order commits as
    // it would have, and its unit stays off the shelf. The lost bucket's order takes its unit
    // again when it commits (late).
    let record = |bucket: usize, order: Uuid| {
        let key = format!("{}:res", app.sale_buckets(product)[bucket]);
        let app = app.clone();
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg(order.to_string())
                .query_async::<Option<String>>(&mut app.state.redis.conn())
                .await
                .expect("read a record")
        }
    };
    assert_eq!(
        record(2, kept_order).await,
        Some(format!("r:{}:1", kept.simple()))
    );
    assert_eq!(record(5, gone_order).await, None);
    let allowance: Option<i64> = redis::cmd("HGET")
        .arg(format!("{}:buyers", app.sale_buckets(product)[2]))
        .arg(kept.simple().to_string())
        .query_async(&mut app.state.redis.conn())
        .await
        .expect("read the allowance");
    assert_eq!(allowance, Some(1));
    assert_eq!(
        app.remaining(product).await,
        23,
        "all but the kept order's unit"
    );
    common::until("the sale to reopen", || async {
        reconcile_once(&app.state).await.expect("reconcile");
        products::sale_state(&app.state, product).await.unwrap() == products::SaleState::Open
    })
    .await;
    assert_books_balance(&app, product).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_domain_runs_on_the_cluster() {
    let app = cluster_app(1).await;
    let _worker = app.spawn_worker().await;
    let _notifier = app.spawn_notify_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let buyer = app.register(&unique_email("buyer")).await;

    // Auth: a refresh-token family's keys share a slot; the rotation script runs there.
    let res = app.refresh(&buyer.refresh).await;
    assert_eq!(res.status(), 200);
    let access = res.json::<serde_json::Value>().await.expect("pair")["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();

    // Users: a write drops the cached profile and pins reads to the primary (one transaction).
    let path = format!("/users/{}", buyer.user_id);
    let profile = app.get_json(&path, Some(&access)).await;
    assert_eq!(
        profile["email"], buyer.email,
        "read through the profile cache"
    );
    let res = app
        .put_json(&path, &json!({"full_name": "Grace Hopper"}), &access)
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.get_json(&path, Some(&access)).await["full_name"],
        "Grace Hopper"
    );

    // Orders: a regular order (its key under the user's tag), paid, then cancelled.
    let lamp = app.regular_product(&admin.access, 5, "19.99").await;
    let body = json!({"items": [{"product_id": lamp, "quantity": 2}]});
    let res = app.order(&access, "o-1", &body).await;
    assert_eq!(res.status(), 201);
    let order: Uuid = res.json::<serde_json::Value>().await.expect("order")["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    assert_eq!(app.wait_settled(&access, order).await, "paid");
    app.wait_inventory(lamp, 3).await;
    assert_eq!(app.cancel(&access, order).await.status(), 200);
    app.wait_inventory(lamp, 5).await;

    // Notifications: queued, sent, and in the user's history (one slot per user).
    let note = json!({"user_id": buyer.user_id, "channel": "email", "priority": "high",
                      "subject": "Sale soon", "body": "Doors open at noon"});
    let res = app
        .post_json("/notifications/send", &note, Some(&admin.access))
        .await;
    assert_eq!(res.status(), 202);
    let history = format!("/notifications/user/{}", buyer.user_id);
    common::until("the notification to be sent", || async {
        let page = app.get_json(&history, Some(&access)).await;
        page["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|n| n["subject"] == "Sale soon" && n["status"] == "sent")
        })
    })
    .await;
}
