//! The analytics family's tables: rollups (upserted idempotently: a recomputation that finds
//! the same values writes nothing), anomalies, forecasts, and the reads the API serves from
//! them. Every function takes any `ConnectionTrait` and runs on Postgres and SQLite.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, IdenStatic, QueryFilter, QueryOrder, QuerySelect, Statement,
    Value,
};
use serde::{Deserialize, Serialize};

use crate::DbError;
use crate::entity::{anomaly, forecast, job, job_attempt, rollup};

pub use crate::entity::anomaly::Model as Anomaly;
pub use crate::entity::forecast::Model as Forecast;
pub use crate::entity::rollup::Model as Rollup;

/// Rows per upsert statement (17 parameters each).
const UPSERT_ROWS: usize = 500;

const VALUE_COLUMNS: [rollup::Column; 11] = [
    rollup::Column::Count,
    rollup::Column::Sum,
    rollup::Column::Min,
    rollup::Column::Max,
    rollup::Column::Mean,
    rollup::Column::P50,
    rollup::Column::P90,
    rollup::Column::P95,
    rollup::Column::P99,
    rollup::Column::Errors,
    rollup::Column::ErrorRate,
];

/// Inserts or updates `rows`; a row whose values are all unchanged is left alone (its
/// `computed_at` too). Returns how many rows were inserted or changed.
#[tracing::instrument(skip_all, fields(rows = rows.len()))]
pub async fn upsert_rollups(db: &impl ConnectionTrait, rows: &[Rollup]) -> Result<u64, DbError> {
    let mut changed = 0;
    for chunk in rows.chunks(UPSERT_ROWS) {
        let models = chunk.iter().cloned().map(rollup::ActiveModel::from);
        let mut differs = Expr::val(false);
        for c in VALUE_COLUMNS {
            differs =
                differs.or(Expr::col((rollup::Entity, c)).ne(Expr::cust(format!("excluded.{}", c.as_str()))));
        }
        let mut on_conflict = OnConflict::columns([
            rollup::Column::Source,
            rollup::Column::Name,
            rollup::Column::Bucket,
            rollup::Column::BucketStart,
        ]);
        on_conflict
            .update_columns(VALUE_COLUMNS)
            .update_column(rollup::Column::ComputedAt)
            .action_and_where(differs);
        let res = rollup::Entity::insert_many(models)
            .on_conflict(on_conflict)
            .exec_without_returning(db)
            .await?;
        changed += res;
    }
    Ok(changed)
}

/// Which rows a read covers.
#[derive(Clone, Debug, Default)]
pub struct Filter<'a> {
    pub source: &'a str,
    pub bucket: &'a str,
    pub name: Option<&'a str>,
    /// `from ≤ bucket_start`.
    pub from: Option<DateTime<Utc>>,
    /// `bucket_start < to`.
    pub to: Option<DateTime<Utc>>,
}

/// The newest `limit` rollups matching `f`, oldest first.
pub async fn rollups(db: &impl ConnectionTrait, f: &Filter<'_>, limit: u64) -> Result<Vec<Rollup>, DbError> {
    let mut q = rollup::Entity::find()
        .filter(rollup::Column::Source.eq(f.source))
        .filter(rollup::Column::Bucket.eq(f.bucket));
    if let Some(n) = f.name {
        q = q.filter(rollup::Column::Name.eq(n));
    }
    if let Some(t) = f.from {
        q = q.filter(rollup::Column::BucketStart.gte(t));
    }
    if let Some(t) = f.to {
        q = q.filter(rollup::Column::BucketStart.lt(t));
    }
    let mut rows = q
        .order_by_desc(rollup::Column::BucketStart)
        .order_by_desc(rollup::Column::Name)
        .limit(limit)
        .all(db)
        .await?;
    rows.reverse();
    Ok(rows)
}

/// Every rollup of `source`/`bucket` whose bucket starts in `[from, to)` (all names), for
/// comparing one run with another.
pub async fn rollups_in(
    db: &impl ConnectionTrait,
    source: &str,
    bucket: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Rollup>, DbError> {
    Ok(rollup::Entity::find()
        .filter(rollup::Column::Source.eq(source))
        .filter(rollup::Column::Bucket.eq(bucket))
        .filter(rollup::Column::BucketStart.gte(from))
        .filter(rollup::Column::BucketStart.lt(to))
        .order_by_asc(rollup::Column::Name)
        .order_by_asc(rollup::Column::BucketStart)
        .all(db)
        .await?)
}

/// The names that have rollups of `source`/`bucket`.
pub async fn names(db: &impl ConnectionTrait, source: &str, bucket: &str) -> Result<Vec<String>, DbError> {
    Ok(rollup::Entity::find()
        .select_only()
        .column(rollup::Column::Name)
        .distinct()
        .filter(rollup::Column::Source.eq(source))
        .filter(rollup::Column::Bucket.eq(bucket))
        .order_by_asc(rollup::Column::Name)
        .into_tuple::<String>()
        .all(db)
        .await?)
}

/// The rollups of one name whose buckets start in `[from, to)`, oldest first.
pub async fn series(
    db: &impl ConnectionTrait,
    source: &str,
    bucket: &str,
    name: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Rollup>, DbError> {
    Ok(rollup::Entity::find()
        .filter(rollup::Column::Source.eq(source))
        .filter(rollup::Column::Bucket.eq(bucket))
        .filter(rollup::Column::Name.eq(name))
        .filter(rollup::Column::BucketStart.gte(from))
        .filter(rollup::Column::BucketStart.lt(to))
        .order_by_asc(rollup::Column::BucketStart)
        .all(db)
        .await?)
}

/// One finished attempt from the job history, as the `jobs` rollups read it.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptPoint {
    pub kind: String,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: f64,
    pub failed: bool,
}

/// Attempts that finished in `[from, to)`, with their job's kind.
pub async fn attempts_finished(
    db: &impl ConnectionTrait,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<AttemptPoint>, DbError> {
    let q = Query::select()
        .column((job::Entity, job::Column::Kind))
        .column((job_attempt::Entity, job_attempt::Column::StartedAt))
        .column((job_attempt::Entity, job_attempt::Column::FinishedAt))
        .column((job_attempt::Entity, job_attempt::Column::Outcome))
        .from(job_attempt::Entity)
        .inner_join(
            job::Entity,
            Expr::col((job::Entity, job::Column::Id))
                .equals((job_attempt::Entity, job_attempt::Column::JobId)),
        )
        .and_where(Expr::col((job_attempt::Entity, job_attempt::Column::FinishedAt)).gte(from))
        .and_where(Expr::col((job_attempt::Entity, job_attempt::Column::FinishedAt)).lt(to))
        .to_owned();
    let rows = db.query_all(&q).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let kind: String = r.try_get("", "kind")?;
        let started: DateTime<Utc> = r.try_get("", "started_at")?;
        let finished: DateTime<Utc> = r.try_get("", "finished_at")?;
        let outcome: Option<String> = r.try_get("", "outcome")?;
        out.push(AttemptPoint {
            kind,
            finished_at: finished,
            duration_ms: (finished - started).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            failed: outcome.as_deref() != Some("succeeded"),
        });
    }
    Ok(out)
}

/// Records an anomaly (a re-detection of the same bucket and metric updates it).
pub async fn upsert_anomaly(db: &impl ConnectionTrait, a: Anomaly) -> Result<(), DbError> {
    anomaly::Entity::insert(anomaly::ActiveModel::from(a))
        .on_conflict(
            OnConflict::columns([
                anomaly::Column::Source,
                anomaly::Column::Name,
                anomaly::Column::Bucket,
                anomaly::Column::BucketStart,
                anomaly::Column::Metric,
            ])
            .update_columns([
                anomaly::Column::Value,
                anomaly::Column::Mean,
                anomaly::Column::Stddev,
                anomaly::Column::Z,
                anomaly::Column::Threshold,
                anomaly::Column::Window,
            ])
            .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Whether this bucket and metric was already recorded as anomalous (not to notify twice).
pub async fn anomaly_exists(db: &impl ConnectionTrait, a: &Anomaly) -> Result<bool, DbError> {
    Ok(anomaly::Entity::find_by_id((
        a.source.clone(),
        a.name.clone(),
        a.bucket.clone(),
        a.bucket_start,
        a.metric.clone(),
    ))
    .one(db)
    .await?
    .is_some())
}

/// The newest `limit` anomalies matching `f` (by bucket), newest first.
pub async fn anomalies(
    db: &impl ConnectionTrait,
    f: &Filter<'_>,
    limit: u64,
) -> Result<Vec<Anomaly>, DbError> {
    let mut q = anomaly::Entity::find()
        .filter(anomaly::Column::Source.eq(f.source))
        .filter(anomaly::Column::Bucket.eq(f.bucket));
    if let Some(n) = f.name {
        q = q.filter(anomaly::Column::Name.eq(n));
    }
    if let Some(t) = f.from {
        q = q.filter(anomaly::Column::BucketStart.gte(t));
    }
    if let Some(t) = f.to {
        q = q.filter(anomaly::Column::BucketStart.lt(t));
    }
    Ok(q.order_by_desc(anomaly::Column::BucketStart)
        .order_by_asc(anomaly::Column::Name)
        .limit(limit)
        .all(db)
        .await?)
}

/// Stores the latest forecast of its source, name, bucket and metric.
pub async fn upsert_forecast(db: &impl ConnectionTrait, f: Forecast) -> Result<(), DbError> {
    forecast::Entity::insert(forecast::ActiveModel::from(f))
        .on_conflict(
            OnConflict::columns([
                forecast::Column::Source,
                forecast::Column::Name,
                forecast::Column::Bucket,
                forecast::Column::Metric,
            ])
            .update_columns([
                forecast::Column::Points,
                forecast::Column::Slope,
                forecast::Column::Intercept,
                forecast::Column::R2,
                forecast::Column::Horizon,
                forecast::Column::LastBucket,
                forecast::Column::TargetAt,
                forecast::Column::Value,
                forecast::Column::ComputedAt,
            ])
            .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The latest forecasts of `source`/`bucket` (optionally one name), by name.
pub async fn forecasts(db: &impl ConnectionTrait, f: &Filter<'_>) -> Result<Vec<Forecast>, DbError> {
    let mut q = forecast::Entity::find()
        .filter(forecast::Column::Source.eq(f.source))
        .filter(forecast::Column::Bucket.eq(f.bucket));
    if let Some(n) = f.name {
        q = q.filter(forecast::Column::Name.eq(n));
    }
    Ok(q.order_by_asc(forecast::Column::Name)
        .order_by_asc(forecast::Column::Metric)
        .all(db)
        .await?)
}

/// One name's line in the analytics summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameSummary {
    pub name: String,
    pub bucket_start: DateTime<Utc>,
    pub count: i64,
    pub mean: f64,
    pub p95: f64,
    pub error_rate: f64,
    /// Anomalies recorded for buckets since `since`.
    pub anomalies: u64,
}

/// The analytics summary of `source`/`bucket`: for every name, its newest bucket starting
/// before `before` and the anomalies recorded since `since`. A read model the API caches.
pub async fn summary(
    db: &impl ConnectionTrait,
    source: &str,
    bucket: &str,
    since: DateTime<Utc>,
    before: DateTime<Utc>,
) -> Result<Vec<NameSummary>, DbError> {
    let backend = db.get_database_backend();
    // The newest bucket per name: a correlated MAX, served by the primary key's index.
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT r.* FROM rollup r WHERE r.source = $1 AND r.bucket = $2 AND r.bucket_start = \
             (SELECT MAX(x.bucket_start) FROM rollup x WHERE x.source = r.source AND x.bucket = r.bucket \
              AND x.name = r.name AND x.bucket_start < $3) ORDER BY r.name"
        }
        _ => {
            "SELECT r.* FROM rollup r WHERE r.source = ? AND r.bucket = ? AND r.bucket_start = \
             (SELECT MAX(x.bucket_start) FROM rollup x WHERE x.source = r.source AND x.bucket = r.bucket \
              AND x.name = r.name AND x.bucket_start < ?) ORDER BY r.name"
        }
    };
    let latest = rollup::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            backend,
            sql,
            [Value::from(source), Value::from(bucket), Value::from(before)],
        ))
        .all(db)
        .await?;
    let recent = anomaly::Entity::find()
        .filter(anomaly::Column::Source.eq(source))
        .filter(anomaly::Column::Bucket.eq(bucket))
        .filter(anomaly::Column::BucketStart.gte(since))
        .all(db)
        .await?;
    Ok(latest
        .into_iter()
        .map(|r| NameSummary {
            anomalies: recent.iter().filter(|a| a.name == r.name).count() as u64,
            name: r.name,
            bucket_start: r.bucket_start,
            count: r.count,
            mean: r.mean,
            p95: r.p95,
            error_rate: r.error_rate,
        })
        .collect())
}
