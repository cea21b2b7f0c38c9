mod common;

use common::{assert_problem, unique_email, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

fn product_body(name: &str, price: &str, inventory: i64) -> Value {
    json!({"name": name, "description": "a thing", "price": price, "inventory": inventory})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_write_the_catalogue_and_bad_products_are_422() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let customer = app.register(&unique_email("customer")).await;

    let res = app
        .post_json(
            "/products",
            &product_body("Lamp", "19.99", 5),
            Some(&customer.access),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .post_json("/products", &product_body("Lamp", "19.99", 5), None)
        .await;
    assert_problem(res, 401, "unauthorized").await;

    let res = app
        .post_json(
            "/products",
            &product_body("Lamp", "19.99", 5),
            Some(&admin.access),
        )
        .await;
    assert_eq!(res.status(), 201);
    let lamp: Value = res.json().await.unwrap();
    assert_eq!(lamp["price"], "19.99");
    assert_eq!(lamp["is_flash_sale"], false);
    let id = lamp["id"].as_str().unwrap();

    let bad = [
        product_body("", "1.00", 1),
        product_body("x", "-1.00", 1),
        product_body("x", "1.001", 1),
        product_body("x", "1.00", -5),
        json!({"name": "x", "price": "1.00", "inventory": 1, "colour": "red"}),
        json!({"name": "x", "price": "1.00", "inventory": 1, "is_flash_sale": true}),
        json!({"name": "x", "price": "1.00", "inventory": 1, "is_flash_sale": true, "flash_sale_price": "0.50",
               "flash_sale_start": "2030-01-02T00:00:00Z", "flash_sale_end": "2030-01-01T00:00:00Z"}),
        json!({"name": "x", "price": "abc", "inventory": 1}),
    ];
    for body in bad {
        let res = app.post_json("/products", &body, Some(&admin.access)).await;
        assert_eq!(res.status(), 422, "{body}");
    }

    let path = format!("/products/{id}");
    let res = app
        .patch_json(&path, &json!({"price": "1.00"}), &customer.access)
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .put_json(
            &format!("{path}/inventory"),
            &json!({"inventory": 0}),
            &customer.access,
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .patch_json(&path, &json!({"name": ""}), &admin.access)
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .put_json(
            &format!("{path}/inventory"),
            &json!({"inventory": -1}),
            &admin.access,
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;

    // Nothing changed.
    let lamp_now: Value = app.get_json(&path, None).await;
    assert_eq!(lamp_now["name"], "Lamp");
    assert_eq!(lamp_now["price"], "19.99");
    assert_eq!(lamp_now["inventory"], 5);
    assert_problem(
        app.get(&format!("/products/{}", Uuid::now_v7()), None)
            .await,
        404,
        "not_found",
    )
    .await;
    assert_problem(
        app.get("/products/not-a-uuid", None).await,
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_without_gaps_and_filters() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let category = Uuid::now_v7();
    for i in 0..7 {
        let mut body = product_body(&format!("P{i}"), &format!("{}.00", i + 1), 1);
        if i % 2 == 0 {
            body["category_id"] = json!(category);
        }
        assert_eq!(
            app.post_json("/products", &body, Some(&admin.access))
                .await
                .status(),
            201
        );
    }
    let mut names = vec![];
    let mut url = "/products?limit=3".to_owned();
    loop {
        let page: Value = app.get_json(&url, None).await;
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => url = format!("/products?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(names, ["P0", "P1", "P2", "P3", "P4", "P5", "P6"]);

    let page: Value = app
        .get_json(
            &format!("/products?category_id={category}&min_price=2&max_price=5.5"),
            None,
        )
        .await;
    let filtered: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(filtered, ["P2", "P4"]);

    for query in [
        "limit=0",
        "limit=1000",
        "cursor=zzz",
        "category_id=nope",
        "sort=name",
    ] {
        assert_problem(
            app.get(&format!("/products?{query}"), None).await,
            400,
            "invalid_request",
        )
        .await;
    }
    // Prices a price column cannot hold are refused before they cost a parse of a huge
    // number or reach the database.
    for price in [
        "-1",
        "1e-70000",
        "1e131000",
        "1.234",
        "12345678901",
        "abc",
        "1000000000000000000000000000000000000000",
    ] {
        assert_problem(
            app.get(&format!("/products?min_price={price}"), None).await,
            400,
            "validation_failed",
        )
        .await;
    }
    let res = app.get("/products?max_price=9999999999.99", None).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_a_sale_makes_it_buyable_and_inventory_changes_respect_reservations() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let res = app
        .post_json(
            "/products",
            &product_body("Phone", "500.00", 3),
            Some(&admin.access),
        )
        .await;
    let phone: Value = res.json().await.unwrap();
    let id: Uuid = phone["id"].as_str().unwrap().parse().unwrap();
    let buyer = app.mint_token(Uuid::now_v7());
    assert_problem(
        app.buy(&buyer, id, "early", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;

    let now = chrono::Utc::now();
    let patch = json!({"flash_sale_price": "399.00", "flash_sale_start": now - chrono::Duration::seconds(1),
                       "flash_sale_end": now + chrono::Duration::hours(1)});
    let res = app
        .patch_json(&format!("/products/{id}"), &patch, &admin.access)
        .await;
    assert_eq!(res.status(), 200);
    let patched: Value = res.json().await.unwrap();
    assert_eq!(patched["is_flash_sale"], true);

    // Buyable as soon as the PATCH returned.
    let res = app.buy(&buyer, id, "now", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    assert_eq!(order["total_amount"], "399.00");
    assert_eq!(app.remaining(id).await, 2);
    let list: Value = app.get_json("/products/flash-sale", None).await;
    assert_eq!(list["items"][0]["sale_status"], "active");

    // One unit is reserved (not yet persisted): inventory may not drop below it.
    let path = format!("/products/{id}/inventory");
    let inventory = |n: i64| {
        let body = json!({"inventory": n});
        let (app, path, token) = (&app, &path, &admin.access);
        async move { app.put_json(path, &body, token).await }
    };
    assert_problem(inventory(0).await, 409, "inventory_below_reserved").await;
    assert_eq!(app.remaining(id).await, 2);
    assert_eq!(inventory(1).await.status(), 200);
    assert_eq!(app.remaining(id).await, 0);
    assert_eq!(inventory(10).await.status(), 200);
    assert_eq!(app.remaining(id).await, 9);

    // Unscheduling ends the sale at once.
    let res = app
        .patch_json(
            &format!("/products/{id}"),
            &json!({"is_flash_sale": false}),
            &admin.access,
        )
        .await;
    assert_eq!(res.status(), 200);
    let other = app.mint_token(Uuid::now_v7());
    assert_problem(
        app.buy(&other, id, "late", &json!({})).await,
        409,
        "sale_not_active",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_products_are_inserted_skips_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    flashsale::seed::seed_products(&app.state, 50, 0, |_| {})
        .await
        .unwrap();
    let existing: std::collections::BTreeSet<String> = (0..50)
        .map(|i| flashsale::seed::seed_product_id(i).to_string())
        .collect();

    let mut seen = vec![];
    let mut url = "/products?limit=7".to_owned();
    for page in 0.. {
        // A write lands between every two pages.
        let body = product_body(&format!("Inserted {page}"), "1.00", 1);
        assert_eq!(
            app.post_json("/products", &body, Some(&admin.access))
                .await
                .status(),
            201
        );
        let listed: Value = app.get_json(&url, None).await;
        seen.extend(
            listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match listed["next_cursor"].as_str() {
            Some(cursor) => url = format!("/products?limit=7&cursor={cursor}"),
            None => break,
        }
    }
    let unique: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no product twice");
    assert!(
        existing.iter().all(|id| unique.contains(id)),
        "every product that existed is listed"
    );
}

/// A rename that races a sale must not write its stale `inventory` back: the test holds the
/// product's row lock, lets the PATCH read the row and block on its UPDATE, sells three units
/// meanwhile (a relative update, as the worker's ledger does), then lets the PATCH go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_racing_a_sale_never_writes_inventory_back() {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.regular_product(&admin.access, 10, "5.00").await;

    let mut seller = app.global_conn().await;
    let mut watcher = app.global_conn().await;
    let request = app
        .client
        .patch(app.url(&format!("/products/{product}")))
        .bearer_auth(&admin.access)
        .json(&json!({"name": "Renamed"}))
        .send();
    let patch = seller
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            diesel::sql_query(format!(
                "SELECT id FROM products WHERE id = '{product}' FOR UPDATE"
            ))
            .execute(conn)
            .await?;
            // Sent only once the row is locked: it must wait for the sale.
            let patch = tokio::spawn(request);
            let waiting = "SELECT count(*) AS n FROM pg_stat_activity \
                           WHERE datname = current_database() AND wait_event_type = 'Lock'";
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while app.count(&mut watcher, waiting).await == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the PATCH never waited"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            diesel::sql_query(format!(
                "UPDATE products SET inventory = inventory - 3 WHERE id = '{product}'"
            ))
            .execute(conn)
            .await?;
            Ok(patch)
        })
        .await
        .expect("the seller's transaction");
    let res = patch.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["name"], "Renamed");
    assert_eq!(
        app.inventory(product).await,
        7,
        "the PATCH wrote a stale count back"
    );
}
