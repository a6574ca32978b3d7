//! Metric names the workers and brokers record (a contract, like `api::metrics`: dashboards,
//! alerts and KEDA use them), and the timed [`Driver`] that records a worker's broker round
//! trips and heartbeat.
//!
//! Handles are registered once per worker and held: the hot path records per broker call (a
//! batch of jobs), never per job, and never builds label strings.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;

use crate::{
    broker::{BrokerError, Driver},
    job::{Job, JobId, Settlement},
    queue::QueueName,
};

/// Counter `{queue, kind}`: jobs accepted by the API or fired by the scheduler (idempotent
/// repeats are not counted).
pub const JOBS_ENQUEUED_TOTAL: &str = "drover_jobs_enqueued_total";
/// Counter `{queue, kind, outcome}`: attempts finished, by outcome `succeeded`, `retried` or
/// `dead`.
pub const JOBS_COMPLETED_TOTAL: &str = "drover_jobs_completed_total";
/// Histogram `{queue, kind}`: how long an attempt's handler ran, in seconds.
pub const JOB_DURATION_SECONDS: &str = "drover_job_duration_seconds";
/// Histogram `{queue}`: from when a job was due (enqueued, or its `run_at`) to its attempt's
/// start, in seconds.
pub const JOB_WAIT_SECONDS: &str = "drover_job_wait_seconds";
/// Histogram `{operation}`: one broker call, in seconds. `enqueue` (the API's pushes, one per
/// coalesced batch), and a worker's `fetch` (calls that returned jobs: an empty one is mostly
/// the blocking wait for work), `settle`, `renew` and `release`.
pub const BROKER_REQUEST_DURATION_SECONDS: &str = "drover_broker_request_duration_seconds";
/// Gauge `{queue}`: Unix time, in seconds, of the last broker call this process's worker for
/// `queue` completed (a fetch answers at least every second while idle; a busy worker settles
/// continuously). A worker whose heartbeat stops advancing is stuck or cut off from its broker.
pub const WORKER_HEARTBEAT_TIMESTAMP_SECONDS: &str = "drover_worker_heartbeat_timestamp_seconds";
/// Gauge `{queue}`: attempts this process runs at once on `queue` (`--concurrency`).
pub const WORKER_SLOTS: &str = "drover_worker_slots";
/// Gauge `{queue}`: attempts running now on `queue` in this process.
pub const WORKER_BUSY_SLOTS: &str = "drover_worker_busy_slots";

/// Counter `{schedule}`: ticks whose job a broker accepted (a `run_once` firing after downtime
/// counts once).
pub const SCHEDULE_TICKS_TOTAL: &str = "drover_schedule_ticks_total";
/// Counter `{schedule}`: ticks older than the misfire grace when a scheduler got to them.
pub const SCHEDULE_MISSED_TICKS_TOTAL: &str = "drover_schedule_missed_ticks_total";
/// Histogram `{schedule}`: from a tick's time to its job's acceptance by the broker, seconds.
pub const SCHEDULE_TICK_DELAY_SECONDS: &str = "drover_schedule_tick_delay_seconds";

/// The `operation` label values of [`BROKER_REQUEST_DURATION_SECONDS`].
pub mod operation {
    pub const ENQUEUE: &str = "enqueue";
    pub const FETCH: &str = "fetch";
    pub const SETTLE: &str = "settle";
    pub const RENEW: &str = "renew";
    pub const RELEASE: &str = "release";
}

/// A handle on one operation's [`BROKER_REQUEST_DURATION_SECONDS`] histogram.
pub fn broker_request_duration(operation: &'static str) -> metrics::Histogram {
    metrics::histogram!(BROKER_REQUEST_DURATION_SECONDS, "operation" => operation)
}

/// Seconds since the Unix epoch, as a gauge value.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// A [`Driver`] that times each call and beats the worker's heartbeat when the broker answers.
pub(crate) struct TimedDriver {
    inner: Arc<dyn Driver>,
    fetch: metrics::Histogram,
    settle: metrics::Histogram,
    renew: metrics::Histogram,
    release: metrics::Histogram,
    heartbeat: metrics::Gauge,
}

impl TimedDriver {
    pub(crate) fn wrap(inner: Arc<dyn Driver>, queue: &QueueName) -> Arc<dyn Driver> {
        let heartbeat = metrics::gauge!(WORKER_HEARTBEAT_TIMESTAMP_SECONDS, "queue" => queue.to_string());
        heartbeat.set(unix_now());
        Arc::new(Self {
            inner,
            fetch: broker_request_duration(operation::FETCH),
            settle: broker_request_duration(operation::SETTLE),
            renew: broker_request_duration(operation::RENEW),
            release: broker_request_duration(operation::RELEASE),
            heartbeat,
        })
    }

    /// Records `started`'s call in `histogram` (when given) and, if it succeeded, the heartbeat.
    fn observe<T>(
        &self,
        histogram: Option<&metrics::Histogram>,
        started: Instant,
        result: &Result<T, BrokerError>,
    ) {
        if let Some(h) = histogram {
            h.record(started.elapsed().as_secs_f64());
        }
        if result.is_ok() {
            self.heartbeat.set(unix_now());
        }
    }
}

#[async_trait]
impl Driver for TimedDriver {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Job>, BrokerError> {
        let started = Instant::now();
        let result = self.inner.fetch(max, wait).await;
        let got_jobs = result.as_ref().is_ok_and(|jobs| !jobs.is_empty());
        self.observe(got_jobs.then_some(&self.fetch), started, &result);
        result
    }

    async fn settle(&self, batch: &[Settlement]) -> Result<(), BrokerError> {
        let started = Instant::now();
        let result = self.inner.settle(batch).await;
        self.observe(Some(&self.settle), started, &result);
        result
    }

    async fn release(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        let started = Instant::now();
        let result = self.inner.release(jobs).await;
        self.observe(Some(&self.release), started, &result);
        result
    }

    async fn renew(&self, held: &[JobId]) -> Result<(), BrokerError> {
        let started = Instant::now();
        let result = self.inner.renew(held).await;
        self.observe(Some(&self.renew), started, &result);
        result
    }

    async fn abandon(&self) {
        self.inner.abandon().await
    }
}
