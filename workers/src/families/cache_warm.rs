//! Cache warming: the `cache.warm` handler. Internal warmers rebuild the read models the API
//! serves from Redis (each under the same stampede lock the API's misses take, so a warm and a
//! miss never rebuild one key at once); HTTP warmers GET their URLs, at most `concurrency` at
//! a time, and record each one's status and latency.

use std::{sync::Arc, time::Instant};

use chrono::Utc;
use futures::StreamExt;
use jobs::{
    Job,
    cache::{self, ReadCache},
    families::{
        analytics::{Bucket, Source},
        cache_warm::Warm,
    },
};

use super::{
    config::{WarmerConfig, WarmerKind},
    shared::{Families, db_error, families},
};
use crate::handlers::{Deps, JobError, payload};

/// What one warm did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Read models written (internal) or URLs answered 2xx/3xx (http).
    pub ok: usize,
    /// Read models skipped (a rebuild held the lock) or URLs that failed.
    pub skipped_or_failed: usize,
}

/// Rebuilds every model's leaderboard.
pub async fn warm_leaderboards(f: &Families, cache: &ReadCache) -> Result<WarmReport, JobError> {
    let mut report = WarmReport::default();
    for model in schema::scores::list_models(&f.db).await.map_err(db_error)? {
        let wrote = cache
            .refresh_board::<JobError, _, _>(&model.name, || async {
                cache::build_board(&f.db, &model.name).await.map_err(db_error)
            })
            .await?;
        if wrote {
            report.ok += 1;
        } else {
            report.skipped_or_failed += 1;
        }
    }
    Ok(report)
}

/// Rebuilds the analytics summaries (every source × bucket size).
pub async fn warm_analytics(f: &Families, cache: &ReadCache) -> Result<WarmReport, JobError> {
    let now = Utc::now();
    let mut report = WarmReport::default();
    for source in Source::ALL {
        for bucket in Bucket::ALL {
            let summary = cache::build_summary(&f.db, source, bucket, now)
                .await
                .map_err(db_error)?;
            cache
                .put_json_model(cache::SUMMARY_CACHE, &cache::summary_id(source, bucket), &summary)
                .await
                .map_err(JobError::retryable)?;
            report.ok += 1;
        }
    }
    Ok(report)
}

/// GETs every URL of `w`, `w.concurrency` at a time, and records each outcome.
pub async fn warm_http(f: &Families, w: &WarmerConfig) -> Result<WarmReport, JobError> {
    let timeout = std::time::Duration::from_millis(w.timeout_ms.max(1));
    // Owned values in each future: the stream is polled from a spawned (Send) task.
    let gets = w.urls.iter().cloned().map(|url| {
        let http = f.http.clone();
        let warmer = w.name.clone();
        async move {
            let started = Instant::now();
            let res = http.get(&url).timeout(timeout).send().await;
            let (status, bytes, error) = match res {
                Ok(r) => {
                    let status = r.status();
                    // Read the body: a warm that stops at the headers warms nothing behind them.
                    match r.bytes().await {
                        Ok(b) => (Some(status.as_u16() as i32), Some(b.len() as i64), None),
                        Err(e) => (Some(status.as_u16() as i32), None, Some(e.to_string())),
                    }
                }
                Err(e) => (None, None, Some(e.to_string())),
            };
            schema::warm::WarmUrl {
                warmer,
                url,
                status,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                bytes,
                error,
                checked_at: Utc::now(),
            }
        }
    });
    let results: Vec<schema::warm::WarmUrl> = futures::stream::iter(gets)
        .buffer_unordered(w.concurrency.max(1))
        .collect()
        .await;
    let mut report = WarmReport::default();
    for r in results {
        let good = r.error.is_none() && r.status.is_some_and(|s| (200..400).contains(&s));
        if good {
            report.ok += 1;
        } else {
            report.skipped_or_failed += 1;
            tracing::warn!(warmer = %w.name, url = %r.url, status = ?r.status, error = ?r.error, "warm GET failed");
        }
        schema::warm::record(&f.db, r).await.map_err(db_error)?;
    }
    if report.ok == 0 && report.skipped_or_failed > 0 {
        return Err(JobError::retryable(format!(
            "warmer {}: every URL failed",
            w.name
        )));
    }
    Ok(report)
}

/// Runs the configured warmer `name`.
pub async fn warm(f: &Families, name: &str) -> Result<WarmReport, JobError> {
    let w = f
        .cache_config
        .warmers
        .iter()
        .find(|w| w.name == name)
        .ok_or_else(|| JobError::permanent(format!("no cache warmer is named {name:?} in [cache]")))?;
    match (w.kind, &f.cache) {
        (WarmerKind::Http, _) => warm_http(f, w).await,
        (_, None) => {
            // Without Redis the API computes every read; there is nothing to warm.
            tracing::info!(warmer = %name, "no cache URL configured: nothing to warm");
            Ok(WarmReport::default())
        }
        (WarmerKind::Leaderboards, Some(c)) => warm_leaderboards(f, c).await,
        (WarmerKind::Analytics, Some(c)) => warm_analytics(f, c).await,
    }
}

pub async fn run(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Warm = payload(&job)?;
    let report = warm(f, &p.warmer).await?;
    tracing::info!(warmer = %p.warmer, ok = report.ok, skipped_or_failed = report.skipped_or_failed, "warm done");
    Ok(())
}
