//! Analytics: the `analytics.rollup`, `analytics.anomalies` and `analytics.forecast`
//! handlers, and the operations behind them (the acceptance program calls them directly).
//!
//! A rollup recomputes whole buckets from the raw rows and upserts them, so it is idempotent:
//! a re-run (a retry, a redelivery, the next tick over an overlapping window) writes the same
//! values, and rows whose values did not change are not touched at all.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use jobs::{
    Job,
    families::analytics::{Anomalies, Bucket, Forecast, Metric, Rollup, Source},
    stats::{self, Summary},
};
use schema::analytics::{self as tables, Anomaly};
use serde::Serialize;

use super::shared::{Families, db_error, families};
use crate::handlers::{Deps, JobError, payload};

/// What one rollup did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RollupReport {
    /// Raw rows read (events and attempts).
    pub read: u64,
    /// Bucket rows computed.
    pub rows: u64,
    /// Bucket rows inserted or changed.
    pub changed: u64,
}

/// Per (name, bucket start): the values and how many were errors.
type Groups = HashMap<(String, i64), (Vec<f64>, u64)>;

fn add(groups: &mut Groups, bucket: Bucket, name: &str, ts: DateTime<Utc>, value: f64, error: bool) {
    let start = bucket.floor(ts).timestamp_micros();
    let g = match groups.get_mut(&(name.to_owned(), start)) {
        Some(g) => g,
        None => groups.entry((name.to_owned(), start)).or_default(),
    };
    g.0.push(value);
    g.1 += u64::from(error);
}

fn rows(source: Source, bucket: Bucket, groups: Groups, now: DateTime<Utc>) -> Vec<tables::Rollup> {
    let mut out: Vec<tables::Rollup> = groups
        .into_iter()
        .filter_map(|((name, start), (mut values, errors))| {
            let s = Summary::of(&mut values, errors)?;
            Some(tables::Rollup {
                source: source.as_str().into(),
                name,
                bucket: bucket.as_str().into(),
                bucket_start: DateTime::from_timestamp_micros(start).expect("a bucket start"),
                count: s.count as i64,
                sum: s.sum,
                min: s.min,
                max: s.max,
                mean: s.mean,
                p50: s.p50,
                p90: s.p90,
                p95: s.p95,
                p99: s.p99,
                errors: s.errors as i64,
                error_rate: s.error_rate,
                computed_at: now,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.name, a.bucket_start).cmp(&(&b.name, b.bucket_start)));
    out
}

/// Recomputes the `bucket` rollups of `[from, to)` (whole buckets) of `source` (both when
/// `None`) and upserts them.
#[tracing::instrument(skip(f))]
pub async fn rollup(
    f: &Families,
    bucket: Bucket,
    source: Option<Source>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<RollupReport, schema::DbError> {
    let now = Utc::now();
    let mut report = RollupReport::default();
    if source.is_none_or(|s| s == Source::Events) {
        let mut groups = Groups::new();
        report.read += schema::events::scan(&f.db, from, to, |p| {
            add(&mut groups, bucket, &p.name, p.ts, p.value, p.error)
        })
        .await?;
        let rows = rows(Source::Events, bucket, groups, now);
        report.rows += rows.len() as u64;
        report.changed += tables::upsert_rollups(&f.db, &rows).await?;
    }
    if source.is_none_or(|s| s == Source::Jobs) {
        let mut groups = Groups::new();
        let attempts = tables::attempts_finished(&f.db, from, to).await?;
        report.read += attempts.len() as u64;
        for a in &attempts {
            add(
                &mut groups,
                bucket,
                &a.kind,
                a.finished_at,
                a.duration_ms,
                a.failed,
            );
        }
        let rows = rows(Source::Jobs, bucket, groups, now);
        report.rows += rows.len() as u64;
        report.changed += tables::upsert_rollups(&f.db, &rows).await?;
    }
    Ok(report)
}

fn metric_of(r: &tables::Rollup, m: Metric) -> f64 {
    match m {
        Metric::Count => r.count as f64,
        Metric::Mean => r.mean,
        Metric::P95 => r.p95,
        Metric::ErrorRate => r.error_rate,
    }
}

/// The values of `metric` in the `n` buckets that end at `last` (included), oldest first:
/// a bucket without a row is 0 for counts and left out otherwise.
async fn values(
    f: &Families,
    source: Source,
    bucket: Bucket,
    name: &str,
    metric: Metric,
    last: DateTime<Utc>,
    n: u32,
) -> Result<Vec<(DateTime<Utc>, f64)>, schema::DbError> {
    let size = bucket.size();
    let first = last - size * (n as i32 - 1);
    let rows = tables::series(&f.db, source.as_str(), bucket.as_str(), name, first, last + size).await?;
    let by_start: HashMap<DateTime<Utc>, &tables::Rollup> =
        rows.iter().map(|r| (r.bucket_start, r)).collect();
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as i32 {
        let t = first + size * i;
        match by_start.get(&t) {
            Some(r) => out.push((t, metric_of(r, metric))),
            None if metric.zero_when_empty() => out.push((t, 0.0)),
            None => {}
        }
    }
    Ok(out)
}

/// The newest complete bucket at `now`.
fn newest_complete(bucket: Bucket, now: DateTime<Utc>) -> DateTime<Utc> {
    bucket.floor(now) - bucket.size()
}

/// A newly found anomaly, as the webhook receives it.
#[derive(Clone, Debug, Serialize)]
struct AnomalyNotice<'a> {
    event: &'static str,
    #[serde(flatten)]
    anomaly: &'a AnomalyView,
}

#[derive(Clone, Debug, Serialize)]
struct AnomalyView {
    source: String,
    name: String,
    bucket: String,
    bucket_start: DateTime<Utc>,
    metric: String,
    value: f64,
    mean: f64,
    stddev: f64,
    z: f64,
    threshold: f64,
}

/// Looks for anomalies at `now`; returns those found (new or already recorded).
pub async fn detect(
    f: &Families,
    p: &Anomalies,
    now: DateTime<Utc>,
) -> Result<Vec<Anomaly>, schema::DbError> {
    let newest = newest_complete(p.bucket, now);
    let mut found = Vec::new();
    for source in p.source.map_or(Source::ALL.to_vec(), |s| vec![s]) {
        for name in tables::names(&f.db, source.as_str(), p.bucket.as_str()).await? {
            let series = values(f, source, p.bucket, &name, p.metric, newest, p.window + 1).await?;
            let Some((&(at, value), window)) = series.split_last() else {
                continue;
            };
            if at != newest {
                continue; // no observation in the newest bucket (a non-count metric)
            }
            let window: Vec<f64> = window.iter().map(|(_, v)| *v).collect();
            let Some(z) = stats::zscore(value, &window) else {
                continue;
            };
            if z.z.abs() < p.threshold {
                continue;
            }
            let a = Anomaly {
                source: source.as_str().into(),
                name,
                bucket: p.bucket.as_str().into(),
                bucket_start: at,
                metric: p.metric.as_str().into(),
                value,
                mean: z.mean,
                stddev: z.stddev,
                z: z.z,
                threshold: p.threshold,
                window: window.len() as i32,
                detected_at: now,
            };
            let known = tables::anomaly_exists(&f.db, &a).await?;
            tables::upsert_anomaly(&f.db, a.clone()).await?;
            if !known {
                notify(f, &a).await;
            }
            found.push(a);
        }
    }
    Ok(found)
}

async fn notify(f: &Families, a: &Anomaly) {
    let Some(url) = &f.analytics.webhook_url else {
        return;
    };
    let view = AnomalyView {
        source: a.source.clone(),
        name: a.name.clone(),
        bucket: a.bucket.clone(),
        bucket_start: a.bucket_start,
        metric: a.metric.clone(),
        value: a.value,
        mean: a.mean,
        stddev: a.stddev,
        z: a.z,
        threshold: a.threshold,
    };
    let body = AnomalyNotice {
        event: "analytics.anomaly",
        anomaly: &view,
    };
    // A receiver that is down is logged, never a reason to fail (or repeat) the detection.
    match f.http.post(url).json(&body).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(status = %r.status(), name = %a.name, "the anomaly webhook refused a notice"),
        Err(error) => tracing::warn!(%error, name = %a.name, "the anomaly webhook is unreachable"),
    }
}

/// Fits and stores the forecasts at `now`; returns them.
pub async fn forecast(
    f: &Families,
    p: &Forecast,
    now: DateTime<Utc>,
) -> Result<Vec<tables::Forecast>, schema::DbError> {
    let newest = newest_complete(p.bucket, now);
    let mut out = Vec::new();
    for source in p.source.map_or(Source::ALL.to_vec(), |s| vec![s]) {
        for name in tables::names(&f.db, source.as_str(), p.bucket.as_str()).await? {
            let series = values(f, source, p.bucket, &name, p.metric, newest, p.points).await?;
            let ys: Vec<f64> = series.iter().map(|(_, v)| *v).collect();
            let Some(fit) = stats::least_squares(&ys) else {
                continue;
            };
            let last = series.last().map_or(newest, |(t, _)| *t);
            let row = tables::Forecast {
                source: source.as_str().into(),
                name,
                bucket: p.bucket.as_str().into(),
                metric: p.metric.as_str().into(),
                points: fit.points as i32,
                slope: fit.slope,
                intercept: fit.intercept,
                r2: fit.r2,
                horizon: p.horizon as i32,
                last_bucket: last,
                target_at: last + p.bucket.size() * p.horizon as i32,
                value: fit.project(p.horizon),
                computed_at: now,
            };
            tables::upsert_forecast(&f.db, row.clone()).await?;
            out.push(row);
        }
    }
    Ok(out)
}

pub async fn run_rollup(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Rollup = payload(&job)?;
    let (from, to) = p.window(Utc::now());
    let report = rollup(f, p.bucket, p.source, from, to).await.map_err(db_error)?;
    tracing::info!(bucket = %p.bucket, %from, %to, read = report.read, rows = report.rows, changed = report.changed, "rollup done");
    Ok(())
}

pub async fn run_anomalies(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Anomalies = payload(&job)?;
    let found = detect(f, &p, Utc::now()).await.map_err(db_error)?;
    tracing::info!(bucket = %p.bucket, metric = p.metric.as_str(), found = found.len(), "anomaly detection done");
    Ok(())
}

pub async fn run_forecast(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Forecast = payload(&job)?;
    let rows = forecast(f, &p, Utc::now()).await.map_err(db_error)?;
    tracing::info!(bucket = %p.bucket, metric = p.metric.as_str(), forecasts = rows.len(), "forecast done");
    Ok(())
}

/// A whole-bucket window of `n` buckets ending with the one holding `t` (tests, programs).
pub fn buckets_ending_at(bucket: Bucket, t: DateTime<Utc>, n: u32) -> (DateTime<Utc>, DateTime<Utc>) {
    let to = bucket.floor(t) + bucket.size();
    (to - bucket.size() * n as i32, to)
}
