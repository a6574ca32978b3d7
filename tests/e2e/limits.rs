//! `[[limits]]` across worker processes: the state is in Redis, so a limit holds for the fleet.

use std::time::{Duration, Instant};

use jobs::{BrokerOptions, Job, JobId, QueueName, job::now_ms};
use sea_orm::{ConnectionTrait, Statement};

use crate::{
    process::{drover, sigterm},
    support::{REDIS_URL, create_pg_database, delete_redis_prefix, drop_pg_database, unique},
};

/// 3 worker processes share a limit of 40 attempts/s per tenant: each tenant's attempts start
/// at 40/s (±5 %), independently of the other tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_tenant_rate_limit_holds_across_three_worker_processes() {
    const RATE: f64 = 40.0;
    const PER_TENANT: usize = 240;
    let prefix = unique("limits");
    let (pg_name, db_url) = create_pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!("[[limits]]\nqueue = \"default\"\nkey = \"tag\"\nrate_per_s = {RATE}\n"),
    )
    .unwrap();
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
        },
    )
    .await
    .unwrap();
    let mut workers: Vec<_> = (0..3)
        .map(|_| {
            drover()
                .args(["worker", "--queues", "default", "--concurrency", "20"])
                .envs(env)
                .spawn()
                .unwrap()
        })
        .collect();
    let queue = QueueName::parse("default").unwrap();
    let jobs: Vec<Job> = (0..PER_TENANT * 2)
        .map(|i| Job {
            id: JobId::new(),
            queue: queue.clone(),
            kind: "sleep".into(),
            payload: serde_json::value::RawValue::from_string(format!(
                r#"{{"ms":0,"tag":"{}"}}"#,
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
        })
        .collect();
    let tenant_of: std::collections::HashMap<uuid::Uuid, usize> =
        jobs.iter().enumerate().map(|(i, j)| (j.id.0, i % 2)).collect();
    producer.push_batch(jobs).await.unwrap();

    let expected_s = PER_TENANT as f64 / RATE;
    let start = Instant::now();
    let count_sql = "SELECT count(*) FROM job WHERE status = 'succeeded'";
    loop {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                count_sql.to_owned(),
            ))
            .await
            .unwrap()
            .unwrap();
        if row.try_get_by_index::<i64>(0).unwrap() == (PER_TENANT * 2) as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs_f64(expected_s * 3.0 + 30.0),
            "the jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &workers {
        sigterm(w);
    }
    for w in &mut workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w.wait()).await;
    }

    // Per tenant: attempts started per second between the first and the last start.
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT job_id, EXTRACT(EPOCH FROM started_at)::float8, worker_id FROM job_attempt".to_owned(),
        ))
        .await
        .unwrap();
    for (t, tenant) in ["a", "b"].into_iter().enumerate() {
        let mut starts = Vec::new();
        let mut by = std::collections::HashSet::new();
        for r in &rows {
            let id = r.try_get_by_index::<uuid::Uuid>(0).unwrap();
            if tenant_of[&id] == t {
                starts.push(r.try_get_by_index::<f64>(1).unwrap());
                by.insert(r.try_get_by_index::<String>(2).unwrap());
            }
        }
        starts.sort_by(f64::total_cmp);
        let span_s = starts[starts.len() - 1] - starts[0];
        let rate = (starts.len() - 1) as f64 / span_s;
        println!(
            "LIMIT tenant={tenant} limit_per_s={RATE} measured_per_s={rate:.2} attempts={} span_s={span_s:.2} workers={}",
            starts.len(),
            by.len()
        );
        assert_eq!(starts.len(), PER_TENANT, "one attempt per job");
        assert!(
            by.len() >= 2,
            "tenant {tenant}'s jobs ran in {} worker(s), not across processes",
            by.len()
        );
        assert!(
            (rate - RATE).abs() <= RATE * 0.05,
            "tenant {tenant}: {rate:.2} attempts/s under a limit of {RATE}/s"
        );
    }
    drop(producer);
    delete_redis_prefix(REDIS_URL, &prefix).await;
    db.close().await.ok();
    drop_pg_database(&pg_name).await;
}
