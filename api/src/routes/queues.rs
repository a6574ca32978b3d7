//! Queues: depth and totals per queue, from the broker's statistics; each queue's dead set.

use chrono::{DateTime, Utc};
use jobs::{JobRecord, QueueName, QueueStats};
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use serde_json::Value;
use uuid::Uuid;

use super::ApiTags;
use crate::{AppState, error::ApiError};

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
