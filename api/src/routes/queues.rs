//! Queues: depth and totals per queue, from the broker's statistics.

use jobs::{QueueName, QueueStats};
use poem_openapi::{Object, OpenApi, param::Path, payload::Json};

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
        let queue = QueueName::parse(&queue)?;
        let broker = &self.state.broker;
        if !broker.queues().await?.contains(&queue) {
            return Err(ApiError::NotFound(format!("no queue is named {queue:?}")));
        }
        Ok(Json(broker.stats(&queue).await?.into()))
    }
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
