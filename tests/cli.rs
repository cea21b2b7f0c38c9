//! The binary itself: help, config errors, migrate, and `serve --role all` end to end.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, test_settings, write_config_dir, TestApp, SERVER};
use flashsale::config::DatabaseNode;
use flashsale::infra::db;

const BIN: &str = env!("CARGO_BIN_EXE_flashsale");

#[test]
fn help_explains_every_command_and_role() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "migrate", "seed", "admin"] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for role in ["api", "order-worker", "notify-worker", "all"] {
        assert!(help.contains(role), "serve --help lacks {role}: {help}");
    }
}

#[test]
fn invalid_configuration_fails_at_start_naming_the_key() {
    let cases = [
        ("FLASHSALE__HTTP__PORT", "not-a-port", "http.port"),
        ("FLASHSALE__AUTH__ACTIVE_KID", "missing", "auth.active_kid"),
        (
            "FLASHSALE__DATABASE__POOL_MAX_SIZE",
            "0",
            "database.pool_max_size",
        ),
    ];
    for (var, value, key) in cases {
        let out = Command::new(BIN)
            .args(["migrate"])
            .env("FLASHSALE_ENV", "test")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
    }
}

#[test]
fn production_refuses_published_keys_short_keys_and_development_settings() {
    let strong = "a-production-secret-that-no-file-holds-0123456789";
    let development_key = "dev-only-signing-key-change-me-in-production-0123456789";
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("FLASHSALE__AUTH__KEYS__DEV1", development_key)],
            "auth.keys",
        ),
        (&[("FLASHSALE__AUTH__KEYS__DEV1", "short")], "auth.keys"),
        (
            &[("FLASHSALE__AUTH__KEYS__DEV1", strong)],
            "http.metrics_on_api_port",
        ),
        (
            &[
                ("FLASHSALE__AUTH__KEYS__DEV1", strong),
                ("FLASHSALE__HTTP__METRICS_ON_API_PORT", "false"),
                ("FLASHSALE__DATABASE__MIGRATE_ON_START", "true"),
            ],
            "database.migrate_on_start",
        ),
        (
            &[
                ("FLASHSALE__AUTH__KEYS__DEV1", strong),
                ("FLASHSALE__HTTP__METRICS_ON_API_PORT", "false"),
                ("FLASHSALE__AMQP__QUEUE_EXPIRES_MS", "1000"),
            ],
            "amqp.queue_expires_ms",
        ),
    ];
    for (vars, key) in cases {
        let out = Command::new(BIN)
            .args(["migrate"])
            .env("FLASHSALE_ENV", "production")
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{vars:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_missing_databases_and_is_idempotent() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut settings = test_settings().database;
    // Migrations go to each primary directly, never through the request path's pooler
    // (here a port nothing listens on).
    let node = |name: String| DatabaseNode {
        primary: format!("postgres://postgres@127.0.0.1:1/{name}"),
        replicas: vec![],
        direct: Some(format!("{SERVER}/{name}")),
    };
    settings.global = node(format!("fst_{id}_mg"));
    settings.shards = (0..2).map(|i| node(format!("fst_{id}_ms{i}"))).collect();
    db::migrate(&settings).await.expect("first migrate");
    db::migrate(&settings)
        .await
        .expect("second migrate is a no-op");
    // Served through the same servers, once migrated.
    for node in std::iter::once(&mut settings.global).chain(&mut settings.shards) {
        node.primary = node.migration_url().to_owned();
    }
    let databases = db::Databases::connect(&settings).await.unwrap();
    let (global, shards) = databases.ping_each().await;
    global.expect("the global database answers");
    for shard in shards {
        shard.expect("every shard answers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_role_all_becomes_ready_and_stops_on_sigterm() {
    let (settings, id) = TestApp::builder().shards(2).settings().await;
    let port = free_port();
    let dir = write_config_dir(&settings, &id, port, free_port());

    let mut child = Command::new(BIN)
        .args([
            "--config-dir",
            dir.to_str().unwrap(),
            "serve",
            "--role",
            "all",
        ])
        .env("FLASHSALE_ENV", "proc")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let res = client
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await;
        match res {
            Ok(res) if res.status() == 200 => break true,
            _ if Instant::now() > deadline => break false,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(ready, "/ready never answered 200");
    assert!(status.success(), "exit after SIGTERM: {status}");
}
