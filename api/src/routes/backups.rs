//! Backups: the catalog of backups the workers took, and enqueueing one now.

use chrono::{DateTime, Utc};
use jobs::families::backup::{self as family, Source};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use schema::backups::{self as catalog, BackupStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiTags;
use crate::{
    ApiConfig, AppState,
    enqueue::{self, Context},
    error::{ApiError, FieldError, ProblemType},
    payload::{BodySchema, JsonBody},
    trace,
};

/// Most backups one `GET /v1/backups` returns.
const MAX_LIMIT: u64 = 1_000;

pub(crate) struct BackupsApi {
    state: AppState,
}

impl BackupsApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Backups")]
impl BackupsApi {
    /// List backups
    ///
    /// Newest first, optionally only those of one source, target or status (`running`,
    /// `succeeded`, `failed`, `corrupt`).
    #[oai(path = "/v1/backups", method = "get", operation_id = "listBackups")]
    async fn list(
        &self,
        source: Query<Option<String>>,
        target: Query<Option<String>>,
        status: Query<Option<String>>,
        /// At most this many (default 100, at most 1000).
        limit: Query<Option<u64>>,
    ) -> Result<Json<BackupList>, ApiError> {
        let mut errors = Vec::new();
        if let Some(s) = source.0.as_deref()
            && Source::parse(s).is_none()
        {
            errors.push(FieldError::new(
                ProblemType::InvalidField,
                "source",
                "must be postgres, files or config",
            ));
        }
        let status = match status.0.as_deref() {
            None => None,
            Some(s) => match BackupStatus::parse(s) {
                Some(st) => Some(st),
                None => {
                    errors.push(FieldError::new(
                        ProblemType::InvalidField,
                        "status",
                        "must be running, succeeded, failed or corrupt",
                    ));
                    None
                }
            },
        };
        let limit = limit.0.unwrap_or(100);
        if limit == 0 || limit > MAX_LIMIT {
            errors.push(FieldError::new(
                ProblemType::InvalidField,
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            ));
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid { errors, batch: false });
        }
        let filter = catalog::Filter {
            source: source.0.as_deref(),
            target: target.0.as_deref(),
            status,
        };
        let rows = catalog::list(&self.state.db, filter, limit, 0).await?;
        Ok(Json(BackupList {
            backups: rows.into_iter().map(BackupView::from).collect(),
        }))
    }

    /// Read one backup
    #[oai(path = "/v1/backups/:id", method = "get", operation_id = "getBackup")]
    async fn get(&self, id: Path<String>) -> Result<Json<BackupView>, ApiError> {
        let uuid = Uuid::try_parse(&id).map_err(|_| ApiError::InvalidJobId(id.0.clone()))?;
        match catalog::get(&self.state.db, uuid).await? {
            Some(row) => Ok(Json(row.into())),
            None => Err(ApiError::NotFound(format!("no backup has id {uuid}"))),
        }
    }

    /// Take a backup now
    ///
    /// Enqueues a `backup.run` job for one configured target. The job's id is the backup's id:
    /// follow the job at `status_url`, the backup at `backup_url`.
    #[oai(path = "/v1/backups", method = "post", operation_id = "enqueueBackup")]
    async fn enqueue(
        &self,
        body: JsonBody<BackupRequest>,
        /// W3C trace context of the caller.
        traceparent: poem_openapi::param::Header<Option<String>>,
    ) -> Result<BackupResponse, ApiError> {
        let traceparent = trace::request_traceparent(traceparent.0.as_deref());
        let cx = Context {
            catalog: &self.state.catalog,
            now_ms: jobs::job::now_ms(),
            traceparent: &traceparent,
        };
        let payload = body.value()?;
        let request = json!({"kind": family::RUN, "payload": &payload});
        let prepared = enqueue::single(request, &cx).map_err(|errors| ApiError::Invalid {
            errors: errors.into_iter().map(body_field).collect(),
            batch: false,
        })?;
        if let Some(known) = &self.state.backup_targets {
            // Validated above: both are strings.
            let source = payload["source"].as_str().unwrap_or_default();
            let target = payload["target"].as_str().unwrap_or_default();
            if !known.iter().any(|(s, t)| s.as_str() == source && t == target) {
                let names: Vec<&str> = known
                    .iter()
                    .filter(|(s, _)| s.as_str() == source)
                    .map(|(_, t)| t.as_str())
                    .collect();
                return Err(ApiError::Invalid {
                    errors: vec![FieldError::new(
                        ProblemType::InvalidField,
                        "target",
                        format!(
                            "no {source} target is named {target:?} (configured: {})",
                            if names.is_empty() {
                                "none".to_owned()
                            } else {
                                names.join(", ")
                            }
                        ),
                    )],
                    batch: false,
                });
            }
        }
        let enqueued = super::jobs::push(&self.state, prepared).await?;
        let status_url = format!("/v1/jobs/{}", enqueued.id);
        Ok(BackupResponse::Accepted(
            Json(BackupAccepted {
                id: enqueued.id.0,
                status_url: status_url.clone(),
                backup_url: format!("/v1/backups/{}", enqueued.id),
            }),
            status_url,
        ))
    }
}

/// The enqueue validator names payload fields `payload.x`; here the payload is the body.
fn body_field(mut e: FieldError) -> FieldError {
    e.field = match e.field.strip_prefix("payload.") {
        Some(f) => f.to_owned(),
        None if e.field == "payload" => "body".to_owned(),
        None => e.field,
    };
    e
}

/// A backup to take now.
#[derive(Object)]
pub(crate) struct BackupRequest {
    /// `postgres`, `files` or `config`.
    source: String,
    /// A configured target of that source (`drover` for drover's own database and config).
    target: String,
}

impl BodySchema for BackupRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_body_bytes
    }
}

#[derive(Object)]
pub(crate) struct BackupAccepted {
    /// The backup's id, which is also its job's.
    id: Uuid,
    status_url: String,
    backup_url: String,
}

#[derive(ApiResponse)]
pub(crate) enum BackupResponse {
    /// Enqueued; `Location` is the job's status URL.
    #[oai(status = 202)]
    Accepted(Json<BackupAccepted>, #[oai(header = "Location")] String),
}

#[derive(Object)]
pub(crate) struct BackupList {
    backups: Vec<BackupView>,
}

/// One backup in the catalog.
#[derive(Object)]
pub(crate) struct BackupView {
    id: Uuid,
    source: String,
    target: String,
    /// running, succeeded, failed or corrupt. Only succeeded backups are restorable.
    status: String,
    attempts: i32,
    /// The object store's URL (no credentials).
    store: String,
    object_key: String,
    /// pg_dump-custom, tar or toml (inside zstd, inside age when encrypted).
    format: String,
    encrypted: bool,
    source_bytes: Option<i64>,
    stored_bytes: Option<i64>,
    /// Hex SHA-256 of the stored object.
    sha256: Option<String>,
    /// postgres: rows per table when the dump was taken.
    table_counts: Option<Value>,
    error: Option<String>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    verified_at: Option<DateTime<Utc>>,
}

impl From<catalog::Backup> for BackupView {
    fn from(b: catalog::Backup) -> Self {
        Self {
            id: b.id,
            source: b.source,
            target: b.target,
            status: b.status,
            attempts: b.attempts,
            store: b.store,
            object_key: b.object_key,
            format: b.format,
            encrypted: b.encrypted,
            source_bytes: b.source_bytes,
            stored_bytes: b.stored_bytes,
            sha256: b.sha256,
            table_counts: b.table_counts,
            error: b.error,
            started_at: b.started_at,
            finished_at: b.finished_at,
            verified_at: b.verified_at,
        }
    }
}
