//! Workers: the worker processes of the whole deployment, from the heartbeats they record in
//! the database (so every API replica lists the same ones).

use chrono::{DateTime, Utc};
use poem_openapi::{Object, OpenApi, payload::Json};

use super::ApiTags;
use crate::{AppState, error::ApiError};

pub(crate) struct WorkersApi {
    state: AppState,
}

impl WorkersApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Workers")]
impl WorkersApi {
    /// List workers
    ///
    /// Every worker process whose latest heartbeat is recent (workers beat every 5 s; one
    /// silent for 30 s is gone and not listed), by id. Role: viewer.
    #[oai(path = "/v1/workers", method = "get", operation_id = "listWorkers")]
    async fn list(&self) -> Result<Json<WorkerList>, ApiError> {
        let since =
            Utc::now() - chrono::Duration::from_std(schema::workers::EXPIRE_AFTER).unwrap_or_default();
        let rows = schema::workers::live(&self.state.db, since).await?;
        Ok(Json(WorkerList {
            workers: rows
                .into_iter()
                .map(|r| WorkerDetails {
                    queues: schema::workers::queues_of(&r),
                    id: r.id,
                    host: r.host,
                    concurrency: u32::try_from(r.concurrency).unwrap_or_default(),
                    started_at: r.started_at,
                    last_heartbeat_at: r.heartbeat_at,
                })
                .collect(),
        }))
    }
}

#[derive(Object)]
pub(crate) struct WorkerList {
    workers: Vec<WorkerDetails>,
}

/// One worker process.
#[derive(Object)]
pub(crate) struct WorkerDetails {
    /// The process's worker name (`<host>-<pid>-<suffix>` unless configured).
    id: String,
    /// The host (pod) it runs on.
    host: String,
    /// The queues it consumes.
    queues: Vec<String>,
    /// Attempts it runs at once, per queue.
    concurrency: u32,
    started_at: DateTime<Utc>,
    last_heartbeat_at: DateTime<Utc>,
}
