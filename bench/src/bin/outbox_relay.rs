//! Outbox relay throughput: writes `--count` order events into one shard's outbox, then
//! relays them to rdkafka's in-process MockCluster (idempotent producer, acks=all) and
//! times until the outbox is empty. Uses a scratch database it creates and drops.
//!
//!     outbox_relay --count 200000

use std::path::PathBuf;
use std::time::Instant;

use chrono::Utc;
use clap::Parser;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use flashsale::config::{DatabaseNode, Settings};
use flashsale::infra::db::{self, Databases};
use flashsale::infra::events::{self, OrderEvent, Relay};
use rdkafka::mocking::MockCluster;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[arg(long, default_value = "development")]
    env: String,
    #[arg(long, default_value_t = 200_000)]
    count: usize,
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/flashsale_bench_outbox"
    )]
    scratch_url: String,
}

fn event(i: usize) -> OrderEvent {
    OrderEvent {
        v: events::EVENT_VERSION,
        id: Uuid::now_v7(),
        event_type: if i.is_multiple_of(2) {
            "order.created"
        } else {
            "order.paid"
        }
        .to_owned(),
        order_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        status: "paid".to_owned(),
        total_amount: "19.99".to_owned(),
        occurred_at: Utc::now(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    db::create_database(&args.scratch_url, None)
        .await
        .expect("scratch database");
    db::run_migrations(&args.scratch_url, db::SHARD_MIGRATIONS)
        .await
        .expect("migrate scratch");
    let mut conn = AsyncPgConnection::establish(&args.scratch_url)
        .await
        .expect("connect");
    let written = Instant::now();
    let all: Vec<OrderEvent> = (0..args.count).map(event).collect();
    for chunk in all.chunks(1_000) {
        // One event per change (row): the relay's cost per message.
        let changes: Vec<events::Change<'_>> = chunk
            .iter()
            .map(|event| events::Change {
                events: std::slice::from_ref(event),
            })
            .collect();
        conn.transaction(async |c| events::append(c, &changes).await)
            .await
            .expect("append");
    }
    println!("wrote {} events in {:.1?}", args.count, written.elapsed());

    let cluster = MockCluster::new(1).expect("mock cluster");
    let mut settings = Settings::load_for(&args.config_dir, &args.env).expect("configuration");
    cluster
        .create_topic(&settings.kafka.topic, 12, 1)
        .expect("topic");
    settings.kafka.brokers = cluster.bootstrap_servers();
    settings.database.shards = vec![DatabaseNode {
        primary: args.scratch_url.clone(),
        replicas: vec![],
        direct: None,
    }];
    let dbs = Databases::connect(&settings.database).await.expect("pools");
    let relay = Relay::new(&settings.kafka).expect("relay");
    let started = Instant::now();
    let mut sent = 0;
    while sent < args.count {
        sent += relay
            .relay_shard(&dbs.shards()[0])
            .await
            .expect("relay pass");
    }
    let elapsed = started.elapsed();
    println!(
        "relayed {sent} events in {elapsed:.2?}: {:.0} events/s (batch {})",
        sent as f64 / elapsed.as_secs_f64(),
        settings.kafka.batch_size
    );
    drop(dbs);
    drop(conn);
}
