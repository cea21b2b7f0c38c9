//! Pushed updates (server-sent events): an order's status until it is settled, a waiting
//! room's place until admission or sell-out; auth and ownership as the polling routes;
//! `Last-Event-ID` resume, the final answer delivered once, heartbeats.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_problem, unique_email, TestApp};
use serde_json::{json, Value};
use uuid::Uuid;

/// One server-sent event (a comment has only `comment`).
#[derive(Debug, Default, Clone)]
struct Event {
    id: Option<String>,
    name: Option<String>,
    data: Option<Value>,
    comment: bool,
}

/// An open event stream, read event by event.
struct Events {
    res: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(app: &TestApp, path: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let res = open(app, path, token, last_event_id).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            res,
            buffer: String::new(),
        }
    }

    /// The next event or comment (`retry:` lines skipped); `None` when the stream ended.
    /// Panics past 10 s: every awaited push arrives well within that.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                for line in block.lines() {
                    if line.starts_with(':') {
                        event.comment = true;
                        continue;
                    }
                    match line.split_once(": ").unwrap_or((line, "")) {
                        ("id", id) => event.id = Some(id.to_owned()),
                        ("event", name) => event.name = Some(name.to_owned()),
                        ("data", data) => event.data = Some(serde_json::from_str(data).unwrap()),
                        _ => {}
                    }
                }
                if event.id.is_some() || event.comment {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.res.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event of a waiting room's stream that is not a new place in line.
    async fn past_positions(&mut self) -> Event {
        loop {
            let event = self.next_event().await.unwrap();
            if event.name.as_deref() != Some("position") {
                return event;
            }
        }
    }

    /// The next event that is not a heartbeat.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            let event = self.next().await?;
            if !event.comment {
                return Some(event);
            }
        }
    }
}

async fn open(
    app: &TestApp,
    path: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .get(app.url(path))
        .header("accept", "text/event-stream");
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    req.send().await.unwrap()
}

/// Pushes only: an order stream would also read its order every `recheck_secs`.
async fn app_pushing_only(
    tweak: impl FnOnce(&mut flashsale::config::Settings) + 'static,
) -> Arc<TestApp> {
    TestApp::spawn_with(move |s| {
        s.orders.push.recheck_secs = 600;
        tweak(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_stream_pushes_pending_then_paid_once_and_resumes_from_last_event_id() {
    let app = app_pushing_only(|_| {}).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let buyer = Uuid::now_v7();
    let token = app.mint_token(buyer);
    let res = app.buy(&token, product, "push-1", &json!({})).await;
    assert_eq!(res.status(), 201);
    let order: Value = res.json().await.unwrap();
    let order = order["id"].as_str().unwrap().to_owned();
    let path = format!("/orders/{order}/events");

    // Someone else's order, no token, a tampered one, a bad id: as the polling route.
    let stranger = app.mint_token(Uuid::now_v7());
    assert_problem(open(&app, &path, &stranger, None).await, 404, "not_found").await;
    assert_eq!(open(&app, &path, "", None).await.status(), 401);
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(open(&app, &path, &tampered, None).await.status(), 401);
    assert_eq!(
        open(&app, "/orders/not-a-uuid/events", &token, None)
            .await
            .status(),
        400
    );

    // No worker yet: pending, then paid as soon as one settles it (pushed: the stream never
    // reads again on its own within this test), then the stream ends.
    let mut events = Events::open(&app, &path, &token, None).await;
    let first = events.next_event().await.unwrap();
    assert_eq!(
        (first.name.as_deref(), first.id.as_deref()),
        (Some("status"), Some("pending"))
    );
    assert_eq!(first.data.unwrap()["status"], "pending");
    let _worker = app.spawn_worker().await;
    let settled = events.next_event().await.unwrap();
    assert_eq!(settled.id.as_deref(), Some("paid"));
    assert_eq!(settled.data.as_ref().unwrap()["id"], order.as_str());
    assert!(
        events.next_event().await.is_none(),
        "the stream ends once settled"
    );

    // A client that saw `paid` is told there is nothing more; one that saw only `pending`
    // gets `paid`, once.
    let res = open(&app, &path, &token, Some("paid")).await;
    assert_eq!(res.status(), 204);
    let mut resumed = Events::open(&app, &path, &token, Some("pending")).await;
    let only = resumed.next_event().await.unwrap();
    assert_eq!(only.id.as_deref(), Some("paid"));
    assert!(resumed.next_event().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_sends_heartbeats() {
    let app = app_pushing_only(|s| s.orders.push.heartbeat_secs = 1).await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 5, "1.00").await;
    let token = app.mint_token(Uuid::now_v7());
    let res = app.buy(&token, product, "quiet", &json!({})).await;
    let order: Value = res.json().await.unwrap();
    let path = format!("/orders/{}/events", order["id"].as_str().unwrap());
    let mut events = Events::open(&app, &path, &token, None).await;
    assert_eq!(events.next().await.unwrap().id.as_deref(), Some("pending"));
    // No worker: nothing changes, and the stream still speaks.
    assert!(events.next().await.unwrap().comment, "a heartbeat");
    assert!(events.next().await.unwrap().comment, "and another");
}

/// A sale of `units` whose first buyer's order (not settled: no worker) fills the backlog of
/// one, and whose next `waiting` buyers hold tickets 1, 2, ...; no slack, so the room admits
/// only what the units left can serve, and an admitted ticket holds its unit `hold_secs`.
/// The tokens: the first buyer's, then the holders'.
async fn sale_with_a_room(
    units: i32,
    waiting: usize,
    hold_secs: u64,
) -> (Arc<TestApp>, Uuid, Vec<String>) {
    let app = app_pushing_only(move |s| {
        let admission = &mut s.orders.admission;
        admission.admitted_hold_secs = hold_secs;
        admission.min_backlog = 1;
        admission.max_settle_secs = 0.0;
        admission.sample_ms = 50;
        admission.stock_slack = 0;
    })
    .await;
    let admission = &app.state.orders.admission;
    common::until("the first admission sample", || async {
        admission.capacity() == 1
    })
    .await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, units, "1.00").await;
    let tokens: Vec<String> = (0..=waiting)
        .map(|_| app.mint_token(Uuid::now_v7()))
        .collect();
    assert_eq!(
        app.buy(&tokens[0], product, "k", &json!({})).await.status(),
        201
    );
    common::until("the backlog of one", || async { admission.capacity() == 0 }).await;
    for token in &tokens[1..] {
        assert_eq!(app.buy(token, product, "k", &json!({})).await.status(), 202);
    }
    (app, product, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_room_stream_pushes_positions_then_admission_or_sold_out() {
    // Two units: the first buyer's, and one for ticket 1 or 2.
    let (app, product, tokens) = sale_with_a_room(2, 2, 600).await;
    let path = format!("/orders/flash-sale/{product}/queue/events");
    // Only ticket holders, and only with a valid token.
    let stranger = app.mint_token(Uuid::now_v7());
    assert_problem(open(&app, &path, &stranger, None).await, 404, "not_found").await;
    assert_eq!(open(&app, &path, "", None).await.status(), 401);

    let mut second = Events::open(&app, &path, &tokens[1], None).await;
    let mut third = Events::open(&app, &path, &tokens[2], None).await;
    let place = second.next_event().await.unwrap();
    assert_eq!(
        (place.name.as_deref(), place.id.as_deref()),
        (Some("position"), Some("1"))
    );
    assert_eq!(place.data.unwrap()["ticket"], 1);
    let place = third.next_event().await.unwrap();
    assert_eq!(place.id.as_deref(), Some("2"));

    // A worker settles the first order: the room admits ticket 1 (one unit is left), without
    // anyone retrying; the second buyer buys it.
    let _worker = app.spawn_worker().await;
    let admitted = second.next_event().await.unwrap();
    assert_eq!(admitted.name.as_deref(), Some("admitted"), "{admitted:?}");
    assert!(
        second.next_event().await.is_none(),
        "the stream ends once admitted"
    );
    assert_eq!(
        app.buy(&tokens[1], product, "k", &json!({})).await.status(),
        201
    );
    // The last unit is gone: the third is told sold out (after, perhaps, its new place).
    let last = third.past_positions().await;
    assert_eq!(last.name.as_deref(), Some("sold_out"), "{last:?}");
    assert!(third.next_event().await.is_none());

    // Resuming after `admitted` (still admitted): nothing more to send.
    assert_eq!(
        open(&app, &path, &tokens[1], Some("admitted"))
            .await
            .status(),
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_holder_coming_back_to_another_pod_is_counted_so_the_room_sells_every_unit() {
    // Two API pods behind one balancer. Tickets are taken and watched on the first; the
    // admitted buyer's POST lands on the second, which never answered anyone from the room.
    // Were it to let that POST skip the room, the room would never count the ticket served,
    // and with no slack it would stop admitting with a unit left: the next holder would wait
    // forever.
    let (app, product, tokens) = sale_with_a_room(3, 3, 600).await;
    let path = format!("/orders/flash-sale/{product}/queue/events");
    let mut streams = Vec::new();
    for token in &tokens[1..] {
        streams.push(Events::open(&app, &path, token, None).await);
    }
    let peer = app.spawn_peer().await;
    common::until("the peer learns the sale is crowded", || async {
        peer.state.orders.admission.crowded(product)
    })
    .await;

    let _worker = app.spawn_worker().await;
    for (holder, stream) in streams.iter_mut().enumerate().take(2) {
        let admitted = stream.past_positions().await;
        assert_eq!(
            admitted.name.as_deref(),
            Some("admitted"),
            "holder {holder}: {admitted:?}"
        );
        let token = &tokens[holder + 1];
        assert_eq!(
            peer.buy(token, product, "k", &json!({})).await.status(),
            201
        );
    }
    let last = streams[2].past_positions().await;
    assert_eq!(last.name.as_deref(), Some("sold_out"), "{last:?}");
    assert_eq!(app.remaining(product).await, 0, "every unit sold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_holder_who_never_buys_stops_holding_the_room_after_the_hold() {
    // One unit left after the first buyer, two holders. The first is admitted and never buys;
    // with no slack the room could admit the second only if the first's unit were free. Once
    // the hold is over it is: the second is admitted and buys it.
    let (app, product, tokens) = sale_with_a_room(2, 2, 1).await;
    let path = format!("/orders/flash-sale/{product}/queue/events");
    let mut first = Events::open(&app, &path, &tokens[1], None).await;
    let mut second = Events::open(&app, &path, &tokens[2], None).await;
    let _worker = app.spawn_worker().await;
    let admitted = first.past_positions().await;
    assert_eq!(admitted.name.as_deref(), Some("admitted"), "{admitted:?}");
    let admitted = second.past_positions().await;
    assert_eq!(admitted.name.as_deref(), Some("admitted"), "{admitted:?}");
    assert_eq!(
        app.buy(&tokens[2], product, "k", &json!({})).await.status(),
        201
    );
}
