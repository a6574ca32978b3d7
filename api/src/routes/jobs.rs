//! Jobs: enqueue one or many, look one up (broker first, then history), search the history,
//! cancel or discard one, retry a dead one.

use chrono::{DateTime, Utc};
use jobs::{CancelOutcome, DeadOutcome, JobId, JobRecord, JobState};
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::{Header, Path, Query},
    payload::Json,
};
use schema::{
    entity::{job, job_attempt},
    history::HistoryEvent,
    queries::JobView,
};
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use super::{ApiTags, queues::JobSummary};
use crate::{
    ApiConfig, AppState,
    enqueue::{self, Context},
    error::ApiError,
    metrics,
    payload::{BodySchema, JsonBody},
    trace,
};

pub(crate) struct JobsApi {
    state: AppState,
}

impl JobsApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Enqueue a job
    ///
    /// Validates the kind and payload against the job catalog, stores the job in the broker and
    /// answers once the broker has it. A repeated `idempotency_key` returns the first job
    /// (`duplicate: true`). A W3C `traceparent` header is carried to the worker.
    #[oai(path = "/v1/jobs", method = "post", operation_id = "enqueueJob")]
    async fn enqueue(
        &self,
        body: JsonBody<EnqueueRequest>,
        /// W3C trace context of the caller; the job's worker spans join this trace.
        traceparent: Header<Option<String>>,
    ) -> Result<EnqueueResponse, ApiError> {
        let traceparent = trace::request_traceparent(traceparent.0.as_deref());
        let cx = self.context(&traceparent);
        let prepared = match enqueue::single_fast(&body.bytes, &cx) {
            Some(prepared) => prepared,
            None => enqueue::single(body.value()?, &cx)
                .map_err(|errors| ApiError::Invalid { errors, batch: false })?,
        };
        let enqueued = push(&self.state, prepared).await?;
        let status_url = status_url(enqueued.id);
        Ok(EnqueueResponse::Accepted(
            Json(Accepted {
                id: enqueued.id.0,
                status_url: status_url.clone(),
                duplicate: enqueued.duplicate,
            }),
            status_url,
        ))
    }

    /// Enqueue many jobs
    ///
    /// All or nothing on validation: if any job is invalid, none is enqueued and the problem's
    /// `errors` lists every bad job by `index`. At most 10 000 jobs per request (configurable).
    /// `ids` are in request order.
    #[oai(path = "/v1/jobs/batch", method = "post", operation_id = "enqueueBatch")]
    async fn enqueue_batch(
        &self,
        body: JsonBody<BatchRequest>,
        /// W3C trace context of the caller, carried by every job of the batch.
        traceparent: Header<Option<String>>,
    ) -> Result<BatchResponse, ApiError> {
        let traceparent = trace::request_traceparent(traceparent.0.as_deref());
        let cx = self.context(&traceparent);
        let max_jobs = self.state.config.max_batch_jobs;
        let prepared = match enqueue::batch_fast(&body.bytes, &cx, max_jobs) {
            Some(prepared) => prepared,
            None => enqueue::batch(body.value()?, &cx, max_jobs)
                .map_err(|errors| ApiError::Invalid { errors, batch: true })?,
        };
        if prepared.is_empty() {
            return Ok(BatchResponse::Accepted(Json(BatchAccepted { ids: Vec::new() })));
        }
        let events: Option<Vec<HistoryEvent>> = self
            .state
            .history
            .as_ref()
            .map(|_| prepared.iter().map(|p| p.enqueued_event()).collect());
        let labels: Vec<_> = prepared
            .iter()
            .map(|p| (p.job.queue.clone(), p.job.kind.clone()))
            .collect();
        let span = tracing::info_span!("push_batch", jobs = prepared.len());
        let jobs = prepared.into_iter().map(|p| p.job).collect();
        let results = self.state.broker.push_batch(jobs).instrument(span).await?;
        let mut events = events.map(Vec::into_iter);
        for (result, (queue, kind)) in results.iter().zip(&labels) {
            let event = events.as_mut().and_then(Iterator::next);
            if result.duplicate {
                continue;
            }
            metrics::job_enqueued(queue.as_str(), kind);
            if let (Some(history), Some(event)) = (&self.state.history, event) {
                history.record(event);
            }
        }
        Ok(BatchResponse::Accepted(Json(BatchAccepted {
            ids: results.iter().map(|r| r.id.0).collect(),
        })))
    }

    /// Look up a job
    ///
    /// The broker's view while it holds the job, otherwise the history database's; attempts
    /// come from the history database. A malformed id answers 400 (`invalid-id`).
    #[oai(path = "/v1/jobs/:id", method = "get", operation_id = "getJob")]
    async fn get_job(&self, id: Path<String>) -> Result<Json<JobDetails>, ApiError> {
        let id = parse_job_id(&id)?;
        let (in_broker, in_history) = tokio::join!(self.state.broker.get(id), self.history_of(id));
        let details = match (in_broker, in_history) {
            (Ok(Some(record)), history) => {
                let attempts = match history {
                    Ok(view) => view.map(|v| v.attempts).unwrap_or_default(),
                    Err(error) => {
                        tracing::warn!(%id, error = %error, "attempt history unavailable; answering from the broker alone");
                        Vec::new()
                    }
                };
                JobDetails::from_broker(record, &attempts)
            }
            (_, Ok(Some(view))) => JobDetails::from_history(view)?,
            (Ok(None), Ok(None)) => return Err(ApiError::NotFound(format!("no job has id {id}"))),
            (Err(error), _) => return Err(error.into()),
            (Ok(None), Err(error)) => return Err(error),
        };
        Ok(Json(details))
    }

    /// Search jobs
    ///
    /// Jobs in the history database, newest first, that `q` finds: a whole job id, or a
    /// case-insensitive piece of the kind, of the payload's JSON text, of the last error or of
    /// any attempt's error. `queue` narrows the search to one queue. `limit` is 1–200
    /// (default 50). Role: viewer.
    #[oai(path = "/v1/jobs", method = "get", operation_id = "searchJobs")]
    async fn search(
        &self,
        /// What to look for: 1–200 characters.
        #[oai(validator(min_length = 1, max_length = 200))]
        q: Query<String>,
        /// Only jobs of this queue.
        queue: Query<Option<String>>,
        /// Results to skip, newest first.
        #[oai(default)]
        offset: Query<u64>,
        #[oai(
            default = "default_search_limit",
            validator(minimum(value = "1"), maximum(value = "200"))
        )]
        limit: Query<u64>,
    ) -> Result<Json<SearchResults>, ApiError> {
        let text = q.0.trim();
        // Postgres text cannot hold NUL: refused here rather than failing in the database.
        let problem = if text.is_empty() {
            Some("must hold something besides spaces")
        } else if text.contains('\0') {
            Some("must not contain NUL characters")
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(ApiError::Invalid {
                errors: vec![crate::FieldError::new(
                    crate::error::ProblemType::InvalidField,
                    "q",
                    reason,
                )],
                batch: false,
            });
        }
        let queue = queue.0.as_deref().map(jobs::QueueName::parse).transpose()?;
        let rows = schema::queries::search_jobs(
            &self.state.db,
            text,
            queue.as_ref().map(|q| q.as_str()),
            limit.0,
            offset.0,
        )
        .await?;
        Ok(Json(SearchResults {
            q: text.to_owned(),
            offset: offset.0,
            jobs: rows
                .into_iter()
                .map(JobSummary::try_from)
                .collect::<Result<_, _>>()?,
        }))
    }

    /// Cancel a job, or discard a dead one
    ///
    /// A pending or scheduled job is canceled: it never runs (`status: canceled`). A dead job is
    /// discarded: removed from its queue's dead set for good (`status: dead`, `discarded: true`);
    /// its record and attempt history stay in the history database. A running, succeeded or
    /// canceled job answers 409 (`not-cancelable`). Role: operator.
    #[oai(path = "/v1/jobs/:id", method = "delete", operation_id = "cancelJob")]
    async fn cancel_job(&self, id: Path<String>) -> Result<Json<Canceled>, ApiError> {
        let id = parse_job_id(&id)?;
        match self.state.broker.cancel(id).await? {
            CancelOutcome::NotCancelable(JobState::Dead) => match self.state.broker.discard_dead(id).await? {
                DeadOutcome::Done => Ok(Json(Canceled {
                    id: id.0,
                    status: JobStatus::Dead,
                    discarded: true,
                })),
                DeadOutcome::NotDead(state) => Err(ApiError::NotCancelable {
                    id,
                    state: state.to_string(),
                }),
                // Discarded by someone else in between.
                DeadOutcome::NotFound => Err(ApiError::NotFound(format!("no job has id {id} in the broker"))),
            },
            CancelOutcome::Canceled => {
                if let Some(history) = &self.state.history {
                    history.record(HistoryEvent::Canceled {
                        id: id.0,
                        at: Utc::now(),
                    });
                }
                Ok(Json(Canceled {
                    id: id.0,
                    status: JobStatus::Canceled,
                    discarded: false,
                }))
            }
            CancelOutcome::NotCancelable(state) => Err(ApiError::NotCancelable {
                id,
                state: state.to_string(),
            }),
            // The broker forgets finished jobs; history may still know this one.
            CancelOutcome::NotFound => match self.history_of(id).await? {
                Some(view) => Err(ApiError::NotCancelable {
                    id,
                    state: view.job.status,
                }),
                None => Err(ApiError::NotFound(format!("no job has id {id}"))),
            },
        }
    }

    /// Retry a dead job
    ///
    /// Puts a dead job (out of attempts, failed with an error retrying cannot fix, or
    /// quarantined after crashing its workers) back in its queue, due now, with a fresh attempt
    /// budget: as many attempts again as it had. Attempt numbers count on, so the history of
    /// earlier attempts stays. A job in any other state (or discarded) answers 409
    /// (`not-dead`). Role: operator.
    #[oai(path = "/v1/jobs/:id/retry", method = "post", operation_id = "retryJob")]
    async fn retry_job(&self, id: Path<String>) -> Result<Json<Retried>, ApiError> {
        let id = parse_job_id(&id)?;
        let state = match self.state.broker.retry_dead(id).await? {
            DeadOutcome::Done => {
                return Ok(Json(Retried {
                    id: id.0,
                    status: JobStatus::Pending,
                }));
            }
            DeadOutcome::NotDead(state) => state.to_string(),
            // The broker forgets finished (and discarded) jobs; history may still know this one.
            DeadOutcome::NotFound => match self.history_of(id).await? {
                Some(view) if view.job.status == JobState::Dead.as_str() => "dead but discarded".to_owned(),
                Some(view) => view.job.status,
                None => return Err(ApiError::NotFound(format!("no job has id {id}"))),
            },
        };
        Err(ApiError::NotDead { id, state })
    }
}

impl JobsApi {
    fn context<'a>(&'a self, traceparent: &'a str) -> Context<'a> {
        Context {
            catalog: &self.state.catalog,
            now_ms: jobs::job::now_ms(),
            traceparent,
        }
    }

    /// The history database's record of a job, within the probe timeout: a slow or down
    /// database must not hold up answers the broker can give.
    async fn history_of(&self, id: JobId) -> Result<Option<JobView>, ApiError> {
        let timeout = self.state.config.probe_timeout;
        match tokio::time::timeout(timeout, schema::queries::get_job(&self.state.db, id.0)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ApiError::DatabaseUnavailable(anyhow::anyhow!(
                "looking up job {id} took longer than {timeout:?}"
            ))),
        }
    }
}

fn default_search_limit() -> u64 {
    50
}

/// A job's status as the history database stores it; an unknown one is a bug (500).
pub(crate) fn history_status(job: &job::Model) -> Result<JobState, ApiError> {
    job.status
        .parse()
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context(format!("job {} in history", job.id))))
}

fn parse_job_id(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).ok_or_else(|| ApiError::InvalidJobId(id.to_owned()))
}

/// Pushes one validated job to the broker; once the broker has it (and it is not a duplicate
/// of an earlier idempotency key), counts it and records its enqueue in the history.
pub(crate) async fn push(state: &AppState, prepared: enqueue::Prepared) -> Result<jobs::Enqueued, ApiError> {
    let event = state.history.as_ref().map(|_| prepared.enqueued_event());
    let (queue, kind) = (prepared.job.queue.clone(), prepared.job.kind.clone());
    let span = tracing::info_span!("push", job.id = %prepared.job.id, job.kind = %kind, %queue);
    let enqueued = state.broker.push(prepared.job).instrument(span).await?;
    if !enqueued.duplicate {
        metrics::job_enqueued(queue.as_str(), &kind);
        if let (Some(history), Some(event)) = (&state.history, event) {
            history.record(event);
        }
    }
    Ok(enqueued)
}

fn status_url(id: JobId) -> String {
    format!("/v1/jobs/{id}")
}

/// A job to enqueue.
#[derive(Object)]
pub(crate) struct EnqueueRequest {
    /// A kind from the job catalog (`noop`, `sleep`, …).
    kind: String,
    /// The kind's payload; `{}` when absent.
    payload: Option<Value>,
    /// The queue to use instead of the kind's own: 1–64 characters of `a-z 0-9 - _`.
    queue: Option<String>,
    /// Run no earlier than this many seconds from now (at most 366 days).
    #[oai(validator(maximum(value = "31622400")))]
    delay_s: Option<u64>,
    /// Run no earlier than this time (RFC 3339). Not together with `delay_s`.
    run_at: Option<DateTime<Utc>>,
    priority: Option<i32>,
    /// A second enqueue with the same key returns the first job instead of a new one.
    #[oai(validator(min_length = 1, max_length = 256))]
    idempotency_key: Option<String>,
}

impl BodySchema for EnqueueRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_body_bytes
    }
}

/// Jobs to enqueue together.
#[derive(Object)]
pub(crate) struct BatchRequest {
    #[oai(validator(max_items = 10000))]
    jobs: Vec<EnqueueRequest>,
}

impl BodySchema for BatchRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_batch_body_bytes
    }
}

/// The broker has the job.
#[derive(Object)]
pub(crate) struct Accepted {
    id: Uuid,
    /// Where to follow the job: `GET` it.
    status_url: String,
    /// True when the idempotency key matched an earlier job, whose id this is.
    duplicate: bool,
}

#[derive(ApiResponse)]
pub(crate) enum EnqueueResponse {
    /// Accepted; `Location` is the job's status URL.
    #[oai(status = 202)]
    Accepted(Json<Accepted>, #[oai(header = "Location")] String),
}

#[derive(Object)]
pub(crate) struct BatchAccepted {
    /// The jobs' ids, in request order.
    ids: Vec<Uuid>,
}

#[derive(ApiResponse)]
pub(crate) enum BatchResponse {
    /// Accepted: the broker has every job.
    #[oai(status = 202)]
    Accepted(Json<BatchAccepted>),
}

#[derive(Object)]
pub(crate) struct Canceled {
    id: Uuid,
    /// `canceled`, or `dead` for a dead job that was discarded.
    status: JobStatus,
    /// True when a dead job was removed from the dead set rather than a waiting job canceled.
    discarded: bool,
}

#[derive(Object)]
pub(crate) struct Retried {
    id: Uuid,
    /// Always `pending`: back in its queue, due now.
    status: JobStatus,
}

/// Where a job is in its life.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    Scheduled,
    Pending,
    Running,
    Succeeded,
    Retrying,
    Dead,
    Canceled,
}

impl From<JobState> for JobStatus {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Scheduled => JobStatus::Scheduled,
            JobState::Pending => JobStatus::Pending,
            JobState::Running => JobStatus::Running,
            JobState::Succeeded => JobStatus::Succeeded,
            JobState::Retrying => JobStatus::Retrying,
            JobState::Dead => JobStatus::Dead,
            JobState::Canceled => JobStatus::Canceled,
        }
    }
}

impl From<JobStatus> for JobState {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Scheduled => JobState::Scheduled,
            JobStatus::Pending => JobState::Pending,
            JobStatus::Running => JobState::Running,
            JobStatus::Succeeded => JobState::Succeeded,
            JobStatus::Retrying => JobState::Retrying,
            JobStatus::Dead => JobState::Dead,
            JobStatus::Canceled => JobState::Canceled,
        }
    }
}

/// Jobs a search found.
#[derive(Object)]
pub(crate) struct SearchResults {
    /// The search text, trimmed.
    q: String,
    offset: u64,
    /// Newest first.
    jobs: Vec<JobSummary>,
}

/// Which store answered a job lookup.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub(crate) enum JobSource {
    /// The broker still holds the job: its state is current.
    Broker,
    /// Only the history database knows the job (written in batches, so possibly a moment behind).
    History,
}

/// A job and its attempts.
#[derive(Object)]
pub(crate) struct JobDetails {
    id: Uuid,
    queue: String,
    kind: String,
    status: JobStatus,
    /// Attempts started so far.
    attempts: u32,
    max_attempts: u32,
    priority: i32,
    #[oai(skip_serializing_if_is_none)]
    payload: Option<Value>,
    created_at: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    run_at: Option<DateTime<Utc>>,
    #[oai(skip_serializing_if_is_none)]
    started_at: Option<DateTime<Utc>>,
    #[oai(skip_serializing_if_is_none)]
    finished_at: Option<DateTime<Utc>>,
    #[oai(skip_serializing_if_is_none)]
    last_error: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    worker_id: Option<String>,
    /// W3C `traceparent` of the request that enqueued the job.
    #[oai(skip_serializing_if_is_none)]
    trace_id: Option<String>,
    source: JobSource,
    /// Each attempt, oldest first, as recorded in the history database.
    attempt_history: Vec<AttemptDetails>,
}

/// One attempt at running a job.
#[derive(Object)]
pub(crate) struct AttemptDetails {
    /// 1-based.
    attempt: u32,
    #[oai(skip_serializing_if_is_none)]
    worker_id: Option<String>,
    started_at: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    finished_at: Option<DateTime<Utc>>,
    /// `succeeded`, `failed`, `timed_out`, `panicked` or `lost`; absent while running.
    #[oai(skip_serializing_if_is_none)]
    outcome: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl JobDetails {
    fn from_broker(r: JobRecord, attempts: &[job_attempt::Model]) -> Self {
        Self {
            id: r.id.0,
            queue: r.queue,
            kind: r.kind,
            status: r.status.into(),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            priority: r.priority,
            payload: r.payload,
            created_at: from_ms(r.created_at_ms),
            run_at: r.run_at_ms.map(from_ms),
            started_at: r.started_at_ms.map(from_ms),
            finished_at: r.finished_at_ms.map(from_ms),
            last_error: r.last_error,
            worker_id: r.worker_id,
            trace_id: r.trace_id,
            source: JobSource::Broker,
            attempt_history: attempts.iter().map(AttemptDetails::from).collect(),
        }
    }

    fn from_history(view: JobView) -> Result<Self, ApiError> {
        let status = history_status(&view.job)?;
        let job::Model {
            id,
            queue,
            kind,
            attempts,
            max_attempts,
            payload,
            priority,
            trace_id,
            worker_id,
            last_error,
            created_at,
            run_at,
            started_at,
            finished_at,
            ..
        } = view.job;
        Ok(Self {
            id,
            queue,
            kind,
            status: status.into(),
            attempts: u32::try_from(attempts).unwrap_or_default(),
            max_attempts: u32::try_from(max_attempts).unwrap_or_default(),
            priority,
            payload,
            created_at,
            run_at,
            started_at,
            finished_at,
            last_error,
            worker_id,
            trace_id,
            source: JobSource::History,
            attempt_history: view.attempts.iter().map(AttemptDetails::from).collect(),
        })
    }
}

impl From<&job_attempt::Model> for AttemptDetails {
    fn from(a: &job_attempt::Model) -> Self {
        Self {
            attempt: u32::try_from(a.attempt).unwrap_or_default(),
            worker_id: a.worker_id.clone(),
            started_at: a.started_at,
            finished_at: a.finished_at,
            outcome: a.outcome.clone(),
            error: a.error.clone(),
        }
    }
}
