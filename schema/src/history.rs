//! What happens to a job, as events, and how a batch of them becomes rows.
//!
//! Events come from several processes (the API enqueues and cancels, workers start and finish)
//! that flush independently, so they reach the database in any order: a job's `Finished` may be
//! written before its `Enqueued`. [`apply_batch`] therefore upserts, and resolves each column by
//! a rule that gives the same row whatever the arrival order:
//!
//! - the job's state (status, worker, last error, started/finished times) follows the event with
//!   the latest time, tracked in `event_at`;
//! - what only the enqueue knows (payload, priority, idempotency key, creation time) is filled in
//!   whenever the enqueue arrives, and an enqueue never moves a job's status back, since a worker
//!   event for the job means it has already moved on (whatever the clocks of the two hosts say);
//! - `attempts` only grows.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::DbError;

/// The batch as one `INSERT … SELECT FROM unnest(…)` per table, arrays bound whole.
mod postgres;
/// The batch as multi-row `INSERT … VALUES` of a few fixed sizes.
mod sqlite;
mod writer;

pub use writer::{
    BatchSink, BatchTask, BatchWriter, HISTORY_DROPPED_EVENTS_TOTAL, HISTORY_LAG_EVENTS, HISTORY_LAG_SECONDS,
    HistoryConfig, HistoryTask, HistoryWriter, publish_metrics,
};

/// Something that happened to a job, stamped with when it happened (`at`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HistoryEvent {
    /// The API accepted the job.
    Enqueued {
        id: Uuid,
        queue: String,
        kind: String,
        payload: serde_json::Value,
        max_attempts: i32,
        priority: i32,
        idempotency_key: Option<String>,
        trace_id: Option<String>,
        /// When the job should run, if not immediately.
        run_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    },
    /// A worker began an attempt.
    Started {
        id: Uuid,
        queue: String,
        kind: String,
        attempt: i32,
        max_attempts: i32,
        worker_id: String,
        trace_id: Option<String>,
        at: DateTime<Utc>,
    },
    /// An attempt ended.
    Finished {
        id: Uuid,
        queue: String,
        kind: String,
        attempt: i32,
        max_attempts: i32,
        worker_id: String,
        trace_id: Option<String>,
        started_at: DateTime<Utc>,
        at: DateTime<Utc>,
        outcome: AttemptOutcome,
        error: Option<String>,
        /// The job's status after this attempt: succeeded, retrying or dead.
        status: JobState,
        /// When the retry is due, if `status` is retrying.
        next_run_at: Option<DateTime<Utc>>,
    },
    /// The job was canceled before it ran. Applies only to a job already recorded.
    Canceled { id: Uuid, at: DateTime<Utc> },
}

impl HistoryEvent {
    pub fn job_id(&self) -> Uuid {
        match self {
            HistoryEvent::Enqueued { id, .. }
            | HistoryEvent::Started { id, .. }
            | HistoryEvent::Finished { id, .. }
            | HistoryEvent::Canceled { id, .. } => *id,
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its `run_at`.
    Scheduled,
    /// Due, waiting for a worker.
    Pending,
    Running,
    Succeeded,
    /// An attempt failed and another one is due.
    Retrying,
    /// Failed for the last time, or with an error retrying cannot fix.
    Dead,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Retrying,
        JobState::Dead,
        JobState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Canceled => "canceled",
        }
    }

    /// Succeeded, dead and canceled jobs never change again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Dead | JobState::Canceled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownValue {
                what: "job state",
                value: s.to_owned(),
            })
    }
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    /// The handler returned an error.
    Failed,
    /// The handler ran past its timeout and was stopped.
    TimedOut,
    Panicked,
    /// The worker went away mid-attempt (its lease expired).
    Lost,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 5] = [
        AttemptOutcome::Succeeded,
        AttemptOutcome::Failed,
        AttemptOutcome::TimedOut,
        AttemptOutcome::Panicked,
        AttemptOutcome::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::TimedOut => "timed_out",
            AttemptOutcome::Panicked => "panicked",
            AttemptOutcome::Lost => "lost",
        }
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptOutcome {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttemptOutcome::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == s)
            .ok_or_else(|| UnknownValue {
                what: "attempt outcome",
                value: s.to_owned(),
            })
    }
}

/// A string that names no [`JobState`] or [`AttemptOutcome`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a known {what}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
}

/// Writes a batch of events in one transaction of its own, in any order relative to other
/// batches (see the module docs for how conflicts resolve).
///
/// The statements' text is fixed, so each is parsed and planned once per connection; the events'
/// values are bound directly, never built into a query tree.
#[tracing::instrument(skip_all, fields(events = events.len()))]
pub async fn apply_batch(db: &DatabaseConnection, events: &[HistoryEvent]) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    let batch = Batch::plan(events);
    let written = match db.get_database_backend() {
        DbBackend::Postgres => postgres::write(db.get_postgres_connection_pool(), &batch).await,
        DbBackend::Sqlite => sqlite::write(db.get_sqlite_connection_pool(), &batch).await,
        backend => {
            return Err(DbErr::BackendNotSupported {
                db: backend.as_str(),
                ctx: "job history",
            }
            .into());
        }
    };
    written.map_err(|error| DbErr::Exec(RuntimeErr::SqlxError(Arc::new(error))).into())
}

/// The rows a batch writes, per table, in the order they are written. Each table's rows are split
/// into rounds in which a key appears at most once (Postgres refuses an ON CONFLICT DO UPDATE
/// that touches a row twice): a key's next event goes to the next round, keeping the batch order.
struct Batch<'a> {
    enqueues: Vec<Vec<Enqueue<'a>>>,
    progress: Vec<Vec<Progress<'a>>>,
    /// After the inserts, so that a job enqueued and canceled within one batch ends canceled.
    cancels: Vec<Cancel>,
    /// Last: `job_attempt` has a foreign key to `job`.
    attempts: Vec<Vec<Attempt<'a>>>,
}

impl<'a> Batch<'a> {
    fn plan(events: &'a [HistoryEvent]) -> Batch<'a> {
        // An attempt that started and finished within the batch needs only its `Finished`: it
        // carries everything the `Started` would write, and is newer. For short jobs this halves
        // the rows written.
        let finished: HashSet<(Uuid, i32)> = events
            .iter()
            .filter_map(|e| match e {
                HistoryEvent::Finished { id, attempt, .. } => Some((*id, *attempt)),
                _ => None,
            })
            .collect();
        let mut enqueues = Vec::new();
        let mut progress = Vec::with_capacity(events.len());
        let mut attempts = Vec::with_capacity(events.len());
        let mut cancels = Vec::new();
        for event in events {
            match event {
                HistoryEvent::Started { id, attempt, .. } if finished.contains(&(*id, *attempt)) => {}
                HistoryEvent::Enqueued {
                    id,
                    queue,
                    kind,
                    payload,
                    max_attempts,
                    priority,
                    idempotency_key,
                    trace_id,
                    run_at,
                    at,
                } => enqueues.push(Enqueue {
                    id: *id,
                    queue,
                    kind,
                    status: match run_at {
                        Some(run_at) if run_at > at => JobState::Scheduled,
                        _ => JobState::Pending,
                    },
                    max_attempts: *max_attempts,
                    payload,
                    priority: *priority,
                    idempotency_key: idempotency_key.as_deref(),
                    trace_id: trace_id.as_deref(),
                    run_at: *run_at,
                    at: *at,
                }),
                HistoryEvent::Started {
                    id,
                    queue,
                    kind,
                    attempt,
                    max_attempts,
                    worker_id,
                    trace_id,
                    at,
                } => {
                    progress.push(Progress {
                        id: *id,
                        queue,
                        kind,
                        status: JobState::Running,
                        attempt: *attempt,
                        max_attempts: *max_attempts,
                        worker_id,
                        trace_id: trace_id.as_deref(),
                        last_error: None,
                        run_at: None,
                        started_at: *at,
                        finished_at: None,
                        event_at: *at,
                    });
                    attempts.push(Attempt {
                        job_id: *id,
                        attempt: *attempt,
                        worker_id,
                        started_at: *at,
                        finished_at: None,
                        outcome: None,
                        error: None,
                        trace_id: trace_id.as_deref(),
                    });
                }
                HistoryEvent::Finished {
                    id,
                    queue,
                    kind,
                    attempt,
                    max_attempts,
                    worker_id,
                    trace_id,
                    started_at,
                    at,
                    outcome,
                    error,
                    status,
                    next_run_at,
                } => {
                    progress.push(Progress {
                        id: *id,
                        queue,
                        kind,
                        status: *status,
                        attempt: *attempt,
                        max_attempts: *max_attempts,
                        worker_id,
                        trace_id: trace_id.as_deref(),
                        last_error: error.as_deref(),
                        run_at: *next_run_at,
                        started_at: *started_at,
                        finished_at: status.is_final().then_some(*at),
                        event_at: *at,
                    });
                    attempts.push(Attempt {
                        job_id: *id,
                        attempt: *attempt,
                        worker_id,
                        started_at: *started_at,
                        finished_at: Some(*at),
                        outcome: Some(*outcome),
                        error: error.as_deref(),
                        trace_id: trace_id.as_deref(),
                    });
                }
                HistoryEvent::Canceled { id, at } => cancels.push(Cancel { id: *id, at: *at }),
            }
        }
        Batch {
            enqueues: rounds(enqueues, |row| row.id),
            progress: rounds(progress, |row| row.id),
            cancels,
            attempts: rounds(attempts, |row| (row.job_id, row.attempt)),
        }
    }
}

/// What the API's `Enqueued` says about the job row. Its time is both the job's creation time
/// and the row's `event_at`.
struct Enqueue<'a> {
    id: Uuid,
    queue: &'a str,
    kind: &'a str,
    /// Scheduled if it runs later, else pending.
    status: JobState,
    max_attempts: i32,
    payload: &'a serde_json::Value,
    priority: i32,
    idempotency_key: Option<&'a str>,
    trace_id: Option<&'a str>,
    run_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
}

impl Enqueue<'_> {
    /// The `job` columns an enqueue inserts, in the order both backends bind them.
    const COLUMNS: &'static str = "id, queue, kind, status, max_attempts, payload, priority, \
        idempotency_key, trace_id, created_at, run_at, event_at";

    /// The enqueue is the only source of payload, priority and idempotency key, and the earliest
    /// event of a job. It leaves the status alone: if the row exists, a worker already moved it on.
    /// A row a worker created carries the attempt's start as its creation time, hence the least.
    fn on_conflict(sql: Dialect) -> String {
        let least = sql.least;
        format!(
            "ON CONFLICT (id) DO UPDATE SET \
             payload = COALESCE(job.payload, excluded.payload), \
             priority = excluded.priority, \
             idempotency_key = COALESCE(job.idempotency_key, excluded.idempotency_key), \
             max_attempts = excluded.max_attempts, \
             trace_id = COALESCE(excluded.trace_id, job.trace_id), \
             run_at = COALESCE(job.run_at, excluded.run_at), \
             created_at = {least}(job.created_at, excluded.created_at)"
        )
    }
}

/// What a worker's `Started` or `Finished` says about the job row. Until the enqueue arrives,
/// the job is known from its first attempt: `started_at` is also written as its creation time.
struct Progress<'a> {
    id: Uuid,
    queue: &'a str,
    kind: &'a str,
    status: JobState,
    attempt: i32,
    max_attempts: i32,
    worker_id: &'a str,
    trace_id: Option<&'a str>,
    last_error: Option<&'a str>,
    run_at: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    event_at: DateTime<Utc>,
}

impl Progress<'_> {
    /// The `job` columns a worker event inserts, in the order both backends bind them.
    const COLUMNS: &'static str = "id, queue, kind, status, attempts, max_attempts, worker_id, \
        trace_id, last_error, created_at, run_at, started_at, finished_at, event_at";

    /// The job's state follows the latest event; `attempts` only grows. A starting retry keeps
    /// showing why the previous attempt failed. Every expression reads the row as it was before
    /// the statement, so their order is free.
    fn on_conflict(sql: Dialect) -> String {
        let greatest = sql.greatest;
        let is_newer = "excluded.event_at >= job.event_at";
        let latest =
            |col: &str| format!("{col} = CASE WHEN {is_newer} THEN excluded.{col} ELSE job.{col} END");
        format!(
            "ON CONFLICT (id) DO UPDATE SET \
             {status}, {worker_id}, {started_at}, {finished_at}, \
             last_error = CASE WHEN {is_newer} AND excluded.status <> '{running}' \
                 THEN excluded.last_error ELSE job.last_error END, \
             run_at = CASE WHEN {is_newer} THEN COALESCE(excluded.run_at, job.run_at) ELSE job.run_at END, \
             attempts = {greatest}(job.attempts, excluded.attempts), \
             trace_id = COALESCE(job.trace_id, excluded.trace_id), \
             event_at = {greatest}(job.event_at, excluded.event_at)",
            status = latest("status"),
            worker_id = latest("worker_id"),
            started_at = latest("started_at"),
            finished_at = latest("finished_at"),
            running = JobState::Running.as_str(),
        )
    }
}

/// A cancellation applies to a recorded job that has not finished and has seen nothing later.
struct Cancel {
    id: Uuid,
    at: DateTime<Utc>,
}

impl Cancel {
    /// The statement, given the placeholders (in the backend's syntax) of the job id and the
    /// cancel's time.
    fn update(id: &str, at: &str) -> String {
        let finals: Vec<String> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| format!("'{s}'"))
            .collect();
        format!(
            "UPDATE job SET status = '{canceled}', finished_at = {at}, event_at = {at} \
             WHERE id = {id} AND event_at <= {at} AND status NOT IN ({finals})",
            canceled = JobState::Canceled.as_str(),
            finals = finals.join(", "),
        )
    }
}

/// One attempt as a `Started` or `Finished` event describes it.
struct Attempt<'a> {
    job_id: Uuid,
    attempt: i32,
    worker_id: &'a str,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    outcome: Option<AttemptOutcome>,
    error: Option<&'a str>,
    trace_id: Option<&'a str>,
}

impl Attempt<'_> {
    /// The `job_attempt` columns, in the order both backends bind them.
    const COLUMNS: &'static str =
        "job_id, attempt, worker_id, started_at, finished_at, outcome, error, trace_id";

    /// A `Finished` completes the attempt whether or not its `Started` was written first.
    fn on_conflict() -> &'static str {
        "ON CONFLICT (job_id, attempt) DO UPDATE SET \
         worker_id = COALESCE(excluded.worker_id, job_attempt.worker_id), \
         finished_at = COALESCE(excluded.finished_at, job_attempt.finished_at), \
         outcome = COALESCE(excluded.outcome, job_attempt.outcome), \
         error = CASE WHEN excluded.outcome IS NULL THEN job_attempt.error ELSE excluded.error END, \
         trace_id = COALESCE(job_attempt.trace_id, excluded.trace_id)"
    }
}

/// What differs between the backends in the statements' rules.
#[derive(Clone, Copy)]
struct Dialect {
    /// Two-argument maximum: `GREATEST` on Postgres, the scalar `MAX` on SQLite.
    greatest: &'static str,
    /// Two-argument minimum: `LEAST` on Postgres, the scalar `MIN` on SQLite.
    least: &'static str,
}

/// Splits rows into rounds in which each key appears at most once, keeping each key's rows in
/// their original order.
fn rounds<T, K: Hash + Eq>(rows: Vec<T>, key: impl Fn(&T) -> K) -> Vec<Vec<T>> {
    let len = rows.len();
    let mut seen: HashMap<K, usize> = HashMap::with_capacity(len);
    let mut rounds: Vec<Vec<T>> = Vec::new();
    for row in rows {
        let round = seen.entry(key(&row)).or_insert(0);
        if rounds.len() <= *round {
            // Most batches have one round holding every row.
            let capacity = if rounds.is_empty() { len } else { 0 };
            rounds.push(Vec::with_capacity(capacity));
        }
        rounds[*round].push(row);
        *round += 1;
    }
    rounds
}
