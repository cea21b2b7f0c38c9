//! Flash-sale load generator: many users with real tokens, many connections, closed loop or
//! open loop at a target rate, an HDR histogram of latencies, status counts, then waits for
//! the worker to drain and checks that nothing was oversold.
//!
//! Tokens are minted with the configured signing key (login speed is measured on its own).
//! Every request is a new user, so the per-user limits never interfere, unless `--buyers N`
//! draws them from N buyers (round robin; then the limit is under test too). With
//! `--reuse-keys` each buyer sends one Idempotency-Key every time (duplicate and concurrent
//! retries of one key). With `--follow-retry` each of the N buyers arrives once (at `--rate`
//! per second, or all at once) and behaves as a real client: it waits Retry-After or the
//! ticket's `retry_after_ms` and retries with its key until a final answer; the report says
//! `sold X of Y`, how many buyers got no final answer, the time to a final answer, and how
//! many buyers were served out of arrival order.
//!
//! With `--stats run.csv` (open or closed loop, not `--follow-retry`) it writes one line per
//! second for bench/src/bin/chart.rs: requests sent, orders accepted, requests in flight,
//! HTTP latency percentiles of the requests answered that second, and, read from PostgreSQL
//! once the sale has drained, orders paid by then and the accept-to-paid percentiles of the
//! orders paid that second.
//!
//! With `--regular` the orders are regular ones (`POST /orders`, one unit of a regular
//! product) instead of the flash-sale route's.
//!
//!     order_load --config-dir config --env development --stock 200000 --duration-secs 30 \
//!                --connections 256 [--rate 6000] [--path /orders/flash-sale/{product}] \
//!                [--stats run.csv]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use flashsale::config::Settings;
use flashsale::infra::db::Databases;
use flashsale::modules::auth::TokenKeys;
use flashsale::modules::users::Role;
use flashsale_bench::Recorder;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    /// Where the server's configuration lives (for the signing key and database URLs).
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    #[arg(long, default_value = "development")]
    env: String,
    /// Units on sale (a fresh product is created unless --product is given).
    #[arg(long, default_value_t = 200_000)]
    stock: i64,
    #[arg(long)]
    product: Option<Uuid>,
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Requests in flight at once (closed loop) or at most (open loop).
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Open loop: send at this many requests per second; latency counts from the
    /// scheduled send time, so a stalled server is not hidden (no coordinated omission).
    #[arg(long)]
    rate: Option<u64>,
    /// Route under test; `{product}` is replaced (the naive baseline uses /naive/{product}).
    #[arg(long, default_value = "/orders/flash-sale/{product}")]
    path: String,
    /// Regular orders (`POST /orders`, one unit of a regular product) instead of the route.
    #[arg(long, conflicts_with = "path")]
    regular: bool,
    /// Seconds to wait for the worker to settle every accepted order.
    #[arg(long, default_value_t = 180)]
    drain_timeout_secs: u64,
    /// Requests come from this many buyers, in turn (default: a new buyer per request).
    #[arg(long)]
    buyers: Option<usize>,
    /// Each buyer sends the same Idempotency-Key with every request (needs --buyers).
    #[arg(long, requires = "buyers")]
    reuse_keys: bool,
    /// Each buyer arrives once and retries until a final answer (needs --buyers).
    #[arg(long, requires = "buyers")]
    follow_retry: bool,
    /// With --follow-retry: a buyer still without a final answer this long after arriving
    /// counts as unanswered.
    #[arg(long, default_value_t = 120)]
    answer_timeout_secs: u64,
    /// Print this many buyers' bearer tokens, one per line, and exit (for the wrk scripts in
    /// bench/wrk/).
    #[arg(long)]
    mint_tokens: Option<usize>,
    /// Open loop: the buyer of every Nth accepted order cancels it at once, before its
    /// worker settles it (the fault suite's cancel_before_settle).
    #[arg(long)]
    cancel_every: Option<u64>,
    /// Per-second samples (CSV) of the run, for bench/src/bin/chart.rs.
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// What the per-second sampler reads while the load runs.
struct Live {
    sent: AtomicU64,
    accepted: AtomicU64,
    in_flight: AtomicI64,
    /// Microseconds, of the requests answered since the last sample.
    latency: Mutex<Histogram<u64>>,
}

impl Live {
    fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")),
        }
    }

    fn answered(&self, latency: Duration, status: Option<u16>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if status == Some(201) {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(micros.max(1));
    }
}

/// One second of the load: sent, accepted, in flight, then HTTP p50/p95/p99 in ms.
type LiveSample = [String; 6];

/// Samples `live` once a second until `end`.
async fn sample_live(live: Arc<Live>, started: Instant, end: Instant) -> Vec<LiveSample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    while Instant::now() < end + Duration::from_secs(1) {
        tick.tick().await;
        let mut latency = live.latency.lock().unwrap_or_else(PoisonError::into_inner);
        let ms = |q: f64| {
            if latency.is_empty() {
                String::new()
            } else {
                format!("{:.1}", latency.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let percentiles = [ms(0.5), ms(0.95), ms(0.99)];
        latency.reset();
        drop(latency);
        let [p50, p95, p99] = percentiles;
        samples.push([
            AtomicU64::load(&live.sent, Ordering::Relaxed).to_string(),
            AtomicU64::load(&live.accepted, Ordering::Relaxed).to_string(),
            AtomicI64::load(&live.in_flight, Ordering::Relaxed).to_string(),
            p50,
            p95,
            p99,
        ]);
    }
    samples
}

#[derive(QueryableByName)]
struct PaidAt {
    /// Milliseconds since the load started.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    paid_ms: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    ms: i64,
}

/// Writes `--stats`: the live samples, and per second the orders paid by then and the
/// accept-to-paid percentiles of those paid in it (read now that the sale has drained).
async fn write_stats(
    path: &PathBuf,
    live: &[LiveSample],
    db: &Databases,
    product: Uuid,
    started_at: chrono::DateTime<chrono::Utc>,
) {
    let sql = format!(
        "SELECT (extract(epoch FROM (o.updated_at - '{}'::timestamptz)) * 1000)::bigint AS paid_ms, \
                (extract(epoch FROM (o.updated_at - o.created_at)) * 1000)::bigint AS ms \
         FROM orders o JOIN order_items i ON i.order_id = o.id \
         WHERE i.product_id = '{product}' AND o.status = 'paid'",
        started_at.to_rfc3339()
    );
    let mut by_second: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    for shard in db.shards() {
        let mut conn = shard.primary().get().await.expect("shard connection");
        let rows: Vec<PaidAt> = diesel::sql_query(&sql).load(&mut conn).await.expect("paid");
        for row in rows {
            by_second
                .entry(u64::try_from(row.paid_ms / 1000).unwrap_or(0) + 1)
                .or_insert_with(|| Histogram::new_with_bounds(1, 3_600_000, 3).expect("bounds"))
                .saturating_record(row.ms.max(1) as u64);
        }
    }
    let seconds = (live.len() as u64).max(by_second.keys().last().copied().unwrap_or(0));
    let mut file = std::fs::File::create(path).expect("stats file");
    let mut lines = vec![
        "second,sent,accepted,in_flight,paid,paid_p50_ms,paid_p95_ms,paid_p99_ms,http_p50_ms,http_p95_ms,http_p99_ms".to_owned(),
    ];
    let mut paid = 0;
    for second in 1..=seconds {
        let [p50, p95, p99] = match by_second.get(&second) {
            Some(histogram) => {
                paid += histogram.len();
                [0.5, 0.95, 0.99].map(|q| histogram.value_at_quantile(q).to_string())
            }
            None => Default::default(),
        };
        let mut line = format!("{second}");
        match live.get(second as usize - 1) {
            Some(sample) => {
                let [sent, accepted, in_flight, http @ ..] = sample;
                line += &format!(",{sent},{accepted},{in_flight},{paid},{p50},{p95},{p99},");
                line += &http.join(",");
            }
            // Draining: the load is over.
            None => {
                let (sent, accepted) = live.last().map_or(("0", "0"), |s| (&s[0], &s[1]));
                line += &format!(",{sent},{accepted},0,{paid},{p50},{p95},{p99}");
            }
        }
        lines.push(line);
    }
    writeln!(file, "{}", lines.join("\n")).expect("write stats");
}

/// Who sends the next request, and with which Idempotency-Key.
struct Senders {
    keys: Arc<TokenKeys>,
    /// (token, idempotency key) per buyer, when the load comes from a fixed set of buyers.
    buyers: Vec<(String, String)>,
    /// Open loop, a new buyer per request: their tokens, minted before the load starts (a
    /// client does not sign its own tokens; signing in the loop took the server's cores).
    fresh_tokens: Vec<String>,
    reuse_keys: bool,
    /// Every order's body.
    order: Bytes,
    next: AtomicUsize,
    /// Order ids answered 201 (a replay answers an id already here).
    accepted: std::sync::Mutex<std::collections::HashSet<Uuid>>,
    cancel_every: Option<u64>,
    /// Cancels answered 200.
    cancelled: AtomicU64,
}

impl Senders {
    fn new(keys: Arc<TokenKeys>, args: &Args, order: Bytes) -> Self {
        let buyers = (0..args.buyers.unwrap_or(0))
            .map(|_| {
                let token = keys
                    .issue(Uuid::now_v7(), Role::Customer, Uuid::new_v4())
                    .expect("buyer token");
                (token, Uuid::new_v4().to_string())
            })
            .collect();
        let scheduled = match (args.rate, &args.buyers) {
            (Some(rate), None) => rate.saturating_mul(args.duration_secs).min(MAX_PREMINTED),
            _ => 0,
        };
        let fresh_tokens = (0..scheduled)
            .map(|_| {
                keys.issue(Uuid::now_v7(), Role::Customer, Uuid::new_v4())
                    .expect("buyer token")
            })
            .collect();
        Self {
            keys,
            buyers,
            fresh_tokens,
            reuse_keys: args.reuse_keys,
            order,
            next: Default::default(),
            accepted: Default::default(),
            cancel_every: args.cancel_every.filter(|n| *n > 0),
            cancelled: Default::default(),
        }
    }

    /// Whether the order accepted as the `nth` (counting from 1) is to be cancelled.
    fn cancels(&self, nth: usize) -> bool {
        self.cancel_every
            .is_some_and(|every| (nth as u64).is_multiple_of(every))
    }

    fn next(&self) -> Option<(String, String)> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.buyers.is_empty() {
            let token = match self.fresh_tokens.get(turn) {
                Some(token) => token.clone(),
                None => self
                    .keys
                    .issue(Uuid::now_v7(), Role::Customer, Uuid::new_v4())
                    .ok()?,
            };
            return Some((token, Uuid::new_v4().to_string()));
        }
        let (token, key) = &self.buyers[turn % self.buyers.len()];
        let key = if self.reuse_keys {
            key.clone()
        } else {
            Uuid::new_v4().to_string()
        };
        Some((token.clone(), key))
    }
}

/// Tokens minted before an open-loop run at most (about 0.5 GB).
const MAX_PREMINTED: u64 = 2_000_000;

// One thread, as wrk runs one event loop per thread: the generator shares the server's two
// cores, and on a second thread its every request crossed threads (futex wake-ups) twice.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let settings = Settings::load_for(&args.config_dir, &args.env).expect("configuration loads");
    let keys = Arc::new(TokenKeys::new(&settings.auth).expect("signing keys"));
    if let Some(count) = args.mint_tokens {
        for _ in 0..count {
            let token = keys
                .issue(Uuid::now_v7(), Role::Customer, Uuid::new_v4())
                .expect("buyer token");
            println!("{token}");
        }
        return;
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let product = match args.product {
        Some(product) => product,
        None if args.regular => {
            flashsale_bench::create_regular_product(&client, &args.base_url, args.stock, &keys)
                .await
        }
        None => {
            flashsale_bench::create_flash_sale(&client, &args.base_url, args.stock, &keys).await
        }
    };
    let (path, order) = if args.regular {
        let order = serde_json::json!({"items": [{"product_id": product, "quantity": 1}]});
        ("/orders".to_owned(), Bytes::from(order.to_string()))
    } else {
        let path = args.path.replace("{product}", &product.to_string());
        (path, Bytes::from_static(FLASH_SALE_ORDER.as_bytes()))
    };
    let url = format!("{}{path}", args.base_url);
    println!(
        "product {product}: {} units; {}",
        args.stock,
        describe(&args)
    );

    let senders = Arc::new(Senders::new(keys.clone(), &args, order));
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let live = Arc::new(Live::new());
    let end = started + Duration::from_secs(args.duration_secs);
    let sampler = tokio::spawn(sample_live(live.clone(), started, end));
    let total = if args.follow_retry {
        follow_buyers(&args, &client, &url, &senders).await
    } else {
        run_load(&args, &url, &senders, &live).await
    };
    let live_samples = sampler.await.unwrap_or_default();
    let elapsed = started.elapsed();
    let accepted = senders.accepted.lock().map_or(0, |ids| ids.len() as u64);
    println!("load: {}", total.report(elapsed));
    println!(
        "accepted {accepted} orders (distinct) = {:.0} orders/s",
        accepted as f64 / elapsed.as_secs_f64()
    );
    if args.cancel_every.is_some() {
        println!(
            "cancelled {} of them at once",
            AtomicU64::load(&senders.cancelled, Ordering::Relaxed)
        );
    }

    let db = Databases::connect(&settings.database)
        .await
        .expect("databases");
    let at_end = settled(&db, product).await;
    println!(
        "at load end: {} of {accepted} accepted orders already settled by the worker",
        at_end.settled()
    );
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.drain_timeout_secs);
    let mut counts = at_end;
    while counts.settled() < accepted && Instant::now() < deadline && settles(&args) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        counts = settled(&db, product).await;
    }
    println!(
        "drained {} more in {:.2}s; worker overall {:.0} orders/s | paid {} failed {} pending {}",
        counts.settled() - at_end.settled(),
        drain_started.elapsed().as_secs_f64(),
        counts.settled() as f64 / (elapsed + drain_started.elapsed()).as_secs_f64(),
        counts.paid,
        counts.failed,
        counts.pending,
    );
    if settles(&args) {
        accept_to_paid(&db, product).await;
    }
    if let Some(path) = &args.stats {
        write_stats(path, &live_samples, &db, product, started_at).await;
        println!("per-second samples: {}", path.display());
    }
    check_oversell(&db, &client, &args, product, accepted).await;
}

fn describe(args: &Args) -> String {
    match args.rate {
        Some(rate) => format!(
            "open loop at {rate}/s for {}s, up to {} in flight",
            args.duration_secs, args.connections
        ),
        None => format!(
            "closed loop, {} connections, {}s",
            args.connections, args.duration_secs
        ),
    }
}

/// What an attempt was told: its status, how long to wait before trying again, the
/// problem's code.
struct Answer {
    status: u16,
    wait: Option<Duration>,
    code: Option<String>,
    /// A new order accepted, and to be cancelled at once (--cancel-every).
    to_cancel: Option<Uuid>,
}

impl Answer {
    /// 201, or a refusal that trying again will not change.
    fn is_final(&self) -> bool {
        match self.status {
            202 | 429 | 503 => false,
            409 => self.code.as_deref() != Some("request_in_progress"),
            _ => true,
        }
    }
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    key: &str,
    senders: &Senders,
) -> Option<Answer> {
    let res = client
        .post(url)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .header(CONTENT_TYPE, "application/json")
        .body(senders.order.clone())
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    let retry_after = res.headers().get(RETRY_AFTER).cloned();
    // Read the body so the connection goes back to the pool.
    let body = res.bytes().await.ok()?;
    Some(Answer::read(status, retry_after.as_ref(), &body, senders))
}

/// Every flash-sale order of the load: one unit, the default payment method.
const FLASH_SALE_ORDER: &str = r#"{"quantity":1}"#;

/// Whether the orders under test go to the worker (the naive baseline's do not).
fn settles(args: &Args) -> bool {
    args.regular || args.path.contains("flash-sale")
}

/// The fields of an answer the load reads (an order's id, a ticket's wait, a problem's code).
#[derive(serde::Deserialize, Default)]
struct Reply {
    id: Option<Uuid>,
    retry_after_ms: Option<u64>,
    code: Option<String>,
}

impl Answer {
    fn read(
        status: u16,
        retry_after: Option<&HeaderValue>,
        body: &[u8],
        senders: &Senders,
    ) -> Self {
        let reply: Reply = serde_json::from_slice(body).unwrap_or_default();
        let mut to_cancel = None;
        if status == 201 {
            if let (Some(order), Ok(mut accepted)) = (reply.id, senders.accepted.lock()) {
                if accepted.insert(order) && senders.cancels(accepted.len()) {
                    to_cancel = Some(order);
                }
            }
        }
        let retry_after = retry_after
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_secs);
        Self {
            status,
            wait: reply
                .retry_after_ms
                .map(Duration::from_millis)
                .or(retry_after),
            code: reply.code,
            to_cancel,
        }
    }
}

/// One keep-alive HTTP/1.1 connection of the open or closed loop, owned by one task: its
/// requests go one after another, as wrk sends them, with no pool to check it out of and no
/// request builder (reqwest's took about a third of the generator's CPU).
struct Connection {
    uri: Uri,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    fn new(uri: Uri) -> Self {
        Self { uri, sender: None }
    }

    /// The answer, or `None` on a transport error (the connection is then opened again).
    async fn order(&mut self, senders: &Senders) -> Option<u16> {
        let (token, key) = senders.next()?;
        let sent = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send(&token, &key, senders.order.clone()),
        )
        .await;
        match sent {
            Ok(Some((status, retry_after, body))) => {
                let answer = Answer::read(status, retry_after.as_ref(), &body, senders);
                if let Some(order) = answer.to_cancel {
                    self.cancel(&token, order, senders).await;
                }
                Some(answer.status)
            }
            _ => {
                self.sender = None;
                None
            }
        }
    }

    async fn send(
        &mut self,
        token: &str,
        key: &str,
        order: Bytes,
    ) -> Option<(u16, Option<HeaderValue>, Bytes)> {
        let request = Request::post(self.uri.clone())
            .header(HOST, self.uri.authority()?.as_str())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header("idempotency-key", key)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(order))
            .ok()?;
        self.exchange(request).await
    }

    /// The buyer cancels `order` (PUT /orders/{id}/cancel) on this connection.
    async fn cancel(&mut self, token: &str, order: Uuid, senders: &Senders) {
        let Some(authority) = self.uri.authority().map(|a| a.as_str().to_owned()) else {
            return;
        };
        let request = Request::put(format!("http://{authority}/orders/{order}/cancel"))
            .header(HOST, authority)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()));
        let Ok(request) = request else { return };
        let answered = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request)).await;
        match answered {
            Ok(Some((200, _, _))) => {
                senders.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            _ => self.sender = None,
        }
    }

    /// One request and its whole answer, opening the connection first when it is closed.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Option<(u16, Option<HeaderValue>, Bytes)> {
        let sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => self.sender.insert(sender),
            _ => self.sender.insert(connect(&self.uri).await?),
        };
        sender.ready().await.ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, retry_after, body))
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(uri: &Uri) -> Option<SendRequest<Full<Bytes>>> {
    let authority = uri.authority()?;
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// `--follow-retry`: every buyer arrives once and retries until a final answer.
async fn follow_buyers(
    args: &Args,
    client: &reqwest::Client,
    url: &str,
    senders: &Arc<Senders>,
) -> Recorder {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.connections));
    let gap = args
        .rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate as f64));
    let timeout = Duration::from_secs(args.answer_timeout_secs);
    let start = Instant::now();
    let mut buyers = Vec::with_capacity(senders.buyers.len());
    for (arrival, (token, key)) in senders.buyers.iter().cloned().enumerate() {
        if let Some(gap) = gap {
            let due = start + gap * arrival as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let (client, url, senders, in_flight) = (
            client.clone(),
            url.to_owned(),
            senders.clone(),
            in_flight.clone(),
        );
        buyers.push(tokio::spawn(async move {
            let arrived = Instant::now();
            let mut recorder = Recorder::default();
            loop {
                if arrived.elapsed() > timeout {
                    return (arrival, None, arrived.elapsed(), recorder);
                }
                let sent = Instant::now();
                let answer = {
                    let _slot = in_flight.acquire().await.expect("semaphore open");
                    send(&client, &url, &token, &key, &senders).await
                };
                recorder.record(sent.elapsed(), answer.as_ref().map(|a| a.status));
                match answer {
                    Some(answer) if answer.is_final() => {
                        return (arrival, Some(answer), arrived.elapsed(), recorder)
                    }
                    Some(answer) => {
                        let wait = answer.wait.unwrap_or(Duration::from_secs(1));
                        tokio::time::sleep(wait.min(timeout)).await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }));
    }
    let mut total = Recorder::default();
    let mut to_answer = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("histogram");
    let (mut unanswered, mut outcomes) = (0, vec![]);
    for buyer in futures_util::future::join_all(buyers).await {
        let (arrival, answer, took, recorder) = buyer.expect("buyer task");
        total.merge(&recorder);
        match answer {
            Some(answer) => {
                to_answer.saturating_record((took.as_millis() as u64).max(1));
                outcomes.push((arrival, answer.status, answer.code));
            }
            None => unanswered += 1,
        }
    }
    // Served out of arrival order: sold to a buyer who arrived after one told sold_out.
    let first_refused = outcomes
        .iter()
        .filter(|(_, status, code)| *status == 409 && code.as_deref() == Some("sold_out"))
        .map(|(arrival, _, _)| *arrival)
        .min();
    let out_of_order = outcomes
        .iter()
        .filter(|(arrival, status, _)| {
            *status == 201 && first_refused.is_some_and(|f| *arrival > f)
        })
        .count();
    let sold = senders.accepted.lock().map_or(0, |ids| ids.len());
    println!(
        "sold {sold} of {} | unanswered {unanswered} of {} buyers | time to final answer ms p50 {} p95 {} p99 {} max {} | served out of arrival order {out_of_order}",
        args.stock,
        senders.buyers.len(),
        to_answer.value_at_quantile(0.5),
        to_answer.value_at_quantile(0.95),
        to_answer.value_at_quantile(0.99),
        to_answer.max(),
    );
    total
}

async fn run_load(args: &Args, url: &str, senders: &Arc<Senders>, live: &Arc<Live>) -> Recorder {
    let uri: Uri = url.parse().expect("a base URL and path that make a URI");
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration_secs);
    // Open loop: slot k is due at start + k/rate. A free connection takes the next slot and
    // waits for it; a slot taken late (every connection was busy: the server fell behind)
    // keeps counting its latency from when it was due. Slots not taken by the end are not
    // sent.
    let rate = args.rate.map(|rate| rate as f64);
    let next_slot = Arc::new(AtomicU64::new(0));
    let workers = (0..args.connections).map(|_| {
        let (senders, next_slot, live) = (senders.clone(), next_slot.clone(), live.clone());
        let mut connection = Connection::new(uri.clone());
        tokio::spawn(async move {
            let mut recorder = Recorder::default();
            while Instant::now() < end {
                let scheduled = match rate {
                    Some(rate) => {
                        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_secs_f64(slot as f64 / rate);
                        if due >= end {
                            break;
                        }
                        if due > Instant::now() {
                            tokio::time::sleep_until(due.into()).await;
                        }
                        due
                    }
                    None => Instant::now(),
                };
                live.sent.fetch_add(1, Ordering::Relaxed);
                live.in_flight.fetch_add(1, Ordering::Relaxed);
                let status = connection.order(&senders).await;
                live.answered(scheduled.elapsed(), status);
                recorder.record(scheduled.elapsed(), status);
            }
            recorder
        })
    });
    let mut total = Recorder::default();
    for done in futures_util::future::join_all(workers).await {
        total.merge(&done.expect("load task"));
    }
    total
}

#[derive(QueryableByName, Default, Clone, Copy)]
struct Settled {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    paid: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    failed: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pending: i64,
}

impl Settled {
    fn settled(&self) -> u64 {
        (self.paid + self.failed) as u64
    }
}

async fn settled(db: &Databases, product: Uuid) -> Settled {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE o.status = 'paid') AS paid, \
                count(*) FILTER (WHERE o.status IN ('failed', 'cancelled')) AS failed, \
                count(*) FILTER (WHERE o.status = 'pending') AS pending \
         FROM orders o JOIN order_items i ON i.order_id = o.id WHERE i.product_id = '{product}'"
    );
    let mut total = Settled::default();
    for shard in db.shards() {
        let mut conn = shard.primary().get().await.expect("shard connection");
        let row: Settled = diesel::sql_query(&sql)
            .get_result(&mut conn)
            .await
            .expect("count orders");
        total.paid += row.paid;
        total.failed += row.failed;
        total.pending += row.pending;
    }
    total
}

#[derive(QueryableByName)]
struct Millis {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    ms: i64,
}

/// Time from acceptance (created_at, set by the API) to paid (updated_at, set by the worker).
async fn accept_to_paid(db: &Databases, product: Uuid) {
    let sql = format!(
        "SELECT (extract(epoch FROM (o.updated_at - o.created_at)) * 1000)::bigint AS ms FROM orders o \
         JOIN order_items i ON i.order_id = o.id WHERE i.product_id = '{product}' AND o.status = 'paid'"
    );
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("histogram");
    for shard in db.shards() {
        let mut conn = shard.primary().get().await.expect("shard connection");
        let rows: Vec<Millis> = diesel::sql_query(&sql)
            .load(&mut conn)
            .await
            .expect("latencies");
        for row in rows {
            histogram.saturating_record(row.ms.max(1) as u64);
        }
    }
    println!(
        "accept-to-paid ms: p50 {} p95 {} p99 {} max {} ({} orders)",
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.95),
        histogram.value_at_quantile(0.99),
        histogram.max(),
        histogram.len()
    );
}

#[derive(QueryableByName)]
struct Units {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    units: i64,
}

async fn check_oversell(
    db: &Databases,
    client: &reqwest::Client,
    args: &Args,
    product: Uuid,
    accepted: u64,
) {
    let sql = format!(
        "SELECT coalesce(sum(i.quantity), 0)::bigint AS units FROM orders o JOIN order_items i ON i.order_id = o.id \
         WHERE i.product_id = '{product}' AND o.status NOT IN ('failed', 'cancelled')"
    );
    let mut sold = 0;
    for shard in db.shards() {
        let mut conn = shard.primary().get().await.expect("shard connection");
        let row: Units = diesel::sql_query(&sql)
            .get_result(&mut conn)
            .await
            .expect("units");
        sold += row.units;
    }
    let mut conn = db
        .global()
        .primary()
        .get()
        .await
        .expect("global connection");
    let inventory: Units = diesel::sql_query(format!(
        "SELECT inventory::bigint AS units FROM products WHERE id = '{product}'"
    ))
    .get_result(&mut conn)
    .await
    .expect("inventory");
    // The naive baseline has no flash-sale list; then there is no Redis figure to show.
    let listed: Value = match client
        .get(format!("{}/products/flash-sale?limit=100", args.base_url))
        .send()
        .await
    {
        Ok(res) => res.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let remaining = listed["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["id"] == product.to_string()))
        .and_then(|i| i["remaining"].as_i64());
    let oversold = sold > args.stock;
    println!(
        "oversell check: stock {} sold {sold} (accepted {accepted}) inventory {} redis remaining {remaining:?} -> {}",
        args.stock,
        inventory.units,
        if oversold { "OVERSOLD" } else { "no oversell" }
    );
    if oversold {
        std::process::exit(1);
    }
}
