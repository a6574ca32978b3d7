//! Broker outages: the test runs its own Redis (append-only file on) or its own RabbitMQ node
//! on free ports — never the shared ones — and restarts it while clients enqueue through the
//! real `drover api` and two `drover worker` processes run the jobs.
//!
//! What must hold: every job the API accepted (202) succeeds; every other answer during the
//! outage is a 503 problem+json with `Retry-After`; the API and the workers carry on by
//! themselves once the broker is back.

use std::{
    collections::HashSet,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;
use tokio::process::Child;
use uuid::Uuid;

use crate::{
    process::{drover, sigterm},
    support::{create_pg_database, drop_pg_database, unique},
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_port(port: u16, open: bool, within: Duration, what: &str) {
    let start = Instant::now();
    while port_open(port) != open {
        assert!(
            start.elapsed() < within,
            "{what}: port {port} not {} after {within:?}",
            if open { "open" } else { "closed" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn require_program(name: &str, package: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "`{name}` is not installed: `apt-get install -y {package}`");
}

/// A broker instance of the test's own, restartable, data kept across restarts.
trait OwnBroker: Send {
    fn url(&self) -> String;
    fn start(&mut self);
    /// A clean stop, as an operator's restart or a rolling upgrade does it.
    fn stop(&mut self);
}

/// `redis-server` with `appendonly yes` (fsync every second), in a temp dir.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn new() -> Self {
        require_program("redis-server", "redis-server");
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.start();
        r
    }
}

impl OwnBroker for OwnRedis {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn start(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(20), "redis-server");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: Redis writes and fsyncs its append-only file, then exits.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        wait_port(self.port, false, Duration::from_secs(20), "redis-server stop");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A second RabbitMQ node with its own name, ports and data directory.
struct OwnRabbit {
    name: String,
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
}

impl OwnRabbit {
    fn new() -> Self {
        require_program("rabbitmq-server", "rabbitmq-server");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        // Debian's rabbitmq-server drops to the `rabbitmq` user when started as root.
        if std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"))
        {
            let ok = std::process::Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "chown of the RabbitMQ test node's directory to `rabbitmq` failed"
            );
        }
        let mut r = OwnRabbit {
            name: format!("{}@localhost", unique("drovertest")),
            port,
            dist_port: free_port(),
            dir,
        };
        r.start();
        r
    }

    fn env(&self, c: &mut std::process::Command) {
        let d: &Path = self.dir.path();
        let p = |f: &str| -> PathBuf { d.join(f) };
        c.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", p("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
}

impl OwnBroker for OwnRabbit {
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn start(&mut self) {
        let mut c = std::process::Command::new("rabbitmq-server");
        c.arg("-detached");
        self.env(&mut c);
        assert!(
            c.status().expect("rabbitmq-server").success(),
            "rabbitmq-server -detached failed"
        );
        wait_port(self.port, true, Duration::from_secs(90), "the RabbitMQ test node");
    }

    fn stop(&mut self) {
        let mut c = std::process::Command::new("rabbitmqctl");
        c.args(["-n", &self.name, "stop"]);
        self.env(&mut c);
        let _ = c.status();
        wait_port(
            self.port,
            false,
            Duration::from_secs(60),
            "the RabbitMQ test node's stop",
        );
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        if port_open(self.port) {
            self.stop();
        }
    }
}

#[derive(Default)]
struct Tally {
    accepted: Vec<Uuid>,
    unavailable: usize,
    /// Anything but 202 or a well-formed 503.
    unexpected: Vec<String>,
}

/// A client enqueues `sleep` jobs about every 8 ms until `stop`.
async fn enqueue_until(base: String, key: String, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .unwrap();
    let body = json!({"kind": "sleep", "payload": {"ms": 5}});
    while !stop.load(Ordering::Relaxed) {
        let res = http.post(format!("{base}/v1/jobs")).json(&body).send().await;
        let seen = match res {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r.headers().contains_key("retry-after");
                let problem = r
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
                let text = r.text().await.unwrap_or_default();
                match status {
                    202 => {
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                        Ok(Some(Uuid::parse_str(v["id"].as_str().unwrap()).unwrap()))
                    }
                    503 if retry_after && problem => Ok(None),
                    _ => Err(format!("{status} (retry-after: {retry_after}) {text}")),
                }
            }
            Err(e) => Err(format!("request failed: {e}")),
        };
        {
            let mut t = tally.lock().unwrap();
            match seen {
                Ok(Some(id)) => t.accepted.push(id),
                Ok(None) => t.unavailable += 1,
                Err(e) => t.unexpected.push(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
}

async fn accepted_jobs_survive_a_broker_restart(mut broker: Box<dyn OwnBroker>) {
    let prefix = unique("outage");
    let (pg_name, db_url) = create_pg_database().await;
    let broker_url = broker.url();
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let env = [
        ("DROVER_BROKER_URL", broker_url.as_str()),
        ("DROVER_DATABASE_URL", db_url.as_str()),
        ("DROVER_BROKER_PREFIX", prefix.as_str()),
        ("DROVER_LISTEN", listen.as_str()),
        // The outage itself is expected: lapin logs every lost connection at error level.
        ("DROVER_LOG", "warn,lapin=off"),
    ];
    let migrated = drover().arg("migrate").envs(env).status().await.unwrap();
    assert!(migrated.success(), "drover migrate failed");
    // The clients' key, made the way an operator makes one.
    let key = crate::process::create_key(&env, &["--role", "operator", "--name", "outage-clients"]).await;
    let mut procs: Vec<Child> = vec![drover().arg("api").envs(env).spawn().unwrap()];
    for _ in 0..2 {
        procs.push(
            drover()
                .args(["worker", "--queues", "default", "--concurrency", "20"])
                .envs(env)
                .spawn()
                .unwrap(),
        );
    }
    let base = format!("http://{listen}");
    let start = Instant::now();
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "drover api did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(enqueue_until(
                base.clone(),
                key.clone(),
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = tally.lock().unwrap().accepted.len();
    let outage = Instant::now();
    let broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        std::thread::sleep(Duration::from_secs(3));
        broker.start();
        broker
    })
    .await
    .unwrap();
    let outage_s = outage.elapsed().as_secs_f64();
    // Enqueues succeed again without anyone touching the API.
    let back = Instant::now();
    let at_restart = tally.lock().unwrap().accepted.len();
    while tally.lock().unwrap().accepted.len() < at_restart + 500 {
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "enqueues did not recover within 60 s of the broker's restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_s = back.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    assert!(
        tally.unexpected.is_empty(),
        "{} answers were neither 202 nor 503 problem+json with Retry-After, e.g. {:?}",
        tally.unexpected.len(),
        &tally.unexpected[..tally.unexpected.len().min(5)]
    );
    assert!(before > 0, "nothing was accepted before the outage");

    // Every accepted job succeeds, run by the workers that lived through the outage.
    let db = schema::connect(&db_url).await.unwrap();
    let accepted: HashSet<Uuid> = tally.accepted.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT id FROM job WHERE status = 'succeeded'".to_owned(),
            ))
            .await
            .unwrap();
        let succeeded: HashSet<Uuid> = rows
            .iter()
            .map(|r| r.try_get_by_index::<Uuid>(0).unwrap())
            .collect();
        let missing = accepted.difference(&succeeded).count();
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "OUTAGE broker={} accepted={} unavailable_503={} outage_s={outage_s:.1} recovered_s={recovered_s:.1} \
         not_succeeded={missing}",
        broker_url.split(':').next().unwrap_or(""),
        accepted.len(),
        tally.unavailable,
    );
    assert_eq!(missing, 0, "{missing} accepted jobs did not succeed");
    assert!(tally.unavailable > 0, "the clients never saw the outage (no 503)");
    for p in procs.iter_mut() {
        assert!(
            p.try_wait().unwrap().is_none(),
            "a drover process exited during the outage"
        );
    }
    for p in &procs {
        sigterm(p);
    }
    for p in procs.iter_mut() {
        let status = tokio::time::timeout(Duration::from_secs(30), p.wait())
            .await
            .expect("a drover process did not stop within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "a drover process exited with {status}");
    }
    db.close().await.ok();
    drop_pg_database(&pg_name).await;
    tokio::task::spawn_blocking(move || drop(broker)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_no_accepted_job() {
    accepted_jobs_survive_a_broker_restart(Box::new(
        tokio::task::spawn_blocking(OwnRedis::new).await.unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_mid_run_loses_no_accepted_job() {
    accepted_jobs_survive_a_broker_restart(Box::new(
        tokio::task::spawn_blocking(OwnRabbit::new).await.unwrap(),
    ))
    .await;
}
