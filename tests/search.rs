//! Product search: words, prefixes and typos find products; edits become searchable
//! within the consistency window; bad queries are 400.

mod common;

use std::time::{Duration, Instant};

use common::{assert_problem, unique_email, TestApp};
use serde_json::{json, Value};

/// Names of the products a search returns, polling until `expect` is among them (the
/// indexer refreshes in the background) or 5 s pass.
async fn search_until(app: &TestApp, query: &str, expect: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = app.get(&format!("/products/search?q={query}"), None).await;
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.unwrap();
        let names: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        if names.iter().any(|n| n == expect) || Instant::now() > deadline {
            return names;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words_prefixes_and_typos_find_products_and_edits_show_within_five_seconds() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    for (name, description) in [
        ("Wireless Headphones", "noise cancelling over-ear"),
        ("Coffee Grinder", "burr grinder for espresso"),
        ("Desk Lamp", "warm light"),
    ] {
        let body =
            json!({"name": name, "description": description, "price": "10.00", "inventory": 1});
        assert_eq!(
            app.post_json("/products", &body, Some(&admin.access))
                .await
                .status(),
            201
        );
    }
    let by_word = search_until(&app, "headphones", "Wireless Headphones").await;
    assert_eq!(by_word, ["Wireless Headphones"]);
    assert!(search_until(&app, "headph", "Wireless Headphones")
        .await
        .contains(&"Wireless Headphones".to_owned()));
    assert!(search_until(&app, "headphonez", "Wireless Headphones")
        .await
        .contains(&"Wireless Headphones".to_owned()));
    assert!(search_until(&app, "espresso", "Coffee Grinder")
        .await
        .contains(&"Coffee Grinder".to_owned()));
    let top = search_until(&app, "lamp", "Desk Lamp").await;
    assert_eq!(top.first().map(String::as_str), Some("Desk Lamp"));

    // An edit is searchable within the 5 s window.
    let list: Value = app.get_json("/products?limit=100", None).await;
    let lamp = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Desk Lamp")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let edited = Instant::now();
    let res = app
        .patch_json(
            &format!("/products/{lamp}"),
            &json!({"name": "Quantum Kettle"}),
            &admin.access,
        )
        .await;
    assert_eq!(res.status(), 200);
    let found = search_until(&app, "kettle", "Quantum Kettle").await;
    assert!(found.contains(&"Quantum Kettle".to_owned()), "{found:?}");
    assert!(edited.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_and_rejects_bad_queries() {
    let app = TestApp::spawn().await;
    flashsale::seed::seed_products(&app.state, 30, 0, |_| {})
        .await
        .unwrap();
    // 30 seeded products share the words of their generated names; page through one word.
    let deadline = Instant::now() + Duration::from_secs(5);
    let first: Value = loop {
        let page: Value = app
            .get_json("/products/search?q=seeded&limit=10", None)
            .await;
        if page["next_cursor"].is_string() || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second: Value = app
        .get_json(
            &format!("/products/search?q=seeded&limit=10&cursor={cursor}"),
            None,
        )
        .await;
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a, b) = (ids(&first), ids(&second));
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    assert!(a.iter().all(|id| !b.contains(id)), "pages do not overlap");

    for query in [
        "",
        "q=",
        &format!("q={}", "x".repeat(201)),
        "q=lamp&limit=0",
        "q=lamp&limit=500",
        "q=lamp&cursor=zzz",
        "q=lamp&sort=price",
    ] {
        assert_problem(
            app.get(&format!("/products/search?{query}"), None).await,
            400,
            "invalid_request",
        )
        .await;
    }
    // Query syntax is forgiving: stray operators are not errors.
    assert_eq!(
        app.get("/products/search?q=%22unbalanced%20AND%20(", None)
            .await
            .status(),
        200
    );
}
