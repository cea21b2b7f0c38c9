//! Metrics, trace context and graceful shutdown: `/metrics` after a flash sale, the
//! `traceparent` of a request in the order and notification messages, and SIGTERM to a
//! worker process under load losing no order.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, unique_email, until, write_config_dir, TestApp};
use flashsale::ops::{self, Sampled};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::{json, Value};
use uuid::Uuid;

/// One sample of the scrape: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_scrape(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn scrape(base: &str) -> Vec<Sample> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    parse_scrape(&text)
}

/// Metric names a PromQL expression reads: identifiers outside label matchers, range
/// selectors and `by (...)` clauses that are neither functions (followed by `(`) nor
/// keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "group_left",
        "group_right",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "topk",
        "bottomk",
        "quantile",
        "group",
    ];
    let mut names = vec![];
    let (mut depth, mut in_grouping, mut token) = (0, false, String::new());
    let chars: Vec<char> = expr.chars().chain([' ']).collect();
    for (i, ch) in chars.iter().enumerate() {
        if depth == 0 && (ch.is_ascii_alphanumeric() || *ch == '_' || *ch == ':') {
            token.push(*ch);
            continue;
        }
        if !token.is_empty() {
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let is_function = next == Some(&'(');
            if token == "by" || token == "without" {
                in_grouping = true;
            } else if !in_grouping
                && !is_function
                && !KEYWORDS.contains(&token.as_str())
                && !token.starts_with(|c: char| c.is_ascii_digit())
            {
                names.push(token.clone());
            }
            token.clear();
        }
        match ch {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ')' if in_grouping => in_grouping = false,
            _ => {}
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let expr = r#"histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket{route!="/metrics"}[5m]))) / on() group_left max(up_total)"#;
    assert_eq!(
        metric_names(expr),
        ["http_request_duration_seconds_bucket", "up_total"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_flash_sale_and_dashboards_read_only_exported_metrics() {
    let app = TestApp::builder().lagging_replicas().spawn().await;
    let _worker = app.spawn_worker().await;
    let _notify = app.spawn_notify_worker().await;
    let sampled = Sampled {
        stock: true,
        order_queues: true,
        notification_queues: true,
    };
    tokio::spawn(ops::run_sampler(
        app.state.clone(),
        sampled,
        Duration::from_millis(100),
    ));
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 10, "9.99").await;
    let mut paid = vec![];
    for method in ["card", "card", "card", "card_declined"] {
        let (buyer, id, status) = app.buy_and_settle(product, method).await;
        if status == "paid" {
            paid.push((buyer, id));
        }
    }
    let (buyer, cancelled) = &paid[0];
    assert_eq!(app.cancel(&buyer.access, *cancelled).await.status(), 200);
    app.get(&format!("/products/{product}"), None).await;
    app.get(&format!("/products/{product}"), None).await;

    let product_label = product.to_string();
    // 10 units - 3 paid + 1 cancelled = 8 (the declined order's unit went back too).
    until("inventory gauge", || async {
        value(
            &scrape(&app.address).await,
            "inventory_available",
            &[("product_id", &product_label)],
        ) == Some(8.0)
    })
    .await;
    // One audit pass: the books of this healthy sale balance.
    flashsale::modules::products::audit_once(&app.state)
        .await
        .expect("audit");
    let samples = scrape(&app.address).await;
    assert_eq!(
        value(
            &samples,
            "inventory_invariant_violations",
            &[("product_id", &product_label)]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "inventory_audit_runs_total", &[]),
        Some(1.0)
    );
    let orders = |status| {
        value(
            &samples,
            "orders_total",
            &[("status", status), ("type", "flash_sale")],
        )
    };
    assert_eq!(orders("accepted"), Some(4.0));
    assert_eq!(orders("paid"), Some(3.0));
    assert_eq!(orders("failed"), Some(1.0));
    assert_eq!(orders("cancelled"), Some(1.0));
    for le in ["0.1", "0.3", "0.5", "1", "2", "5", "+Inf"] {
        assert!(
            value(&samples, "order_duration_seconds_bucket", &[("le", le)]).is_some(),
            "bucket le={le}"
        );
    }
    assert_eq!(
        value(&samples, "order_duration_seconds_count", &[]),
        Some(4.0)
    );
    let route = "/orders/flash-sale/{product_id}";
    assert_eq!(
        value(
            &samples,
            "http_requests_total",
            &[("route", route), ("status", "201")]
        ),
        Some(4.0)
    );
    for name in [
        "http_request_duration_seconds_bucket",
        "db_pool_connections_in_use",
        "db_pool_waits_total",
        "db_query_duration_seconds_bucket",
        "db_replication_lag_seconds",
        "cache_requests_total",
        "cache_misses_total",
        "rabbitmq_queue_depth",
        "rabbitmq_queue_consumers",
        "payment_circuit_state",
        "outbox_backlog",
        "reconciler_repairs_total",
        "notifications_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            samples.iter().any(|s| s.name == name),
            "{name} missing from /metrics"
        );
    }
    let dead = format!("{}orders.dead", app.state.settings.amqp.queue_prefix);
    assert_eq!(
        value(&samples, "rabbitmq_queue_depth", &[("queue", &dead)]),
        Some(0.0)
    );

    // Every dashboard panel reads metrics this scrape has.
    let exported: std::collections::HashSet<&str> =
        samples.iter().map(|s| s.name.as_str()).collect();
    let mut checked = 0;
    for entry in std::fs::read_dir("deploy/grafana/dashboards").expect("dashboards folder") {
        let path = entry.expect("entry").path();
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("expr");
                for name in metric_names(expr) {
                    assert!(
                        exported.contains(name.as_str()),
                        "{}: panel {:?} reads {name}, which the app does not export",
                        path.display(),
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} metric references checked");
}

fn header(headers: &Option<lapin::types::FieldTable>, name: &str) -> Option<String> {
    match headers.as_ref()?.inner().get(name)? {
        AMQPValue::LongString(value) => Some(value.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_context_rides_the_order_and_notification_messages() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin(&unique_email("admin")).await;
    let buyer = app.register(&unique_email("buyer")).await;
    let product = app.flash_sale_product(&admin.access, 5, "3.00").await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let res = app.buy_traced(&buyer.access, product, traceparent).await;
    assert_eq!(res.status(), 201);

    let channel = app
        .state
        .amqp
        .connection()
        .create_channel()
        .await
        .expect("channel");
    let order_message = channel
        .basic_get(
            app.state.orders.queues.orders.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("basic_get")
        .expect("the order message is queued");
    assert_eq!(
        header(order_message.delivery.properties.headers(), "traceparent").as_deref(),
        Some(traceparent)
    );
    let body: Value = serde_json::from_slice(&order_message.delivery.data).expect("json");
    assert_eq!(body["orders"][0]["traceparent"], traceparent);
    // Back on the queue for the worker.
    order_message
        .delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .expect("requeue");

    let _worker = app.spawn_worker().await;
    let queue = app
        .state
        .notifications
        .queues
        .for_priority(flashsale::modules::notifications::Priority::High)
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        let message = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        if let Some(message) = message {
            break message;
        }
        assert!(Instant::now() < deadline, "no confirmation message");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        header(message.delivery.properties.headers(), "traceparent").as_deref(),
        Some(traceparent)
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_flashsale");

struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker_process(dir: &std::path::Path) -> Process {
    Process(
        Command::new(BIN)
            .args([
                "--config-dir",
                dir.to_str().expect("utf-8 path"),
                "serve",
                "--role",
                "order-worker",
            ])
            .env("FLASHSALE_ENV", "proc")
            // Slow, small batches: the SIGTERM lands while batches are in flight.
            .env("FLASHSALE__ORDERS__PAYMENT__LATENCY_MS", "40")
            .env("FLASHSALE__ORDERS__BATCH_SIZE", "10")
            .env("FLASHSALE__ORDERS__PREFETCH", "20")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the worker"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_worker_under_load_loses_no_accepted_order() {
    let app = TestApp::builder().shards(2).spawn().await;
    let ops_port = free_port();
    let dir = write_config_dir(&app.state.settings, &app.id, free_port(), ops_port);
    let mut worker = start_worker_process(&dir);
    let ops = format!("http://127.0.0.1:{ops_port}");
    until("worker ready", || async {
        matches!(reqwest::get(format!("{ops}/ready")).await, Ok(r) if r.status() == 200)
    })
    .await;
    until("the worker's own metrics", || async {
        scrape(&ops)
            .await
            .iter()
            .any(|s| s.name == "rabbitmq_queue_depth")
    })
    .await;

    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 1_000, "1.00").await;
    let buy = |i: usize| {
        let app = &app;
        async move {
            let token = app.mint_token(Uuid::new_v4());
            let res = app.buy(&token, product, &format!("k{i}"), &json!({})).await;
            assert_eq!(res.status(), 201, "order {i}");
        }
    };
    let first: Vec<_> = (0..150).map(buy).collect();
    futures_util::future::join_all(first).await;
    // SIGTERM while the worker is in the middle of the backlog, with more orders arriving.
    let pid = worker.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let second: Vec<_> = (150..300).map(buy).collect();
    futures_util::future::join_all(second).await;
    let stopped_at = Instant::now();
    let status = loop {
        if let Some(status) = worker.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(20),
            "worker outlived its grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    // The role restarts; every accepted order ends paid, exactly once.
    let _restarted = app.spawn_worker().await;
    until("all 300 paid", || async {
        app.orders_by_status(product)
            .await
            .get("paid")
            .map(|(orders, _)| *orders)
            == Some(300)
    })
    .await;
    let by_status = app.orders_by_status(product).await;
    assert_eq!(by_status.len(), 1, "{by_status:?}");
    assert_eq!(app.remaining(product).await, 700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    use std::sync::{Arc, Mutex};
    // A stand-in OTLP/HTTP collector that keeps every export it receives.
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let collector_port = free_port();
    let store = received.clone();
    let collector = actix_web::HttpServer::new(move || {
        let store = store.clone();
        actix_web::App::new().route(
            "/v1/traces",
            actix_web::web::post().to(move |body: actix_web::web::Bytes| {
                let store = store.clone();
                async move {
                    store.lock().expect("lock").push(body.to_vec());
                    actix_web::HttpResponse::Ok().finish()
                }
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", collector_port))
    .expect("bind collector")
    .run();
    let collector_handle = collector.handle();
    tokio::spawn(collector);

    let (settings, id) = TestApp::builder().shards(1).settings().await;
    let port = free_port();
    let dir = write_config_dir(&settings, &id, port, free_port());
    let mut api = Process(
        Command::new(BIN)
            .args([
                "--config-dir",
                dir.to_str().expect("utf-8 path"),
                "serve",
                "--role",
                "api",
            ])
            .env("FLASHSALE_ENV", "proc")
            .env(
                "FLASHSALE__TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{collector_port}/v1/traces"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the api"),
    );
    let base = format!("http://127.0.0.1:{port}");
    until("api ready", || async {
        matches!(reqwest::get(format!("{base}/ready")).await, Ok(r) if r.status() == 200)
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = reqwest::Client::new()
        .get(format!("{base}/products?limit=1"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    // SIGTERM flushes the span batch.
    Command::new("kill")
        .args(["-TERM", &api.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(api.0.wait().expect("wait").success());
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let exports = received.lock().expect("lock").clone();
    assert!(!exports.is_empty(), "no spans exported");
    assert!(
        exports
            .iter()
            .any(|body| body.windows(16).any(|w| w == trace_bytes.as_slice())),
        "no exported span belongs to the caller's trace"
    );
    collector_handle.stop(false).await;
}
