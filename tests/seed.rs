mod common;

use common::TestApp;
use flashsale::seed::{seed_email, seed_product_id, seed_products, seed_users, SEED_PASSWORD};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_is_repeatable_and_seeded_data_is_usable() {
    let app = TestApp::spawn().await;
    assert_eq!(seed_users(&app.state, 30, |_| {}).await.unwrap(), 30);
    assert_eq!(
        seed_users(&app.state, 30, |_| {}).await.unwrap(),
        0,
        "a rerun adds nothing"
    );
    let res = app
        .post_json(
            "/auth/login",
            &json!({"email": seed_email(7), "password": SEED_PASSWORD}),
            None,
        )
        .await;
    assert_eq!(res.status(), 200);

    assert_eq!(
        seed_products(&app.state, 9_000, 3, |_| {}).await.unwrap(),
        9_000
    );
    assert_eq!(
        seed_products(&app.state, 9_000, 3, |_| {}).await.unwrap(),
        0
    );
    let product: Value = app
        .get_json(&format!("/products/{}", seed_product_id(8_999)), None)
        .await;
    assert!(product["name"].as_str().unwrap().ends_with("8999"));
    let sales: Value = app.get_json("/products/flash-sale", None).await;
    let items = sales["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items
        .iter()
        .all(|i| i["sale_status"] == "active" && i["remaining"].as_i64().unwrap() >= 100));
}
