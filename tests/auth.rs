mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{assert_problem, unique_email, TestApp, PASSWORD};
use flashsale::modules::auth::{AccessClaims, TokenKeys};
use flashsale::modules::users::Role;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_refresh_verify_logout() {
    let app = TestApp::spawn().await;
    let email = unique_email("happy");
    let res = app
        .post_json(
            "/auth/register",
            &json!({"email": email, "password": PASSWORD, "full_name": "Ada Lovelace", "phone": "+44 20 7946 0000"}),
            None,
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["user"]["email"], email);
    assert_eq!(body["user"]["full_name"], "Ada Lovelace");
    assert_eq!(body["user"]["role"], "customer");

    let session = app.login(&email).await;
    let verify: Value = app.get_json("/auth/verify", Some(&session.access)).await;
    assert_eq!(verify["user_id"], session.user_id.to_string());
    assert_eq!(verify["role"], "customer");
    assert!(verify["exp"].as_i64().unwrap() > chrono::Utc::now().timestamp());

    let res = app.refresh(&session.refresh).await;
    assert_eq!(res.status(), 200);
    let refreshed: Value = res.json().await.unwrap();
    let new_access = refreshed["access_token"].as_str().unwrap().to_owned();
    assert_ne!(refreshed["refresh_token"], session.refresh.as_str());
    assert_eq!(
        app.get("/auth/verify", Some(&new_access)).await.status(),
        200
    );

    let res = app
        .post_json("/auth/logout", &json!({}), Some(&new_access))
        .await;
    assert_eq!(res.status(), 204);
    // The access token is denied and the session's refresh token is revoked.
    let denied = app.get("/auth/verify", Some(&new_access)).await;
    assert_problem(denied, 401, "unauthorized").await;
    let res = app.refresh(&refreshed["refresh_token"]).await;
    assert_problem(res, 401, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_with_another_sessions_refresh_token_revokes_it_too() {
    let app = TestApp::spawn().await;
    let email = unique_email("logout");
    let phone = app.register(&email).await;
    let laptop = app.login(&email).await;
    let res = app
        .post_json(
            "/auth/logout",
            &json!({"refresh_token": laptop.refresh}),
            Some(&phone.access),
        )
        .await;
    assert_eq!(res.status(), 204);
    let res = app.refresh(&laptop.refresh).await;
    assert_problem(res, 401, "unauthorized").await;
    // Revoking the laptop's session also ends its access token.
    let res = app.get("/auth/verify", Some(&laptop.access)).await;
    assert_problem(res, 401, "unauthorized").await;
    // A malformed optional body is refused, not ignored.
    let tablet = app.login(&email).await;
    let res = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&tablet.access)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_request").await;
    assert_eq!(
        app.get("/auth/verify", Some(&tablet.access)).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_email_get_the_same_answer() {
    let app = TestApp::spawn().await;
    let email = unique_email("creds");
    app.register(&email).await;
    let wrong = app
        .post_json(
            "/auth/login",
            &json!({"email": email, "password": "not the password"}),
            None,
        )
        .await;
    let wrong = assert_problem(wrong, 401, "invalid_credentials").await;
    let unknown = app
        .post_json(
            "/auth/login",
            &json!({"email": unique_email("nobody"), "password": PASSWORD}),
            None,
        )
        .await;
    let unknown = assert_problem(unknown, 401, "invalid_credentials").await;
    assert_eq!(wrong, unknown);
    // Email matching ignores case.
    let res = app
        .post_json(
            "/auth/login",
            &json!({"email": email.to_uppercase(), "password": PASSWORD}),
            None,
        )
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_registrations_of_one_email_yield_one_201_and_the_rest_409() {
    let app = TestApp::spawn().await;
    let email = unique_email("race");
    let body = json!({"email": email, "password": PASSWORD});
    let attempts = (0..8).map(|_| app.post_json("/auth/register", &body, None));
    let statuses: Vec<u16> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        7,
        "{statuses:?}"
    );
    // One directory row and one user row, nothing half-written.
    assert_eq!(app.stored_user_rows().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_refresh_token_revokes_the_whole_family() {
    // No grace window: any second use is a stolen token.
    let app = TestApp::spawn_with(|s| s.auth.refresh_grace_secs = 0).await;
    let session = app.register(&unique_email("reuse")).await;
    let first = app.refresh(&session.refresh).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();

    // The stolen old token comes back: refused, and the family dies with it.
    let replay = app.refresh(&session.refresh).await;
    assert_problem(replay, 401, "unauthorized").await;
    let successor = app.refresh(&first["refresh_token"]).await;
    assert_problem(successor, 401, "unauthorized").await;
    let access = first["access_token"].as_str().unwrap();
    assert_problem(
        app.get("/auth/verify", Some(access)).await,
        401,
        "unauthorized",
    )
    .await;
    // Other sessions of the same user are untouched.
    let other = app.login(&session.email).await;
    assert_eq!(
        app.get("/auth/verify", Some(&other.access)).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_retried_within_the_grace_window_gets_the_same_pair() {
    let app = TestApp::spawn().await;
    let session = app.register(&unique_email("retry")).await;
    let refresh = || async {
        let res = app.refresh(&session.refresh).await;
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    // The client lost the first answer and asks again: same pair, session alive.
    let (first, again) = (refresh().await, refresh().await);
    assert_eq!(first["refresh_token"], again["refresh_token"]);
    assert_eq!(first["access_token"], again["access_token"]);
    let access = again["access_token"].as_str().unwrap();
    assert_eq!(app.get("/auth/verify", Some(access)).await.status(), 200);
    let next = app.refresh(&again["refresh_token"]).await;
    assert_eq!(next.status(), 200, "the successor still rotates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_refresh_tokens_are_401() {
    let app = TestApp::spawn().await;
    for token in [
        "",
        "nodot",
        "not-a-uuid.secret",
        &format!("{}.", Uuid::new_v4().simple()),
    ] {
        let res = app.refresh(&token).await;
        assert_problem(res, 401, "unauthorized").await;
    }
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_expired_wrong_key_and_unsigned_tokens_are_401() {
    let app = TestApp::spawn().await;
    let session = app.register(&unique_email("tokens")).await;
    let settings = &app.state.settings.auth;
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64| AccessClaims {
        sub: session.user_id,
        role: Role::Admin,
        jti: Uuid::new_v4(),
        sid: Uuid::new_v4(),
        iat: now - 1000,
        exp,
    };

    // Signed with the right key but expired.
    let expired = app.state.auth.keys.sign(&claims(now - 1)).unwrap();
    // Same kid, different secret.
    let mut wrong = settings.clone();
    wrong.keys.insert(wrong.active_kid.clone(), "x".repeat(48));
    let wrong_key = TokenKeys::new(&wrong)
        .unwrap()
        .sign(&claims(now + 600))
        .unwrap();
    // A kid nobody knows.
    let mut unknown = settings.clone();
    unknown.keys.insert("ghost".into(), "y".repeat(48));
    unknown.active_kid = "ghost".into();
    let unknown_kid = TokenKeys::new(&unknown)
        .unwrap()
        .sign(&claims(now + 600))
        .unwrap();
    // The real token with its payload edited to claim admin.
    let parts: Vec<&str> = session.access.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["role"] = json!("admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&payload), parts[2]);
    // alg: none with no signature.
    let none_header = json!({"alg": "none", "typ": "JWT", "kid": settings.active_kid});
    let unsigned = format!("{}.{}.", b64(&none_header), b64(&payload));
    // HS512 header over a valid HS256 signature.
    let hs512_header = json!({"alg": "HS512", "typ": "JWT", "kid": settings.active_kid});
    let wrong_alg = format!("{}.{}.{}", b64(&hs512_header), parts[1], parts[2]);

    for (name, token) in [
        ("expired", expired),
        ("wrong key", wrong_key),
        ("unknown kid", unknown_kid),
        ("tampered", tampered),
        ("alg none", unsigned),
        ("wrong alg", wrong_alg),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let res = app.get("/auth/verify", Some(&token)).await;
        assert_eq!(res.status(), 401, "{name}");
        let res = app
            .get(&format!("/users/{}", session.user_id), Some(&token))
            .await;
        assert_eq!(res.status(), 401, "{name} on /users");
    }
    let res = app.get("/auth/verify", None).await;
    assert_problem(res, 401, "unauthorized").await;
    let res = app
        .client
        .get(app.url("/auth/verify"))
        .header("authorization", format!("Basic {}", session.access))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_keep_old_tokens_valid_until_the_old_key_is_dropped() {
    let app = TestApp::spawn().await;
    let session = app.register(&unique_email("rotate")).await;
    let mut rotated = app.state.settings.auth.clone();
    rotated.keys.insert("next".into(), "z".repeat(48));
    rotated.active_kid = "next".into();
    let keys = TokenKeys::new(&rotated).unwrap();
    // The new key set still verifies tokens signed before the rotation...
    assert_eq!(keys.verify(&session.access).unwrap().sub, session.user_id);
    // ...and once the old key is dropped, they stop verifying.
    rotated.keys.remove(&app.state.settings.auth.active_kid);
    assert!(TokenKeys::new(&rotated)
        .unwrap()
        .verify(&session.access)
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_grant_applies_at_the_next_refresh() {
    let app = TestApp::spawn().await;
    let other = app.register(&unique_email("other")).await;
    let boss = app.register(&unique_email("boss")).await;
    let other_profile = format!("/users/{}", other.user_id);
    assert_eq!(
        app.get(&other_profile, Some(&boss.access)).await.status(),
        403
    );

    flashsale::modules::auth::grant_admin(&app.state, &boss.email)
        .await
        .unwrap();
    let res = app.refresh(&boss.refresh).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["user"]["role"], "admin");
    let admin_access = body["access_token"].as_str().unwrap();
    assert_eq!(
        app.get(&other_profile, Some(admin_access)).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_routes_are_limited_per_ip_with_retry_after() {
    let app = TestApp::builder()
        .configure(|s| s.rate_limit.auth_per_ip_per_minute = 3)
        .spawn()
        .await;
    let body = json!({"email": unique_email("limited"), "password": PASSWORD});
    for _ in 0..3 {
        let res = app.post_json("/auth/login", &body, None).await;
        assert_eq!(res.status(), 401);
    }
    let res = app.post_json("/auth/login", &body, None).await;
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
    assert_problem(res, 429, "rate_limited").await;
    let res = app.post_json("/auth/register", &body, None).await;
    assert_problem(res, 429, "rate_limited").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_requests_are_limited_per_user_but_admins_are_exempt() {
    let app = TestApp::builder()
        .configure(|s| s.rate_limit.user_per_minute = 3)
        .spawn()
        .await;
    let user = app.register(&unique_email("busy")).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let mut statuses = vec![];
    for _ in 0..4 {
        statuses.push(
            app.get("/auth/verify", Some(&user.access))
                .await
                .status()
                .as_u16(),
        );
    }
    // The 4th may land in a fresh minute window; then the 5th is over the limit anyway.
    if statuses[3] != 429 {
        for _ in 0..3 {
            statuses.push(
                app.get("/auth/verify", Some(&user.access))
                    .await
                    .status()
                    .as_u16(),
            );
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    for _ in 0..6 {
        assert_eq!(
            app.get("/auth/verify", Some(&admin.access)).await.status(),
            200
        );
    }
}
