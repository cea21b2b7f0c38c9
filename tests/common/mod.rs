//! Test harness: every test gets its own databases (cloned from migrated templates), its
//! own Redis key prefix, and a real HTTP server on a free port, so tests run in parallel
//! without seeing each other's data.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use flashsale::app::{self, AppState};
use flashsale::config::{DatabaseNode, Settings};
use flashsale::infra::db::{self, create_database, run_migrations};
use serde_json::{json, Value};
use uuid::Uuid;

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const TEMPLATE_GLOBAL: &str = "fst_tpl_global";
const TEMPLATE_SHARD: &str = "fst_tpl_shard";
/// Serialises template migration and cloning across parallel test processes.
const TEMPLATE_LOCK: i64 = 0x0f1a_5a1e;

/// An order's final status, as `wait_settled` found it. It compares with a status name; a
/// failed assertion shows why the worker failed it.
#[derive(Debug)]
pub struct Settled {
    pub order: Uuid,
    pub status: String,
    pub failure_reason: Option<String>,
}

impl PartialEq<&str> for Settled {
    fn eq(&self, other: &&str) -> bool {
        self.status == *other
    }
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.status)
    }
}

pub fn test_settings() -> Settings {
    Settings::load_for(Path::new("config"), "test").expect("config/test.toml loads")
}

type SettingsTweak = Box<dyn FnOnce(&mut Settings)>;

pub struct TestAppBuilder {
    shards: usize,
    lagging_replicas: bool,
    tweaks: Vec<SettingsTweak>,
}

impl TestAppBuilder {
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// Gives every shard a "replica" that never receives writes: a replica lagging forever.
    /// Reads that reach it see nothing, which makes routing observable.
    pub fn lagging_replicas(mut self) -> Self {
        self.lagging_replicas = true;
        self
    }

    /// Runs on the local Redis Cluster (`scripts/services.sh` starts it) instead of one node.
    pub fn redis_cluster(self) -> Self {
        self.configure(|s| {
            s.redis.cluster = true;
            s.redis.url = std::env::var("FLASHSALE_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
                "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
            });
        })
    }

    pub fn configure(mut self, tweak: impl FnOnce(&mut Settings) + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Databases, prefix and settings, without a server.
    pub async fn settings(self) -> (Settings, String) {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut settings = test_settings();
        let global = format!("{SERVER}/fst_{id}_global");
        let mut clones = vec![(global.clone(), TEMPLATE_GLOBAL)];
        settings.database.global = DatabaseNode {
            primary: global,
            replicas: vec![],
            direct: None,
        };
        settings.database.shards = (0..self.shards)
            .map(|i| {
                let primary = format!("{SERVER}/fst_{id}_s{i}");
                clones.push((primary.clone(), TEMPLATE_SHARD));
                let replicas = if self.lagging_replicas {
                    let replica = format!("{SERVER}/fst_{id}_s{i}_replica");
                    clones.push((replica.clone(), TEMPLATE_SHARD));
                    vec![replica]
                } else {
                    vec![]
                };
                DatabaseNode {
                    primary,
                    replicas,
                    direct: None,
                }
            })
            .collect();
        settings.redis.key_prefix = format!("t:{id}:");
        settings.amqp.queue_prefix = format!("t.{id}.");
        settings.amqp.connection_name = format!("flashsale-test-{id}");
        settings.search.index_dir = std::env::temp_dir().join(format!("flashsale-search-{id}"));
        settings.search.refresh_ms = 200;
        for tweak in self.tweaks {
            tweak(&mut settings);
        }
        clone_databases(&clones).await;
        (settings, id)
    }

    pub async fn spawn(self) -> TestApp {
        let (settings, id) = self.settings().await;
        TestApp::serve(settings, id).await
    }
}

impl TestApp {
    /// An API process on `settings` (its databases exist): HTTP, indexer, admission, feed.
    async fn serve(settings: Settings, id: String) -> TestApp {
        let state = AppState::build(settings).await.expect("app state builds");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let address = format!("http://{}", listener.local_addr().expect("local addr"));
        let server = app::http_server(state.clone(), listener).expect("server starts");
        tokio::spawn(server);
        flashsale::modules::products::spawn_indexer(state.clone());
        tokio::spawn(flashsale::modules::orders::run_admission(state.clone()));
        tokio::spawn(flashsale::modules::orders::run_feed(state.clone()));
        TestApp {
            address,
            client: reqwest::Client::new(),
            state,
            id,
        }
    }

    /// A second API process on this one's databases, Redis prefix and queues: another pod
    /// behind the same load balancer.
    pub async fn spawn_peer(&self) -> TestApp {
        Self::serve((*self.state.settings).clone(), self.id.clone()).await
    }
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// Migrates the templates (cheap when nothing is pending) and clones this test's databases
/// from them, all under one advisory lock.
async fn clone_databases(clones: &[(String, &str)]) {
    let mut admin = AsyncPgConnection::establish(&format!("{SERVER}/postgres"))
        .await
        .expect("connect to postgres");
    diesel::sql_query(format!(
        "SELECT pg_advisory_lock({TEMPLATE_LOCK}) IS NOT NULL AS locked"
    ))
    .get_result::<Locked>(&mut admin)
    .await
    .expect("template lock");
    for (template, migrations) in [
        (TEMPLATE_GLOBAL, db::GLOBAL_MIGRATIONS),
        (TEMPLATE_SHARD, db::SHARD_MIGRATIONS),
    ] {
        let url = format!("{SERVER}/{template}");
        create_database(&url, None).await.expect("create template");
        run_migrations(&url, migrations)
            .await
            .expect("migrate template");
    }
    for (url, template) in clones {
        // The migration connection may take a moment to close; Postgres refuses to clone a
        // template that still has a session.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match create_database(url, Some(template)).await {
                Ok(()) => break,
                Err(e)
                    if Instant::now() < deadline && e.to_string().contains("accessed by other") =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("clone {template} -> {url}: {e}"),
            }
        }
    }
    diesel::sql_query(format!(
        "SELECT pg_advisory_unlock({TEMPLATE_LOCK}) AS locked"
    ))
    .get_result::<Locked>(&mut admin)
    .await
    .expect("template unlock");
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub id: String,
}

/// A registered user and their tokens.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: Uuid,
    pub email: String,
    pub password: String,
    pub access: String,
    pub refresh: String,
}

pub const PASSWORD: &str = "correct horse battery";

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            shards: 4,
            lagging_replicas: false,
            tweaks: vec![],
        }
    }

    /// A shared app whose settings `tweak` changed.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings) + 'static) -> Arc<TestApp> {
        Arc::new(Self::builder().configure(tweak).spawn().await)
    }

    pub async fn spawn() -> TestApp {
        Self::builder().spawn().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().await.expect("request sent")
    }

    /// A GET whose JSON body the test wants, whatever the status.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> Value {
        self.get(path, token).await.json().await.expect("json body")
    }

    pub async fn put_json(&self, path: &str, body: &Value, token: &str) -> reqwest::Response {
        self.send(reqwest::Method::PUT, path, token, Some(body))
            .await
    }

    pub async fn patch_json(&self, path: &str, body: &Value, token: &str) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, token, Some(body))
            .await
    }

    /// Any authenticated request, with a JSON body when given.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        req.send().await.expect("request sent")
    }

    /// `POST /auth/refresh` with `token` (a string, or a JSON value holding one).
    pub async fn refresh(&self, token: impl serde::Serialize) -> reqwest::Response {
        self.post_json("/auth/refresh", &json!({ "refresh_token": token }), None)
            .await
    }

    pub async fn register(&self, email: &str) -> Session {
        self.authenticate("/auth/register", email, 201).await
    }

    pub async fn login(&self, email: &str) -> Session {
        self.authenticate("/auth/login", email, 200).await
    }

    async fn authenticate(&self, path: &str, email: &str, expected: u16) -> Session {
        let body = json!({"email": email, "password": PASSWORD});
        let res = self.post_json(path, &body, None).await;
        assert_eq!(res.status().as_u16(), expected, "{path} {email}");
        session_from(res, email).await
    }

    /// Registers a user and makes them an admin (as `flashsale admin grant` does).
    pub async fn register_admin(&self, email: &str) -> Session {
        self.register(email).await;
        flashsale::modules::auth::grant_admin(&self.state, email)
            .await
            .expect("grant admin");
        self.login(email).await
    }

    /// A connection to shard `index`'s primary, for assertions.
    pub async fn shard_conn(&self, index: usize) -> AsyncPgConnection {
        let url = &self.state.settings.database.shards[index].primary;
        AsyncPgConnection::establish(url)
            .await
            .expect("connect shard")
    }

    pub async fn global_conn(&self) -> AsyncPgConnection {
        let url = &self.state.settings.database.global.primary;
        AsyncPgConnection::establish(url)
            .await
            .expect("connect global")
    }

    pub async fn count(&self, conn: &mut AsyncPgConnection, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query(sql)
            .get_result::<Count>(conn)
            .await
            .expect("count query")
            .n
    }

    /// Rows in the users tables of all shards plus the email directory.
    pub async fn stored_user_rows(&self) -> i64 {
        let mut total = self
            .count(
                &mut self.global_conn().await,
                "SELECT count(*) AS n FROM email_directory",
            )
            .await;
        for i in 0..self.state.settings.database.shards.len() {
            total += self
                .count(
                    &mut self.shard_conn(i).await,
                    "SELECT count(*) AS n FROM users",
                )
                .await;
        }
        total
    }

    pub async fn redis_exists(&self, suffix: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(self.state.redis.key(suffix))
            .query_async::<i64>(&mut self.state.redis.conn())
            .await
            .expect("redis exists")
            == 1
    }

    pub async fn redis_del(&self, suffix: &str) {
        redis::cmd("DEL")
            .arg(self.state.redis.key(suffix))
            .query_async::<i64>(&mut self.state.redis.conn())
            .await
            .expect("redis del");
    }
}

async fn session_from(res: reqwest::Response, email: &str) -> Session {
    let body: Value = res.json().await.expect("json body");
    Session {
        user_id: body["user"]["id"]
            .as_str()
            .expect("user id")
            .parse()
            .expect("uuid"),
        email: email.to_owned(),
        password: PASSWORD.to_owned(),
        access: body["access_token"]
            .as_str()
            .expect("access token")
            .to_owned(),
        refresh: body["refresh_token"]
            .as_str()
            .expect("refresh token")
            .to_owned(),
    }
}

/// Asserts a problem+json answer with `status` and `code`; returns the body.
pub async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(
        res.status().as_u16(),
        status,
        "status for expected `{code}`"
    );
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = res.json().await.expect("problem body");
    assert_eq!(body["code"], code, "problem body {body}");
    assert_eq!(body["status"], status);
    body
}

pub fn unique_email(tag: &str) -> String {
    format!("{tag}-{}@example.com", Uuid::new_v4().simple())
}

/// A background order-worker with its own connections, as a separate process would have.
pub struct Worker {
    pub state: AppState,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Stops the worker abruptly, mid-batch if it is in one: the task is dropped and its
    /// broker connection closed, so unacked messages go back to the queue.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = self
            .state
            .amqp
            .connection()
            .close(320, "killed by test".into())
            .await;
    }
}

impl TestApp {
    /// The order-worker role: the consumer and the reconciler (stopped together by `kill`).
    pub async fn spawn_worker(&self) -> Worker {
        self.spawn_worker_with(|_| {}).await
    }

    /// The order worker with settings of its own: a test that releases reservations at
    /// once by hand (`reservation_timeout_secs = 0`) keeps its worker's reconciler from
    /// releasing those of orders still on their way.
    pub async fn spawn_worker_with(&self, tweak: impl FnOnce(&mut Settings)) -> Worker {
        use flashsale::modules::orders;
        let mut settings = (*self.state.settings).clone();
        tweak(&mut settings);
        self.spawn_role_with(settings, |state: AppState| async move {
            tokio::select! {
                stopped = orders::run_worker(state.clone()) => stopped,
                stopped = orders::run_refunds(state.clone()) => stopped,
                () = orders::run_reconciler(state) => Ok(()),
            }
        })
        .await
    }

    /// The invariant auditor, on its own.
    pub async fn spawn_auditor(&self) -> Worker {
        self.spawn_role(|state: AppState| async move {
            flashsale::modules::products::run_auditor(state).await;
            Ok::<(), std::convert::Infallible>(())
        })
        .await
    }

    /// Only the order consumer, without the reconciler (tests that must not be repaired).
    pub async fn spawn_consumer(&self) -> Worker {
        self.spawn_role(flashsale::modules::orders::run_worker)
            .await
    }

    pub async fn spawn_notify_worker(&self) -> Worker {
        self.spawn_role(flashsale::modules::notifications::run_worker)
            .await
    }

    /// A worker role in this process with its own AppState (its own connections).
    async fn spawn_role<F, Fut, E>(&self, run: F) -> Worker
    where
        F: FnOnce(AppState) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.spawn_role_with((*self.state.settings).clone(), run)
            .await
    }

    async fn spawn_role_with<F, Fut, E>(&self, settings: Settings, run: F) -> Worker
    where
        F: FnOnce(AppState) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let state = AppState::build(settings).await.expect("worker state");
        let running = run(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = running.await {
                eprintln!("worker stopped: {e}");
            }
        });
        Worker { state, task }
    }

    /// A bearer token for a user that need not exist (load tests mint tokens the same way).
    pub fn mint_token(&self, user_id: Uuid) -> String {
        self.state
            .auth
            .keys
            .issue(
                user_id,
                flashsale::modules::users::Role::Customer,
                Uuid::new_v4(),
            )
            .expect("mint token")
    }

    /// Creates a product whose flash sale is on now, with `stock` units at `price`.
    pub async fn flash_sale_product(&self, admin: &str, stock: i32, price: &str) -> Uuid {
        let now = chrono::Utc::now();
        let body = json!({
            "name": "Flash gadget", "description": "limited", "price": "99.00", "inventory": stock,
            "is_flash_sale": true, "flash_sale_price": price,
            "flash_sale_start": now - chrono::Duration::minutes(1),
            "flash_sale_end": now + chrono::Duration::hours(1),
        });
        let res = self.post_json("/products", &body, Some(admin)).await;
        assert_eq!(res.status(), 201, "create flash-sale product");
        let product: Value = res.json().await.expect("product");
        product["id"].as_str().expect("id").parse().expect("uuid")
    }

    pub async fn buy(
        &self,
        token: &str,
        product: Uuid,
        key: &str,
        body: &Value,
    ) -> reqwest::Response {
        self.post_idempotent(&format!("/orders/flash-sale/{product}"), token, key, body)
            .await
    }

    /// An authenticated POST carrying an `Idempotency-Key`.
    async fn post_idempotent(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: &Value,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Polls until the order leaves `pending` (never sleeps past the deadline).
    pub async fn wait_settled(&self, token: &str, order: Uuid) -> Settled {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let res = self
                .get(&format!("/orders/{order}/status"), Some(token))
                .await;
            assert_eq!(res.status(), 200, "status of {order}");
            let body: Value = res.json().await.expect("status body");
            let status = body["status"].as_str().expect("status").to_owned();
            if status != "pending" {
                let failure_reason = match status.as_str() {
                    "failed" => self.failure_reason(order).await,
                    _ => None,
                };
                return Settled {
                    order,
                    status,
                    failure_reason,
                };
            }
            assert!(Instant::now() < deadline, "order {order} still pending");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The reason the worker stored for a failed order (none if it never reached a shard).
    async fn failure_reason(&self, order: Uuid) -> Option<String> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            failure_reason: Option<String>,
        }
        let sql = format!("SELECT failure_reason FROM orders WHERE id = '{order}'");
        for i in 0..self.state.settings.database.shards.len() {
            let rows: Vec<Row> = diesel::sql_query(&sql)
                .load(&mut self.shard_conn(i).await)
                .await
                .expect("failure reason");
            if let Some(row) = rows.into_iter().next() {
                return row.failure_reason;
            }
        }
        None
    }

    /// The sale's counters as Redis holds them, summed over its buckets. Unlike the
    /// listing's `remaining` (clamped at 0), an oversold counter reads negative here.
    pub async fn remaining(&self, product: Uuid) -> i64 {
        let mut pipe = redis::pipe();
        for bucket in self.sale_buckets(product) {
            pipe.get(format!("{bucket}:stock"));
        }
        let counters: Vec<Option<i64>> = pipe
            .query_async(&mut self.state.redis.conn())
            .await
            .expect("read the counters");
        assert!(counters[0].is_some(), "the sale is loaded in Redis");
        counters.into_iter().flatten().sum()
    }

    /// The key prefix of each of a sale's buckets (as many as `sales.stock_buckets`).
    pub fn sale_buckets(&self, product: Uuid) -> Vec<String> {
        (0..self.state.settings.sales.stock_buckets)
            .map(|bucket| match bucket {
                0 => self.sale_key(product, "").trim_end_matches(':').to_owned(),
                n => self
                    .state
                    .redis
                    .key(format_args!("{{p:{}:{n}}}", product.simple())),
            })
            .collect()
    }

    /// Reserves one unit for `user` as the flash-sale route would, and publishes nothing (an
    /// API that died mid-request); asserts the unit was reserved.
    pub async fn reserve_unpublished(
        &self,
        product: Uuid,
        user: Uuid,
        order: Uuid,
        body_hash: &str,
        key_digest: &str,
    ) {
        use flashsale::modules::products::{self, Reservation, ReserveRequest};
        let reserved = products::reserve(
            &self.state,
            &ReserveRequest {
                product,
                user,
                quantity: 1,
                order_id: order,
                body_hash,
                key_digest,
                in_flight_secs: self.state.settings.orders.in_flight_ttl_secs,
                key_ttl_secs: self.state.settings.orders.idempotency_ttl_secs,
                attempts_per_minute: 1_000,
                verify_window_ms: 0,
            },
        )
        .await
        .expect("reserve");
        assert!(
            matches!(reserved, Reservation::Reserved { .. }),
            "{reserved:?}"
        );
    }

    /// Deletes every Redis key of one product's sale (every bucket) at once, as a Redis
    /// restart would.
    pub async fn lose_sale(&self, product: Uuid) {
        let mut keys: Vec<String> = vec![];
        for bucket in self.sale_buckets(product) {
            let found: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{bucket}:*"))
                .query_async(&mut self.state.redis.conn())
                .await
                .expect("list the sale's keys");
            keys.extend(found);
        }
        assert!(!keys.is_empty(), "the sale has keys to lose");
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut self.state.redis.conn())
            .await
            .expect("delete the sale's keys");
    }

    /// The Redis key `name` of a product's sale.
    pub fn sale_key(&self, product: Uuid, name: &str) -> String {
        self.state
            .redis
            .key(format_args!("{{p:{}}}:{name}", product.simple()))
    }

    pub async fn inventory(&self, product: Uuid) -> i64 {
        let sql = format!("SELECT inventory::bigint AS n FROM products WHERE id = '{product}'");
        self.count(&mut self.global_conn().await, &sql).await
    }

    /// Orders of `product` stored in every shard, by status.
    pub async fn orders_by_status(
        &self,
        product: Uuid,
    ) -> std::collections::BTreeMap<String, (i64, i64)> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            status: String,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            orders: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            units: i64,
        }
        let mut totals = std::collections::BTreeMap::new();
        for i in 0..self.state.settings.database.shards.len() {
            let sql = format!(
                "SELECT o.status, count(*) AS orders, sum(i.quantity)::bigint AS units FROM orders o \
                 JOIN order_items i ON i.order_id = o.id WHERE i.product_id = '{product}' GROUP BY o.status"
            );
            let rows: Vec<Row> = diesel::sql_query(sql)
                .load(&mut self.shard_conn(i).await)
                .await
                .expect("orders by status");
            for row in rows {
                let entry = totals.entry(row.status).or_insert((0, 0));
                entry.0 += row.orders;
                entry.1 += row.units;
            }
        }
        totals
    }

    /// Messages ready in `queue`.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.state.amqp.connection().create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    /// Charges the payment simulator recorded for `order`.
    pub async fn charged(&self, order: Uuid) -> bool {
        self.redis_exists(&format!("{{paysim}}:charge:{order}"))
            .await
    }

    /// Whether the gateway simulator paid `order`'s charge back.
    pub async fn refunded(&self, order: Uuid) -> bool {
        self.redis_exists(&format!("{{paysim}}:refund:{order}"))
            .await
    }

    /// Refunds still owed, in every shard.
    pub async fn refunds_owed(&self) -> i64 {
        let mut owed = 0;
        for shard in 0..self.state.db.shard_count() {
            let mut conn = self.shard_conn(shard).await;
            owed += self
                .count(&mut conn, "SELECT count(*) AS n FROM refunds_owed")
                .await;
        }
        owed
    }
}

impl TestApp {
    /// Creates a regular (not flash-sale) product.
    pub async fn regular_product(&self, admin: &str, stock: i32, price: &str) -> Uuid {
        let body = json!({"name": "Everyday thing", "price": price, "inventory": stock});
        let res = self.post_json("/products", &body, Some(admin)).await;
        assert_eq!(res.status(), 201, "create product");
        let product: Value = res.json().await.expect("product");
        product["id"].as_str().expect("id").parse().expect("uuid")
    }

    /// `POST /orders` with an idempotency key.
    pub async fn order(&self, token: &str, key: &str, body: &Value) -> reqwest::Response {
        self.post_idempotent("/orders", token, key, body).await
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A config folder for running the binary as this test's settings: `default.toml` copied,
/// and `proc.toml` (use `FLASHSALE_ENV=proc`) holding `config/test.toml` plus this test's
/// databases, prefixes and ports.
pub fn write_config_dir(settings: &Settings, id: &str, http_port: u16, ops_port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashsale-cli-{id}"));
    std::fs::create_dir_all(&dir).expect("config dir");
    std::fs::copy("config/default.toml", dir.join("default.toml")).expect("copy defaults");
    let mut layer: toml::Table = std::fs::read_to_string("config/test.toml")
        .expect("read test.toml")
        .parse()
        .expect("test.toml parses");
    let shards: Vec<toml::Value> = settings
        .database
        .shards
        .iter()
        .map(|s| toml::Value::Table(toml::toml! { primary = (s.primary.clone()) }))
        .collect();
    let overrides = toml::toml! {
        [http]
        port = (i64::from(http_port))
        ops_port = (i64::from(ops_port))
        workers = 1
        metrics_sample_ms = 200
        shutdown_grace_secs = 10

        [database.global]
        primary = (settings.database.global.primary.clone())

        [redis]
        key_prefix = (settings.redis.key_prefix.clone())

        [amqp]
        queue_prefix = (settings.amqp.queue_prefix.clone())
        connection_name = (format!("{}-proc", settings.amqp.connection_name))

        [search]
        index_dir = (settings.search.index_dir.display().to_string())

        [log]
        format = "json"
        filter = "info"
    };
    merge(&mut layer, overrides);
    if let Some(toml::Value::Table(database)) = layer.get_mut("database") {
        database.insert("shards".into(), toml::Value::Array(shards));
    }
    std::fs::write(dir.join("proc.toml"), layer.to_string()).expect("write proc.toml");
    dir
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

impl TestApp {
    /// `PUT /orders/{order}/cancel`.
    pub async fn cancel(&self, token: &str, order: Uuid) -> reqwest::Response {
        let path = format!("/orders/{order}/cancel");
        self.send(reqwest::Method::PUT, &path, token, None).await
    }

    /// A new buyer buys one unit of `product` paying with `payment_method`; answers the
    /// buyer, the order id and the status the order settled in.
    pub async fn buy_and_settle(
        &self,
        product: Uuid,
        payment_method: &str,
    ) -> (Session, Uuid, Settled) {
        let buyer = self.register(&unique_email("buyer")).await;
        let body = json!({ "payment_method": payment_method });
        let res = self.buy(&buyer.access, product, "k", &body).await;
        assert_eq!(res.status(), 201, "flash-sale order accepted");
        let order: Value = res.json().await.expect("order");
        let id: Uuid = order["id"].as_str().expect("id").parse().expect("uuid");
        let status = self.wait_settled(&buyer.access, id).await;
        (buyer, id, status)
    }
}

impl TestApp {
    /// Polls until PostgreSQL's on-hand inventory of `product` is `expected`: the worker
    /// records the ledger just after it writes an order's final status, so a test that has
    /// seen the status may be a moment early.
    pub async fn wait_inventory(&self, product: Uuid, expected: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.inventory(product).await;
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "inventory of {product} is {now}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls until `done` holds (never past the deadline).
pub async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    what: &str,
    mut done: F,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    /// A flash-sale purchase whose request carries a W3C `traceparent`.
    pub async fn buy_traced(
        &self,
        token: &str,
        product: Uuid,
        traceparent: &str,
    ) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/orders/flash-sale/{product}")))
            .bearer_auth(token)
            .header("idempotency-key", "traced")
            .header("traceparent", traceparent)
            .send()
            .await
            .expect("request sent")
    }
}
