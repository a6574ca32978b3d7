//! The queue backends behind one interface.
//!
//! A broker is chosen by URL (`redis://`, `redis+cluster://`, `amqp://`, `sqlite://`) and offers two faces:
//! [`Producer`] — what the API and the CLI call (push, look up, cancel, stats) — and
//! [`Driver`] — what one worker's [`crate::backend::QueueBackend`] calls to lease, settle and
//! release jobs. The apalis backend on top is the same for every broker, so the runtime's
//! semantics (prefetch, batched acks, graceful release) cannot drift between brokers.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Serialize;

use crate::{
    job::{Job, JobId, JobRecord, Settlement},
    queue::QueueName,
};

pub mod amqp;
/// Concurrent single pushes sent as batches (group commit).
pub mod coalesce;
pub mod redis;
pub mod sqlite;

/// Why a broker call failed. `Unavailable` is the one callers retry (and the API maps to 503).
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("unsupported broker URL {0:?}: expected redis://, redis+cluster://, amqp:// or sqlite://")]
    UnsupportedUrl(String),
    #[error("corrupt job data in broker: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Other(String),
}

impl BrokerError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BrokerError::Unavailable(_))
    }
}

/// The result of a push: the job's id, and whether an earlier job with the same idempotency
/// key was returned instead of enqueuing a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Canceled,
    NotFound,
    /// The job exists but is past the point of cancelling (running or finished).
    NotCancelable(crate::job::JobState),
}

/// What a dead-set operation on one job found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadOutcome {
    /// Retried (back to pending) or discarded.
    Done,
    NotFound,
    /// The broker holds the job, but not in the dead set.
    NotDead(crate::job::JobState),
}

/// Counts for one queue. `done` and `failed` are totals since the queue was created (rates are
/// derived by whoever samples them); `failed` counts failed attempts, retried or not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: String,
    pub pending: u64,
    pub scheduled: u64,
    pub running: u64,
    pub dead: u64,
    pub done: u64,
    pub failed: u64,
}

/// The producer side: everything but consuming.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// Stores one job; returns only once the broker has it durably (or fails).
    async fn push(&self, job: Job) -> Result<Enqueued, BrokerError>;
    /// Stores many jobs; all are stored or the call fails.
    async fn push_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>, BrokerError>;
    /// The broker's record of a job, if it still holds one.
    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError>;
    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError>;
    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError>;
    /// The queues this broker has seen jobs for (the built-in ones are always listed).
    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError>;
    /// Dead jobs of a queue, newest first, each with its last error.
    async fn dead(&self, queue: &QueueName, offset: u64, limit: u64) -> Result<Vec<JobRecord>, BrokerError>;
    /// Puts a dead job back in line, due now, with a fresh attempt budget (see
    /// [`Job::revived`]); its last error stays until its next attempt ends.
    async fn retry_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError>;
    /// Retries every dead job of a queue; returns how many.
    async fn retry_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError>;
    /// Removes a dead job from the broker for good (the history database keeps its record).
    async fn discard_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError>;
    /// Discards every dead job of a queue; returns how many.
    async fn discard_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError>;
    async fn ping(&self) -> Result<(), BrokerError>;
    /// A driver for one worker consuming `queue`.
    async fn driver(&self, queue: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError>;
    /// Where KEDA reads the pending count of `queue` without drover in the path.
    fn depth_source(&self, queue: &QueueName) -> String;
    /// Deletes everything this broker stored under its prefix: every queue, job, counter and
    /// key. Irreversible; for benchmarks and tests that own their prefix.
    async fn destroy(&self) -> Result<(), BrokerError>;
}

/// Tuning of one consumer; the defaults are the production defaults.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Unique name of the worker (appears in job history and in the broker's claims).
    pub worker: Arc<str>,
    /// Jobs held in memory beyond those running, fetched ahead in batches.
    pub prefetch: usize,
    /// How long a leased job stays invisible to others without a renewal; the holder renews
    /// every third of it, so a dead worker's jobs come back after at most this long.
    pub lease: Duration,
    /// Longest single blocking wait for new work; bounds how long shutdown waits for the fetcher.
    pub block: Duration,
    /// Counts attempts whose outcome the broker has recorded (shared by a process's workers).
    pub settled: crate::backend::SettledCount,
    /// The job history the attempts are recorded in. Settlements wait (up to [`HISTORY_WAIT`])
    /// until the attempts' events are written, so that a worker dying between the broker's
    /// acknowledgement and the history write cannot leave a job the broker has forgotten
    /// without its outcome in the history. A failing database is not waited for.
    pub history: Option<schema::history::HistoryWriter>,
    /// A job whose worker died while running it this many times goes to the dead set (error
    /// [`crate::job::quarantine_error`]) instead of being delivered again: a poison pill must
    /// not crash-loop the fleet. `DROVER_QUARANTINE_AFTER`, default 3.
    pub quarantine_after: u32,
}

/// Longest a batch of settlements waits for the history (see [`ConsumerConfig::history`]);
/// leases are renewed meanwhile.
pub const HISTORY_WAIT: Duration = Duration::from_secs(5);

/// Default of [`ConsumerConfig::quarantine_after`].
pub const QUARANTINE_AFTER: u32 = 3;

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            worker: format!("worker-{}", JobId::new()).into(),
            prefetch: 100,
            lease: Duration::from_secs(30),
            block: Duration::from_secs(1),
            settled: Default::default(),
            history: None,
            quarantine_after: QUARANTINE_AFTER,
        }
    }
}

/// What a worker's backend needs from a broker.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Leases up to `max` jobs to this worker, waiting up to `wait` for the first one.
    /// An empty vector means nothing arrived in time.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Job>, BrokerError>;
    /// Applies finished attempts: acknowledge, schedule the retry, or move to the dead set.
    async fn settle(&self, batch: &[Settlement]) -> Result<(), BrokerError>;
    /// Gives back leased jobs that were never started (shutdown), untouched.
    async fn release(&self, jobs: &[Job]) -> Result<(), BrokerError>;
    /// Extends the leases of jobs this worker still holds.
    async fn renew(&self, held: &[JobId]) -> Result<(), BrokerError>;
    /// Lets go of every held job as a worker that dies does: unsettled, unreleased. For tests
    /// and chaos drills of crash recovery; the driver is unusable afterwards. Redis and SQLite
    /// do nothing (held jobs come back when their leases run out); RabbitMQ closes the consumer
    /// channel, which sends its unacknowledged deliveries back as redelivered.
    async fn abandon(&self) {}
}

/// How to reach a broker besides its URL.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Namespace of every key / queue drover creates (`drover` → `drover:{noop}:pending`,
    /// AMQP queue `drover.noop`). Tests use a unique one each.
    pub prefix: String,
    /// Where brokers that cannot look jobs up themselves (AMQP) keep and read job state.
    pub db: sea_orm::DatabaseConnection,
    /// The kind of RabbitMQ queues to declare (`DROVER_AMQP_QUEUE_TYPE`); other brokers
    /// ignore it.
    pub amqp_queue_type: amqp::QueueType,
}

/// Connects to the broker named by `url`.
pub async fn connect(url: &str, opts: BrokerOptions) -> Result<Arc<dyn Producer>, BrokerError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    Ok(match scheme {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            Arc::new(redis::RedisBroker::connect(url, &opts.prefix).await?)
        }
        "amqp" | "amqps" => {
            Arc::new(amqp::AmqpBroker::connect(url, &opts.prefix, opts.db, opts.amqp_queue_type).await?)
        }
        "sqlite" => Arc::new(sqlite::SqliteBroker::connect(url, &opts.prefix).await?),
        _ => return Err(BrokerError::UnsupportedUrl(url.to_owned())),
    })
}
