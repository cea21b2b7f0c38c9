//! Notifications against real RabbitMQ and Redis: the send API and history, priority
//! under a backlog, batch size, provider rate limits, retries, dead-lettering and dedupe.

mod common;

use std::time::Duration;

use common::{assert_problem, unique_email, until, TestApp};
use flashsale::app::AppState;
use flashsale::modules::notifications::{
    self, Channel, DeadNotification, Delivery, Notification, Priority,
};
use lapin::options::BasicGetOptions;
use serde_json::{json, Value};
use uuid::Uuid;

async fn wait_deliveries(worker: &AppState, count: usize) -> Vec<Delivery> {
    until("deliveries", || async {
        worker.notifications.providers.deliveries().len() >= count
    })
    .await;
    worker.notifications.providers.deliveries()
}

fn note(channel: Channel, priority: Priority) -> Notification {
    Notification::new(Uuid::new_v4(), channel, priority, None, "hello".into())
}

/// Queues each notification as its own message, as separate senders would.
async fn enqueue_each(app: &TestApp, notes: &[Notification]) {
    for n in notes {
        notifications::enqueue(&app.state, n.priority, vec![n.clone()])
            .await
            .expect("enqueue");
    }
}

async fn history(app: &TestApp, user: Uuid, token: &str) -> Vec<Value> {
    let body = app
        .get_json(&format!("/notifications/user/{user}"), Some(token))
        .await;
    body["items"].as_array().expect("items").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sends_and_the_user_sees_it_sent_in_their_history() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let user = app.register(&unique_email("user")).await;
    let body = json!({"user_id": user.user_id, "channel": "sms", "priority": "normal",
                      "subject": "Sale soon", "body": "Doors open at noon"});
    let res = app
        .post_json("/notifications/send", &body, Some(&admin.access))
        .await;
    assert_eq!(res.status(), 202);
    let accepted: Value = res.json().await.expect("body");
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_str().expect("id").to_owned();

    let items = history(&app, user.user_id, &user.access).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], id.as_str());
    assert_eq!(items[0]["status"], "queued");
    assert_eq!(items[0]["subject"], "Sale soon");

    let _worker = app.spawn_notify_worker().await;
    until("sent", || async {
        history(&app, user.user_id, &user.access).await[0]["status"] == "sent"
    })
    .await;
    let items = history(&app, user.user_id, &admin.access).await;
    assert!(items[0]["sent_at"].is_string(), "{items:?}");
    assert_eq!(items[0]["channel"], "sms");
    assert_eq!(items[0]["priority"], "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_newest_first_and_is_capped() {
    let app = TestApp::builder()
        .configure(|s| s.notifications.history_cap = 5)
        .spawn()
        .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let user = app.register(&unique_email("user")).await;
    let mut ids = vec![];
    for i in 0..7 {
        let body = json!({"user_id": user.user_id, "channel": "email", "priority": "low", "body": format!("n{i}")});
        let res = app
            .post_json("/notifications/send", &body, Some(&admin.access))
            .await;
        let accepted: Value = res.json().await.expect("body");
        ids.push(accepted["id"].as_str().expect("id").to_owned());
    }
    let path = format!("/notifications/user/{}?limit=3", user.user_id);
    let first = app.get_json(&path, Some(&user.access)).await;
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = app
        .get_json(&format!("{path}&cursor={cursor}"), Some(&user.access))
        .await;
    let seen: Vec<String> = [first, second]
        .iter()
        .flat_map(|page| page["items"].as_array().expect("items").clone())
        .map(|item| item["id"].as_str().expect("id").to_owned())
        .collect();
    let newest_five: Vec<String> = ids.iter().rev().take(5).cloned().collect();
    assert_eq!(seen, newest_five);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_cannot_send_or_read_another_users_notifications() {
    let app = TestApp::spawn().await;
    let alice = app.register(&unique_email("alice")).await;
    let bob = app.register(&unique_email("bob")).await;
    let body =
        json!({"user_id": bob.user_id, "channel": "email", "priority": "high", "body": "hi"});
    let res = app
        .post_json("/notifications/send", &body, Some(&alice.access))
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .get(
            &format!("/notifications/user/{}", bob.user_id),
            Some(&alice.access),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .get(&format!("/notifications/user/{}", bob.user_id), None)
        .await;
    assert_problem(res, 401, "unauthorized").await;
    assert!(history(&app, bob.user_id, &bob.access).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notification_requests_are_4xx_and_queue_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let user = app.register(&unique_email("user")).await;
    let base =
        json!({"user_id": user.user_id, "channel": "email", "priority": "high", "body": "hi"});
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let cases = [
        (with("channel", json!("pigeon")), 422, "validation_failed"),
        (with("priority", json!("urgent")), 422, "validation_failed"),
        (with("body", json!("   ")), 422, "validation_failed"),
        (
            with("body", json!("x".repeat(4001))),
            422,
            "validation_failed",
        ),
        (
            with("subject", json!("s".repeat(201))),
            422,
            "validation_failed",
        ),
        (
            with("user_id", json!("not-a-uuid")),
            422,
            "validation_failed",
        ),
        (with("extra", json!(1)), 422, "validation_failed"),
        (
            with("body", json!("x".repeat(70_000))),
            413,
            "payload_too_large",
        ),
        (with("user_id", json!(Uuid::new_v4())), 404, "not_found"),
    ];
    for (body, status, code) in cases {
        let res = app
            .post_json("/notifications/send", &body, Some(&admin.access))
            .await;
        assert_problem(res, status, code).await;
    }
    let res = app
        .client
        .post(app.url("/notifications/send"))
        .bearer_auth(&admin.access)
        .header("content-type", "application/json")
        .body("{\"user_id\":")
        .send()
        .await
        .expect("sent");
    assert_problem(res, 400, "invalid_request").await;
    for path in [
        "/notifications/user/not-a-uuid".to_owned(),
        format!("/notifications/user/{}?limit=1000", user.user_id),
        format!("/notifications/user/{}?cursor=%%%", user.user_id),
    ] {
        assert_problem(
            app.get(&path, Some(&admin.access)).await,
            400,
            "invalid_request",
        )
        .await;
    }
    assert!(history(&app, user.user_id, &user.access).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_goes_first_under_a_backlog_without_starving_low() {
    let app = TestApp::builder()
        .configure(|s| {
            let n = &mut s.notifications;
            n.batch_size = 50;
            n.low_share = 5;
            n.normal_share = 10;
            // The first batch waits for every consumer to fill its buffer, however slowly a
            // machine busy with other tests starts them.
            n.batch_linger_ms = 3_000;
        })
        .spawn()
        .await;
    let lows: Vec<_> = (0..200)
        .map(|_| note(Channel::Push, Priority::Low))
        .collect();
    let highs: Vec<_> = (0..100)
        .map(|_| note(Channel::Email, Priority::High))
        .collect();
    enqueue_each(&app, &lows).await;
    enqueue_each(&app, &highs).await;

    let worker = app.spawn_notify_worker().await;
    let log = wait_deliveries(&worker.state, 300).await;
    let is_high = |d: &Delivery| d.channel == Channel::Email;
    let last_high = log.iter().rposition(is_high).expect("highs sent");
    // FIFO would send the 100 high last (positions 200..300). Each batch of 50 carries 45
    // high and 5 low, so all high are out within 3 batches; one more all-low batch is
    // allowed for a consumer slow to start on a loaded machine.
    assert!(last_high < 170, "last high at {last_high}");
    let early_lows = log[..100].iter().filter(|d| !is_high(d)).count();
    assert!(
        (5..=60).contains(&early_lows),
        "{early_lows} low in the first 100"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_batch_size_notifications() {
    let app = TestApp::builder()
        .configure(|s| {
            s.notifications.batch_size = 40;
            s.notifications.batch_linger_ms = 50;
        })
        .spawn()
        .await;
    let singles: Vec<_> = (0..150)
        .map(|_| note(Channel::Push, Priority::Normal))
        .collect();
    enqueue_each(&app, &singles).await;
    let grouped: Vec<_> = (0..30)
        .map(|_| note(Channel::Push, Priority::Normal))
        .collect();
    notifications::enqueue(&app.state, Priority::Normal, grouped)
        .await
        .expect("enqueue");

    let worker = app.spawn_notify_worker().await;
    wait_deliveries(&worker.state, 180).await;
    let stats = &worker.state.notifications.stats;
    assert!(
        stats.largest_batch() <= 40,
        "largest {}",
        stats.largest_batch()
    );
    assert!(
        stats.largest_batch() >= 30,
        "batching happened: {}",
        stats.largest_batch()
    );
    assert!(stats.batches() >= 5, "{} batches", stats.batches());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rate_limit_is_honoured() {
    const PER_SECOND: u32 = 20;
    let app = TestApp::builder()
        .configure(|s| {
            s.notifications.providers.sms.per_second = PER_SECOND;
            s.notifications.providers.sms.burst = 1;
        })
        .spawn()
        .await;
    let notes: Vec<_> = (0..40)
        .map(|_| note(Channel::Sms, Priority::High))
        .collect();
    notifications::enqueue(&app.state, Priority::High, notes)
        .await
        .expect("enqueue");
    let worker = app.spawn_notify_worker().await;
    let log = wait_deliveries(&worker.state, 40).await;
    // In any one-second window the provider saw at most its limit (plus the burst).
    for (i, start) in log.iter().enumerate() {
        let in_window = log[i..]
            .iter()
            .take_while(|d| d.at.duration_since(start.at) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= PER_SECOND as usize + 1,
            "{in_window} sends within 1 s"
        );
    }
    let span = log[39].at.duration_since(log[0].at);
    assert!(
        span >= Duration::from_millis(1_800),
        "40 sends took only {span:?}"
    );
}

async fn dead_letters(app: &TestApp) -> Vec<DeadNotification> {
    let channel = app
        .state
        .amqp
        .connection()
        .create_channel()
        .await
        .expect("channel");
    let mut dead = vec![];
    while let Some(message) = channel
        .basic_get(
            app.state.notifications.queues.dead.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
    {
        let batch: Vec<DeadNotification> =
            serde_json::from_slice(&message.delivery.data).expect("dead letter parses");
        dead.extend(batch);
    }
    dead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_then_sent() {
    let app = TestApp::builder()
        .configure(|s| s.notifications.providers.push.fail_first_attempts = 2)
        .spawn()
        .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let user = app.register(&unique_email("user")).await;
    let body =
        json!({"user_id": user.user_id, "channel": "push", "priority": "high", "body": "flaky"});
    let res = app
        .post_json("/notifications/send", &body, Some(&admin.access))
        .await;
    assert_eq!(res.status(), 202);
    let worker = app.spawn_notify_worker().await;
    until("sent after retries", || async {
        history(&app, user.user_id, &user.access).await[0]["status"] == "sent"
    })
    .await;
    assert_eq!(worker.state.notifications.providers.failed_attempts(), 2);
    assert_eq!(worker.state.notifications.providers.deliveries().len(), 1);
    assert!(dead_letters(&app).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_and_exhausted_retries_are_dead_lettered_and_shown_failed() {
    let app = TestApp::builder()
        .configure(|s| {
            s.notifications.providers.sms.permanent_failure_rate = 1.0;
            s.notifications.providers.push.fail_first_attempts = 100;
            s.notifications.max_attempts = 3;
        })
        .spawn()
        .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let user = app.register(&unique_email("user")).await;
    let mut ids = vec![];
    for channel in ["sms", "push"] {
        let body = json!({"user_id": user.user_id, "channel": channel, "priority": "normal", "body": "doomed"});
        let res = app
            .post_json("/notifications/send", &body, Some(&admin.access))
            .await;
        let accepted: Value = res.json().await.expect("body");
        ids.push(accepted["id"].as_str().expect("id").to_owned());
    }
    let worker = app.spawn_notify_worker().await;
    until("both failed", || async {
        history(&app, user.user_id, &user.access)
            .await
            .iter()
            .all(|item| item["status"] == "failed")
    })
    .await;
    // The permanent failure was tried once; the transient one max_attempts times.
    assert_eq!(
        worker.state.notifications.providers.failed_attempts(),
        1 + 3
    );
    assert!(worker.state.notifications.providers.deliveries().is_empty());
    let mut dead: Vec<String> = dead_letters(&app)
        .await
        .iter()
        .map(|d| d.notification.id.to_string())
        .collect();
    dead.sort();
    ids.sort();
    assert_eq!(dead, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_or_repeated_notification_is_sent_once() {
    let app = TestApp::spawn().await;
    let original = note(Channel::Email, Priority::High);
    let mut same_key = note(Channel::Email, Priority::High);
    same_key.user_id = original.user_id;
    same_key.dedupe_key = original.dedupe_key.clone();
    // The same message twice (a redelivery) and another message with the same dedupe key
    // (an order batch redone after a crash).
    enqueue_each(&app, &[original.clone(), original.clone(), same_key]).await;
    let worker = app.spawn_notify_worker().await;
    let marker = note(Channel::Email, Priority::Low);
    enqueue_each(&app, std::slice::from_ref(&marker)).await;
    let log = wait_deliveries(&worker.state, 2).await;
    let ids: Vec<Uuid> = log.iter().map(|d| d.id).collect();
    assert_eq!(
        ids.iter().filter(|id| **id == original.id).count(),
        1,
        "{ids:?}"
    );
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_confirmations_reach_the_buyers_history_once() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let buyer = app.register(&unique_email("buyer")).await;
    let product = app.flash_sale_product(&admin.access, 5, "10.00").await;
    let _orders = app.spawn_worker().await;
    let notify = app.spawn_notify_worker().await;
    let res = app.buy(&buyer.access, product, "k1", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.expect("order");
    let order_id: Uuid = order["id"].as_str().expect("id").parse().expect("uuid");
    assert_eq!(app.wait_settled(&buyer.access, order_id).await, "paid");
    until("confirmation sent", || async {
        let items = history(&app, buyer.user_id, &buyer.access).await;
        items.len() == 1 && items[0]["status"] == "sent"
    })
    .await;
    let items = history(&app, buyer.user_id, &buyer.access).await;
    assert_eq!(items[0]["subject"], "Your order is confirmed");
    assert_eq!(items[0]["priority"], "high");

    // The order-worker redoing that batch builds the same dedupe key: no second message.
    let mut again = note(Channel::Email, Priority::High);
    again.user_id = buyer.user_id;
    again.dedupe_key = format!("order:{order_id}:paid");
    enqueue_each(&app, &[again]).await;
    assert_eq!(app.cancel(&buyer.access, order_id).await.status(), 200);
    until("cancellation sent", || async {
        history(&app, buyer.user_id, &buyer.access).await.len() == 2
    })
    .await;
    wait_deliveries(&notify.state, 2).await;
    let items = history(&app, buyer.user_id, &buyer.access).await;
    assert_eq!(items[0]["subject"], "Your order was cancelled");
    assert_eq!(notify.state.notifications.providers.deliveries().len(), 2);
}
