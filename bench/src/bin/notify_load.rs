//! Notification throughput: queues `--count` notifications in messages of `--per-message`
//! (the order-worker sends one message per batch), then runs a notify-worker with the
//! provider simulators at zero latency and no rate limit, and times until all are sent.
//! Queues and Redis keys get a fresh prefix per run (queues expire, history lives 10 min).
//!
//!     notify_load --config-dir config --env development --count 200000

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::app::AppState;
use flashsale::config::Settings;
use flashsale::modules::notifications::{self, Channel, Notification, Priority};
use futures_util::{stream, StreamExt};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[arg(long, default_value = "development")]
    env: String,
    #[arg(long, default_value_t = 200_000)]
    count: usize,
    #[arg(long, default_value_t = 100)]
    per_message: usize,
}

fn settings(args: &Args) -> Settings {
    let mut settings = Settings::load_for(&args.config_dir, &args.env).expect("configuration");
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    settings.amqp.queue_prefix = format!("bench.{run}.");
    settings.amqp.queue_expires_ms = Some(600_000);
    settings.redis.key_prefix = format!("bench:{run}:");
    settings.notifications.history_ttl_secs = 600;
    settings.notifications.dedupe_ttl_secs = 600;
    let providers = &mut settings.notifications.providers;
    for provider in [
        &mut providers.email,
        &mut providers.sms,
        &mut providers.push,
    ] {
        provider.latency_ms = 0;
        provider.per_second = u32::MAX;
        provider.burst = u32::MAX;
    }
    settings
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let state = AppState::build(settings(&args)).await.expect("app state");
    let channels = [Channel::Email, Channel::Sms, Channel::Push];
    let priorities = [Priority::High, Priority::Normal, Priority::Low];
    let messages = args.count.div_ceil(args.per_message);
    let queued = Instant::now();
    stream::iter(0..messages)
        .for_each_concurrent(64, |m| {
            let state = &state;
            let batch = (0..args.per_message)
                .map(|i| {
                    let channel = channels[i % channels.len()];
                    let priority = priorities[m % priorities.len()];
                    Notification::new(Uuid::new_v4(), channel, priority, None, "bench".into())
                })
                .collect();
            async move {
                notifications::enqueue(state, priorities[m % priorities.len()], batch)
                    .await
                    .expect("enqueue");
            }
        })
        .await;
    let total = (messages * args.per_message) as u64;
    println!(
        "queued {total} notifications in {messages} messages in {:.1?}",
        queued.elapsed()
    );

    let started = Instant::now();
    let worker = tokio::spawn(notifications::run_worker(state.clone()));
    let providers = &state.notifications.providers;
    while providers.delivered() < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    worker.abort();
    println!(
        "sent {total} in {elapsed:.2?}: {:.0} notifications/s ({} batches, largest {})",
        total as f64 / elapsed.as_secs_f64(),
        state.notifications.stats.batches(),
        state.notifications.stats.largest_batch(),
    );
}
