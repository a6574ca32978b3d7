//! Queues: depth and totals per queue, from the broker's statistics; each queue's dead set;
//! a queue's jobs by state and every queue's per-minute activity, from the history database.

use chrono::{DateTime, Utc};
use jobs::{JobRecord, JobState, QueueName, QueueStats};
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use serde_json::Value;
use uuid::Uuid;

use super::{ApiTags, jobs::JobStatus};
use crate::{AppState, error::ApiError};

/// The longest window `GET /v1/activity` covers: one day of minutes.
const MAX_ACTIVITY_MINUTES: u32 = 1440;

pub(crate) struct QueuesApi {
    state: AppState,
}

impl QueuesApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Queues")]
impl QueuesApi {
    /// List queues
    ///
    /// Every queue the broker knows (the built-in ones always), with its depth and totals.
    #[oai(path = "/v1/queues", method = "get", operation_id = "listQueues")]
    async fn list(&self) -> Result<Json<QueueList>, ApiError> {
        let broker = &self.state.broker;
        let queues = broker.queues().await?;
        let stats = futures::future::try_join_all(queues.iter().map(|q| broker.stats(q))).await?;
        Ok(Json(QueueList {
            queues: stats.into_iter().map(QueueDetails::from).collect(),
        }))
    }

    /// Read one queue
    ///
    /// For KEDA's `metrics-api` scaler: `valueLocation: depth`. An invalid queue name answers
    /// 400 (`invalid-queue`), a valid one the broker has never seen 404.
    #[oai(path = "/v1/queues/:queue", method = "get", operation_id = "getQueue")]
    async fn get(&self, queue: Path<String>) -> Result<Json<QueueDetails>, ApiError> {
        let queue = self.known_queue(&queue).await?;
        Ok(Json(self.state.broker.stats(&queue).await?.into()))
    }

    /// List a queue's dead jobs
    ///
    /// Newest first, each with its last error (the attempt history is on `GET /v1/jobs/{id}`).
    /// `limit` is 1–1000 (default 50). On RabbitMQ the list is read from the dead queue
    /// itself, newest first among its oldest 10,000 messages. Role: viewer.
    #[oai(
        path = "/v1/queues/:queue/dead",
        method = "get",
        operation_id = "listDeadJobs"
    )]
    async fn dead(
        &self,
        queue: Path<String>,
        /// Dead jobs to skip, newest first.
        #[oai(default = "default_offset")]
        offset: Query<u64>,
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "1000"))
        )]
        limit: Query<u64>,
    ) -> Result<Json<DeadList>, ApiError> {
        let queue = self.known_queue(&queue).await?;
        let jobs = self.state.broker.dead(&queue, offset.0, limit.0).await?;
        Ok(Json(DeadList {
            queue: queue.to_string(),
            offset: offset.0,
            jobs: jobs.into_iter().map(DeadJob::from).collect(),
        }))
    }

    /// List a queue's jobs
    ///
    /// From the history database (which the workers write in batches, so a moment behind the
    /// broker): newest first, optionally only those in one `state`, with `total` the number of
    /// such jobs for paging. `limit` is 1–1000 (default 50). Role: viewer.
    #[oai(
        path = "/v1/queues/:queue/jobs",
        method = "get",
        operation_id = "listQueueJobs"
    )]
    async fn jobs(
        &self,
        queue: Path<String>,
        /// Only jobs in this state.
        state: Query<Option<JobStatus>>,
        /// Jobs to skip, newest first.
        #[oai(default = "default_offset")]
        offset: Query<u64>,
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "1000"))
        )]
        limit: Query<u64>,
    ) -> Result<Json<QueueJobList>, ApiError> {
        let queue = self.known_queue(&queue).await?;
        let status = state.0.map(|s| JobState::from(s).as_str());
        let db = &self.state.db;
        let (counts, rows) = futures::try_join!(
            schema::queries::count_by_status(db, queue.as_str()),
            schema::queries::list_jobs(db, Some(queue.as_str()), status, limit.0, offset.0),
        )?;
        let total = match status {
            Some(s) => counts.get(s).copied().unwrap_or_default(),
            None => counts.values().sum(),
        };
        Ok(Json(QueueJobList {
            queue: queue.to_string(),
            state: state.0,
            offset: offset.0,
            total,
            jobs: rows
                .into_iter()
                .map(JobSummary::try_from)
                .collect::<Result<_, _>>()?,
        }))
    }

    /// Activity per queue and minute
    ///
    /// Attempts finished in each of the last `minutes` minutes (default 60, at most 1440), per
    /// queue, from the attempt history: `succeeded`, and `failed` (failed, timed out, panicked
    /// or lost). Every minute of the window is present, oldest first, zeros included; the
    /// current minute is the last (and still counting). Role: viewer.
    #[oai(path = "/v1/activity", method = "get", operation_id = "queueActivity")]
    async fn activity(
        &self,
        #[oai(
            default = "default_activity_minutes",
            validator(minimum(value = "1"), maximum(value = "1440"))
        )]
        minutes: Query<u32>,
    ) -> Result<Json<Activity>, ApiError> {
        let minutes = minutes.0.clamp(1, MAX_ACTIVITY_MINUTES);
        let now_minute = Utc::now().timestamp().div_euclid(60);
        let first = now_minute - i64::from(minutes) + 1;
        let since = DateTime::from_timestamp(first * 60, 0).unwrap_or_default();
        let (queues, rows) = futures::join!(
            self.state.broker.queues(),
            schema::queries::activity_since(&self.state.db, since)
        );
        let (queues, rows) = (queues?, rows?);
        let mut names: Vec<String> = queues.iter().map(ToString::to_string).collect();
        names.extend(rows.iter().map(|r| r.queue.clone()));
        names.sort();
        names.dedup();
        let series = names
            .into_iter()
            .map(|queue| {
                let mut minutes_of_queue: Vec<MinuteCounts> = (first..=now_minute)
                    .map(|m| MinuteCounts {
                        minute: DateTime::from_timestamp(m * 60, 0).unwrap_or_default(),
                        succeeded: 0,
                        failed: 0,
                    })
                    .collect();
                for r in rows.iter().filter(|r| r.queue == queue) {
                    if let Some(slot) = usize::try_from(r.minute - first)
                        .ok()
                        .and_then(|i| minutes_of_queue.get_mut(i))
                    {
                        slot.succeeded += r.succeeded;
                        slot.failed += r.failed;
                    }
                }
                QueueActivity {
                    queue,
                    minutes: minutes_of_queue,
                }
            })
            .collect();
        Ok(Json(Activity {
            since,
            queues: series,
        }))
    }

    /// Retry a queue's whole dead set
    ///
    /// Every dead job of the queue goes back in line, due now, each with a fresh attempt
    /// budget (as `POST /v1/jobs/{id}/retry`). Answers how many. Role: operator.
    #[oai(
        path = "/v1/queues/:queue/dead/retry",
        method = "post",
        operation_id = "retryDeadJobs"
    )]
    async fn retry_dead(&self, queue: Path<String>) -> Result<Json<DeadSetChange>, ApiError> {
        let queue = self.known_queue(&queue).await?;
        let jobs = self.state.broker.retry_all_dead(&queue).await?;
        Ok(Json(DeadSetChange {
            queue: queue.to_string(),
            jobs,
        }))
    }

    /// Discard a queue's whole dead set
    ///
    /// Removes every dead job of the queue from the broker for good; their records and attempt
    /// history stay in the history database. Answers how many. Role: operator.
    #[oai(
        path = "/v1/queues/:queue/dead",
        method = "delete",
        operation_id = "discardDeadJobs"
    )]
    async fn discard_dead(&self, queue: Path<String>) -> Result<Json<DeadSetChange>, ApiError> {
        let queue = self.known_queue(&queue).await?;
        let jobs = self.state.broker.discard_all_dead(&queue).await?;
        Ok(Json(DeadSetChange {
            queue: queue.to_string(),
            jobs,
        }))
    }
}

impl QueuesApi {
    /// The queue named `name`: 400 if the name is invalid, 404 if the broker never saw it.
    async fn known_queue(&self, name: &str) -> Result<QueueName, ApiError> {
        let queue = QueueName::parse(name)?;
        if !self.state.broker.queues().await?.contains(&queue) {
            return Err(ApiError::NotFound(format!("no queue is named {queue:?}")));
        }
        Ok(queue)
    }
}

fn default_offset() -> u64 {
    0
}

fn default_limit() -> u64 {
    50
}

fn default_activity_minutes() -> u32 {
    60
}

/// A page of a queue's jobs, from the history database.
#[derive(Object)]
pub(crate) struct QueueJobList {
    queue: String,
    /// The state asked for; absent for every state.
    #[oai(skip_serializing_if_is_none)]
    state: Option<JobStatus>,
    offset: u64,
    /// Jobs of the queue (in `state`, if given) in the history database.
    total: u64,
    /// Newest first.
    jobs: Vec<JobSummary>,
}

/// A job as listings show it (the whole job, attempts included, is `GET /v1/jobs/{id}`).
#[derive(Object)]
pub(crate) struct JobSummary {
    id: Uuid,
    queue: String,
    kind: String,
    status: JobStatus,
    /// Attempts started so far.
    attempts: u32,
    max_attempts: u32,
    created_at: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    finished_at: Option<DateTime<Utc>>,
    #[oai(skip_serializing_if_is_none)]
    last_error: Option<String>,
}

impl TryFrom<schema::entity::job::Model> for JobSummary {
    type Error = ApiError;

    fn try_from(j: schema::entity::job::Model) -> Result<Self, ApiError> {
        let status = super::jobs::history_status(&j)?;
        Ok(Self {
            id: j.id,
            queue: j.queue,
            kind: j.kind,
            status: status.into(),
            attempts: u32::try_from(j.attempts).unwrap_or_default(),
            max_attempts: u32::try_from(j.max_attempts).unwrap_or_default(),
            created_at: j.created_at,
            finished_at: j.finished_at,
            last_error: j.last_error,
        })
    }
}

/// Finished attempts per queue and minute.
#[derive(Object)]
pub(crate) struct Activity {
    /// Start of the first minute.
    since: DateTime<Utc>,
    /// Every queue the broker knows, and any other that ran attempts in the window, by name.
    queues: Vec<QueueActivity>,
}

#[derive(Object)]
pub(crate) struct QueueActivity {
    queue: String,
    /// Every minute of the window, oldest first.
    minutes: Vec<MinuteCounts>,
}

#[derive(Object)]
pub(crate) struct MinuteCounts {
    /// Start of the minute.
    minute: DateTime<Utc>,
    /// Attempts that succeeded.
    succeeded: u64,
    /// Attempts that failed, timed out, panicked or were lost.
    failed: u64,
}

/// A page of a queue's dead set.
#[derive(Object)]
pub(crate) struct DeadList {
    queue: String,
    offset: u64,
    /// Newest first.
    jobs: Vec<DeadJob>,
}

/// A dead job as its broker keeps it.
#[derive(Object)]
pub(crate) struct DeadJob {
    id: Uuid,
    kind: String,
    /// Attempts made.
    attempts: u32,
    max_attempts: u32,
    priority: i32,
    #[oai(skip_serializing_if_is_none)]
    payload: Option<Value>,
    created_at: DateTime<Utc>,
    /// When it died.
    #[oai(skip_serializing_if_is_none)]
    finished_at: Option<DateTime<Utc>>,
    /// Why its last attempt failed (`quarantined: …` for a job that kept killing its workers).
    #[oai(skip_serializing_if_is_none)]
    last_error: Option<String>,
}

impl From<JobRecord> for DeadJob {
    fn from(r: JobRecord) -> Self {
        let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Self {
            id: r.id.0,
            kind: r.kind,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            priority: r.priority,
            payload: r.payload,
            created_at: at(r.created_at_ms),
            finished_at: r.finished_at_ms.map(at),
            last_error: r.last_error,
        }
    }
}

/// How many dead jobs an operation on a whole dead set took.
#[derive(Object)]
pub(crate) struct DeadSetChange {
    queue: String,
    /// Jobs retried or discarded.
    jobs: u64,
}

#[derive(Object)]
pub(crate) struct QueueList {
    queues: Vec<QueueDetails>,
}

/// One queue's counts.
#[derive(Object)]
pub(crate) struct QueueDetails {
    queue: String,
    /// Jobs due and waiting for a worker (what autoscaling reads).
    depth: u64,
    /// Jobs waiting for their `run_at` (delayed jobs and retries).
    scheduled: u64,
    /// Jobs a worker holds right now.
    running: u64,
    /// Jobs that failed for the last time.
    dead: u64,
    /// Jobs succeeded since the queue was created.
    done: u64,
    /// Failed attempts since the queue was created, retried or not.
    failed: u64,
}

impl From<QueueStats> for QueueDetails {
    fn from(s: QueueStats) -> Self {
        Self {
            queue: s.queue,
            depth: s.pending,
            scheduled: s.scheduled,
            running: s.running,
            dead: s.dead,
            done: s.done,
            failed: s.failed,
        }
    }
}
