//! Analytics reads: rollups, anomalies, forecasts (tables the analytics jobs fill), the SLA
//! report computed from rollups, and the summary read model served from Redis.

use chrono::{DateTime, Utc};
use jobs::{
    cache::{self, CacheResult},
    families::analytics::{Bucket, Source},
    stats::{self, SlaBucket, SlaTarget},
};
use poem_openapi::{Object, OpenApi, param::Query, payload::Json};
use schema::analytics::{self as tables, Filter};

use super::ApiTags;
use crate::{
    AppState,
    error::{ApiError, FieldError, ProblemType},
    metrics,
};

const MAX_LIMIT: u64 = 10_000;

pub(crate) struct AnalyticsApi {
    state: AppState,
}

impl AnalyticsApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(ProblemType::InvalidField, field, reason)
}

/// Source, bucket and limit from the query, or every problem with them.
fn common(
    source: Option<&str>,
    bucket: Option<&str>,
    limit: Option<u64>,
    errors: &mut Vec<FieldError>,
) -> (Source, Bucket, u64) {
    let source = match source {
        None => Source::Events,
        Some(s) => Source::parse(s).unwrap_or_else(|| {
            errors.push(invalid("source", "must be events or jobs"));
            Source::Events
        }),
    };
    let bucket = match bucket {
        None => Bucket::Hour,
        Some(b) => Bucket::parse(b).unwrap_or_else(|| {
            errors.push(invalid("bucket", "must be minute, hour or day"));
            Bucket::Hour
        }),
    };
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        errors.push(invalid("limit", format!("must be between 1 and {MAX_LIMIT}")));
    }
    (source, bucket, limit)
}

fn check(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid { errors, batch: false })
    }
}

#[OpenApi(tag = "ApiTags::Analytics")]
impl AnalyticsApi {
    /// List rollups
    ///
    /// The newest `limit` buckets (oldest first) of one source and bucket size, optionally of
    /// one name and within `[from, to)` by bucket start.
    #[oai(path = "/v1/analytics/rollups", method = "get", operation_id = "listRollups")]
    async fn rollups(
        &self,
        /// events (default) or jobs.
        source: Query<Option<String>>,
        /// minute, hour (default) or day.
        bucket: Query<Option<String>>,
        name: Query<Option<String>>,
        from: Query<Option<DateTime<Utc>>>,
        to: Query<Option<DateTime<Utc>>>,
        /// At most this many (default 100, at most 10 000).
        limit: Query<Option<u64>>,
    ) -> Result<Json<RollupList>, ApiError> {
        let mut errors = Vec::new();
        let (source, bucket, limit) = common(source.0.as_deref(), bucket.0.as_deref(), limit.0, &mut errors);
        check(errors)?;
        let f = Filter {
            source: source.as_str(),
            bucket: bucket.as_str(),
            name: name.0.as_deref(),
            from: from.0,
            to: to.0,
        };
        let rows = tables::rollups(&self.state.db, &f, limit).await?;
        Ok(Json(RollupList {
            rollups: rows.into_iter().map(RollupView::from).collect(),
        }))
    }

    /// List anomalies
    ///
    /// Buckets whose metric was at least `threshold` standard deviations from its trailing
    /// window, newest first.
    #[oai(
        path = "/v1/analytics/anomalies",
        method = "get",
        operation_id = "listAnomalies"
    )]
    async fn anomalies(
        &self,
        source: Query<Option<String>>,
        bucket: Query<Option<String>>,
        name: Query<Option<String>>,
        from: Query<Option<DateTime<Utc>>>,
        to: Query<Option<DateTime<Utc>>>,
        limit: Query<Option<u64>>,
    ) -> Result<Json<AnomalyList>, ApiError> {
        let mut errors = Vec::new();
        let (source, bucket, limit) = common(source.0.as_deref(), bucket.0.as_deref(), limit.0, &mut errors);
        check(errors)?;
        let f = Filter {
            source: source.as_str(),
            bucket: bucket.as_str(),
            name: name.0.as_deref(),
            from: from.0,
            to: to.0,
        };
        let rows = tables::anomalies(&self.state.db, &f, limit).await?;
        Ok(Json(AnomalyList {
            anomalies: rows.into_iter().map(AnomalyView::from).collect(),
        }))
    }

    /// List forecasts
    ///
    /// The latest least-squares forecast per name and metric.
    #[oai(
        path = "/v1/analytics/forecasts",
        method = "get",
        operation_id = "listForecasts"
    )]
    async fn forecasts(
        &self,
        source: Query<Option<String>>,
        bucket: Query<Option<String>>,
        name: Query<Option<String>>,
    ) -> Result<Json<ForecastList>, ApiError> {
        let mut errors = Vec::new();
        let (source, bucket, _) = common(source.0.as_deref(), bucket.0.as_deref(), None, &mut errors);
        check(errors)?;
        let f = Filter {
            source: source.as_str(),
            bucket: bucket.as_str(),
            name: name.0.as_deref(),
            ..Default::default()
        };
        let rows = tables::forecasts(&self.state.db, &f).await?;
        Ok(Json(ForecastList {
            forecasts: rows.into_iter().map(ForecastView::from).collect(),
        }))
    }

    /// SLA report
    ///
    /// Availability (`1 − errors / count`) and each bucket's p95 of one name over `[from, to)`
    /// (default: the last 24 buckets), against the targets: met when availability ≥
    /// `availability` and no bucket's p95 exceeds `p95`.
    #[oai(path = "/v1/analytics/sla", method = "get", operation_id = "slaReport")]
    #[allow(clippy::too_many_arguments)]
    async fn sla(
        &self,
        name: Query<String>,
        /// Target p95, in the events' value unit (ms for job durations).
        p95: Query<f64>,
        /// Target availability, 0–1 (default 0.999).
        availability: Query<Option<f64>>,
        source: Query<Option<String>>,
        bucket: Query<Option<String>>,
        from: Query<Option<DateTime<Utc>>>,
        to: Query<Option<DateTime<Utc>>>,
    ) -> Result<Json<SlaView>, ApiError> {
        let mut errors = Vec::new();
        let (source, bucket, _) = common(source.0.as_deref(), bucket.0.as_deref(), None, &mut errors);
        let availability = availability.0.unwrap_or(0.999);
        if !(0.0..=1.0).contains(&availability) {
            errors.push(invalid("availability", "must be between 0 and 1"));
        }
        if !(p95.0.is_finite() && p95.0 >= 0.0) {
            errors.push(invalid("p95", "must be a non-negative number"));
        }
        check(errors)?;
        let to = to.0.unwrap_or_else(|| bucket.floor(Utc::now()) + bucket.size());
        let from = from.0.unwrap_or(to - bucket.size() * 24);
        let rows = tables::series(
            &self.state.db,
            source.as_str(),
            bucket.as_str(),
            &name.0,
            from,
            to,
        )
        .await?;
        let buckets: Vec<SlaBucket> = rows
            .iter()
            .map(|r| SlaBucket {
                count: r.count.max(0) as u64,
                errors: r.errors.max(0) as u64,
                p95: r.p95,
            })
            .collect();
        let target = SlaTarget {
            availability,
            p95: p95.0,
        };
        let r = stats::sla(&buckets, target);
        Ok(Json(SlaView {
            name: name.0,
            source: source.as_str().into(),
            bucket: bucket.as_str().into(),
            from,
            to,
            target_availability: availability,
            target_p95: target.p95,
            buckets: r.buckets,
            count: r.count,
            errors: r.errors,
            availability: r.availability,
            worst_p95: r.worst_p95,
            buckets_over_p95: r.buckets_over_p95,
            p95_compliance: r.p95_compliance,
            availability_met: r.availability_met,
            p95_met: r.p95_met,
            met: r.met,
        }))
    }

    /// Analytics summary
    ///
    /// Each name's newest complete bucket with its anomalies of the last 24 buckets. Served
    /// from Redis when warm (a read model the cache warmers keep fresh); computed on a miss.
    #[oai(
        path = "/v1/analytics/summary",
        method = "get",
        operation_id = "analyticsSummary"
    )]
    async fn summary(
        &self,
        source: Query<Option<String>>,
        bucket: Query<Option<String>>,
    ) -> Result<Json<SummaryView>, ApiError> {
        let mut errors = Vec::new();
        let (source, bucket, _) = common(source.0.as_deref(), bucket.0.as_deref(), None, &mut errors);
        check(errors)?;
        let db = &self.state.db;
        let compute =
            || async { Ok::<_, ApiError>(cache::build_summary(db, source, bucket, Utc::now()).await?) };
        let (names, result) = match &self.state.cache {
            Some(c) => {
                c.json_or_compute(cache::SUMMARY_CACHE, &cache::summary_id(source, bucket), compute)
                    .await?
            }
            None => (compute().await?, CacheResult::Miss),
        };
        metrics::cache_request(cache::SUMMARY_CACHE, result);
        Ok(Json(SummaryView {
            source: source.as_str().into(),
            bucket: bucket.as_str().into(),
            cached: result == CacheResult::Hit,
            names: names
                .into_iter()
                .map(|n| NameSummaryView {
                    name: n.name,
                    bucket_start: n.bucket_start,
                    count: n.count,
                    mean: n.mean,
                    p95: n.p95,
                    error_rate: n.error_rate,
                    anomalies: n.anomalies,
                })
                .collect(),
        }))
    }
}

#[derive(Object)]
pub(crate) struct RollupList {
    rollups: Vec<RollupView>,
}

/// One bucket's aggregates.
#[derive(Object)]
pub(crate) struct RollupView {
    source: String,
    name: String,
    bucket: String,
    bucket_start: DateTime<Utc>,
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
    mean: f64,
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    errors: i64,
    error_rate: f64,
    computed_at: DateTime<Utc>,
}

impl From<tables::Rollup> for RollupView {
    fn from(r: tables::Rollup) -> Self {
        Self {
            source: r.source,
            name: r.name,
            bucket: r.bucket,
            bucket_start: r.bucket_start,
            count: r.count,
            sum: r.sum,
            min: r.min,
            max: r.max,
            mean: r.mean,
            p50: r.p50,
            p90: r.p90,
            p95: r.p95,
            p99: r.p99,
            errors: r.errors,
            error_rate: r.error_rate,
            computed_at: r.computed_at,
        }
    }
}

#[derive(Object)]
pub(crate) struct AnomalyList {
    anomalies: Vec<AnomalyView>,
}

#[derive(Object)]
pub(crate) struct AnomalyView {
    source: String,
    name: String,
    bucket: String,
    bucket_start: DateTime<Utc>,
    /// count, mean, p95 or error_rate.
    metric: String,
    value: f64,
    /// Mean and sample standard deviation of the trailing window.
    mean: f64,
    stddev: f64,
    z: f64,
    threshold: f64,
    window: i32,
    detected_at: DateTime<Utc>,
}

impl From<tables::Anomaly> for AnomalyView {
    fn from(a: tables::Anomaly) -> Self {
        Self {
            source: a.source,
            name: a.name,
            bucket: a.bucket,
            bucket_start: a.bucket_start,
            metric: a.metric,
            value: a.value,
            mean: a.mean,
            stddev: a.stddev,
            z: a.z,
            threshold: a.threshold,
            window: a.window,
            detected_at: a.detected_at,
        }
    }
}

#[derive(Object)]
pub(crate) struct ForecastList {
    forecasts: Vec<ForecastView>,
}

#[derive(Object)]
pub(crate) struct ForecastView {
    source: String,
    name: String,
    bucket: String,
    metric: String,
    /// Buckets fitted.
    points: i32,
    slope: f64,
    intercept: f64,
    /// Null when the fitted values have no variance.
    #[oai(skip_serializing_if_is_none)]
    r2: Option<f64>,
    horizon: i32,
    last_bucket: DateTime<Utc>,
    target_at: DateTime<Utc>,
    /// The line's value at `target_at`.
    value: f64,
    computed_at: DateTime<Utc>,
}

impl From<tables::Forecast> for ForecastView {
    fn from(f: tables::Forecast) -> Self {
        Self {
            source: f.source,
            name: f.name,
            bucket: f.bucket,
            metric: f.metric,
            points: f.points,
            slope: f.slope,
            intercept: f.intercept,
            r2: f.r2,
            horizon: f.horizon,
            last_bucket: f.last_bucket,
            target_at: f.target_at,
            value: f.value,
            computed_at: f.computed_at,
        }
    }
}

#[derive(Object)]
pub(crate) struct SlaView {
    name: String,
    source: String,
    bucket: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    target_availability: f64,
    target_p95: f64,
    buckets: u64,
    count: u64,
    errors: u64,
    /// Absent without events.
    #[oai(skip_serializing_if_is_none)]
    availability: Option<f64>,
    #[oai(skip_serializing_if_is_none)]
    worst_p95: Option<f64>,
    buckets_over_p95: u64,
    #[oai(skip_serializing_if_is_none)]
    p95_compliance: Option<f64>,
    availability_met: bool,
    p95_met: bool,
    met: bool,
}

#[derive(Object)]
pub(crate) struct SummaryView {
    source: String,
    bucket: String,
    /// Served from Redis.
    cached: bool,
    names: Vec<NameSummaryView>,
}

#[derive(Object)]
pub(crate) struct NameSummaryView {
    name: String,
    bucket_start: DateTime<Utc>,
    count: i64,
    mean: f64,
    p95: f64,
    error_rate: f64,
    anomalies: u64,
}
