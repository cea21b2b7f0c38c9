//! A crowd of flash-sale shoppers, each on its own keep-alive connection (from one of several
//! 127.0.0.x source addresses, so one address's ephemeral ports do not cap them), as a
//! browser behaves:
//!
//! - `--mode push`: buy; on 202 (a waiting-room ticket) follow
//!   `/orders/flash-sale/{product}/queue/events` until `admitted` (buy again, same key) or
//!   `sold_out`; on 201 follow `/orders/{id}/events` until the order is settled.
//! - `--mode poll`: buy; on 202 wait `retry_after_ms` and buy again; on 201 poll
//!   `/orders/{id}/status` every `--poll-ms` until it is settled.
//!
//! A shopper whose connection breaks (a load balancer restarted) connects again after a
//! random 0.5-3 s, as a browser's EventSource does, and picks up where it was: the order's
//! stream with `Last-Event-ID` if it has an order, else the same POST with the same
//! Idempotency-Key (a replay). Every shopper counts as answered when it knows its outcome
//! (paid, failed, sold out); it then keeps its connection open, idle, until every shopper of
//! its process is answered (a tab left open) and `--linger-secs` more, so the connections
//! held peak when the last shopper arrives. Once a second it appends a line to `--stats`
//! (CSV: second, open connections, requests sent, answers of each kind, pushed events,
//! reconnections); the run's report is one JSON line on stdout.
//!
//!     shoppers --target 127.0.0.1:8000 --product <id> --shoppers 18000 --source 2 \
//!              --mode push --arrive-secs 60 --stats run.csv

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use flashsale::config::Settings;
use flashsale::modules::auth::TokenKeys;
use flashsale::modules::users::Role;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, HOST};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpSocket;
use uuid::Uuid;

/// How long a stream's end may take to come after its final event.
const STREAM_END: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Push,
    Poll,
}

#[derive(Parser)]
struct Args {
    /// The load balancer (or one API process).
    #[arg(long, default_value = "127.0.0.1:8000")]
    target: SocketAddr,
    /// The sale to buy from.
    #[arg(long, required_unless_present = "create_sale")]
    product: Option<Uuid>,
    /// Create a flash sale of this many units through --target, print its id and exit.
    #[arg(long)]
    create_sale: Option<i64>,
    #[arg(long, default_value_t = 10_000)]
    shoppers: usize,
    #[arg(long, value_enum, default_value_t = Mode::Push)]
    mode: Mode,
    /// First source address: 127.0.0.<source>, then the next one every --per-source shoppers.
    #[arg(long, default_value_t = 2)]
    source: u8,
    #[arg(long, default_value_t = 10_000)]
    per_source: usize,
    /// Shoppers arrive evenly over this long.
    #[arg(long, default_value_t = 30)]
    arrive_secs: u64,
    /// Start arriving at this Unix time in milliseconds (several processes start together).
    #[arg(long)]
    start_at_ms: Option<u64>,
    /// A shopper without an outcome this long after the start gives up (counted unanswered).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Once every shopper here has an answer, the tabs stay open this long more (so a
    /// monitor sampling each second sees the end with the clients still running).
    #[arg(long, default_value_t = 3)]
    linger_secs: u64,
    /// For the signing key (tokens are minted, as order_load does).
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[arg(long, default_value = "development")]
    env: String,
    /// Per-second samples (CSV) for bench/src/bin/chart.rs.
    #[arg(long)]
    stats: Option<PathBuf>,
}

#[derive(Default)]
struct Counters {
    open: AtomicU64,
    requests: AtomicU64,
    pushed: AtomicU64,
    paid: AtomicU64,
    failed: AtomicU64,
    sold_out: AtomicU64,
    other: AtomicU64,
    timed_out: AtomicU64,
    reconnects: AtomicU64,
    /// The statuses of the `other` answers, and the final statuses of the failed orders.
    unexpected: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    fn note_unexpected(&self, what: String) {
        let mut unexpected = self.unexpected.lock().unwrap_or_else(|e| e.into_inner());
        *unexpected.entry(what).or_default() += 1;
    }
}

impl Counters {
    fn answered(&self) -> u64 {
        self.paid.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.sold_out.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

/// How one shopper's visit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Paid,
    Failed,
    SoldOut,
    Other(u16),
}

struct Shopper {
    target: SocketAddr,
    source: Ipv4Addr,
    /// `None` while disconnected.
    sender: Option<SendRequest<Empty<Bytes>>>,
    host: HeaderValue,
    auth: HeaderValue,
    key: HeaderValue,
    counters: Arc<Counters>,
    /// The order once placed (a reconnection follows it instead of buying again).
    order: Option<String>,
    /// The id of the last event of the stream being followed, for `Last-Event-ID`.
    last_event_id: Option<HeaderValue>,
}

/// A connection failed: connect again, and carry on.
struct Broken;

impl From<hyper::Error> for Broken {
    fn from(_: hyper::Error) -> Self {
        Broken
    }
}

impl Shopper {
    /// Connects (again), after a random 0.5-3 s when it is again; `false` if it failed.
    async fn connect(&mut self, again: bool) -> bool {
        if again {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            let jitter_ms = 500 + (Uuid::new_v4().as_u128() % 2500) as u64;
            tokio::time::sleep(Duration::from_millis(jitter_ms)).await;
        }
        let Ok(stream) = connect(self.target, self.source).await else {
            return false;
        };
        let Ok((sender, connection)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            return false;
        };
        tokio::spawn(connection);
        self.sender = Some(sender);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn disconnect(&mut self) {
        if self.sender.take().is_some() {
            self.counters.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn send(&mut self, method: &str, path: &str) -> Result<Response<Incoming>, Broken> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header("idempotency-key", self.key.clone());
        if let Some(id) = &self.last_event_id {
            request = request.header("last-event-id", id.clone());
        }
        let request = request.body(Empty::new()).expect("a valid request");
        let sender = self.sender.as_mut().ok_or(Broken)?;
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    }

    async fn json(&mut self, method: &str, path: &str) -> Result<(u16, Value), Broken> {
        let res = self.send(method, path).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// Reads an event stream until an event named in `until`; answers its name and data.
    async fn follow(
        &mut self,
        path: &str,
        until: &[&str],
    ) -> Result<Option<(String, Value)>, Broken> {
        let res = self.send("GET", path).await?;
        if res.status() != 200 {
            let _ = res.into_body().collect().await?;
            self.last_event_id = None;
            return Ok(None);
        }
        let mut body = res.into_body();
        let mut buffer = String::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                buffer.push_str(&String::from_utf8_lossy(&data));
            }
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|line| line.strip_prefix(name))
                        .map(str::to_owned)
                };
                let Some(event) = field("event: ") else {
                    continue;
                };
                self.last_event_id = field("id: ").and_then(|id| HeaderValue::from_str(&id).ok());
                self.counters.pushed.fetch_add(1, Ordering::Relaxed);
                let data = field("data: ")
                    .and_then(|d| serde_json::from_str(&d).ok())
                    .unwrap_or(Value::Null);
                let settled = event != "status" || data["status"] != "pending";
                if until.contains(&event.as_str()) && settled {
                    self.last_event_id = None;
                    // The server ends the stream after its final event: read that end, so
                    // the connection can carry the next request.
                    let end = async {
                        while let Some(frame) = body.frame().await {
                            frame?;
                        }
                        Ok::<_, hyper::Error>(())
                    };
                    if !matches!(tokio::time::timeout(STREAM_END, end).await, Ok(Ok(()))) {
                        self.disconnect();
                    }
                    return Ok(Some((event, data)));
                }
            }
        }
        self.last_event_id = None;
        Ok(None)
    }

    /// The whole visit, connecting again as often as the connection breaks.
    async fn visit(&mut self, product: Uuid, mode: Mode, poll: Duration) -> Outcome {
        let mut connected = self.connect(false).await;
        loop {
            if connected {
                let attempt = match self.order.clone() {
                    Some(order) => self.settle(&order, mode, poll).await,
                    None => self.buy(product, mode, poll).await,
                };
                match attempt {
                    Ok(outcome) => return outcome,
                    Err(Broken) => self.disconnect(),
                }
            }
            connected = self.connect(true).await;
        }
    }

    async fn buy(&mut self, product: Uuid, mode: Mode, poll: Duration) -> Result<Outcome, Broken> {
        let buy = format!("/orders/flash-sale/{product}");
        loop {
            let (status, body) = self.json("POST", &buy).await?;
            match status {
                201 => {
                    let order = body["id"].as_str().unwrap_or_default().to_owned();
                    self.order = Some(order.clone());
                    return self.settle(&order, mode, poll).await;
                }
                202 if mode == Mode::Push => {
                    let queue = format!("/orders/flash-sale/{product}/queue/events");
                    match self.follow(&queue, &["admitted", "sold_out"]).await? {
                        Some((event, _)) if event == "sold_out" => return Ok(Outcome::SoldOut),
                        // Admitted (or the stream ended): buy again with the same key.
                        _ => {}
                    }
                }
                202 => {
                    let wait = body["retry_after_ms"].as_u64().unwrap_or(1000);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                409 if body["code"] == "sold_out" => return Ok(Outcome::SoldOut),
                // Busy, a proxy's timeout, or the same request still in flight (its first
                // try's answer was lost): a browser tries again.
                408 | 429 | 502..=504 => tokio::time::sleep(Duration::from_secs(1)).await,
                409 if body["code"] == "request_in_progress" => {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                other => {
                    self.counters.note_unexpected(format!(
                        "{other} {}",
                        body["code"].as_str().unwrap_or("")
                    ));
                    return Ok(Outcome::Other(other));
                }
            }
        }
    }

    async fn settle(&mut self, order: &str, mode: Mode, poll: Duration) -> Result<Outcome, Broken> {
        let status = loop {
            if mode == Mode::Push {
                let path = format!("/orders/{order}/events");
                if let Some((_, data)) = self.follow(&path, &["status"]).await? {
                    break data["status"].as_str().unwrap_or_default().to_owned();
                }
            } else {
                let (_, data) = self.json("GET", &format!("/orders/{order}/status")).await?;
                let status = data["status"].as_str().unwrap_or_default();
                if status != "pending" && !status.is_empty() {
                    break status.to_owned();
                }
            }
            tokio::time::sleep(poll).await;
        };
        Ok(match status.as_str() {
            "paid" => Outcome::Paid,
            other => {
                self.counters.note_unexpected(format!("order {other}"));
                Outcome::Failed
            }
        })
    }
}

async fn connect(target: SocketAddr, source: Ipv4Addr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    socket.connect(target).await
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let settings = Settings::load_for(&args.config_dir, &args.env).expect("server configuration");
    let keys = TokenKeys::new(&settings.auth).expect("signing key");
    if let Some(stock) = args.create_sale {
        let base = format!("http://{}", args.target);
        let sale =
            flashsale_bench::create_flash_sale(&reqwest::Client::new(), &base, stock, &keys).await;
        println!("{sale}");
        return;
    }
    let product = args.product.expect("--product");
    let tokens: Vec<HeaderValue> = (0..args.shoppers)
        .map(|_| {
            let token = keys
                .issue(Uuid::now_v7(), Role::Customer, Uuid::new_v4())
                .expect("token");
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
        })
        .collect();
    if let Some(at) = args.start_at_ms {
        let now = chrono::Utc::now().timestamp_millis() as u64;
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
    }
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let sampler = tokio::spawn(sample(args.clone(), counters.clone(), started));
    let spacing = Duration::from_secs_f64(args.arrive_secs as f64 / args.shoppers.max(1) as f64);
    let mut visits = Vec::with_capacity(args.shoppers);
    let unanswered = Arc::new(AtomicU64::new(args.shoppers as u64));
    let all_answered = Arc::new(tokio::sync::Notify::new());
    for (i, auth) in tokens.into_iter().enumerate() {
        tokio::time::sleep_until((started + spacing * i as u32).into()).await;
        let source = Ipv4Addr::new(127, 0, 0, args.source + (i / args.per_source) as u8);
        let (args, counters) = (args.clone(), counters.clone());
        let (unanswered, all_answered) = (unanswered.clone(), all_answered.clone());
        visits.push(tokio::spawn(async move {
            let mut shopper = Shopper {
                target: args.target,
                source,
                sender: None,
                host: HeaderValue::from_str(&args.target.to_string()).expect("a host header"),
                auth,
                key: HeaderValue::from_str(&Uuid::new_v4().to_string()).expect("a key header"),
                counters: counters.clone(),
                order: None,
                last_event_id: None,
            };
            let poll = Duration::from_millis(args.poll_ms);
            let visit = shopper.visit(product, args.mode, poll);
            let outcome = tokio::time::timeout_at(deadline.into(), visit).await.ok();
            let answered_at = started.elapsed();
            let counter = match outcome {
                Some(Outcome::Paid) => &counters.paid,
                Some(Outcome::Failed) => &counters.failed,
                Some(Outcome::SoldOut) => &counters.sold_out,
                Some(Outcome::Other(_)) => &counters.other,
                None => &counters.timed_out,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // The tab stays open, idle, until everyone here has an answer.
            let everyone = all_answered.notified();
            tokio::pin!(everyone);
            everyone.as_mut().enable();
            if unanswered.fetch_sub(1, Ordering::AcqRel) == 1 {
                all_answered.notify_waiters();
            } else {
                everyone.await;
            }
            tokio::time::sleep(Duration::from_secs(args.linger_secs)).await;
            shopper.disconnect();
            outcome.map(|_| answered_at)
        }));
    }
    let mut answer_ms = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("bounds");
    let mut last = Duration::ZERO;
    for visit in visits {
        if let Ok(Some(at)) = visit.await {
            answer_ms.saturating_record(at.as_millis() as u64);
            last = last.max(at);
        }
    }
    sampler.abort();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "shoppers": args.shoppers,
            "mode": if args.mode == Mode::Push { "push" } else { "poll" },
            "paid": load(&counters.paid),
            "failed": load(&counters.failed),
            "sold_out": load(&counters.sold_out),
            "other": load(&counters.other),
            "unanswered": load(&counters.timed_out),
            "requests": load(&counters.requests),
            "pushed_events": load(&counters.pushed),
            "reconnects": load(&counters.reconnects),
            "unexpected": counters.unexpected.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "answer_ms_p50": answer_ms.value_at_quantile(0.5),
            "answer_ms_p95": answer_ms.value_at_quantile(0.95),
            "last_answer_ms": last.as_millis() as u64,
        })
    );
}

/// Once a second: a CSV line of the counters (for the chart).
async fn sample(args: Arc<Args>, counters: Arc<Counters>, started: Instant) {
    use std::io::Write;
    let Some(path) = &args.stats else { return };
    let Ok(mut file) = std::fs::File::create(path) else {
        return;
    };
    let _ = writeln!(
        file,
        "second,open,requests,answered,paid,sold_out,pushed,reconnects"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let unexpected = counters
            .unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !unexpected.is_empty() {
            eprintln!(
                "{}s unexpected: {unexpected:?}",
                started.elapsed().as_secs()
            );
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            file,
            "{},{},{},{},{},{},{},{}",
            started.elapsed().as_secs(),
            load(&counters.open),
            load(&counters.requests),
            counters.answered(),
            load(&counters.paid),
            load(&counters.sold_out),
            load(&counters.pushed),
            load(&counters.reconnects),
        );
    }
}
