//! Analytics (queue `analytics`): `analytics.rollup` aggregates events (and drover's own job
//! history) into minute/hour/day buckets, `analytics.anomalies` compares the newest complete
//! bucket with its trailing window, `analytics.forecast` fits a line over the last K buckets.
//! The computations themselves are in [`crate::stats`].

use std::{fmt, time::Duration};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    catalog::KindSpec,
    retry::RetryPolicy,
    schedule::{JobTemplate, MissedTicks, ScheduleConfig},
};

pub const QUEUE: &str = "analytics";
pub const ROLLUP: &str = "analytics.rollup";
pub const ANOMALIES: &str = "analytics.anomalies";
pub const FORECAST: &str = "analytics.forecast";

/// A bucket size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub const ALL: [Bucket; 3] = [Bucket::Minute, Bucket::Hour, Bucket::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Minute => "minute",
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    pub fn size(self) -> TimeDelta {
        match self {
            Bucket::Minute => TimeDelta::minutes(1),
            Bucket::Hour => TimeDelta::hours(1),
            Bucket::Day => TimeDelta::days(1),
        }
    }

    /// The start of the bucket holding `t` (UTC buckets).
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.size()).unwrap_or(t)
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rollup aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `POST /v1/events`, per event name; `value` as posted.
    Events,
    /// drover's job history, per kind: attempt durations in ms, failed attempts as errors.
    Jobs,
}

impl Source {
    pub const ALL: [Source; 2] = [Source::Events, Source::Jobs];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Events => "events",
            Source::Jobs => "jobs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The rollup column anomalies and forecasts look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Count,
    Mean,
    P95,
    ErrorRate,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Count, Metric::Mean, Metric::P95, Metric::ErrorRate];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Count => "count",
            Metric::Mean => "mean",
            Metric::P95 => "p95",
            Metric::ErrorRate => "error_rate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a bucket without events counts as 0 (counts) or as no observation (the rest).
    pub fn zero_when_empty(self) -> bool {
        matches!(self, Metric::Count)
    }
}

/// `analytics.rollup`: recomputes every bucket of size `bucket` that overlaps `[from, to)`
/// from the raw events (and/or job history) and upserts the rows: running it twice over the
/// same window writes the same rows. Without `from`/`to`: the `lookback` buckets up to now
/// (default 2: the current one and the one before, which late events may still change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollup {
    pub bucket: Bucket,
    /// Only this source; both when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback: Option<u32>,
}

/// The most buckets one rollup job may span (a year of hours).
pub const MAX_ROLLUP_BUCKETS: i64 = 366 * 24;

impl Rollup {
    /// The window `[from, to)` the job covers at `now`, aligned to whole buckets.
    pub fn window(&self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let size = self.bucket.size();
        let to = match self.to {
            Some(t) => {
                let f = self.bucket.floor(t);
                if f == t { t } else { f + size }
            }
            None => self.bucket.floor(now) + size,
        };
        let from = match self.from {
            Some(f) => self.bucket.floor(f),
            None => to - size * self.lookback.unwrap_or(2).max(1) as i32,
        };
        (from, to)
    }

    pub fn check(&self) -> Result<(), String> {
        if let (Some(f), Some(t)) = (self.from, self.to)
            && f >= t
        {
            return Err("from: must be before to".into());
        }
        let (from, to) = self.window(Utc::now());
        let buckets = (to - from).num_seconds() / self.bucket.size().num_seconds();
        if self.lookback == Some(0) || buckets > MAX_ROLLUP_BUCKETS {
            return Err(format!("the window must span 1 to {MAX_ROLLUP_BUCKETS} buckets"));
        }
        Ok(())
    }
}

fn default_window() -> u32 {
    24
}

fn default_threshold() -> f64 {
    3.0
}

fn default_horizon() -> u32 {
    1
}

/// `analytics.anomalies`: for every name, the z-score of the newest complete bucket's `metric`
/// against the `window` buckets before it; |z| ≥ `threshold` is stored (and sent to the
/// analytics webhook when one is configured).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomalies {
    pub bucket: Bucket,
    pub metric: Metric,
    #[serde(default = "default_window")]
    pub window: u32,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// `analytics.forecast`: for every name, a least-squares line over the last `points` complete
/// buckets of `metric`, projected `horizon` buckets ahead, with r².
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forecast {
    pub bucket: Bucket,
    pub metric: Metric,
    #[serde(default = "default_window")]
    pub points: u32,
    #[serde(default = "default_horizon")]
    pub horizon: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Most trailing buckets an anomaly or forecast job reads.
pub const MAX_WINDOW: u32 = 10_000;

/// Analytics jobs read and rewrite tables: a failure is usually a database hiccup, and the
/// next scheduled run covers the same window anyway, so a few quick retries are enough.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial_ms: 5_000,
        multiplier: 3.0,
        max_delay_ms: 300_000,
        max_attempts: 4,
        jitter: 0.2,
    }
}

pub(crate) fn kinds() -> Vec<KindSpec> {
    let spec = |name, validate| KindSpec {
        name,
        queue: QUEUE,
        retry: retry_policy(),
        timeout: Duration::from_secs(1800),
        validate,
    };
    vec![
        spec(ROLLUP, |raw| crate::catalog::decode::<Rollup>(raw)?.check()),
        spec(ANOMALIES, |raw| {
            let a: Anomalies = crate::catalog::decode(raw)?;
            if a.window < 2 || a.window > MAX_WINDOW {
                return Err(format!("window: must be 2 to {MAX_WINDOW} buckets"));
            }
            if !(a.threshold.is_finite() && a.threshold > 0.0) {
                return Err("threshold: must be a positive number".into());
            }
            Ok(())
        }),
        spec(FORECAST, |raw| {
            let f: Forecast = crate::catalog::decode(raw)?;
            if f.points < 2 || f.points > MAX_WINDOW {
                return Err(format!("points: must be 2 to {MAX_WINDOW}"));
            }
            if f.horizon == 0 || f.horizon > MAX_WINDOW {
                return Err(format!("horizon: must be 1 to {MAX_WINDOW}"));
            }
            Ok(())
        }),
    ]
}

pub(crate) fn schedule(name: &str, cron: &str, kind: &str, payload: serde_json::Value) -> ScheduleConfig {
    ScheduleConfig {
        name: name.to_owned(),
        cron: cron.to_owned(),
        timezone: None,
        job: JobTemplate {
            kind: kind.to_owned(),
            payload,
            queue: None,
            priority: None,
        },
        enabled: true,
        // Each run recomputes a window that covers what a missed one would have: nothing to
        // catch up on.
        missed_ticks: MissedTicks::Skip,
    }
}

/// The family's default schedules (enabled by `[analytics] schedules = true`): minute rollups
/// every minute, hour rollups every 5 minutes, day rollups hourly, then hourly anomaly
/// detection (hourly counts, 24 h window, |z| ≥ `threshold`) and an hourly forecast (hourly
/// counts, last 24 h, 1 h ahead). Cron with seconds, UTC.
pub fn default_schedules(threshold: f64) -> Vec<ScheduleConfig> {
    vec![
        schedule(
            "analytics-rollup-minute",
            "5 * * * * *",
            ROLLUP,
            json!({"bucket": "minute"}),
        ),
        schedule(
            "analytics-rollup-hour",
            "10 */5 * * * *",
            ROLLUP,
            json!({"bucket": "hour"}),
        ),
        schedule(
            "analytics-rollup-day",
            "20 7 * * * *",
            ROLLUP,
            json!({"bucket": "day"}),
        ),
        schedule(
            "analytics-anomalies-hour",
            "0 2 * * * *",
            ANOMALIES,
            json!({"bucket": "hour", "metric": "count", "window": 24, "threshold": threshold}),
        ),
        schedule(
            "analytics-forecast-hour",
            "0 3 * * * *",
            FORECAST,
            json!({"bucket": "hour", "metric": "count", "points": 24, "horizon": 1}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::Catalog;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn analytics_payloads_are_checked_and_reject_unknown_fields() {
        let c = Catalog::default();
        assert_eq!(
            c.validate(ROLLUP, &raw(r#"{"bucket":"hour"}"#)).unwrap().queue,
            "analytics"
        );
        for bad in [
            r#"{"bucket":"week"}"#,
            r#"{"bucket":"hour","x":1}"#,
            r#"{"bucket":"hour","from":"2026-01-02T00:00:00Z","to":"2026-01-01T00:00:00Z"}"#,
            r#"{"bucket":"minute","from":"2020-01-01T00:00:00Z","to":"2026-01-01T00:00:00Z"}"#,
        ] {
            assert!(c.validate(ROLLUP, &raw(bad)).is_err(), "{bad} accepted");
        }
        assert!(
            c.validate(ANOMALIES, &raw(r#"{"bucket":"hour","metric":"p95"}"#))
                .is_ok()
        );
        assert!(
            c.validate(ANOMALIES, &raw(r#"{"bucket":"hour","metric":"p95","window":1}"#))
                .is_err()
        );
        assert!(
            c.validate(ANOMALIES, &raw(r#"{"bucket":"hour","metric":"p42"}"#))
                .is_err()
        );
        assert!(
            c.validate(FORECAST, &raw(r#"{"bucket":"day","metric":"count","horizon":0}"#))
                .is_err()
        );
        let all = default_schedules(3.0)
            .into_iter()
            .chain(crate::families::scoring::default_schedules())
            .chain(crate::families::cache_warm::default_schedules([(
                "leaderboards",
                "0 * * * * *",
            )]));
        for s in all {
            assert!(s.validate(&c).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn a_rollup_window_covers_whole_buckets() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let now = t("2026-12-01T12:34:56Z");
        let r = Rollup {
            bucket: Bucket::Hour,
            source: None,
            from: None,
            to: None,
            lookback: None,
        };
        assert_eq!(
            r.window(now),
            (t("2026-12-01T11:00:00Z"), t("2026-12-01T13:00:00Z"))
        );
        let r = Rollup {
            from: Some(t("2026-12-01T10:15:00Z")),
            to: Some(t("2026-12-01T12:00:00Z")),
            ..r
        };
        assert_eq!(
            r.window(now),
            (t("2026-12-01T10:00:00Z"), t("2026-12-01T12:00:00Z"))
        );
        assert_eq!(Bucket::Day.floor(now), t("2026-12-01T00:00:00Z"));
    }
}
