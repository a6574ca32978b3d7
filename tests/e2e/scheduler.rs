//! The cron scheduler: several replicas firing each tick once (real `drover scheduler`
//! processes, one killed with SIGKILL mid-run), a tick stranded by a replica that died between
//! claiming and enqueuing it, missed ticks after downtime, and `drover dev` firing a schedule.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use jobs::{
    Catalog, Job, Producer,
    schedule::{CronSchedule, JobTemplate},
};
use schema::schedules::{self, Claim, NewTick, Origin, ScheduleWrite};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
};

use crate::{
    process::{drover, sigterm},
    support::{
        REDIS_URL, create_pg_database, delete_redis_prefix, drop_pg_database, percentile, require_service,
        unique,
    },
};

async fn require_redis() {
    require_service(
        "Redis",
        "127.0.0.1:6379",
        "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no",
    )
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One line a scheduler process logged about a tick.
#[derive(Clone, Debug)]
struct TickLine {
    replica: usize,
    tick: String,
    /// `fired` (this process's push created the job) or `already` (a repeated push the broker
    /// answered with the first job).
    what: &'static str,
    delay_ms: u64,
}

/// A `drover scheduler` process whose JSON log lines about ticks are collected.
struct SchedulerProcess {
    child: Child,
    health: String,
}

fn spawn_scheduler(
    index: usize,
    env: &[(&str, String)],
    lines: Arc<Mutex<Vec<TickLine>>>,
) -> SchedulerProcess {
    let port = free_port();
    let mut child = drover()
        .arg("scheduler")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DROVER_LOG", "info")
        .env("DROVER_LOG_FORMAT", "json")
        .env("DROVER_SCHEDULER_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("drover scheduler starts");
    let stdout = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let what = match v["fields"]["message"].as_str() {
                Some("schedule tick fired") => "fired",
                Some("tick's job was already enqueued") => "already",
                _ => continue,
            };
            // The process also fires the families' default schedules: only `ha` is measured.
            if v["span"]["schedule"].as_str() != Some("ha") {
                continue;
            }
            lines.lock().unwrap().push(TickLine {
                replica: index,
                tick: v["span"]["tick"].as_str().unwrap_or_default().to_owned(),
                what,
                delay_ms: v["fields"]["delay_ms"].as_u64().unwrap_or(0),
            });
        }
    });
    SchedulerProcess {
        child,
        health: format!("http://127.0.0.1:{port}"),
    }
}

/// Every job in the broker's `noop` queue, by the tick its idempotency key names.
async fn jobs_per_tick(prefix: &str) -> BTreeMap<String, Vec<String>> {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let data: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:{{noop}}:data"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut per_tick: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, envelope) in data {
        let job: Job = serde_json::from_str(&envelope).expect("an envelope");
        let key = job
            .idempotency_key
            .expect("a scheduled job carries its tick's key");
        let tick = key.rsplit_once("ha:").expect("schedule:ha:{tick}").1.to_owned();
        per_tick.entry(tick).or_default().push(id);
    }
    per_tick
}

/// Three `drover scheduler` processes share a per-second schedule (a `[[schedules]]` default
/// each of them inserts at start) on Postgres and Redis for 22 s (`DROVER_TEST_SCHEDULER_HA_S`
/// for longer runs). Every 8 s the oldest replica is killed with SIGKILL and a replacement
/// starts 3 s later. Every second between the first and the last tick has exactly one job in
/// the broker, and exactly one process pushed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scheduler_processes_fire_each_tick_once_while_one_is_killed_and_replaced() {
    require_redis().await;
    let prefix = unique("t");
    let (pg_name, db_url) = create_pg_database().await;
    let dir = std::env::temp_dir().join(unique("drover-sched-"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("drover.toml");
    std::fs::write(
        &config,
        r#"
[[schedules]]
name = "ha"
cron = "* * * * * *"
job = { kind = "noop" }
"#,
    )
    .unwrap();
    let env = vec![
        ("DROVER_BROKER_URL", REDIS_URL.to_owned()),
        ("DROVER_DATABASE_URL", db_url.clone()),
        ("DROVER_BROKER_PREFIX", prefix.clone()),
        ("DROVER_CONFIG", config.display().to_string()),
        // A replica killed between claim and enqueue leaves its tick for 3 s.
        ("DROVER_SCHEDULER_LEASE_S", "3".to_owned()),
    ];
    let migrated = drover()
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .await
        .unwrap();
    assert!(migrated.success(), "drover migrate failed");

    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut replicas: Vec<Option<SchedulerProcess>> = (0..3)
        .map(|i| Some(spawn_scheduler(i, &env, lines.clone())))
        .collect();
    let http = reqwest::Client::new();

    // Running: ticks fire, and every replica is ready (database and broker reachable).
    let start = Instant::now();
    while lines.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no tick fired within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in replicas.iter().flatten() {
        // One replica's tick can fire before another has bound its probe listener (a loaded
        // machine starts processes slowly): wait for the listener, then require ready.
        let start = Instant::now();
        let ready = loop {
            match http.get(format!("{}/readyz", r.health)).send().await {
                Ok(ready) => break ready,
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{}/readyz never answered: {e}",
                    r.health
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ready.status().as_u16(), 200);
        let body = ready.text().await.unwrap();
        assert!(
            body.contains(r#""database":"ok""#) && body.contains(r#""broker":"ok""#),
            "{body}"
        );
    }

    // Every 8 s the oldest live replica is killed with SIGKILL; a replacement starts 3 s later.
    let run_for = Duration::from_secs(
        std::env::var("DROVER_TEST_SCHEDULER_HA_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(22),
    );
    let running = Instant::now();
    let mut kills = Vec::new();
    // A replacement gets at least 5 s to start and fire before the end.
    while running.elapsed() + Duration::from_secs(8 + 3 + 5) <= run_for {
        tokio::time::sleep(Duration::from_secs(8)).await;
        let oldest = replicas.iter().position(Option::is_some).unwrap();
        let mut killed = replicas[oldest].take().unwrap();
        killed.child.start_kill().unwrap();
        killed.child.wait().await.unwrap();
        kills.push(Utc::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let index = replicas.len();
        replicas.push(Some(spawn_scheduler(index, &env, lines.clone())));
    }
    tokio::time::sleep(run_for.saturating_sub(running.elapsed())).await;

    // Each live replica's tick counter agrees with what it logged.
    let mut counted_total = 0;
    for (i, r) in replicas.iter().enumerate() {
        let Some(r) = r else { continue };
        let metrics = http
            .get(format!("{}/metrics", r.health))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted: u64 = metrics
            .lines()
            .find(|l| l.starts_with(r#"drover_schedule_ticks_total{schedule="ha"}"#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let logged = lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.replica == i && l.what == "fired")
            .count() as u64;
        // The two are read a moment apart while ticks keep firing.
        assert!(
            counted.abs_diff(logged) <= 2,
            "replica {i}: drover_schedule_ticks_total {counted}, logged {logged}"
        );
        counted_total += counted;
    }
    assert!(counted_total > 0, "no replica counted a tick");

    for r in replicas.iter().flatten() {
        sigterm(&r.child);
    }
    for r in replicas.iter_mut().flatten() {
        let status = tokio::time::timeout(Duration::from_secs(15), r.child.wait())
            .await
            .expect("a scheduler exits after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }
    // Let the last log lines through.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let per_tick = jobs_per_tick(&prefix).await;
    let ticks: Vec<DateTime<Utc>> = per_tick
        .keys()
        .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc))
        .collect();
    let (first, last) = (ticks[0], *ticks.last().unwrap());
    let expected: BTreeSet<String> = (0..=(last - first).num_seconds())
        .map(|s| (first + chrono::Duration::seconds(s)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .collect();
    let missing: Vec<&String> = expected.iter().filter(|t| !per_tick.contains_key(*t)).collect();
    let duplicated: Vec<(&String, usize)> = per_tick
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(t, ids)| (t, ids.len()))
        .collect();
    let lines = lines.lock().unwrap().clone();
    let mut pushes: BTreeMap<&str, usize> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.what == "fired") {
        *pushes.entry(l.tick.as_str()).or_default() += 1;
    }
    let pushed_twice: Vec<_> = pushes.iter().filter(|(_, n)| **n > 1).collect();
    let repeated = lines.iter().filter(|l| l.what == "already").count();
    let by_replica: Vec<usize> = (0..replicas.len())
        .map(|i| {
            lines
                .iter()
                .filter(|l| l.replica == i && l.what == "fired")
                .count()
        })
        .collect();
    let mut delays: Vec<f64> = lines.iter().map(|l| l.delay_ms as f64).collect();
    delays.sort_by(f64::total_cmp);
    let db = schema::connect(&db_url).await.unwrap();
    let unenqueued = schedules::unenqueued_ticks(&db, "", Utc::now() + chrono::Duration::days(1), 1000)
        .await
        .unwrap();
    println!(
        "SCHEDULER-HA ticks={} span={}s first={first} last={last} missing={} duplicate_jobs={} \
         pushed_twice={} repeated_pushes_answered_by_idempotency={repeated} sigkills={} \
         fired_by_replica={by_replica:?} delay_ms_p50={} p99={} max={}",
        per_tick.len(),
        (last - first).num_seconds() + 1,
        missing.len(),
        duplicated.len(),
        pushed_twice.len(),
        kills.len(),
        percentile(&delays, 50.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(f64::NAN),
    );
    assert!(!kills.is_empty(), "no replica was killed");
    assert!(
        first < kills[0] && last > *kills.last().unwrap() + chrono::Duration::seconds(4),
        "the ticks must span the kills and the replacements"
    );
    assert!(
        per_tick.len() as u64 + 5 >= run_for.as_secs(),
        "only {} ticks fired in {run_for:?}",
        per_tick.len()
    );
    assert!(missing.is_empty(), "ticks without a job: {missing:?}");
    assert!(
        duplicated.is_empty(),
        "ticks with more than one job: {duplicated:?}"
    );
    assert!(
        pushed_twice.is_empty(),
        "ticks pushed by two replicas: {pushed_twice:?}"
    );
    assert_eq!(
        pushes.len(),
        per_tick.len(),
        "every job in the broker was logged as fired once"
    );
    assert!(
        unenqueued.is_empty(),
        "ticks claimed but never enqueued: {unenqueued:?}"
    );
    assert!(
        by_replica[3..].iter().any(|n| *n > 0),
        "no replacement replica ever fired: {by_replica:?}"
    );

    drop(db);
    delete_redis_prefix(REDIS_URL, &prefix).await;
    drop_pg_database(&pg_name).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn noop_write(name: &str, cron: &str, missed_ticks: &str) -> ScheduleWrite {
    ScheduleWrite {
        name: name.into(),
        cron: cron.into(),
        timezone: "UTC".into(),
        kind: "noop".into(),
        payload: json!({}),
        queue: None,
        priority: None,
        enabled: true,
        missed_ticks: missed_ticks.into(),
        origin: Origin::Api,
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Runs a scheduler loop in this process until `done` holds (checked every 100 ms, at most
/// 15 s), then stops it.
async fn run_scheduler_until<F, Fut>(
    db: &DatabaseConnection,
    broker: Arc<dyn Producer>,
    settings: workers::SchedulerSettings,
    done: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(workers::scheduler::run(
        db.clone(),
        broker,
        Arc::new(Catalog::default()),
        None,
        settings,
        async move {
            let _ = stopped.await;
        },
    ));
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the scheduler did not get there in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    task.await.unwrap().expect("the scheduler stops cleanly");
}

/// A replica claims two ticks and dies: one before pushing its job, one after pushing but
/// before recording it. Once the lease runs out another replica enqueues both — the first
/// now, the second answered by the broker with the job already there (idempotency key) — so
/// each tick has exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_a_dead_replica_claimed_are_enqueued_once_by_another_after_the_lease() {
    require_redis().await;
    let prefix = unique("t");
    let (pg_name, db_url) = create_pg_database().await;
    let db = schema::connect(&db_url).await.unwrap();
    schema::migrate(&db).await.unwrap();
    let broker = jobs::broker::connect(
        REDIS_URL,
        jobs::BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let catalog = Catalog::default();
    let cron = CronSchedule::parse("0 0 0 1 1 *", None).unwrap();
    let now = Utc::now();
    schedules::put(
        &db,
        &noop_write("yearly", "0 0 0 1 1 *", "skip"),
        cron.next_after(now),
        now,
    )
    .await
    .unwrap();
    let s = schedules::get(&db, "yearly").await.unwrap().unwrap();
    let template = JobTemplate {
        kind: "noop".into(),
        payload: json!({}),
        queue: None,
        priority: None,
    };
    let (never_pushed, pushed) = (at("2020-01-01T00:00:00Z"), at("2021-01-01T00:00:00Z"));
    let jobs: Vec<Job> = [never_pushed, pushed]
        .iter()
        .map(|t| {
            template
                .to_job(&catalog, "yearly", *t, now.timestamp_millis())
                .unwrap()
        })
        .collect();
    let held = schedules::claim(
        &db,
        Claim {
            schedule: "yearly",
            version: s.version,
            next_tick: s.next_tick,
            ticks: jobs
                .iter()
                .zip([never_pushed, pushed])
                .map(|(job, tick_at)| NewTick {
                    tick_at,
                    job_id: job.id.0,
                    envelope: serde_json::to_string(job).unwrap(),
                    stands_for: 1,
                })
                .collect(),
            replica: "dead-replica",
            lease_until: now + chrono::Duration::seconds(1),
            now,
        },
    )
    .await
    .unwrap()
    .expect("the claim applies");
    assert_eq!(held.len(), 2);
    let first_push = broker.push(jobs[1].clone()).await.unwrap();
    assert!(!first_push.duplicate);

    let settings = workers::SchedulerSettings {
        poll: Duration::from_millis(100),
        lease: Duration::from_secs(1),
        replica: "survivor".into(),
        ..Default::default()
    };
    let check_db = db.clone();
    run_scheduler_until(&db, broker.clone(), settings, || {
        let db = check_db.clone();
        async move {
            schedules::unenqueued_ticks(&db, "", Utc::now() + chrono::Duration::days(1), 10)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;

    let ticks = schedules::recent_ticks(&db, "yearly", 10).await.unwrap();
    assert_eq!(ticks.len(), 2);
    for t in &ticks {
        assert_eq!((t.claimed_by.as_str(), t.claims), ("survivor", 2), "{t:?}");
        assert!(t.enqueued_at.is_some());
        assert!(
            broker.get(jobs::JobId(t.job_id)).await.unwrap().is_some(),
            "{t:?}"
        );
    }
    let client = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let envelopes: Vec<String> = redis::cmd("HVALS")
        .arg(format!("{prefix}:{{noop}}:data"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keys: Vec<String> = envelopes
        .iter()
        .map(|e| serde_json::from_str::<Job>(e).unwrap().idempotency_key.unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "schedule:yearly:2020-01-01T00:00:00Z",
            "schedule:yearly:2021-01-01T00:00:00Z"
        ],
        "one job per tick"
    );

    drop(db);
    delete_redis_prefix(REDIS_URL, &prefix).await;
    drop_pg_database(&pg_name).await;
}

/// A scheduler that comes back after its schedules' ticks passed (here: yearly ticks from 2020
/// to 2025, the next in 2099): `skip` fires none of them, `run_once` fires one job for the
/// latest, standing for all six. On the embedded SQLite broker and database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_missed_ticks_follow_each_schedules_policy() {
    let path = std::env::temp_dir().join(format!("{}.db", unique("drover-missed-")));
    let url = format!("sqlite://{}", path.display());
    let db = schema::connect(&url).await.unwrap();
    schema::migrate(&db).await.unwrap();
    let broker = jobs::broker::connect(
        &url,
        jobs::BrokerOptions {
            prefix: "drover".into(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let cron = "0 0 0 1 1 * 2020-2025,2099";
    // Last seen by a scheduler before 2020: the next tick it had planned is 2020-01-01.
    let down_since = Some(at("2020-01-01T00:00:00Z"));
    for (name, policy) in [("skip-it", "skip"), ("once", "run_once")] {
        schedules::put(&db, &noop_write(name, cron, policy), down_since, Utc::now())
            .await
            .unwrap();
    }
    // Its last tick passed while the scheduler was down: it fires once, then never again.
    let ended = noop_write("ended", "0 0 0 1 1 * 2020-2021", "run_once");
    schedules::put(&db, &ended, down_since, Utc::now()).await.unwrap();
    let next = at("2099-01-01T00:00:00Z");
    let check_db = db.clone();
    run_scheduler_until(&db, broker.clone(), workers::SchedulerSettings::default(), || {
        let db = check_db.clone();
        async move {
            let all = schedules::list(&db).await.unwrap();
            let moved_on = all
                .iter()
                .all(|s| s.next_tick == if s.name == "ended" { None } else { Some(next) });
            let pending = schedules::unenqueued_ticks(&db, "", Utc::now() + chrono::Duration::days(1), 10)
                .await
                .unwrap();
            moved_on && pending.is_empty()
        }
    })
    .await;

    assert!(
        schedules::recent_ticks(&db, "skip-it", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let skipped = schedules::get(&db, "skip-it").await.unwrap().unwrap();
    assert_eq!(skipped.last_tick, None, "nothing fired");
    let once = schedules::recent_ticks(&db, "once", 10).await.unwrap();
    assert_eq!(once.len(), 1, "{once:?}");
    assert_eq!(
        (once[0].tick_at, once[0].stands_for),
        (at("2025-01-01T00:00:00Z"), 6)
    );
    let job = broker
        .get(jobs::JobId(once[0].job_id))
        .await
        .unwrap()
        .expect("the broker has the job");
    assert_eq!(job.kind, "noop");
    let ended = schedules::recent_ticks(&db, "ended", 10).await.unwrap();
    assert_eq!(
        ended
            .iter()
            .map(|t| (t.tick_at, t.stands_for))
            .collect::<Vec<_>>(),
        [(at("2021-01-01T00:00:00Z"), 2)]
    );
    assert!(
        schedules::active(&db)
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != "ended")
    );
    let stats = broker
        .stats(&jobs::QueueName::parse("noop").unwrap())
        .await
        .unwrap();
    assert_eq!(stats.pending, 2, "one job for each run_once schedule: {stats:?}");

    drop(db);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// `drover dev` runs the scheduler: a schedule created through the API fires within seconds and
/// its job runs on the embedded broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_dev_fires_a_schedule_created_through_the_api_and_runs_its_job() {
    let dir = std::env::temp_dir().join(unique("drover-dev-sched-"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dev = drover()
        .arg("dev")
        .current_dir(&dir)
        .env("DROVER_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (base, key) = crate::process::dev_banner(&mut dev).await;
    let http = crate::support::authorized_client(&key);
    let created = http
        .put(format!("{base}/v1/schedules/every-second"))
        .json(&json!({"cron": "* * * * * *", "job": {"kind": "sleep", "payload": {"ms": 1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);

    let start = Instant::now();
    let job_id = loop {
        let s: Value = http
            .get(format!("{base}/v1/schedules/every-second"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let enqueued = s["recent_ticks"]
            .as_array()
            .and_then(|ticks| ticks.iter().find(|t| t["enqueued_at"].is_string()));
        if let Some(t) = enqueued {
            break t["job_id"].as_str().unwrap().to_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no tick enqueued: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let start = Instant::now();
    loop {
        let job: Value = http
            .get(format!("{base}/v1/jobs/{job_id}"))
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
            "the tick's job never ran: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deleted = http
        .delete(format!("{base}/v1/schedules/every-second"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    sigterm(&dev);
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .expect("exited")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
