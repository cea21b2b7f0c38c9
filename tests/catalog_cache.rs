//! The catalogue read path: in-process tier, Redis tier, PostgreSQL; single-flight misses;
//! writes visible on every pod within the consistency window.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{unique_email, TestApp};
use flashsale::app::AppState;
use flashsale::modules::products;
use serde_json::{json, Value};

fn loads(state: &AppState) -> u64 {
    state.products.cache.database_loads()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tier_hits_misses_and_is_refreshed_by_writes() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let id = app.regular_product(&admin.access, 7, "3.00").await;
    let path = format!("/products/{id}");
    let key = format!("product:{}", id.simple());
    // Creating wrote the product through to Redis.
    assert!(app.redis_exists(&key).await);

    let before = loads(&app.state);
    let first: Value = app.get_json(&path, None).await;
    assert_eq!(first["inventory"], 7);
    assert_eq!(loads(&app.state), before, "served by Redis, not PostgreSQL");
    app.get(&path, None).await;
    assert_eq!(loads(&app.state), before, "then by this process");

    // Cold in both tiers: one database read, and both tiers are filled again.
    app.state.products.cache.clear_local();
    app.redis_del(&key).await;
    app.get(&path, None).await;
    assert_eq!(loads(&app.state), before + 1);
    assert!(app.redis_exists(&key).await);
    app.get(&path, None).await;
    assert_eq!(loads(&app.state), before + 1);

    // A write is visible here at once.
    let res = app
        .patch_json(&path, &json!({"name": "Renamed"}), &admin.access)
        .await;
    assert_eq!(res.status(), 200);
    let after: Value = app.get_json(&path, None).await;
    assert_eq!(after["name"], "Renamed");
    let res = app
        .put_json(
            &format!("{path}/inventory"),
            &json!({"inventory": 3}),
            &admin.access,
        )
        .await;
    assert_eq!(res.status(), 200);
    let after: Value = app.get_json(&path, None).await;
    assert_eq!(after["inventory"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_product_read_the_database_once() {
    let app = Arc::new(TestApp::spawn().await);
    let admin = app.register_admin(&unique_email("admin")).await;
    let id = app.regular_product(&admin.access, 1, "1.00").await;
    app.state.products.cache.clear_local();
    app.redis_del(&format!("product:{}", id.simple())).await;

    let before = loads(&app.state);
    let readers = (0..64).map(|_| {
        let app = app.clone();
        tokio::spawn(async move { products::find(&app.state, id).await.map(|p| p.id) })
    });
    for reader in futures_util::future::join_all(readers).await {
        assert_eq!(reader.unwrap().unwrap(), id);
    }
    assert_eq!(
        loads(&app.state),
        before + 1,
        "64 concurrent misses, one load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_pod_is_visible_on_another_within_five_seconds() {
    let app = TestApp::spawn().await;
    let other_pod = AppState::build((*app.state.settings).clone())
        .await
        .unwrap();
    let admin = app.register_admin(&unique_email("admin")).await;
    let id = app.regular_product(&admin.access, 5, "1.00").await;
    // The other pod caches the product in its own process.
    assert_eq!(
        products::find(&other_pod, id)
            .await
            .unwrap()
            .price
            .to_string(),
        "1.00"
    );

    let written = Instant::now();
    let res = app
        .patch_json(
            &format!("/products/{id}"),
            &json!({"price": "2.00"}),
            &admin.access,
        )
        .await;
    assert_eq!(res.status(), 200);
    loop {
        if products::find(&other_pod, id)
            .await
            .unwrap()
            .price
            .to_string()
            == "2.00"
        {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "not visible within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Unknown products are not cached as anything: 404 every time.
    let missing = uuid::Uuid::now_v7();
    assert!(matches!(
        products::find(&other_pod, missing).await,
        Err(products::ProductsError::NotFound)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_sold_by_orders_shows_in_the_cached_product() {
    let app = Arc::new(TestApp::spawn().await);
    let _worker = app.spawn_worker().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let id = app.regular_product(&admin.access, 5, "1.00").await;
    let path = format!("/products/{id}");
    app.get(&path, None).await;
    let buyer = app.mint_token(uuid::Uuid::now_v7());
    let res = app
        .order(
            &buyer,
            "k",
            &json!({"items": [{"product_id": id, "quantity": 2}]}),
        )
        .await;
    let order: Value = res.json().await.unwrap();
    let order: uuid::Uuid = order["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.wait_settled(&buyer, order).await, "paid");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let product: Value = app.get_json(&path, None).await;
        if product["inventory"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sold units never showed: {product}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_catalogue_is_preloaded_for_an_hour() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let sale = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let regular = app.regular_product(&admin.access, 5, "1.00").await;
    for id in [sale, regular] {
        app.redis_del(&format!("product:{}", id.simple())).await;
    }
    assert_eq!(products::preload_hot(&app.state).await.unwrap(), 2);
    for id in [sale, regular] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(app.state.redis.key(format_args!("product:{}", id.simple())))
            .query_async(&mut app.state.redis.conn())
            .await
            .unwrap();
        assert!(ttl > 3_000, "preloaded for an hour, ttl {ttl}");
    }
}
