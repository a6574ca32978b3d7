//! The `[analytics]`, `[scoring]` and `[cache]` tables of the TOML config (with the
//! `DROVER_CACHE_*` environment variables on top, see README). Defaults are on each field.

use serde::{Deserialize, Serialize};

/// `[analytics]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Whether the scheduler installs the family's default schedules. Default true.
    pub schedules: bool,
    /// |z| at or above which the default anomaly schedule records a bucket. Default 3.
    pub anomaly_threshold: f64,
    /// Receives a JSON POST per newly found anomaly. Secret (may carry a token).
    pub webhook_url: Option<String>,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            schedules: true,
            anomaly_threshold: 3.0,
            webhook_url: None,
        }
    }
}

/// `[scoring]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// Whether the scheduler installs the recompute-every-15-minutes schedule. Default true.
    pub schedules: bool,
    /// Subjects per chunk job when a recompute names none. Default 5 000.
    pub chunk_size: u32,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            schedules: true,
            chunk_size: jobs::families::scoring::DEFAULT_CHUNK_SIZE,
        }
    }
}

/// What a warmer warms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmerKind {
    /// Every model's leaderboard, rebuilt from the `score` table into Redis.
    Leaderboards,
    /// The analytics summaries (each source × bucket size) into Redis.
    Analytics,
    /// GETs `urls` with bounded concurrency, recording status and latency per URL.
    Http,
}

/// `[[cache.warmers]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmerConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: WarmerKind,
    /// When it runs (schedule `cache-warm-<name>`). Default every minute.
    #[serde(default = "every_minute")]
    pub cron: String,
    /// `http` only: the URLs to GET.
    #[serde(default)]
    pub urls: Vec<String>,
    /// `http` only: GETs in flight at once. Default 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// `http` only: limit of one GET. Default 10 000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn every_minute() -> String {
    "0 * * * * *".into()
}

fn default_concurrency() -> usize {
    8
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// `[cache]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Redis holding the read models (`DROVER_CACHE_URL`). Default: the broker's URL when the
    /// broker is Redis; otherwise none, and every cached read is computed from the database.
    pub url: Option<String>,
    /// Read-model TTL in seconds. Default 300.
    pub ttl_s: u64,
    /// Random ± fraction of the TTL per write. Default 0.1.
    pub jitter: f64,
    /// Longest rebuild holding the stampede lock, seconds. Default 30.
    pub lock_ttl_s: u64,
    /// Whether the scheduler installs one schedule per warmer. Default true.
    pub schedules: bool,
    /// Default: `leaderboards` and `analytics`, every minute.
    pub warmers: Vec<WarmerConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let internal = |name: &str, kind| WarmerConfig {
            name: name.into(),
            kind,
            cron: every_minute(),
            urls: Vec::new(),
            concurrency: default_concurrency(),
            timeout_ms: default_timeout_ms(),
        };
        Self {
            url: None,
            ttl_s: 300,
            jitter: 0.1,
            lock_ttl_s: 30,
            schedules: true,
            warmers: vec![
                internal("leaderboards", WarmerKind::Leaderboards),
                internal("analytics", WarmerKind::Analytics),
            ],
        }
    }
}

impl CacheConfig {
    pub fn settings(&self) -> jobs::cache::CacheSettings {
        jobs::cache::CacheSettings {
            ttl: std::time::Duration::from_secs(self.ttl_s.max(1)),
            jitter: self.jitter,
            lock_ttl: std::time::Duration::from_secs(self.lock_ttl_s.max(1)),
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..0.9).contains(&self.jitter) {
            return Err("cache.jitter: must be at least 0 and below 0.9".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &self.warmers {
            jobs::families::cache_warm::check_warmer_name(&w.name)
                .map_err(|e| format!("cache.warmers: name {:?}: {e}", w.name))?;
            if !names.insert(w.name.as_str()) {
                return Err(format!("cache.warmers: {:?} is defined twice", w.name));
            }
            if w.kind == WarmerKind::Http {
                if w.urls.is_empty() {
                    return Err(format!("cache.warmers.{}: an http warmer needs urls", w.name));
                }
                for u in &w.urls {
                    let ok = url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
                    if !ok {
                        return Err(format!("cache.warmers.{}: {u:?} is not an http(s) URL", w.name));
                    }
                }
                if w.concurrency == 0 {
                    return Err(format!(
                        "cache.warmers.{}: concurrency must be at least 1",
                        w.name
                    ));
                }
            }
        }
        Ok(())
    }
}
