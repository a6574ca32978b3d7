//! The analytics and scoring families end to end on Postgres and Redis: an hourly rollup that
//! a re-run leaves unchanged, and a rescoring of many subjects fanned out over two worker
//! processes that equals a computation in one process, bit for bit.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use jobs::{
    BrokerOptions, Job, JobId, QueueName,
    families::{
        analytics::{Bucket, Source},
        scoring::{self as kinds, Normalization, ScoreModel},
    },
    stats::Summary,
};
use schema::events::NewEvent;
use serde_json::value::RawValue;
use workers::families::{
    Families, analytics,
    config::{AnalyticsConfig, CacheConfig, ScoringConfig},
    scoring,
};

use crate::{
    process::{drover, sigterm},
    support::{REDIS_URL, create_pg_database, delete_redis_prefix, drop_pg_database, unique},
};

/// How many subjects the rescoring test scores (`DROVER_TEST_SCORING_SUBJECTS`, default
/// 100 000 as in the acceptance).
fn subjects() -> usize {
    std::env::var("DROVER_TEST_SCORING_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

async fn families(db_url: &str, prefix: &str) -> Families {
    let db = schema::connect(db_url).await.unwrap();
    schema::migrate(&db).await.unwrap();
    let broker = jobs::broker::connect(
        REDIS_URL,
        BrokerOptions {
            prefix: prefix.to_owned(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    Families::new(
        db,
        broker,
        Arc::new(jobs::Catalog::default()),
        None,
        AnalyticsConfig::default(),
        ScoringConfig::default(),
        CacheConfig::default(),
    )
}

#[tokio::test]
async fn an_hourly_rollup_matches_the_events_and_a_rerun_changes_nothing() {
    let prefix = unique("t");
    let (pg, db_url) = create_pg_database().await;
    let f = families(&db_url, &prefix).await;
    let start: DateTime<Utc> = "2026-11-30T10:00:00Z".parse().unwrap();
    // 60 000 events of three names over three hours; every 50th of `api.call` an error.
    let mut events = Vec::new();
    for i in 0..60_000i64 {
        let name = ["api.call", "page.view", "checkout"][(i % 3) as usize];
        events.push(NewEvent {
            name: name.into(),
            subject: format!("u{}", i % 997),
            value: ((i * 7919) % 1000) as f64 / 10.0,
            ts: start + TimeDelta::milliseconds(i * 180),
            attrs: None,
            error: name == "api.call" && i % 50 == 0,
        });
    }
    for chunk in events.chunks(10_000) {
        schema::events::insert(&f.db, chunk).await.unwrap();
    }
    let (from, to) = (start, start + TimeDelta::hours(3));
    let first = analytics::rollup(&f, Bucket::Hour, Some(Source::Events), from, to)
        .await
        .unwrap();
    assert_eq!((first.read, first.rows, first.changed), (60_000, 9, 9));
    let rows = schema::analytics::rollups_in(&f.db, "events", "hour", from, to)
        .await
        .unwrap();

    // One bucket against the summary of exactly its events.
    let b = start + TimeDelta::hours(1);
    let mut values: Vec<f64> = events
        .iter()
        .filter(|e| e.name == "api.call" && Bucket::Hour.floor(e.ts) == b)
        .map(|e| e.value)
        .collect();
    let errors = events
        .iter()
        .filter(|e| e.name == "api.call" && e.error && Bucket::Hour.floor(e.ts) == b)
        .count() as u64;
    let want = Summary::of(&mut values, errors).unwrap();
    let row = rows
        .iter()
        .find(|r| r.name == "api.call" && r.bucket_start == b)
        .unwrap();
    let got = Summary {
        count: row.count as u64,
        sum: row.sum,
        min: row.min,
        max: row.max,
        mean: row.mean,
        p50: row.p50,
        p90: row.p90,
        p95: row.p95,
        p99: row.p99,
        errors: row.errors as u64,
        error_rate: row.error_rate,
    };
    assert_eq!(got, want);
    assert!(want.errors > 0);

    let again = analytics::rollup(&f, Bucket::Hour, Some(Source::Events), from, to)
        .await
        .unwrap();
    assert_eq!((again.rows, again.changed), (9, 0), "a re-run changed rows");
    let rows_again = schema::analytics::rollups_in(&f.db, "events", "hour", from, to)
        .await
        .unwrap();
    assert_eq!(rows_again, rows, "a re-run changed a value or computed_at");

    // Minute buckets of the same events add up to the same total.
    analytics::rollup(&f, Bucket::Minute, Some(Source::Events), from, to)
        .await
        .unwrap();
    let minutes = schema::analytics::rollups_in(&f.db, "events", "minute", from, to)
        .await
        .unwrap();
    assert_eq!(minutes.iter().map(|r| r.count).sum::<i64>(), 60_000);

    f.db.close().await.unwrap();
    drop_pg_database(&pg).await;
}

#[tokio::test]
async fn rescoring_fans_out_over_two_worker_processes_and_equals_one_process_exactly() {
    let n = subjects();
    let prefix = unique("t");
    let (pg, db_url) = create_pg_database().await;
    let f = families(&db_url, &prefix).await;
    let now = Utc::now();
    let weights: BTreeMap<String, f64> = [("view".to_owned(), 1.0), ("buy".to_owned(), 12.5)].into();
    let model = ScoreModel {
        name: "engagement".into(),
        weights: weights.clone(),
        half_life_s: 7.0 * 86_400.0,
        normalization: Normalization::Max,
    };
    schema::scores::put_model(
        &f.db,
        "engagement",
        serde_json::to_value(&weights).unwrap(),
        model.half_life_s,
        "max",
        now,
    )
    .await
    .unwrap();
    // Two events per subject (three for every seventh), spread over 30 days.
    let mut events = Vec::with_capacity(n * 2);
    for i in 0..n {
        let subject = format!("user-{i:06}");
        for (k, name) in ["view", "buy", "view"]
            .iter()
            .enumerate()
            .take(if i % 7 == 0 { 3 } else { 2 })
        {
            events.push(NewEvent {
                name: (*name).into(),
                subject: subject.clone(),
                value: 1.0 + ((i * 31 + k * 17) % 97) as f64,
                ts: now - TimeDelta::seconds(((i * 7_919 + k * 104_729) % 2_592_000) as i64 + 1),
                attrs: None,
                error: false,
            });
        }
    }
    for chunk in events.chunks(20_000) {
        schema::events::insert(&f.db, chunk).await.unwrap();
    }

    let env = [
        ("DROVER_BROKER_URL", REDIS_URL),
        ("DROVER_DATABASE_URL", db_url.as_str()),
        ("DROVER_BROKER_PREFIX", prefix.as_str()),
        ("DROVER_CACHE_URL", REDIS_URL),
    ];
    // One chunk at a time each, fetched one by one: the chunks spread over both processes.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            drover()
                .args([
                    "worker",
                    "--queues",
                    "scoring",
                    "--concurrency",
                    "1",
                    "--prefetch",
                    "1",
                ])
                .envs(env)
                .spawn()
                .expect("start drover worker")
        })
        .collect();

    let job_id = JobId::new();
    let payload = serde_json::to_string(&kinds::Recompute {
        model: Some("engagement".into()),
        chunk_size: Some((n / 20).max(1) as u32),
    })
    .unwrap();
    f.broker
        .push(Job {
            id: job_id,
            queue: QueueName::parse("scoring").unwrap(),
            kind: kinds::RECOMPUTE.into(),
            payload: RawValue::from_string(payload).unwrap(),
            max_attempts: 3,
            priority: 0,
            enqueued_at_ms: jobs::job::now_ms(),
            run_at_ms: None,
            trace_id: None,
            idempotency_key: None,
            attempt: 0,
            receipt: 0,
            crashes: 0,
            attempts_before: 0,
        })
        .await
        .unwrap();
    let run_id = kinds::run_id(job_id.0, "engagement");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let run = loop {
        if let Some(run) = schema::scores::get_run(&f.db, run_id).await.unwrap()
            && run.status != "running"
        {
            break run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not finish in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(run.status, "succeeded");
    assert_eq!((run.subjects as usize, run.chunks), (n, 20));
    let chunks = schema::scores::chunks(&f.db, run_id).await.unwrap();
    let by: std::collections::BTreeSet<_> = chunks.iter().filter_map(|c| c.worker_id.clone()).collect();
    assert!(chunks.iter().all(|c| c.status == "done"));
    assert_eq!(by.len(), 2, "the chunks ran in {by:?}, not in both processes");

    // The same computation in this one process: every subject's events in one read.
    let names = model.event_names();
    let subjects = schema::events::subjects(&f.db, &names, run.as_of).await.unwrap();
    let (first, last) = (subjects.first().unwrap(), subjects.last().unwrap());
    let all = schema::events::of_subjects(&f.db, &names, first, last, run.as_of)
        .await
        .unwrap();
    let raw = scoring::score_events(&model, &all, run.as_of);
    let pairs: Vec<(String, f64)> = raw.iter().map(|r| (r.subject.clone(), r.raw)).collect();
    let normalized = scoring::normalize(&model, &pairs);
    let stored = schema::scores::all_scores(&f.db, "engagement").await.unwrap();
    assert_eq!(stored.len(), n);
    let mut expected: Vec<_> = raw.iter().zip(&normalized).collect();
    expected.sort_by(|a, b| a.0.subject.cmp(&b.0.subject));
    for (row, (r, (_, score))) in stored.iter().zip(expected) {
        assert_eq!(row.subject, r.subject);
        assert_eq!(row.raw.to_bits(), r.raw.to_bits(), "{}", row.subject);
        assert_eq!(row.score.to_bits(), score.to_bits(), "{}", row.subject);
        assert_eq!(row.components, r.components, "{}", row.subject);
        assert_eq!(row.run_id, run_id);
    }

    // The leaderboard the run wrote holds every subject, best first as in the database.
    let cache = jobs::cache::ReadCache::connect(REDIS_URL, &prefix, Default::default()).unwrap();
    let top = cache
        .top("engagement", 10)
        .await
        .unwrap()
        .expect("the run wrote the board");
    assert_eq!(top.meta.subjects as usize, n);
    assert_eq!(
        top.entries,
        schema::scores::top(&f.db, "engagement", 10).await.unwrap()
    );

    for w in &workers {
        sigterm(w);
    }
    for mut w in workers {
        let status = tokio::time::timeout(Duration::from_secs(30), w.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "a worker exited with {status}");
    }
    f.db.close().await.unwrap();
    delete_redis_prefix(REDIS_URL, &prefix).await;
    drop_pg_database(&pg).await;
}
