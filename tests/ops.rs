mod common;

use common::TestApp;
use diesel_async::SimpleAsyncConnection;
use flashsale::infra::db::{shard_index, split_database_url};
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/health", None).await.status(), 200);
    // Ready once the indexer's first pass has read the (empty) catalogue.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let res = loop {
        let res = app.get("/ready", None).await;
        if res.status() == 200 || std::time::Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["search"], "ok");
    assert_eq!(body["postgres"], "ok");
    assert_eq!(body["redis"], "ok");
    assert_eq!(body["rabbitmq"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_openapi_document_and_docs_are_served() {
    let app = TestApp::spawn().await;
    let doc: Value = app.get_json("/openapi.json", None).await;
    let expected = [
        ("/health", "get"),
        ("/ready", "get"),
        ("/auth/register", "post"),
        ("/auth/login", "post"),
        ("/auth/refresh", "post"),
        ("/auth/logout", "post"),
        ("/auth/verify", "get"),
        ("/users/{id}", "get"),
        ("/users/{id}", "put"),
        ("/users/{id}/addresses", "get"),
        ("/users/{id}/addresses", "post"),
        ("/products", "get"),
        ("/products", "post"),
        ("/products/flash-sale", "get"),
        ("/products/search", "get"),
        ("/products/{id}", "get"),
        ("/products/{id}", "patch"),
        ("/products/{id}/inventory", "put"),
        ("/orders", "post"),
        ("/orders/flash-sale/{product_id}", "post"),
        ("/orders/flash-sale/{product_id}/queue", "get"),
        ("/orders/flash-sale/{product_id}/queue/events", "get"),
        ("/orders/user/{user_id}", "get"),
        ("/orders/{id}", "get"),
        ("/orders/{id}/status", "get"),
        ("/orders/{id}/events", "get"),
        ("/orders/{id}/status", "put"),
        ("/orders/{id}/cancel", "put"),
        ("/notifications/send", "post"),
        ("/notifications/user/{user_id}", "get"),
    ];
    for (path, method) in expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from OpenAPI"
        );
    }
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|ops| ops.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        expected.len(),
        "a documented route the test does not know"
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let res = app.get("/docs/", None).await;
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("swagger"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_minted() {
    let app = TestApp::spawn().await;
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-me-123");
    let res = app.get("/health", None).await;
    let minted = res.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::try_parse(minted).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_down_keeps_the_pod_ready_and_answers_503_for_its_users_only() {
    let app = TestApp::spawn().await;
    let down = 1;
    let (_, shard_db) =
        split_database_url(&app.state.settings.database.shards[down].primary).unwrap();
    let mut global = app.global_conn().await;
    global
        .batch_execute(&format!(
            "ALTER DATABASE \"{shard_db}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{shard_db}'"
        ))
        .await
        .unwrap();
    let res = app.get("/ready", None).await;
    assert_eq!(res.status(), 200, "the pod still serves");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["shards"][down], "unavailable", "{body}");
    assert_eq!(body["shards"][0], "ok", "{body}");
    assert_eq!(app.get("/products", None).await.status(), 200);

    let user_on = |shard: usize| loop {
        let user = Uuid::now_v7();
        if shard_index(user, app.state.db.shard_count()) == shard {
            break user;
        }
    };
    for (shard, expected) in [(down, 503), (0, 200)] {
        let user = user_on(shard);
        let token = app.mint_token(user);
        let res = app.get(&format!("/orders/user/{user}"), Some(&token)).await;
        assert_eq!(res.status(), expected, "a user on shard {shard}");
    }
    global
        .batch_execute(&format!(
            "ALTER DATABASE \"{shard_db}\" ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_kept_off_the_api_port() {
    let app = TestApp::spawn_with(|s| s.http.metrics_on_api_port = false).await;
    assert_eq!(app.get("/metrics", None).await.status(), 404);
    assert_eq!(app.get("/health", None).await.status(), 200);
}
