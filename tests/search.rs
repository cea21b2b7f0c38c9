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

/// A new API process starts from the newest snapshot: it searches the snapshot's products at
/// once, reads only what changed after it (not the catalogue), and `/ready` answers 503 until
/// that catch-up has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_restores_the_snapshot_reads_only_later_changes_and_is_ready_once_current() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    use flashsale::app::{self, AppState};
    use flashsale::modules::products;

    let snapshots =
        std::env::temp_dir().join(format!("flashsale-snapshots-{}", uuid::Uuid::now_v7()));
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let create = |name: String| {
        let body = json!({"name": name, "description": "", "price": "1.00", "inventory": 1});
        let (app, token) = (&app, admin.access.clone());
        async move {
            let res = app.post_json("/products", &body, Some(&token)).await;
            assert_eq!(res.status(), 201);
        }
    };
    for i in 0..20 {
        create(format!("Snapshot Teapot {i}")).await;
    }
    search_until(&app, "teapot", "Snapshot Teapot 19").await;
    // Older than the indexer's late-commit window: only a rebuild would read them again.
    let mut global = app.global_conn().await;
    global
        .batch_execute("UPDATE products SET updated_at = updated_at - interval '1 hour'")
        .await
        .unwrap();
    let (_, published) = products::publish_snapshot(&app.state, &snapshots, |_| {})
        .await
        .unwrap();
    assert!(published.is_some());
    create("Late Kettle".to_owned()).await;

    let mut settings = (*app.state.settings).clone();
    settings.search.index_dir =
        std::env::temp_dir().join(format!("flashsale-search-new-{}", uuid::Uuid::now_v7()));
    settings.search.snapshot_dir = Some(snapshots.clone());
    let fresh = AppState::build(settings).await.unwrap();
    let found = products::search(&fresh, "teapot".to_owned(), 50, 0)
        .await
        .unwrap();
    assert_eq!(
        found.len(),
        20,
        "the snapshot's products, before any indexing"
    );
    let caught_up = products::index_changes(&fresh, |_| {}).await.unwrap();
    assert_eq!(caught_up, 1, "only the product created after the snapshot");

    // While the catalogue cannot be read the indexer cannot finish: not ready.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(app::http_server(fresh.clone(), listener).unwrap());
    let mut locker = app.global_conn().await;
    locker.begin_test_transaction().await.unwrap();
    locker
        .batch_execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    products::spawn_indexer(fresh.clone());
    let client = reqwest::Client::new();
    let res = client.get(format!("{address}/ready")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["search"], "catching_up", "{body}");
    drop(locker);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = client.get(format!("{address}/ready")).send().await.unwrap();
        if res.status() == 200 {
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["search"], "ok", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fresh.shutdown.cancel();
    std::fs::remove_dir_all(&snapshots).unwrap();
    std::fs::remove_dir_all(&fresh.settings.search.index_dir).ok();
}
