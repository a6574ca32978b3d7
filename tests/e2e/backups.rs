//! Backups through the composed app: `POST /v1/backups` → a `backup.run` job on queue
//! `backups` → the worker → the catalog (`GET /v1/backups`), retries and the dead set, the
//! failure webhook (a real HTTP receiver on 127.0.0.1:0), and the `drover backup` CLI on the
//! result.

use std::time::Duration;

use jobs::RetryPolicy;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use workers::families::backup::{BackupConfig, PostgresTarget};

use crate::support::{Broker, Options, spawn_app};

/// A webhook receiver: every POST body it gets, as JSON, in order.
async fn webhook_receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/backups", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then as much body as content-length says.
                let body = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    assert!(head.starts_with("post /hooks/backups "), "{head}");
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                };
                let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, rx)
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        initial_ms: 50,
        multiplier: 2.0,
        max_delay_ms: 200,
        max_attempts: 3,
        jitter: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_backup_source_is_retried_then_dead_and_the_webhook_is_told() {
    let (hook, mut notified) = webhook_receiver().await;
    let store = tempfile::tempdir().unwrap();
    let app = spawn_app(
        Broker::Redis,
        Options {
            retry: Some(quick_retries()),
            queues: vec!["backups"],
            backup: Some(BackupConfig {
                store: store.path().display().to_string(),
                webhook_url: Some(hook),
                drover_database: false,
                postgres: vec![PostgresTarget {
                    name: "gone".into(),
                    // Nothing listens on port 1.
                    url: "postgres://postgres@127.0.0.1:1/app".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;

    let (status, body) = app
        .post("/v1/backups", &json!({"source": "postgres", "target": "gone"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["backup_url"], format!("/v1/backups/{id}"));

    let job = app
        .wait_job(&id, Duration::from_secs(60), |j| j["status"] == "dead")
        .await;
    assert_eq!(job["queue"], "backups");
    assert_eq!(job["attempts"], 3, "{job}");
    assert!(
        job["last_error"].as_str().unwrap().contains("127.0.0.1:1"),
        "{job}"
    );

    // The handler sends the webhook before its last attempt ends, so it has arrived by now;
    // earlier attempts, which were retried, sent none.
    let n = notified.try_recv().expect("the webhook was notified");
    assert_eq!(n["event"], "backup.failed");
    assert_eq!(n["backup_id"], id.as_str());
    assert_eq!(n["job_id"], id.as_str());
    assert_eq!(n["source"], "postgres");
    assert_eq!(n["target"], "gone");
    assert_eq!(n["attempt"], 3);
    let error = n["error"].as_str().unwrap();
    assert!(
        error.contains("postgres target \"gone\"") && error.contains("127.0.0.1:1"),
        "{error}"
    );
    assert!(notified.try_recv().is_err(), "only the last attempt notifies");

    let (status, list) = app.get("/v1/backups?target=gone").await;
    assert_eq!(status, 200, "{list}");
    let rows = list["backups"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list}");
    assert_eq!(rows[0]["id"], id.as_str());
    assert_eq!(rows[0]["status"], "failed");
    assert_eq!(rows[0]["attempts"], 3);
    assert_eq!(rows[0]["error"].as_str(), Some(error));

    // Bad requests name their field.
    let (status, p) = app
        .post("/v1/backups", &json!({"source": "postgres", "target": "nope"}))
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["errors"][0]["field"], "target", "{p}");
    assert!(p["errors"][0]["reason"].as_str().unwrap().contains("gone"), "{p}");
    let (status, p) = app
        .post("/v1/backups", &json!({"source": "mysql", "target": "gone"}))
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["errors"][0]["field"], "source", "{p}");
    let (status, p) = app.get("/v1/backups?status=great").await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["errors"][0]["field"], "status", "{p}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_through_the_api_is_listed_verified_and_restored_by_the_cli() {
    let (hook, mut notified) = webhook_receiver().await;
    let store = tempfile::tempdir().unwrap();
    let app = spawn_app(
        Broker::Sqlite,
        Options {
            queues: vec!["backups"],
            backup: Some(BackupConfig {
                store: store.path().display().to_string(),
                webhook_url: Some(hook),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let (status, body) = app
        .post("/v1/backups", &json!({"source": "config", "target": "drover"}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    app.wait_job(&id, Duration::from_secs(30), |j| j["status"] == "succeeded")
        .await;
    let (status, row) = app.get(&format!("/v1/backups/{id}")).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["status"], "succeeded");
    assert_eq!(row["format"], "toml");
    assert_eq!(row["sha256"].as_str().unwrap().len(), 64);

    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DROVER_") {
                c.env_remove(k);
            }
        }
        c.env("DROVER_DATABASE_URL", &app.database_url)
            .env("DROVER_BACKUP_STORE", store.path())
            .env("DROVER_LOG", "warn")
            .arg("backup")
            .args(args);
        let out = c.output().expect("run drover");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["list"]);
    assert!(ok && out.contains(&id) && out.contains("succeeded"), "{out}{err}");
    let (ok, out, err) = cli(&["verify", &id]);
    assert!(ok && out.contains("verified"), "{out}{err}");
    let dest = tempfile::tempdir().unwrap();
    let to = dest.path().join("config");
    let (ok, out, err) = cli(&["restore", &id, "--to", to.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let restored = std::fs::read_to_string(to.join(format!("drover-config-{id}.toml"))).unwrap();
    let parsed: toml::Table = toml::from_str(&restored).unwrap();
    assert_eq!(parsed["broker_prefix"].as_str(), Some(app.prefix.as_str()));
    // An unknown id is a clear failure.
    let (ok, _, err) = cli(&[
        "restore",
        "0193a1f2-7d3e-7000-8000-000000000000",
        "--to",
        "/tmp/x",
    ]);
    assert!(!ok && err.contains("no backup has id"), "{err}");

    // One flipped bit: a verify job fails at once (retrying cannot help), the backup is marked
    // corrupt, the webhook is told, and the CLI refuses to restore it.
    let object = std::path::Path::new("/").join(row["object_key"].as_str().unwrap());
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&object, bytes).unwrap();
    let verify = app.enqueue("backup.verify", json!({"backup_id": id})).await;
    let job = app
        .wait_job(&verify, Duration::from_secs(30), |j| j["status"] == "dead")
        .await;
    assert_eq!(job["attempts"], 1, "{job}");
    let (_, row) = app.get(&format!("/v1/backups/{id}")).await;
    assert_eq!(row["status"], "corrupt", "{row}");
    assert!(row["error"].as_str().unwrap().contains("SHA-256"), "{row}");
    let n = notified.try_recv().expect("the webhook was notified");
    assert_eq!(n["event"], "backup.verify_failed");
    assert_eq!(n["backup_id"], id.as_str());
    assert!(
        n["error"]
            .as_str()
            .unwrap()
            .contains(&format!("backup {id} is corrupt")),
        "{n}"
    );
    let again = dest.path().join("again");
    let (ok, out, err) = cli(&["restore", &id, "--to", again.to_str().unwrap()]);
    assert!(!ok && err.contains(&id) && err.contains("corrupt"), "{out}{err}");
    assert!(!again.exists());
    app.shutdown().await;
}
