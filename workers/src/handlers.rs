//! Job handlers: what runs a kind, and how a handler says whether retrying can help.

use std::{collections::HashMap, sync::Arc};

use futures::future::BoxFuture;
use jobs::{Job, JobId};
use tokio::sync::mpsc;

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt (a timeout, an unreachable dependency, …).
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help (a payload the handler rejects, a missing target): dead at once.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    pub fn retryable(e: impl std::fmt::Display) -> Self {
        Self::Retryable(e.to_string())
    }

    pub fn permanent(e: impl std::fmt::Display) -> Self {
        Self::Permanent(e.to_string())
    }
}

/// Decodes a job's payload into its kind's typed payload; a payload that doesn't decode can't
/// be fixed by retrying.
pub fn payload<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, JobError> {
    serde_json::from_str(job.payload.get()).map_err(|e| JobError::permanent(format!("payload: {e}")))
}

/// What handlers may use: shared connections and probes, one per process.
#[derive(Clone, Default)]
pub struct Deps {
    /// Receives a [`Pickup`] from every `noop` job carrying `enqueued_at_us`; the benchmark
    /// and the latency tests listen here.
    pub pickup_probe: Option<mpsc::UnboundedSender<Pickup>>,
    /// The backup family's configuration, store and catalog; `None` fails backup jobs
    /// permanently ("no backup configuration").
    pub backups: Option<Arc<crate::families::backup::Backups>>,
    /// Whether `sleep` jobs may abort this process (`DROVER_CHAOS_DRILLS`).
    pub chaos_drills: bool,
    /// The analytics, scoring and cache-warming families' state; `None` fails their jobs
    /// permanently.
    pub families: Option<Arc<crate::families::Families>>,
}

/// When a probed job was enqueued and when its handler started (epoch µs, realtime clock).
#[derive(Clone, Copy, Debug)]
pub struct Pickup {
    pub id: JobId,
    pub enqueued_at_us: i64,
    pub picked_up_at_us: i64,
}

impl Pickup {
    pub fn latency_us(&self) -> i64 {
        self.picked_up_at_us - self.enqueued_at_us
    }
}

pub type Handler = fn(Arc<Job>, Arc<Deps>) -> BoxFuture<'static, Result<(), JobError>>;

/// Job kind → handler.
#[derive(Clone)]
pub struct Registry {
    handlers: HashMap<&'static str, Handler>,
}

impl Registry {
    /// Every handler this build has.
    pub fn standard() -> Self {
        let mut handlers: HashMap<&'static str, Handler> = HashMap::new();
        handlers.insert("noop", |job, deps| {
            Box::pin(crate::families::builtin::noop(job, deps))
        });
        handlers.insert("sleep", |job, deps| {
            Box::pin(crate::families::builtin::sleep(job, deps))
        });
        {
            use crate::families::backup;
            use jobs::families::backup as kinds;
            handlers.insert(kinds::RUN, |job, deps| Box::pin(backup::run(job, deps)));
            handlers.insert(kinds::VERIFY, |job, deps| Box::pin(backup::verify(job, deps)));
            handlers.insert(kinds::PRUNE, |job, deps| Box::pin(backup::prune(job, deps)));
        }
        {
            use crate::families::{analytics, cache_warm, scoring};
            use jobs::families as k;
            handlers.insert(k::analytics::ROLLUP, |job, deps| {
                Box::pin(analytics::run_rollup(job, deps))
            });
            handlers.insert(k::analytics::ANOMALIES, |job, deps| {
                Box::pin(analytics::run_anomalies(job, deps))
            });
            handlers.insert(k::analytics::FORECAST, |job, deps| {
                Box::pin(analytics::run_forecast(job, deps))
            });
            handlers.insert(k::scoring::RECOMPUTE, |job, deps| {
                Box::pin(scoring::recompute(job, deps))
            });
            handlers.insert(k::scoring::CHUNK, |job, deps| Box::pin(scoring::chunk(job, deps)));
            handlers.insert(k::cache_warm::WARM, |job, deps| {
                Box::pin(cache_warm::run(job, deps))
            });
        }
        Self { handlers }
    }

    pub fn get(&self, kind: &str) -> Option<Handler> {
        self.handlers.get(kind).copied()
    }

    /// The kinds this registry runs.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }
}

/// Redis for read models being down passes; the next attempt may find it back.
impl From<jobs::cache::CacheError> for JobError {
    fn from(e: jobs::cache::CacheError) -> Self {
        JobError::retryable(e)
    }
}
