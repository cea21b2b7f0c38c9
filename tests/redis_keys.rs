//! Every Redis key expires: a whole scenario (sessions, catalogue, flash-sale and regular
//! orders, a cancel, notifications, the reconciler and auditor, a lost sale rebuilt, the
//! waiting room) runs under this test's prefix, then every key under it must carry a TTL.

mod common;

use common::{unique_email, TestApp};
use flashsale::modules::{orders, products};
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_lives_forever() {
    let app = TestApp::spawn_with(|s| {
        s.orders.reservation_timeout_secs = 0;
        s.orders.admission.min_backlog = 1;
        s.orders.admission.max_settle_secs = 0.0;
    })
    .await;
    // This test releases at once by hand; its worker's own reconciler waits the default.
    let default_timeout = common::test_settings().orders.reservation_timeout_secs;
    let _worker = app
        .spawn_worker_with(|s| s.orders.reservation_timeout_secs = default_timeout)
        .await;
    let _notifier = app.spawn_notify_worker().await;

    // Sessions: register, log in, refresh, log out.
    let buyer = app.register(&unique_email("buyer")).await;
    let again = app.login(&buyer.email).await;
    let res = app.refresh(&again.refresh).await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_json("/auth/logout", &json!({}), Some(&buyer.access))
        .await;
    assert_eq!(res.status(), 204);

    // Catalogue reads, a flash sale and a regular product, orders of both, and a cancel.
    let admin = app.register_admin(&unique_email("admin")).await;
    let sale = app.flash_sale_product(&admin.access, 20, "1.00").await;
    let regular = app.regular_product(&admin.access, 20, "2.00").await;
    app.get(&format!("/products/{sale}"), None).await;
    app.get("/products/flash-sale", None).await;
    let (session, order, status) = app.buy_and_settle(sale, "card").await;
    assert_eq!(status, "paid");
    assert_eq!(app.cancel(&session.access, order).await.status(), 200);
    let res = app
        .order(
            &session.access,
            "regular",
            &json!({"items": [{"product_id": regular, "quantity": 2}]}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let placed: Value = res.json().await.unwrap();
    let placed: Uuid = placed["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.wait_settled(&session.access, placed).await, "paid");

    // A request that died after reserving, released by the reconciler; an audit pass.
    app.reserve_unpublished(sale, Uuid::now_v7(), Uuid::now_v7(), "h", "d")
        .await;
    orders::reconcile_once(&app.state).await.unwrap();
    products::audit_once(&app.state).await.unwrap();

    // Redis loses the sale; it is rebuilt and sells again (records made after a rebuild).
    app.lose_sale(sale).await;
    common::until("the lost sale to open again", || async {
        let _ = orders::reconcile_once(&app.state).await;
        products::sale_state(&app.state, sale).await.unwrap() == products::SaleState::Open
    })
    .await;
    let (_, _, status) = app.buy_and_settle(sale, "card").await;
    assert_eq!(status, "paid");

    // The waiting room: with a backlog of one, the next buyers take tickets.
    for i in 0..3 {
        let token = app.mint_token(Uuid::now_v7());
        app.buy(&token, sale, &format!("room-{i}"), &json!({}))
            .await;
    }

    let mut cursor = 0u64;
    let mut forever = vec![];
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(app.state.redis.key("*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut app.state.redis.conn())
            .await
            .unwrap();
        for key in keys {
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut app.state.redis.conn())
                .await
                .unwrap();
            if ttl == -1 {
                forever.push(key);
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert!(forever.is_empty(), "keys without a TTL: {forever:?}");
}
