//! Login latency under concurrent load against a running API. Users come from
//! `flashsale seed --users N` (they share the seed password).
//!
//!     login-load --base-url http://127.0.0.1:8080 --users 200 --concurrency 8 --requests 2000

use std::time::{Duration, Instant};

use clap::Parser;
use flashsale::seed::{seed_email, SEED_PASSWORD};
use flashsale_bench::Recorder;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// Seeded users to cycle through.
    #[arg(long, default_value_t = 200)]
    users: u64,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u64,
    /// Total logins.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::new();
    let url = format!("{}/auth/login", args.base_url);
    let started = Instant::now();
    let workers = (0..args.concurrency).map(|worker| {
        let client = client.clone();
        let url = url.clone();
        let per_worker = args.requests / args.concurrency;
        let users = args.users;
        tokio::spawn(async move {
            let mut recorder = Recorder::default();
            for i in 0..per_worker {
                let email = seed_email((worker * per_worker + i) % users);
                let body = serde_json::json!({"email": email, "password": SEED_PASSWORD});
                let sent = Instant::now();
                let res = client
                    .post(&url)
                    .json(&body)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                recorder.record(sent.elapsed(), res.ok().map(|r| r.status().as_u16()));
            }
            recorder
        })
    });
    let mut total = Recorder::default();
    for done in futures_util::future::join_all(workers).await {
        total.merge(&done.expect("worker task"));
    }
    println!(
        "login: concurrency {} | {}",
        args.concurrency,
        total.report(started.elapsed())
    );
}
