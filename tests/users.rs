mod common;

use common::{assert_problem, unique_email, TestApp};
use flashsale::infra::db::shard_index;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_land_on_the_shard_their_id_hashes_to() {
    let app = TestApp::spawn().await;
    let mut per_shard = [0usize; 4];
    for i in 0..16 {
        let session = app.register(&unique_email(&format!("shard{i}"))).await;
        let expected = shard_index(session.user_id, 4);
        per_shard[expected] += 1;
        for shard in 0..4 {
            let mut conn = app.shard_conn(shard).await;
            let sql = format!(
                "SELECT count(*) AS n FROM users WHERE id = '{}'",
                session.user_id
            );
            let found = app.count(&mut conn, &sql).await;
            assert_eq!(
                found,
                i64::from(shard == expected),
                "user {} on shard {shard}",
                session.user_id
            );
        }
    }
    // 16 users over 4 shards: a stable hash spreads them (all on one shard would be a bug).
    assert!(
        per_shard.iter().filter(|n| **n > 0).count() >= 2,
        "{per_shard:?}"
    );
    // The mapping is stable: fixed ids always map to the same shard.
    let fixed = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    assert_eq!(shard_index(fixed, 4), shard_index(fixed, 4));
    assert!(shard_index(fixed, 4) < 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_reads_and_partial_updates_see_every_write() {
    let app = TestApp::spawn().await;
    let me = app.register(&unique_email("profile")).await;
    let path = format!("/users/{}", me.user_id);

    let profile: Value = app.get_json(&path, Some(&me.access)).await;
    assert_eq!(profile["email"], me.email);
    assert!(
        app.redis_exists(&format!("{{u:{}}}:profile", me.user_id.simple()))
            .await,
        "read fills the cache"
    );

    let res = app
        .put_json(&path, &json!({"full_name": "Grace Hopper"}), &me.access)
        .await;
    assert_eq!(res.status(), 200);
    assert!(
        !app.redis_exists(&format!("{{u:{}}}:profile", me.user_id.simple()))
            .await,
        "write invalidates"
    );
    let res = app
        .put_json(&path, &json!({"phone": "+1 555 0100"}), &me.access)
        .await;
    assert_eq!(res.status(), 200);

    let profile: Value = app.get_json(&path, Some(&me.access)).await;
    assert_eq!(
        profile["full_name"], "Grace Hopper",
        "omitted fields are unchanged"
    );
    assert_eq!(profile["phone"], "+1 555 0100");
    assert_ne!(profile["updated_at"], profile["created_at"]);
    // Served from the cache now, still the latest.
    let again: Value = app.get_json(&path, Some(&me.access)).await;
    assert_eq!(again, profile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_a_replica_except_right_after_a_write() {
    let app = TestApp::builder().lagging_replicas().spawn().await;
    let me = app.register(&unique_email("ryw")).await;
    let path = format!("/users/{}", me.user_id);

    // Just registered: the read goes to the primary and finds the user.
    let res = app.get(&path, Some(&me.access)).await;
    assert_eq!(res.status(), 200);

    // Once the read-your-writes window has passed (and the cache is cold), reads go to the
    // replica, which in this test never receives writes.
    app.redis_del(&format!("{{u:{}}}:wrote", me.user_id.simple()))
        .await;
    app.redis_del(&format!("{{u:{}}}:profile", me.user_id.simple()))
        .await;
    assert_problem(app.get(&path, Some(&me.access)).await, 404, "not_found").await;

    // A write sends this user's reads back to the primary, which has the write.
    let res = app
        .put_json(&path, &json!({"full_name": "Fresh"}), &me.access)
        .await;
    assert_eq!(res.status(), 200);
    let profile: Value = app.get_json(&path, Some(&me.access)).await;
    assert_eq!(profile["full_name"], "Fresh");

    let res = app
        .post_json(
            &format!("{path}/addresses"),
            &json!({"line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"}),
            Some(&me.access),
        )
        .await;
    assert_eq!(res.status(), 201);
    let list: Value = app
        .get_json(&format!("{path}/addresses"), Some(&me.access))
        .await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "address list reads its own write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_reads_or_changes_another_users_profile_or_addresses() {
    let app = TestApp::spawn().await;
    let alice = app.register(&unique_email("alice")).await;
    let mallory = app.register(&unique_email("mallory")).await;
    let alice_path = format!("/users/{}", alice.user_id);
    let address =
        json!({"line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"});

    assert_problem(
        app.get(&alice_path, Some(&mallory.access)).await,
        403,
        "forbidden",
    )
    .await;
    let res = app
        .put_json(&alice_path, &json!({"full_name": "pwned"}), &mallory.access)
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .get(&format!("{alice_path}/addresses"), Some(&mallory.access))
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .post_json(
            &format!("{alice_path}/addresses"),
            &address,
            Some(&mallory.access),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    assert_problem(app.get(&alice_path, None).await, 401, "unauthorized").await;

    // Nothing changed.
    let profile: Value = app.get_json(&alice_path, Some(&alice.access)).await;
    assert!(profile["full_name"].is_null());
    let list: Value = app
        .get_json(&format!("{alice_path}/addresses"), Some(&alice.access))
        .await;
    assert_eq!(list["items"], json!([]));

    // An admin may.
    let admin = app.register_admin(&unique_email("admin")).await;
    assert_eq!(
        app.get(&alice_path, Some(&admin.access)).await.status(),
        200
    );
    // An unknown user is 404 for an admin.
    let ghost = format!("/users/{}", uuid::Uuid::now_v7());
    assert_problem(app.get(&ghost, Some(&admin.access)).await, 404, "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_paginate_keep_one_default_and_are_capped() {
    let app = TestApp::builder()
        .configure(|s| s.users.max_addresses = 5)
        .spawn()
        .await;
    let me = app.register(&unique_email("addr")).await;
    let path = format!("/users/{}/addresses", me.user_id);
    for i in 0..5 {
        let body = json!({"line1": format!("{i} Main St"), "city": "Berlin", "postal_code": "10115",
                          "country": "DE", "is_default": i == 3});
        let res = app.post_json(&path, &body, Some(&me.access)).await;
        assert_eq!(res.status(), 201);
    }
    let body =
        json!({"line1": "6 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"});
    let res = app.post_json(&path, &body, Some(&me.access)).await;
    assert_problem(res, 422, "validation_failed").await;

    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?limit=2&cursor={c}"),
            None => format!("{path}?limit=2"),
        };
        let page: Value = app.get_json(&url, Some(&me.access)).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item.clone());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let lines: Vec<&str> = seen.iter().map(|a| a["line1"].as_str().unwrap()).collect();
    assert_eq!(
        lines,
        [
            "0 Main St",
            "1 Main St",
            "2 Main St",
            "3 Main St",
            "4 Main St"
        ]
    );
    let defaults: Vec<&str> = seen
        .iter()
        .filter(|a| a["is_default"] == true)
        .map(|a| a["line1"].as_str().unwrap())
        .collect();
    assert_eq!(defaults, ["3 Main St"]);
}
