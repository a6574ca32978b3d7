//! `spawn_app`: an isolated drover (API on port 0 + workers, in this process) on a real broker,
//! with its own database and key/queue namespace, and request helpers that wait on state.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use drover::{
    app::{self, Migrations, Stack},
    config::{ApiArgs, Connections, Secret, WorkerArgs},
};
use jobs::{CatalogConfig, RetryPolicy};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub(crate) const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broker {
    Redis,
    Amqp,
    Sqlite,
}

/// Knobs a test may turn; everything else is the production default.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) concurrency: usize,
    pub(crate) queues: Vec<&'static str>,
    pub(crate) broker_url: Option<String>,
    /// Broker namespace; default: a unique one. Only with a `broker_url` of the test's own
    /// (a Redis database or RabbitMQ vhost no one else uses), since cleanup deletes it.
    pub(crate) prefix: Option<String>,
    /// Runs backup jobs with this configuration.
    pub(crate) backup: Option<workers::families::backup::BackupConfig>,
    /// Per-kind (or queue) attempt timeouts, as `[timeout_ms]` in the config file sets them.
    pub(crate) timeout_ms: Vec<(&'static str, u64)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            retry: None,
            concurrency: 50,
            queues: vec!["noop", "default"],
            broker_url: None,
            prefix: None,
            backup: None,
            timeout_ms: Vec::new(),
        }
    }
}

pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    /// The database URL the app records history (and backups) in.
    pub(crate) database_url: String,
    pub(crate) http: reqwest::Client,
    pub(crate) broker: Broker,
    pub(crate) broker_url: String,
    pub(crate) prefix: String,
    pub(crate) pickups: mpsc::UnboundedReceiver<workers::Pickup>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    stack: Option<Arc<Stack>>,
    cleanup: Cleanup,
}

enum Cleanup {
    Postgres(String),
    File(PathBuf),
}

/// An HTTP client that sends `Authorization: Bearer {key}` with every request.
pub(crate) fn authorized_client(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).expect("a header value");
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

pub(crate) fn unique(tag: &str) -> String {
    format!("{tag}{}", uuid::Uuid::new_v4().simple())
}

/// Creates a fresh Postgres database, failing with instructions when Postgres is down.
pub(crate) async fn create_pg_database() -> (String, String) {
    let admin = Database::connect(PG_ADMIN_URL).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    });
    let name = unique("drover_e2e_");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    (name.clone(), format!("postgres://postgres@127.0.0.1:5432/{name}"))
}

pub(crate) async fn require_service(name: &str, addr: &str, how: &str) {
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        panic!("{name} is not reachable at {addr}; start it with `{how}`");
    }
}

pub(crate) async fn spawn_app(broker: Broker, opts: Options) -> TestApp {
    assert!(
        opts.prefix.is_none() || opts.broker_url.is_some(),
        "a fixed prefix needs a broker URL of the test's own"
    );
    let prefix = opts.prefix.clone().unwrap_or_else(|| unique("t"));
    let (db_url, broker_url, cleanup) = match broker {
        Broker::Redis | Broker::Amqp => {
            if broker == Broker::Redis {
                require_service("Redis", "127.0.0.1:6379", "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log").await;
            } else {
                require_service("RabbitMQ", "127.0.0.1:5672", "rabbitmq-server -detached").await;
            }
            let (name, url) = create_pg_database().await;
            let b = if broker == Broker::Redis {
                REDIS_URL
            } else {
                AMQP_URL
            };
            (url, b.to_owned(), Cleanup::Postgres(name))
        }
        Broker::Sqlite => {
            let path = std::env::temp_dir().join(format!("{prefix}.db"));
            let url = format!("sqlite://{}", path.display());
            (url.clone(), url, Cleanup::File(path))
        }
    };
    let broker_url = opts.broker_url.clone().unwrap_or(broker_url);
    if opts.prefix.is_some() {
        // A fixed namespace may hold what an interrupted run left.
        match broker {
            Broker::Redis => delete_redis_prefix(&broker_url, &prefix).await,
            Broker::Amqp => delete_amqp_prefix(&broker_url, &prefix).await,
            Broker::Sqlite => {}
        }
    }
    let conn = Connections {
        broker_url: broker_url.parse::<Secret>().unwrap(),
        database_url: db_url.parse::<Secret>().unwrap(),
        broker_prefix: prefix.clone(),
        amqp_queue_type: Default::default(),
        config: None,
    };
    let catalog_cfg = CatalogConfig {
        default_retry: opts.retry.clone(),
        timeout_ms: opts
            .timeout_ms
            .iter()
            .map(|(k, ms)| (k.to_string(), *ms))
            .collect(),
        ..Default::default()
    };
    let mut stack = Stack::connect(&conn, jobs::Catalog::new(&catalog_cfg), Migrations::Apply)
        .await
        .expect("connect the stack");
    if let Some(cfg) = opts.backup.clone() {
        stack
            .enable_backups_with(&conn, cfg)
            .expect("backup configuration");
    }
    let admin_key = api::auth::create_key(&stack.db, "e2e admin", api::Role::Admin, None)
        .await
        .expect("creating the test's admin key")
        .key;
    let stack = Arc::new(stack);
    let listener = app::bind(&ApiArgs {
        listen: "127.0.0.1:0".into(),
        security: Default::default(),
    })
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, wait) = app::broadcast_shutdown();
    let (probe, pickups) = mpsc::unbounded_channel();
    let worker_args = WorkerArgs {
        queues: opts.queues.iter().map(|q| q.to_string()).collect(),
        concurrency: opts.concurrency,
        prefetch: 100,
        lease_s: 30,
        quarantine_after: jobs::broker::QUARANTINE_AFTER,
        shutdown_grace_s: 10,
        chaos_drills: false,
        limits_url: None,
    };
    let mut tasks = Vec::new();
    {
        let stack = stack.clone();
        let w = wait.clone();
        tasks.push(tokio::spawn(async move {
            app::serve_api(&stack, listener, w()).await
        }));
    }
    {
        let stack = stack.clone();
        let deps = workers::Deps {
            pickup_probe: Some(probe),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            app::run_workers(&stack, &worker_args, deps, wait()).await
        }));
    }
    TestApp {
        addr,
        // An admin key of the app's database, sent with every request.
        http: authorized_client(admin_key.expose()),
        database_url: db_url,
        broker,
        broker_url,
        prefix,
        pickups,
        stop,
        tasks,
        stack: Some(stack),
        cleanup,
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let res = self.http.get(self.url(path)).send().await.expect("request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn enqueue(&self, kind: &str, payload: Value) -> String {
        let (status, body) = self
            .post("/v1/jobs", &json!({"kind": kind, "payload": payload}))
            .await;
        assert_eq!(status, 202, "enqueue answered {status}: {body}");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Polls a job until `done(job)` holds; panics with the last state after `within`.
    pub(crate) async fn wait_job(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
            if status == 200 && done(&body) {
                return body;
            }
            if start.elapsed() > within {
                panic!("job {id} did not reach the expected state within {within:?}; last: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every id is `succeeded`; returns how many polls it took.
    pub(crate) async fn wait_all_succeeded(&self, ids: &[String], within: Duration) {
        let start = Instant::now();
        let mut left: Vec<&String> = ids.iter().collect();
        while !left.is_empty() {
            let mut still = Vec::new();
            for id in left {
                let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
                if !(status == 200 && body["status"] == "succeeded") {
                    still.push(id);
                }
            }
            left = still;
            if !left.is_empty() {
                if start.elapsed() > within {
                    let (_, sample) = self.get(&format!("/v1/jobs/{}", left[0])).await;
                    panic!(
                        "{} jobs not succeeded within {within:?}; e.g. {sample}",
                        left.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Starts one more worker process's worth of workers (a "replica") on this app's stack.
    pub(crate) fn spawn_replica(&self, args: WorkerArgs) -> Replica {
        let stack = self.stack.clone().expect("running");
        let (stop, wait) = app::broadcast_shutdown();
        let task =
            tokio::spawn(
                async move { app::run_workers(&stack, &args, workers::Deps::default(), wait()).await },
            );
        Replica { stop, task }
    }

    pub(crate) async fn queue(&self, q: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/queues/{q}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Stops API and workers gracefully, then removes the test's database and broker namespace.
    pub(crate) async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            match tokio::time::timeout(Duration::from_secs(20), t).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("a drover task did not stop cleanly: {other:?}"),
            }
        }
        if let Some(stack) = self.stack.take().and_then(|s| Arc::try_unwrap(s).ok()) {
            stack.close(Duration::from_secs(5)).await;
        }
        self.cleanup_namespace().await;
    }

    async fn cleanup_namespace(&self) {
        match self.broker {
            Broker::Redis => delete_redis_prefix(&self.broker_url, &self.prefix).await,
            Broker::Amqp => delete_amqp_prefix(&self.broker_url, &self.prefix).await,
            Broker::Sqlite => {}
        }
        match &self.cleanup {
            Cleanup::Postgres(name) => drop_pg_database(name).await,
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
}

/// Workers started by [`TestApp::spawn_replica`]; [`Replica::stop`] is their SIGTERM.
pub(crate) struct Replica {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    /// Asks the workers to stop and waits for their graceful shutdown.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(20), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("a replica did not stop cleanly: {other:?}"),
        }
    }
}

pub(crate) async fn drop_pg_database(name: &str) {
    if let Ok(admin) = Database::connect(PG_ADMIN_URL).await {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

/// Deletes this test's keys only (never FLUSHDB: other tests and the benchmark share Redis).
pub(crate) async fn delete_redis_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

/// Deletes this test's queues (the queues drover declares for the built-in queue names).
pub(crate) async fn delete_amqp_prefix(url: &str, prefix: &str) {
    let Ok(conn) = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    for q in jobs::queue::BUILTIN_QUEUES {
        let mut names = vec![format!("{prefix}.{q}"), format!("{prefix}.{q}.dead")];
        names.extend((0..=24).map(|k| format!("{prefix}.{q}.delay.{k}")));
        for name in names {
            let _ = ch
                .queue_delete(
                    name.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(0, "done".into()).await;
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}
