//! `[[limits]]` across worker processes: the state is in Redis, so a limit holds for the fleet.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use jobs::{BrokerOptions, Job, JobId, Producer, QueueName, job::now_ms};
use sea_orm::{ConnectionTrait, DatabaseConnection, QueryResult, Statement};
use tokio::process::Child;
use uuid::Uuid;

use crate::{
    process::{drover, sigterm},
    support::{REDIS_URL, create_pg_database, delete_redis_prefix, drop_pg_database, unique},
};

/// Three `drover worker` processes on Redis whose config file holds `limits`.
struct Fleet {
    prefix: String,
    pg_name: String,
    db: DatabaseConnection,
    producer: std::sync::Arc<dyn Producer>,
    workers: Vec<Child>,
    _config_dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(limits: &str) -> Self {
        let prefix = unique("limits");
        let (pg_name, db_url) = create_pg_database().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("drover.toml");
        std::fs::write(&config, limits).unwrap();
        let config = config.display().to_string();
        let env = [
            ("DROVER_BROKER_URL", REDIS_URL),
            ("DROVER_DATABASE_URL", db_url.as_str()),
            ("DROVER_BROKER_PREFIX", prefix.as_str()),
            ("DROVER_CONFIG", config.as_str()),
        ];
        let migrated = drover().arg("migrate").envs(env).status().await.unwrap();
        assert!(migrated.success(), "drover migrate failed");
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
        let workers = (0..3)
            .map(|_| {
                drover()
                    .args(["worker", "--queues", "default", "--concurrency", "20"])
                    .envs(env)
                    .spawn()
                    .unwrap()
            })
            .collect();
        Fleet {
            prefix,
            pg_name,
            db,
            producer,
            workers,
            _config_dir: dir,
        }
    }

    /// Pushes `per_tag` `sleep` jobs of `ms` for each of tags `a` and `b`; returns each job's tag.
    async fn push_tagged(&self, per_tag: usize, ms: u64) -> HashMap<Uuid, &'static str> {
        let queue = QueueName::parse("default").unwrap();
        let jobs: Vec<Job> = (0..per_tag * 2)
            .map(|i| Job {
                id: JobId::new(),
                queue: queue.clone(),
                kind: "sleep".into(),
                payload: serde_json::value::RawValue::from_string(format!(
                    r#"{{"ms":{ms},"tag":"{}"}}"#,
                    ["a", "b"][i % 2]
                ))
                .unwrap(),
                max_attempts: 3,
                priority: 0,
                enqueued_at_ms: now_ms(),
                run_at_ms: None,
                trace_id: None,
                idempotency_key: None,
                attempt: 0,
                receipt: 0,
                crashes: 0,
                attempts_before: 0,
            })
            .collect();
        let tags = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.id.0, ["a", "b"][i % 2]))
            .collect();
        self.producer.push_batch(jobs).await.unwrap();
        tags
    }

    async fn query(&self, sql: &str) -> Vec<QueryResult> {
        self.db
            .query_all_raw(Statement::from_string(
                self.db.get_database_backend(),
                sql.to_owned(),
            ))
            .await
            .unwrap()
    }

    /// Waits for `n` succeeded attempts, stops the workers, and returns every attempt as
    /// (job id, started, finished) in epoch seconds.
    async fn finish(&mut self, n: usize, within: Duration) -> Vec<(Uuid, f64, f64)> {
        let start = Instant::now();
        let count = "SELECT count(*) FROM job_attempt WHERE outcome = 'succeeded'";
        while self.query(count).await[0].try_get_by_index::<i64>(0).unwrap() < n as i64 {
            assert!(
                start.elapsed() < within,
                "the jobs did not finish within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for w in &self.workers {
            sigterm(w);
        }
        for w in &mut self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w.wait()).await;
        }
        self.query(
            "SELECT job_id, EXTRACT(EPOCH FROM started_at)::float8, EXTRACT(EPOCH FROM finished_at)::float8, \
             worker_id FROM job_attempt",
        )
        .await
        .iter()
        .map(|r| {
            (
                r.try_get_by_index::<Uuid>(0).unwrap(),
                r.try_get_by_index::<f64>(1).unwrap(),
                r.try_get_by_index::<f64>(2).unwrap(),
            )
        })
        .collect()
    }

    async fn workers_of(&self, ids: &[Uuid]) -> usize {
        let list = ids
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!("SELECT count(DISTINCT worker_id) FROM job_attempt WHERE job_id IN ({list})");
        self.query(&sql).await[0].try_get_by_index::<i64>(0).unwrap() as usize
    }

    async fn cleanup(self) {
        drop(self.producer);
        delete_redis_prefix(REDIS_URL, &self.prefix).await;
        self.db.close().await.ok();
        drop_pg_database(&self.pg_name).await;
    }
}

/// 3 worker processes share a limit of 40 attempts/s per tag: each tag's attempts start at
/// 40/s (±5 %), independently of the other tag's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_tenant_rate_limit_holds_across_three_worker_processes() {
    const RATE: f64 = 40.0;
    const PER_TAG: usize = 240;
    let mut fleet = Fleet::start(&format!(
        "[[limits]]\nqueue = \"default\"\nkey = \"tag\"\nrate_per_s = {RATE}\n"
    ))
    .await;
    let tags = fleet.push_tagged(PER_TAG, 0).await;
    let attempts = fleet.finish(PER_TAG * 2, Duration::from_secs(60)).await;
    for tag in ["a", "b"] {
        let mine: Vec<_> = attempts.iter().filter(|a| tags[&a.0] == tag).collect();
        let mut starts: Vec<f64> = mine.iter().map(|a| a.1).collect();
        starts.sort_by(f64::total_cmp);
        let span_s = starts[starts.len() - 1] - starts[0];
        let rate = (starts.len() - 1) as f64 / span_s;
        let ids: Vec<Uuid> = mine.iter().map(|a| a.0).collect();
        let workers = fleet.workers_of(&ids).await;
        println!(
            "LIMIT tag={tag} limit_per_s={RATE} measured_per_s={rate:.2} attempts={} span_s={span_s:.2} workers={workers}",
            starts.len(),
        );
        assert_eq!(starts.len(), PER_TAG, "one attempt per job");
        assert!(
            workers >= 2,
            "tag {tag}'s jobs ran in {workers} worker(s), not across processes"
        );
        assert!(
            (rate - RATE).abs() <= RATE * 0.05,
            "tag {tag}: {rate:.2} attempts/s under a limit of {RATE}/s"
        );
    }
    fleet.cleanup().await;
}

/// A concurrency limit of 2 per tag across 3 worker processes (60 slots): never more than 2 of
/// a tag's attempts overlap, and the limit is used (2 do overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_tenant_concurrency_limit_holds_across_three_worker_processes() {
    const PER_TAG: usize = 12;
    let mut fleet = Fleet::start("[[limits]]\nkind = \"sleep\"\nkey = \"tag\"\nconcurrency = 2\n").await;
    let tags = fleet.push_tagged(PER_TAG, 150).await;
    let attempts = fleet.finish(PER_TAG * 2, Duration::from_secs(60)).await;
    for tag in ["a", "b"] {
        // +1 at each start, -1 at each end (an end sorts before a start at the same instant).
        let mut events: Vec<(f64, i32)> = attempts
            .iter()
            .filter(|a| tags[&a.0] == tag)
            .flat_map(|a| [(a.1, 1), (a.2, -1)])
            .collect();
        events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut running, mut most) = (0, 0);
        for (_, d) in events {
            running += d;
            most = most.max(running);
        }
        println!("LIMIT tag={tag} concurrency_limit=2 most_overlapping={most}");
        assert_eq!(
            most, 2,
            "tag {tag}: {most} attempts ran at once under a limit of 2"
        );
    }
    fleet.cleanup().await;
}
