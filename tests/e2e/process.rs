//! The real `drover` binary as operators run it: signals, exit codes, `drover dev`.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use jobs::{BrokerOptions, Job, JobId, QueueName, job::now_ms};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::support::{
    AMQP_URL, Broker, REDIS_URL, authorized_client, create_pg_database, delete_amqp_prefix,
    delete_redis_prefix, drop_pg_database, unique,
};

/// An API key made the way an operator makes one: `drover keys create <args>` on `env`'s
/// database (the key is the command's standard output).
pub(crate) async fn create_key(env: &[(&str, &str)], args: &[&str]) -> String {
    let created = drover()
        .args(["keys", "create"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    assert!(
        created.status.success(),
        "drover keys create failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    String::from_utf8(created.stdout).unwrap().trim().to_owned()
}

pub(crate) fn drover() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    c.kill_on_drop(true).env("DROVER_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("DROVER_") && k != "DROVER_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// Reads what `drover dev` prints at start, as a user would: its URL, and the admin key it
/// creates on a database without keys (shown once).
pub(crate) async fn dev_banner(dev: &mut Child) -> (String, String) {
    let mut lines = BufReader::new(dev.stdout.take().expect("stdout piped")).lines();
    let (mut base, mut key) = (None, None);
    while base.is_none() || key.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("drover dev printed its URL and key")
            .unwrap()
            .expect("a line");
        for word in line.split_whitespace() {
            if word.starts_with("http://") && base.is_none() {
                base = Some(word.to_owned());
            }
            if let Some(k) = word.strip_prefix("DROVER_KEY=") {
                key = Some(k.to_owned());
            }
        }
    }
    // Keep draining stdout so that the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (base.unwrap(), key.unwrap())
}

pub(crate) fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM {pid} failed");
}

async fn sigterm_lets_fifty_running_one_second_jobs_finish_once_and_exits_zero(broker: Broker) {
    let prefix = unique("t");
    let (pg_name, db_url, broker_url, sqlite_path) = match broker {
        Broker::Redis | Broker::Amqp => {
            let (name, url) = create_pg_database().await;
            let b = if broker == Broker::Redis {
                REDIS_URL
            } else {
                AMQP_URL
            };
            (Some(name), url, b.to_owned(), None)
        }
        Broker::Sqlite => {
            let path = std::env::temp_dir().join(format!("{prefix}.db"));
            let url = format!("sqlite://{}", path.display());
            (None, url.clone(), url, Some(path))
        }
    };
    let env = [
        ("DROVER_BROKER_URL", broker_url.as_str()),
        ("DROVER_DATABASE_URL", db_url.as_str()),
        ("DROVER_BROKER_PREFIX", prefix.as_str()),
    ];
    let migrated = drover().arg("migrate").envs(env).status().await.unwrap();
    assert!(migrated.success(), "drover migrate failed");

    let db = schema::connect(&db_url).await.unwrap();
    let producer = jobs::broker::connect(
        &broker_url,
        BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let queue = QueueName::parse("default").unwrap();
    let ids: Vec<JobId> = (0..50).map(|_| JobId::new()).collect();
    let batch = ids
        .iter()
        .map(|id| Job {
            id: *id,
            queue: queue.clone(),
            kind: "sleep".into(),
            payload: serde_json::value::RawValue::from_string(r#"{"ms":1000}"#.into()).unwrap(),
            max_attempts: 5,
            priority: 0,
            enqueued_at_ms: now_ms(),
            run_at_ms: None,
            trace_id: None,
            idempotency_key: None,
            attempt: 0,
            crashes: 0,
            attempts_before: 0,
            receipt: 0,
        })
        .collect();
    producer.push_batch(batch).await.unwrap();

    let metrics_port = free_port();
    let mut worker = drover()
        .args(["worker", "--queues", "default", "--concurrency", "50"])
        .env("DROVER_WORKER_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .envs(env)
        .spawn()
        .unwrap();
    // Wait until all 50 are running, then ask the worker to stop. Running as the worker counts
    // it (its busy slots), not as the broker does: a leased job still in the worker's prefetch
    // buffer at SIGTERM is given back untouched, as it should be.
    let http = reqwest::Client::new();
    let all_busy = r#"drover_worker_busy_slots{queue="default"} 50"#;
    let start = Instant::now();
    loop {
        let metrics = match http
            .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if metrics.lines().any(|l| l == all_busy) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "50 jobs never ran at once: {:?}",
            producer.stats(&queue).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&worker);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("exited")
        .unwrap();
    assert_eq!(status.code(), Some(0), "the worker exit status after SIGTERM");

    // Every job ran exactly once and succeeded; nothing is left in the queue.
    let start = Instant::now();
    loop {
        let mut states = Vec::new();
        for id in &ids {
            let rec = match producer.get(*id).await.unwrap() {
                Some(r) => Some((r.status, r.attempts)),
                None => schema::queries::get_job(&db, id.0)
                    .await
                    .unwrap()
                    .map(|v| (v.job.status.parse().unwrap(), v.job.attempts as u32)),
            };
            states.push(rec);
        }
        let done = states
            .iter()
            .filter(|s| matches!(s, Some((jobs::JobState::Succeeded, 1))))
            .count();
        if done == 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not every job succeeded exactly once: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = producer.stats(&queue).await.unwrap();
    assert_eq!((s.pending, s.running, s.scheduled, s.dead), (0, 0, 0, 0), "{s:?}");

    match broker {
        Broker::Redis => delete_redis_prefix(&broker_url, &prefix).await,
        Broker::Amqp => delete_amqp_prefix(&broker_url, &prefix).await,
        Broker::Sqlite => {}
    }
    if let Some(name) = pg_name {
        drop(db);
        drop_pg_database(&name).await;
    }
    if let Some(path) = sqlite_path {
        let _ = std::fs::remove_file(path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_redis_lets_fifty_running_jobs_finish_once_and_exits_zero() {
    sigterm_lets_fifty_running_one_second_jobs_finish_once_and_exits_zero(Broker::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_amqp_lets_fifty_running_jobs_finish_once_and_exits_zero() {
    sigterm_lets_fifty_running_one_second_jobs_finish_once_and_exits_zero(Broker::Amqp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_sqlite_lets_fifty_running_jobs_finish_once_and_exits_zero() {
    sigterm_lets_fifty_running_one_second_jobs_finish_once_and_exits_zero(Broker::Sqlite).await
}

/// `drover dev` needs no service: it comes up with Redis, RabbitMQ and Postgres pointed at
/// closed ports, serves the docs and runs a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_dev_runs_a_job_with_no_external_service() {
    let dir = std::env::temp_dir().join(unique("drover-dev-"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dev = drover()
        .arg("dev")
        .current_dir(&dir)
        .env("DROVER_LISTEN", "127.0.0.1:0")
        // Only the embedded defaults may be used; anything else would fail here.
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (base, key) = dev_banner(&mut dev).await;
    // The docs hold no data: no key needed; every route under /v1 needs one.
    let docs = reqwest::get(format!("{base}/docs")).await.unwrap();
    let anonymous = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"kind": "noop", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let http = authorized_client(&key);
    assert_eq!(docs.status().as_u16(), 200);
    assert!(docs.text().await.unwrap().to_lowercase().contains("swagger"));
    let res: serde_json::Value = http
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"kind": "noop", "payload": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = res["id"].as_str().expect("an id").to_owned();
    let start = Instant::now();
    loop {
        let job: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the job never succeeded: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&dev);
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .expect("exited")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

fn one_job(queue: &str, kind: &str, payload: &str) -> Job {
    Job {
        id: JobId::new(),
        queue: QueueName::parse(queue).unwrap(),
        kind: kind.into(),
        payload: serde_json::value::RawValue::from_string(payload.into()).unwrap(),
        max_attempts: 5,
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

/// The probes Kubernetes gives worker pods (k8s/base/workers.yaml): `--health-listen` serves
/// `/healthz`, `/readyz` and the job metrics; while the worker drains after SIGTERM it stays
/// alive but stops being ready, and it exits 0 once its running job is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_probes_stay_alive_but_not_ready_while_draining_and_serve_job_metrics() {
    let prefix = unique("t");
    let (pg_name, db_url) = create_pg_database().await;
    let env = [
        ("DROVER_BROKER_URL", REDIS_URL),
        ("DROVER_DATABASE_URL", db_url.as_str()),
        ("DROVER_BROKER_PREFIX", prefix.as_str()),
    ];
    let migrated = drover().arg("migrate").envs(env).status().await.unwrap();
    assert!(migrated.success(), "drover migrate failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut worker = drover()
        .args(["worker", "--queues", "noop"])
        .env("DROVER_WORKER_LISTEN", format!("127.0.0.1:{port}"))
        .envs(env)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{base}{path}")).send();
        async move {
            match req.await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        }
    };
    let start = Instant::now();
    while get("/healthz").await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "/healthz never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = get("/readyz").await;
    assert_eq!((status, body.contains(r#""broker":"ok""#)), (200, true), "{body}");

    let db = schema::connect(&db_url).await.unwrap();
    let producer = jobs::broker::connect(
        REDIS_URL,
        BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    producer.push(one_job("noop", "noop", "{}")).await.unwrap();
    let done = r#"drover_jobs_completed_total{queue="noop",kind="noop",outcome="succeeded"} 1"#;
    let start = Instant::now();
    loop {
        let (_, metrics) = get("/metrics").await;
        if metrics.contains(done) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {done} in:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A 2 s job running, then SIGTERM: alive and not ready until it is done, then exit 0.
    producer
        .push(one_job("noop", "sleep", r#"{"ms":5000}"#))
        .await
        .unwrap();
    let queue = QueueName::parse("noop").unwrap();
    // Started as the worker sees it (a busy slot), not leased as the broker does: a job still
    // in the prefetch buffer at SIGTERM is given back untouched, and would be left pending.
    let busy = r#"drover_worker_busy_slots{queue="noop"} 1"#;
    let start = Instant::now();
    while !get("/metrics").await.1.lines().any(|l| l == busy) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the sleep job never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&worker);
    let start = Instant::now();
    loop {
        let (ready, body) = get("/readyz").await;
        if ready == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        // Well within the job's 5 s: on a loaded machine the first probe can take a while.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "/readyz still {ready} while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get("/healthz").await.0,
        200,
        "liveness must hold while jobs finish"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("exited")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let s = producer.stats(&queue).await.unwrap();
    assert_eq!((s.pending, s.running, s.done), (0, 0, 2), "{s:?}");

    delete_redis_prefix(REDIS_URL, &prefix).await;
    drop(db);
    drop_pg_database(&pg_name).await;
}

/// A free TCP port on 127.0.0.1 (bound, then released for the process to take).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three `drover api` processes on one Redis hold a per-key limit of 100 requests/s between
/// them: clients pushing ~3× that through all three get 100/s accepted (within 5 %) and the
/// rest answered 429 problem+json with `Retry-After`. The key is made the way an operator
/// makes one, with `drover keys create`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_api_processes_on_one_redis_hold_a_keys_rate_limit_within_five_percent() {
    const RATE: f64 = 100.0;
    const BURST: u32 = 50;
    let prefix = unique("t");
    let (pg_name, db_url) = create_pg_database().await;
    let env = [
        ("DROVER_BROKER_URL", REDIS_URL),
        ("DROVER_DATABASE_URL", db_url.as_str()),
        ("DROVER_BROKER_PREFIX", prefix.as_str()),
    ];
    assert!(
        drover()
            .arg("migrate")
            .envs(env)
            .status()
            .await
            .unwrap()
            .success()
    );
    let key = create_key(
        &env,
        &["--role", "viewer", "--name", "rate-test", "--expires-in", "1h"],
    )
    .await;
    assert!(key.starts_with("drv_"), "{key}");

    let mut bases = Vec::new();
    let mut apis = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        apis.push(
            drover()
                .args(["api", "--listen", &format!("127.0.0.1:{port}")])
                .envs(env)
                .env("DROVER_RATE_LIMIT_KEY_RPS", RATE.to_string())
                // Half a second's worth: a busy machine that stalls the clients for a moment
                // does not lose what the bucket accrued meanwhile.
                .env("DROVER_RATE_LIMIT_KEY_BURST", BURST.to_string())
                .spawn()
                .unwrap(),
        );
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    let http = authorized_client(&key);
    for base in &bases {
        let start = Instant::now();
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "{base} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let the bucket refill from the readiness probing (none of which was charged, but be sure).
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 12 clients, 4 per process, each at ~25 requests/s: ~300/s offered against 100/s.
    let run = Duration::from_secs(10);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..12 {
        let (http, url) = (http.clone(), format!("{}/v1/queues/noop", bases[i % 3]));
        clients.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut other) = (0u64, 0u64, Vec::new());
            // Spread over the 40 ms period, so requests do not arrive twelve at a time.
            tokio::time::sleep(Duration::from_micros(i as u64 * 3_333)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            while started.elapsed() < run {
                tick.tick().await;
                let resp = http.get(&url).send().await.unwrap();
                match resp.status().as_u16() {
                    200 => ok += 1,
                    429 => {
                        assert!(resp.headers().contains_key("retry-after"));
                        assert_eq!(resp.headers()["content-type"], "application/problem+json");
                        limited += 1;
                    }
                    s => other.push(s),
                }
            }
            (ok, limited, other)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for c in clients {
        let (o, l, other) = c.await.unwrap();
        assert!(other.is_empty(), "unexpected statuses {other:?}");
        ok += o;
        limited += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst is spent once, at the start.
    let rate = (ok as f64 - f64::from(BURST)) / elapsed;
    println!(
        "RATE-LIMIT accepted={ok} limited={limited} elapsed={elapsed:.2}s rate={rate:.1}/s (limit {RATE}/s)"
    );
    assert!(
        limited > ok,
        "the clients did not push past the limit: {ok} ok, {limited} limited"
    );
    assert!(
        (rate - RATE).abs() <= RATE * 0.05,
        "3 processes admitted {rate:.1} requests/s for a limit of {RATE}/s"
    );

    for api in &apis {
        sigterm(api);
    }
    for mut api in apis {
        let _ = tokio::time::timeout(Duration::from_secs(30), api.wait()).await;
    }
    delete_redis_prefix(REDIS_URL, &prefix).await;
    drop_pg_database(&pg_name).await;
}
