//! Every bad input gets a clear 4xx problem body, never a 5xx, and nothing is written.

mod common;

use common::{assert_problem, unique_email, TestApp, PASSWORD};
use serde_json::{json, Value};

async fn post_raw(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_rejects_bad_bodies_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let email = unique_email("bad");
    let json_type = "application/json";
    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"email\": ".into(),
            json_type,
            400,
            "invalid_request",
        ),
        (
            "not an object",
            "[1,2,3]".into(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "wrong type",
            json!({"email": email, "password": 12345678}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "missing field",
            json!({"email": email}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "unknown field",
            json!({"email": email, "password": PASSWORD, "role": "admin"}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "invalid email",
            json!({"email": "not-an-email", "password": PASSWORD}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "email without domain dot",
            json!({"email": "a@localhost", "password": PASSWORD}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "short password",
            json!({"email": email, "password": "short"}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "long password",
            json!({"email": email, "password": "p".repeat(129)}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "empty name",
            json!({"email": email, "password": PASSWORD, "full_name": "  "}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "bad phone",
            json!({"email": email, "password": PASSWORD, "phone": "call me"}).to_string(),
            json_type,
            422,
            "validation_failed",
        ),
        (
            "wrong content type",
            json!({"email": email, "password": PASSWORD}).to_string(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "huge body",
            format!("{{\"email\": \"{}\"}}", "a".repeat(70 * 1024)),
            json_type,
            413,
            "payload_too_large",
        ),
    ];
    for (name, body, content_type, status, code) in cases {
        let res = post_raw(&app, "/auth/register", content_type, body).await;
        assert_eq!(res.status().as_u16(), status, "{name}");
        assert_problem(res, status, code).await;
    }
    assert_eq!(app.stored_user_rows().await, 0, "nothing written");

    // Password length counts characters, not bytes: 128 four-byte characters are fine.
    let res = app
        .post_json(
            "/auth/register",
            &json!({"email": email, "password": "🔑".repeat(128)}),
            None,
        )
        .await;
    assert_eq!(res.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_routes_reject_bad_ids_bodies_and_pages_without_side_effects() {
    let app = TestApp::spawn().await;
    let me = app.register(&unique_email("input")).await;
    let path = format!("/users/{}", me.user_id);

    for bad_id in [
        "not-a-uuid",
        "123",
        "%00",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        let res = app.get(&format!("/users/{bad_id}"), Some(&me.access)).await;
        assert_problem(res, 400, "invalid_request").await;
        let res = app
            .get(&format!("/users/{bad_id}/addresses"), Some(&me.access))
            .await;
        assert_problem(res, 400, "invalid_request").await;
    }
    for query in [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "cursor=%%%",
        "cursor=AAAA",
        "color=red",
    ] {
        let res = app
            .get(&format!("{path}/addresses?{query}"), Some(&me.access))
            .await;
        assert_problem(res, 400, "invalid_request").await;
    }
    let bad_updates = [
        (json!({"email": "new@example.com"}), "unknown field"),
        (json!({"full_name": 42}), "wrong type"),
        (json!({"full_name": "x".repeat(201)}), "name too long"),
        (json!({"phone": "<script>"}), "bad phone"),
    ];
    for (body, name) in bad_updates {
        let res = app.put_json(&path, &body, &me.access).await;
        assert_eq!(res.status(), 422, "{name}");
    }
    let bad_addresses = [
        json!({"line1": "", "city": "Berlin", "postal_code": "10115", "country": "DE"}),
        json!({"line1": "1 Main", "city": "Berlin", "postal_code": "10115", "country": "Germany"}),
        json!({"line1": "1 Main", "city": "Berlin", "country": "DE"}),
        json!({"line1": "1 Main", "city": "Berlin", "postal_code": "10115", "country": "DE", "x": 1}),
    ];
    for body in bad_addresses {
        let res = app
            .post_json(&format!("{path}/addresses"), &body, Some(&me.access))
            .await;
        assert_problem(res, 422, "validation_failed").await;
    }
    let res = post_raw(
        &app,
        &format!("{path}/addresses"),
        "application/json",
        "{oops",
    )
    .await;
    // No token on that raw request: authentication is checked before the body.
    assert_eq!(res.status(), 401);
    let res = app
        .client
        .put(app.url(&path))
        .bearer_auth(&me.access)
        .header("content-type", "application/json")
        .body(format!("{{\"full_name\": \"{}\"}}", "n".repeat(70 * 1024)))
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "payload_too_large").await;

    // Nothing changed.
    let profile: Value = app.get_json(&path, Some(&me.access)).await;
    assert!(profile["full_name"].is_null() && profile["phone"].is_null());
    let list: Value = app
        .get_json(&format!("{path}/addresses"), Some(&me.access))
        .await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_problem_bodies() {
    let app = TestApp::spawn().await;
    assert_problem(app.get("/nope", None).await, 404, "not_found").await;
    let res = app
        .client
        .delete(app.url("/auth/login"))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_client_error(), "{}", res.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_that_take_json_refuse_other_content_types_even_with_an_optional_body() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let token = app.mint_token(uuid::Uuid::now_v7());
    let path = format!("/orders/flash-sale/{product}");
    for (content_type, body) in [
        ("text/plain", "{}"),
        ("text/plain", ""),
        ("application/xml", "<a/>"),
    ] {
        let res = app
            .client
            .post(app.url(&path))
            .bearer_auth(&token)
            .header(
                "idempotency-key",
                format!("k-{content_type}-{}", body.len()),
            )
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_problem(res, 415, "unsupported_media_type").await;
    }
    assert_eq!(app.remaining(product).await, 5, "nothing reserved");
    let res = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&admin.access)
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_problem(res, 415, "unsupported_media_type").await;
    // JSON, or no body and no type, still works.
    let res = app
        .client
        .post(app.url(&path))
        .bearer_auth(&token)
        .header("idempotency-key", "json")
        .header("content-type", "application/json; charset=utf-8")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}
