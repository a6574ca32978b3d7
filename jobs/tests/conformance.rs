//! One list of broker semantics, run against every broker (Redis, a 3-node Redis Cluster,
//! RabbitMQ, SQLite) through the `Producer` / `Driver` interface the API and the workers use.
//! Each cluster test starts its own cluster (`redis-server --cluster-enabled yes` on free
//! ports) and kills it when it ends, also when it fails.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jobs::{
    BrokerOptions, ConsumerConfig, Driver, Job, JobId, JobState, Outcome, Producer, QueueName, Settlement,
    broker::{CancelOutcome, DeadOutcome},
    job::{AttemptOutcome, now_ms},
};
use serde_json::value::RawValue;

struct Env {
    broker: Arc<dyn Producer>,
    /// The history database (RabbitMQ reads job state and idempotency keys from it).
    db: sea_orm::DatabaseConnection,
    queue: QueueName,
    cleanup: Box<dyn FnOnce() + Send>,
    /// Stops this test's Redis Cluster (if any) when the test ends, passed or not.
    _cluster: Option<Cluster>,
}

/// A 3-node Redis Cluster of this test's own: servers on free ports, their files in a
/// directory of their own; killed and deleted on drop.
struct Cluster {
    servers: Vec<std::process::Child>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port free now whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn pong(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "PING"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
}

impl Cluster {
    async fn start() -> Self {
        for tool in ["redis-server", "redis-cli"] {
            let found = std::process::Command::new(tool).arg("--version").output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "{tool} is needed to start a Redis Cluster for the redis_cluster tests (apt-get install redis-server)"
            );
        }
        let dir = std::env::temp_dir().join(format!("drover-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Cluster {
            servers: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        let mut tries = 0;
        while cluster.servers.len() < 3 {
            let port = free_cluster_port();
            let mut child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .arg("--dir")
                .arg(&cluster.dir)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server starts");
            // Another test may take the port between the check and the bind: then try another.
            let start = Instant::now();
            let up = loop {
                if pong(port) {
                    break true;
                }
                if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(10) {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if up {
                cluster.servers.push(child);
                cluster.ports.push(port);
            } else {
                let _ = child.kill();
                let _ = child.wait();
                tries += 1;
                assert!(tries < 10, "no redis-server of the cluster would start");
            }
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &cluster.ports {
            cluster.wait_for(port, "CLUSTER INFO", "cluster_state:ok").await;
        }
        cluster
    }

    async fn wait_for(&self, port: u16, command: &str, expect: &str) {
        let start = Instant::now();
        loop {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(command.split(' '))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(expect) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis on port {port} never answered {command} with {expect}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

impl Env {
    /// Pushes as the API does: the broker first, then the enqueue recorded in the history
    /// database (the API's writer batches it; here it is written at once).
    async fn push(&self, job: Job) -> jobs::Enqueued {
        let out = self.broker.push(job.clone()).await.unwrap();
        if !out.duplicate {
            schema::history::apply_batch(&self.db, &[enqueued_event(&job)])
                .await
                .unwrap();
        }
        out
    }

    /// Fetches until `n` jobs arrived or `within` passed, recording each start as the worker
    /// runtime does.
    async fn fetch_n(&self, d: &Arc<dyn Driver>, n: usize, within: Duration) -> Vec<Job> {
        let got = fetch_n(d, n, within).await;
        let started: Vec<_> = got.iter().map(started_event).collect();
        schema::history::apply_batch(&self.db, &started).await.unwrap();
        got
    }

    async fn wait_for_dead(&self, n: u64) {
        let start = Instant::now();
        loop {
            let s = self.broker.stats(&self.queue).await.unwrap();
            if s.dead == n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "expected {n} dead: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn enqueued_event(job: &Job) -> schema::history::HistoryEvent {
    schema::history::HistoryEvent::Enqueued {
        id: job.id.0,
        queue: job.queue.to_string(),
        kind: job.kind.to_string(),
        payload: serde_json::from_str(job.payload.get()).unwrap(),
        max_attempts: job.max_attempts as i32,
        priority: job.priority,
        idempotency_key: job.idempotency_key.clone(),
        trace_id: None,
        run_at: job.run_at_ms.and_then(chrono::DateTime::from_timestamp_millis),
        at: chrono::Utc::now(),
    }
}

fn started_event(job: &Job) -> schema::history::HistoryEvent {
    schema::history::HistoryEvent::Started {
        id: job.id.0,
        queue: job.queue.to_string(),
        kind: job.kind.to_string(),
        attempt: job.attempt as i32,
        max_attempts: job.max_attempts as i32,
        worker_id: "test".into(),
        trace_id: None,
        at: chrono::Utc::now(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    RedisCluster,
    Amqp,
    Sqlite,
}

async fn env(kind: Kind) -> Env {
    let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
    let db_path = std::env::temp_dir().join(format!("{prefix}-history.db"));
    let db = schema::connect(&format!("sqlite://{}", db_path.display()))
        .await
        .unwrap();
    schema::migrate(&db).await.unwrap();
    let mut cluster = None;
    let (url, extra): (String, Option<std::path::PathBuf>) = match kind {
        Kind::RedisCluster => {
            let c = Cluster::start().await;
            let url = c.url();
            cluster = Some(c);
            (url, None)
        }
        Kind::Redis => {
            require(
                "Redis",
                "127.0.0.1:6379",
                "redis-server --daemonize yes --port 6379 --save \"\"",
            )
            .await;
            ("redis://127.0.0.1:6379/0".into(), None)
        }
        Kind::Amqp => {
            require("RabbitMQ", "127.0.0.1:5672", "rabbitmq-server -detached").await;
            ("amqp://guest:guest@127.0.0.1:5672/%2f".into(), None)
        }
        Kind::Sqlite => {
            let p = std::env::temp_dir().join(format!("{prefix}-broker.db"));
            (format!("sqlite://{}", p.display()), Some(p))
        }
    };
    let broker = jobs::broker::connect(
        &url,
        BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let cleanup = Box::new(move || {
        let _ = std::fs::remove_file(&db_path);
        if let Some(p) = extra {
            let _ = std::fs::remove_file(p);
        }
        if matches!(kind, Kind::Amqp) {
            let prefix = prefix.clone();
            // The closure is synchronous; a thread of its own can run the async client.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(delete_amqp_queues(&prefix));
            })
            .join();
        }
        if matches!(kind, Kind::Redis) {
            // Only this test's keys.
            let client = ::redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
            if let Ok(mut c) = client.get_connection() {
                let keys: Vec<String> = ::redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query(&mut c)
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = ::redis::cmd("DEL").arg(keys).query(&mut c);
                }
            }
        }
    });
    Env {
        broker,
        db,
        queue: QueueName::parse("default").unwrap(),
        cleanup,
        _cluster: cluster,
    }
}

/// Deletes the queues drover declares for `default` under `prefix`.
async fn delete_amqp_queues(prefix: &str) {
    let props = lapin::ConnectionProperties::default();
    let Ok(conn) = lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", props).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let mut names = Vec::new();
    for q in ["default", "noop"] {
        names.extend([format!("{prefix}.{q}"), format!("{prefix}.{q}.dead")]);
        names.extend((0..=24).map(|k| format!("{prefix}.{q}.delay.{k}")));
    }
    for name in names {
        let _ = ch
            .queue_delete(
                name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{prefix}.canceled").as_str().into(), Default::default())
        .await;
    let _ = conn.close(0, "done".into()).await;
}

async fn require(name: &str, addr: &str, how: &str) {
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        panic!("{name} is not reachable at {addr}; start it with `{how}`");
    }
}

fn job(q: &QueueName, max_attempts: u32) -> Job {
    Job {
        id: JobId::new(),
        queue: q.clone(),
        kind: "sleep".into(),
        payload: RawValue::from_string(r#"{"ms":0}"#.into()).unwrap(),
        max_attempts,
        priority: 0,
        enqueued_at_ms: now_ms(),
        run_at_ms: None,
        trace_id: None,
        idempotency_key: None,
        attempt: 0,
        crashes: 0,
        attempts_before: 0,
        receipt: 0,
    }
}

fn cfg(lease: Duration) -> ConsumerConfig {
    ConsumerConfig {
        lease,
        ..ConsumerConfig::default()
    }
}

fn settle(job: Job, outcome: Outcome, worker: &ConsumerConfig) -> Settlement {
    Settlement {
        job: job.into(),
        outcome,
        worker: worker.worker.clone(),
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
    }
}

/// Fetches until `n` jobs arrived or `within` passed.
async fn fetch_n(d: &Arc<dyn Driver>, n: usize, within: Duration) -> Vec<Job> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < n && start.elapsed() < within {
        got.extend(d.fetch(n - got.len(), Duration::from_millis(200)).await.unwrap());
    }
    got
}

async fn pushed_jobs_are_each_delivered_once_and_acked(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let jobs: Vec<Job> = (0..1_000).map(|_| job(&e.queue, 3)).collect();
    let mut ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let res = e.broker.push_batch(jobs).await.unwrap();
    assert_eq!(res.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    // Settle as batches arrive, as a worker does (RabbitMQ caps unacked deliveries by qos).
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 1_000 && start.elapsed() < Duration::from_secs(20) {
        let got = d.fetch(200, Duration::from_millis(200)).await.unwrap();
        assert!(got.iter().all(|j| j.attempt == 1));
        seen.extend(got.iter().map(|j| j.id));
        d.settle(
            &got.into_iter()
                .map(|j| settle(j, Outcome::Succeeded, &c))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every job delivered exactly once");
    assert!(
        d.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty(),
        "nothing delivered twice"
    );
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!((s.pending, s.dead), (0, 0), "{s:?}");
    (e.cleanup)();
}

async fn a_retry_comes_back_at_its_time_with_the_next_attempt_number(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    e.broker.push(job(&e.queue, 3)).await.unwrap();
    let first = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    let retry_at = now_ms() + 400;
    let outcome = Outcome::Retry {
        at_ms: retry_at,
        error: "boom".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(first.clone(), outcome, &c)]).await.unwrap();
    let again = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("redelivered");
    let late = now_ms() - retry_at;
    println!("{kind:?}: retry delivered {late} ms after its time");
    assert!(late >= -5, "retry delivered {} ms early", -late);
    assert_eq!((again.id, again.attempt), (first.id, 2));
    (e.cleanup)();
}

async fn a_job_failing_its_last_attempt_is_dead_and_counted(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let id = e.broker.push(job(&e.queue, 1)).await.unwrap().id;
    let j = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    let dead = Outcome::Dead {
        error: "bad".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(j, dead, &c)]).await.unwrap();
    let start = Instant::now();
    loop {
        let s = e.broker.stats(&e.queue).await.unwrap();
        if s.dead == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "dead job not counted: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.fetch(1, Duration::from_millis(300)).await.unwrap().is_empty());
    let dead = e.broker.dead(&e.queue, 0, 10).await.unwrap();
    assert_eq!(dead.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert_eq!(dead[0].last_error.as_deref(), Some("bad"));
    assert_eq!((dead[0].status, dead[0].attempts), (JobState::Dead, 1));
    (e.cleanup)();
}

async fn released_jobs_go_back_unstarted(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    e.broker.push(job(&e.queue, 3)).await.unwrap();
    let j = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    d.release(std::slice::from_ref(&j)).await.unwrap();
    let again = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("redelivered");
    assert_eq!(again.id, j.id);
    assert_eq!(again.attempt, 1, "a released job's attempt is not counted");
    (e.cleanup)();
}

async fn a_delayed_job_is_not_delivered_early(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let mut j = job(&e.queue, 3);
    let at = now_ms() + 700;
    j.run_at_ms = Some(at);
    e.broker.push(j).await.unwrap();
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!((s.pending, s.scheduled), (0, 1), "{s:?}");
    let got = fetch_n(&d, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(now_ms() >= at - 5, "delivered {} ms early", at - now_ms());
    (e.cleanup)();
}

async fn an_idle_fetch_wakes_up_as_soon_as_a_job_is_pushed(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let mut lat = Vec::new();
    for _ in 0..20 {
        let d2 = d.clone();
        let waiter = tokio::spawn(async move {
            loop {
                let got = d2.fetch(1, Duration::from_secs(1)).await.unwrap();
                if !got.is_empty() {
                    return (Instant::now(), got);
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let sent = Instant::now();
        e.broker.push(job(&e.queue, 3)).await.unwrap();
        let (at, got) = waiter.await.unwrap();
        lat.push((at - sent).as_secs_f64() * 1e3);
        d.settle(
            &got.into_iter()
                .map(|j| settle(j, Outcome::Succeeded, &c))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "{kind:?}: idle pickup after push: p50 {:.2} ms, max {:.2} ms",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    (e.cleanup)();
}

async fn a_pending_job_cancels_and_a_running_one_does_not(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let a = e.push(job(&e.queue, 3)).await.id;
    assert_eq!(e.broker.cancel(a).await.unwrap(), CancelOutcome::Canceled);
    assert_eq!(e.broker.get(a).await.unwrap().unwrap().status, JobState::Canceled);
    assert_eq!(
        e.broker.cancel(a).await.unwrap(),
        CancelOutcome::NotCancelable(JobState::Canceled)
    );
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let b = e.push(job(&e.queue, 3)).await.id;
    let got = e.fetch_n(&d, 2, Duration::from_secs(2)).await;
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        [b],
        "the canceled job never runs"
    );
    assert!(matches!(
        e.broker.cancel(b).await.unwrap(),
        CancelOutcome::NotCancelable(JobState::Running)
    ));
    assert_eq!(
        e.broker.cancel(JobId::new()).await.unwrap(),
        CancelOutcome::NotFound
    );
    (e.cleanup)();
}

/// A worker dies holding a job: on Redis and SQLite its lease runs out, on RabbitMQ its channel
/// closes unacknowledged.
async fn a_job_whose_worker_died_is_delivered_again_with_the_crash_counted(kind: Kind) {
    let e = env(kind).await;
    let short = cfg(Duration::from_millis(300));
    let d1 = e.broker.driver(&e.queue, &short).await.unwrap();
    e.push(job(&e.queue, 3)).await;
    let lost = e
        .fetch_n(&d1, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    assert_eq!(lost.crashes, 0);
    // d1 dies: it neither renews nor settles. Another worker gets the job after the lease.
    d1.abandon().await;
    let other = cfg(Duration::from_secs(30));
    let d2 = e.broker.driver(&e.queue, &other).await.unwrap();
    let again = e
        .fetch_n(&d2, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("redelivered");
    assert_eq!((again.id, again.attempt, again.crashes), (lost.id, 2, 1));
    // The dead worker's late result is ignored: the job stays with its new holder, whose
    // result counts, and it is not delivered a third time.
    d1.settle(&[settle(lost, Outcome::Succeeded, &short)])
        .await
        .unwrap();
    assert!(e.fetch_n(&d2, 1, Duration::from_millis(700)).await.is_empty());
    assert_eq!(
        e.broker.get(again.id).await.unwrap().unwrap().status,
        JobState::Running
    );
    d2.settle(&[settle(again, Outcome::Succeeded, &other)])
        .await
        .unwrap();
    let d3 = e.broker.driver(&e.queue, &other).await.unwrap();
    assert!(e.fetch_n(&d3, 1, Duration::from_millis(700)).await.is_empty());
    (e.cleanup)();
}

/// A worker that dies on a job's last attempt leaves it dead, with the reason.
async fn a_worker_dying_on_the_last_attempt_leaves_the_job_dead(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_millis(100));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let id = e.push(job(&e.queue, 1)).await.id;
    assert_eq!(e.fetch_n(&d, 1, Duration::from_secs(5)).await.len(), 1);
    d.abandon().await;
    let d2 = e
        .broker
        .driver(&e.queue, &cfg(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(e.fetch_n(&d2, 1, Duration::from_millis(700)).await.is_empty());
    e.wait_for_dead(1).await;
    let dead = e.broker.dead(&e.queue, 0, 10).await.unwrap();
    assert_eq!(dead.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("lease expired"),
        "{:?}",
        dead[0].last_error
    );
    (e.cleanup)();
}

async fn the_dead_set_lists_the_newest_first(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = e.push(job(&e.queue, 1)).await.id;
        let got = e.fetch_n(&d, 1, Duration::from_secs(5)).await;
        let dead = Outcome::Dead {
            error: "bad".into(),
            how: AttemptOutcome::Failed,
        };
        d.settle(&[Settlement {
            finished_at_ms: now_ms() + n,
            ..settle(got.into_iter().next().expect("delivered"), dead, &c)
        }])
        .await
        .unwrap();
        ids.push(id);
        e.wait_for_dead(n as u64 + 1).await;
    }
    ids.reverse();
    let listed = |offset, limit| {
        let broker = e.broker.clone();
        let queue = e.queue.clone();
        async move {
            broker
                .dead(&queue, offset, limit)
                .await
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(0, 10).await, ids);
    assert_eq!(listed(1, 1).await, [ids[1]]);
    assert!(listed(3, 10).await.is_empty());
    (e.cleanup)();
}

/// A poison pill: each worker that takes the job dies. At the third death the job is dead,
/// with the reason, instead of taking down a fourth worker.
async fn a_job_that_kills_its_worker_three_times_is_quarantined(kind: Kind) {
    let e = env(kind).await;
    let id = e.push(job(&e.queue, 10)).await.id;
    for crash in 0..3 {
        let c = cfg(Duration::from_millis(200));
        let d = e.broker.driver(&e.queue, &c).await.unwrap();
        let got = e.fetch_n(&d, 1, Duration::from_secs(5)).await;
        assert_eq!(
            got.iter().map(|j| (j.id, j.crashes)).collect::<Vec<_>>(),
            [(id, crash)],
            "delivery {}",
            crash + 1
        );
        d.abandon().await;
    }
    // The next fetch (any worker's) takes back the expired lease and quarantines the job.
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    assert!(
        e.fetch_n(&d, 1, Duration::from_secs(1)).await.is_empty(),
        "a quarantined job is not delivered again"
    );
    e.wait_for_dead(1).await;
    let dead = e.broker.dead(&e.queue, 0, 10).await.unwrap();
    assert_eq!(dead.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("quarantined: its worker died 3 times while running it")
    );
    (e.cleanup)();
}

/// Dead jobs can be retried — with a fresh attempt budget, attempt numbers counting on — or
/// discarded, one at a time; a job that is not dead is refused.
async fn a_dead_job_is_retried_with_a_fresh_budget_or_discarded(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let a = e.push(job(&e.queue, 2)).await.id;
    let b = e.push(job(&e.queue, 2)).await.id;
    for _ in 0..2 {
        let got = e.fetch_n(&d, 2, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 2);
        let settled: Vec<Settlement> = got
            .into_iter()
            .map(|j| {
                let outcome = if j.attempt < j.max_attempts {
                    Outcome::Retry {
                        at_ms: now_ms(),
                        error: "boom".into(),
                        how: AttemptOutcome::Failed,
                    }
                } else {
                    Outcome::Dead {
                        error: format!("gave up on {}", j.id),
                        how: AttemptOutcome::Failed,
                    }
                };
                settle(j, outcome, &c)
            })
            .collect();
        d.settle(&settled).await.unwrap();
    }
    e.wait_for_dead(2).await;
    let listed = e.broker.dead(&e.queue, 0, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed.iter().find(|r| r.id == a).unwrap().last_error,
        Some(format!("gave up on {a}"))
    );
    assert_eq!(e.broker.dead(&e.queue, 1, 10).await.unwrap().len(), 1, "offset");

    assert_eq!(e.broker.retry_dead(a).await.unwrap(), DeadOutcome::Done);
    let again = e
        .fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("retried");
    assert_eq!(
        (again.id, again.attempt, again.max_attempts),
        (a, 3, 4),
        "attempts count on; two more are allowed"
    );
    assert!(matches!(
        e.broker.retry_dead(a).await.unwrap(),
        DeadOutcome::NotDead(_) | DeadOutcome::NotFound
    ));
    d.settle(&[settle(again, Outcome::Succeeded, &c)]).await.unwrap();

    assert_eq!(e.broker.discard_dead(b).await.unwrap(), DeadOutcome::Done);
    e.wait_for_dead(0).await;
    assert!(e.broker.dead(&e.queue, 0, 10).await.unwrap().is_empty());
    assert_eq!(e.broker.discard_dead(b).await.unwrap(), DeadOutcome::NotFound);
    assert_eq!(
        e.broker.retry_dead(JobId::new()).await.unwrap(),
        DeadOutcome::NotFound
    );
    assert!(
        e.fetch_n(&d, 1, Duration::from_millis(500)).await.is_empty(),
        "the discarded job never runs"
    );
    (e.cleanup)();
}

/// A whole queue's dead set is retried or discarded at once.
async fn a_queues_whole_dead_set_is_retried_or_discarded(kind: Kind) {
    let e = env(kind).await;
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let kill_all = |got: Vec<Job>| -> Vec<Settlement> {
        got.into_iter()
            .map(|j| {
                let dead = Outcome::Dead {
                    error: "bad".into(),
                    how: AttemptOutcome::Failed,
                };
                settle(j, dead, &c)
            })
            .collect()
    };
    for _ in 0..5 {
        e.push(job(&e.queue, 1)).await;
    }
    let got = e.fetch_n(&d, 5, Duration::from_secs(5)).await;
    d.settle(&kill_all(got)).await.unwrap();
    e.wait_for_dead(5).await;

    assert_eq!(e.broker.retry_all_dead(&e.queue).await.unwrap(), 5);
    e.wait_for_dead(0).await;
    let got = e.fetch_n(&d, 5, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 5, "every retried job is delivered");
    assert!(
        got.iter().all(|j| (j.attempt, j.max_attempts) == (2, 2)),
        "{got:?}"
    );
    d.settle(&kill_all(got)).await.unwrap();
    e.wait_for_dead(5).await;

    assert_eq!(e.broker.discard_all_dead(&e.queue).await.unwrap(), 5);
    e.wait_for_dead(0).await;
    assert_eq!(e.broker.retry_all_dead(&e.queue).await.unwrap(), 0);
    assert!(e.fetch_n(&d, 1, Duration::from_millis(500)).await.is_empty());
    (e.cleanup)();
}

async fn an_idempotency_key_returns_the_first_job(kind: Kind) {
    let e = env(kind).await;
    let mut a = job(&e.queue, 3);
    a.idempotency_key = Some("order-42".into());
    let mut b = job(&e.queue, 3);
    b.idempotency_key = Some("order-42".into());
    let first = e.broker.push(a.clone()).await.unwrap();
    let second = e.broker.push(b).await.unwrap();
    assert_eq!((first.id, first.duplicate), (a.id, false));
    assert_eq!((second.id, second.duplicate), (a.id, true));
    // Within one batch too, and other keys are unaffected.
    let keyed = |key: &str| Job {
        idempotency_key: Some(key.into()),
        ..job(&e.queue, 3)
    };
    let batch = vec![keyed("order-43"), keyed("order-43"), keyed("order-42")];
    let res = e.broker.push_batch(batch.clone()).await.unwrap();
    assert_eq!((res[0].id, res[0].duplicate), (batch[0].id, false));
    assert_eq!((res[1].id, res[1].duplicate), (batch[0].id, true));
    assert_eq!((res[2].id, res[2].duplicate), (a.id, true));
    // The same key on another queue is another key.
    let mut elsewhere = job(&QueueName::parse("noop").unwrap(), 3);
    elsewhere.idempotency_key = Some("order-42".into());
    assert!(!e.broker.push(elsewhere).await.unwrap().duplicate);
    let start = Instant::now();
    while e.broker.stats(&e.queue).await.unwrap().pending != 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "two jobs are pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (e.cleanup)();
}

/// Many concurrent single pushes through the API's coalescer: each caller gets its own job's
/// id (or, for a repeated idempotency key, the first job's), and the broker holds every job once.
async fn concurrent_pushes_are_batched_and_each_answered(kind: Kind) {
    let e = env(kind).await;
    let coalesced = Arc::new(jobs::broker::coalesce::Coalescing::new(e.broker.clone()));
    let keyed = true;
    let pushes = (0..300).map(|i| {
        let mut j = job(&e.queue, 3);
        if keyed && i % 100 == 0 {
            j.idempotency_key = Some("same-key".into());
        }
        let coalesced = coalesced.clone();
        tokio::spawn(async move {
            (
                j.idempotency_key.is_some(),
                j.id,
                coalesced.push(j).await.unwrap(),
            )
        })
    });
    let results = futures::future::join_all(pushes).await;
    let mut stored = 0;
    let mut keyed_answers = Vec::new();
    for (with_key, sent, got) in results.into_iter().map(Result::unwrap) {
        if with_key {
            keyed_answers.push(got);
        } else {
            assert_eq!(
                (got.id, got.duplicate),
                (sent, false),
                "a caller got another job's id"
            );
        }
        stored += usize::from(!got.duplicate);
    }
    if keyed {
        // One of the three stored its job; the other two got that job's id.
        assert_eq!(keyed_answers.iter().filter(|a| !a.duplicate).count(), 1);
        assert!(
            keyed_answers.iter().all(|a| a.id == keyed_answers[0].id),
            "{keyed_answers:?}"
        );
    }
    let expected = if keyed { 298 } else { 300 };
    assert_eq!(stored, expected);
    let c = cfg(Duration::from_secs(30));
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    // Settle as batches arrive (RabbitMQ caps unacknowledged deliveries).
    let mut delivered = Vec::new();
    let start = Instant::now();
    while delivered.len() < expected && start.elapsed() < Duration::from_secs(20) {
        let got = d.fetch(100, Duration::from_millis(200)).await.unwrap();
        delivered.extend(got.iter().map(|j| j.id));
        let done: Vec<Settlement> = got
            .into_iter()
            .map(|j| settle(j, Outcome::Succeeded, &c))
            .collect();
        d.settle(&done).await.unwrap();
    }
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), expected);
    (e.cleanup)();
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Kind::Redis).await } )* }
        mod redis_cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Kind::RedisCluster).await } )* }
        mod amqp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Kind::Amqp).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Kind::Sqlite).await } )* }
    };
}

conformance!(
    pushed_jobs_are_each_delivered_once_and_acked,
    a_retry_comes_back_at_its_time_with_the_next_attempt_number,
    a_job_failing_its_last_attempt_is_dead_and_counted,
    released_jobs_go_back_unstarted,
    a_delayed_job_is_not_delivered_early,
    an_idle_fetch_wakes_up_as_soon_as_a_job_is_pushed,
    a_pending_job_cancels_and_a_running_one_does_not,
    a_job_whose_worker_died_is_delivered_again_with_the_crash_counted,
    a_job_that_kills_its_worker_three_times_is_quarantined,
    a_worker_dying_on_the_last_attempt_leaves_the_job_dead,
    the_dead_set_lists_the_newest_first,
    a_dead_job_is_retried_with_a_fresh_budget_or_discarded,
    a_queues_whole_dead_set_is_retried_or_discarded,
    an_idempotency_key_returns_the_first_job,
    concurrent_pushes_are_batched_and_each_answered,
);
