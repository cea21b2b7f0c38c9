//! Test harness: every test gets its own databases (cloned from migrated templates), its
//! own Redis key prefix, and a real HTTP server on a free port, so tests run in parallel
//! without seeing each other's data.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::TcpListener;
use std::path::Path;
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
                DatabaseNode { primary, replicas }
            })
            .collect();
        settings.redis.key_prefix = format!("t:{id}:");
        for tweak in self.tweaks {
            tweak(&mut settings);
        }
        clone_databases(&clones).await;
        (settings, id)
    }

    pub async fn spawn(self) -> TestApp {
        let (settings, id) = self.settings().await;
        let state = AppState::build(settings).await.expect("app state builds");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let address = format!("http://{}", listener.local_addr().expect("local addr"));
        let server = app::http_server(state.clone(), listener).expect("server starts");
        tokio::spawn(server);
        TestApp {
            address,
            client: reqwest::Client::new(),
            state,
            id,
        }
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

    pub async fn put_json(&self, path: &str, body: &Value, token: &str) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn register(&self, email: &str) -> Session {
        let res = self
            .post_json(
                "/auth/register",
                &json!({"email": email, "password": PASSWORD}),
                None,
            )
            .await;
        assert_eq!(res.status(), 201, "register {email}");
        session_from(res, email).await
    }

    pub async fn login(&self, email: &str) -> Session {
        let res = self
            .post_json(
                "/auth/login",
                &json!({"email": email, "password": PASSWORD}),
                None,
            )
            .await;
        assert_eq!(res.status(), 200, "login {email}");
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
