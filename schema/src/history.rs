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

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{
    Expr, ExprTrait, Func, InsertStatement, IntoIden, IntoTableRef, OnConflict, Query, UpdateStatement,
};
use sea_orm::{ConnectionTrait, TransactionSession, TransactionTrait};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::DbError;
use crate::entity::{job, job_attempt};

mod writer;

pub use writer::{HistoryConfig, HistoryTask, HistoryWriter};

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

/// Rows per statement. SQLite allows 32 766 bound parameters; the widest row here binds 14.
const ROWS_PER_STATEMENT: usize = 500;

/// Writes a batch of events in one transaction, in any order relative to other batches (see the
/// module docs for how conflicts resolve). Pass a connection or an open transaction.
#[tracing::instrument(skip_all, fields(events = events.len()))]
pub async fn apply_batch(db: &impl TransactionTrait, events: &[HistoryEvent]) -> Result<(), DbError> {
    if events.is_empty() {
        return Ok(());
    }
    // An attempt that started and finished within the batch needs only its `Finished`: it
    // carries everything the `Started` would write, and is newer. For short jobs this halves
    // the rows written.
    let finished: std::collections::HashSet<(Uuid, i32)> = events
        .iter()
        .filter_map(|e| match e {
            HistoryEvent::Finished { id, attempt, .. } => Some((*id, *attempt)),
            _ => None,
        })
        .collect();
    let mut enqueued = Vec::new();
    let mut progress = Vec::with_capacity(events.len());
    let mut attempts = Vec::with_capacity(events.len());
    let mut canceled = Vec::new();
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
            } => enqueued.push(
                Enqueue {
                    id: *id,
                    queue,
                    kind,
                    payload,
                    max_attempts: *max_attempts,
                    priority: *priority,
                    idempotency_key,
                    trace_id,
                    run_at: *run_at,
                    at: *at,
                }
                .into_row(),
            ),
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
                progress.push(
                    Progress {
                        id: *id,
                        queue,
                        kind,
                        status: JobState::Running,
                        attempt: *attempt,
                        max_attempts: *max_attempts,
                        worker_id,
                        trace_id,
                        last_error: None,
                        run_at: None,
                        started_at: *at,
                        finished_at: None,
                        event_at: *at,
                    }
                    .into_row(),
                );
                attempts.push(
                    Attempt {
                        job_id: *id,
                        attempt: *attempt,
                        worker_id,
                        started_at: *at,
                        finished_at: None,
                        outcome: None,
                        error: None,
                        trace_id,
                    }
                    .into_row(),
                );
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
                progress.push(
                    Progress {
                        id: *id,
                        queue,
                        kind,
                        status: *status,
                        attempt: *attempt,
                        max_attempts: *max_attempts,
                        worker_id,
                        trace_id,
                        last_error: error.as_ref(),
                        run_at: *next_run_at,
                        started_at: *started_at,
                        finished_at: status.is_final().then_some(*at),
                        event_at: *at,
                    }
                    .into_row(),
                );
                attempts.push(
                    Attempt {
                        job_id: *id,
                        attempt: *attempt,
                        worker_id,
                        started_at: *started_at,
                        finished_at: Some(*at),
                        outcome: Some(*outcome),
                        error: error.as_ref(),
                        trace_id,
                    }
                    .into_row(),
                );
            }
            HistoryEvent::Canceled { id, at } => canceled.push(cancel(*id, *at)),
        }
    }

    let txn = db.begin().await?;
    for stmt in upserts(job::Entity, &Enqueue::COLUMNS, enqueued, &enqueued_conflict()) {
        txn.execute(&stmt).await?;
    }
    for stmt in upserts(job::Entity, &Progress::COLUMNS, progress, &progress_conflict()) {
        txn.execute(&stmt).await?;
    }
    // After the inserts, so that a job enqueued and canceled within one batch ends canceled.
    for stmt in &canceled {
        txn.execute(stmt).await?;
    }
    // Last: `job_attempt` has a foreign key to `job`.
    for stmt in upserts(
        job_attempt::Entity,
        &Attempt::COLUMNS,
        attempts,
        &attempt_conflict(),
    ) {
        txn.execute(&stmt).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// One row of a multi-row INSERT, keyed by what its ON CONFLICT matches on.
type Row<K> = (K, Vec<Expr>);

/// What the API's `Enqueued` says about the job row.
struct Enqueue<'a> {
    id: Uuid,
    queue: &'a str,
    kind: &'a str,
    payload: &'a serde_json::Value,
    max_attempts: i32,
    priority: i32,
    idempotency_key: &'a Option<String>,
    trace_id: &'a Option<String>,
    run_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
}

impl Enqueue<'_> {
    const COLUMNS: [job::Column; 12] = [
        job::Column::Id,
        job::Column::Queue,
        job::Column::Kind,
        job::Column::Status,
        job::Column::MaxAttempts,
        job::Column::Payload,
        job::Column::Priority,
        job::Column::IdempotencyKey,
        job::Column::TraceId,
        job::Column::CreatedAt,
        job::Column::RunAt,
        job::Column::EventAt,
    ];

    fn into_row(self) -> Row<Uuid> {
        let status = match self.run_at {
            Some(run_at) if run_at > self.at => JobState::Scheduled,
            _ => JobState::Pending,
        };
        let values = vec![
            self.id.into(),
            self.queue.into(),
            self.kind.into(),
            status.as_str().into(),
            self.max_attempts.into(),
            self.payload.clone().into(),
            self.priority.into(),
            self.idempotency_key.clone().into(),
            self.trace_id.clone().into(),
            self.at.into(),
            self.run_at.into(),
            self.at.into(),
        ];
        (self.id, values)
    }
}

/// The enqueue is the only source of payload, priority and idempotency key, and the earliest
/// event of a job. It leaves the status alone: if the row exists, a worker already moved it on.
fn enqueued_conflict() -> OnConflict {
    use job::Column::*;
    OnConflict::column(Id)
        .values([
            (Payload, coalesce(current(Payload), excluded(Payload))),
            (Priority, excluded(Priority)),
            (
                IdempotencyKey,
                coalesce(current(IdempotencyKey), excluded(IdempotencyKey)),
            ),
            (MaxAttempts, excluded(MaxAttempts)),
            (TraceId, coalesce(excluded(TraceId), current(TraceId))),
            (RunAt, coalesce(current(RunAt), excluded(RunAt))),
            // A row a worker created carries the attempt's start as its creation time.
            (CreatedAt, least(current(CreatedAt), excluded(CreatedAt))),
        ])
        .to_owned()
}

/// What a worker's `Started` or `Finished` says about the job row.
struct Progress<'a> {
    id: Uuid,
    queue: &'a str,
    kind: &'a str,
    status: JobState,
    attempt: i32,
    max_attempts: i32,
    worker_id: &'a str,
    trace_id: &'a Option<String>,
    last_error: Option<&'a String>,
    run_at: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    event_at: DateTime<Utc>,
}

impl Progress<'_> {
    const COLUMNS: [job::Column; 14] = [
        job::Column::Id,
        job::Column::Queue,
        job::Column::Kind,
        job::Column::Status,
        job::Column::Attempts,
        job::Column::MaxAttempts,
        job::Column::WorkerId,
        job::Column::TraceId,
        job::Column::LastError,
        job::Column::CreatedAt,
        job::Column::RunAt,
        job::Column::StartedAt,
        job::Column::FinishedAt,
        job::Column::EventAt,
    ];

    fn into_row(self) -> Row<Uuid> {
        let values = vec![
            self.id.into(),
            self.queue.into(),
            self.kind.into(),
            self.status.as_str().into(),
            self.attempt.into(),
            self.max_attempts.into(),
            self.worker_id.into(),
            self.trace_id.clone().into(),
            self.last_error.cloned().into(),
            // Until the enqueue arrives, the job is known from its first attempt.
            self.started_at.into(),
            self.run_at.into(),
            self.started_at.into(),
            self.finished_at.into(),
            self.event_at.into(),
        ];
        (self.id, values)
    }
}

/// The job's state follows the latest event; `attempts` only grows.
fn progress_conflict() -> OnConflict {
    use job::Column::*;
    let latest =
        |col: job::Column| -> Expr { Expr::case(is_newer(), excluded(col)).finally(current(col)).into() };
    // A starting retry keeps showing why the previous attempt failed.
    let last_error = Expr::case(
        is_newer().and(excluded(Status).ne(JobState::Running.as_str())),
        excluded(LastError),
    )
    .finally(current(LastError));
    let run_at = Expr::case(is_newer(), coalesce(excluded(RunAt), current(RunAt))).finally(current(RunAt));
    // Every expression reads the row as it was before the statement, so their order is free.
    OnConflict::column(Id)
        .values([
            (Status, latest(Status)),
            (WorkerId, latest(WorkerId)),
            (StartedAt, latest(StartedAt)),
            (FinishedAt, latest(FinishedAt)),
            (LastError, last_error.into()),
            (RunAt, run_at.into()),
            (Attempts, greatest(current(Attempts), excluded(Attempts))),
            (TraceId, coalesce(current(TraceId), excluded(TraceId))),
            (EventAt, greatest(current(EventAt), excluded(EventAt))),
        ])
        .to_owned()
}

/// A cancellation applies to a recorded job that has not finished and has seen nothing later.
fn cancel(id: Uuid, at: DateTime<Utc>) -> UpdateStatement {
    use job::Column::*;
    Query::update()
        .table(job::Entity)
        .values([
            (Status, JobState::Canceled.as_str().into()),
            (FinishedAt, at.into()),
            (EventAt, at.into()),
        ])
        .and_where(Expr::col(Id).eq(id))
        .and_where(Expr::col(EventAt).lte(at))
        .and_where(
            Expr::col(Status).is_not_in(
                JobState::ALL
                    .into_iter()
                    .filter(|s| s.is_final())
                    .map(JobState::as_str),
            ),
        )
        .to_owned()
}

/// One attempt as a `Started` or `Finished` event describes it.
struct Attempt<'a> {
    job_id: Uuid,
    attempt: i32,
    worker_id: &'a str,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    outcome: Option<AttemptOutcome>,
    error: Option<&'a String>,
    trace_id: &'a Option<String>,
}

impl Attempt<'_> {
    const COLUMNS: [job_attempt::Column; 8] = [
        job_attempt::Column::JobId,
        job_attempt::Column::Attempt,
        job_attempt::Column::WorkerId,
        job_attempt::Column::StartedAt,
        job_attempt::Column::FinishedAt,
        job_attempt::Column::Outcome,
        job_attempt::Column::Error,
        job_attempt::Column::TraceId,
    ];

    fn into_row(self) -> Row<(Uuid, i32)> {
        let values = vec![
            self.job_id.into(),
            self.attempt.into(),
            self.worker_id.into(),
            self.started_at.into(),
            self.finished_at.into(),
            self.outcome.map(AttemptOutcome::as_str).into(),
            self.error.cloned().into(),
            self.trace_id.clone().into(),
        ];
        ((self.job_id, self.attempt), values)
    }
}

/// A `Finished` completes the attempt whether or not its `Started` was written first.
fn attempt_conflict() -> OnConflict {
    use job_attempt::Column::*;
    let attempt = |col: job_attempt::Column| Expr::col((job_attempt::Entity, col));
    let error = Expr::case(excluded(Outcome).is_null(), attempt(Error)).finally(excluded(Error));
    OnConflict::columns([JobId, Attempt])
        .values([
            (WorkerId, coalesce(excluded(WorkerId), attempt(WorkerId))),
            (FinishedAt, coalesce(excluded(FinishedAt), attempt(FinishedAt))),
            (Outcome, coalesce(excluded(Outcome), attempt(Outcome))),
            (Error, error.into()),
            (TraceId, coalesce(attempt(TraceId), excluded(TraceId))),
        ])
        .to_owned()
}

/// Whether the incoming row's event is at least as recent as the one the stored row reflects.
fn is_newer() -> Expr {
    excluded(job::Column::EventAt).gte(current(job::Column::EventAt))
}

/// The stored `job` row's value, as it was before this statement.
fn current(col: job::Column) -> Expr {
    Expr::col((job::Entity, col))
}

/// The value the INSERT proposed for the conflicting row.
fn excluded(col: impl IntoIden) -> Expr {
    Expr::col(("excluded", col))
}

fn coalesce(first: Expr, then: Expr) -> Expr {
    Func::coalesce([first, then]).into()
}

/// `GREATEST` on Postgres, `MAX` on SQLite.
fn greatest(a: Expr, b: Expr) -> Expr {
    Func::greatest([a, b]).into()
}

/// `LEAST` on Postgres, `MIN` on SQLite.
fn least(a: Expr, b: Expr) -> Expr {
    Func::least([a, b]).into()
}

/// Multi-row upserts of `rows`, at most [`ROWS_PER_STATEMENT`] each. A key never appears twice
/// in one statement (Postgres refuses an ON CONFLICT DO UPDATE that touches a row twice): its
/// next event goes to a later statement, keeping the batch order.
fn upserts<K: Hash + Eq, C: IntoIden + Copy>(
    table: impl IntoTableRef + Copy,
    columns: &[C],
    rows: Vec<Row<K>>,
    on_conflict: &OnConflict,
) -> Vec<InsertStatement> {
    rounds(rows)
        .into_iter()
        .flat_map(|round| {
            let mut round = round.into_iter().peekable();
            std::iter::from_fn(move || {
                round.peek()?;
                let mut statement = Query::insert();
                statement
                    .into_table(table)
                    .columns(columns.iter().copied())
                    .on_conflict(on_conflict.clone());
                for values in round.by_ref().take(ROWS_PER_STATEMENT) {
                    statement.values_panic(values);
                }
                Some(statement)
            })
        })
        .collect()
}

/// Splits rows into rounds in which each key appears at most once, keeping each key's rows in
/// their original order.
fn rounds<K: Hash + Eq>(rows: Vec<Row<K>>) -> Vec<Vec<Vec<Expr>>> {
    let mut seen: HashMap<K, usize> = HashMap::new();
    let mut rounds: Vec<Vec<Vec<Expr>>> = Vec::new();
    for (key, values) in rows {
        let round = seen.entry(key).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(values);
        *round += 1;
    }
    rounds
}
