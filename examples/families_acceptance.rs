//! The families' acceptance measurements (issue 7), printed, never asserted:
//!
//! 1. N events (default 1 000 000) posted through `POST /v1/events` in batches of 5 000 by 8
//!    concurrent clients: the ingest rate;
//! 2. the hourly rollup over all of them: its time, and that a re-run changes nothing;
//! 3. a rescoring of every subject (chunks run in this process), then the leaderboard endpoint
//!    after warming: the Redis hit counter and the p50/p99 of `GET /v1/scores/{m}/top?n=10`.
//!
//! Needs Postgres (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379); makes its own database
//! and key prefix and removes both. `cargo run --release --example families_acceptance [N]`.

use std::{sync::Arc, time::Instant};

use chrono::{TimeDelta, Utc};
use futures::StreamExt;
use jobs::families::{
    analytics::{Bucket, Source},
    scoring::{Normalization, ScoreModel},
};
use sea_orm::ConnectionTrait;
use serde_json::json;
use workers::families::{Families, analytics, config, scoring};

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const REDIS: &str = "redis://127.0.0.1:6379/0";
const BATCH: usize = 5_000;
const CLIENTS: usize = 8;
const SUBJECTS: usize = 100_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let name = format!("drover_accept_{}", uuid::Uuid::new_v4().simple());
    let prefix = format!("accept{}", uuid::Uuid::new_v4().simple());
    let admin = schema::connect(PG_ADMIN).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let res = run(n, &url, &prefix).await;
    let _ = admin
        .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await;
    let client = redis::Client::open(REDIS)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await?;
    for k in keys.chunks(500) {
        let _: () = redis::cmd("DEL").arg(k).query_async(&mut c).await?;
    }
    res
}

async fn run(n: usize, url: &str, prefix: &str) -> anyhow::Result<()> {
    let db = schema::connect(url).await?;
    schema::migrate(&db).await?;
    let broker = jobs::broker::connect(
        REDIS,
        jobs::BrokerOptions {
            prefix: prefix.to_owned(),
            db: db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await?;
    let catalog = Arc::new(jobs::Catalog::default());
    let cache = jobs::cache::ReadCache::connect(REDIS, prefix, Default::default())?;
    let state = api::AppState::new(
        broker.clone(),
        db.clone(),
        catalog.clone(),
        api::install_metrics(),
    )
    .with_cache(cache.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    // 1. Ingest: bodies prepared first, so the clock measures the API and the database.
    let start = Utc::now() - TimeDelta::hours(24);
    let names = ["api.call", "page.view", "checkout", "search"];
    let bodies: Vec<Vec<u8>> = (0..n.div_ceil(BATCH))
        .map(|b| {
            let events: Vec<_> = (b * BATCH..((b + 1) * BATCH).min(n))
                .map(|i| {
                    let mut e = json!({
                        "name": names[i % names.len()],
                        "subject": format!("user-{:06}", (i * 7_919) % SUBJECTS),
                        "value": ((i * 104_729) % 10_000) as f64 / 10.0,
                        "ts": (start + TimeDelta::milliseconds((i as i64 * 86_400_000) / n as i64)).to_rfc3339(),
                    });
                    if i % 97 == 0 {
                        e["attrs"] = json!({"error": true});
                    }
                    e
                })
                .collect();
            serde_json::to_vec(&json!({"events": events})).expect("serializes")
        })
        .collect();
    let t = Instant::now();
    let results: Vec<u16> = futures::stream::iter(bodies)
        .map(|body| {
            let http = http.clone();
            let url = format!("{base}/v1/events");
            async move {
                http.post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16())
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    let ingest = t.elapsed();
    let bad = results.iter().filter(|s| **s != 202).count();
    let stored = schema::events::count(&db).await?;
    println!(
        "ingest: {n} events in {} batches of {BATCH} by {CLIENTS} clients: {:.2} s, {:.0} events/s ({stored} stored, {bad} batches refused)",
        results.len(),
        ingest.as_secs_f64(),
        n as f64 / ingest.as_secs_f64()
    );

    // 2. The hourly rollup over every event, twice.
    let f = Families::new(
        db.clone(),
        broker.clone(),
        catalog,
        Some(cache.clone()),
        config::AnalyticsConfig::default(),
        config::ScoringConfig::default(),
        config::CacheConfig::default(),
    );
    let (from, to) = (
        Bucket::Hour.floor(start),
        Bucket::Hour.floor(Utc::now()) + TimeDelta::hours(1),
    );
    let t = Instant::now();
    let first = analytics::rollup(&f, Bucket::Hour, Some(Source::Events), from, to).await?;
    let rollup_time = t.elapsed();
    let before = schema::analytics::rollups_in(&db, "events", "hour", from, to).await?;
    let t = Instant::now();
    let again = analytics::rollup(&f, Bucket::Hour, Some(Source::Events), from, to).await?;
    let rerun_time = t.elapsed();
    let after = schema::analytics::rollups_in(&db, "events", "hour", from, to).await?;
    println!(
        "rollup (hour): {} events → {} rows in {:.2} s; re-run {:.2} s: {} rows changed, rows identical: {}",
        first.read,
        first.rows,
        rollup_time.as_secs_f64(),
        rerun_time.as_secs_f64(),
        again.changed,
        before == after
    );

    // 3. Scores, then the leaderboard from Redis.
    let weights = json!({"page.view": 1.0, "checkout": 20.0, "search": 0.5});
    schema::scores::put_model(&db, "engagement", weights.clone(), 86_400.0, "max", Utc::now()).await?;
    let model = ScoreModel {
        name: "engagement".into(),
        weights: serde_json::from_value(weights)?,
        half_life_s: 86_400.0,
        normalization: Normalization::Max,
    };
    let t = Instant::now();
    let run = scoring::plan(&f, uuid::Uuid::new_v4(), &model, 5_000)
        .await
        .map_err(anyhow::Error::msg)?;
    for c in 0..run.chunks {
        scoring::run_chunk(&f, run.id, c)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    println!(
        "rescoring: {} subjects in {} chunks (in this process) in {:.2} s",
        run.subjects,
        run.chunks,
        t.elapsed().as_secs_f64()
    );
    let metric = |text: &str, result: &str| -> u64 {
        let needle = format!("drover_cache_requests_total{{cache=\"leaderboard\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |v| v.trim().parse().unwrap_or(0))
    };
    let scrape = || async { http.get(format!("{base}/metrics")).send().await?.text().await };
    let m0 = scrape().await?;
    let requests = 20_000;
    let top_url = format!("{base}/v1/scores/engagement/top?n=10");
    let latencies: Vec<f64> = futures::stream::iter(0..requests)
        .map(|_| {
            let http = http.clone();
            let url = top_url.clone();
            async move {
                let t = Instant::now();
                let ok = http.get(url).send().await.is_ok_and(|r| r.status() == 200);
                (ok, t.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(CLIENTS)
        .filter_map(|(ok, ms)| async move { ok.then_some(ms) })
        .collect()
        .await;
    let m1 = scrape().await?;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let p = |q| jobs::stats::percentile(&sorted, q).unwrap_or(f64::NAN);
    println!(
        "leaderboard: {requests} GET /v1/scores/engagement/top?n=10 by {CLIENTS} clients: {} ok, hits +{}, misses +{}; latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        metric(&m1, "hit") - metric(&m0, "hit"),
        metric(&m1, "miss") - metric(&m0, "miss"),
        p(0.5),
        p(0.99),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
