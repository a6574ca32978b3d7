//! The API's one error type, [`ApiError`], and its rendering as an RFC 9457 problem:
//! `application/problem+json` with a stable `type` URI (`https://drover.dev/problems/<slug>`),
//! a `title`, the `status`, a human `detail`, and extensions (`errors` for validation,
//! `checks` for readiness).
//!
//! Errors that never reach a handler — unknown routes, wrong methods, unsupported content
//! types, poem-openapi's parameter parse errors, panics — are turned into problems too by
//! [`problem_responses`], so no client ever sees a plain-text error body.

use std::{any::Any, collections::BTreeMap, fmt::Write, sync::Arc};

use poem::{
    Endpoint, IntoResponse, PathPattern, Request, Response,
    error::ResponseError,
    http::{Method, StatusCode, header},
};
use poem_openapi::{
    ApiResponse, Object, OperationId,
    registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
const PROBLEM_BASE: &str = "https://drover.dev/problems/";

/// The kinds of problem the API reports; each has a stable `type` URI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProblemType {
    /// The body is not JSON at all.
    InvalidJson,
    /// A field of the request has the wrong type or value (not the job's payload).
    #[default]
    InvalidField,
    UnknownKind,
    /// The job's payload does not decode into its kind's payload type.
    InvalidPayload,
    InvalidQueue,
    /// One or more jobs of a batch are invalid; `errors` lists each.
    InvalidBatch,
    /// A path segment that should be a job id is not a UUID.
    InvalidId,
    /// One or more events of `POST /v1/events` are invalid; `errors` lists each (`index`,
    /// `field`, `reason`, each of type `invalid-event`).
    InvalidEvents,
    /// One event of a batch is invalid (the type of each entry of an `invalid-events` problem).
    InvalidEvent,
    /// Redis, which the API serves cached read models from, did not answer.
    CacheUnavailable,
    NotFound,
    MethodNotAllowed,
    NotCancelable,
    /// A retry of a job that is not in the dead set.
    NotDead,
    PayloadTooLarge,
    UnsupportedMediaType,
    BrokerUnavailable,
    DatabaseUnavailable,
    NotReady,
    Internal,
    /// Any other HTTP error poem reports (a malformed query string, for one).
    BadRequest,
    /// No API key, or one that is malformed, unknown, revoked or expired.
    Unauthorized,
    /// A valid key whose role may not call this route.
    Forbidden,
    /// Over a rate limit; `Retry-After` says when to come back.
    RateLimited,
    /// A JSON body nested deeper, or with more members in one object, than the limits allow.
    JsonTooComplex,
}

impl ProblemType {
    pub fn slug(self) -> &'static str {
        match self {
            ProblemType::InvalidJson => "invalid-json",
            ProblemType::InvalidField => "invalid-field",
            ProblemType::UnknownKind => "unknown-kind",
            ProblemType::InvalidPayload => "invalid-payload",
            ProblemType::InvalidQueue => "invalid-queue",
            ProblemType::InvalidBatch => "invalid-batch",
            ProblemType::InvalidId => "invalid-id",
            ProblemType::InvalidEvents => "invalid-events",
            ProblemType::InvalidEvent => "invalid-event",
            ProblemType::CacheUnavailable => "cache-unavailable",
            ProblemType::NotFound => "not-found",
            ProblemType::MethodNotAllowed => "method-not-allowed",
            ProblemType::NotCancelable => "not-cancelable",
            ProblemType::NotDead => "not-dead",
            ProblemType::PayloadTooLarge => "payload-too-large",
            ProblemType::UnsupportedMediaType => "unsupported-media-type",
            ProblemType::BrokerUnavailable => "broker-unavailable",
            ProblemType::DatabaseUnavailable => "database-unavailable",
            ProblemType::NotReady => "not-ready",
            ProblemType::Internal => "internal",
            ProblemType::BadRequest => "bad-request",
            ProblemType::Unauthorized => "unauthorized",
            ProblemType::Forbidden => "forbidden",
            ProblemType::RateLimited => "rate-limited",
            ProblemType::JsonTooComplex => "json-too-complex",
        }
    }

    /// The `type` member of the problem: `https://drover.dev/problems/<slug>`.
    pub fn uri(self) -> String {
        format!("{PROBLEM_BASE}{}", self.slug())
    }

    pub fn title(self) -> &'static str {
        match self {
            ProblemType::InvalidJson => "The request body is not valid JSON",
            ProblemType::InvalidField => "A request field is invalid",
            ProblemType::UnknownKind => "Unknown job kind",
            ProblemType::InvalidPayload => "Invalid job payload",
            ProblemType::InvalidQueue => "Invalid queue name",
            ProblemType::InvalidBatch => "Some jobs of the batch are invalid",
            ProblemType::InvalidId => "Invalid job id",
            ProblemType::InvalidEvents => "Some events of the batch are invalid",
            ProblemType::InvalidEvent => "Invalid event",
            ProblemType::CacheUnavailable => "The cache is unavailable",
            ProblemType::NotFound => "Not found",
            ProblemType::MethodNotAllowed => "Method not allowed",
            ProblemType::NotCancelable => "The job can no longer be canceled",
            ProblemType::NotDead => "The job is not in the dead set",
            ProblemType::PayloadTooLarge => "The request body is too large",
            ProblemType::UnsupportedMediaType => "Unsupported media type",
            ProblemType::BrokerUnavailable => "The broker is unavailable",
            ProblemType::DatabaseUnavailable => "The history database is unavailable",
            ProblemType::NotReady => "Not ready",
            ProblemType::Internal => "Internal server error",
            ProblemType::BadRequest => "Bad request",
            ProblemType::Unauthorized => "A valid API key is needed",
            ProblemType::Forbidden => "The API key's role may not do this",
            ProblemType::RateLimited => "Too many requests",
            ProblemType::JsonTooComplex => "The JSON body is nested too deep or too wide",
        }
    }
}

/// An RFC 9457 problem, as the API sends it.
#[derive(Clone, Debug, Object)]
pub struct Problem {
    /// Identifies the kind of problem; stable, safe to match on.
    #[oai(rename = "type")]
    pub type_: String,
    /// A short summary of the kind of problem; the same for every occurrence.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// Validation errors, one per bad field (and per bad job of a batch).
    #[oai(skip_serializing_if_is_none)]
    pub errors: Option<Vec<FieldError>>,
    /// Readiness: the state of each dependency (`ok` or what is wrong).
    #[oai(skip_serializing_if_is_none)]
    pub checks: Option<BTreeMap<String, String>>,
}

/// One invalid field of a request.
#[derive(Clone, Debug, PartialEq, Eq, Object)]
pub struct FieldError {
    /// Position of the job in a batch request (0-based); absent for single requests.
    #[oai(skip_serializing_if_is_none)]
    pub index: Option<u32>,
    /// The field, as a dotted path: `kind`, `queue`, `payload.ms`, `jobs`.
    pub field: String,
    pub reason: String,
    /// The problem type this error belongs to (`…/unknown-kind`, `…/invalid-payload`, …).
    #[oai(rename = "type")]
    pub type_: String,
    #[oai(skip)]
    pub kind: ProblemType,
}

impl FieldError {
    pub fn new(kind: ProblemType, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            index: None,
            field: field.into(),
            reason: reason.into(),
            type_: kind.uri(),
            kind,
        }
    }

    /// The same error, about the job at `index` of a batch.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(u32::try_from(index).unwrap_or(u32::MAX));
        self
    }
}

/// Everything a route can fail with. Client errors say what to fix; server errors are logged
/// with their cause chain and shown without internals.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0:?} is not a job id (job ids are UUIDs)")]
    InvalidJobId(String),
    #[error(transparent)]
    InvalidQueue(#[from] jobs::queue::InvalidQueueName),
    /// A request (single job or batch) failed validation; nothing was enqueued.
    #[error("{}", validation_detail(.errors, *.batch))]
    Invalid { errors: Vec<FieldError>, batch: bool },
    /// Events of a `POST /v1/events` batch failed validation; none was stored.
    #[error("{} event(s) of the batch are invalid; nothing was stored", count_indexes(.0))]
    InvalidEvents(Vec<FieldError>),
    #[error("the cache did not answer; try again shortly")]
    CacheUnavailable(#[source] jobs::cache::CacheError),
    #[error("{0}")]
    NotFound(String),
    #[error("job {id} is {state} and can no longer be canceled")]
    NotCancelable { id: jobs::JobId, state: String },
    #[error("job {id} is {state}, not in the dead set: only dead jobs can be retried")]
    NotDead { id: jobs::JobId, state: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the broker did not answer; try again shortly")]
    BrokerUnavailable(#[source] jobs::BrokerError),
    /// The history database failed to answer (its cause is logged, not shown).
    #[error("the history database did not answer; try again shortly")]
    DatabaseUnavailable(anyhow::Error),
    #[error("{}", not_ready_detail(.0))]
    NotReady(BTreeMap<String, String>),
    /// An HTTP-level error from poem or poem-openapi, passed on with its status.
    #[error("{detail}")]
    Http {
        status: StatusCode,
        kind: ProblemType,
        detail: String,
    },
    #[error("{0}")]
    Auth(AuthFailure),
    #[error("too many requests; retry in {} s", retry_after_s(*.retry_after))]
    RateLimited { retry_after: std::time::Duration },
    #[error("{0}")]
    JsonTooComplex(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// Why [`crate::auth::Guard`] turned a request away.
#[derive(Debug)]
pub enum AuthFailure {
    Unauthenticated(crate::auth::Refusal),
    Forbidden {
        role: crate::auth::Role,
        needed: crate::auth::Role,
    },
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthFailure::Unauthenticated(r) => f.write_str(crate::auth::refusal_detail(*r)),
            AuthFailure::Forbidden { role, needed } => {
                write!(
                    f,
                    "this route needs an {needed} key or better; this key is a {role} key"
                )
            }
        }
    }
}

/// Whole seconds to wait, rounded up (a `Retry-After` of 0 would invite an instant retry).
fn retry_after_s(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn count_indexes(errors: &[FieldError]) -> usize {
    let mut idx: Vec<u32> = errors.iter().filter_map(|e| e.index).collect();
    idx.dedup();
    idx.len().max(1)
}

fn validation_detail(errors: &[FieldError], batch: bool) -> String {
    if batch {
        let mut jobs: Vec<u32> = errors.iter().filter_map(|e| e.index).collect();
        jobs.dedup();
        return if jobs.is_empty() {
            "the batch request is invalid; nothing was enqueued".to_owned()
        } else {
            format!(
                "{} job(s) of the batch are invalid; nothing was enqueued",
                jobs.len()
            )
        };
    }
    let mut detail = String::new();
    for (i, e) in errors.iter().enumerate() {
        let _ = write!(
            detail,
            "{}{}: {}",
            if i == 0 { "" } else { "; " },
            e.field,
            e.reason
        );
    }
    detail
}

fn not_ready_detail(checks: &BTreeMap<String, String>) -> String {
    let failing: Vec<String> = checks
        .iter()
        .filter(|(_, state)| state.as_str() != "ok")
        .map(|(name, state)| format!("{name}: {state}"))
        .collect();
    format!("not ready: {}", failing.join("; "))
}

impl From<jobs::BrokerError> for ApiError {
    fn from(e: jobs::BrokerError) -> Self {
        if e.is_unavailable() {
            ApiError::BrokerUnavailable(e)
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("the broker failed"))
        }
    }
}

impl From<schema::DbError> for ApiError {
    fn from(e: schema::DbError) -> Self {
        use sea_orm::DbErr;
        let unavailable = matches!(
            &e,
            schema::DbError::Connect { .. }
                | schema::DbError::Query(DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
        );
        if unavailable {
            ApiError::DatabaseUnavailable(e.into())
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("the history database failed"))
        }
    }
}

impl ApiError {
    pub fn kind(&self) -> ProblemType {
        match self {
            ApiError::InvalidJson(_) => ProblemType::InvalidJson,
            ApiError::InvalidJobId(_) => ProblemType::InvalidId,
            ApiError::InvalidQueue(_) => ProblemType::InvalidQueue,
            ApiError::Invalid { batch: true, .. } => ProblemType::InvalidBatch,
            ApiError::Invalid { errors, .. } => errors.first().map_or(ProblemType::InvalidField, |e| e.kind),
            ApiError::InvalidEvents(_) => ProblemType::InvalidEvents,
            ApiError::CacheUnavailable(_) => ProblemType::CacheUnavailable,
            ApiError::NotFound(_) => ProblemType::NotFound,
            ApiError::NotCancelable { .. } => ProblemType::NotCancelable,
            ApiError::NotDead { .. } => ProblemType::NotDead,
            ApiError::PayloadTooLarge { .. } => ProblemType::PayloadTooLarge,
            ApiError::BrokerUnavailable(_) => ProblemType::BrokerUnavailable,
            ApiError::DatabaseUnavailable(_) => ProblemType::DatabaseUnavailable,
            ApiError::NotReady(_) => ProblemType::NotReady,
            ApiError::Http { kind, .. } => *kind,
            ApiError::Auth(AuthFailure::Unauthenticated(_)) => ProblemType::Unauthorized,
            ApiError::Auth(AuthFailure::Forbidden { .. }) => ProblemType::Forbidden,
            ApiError::RateLimited { .. } => ProblemType::RateLimited,
            ApiError::JsonTooComplex(_) => ProblemType::JsonTooComplex,
            ApiError::Internal(_) => ProblemType::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidJobId(_)
            | ApiError::InvalidQueue(_)
            | ApiError::JsonTooComplex(_) => StatusCode::BAD_REQUEST,
            ApiError::Auth(AuthFailure::Unauthenticated(_)) => StatusCode::UNAUTHORIZED,
            ApiError::Auth(AuthFailure::Forbidden { .. }) => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Invalid { .. } | ApiError::InvalidEvents(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NotCancelable { .. } | ApiError::NotDead { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BrokerUnavailable(_)
            | ApiError::DatabaseUnavailable(_)
            | ApiError::NotReady(_)
            | ApiError::CacheUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Http { status, .. } => *status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let kind = self.kind();
        Problem {
            type_: match self {
                // Statuses poem reports that have no drover-specific meaning.
                ApiError::Http {
                    kind: ProblemType::BadRequest,
                    ..
                } => "about:blank".to_owned(),
                _ => kind.uri(),
            },
            title: match self {
                ApiError::Http {
                    kind: ProblemType::BadRequest,
                    status,
                    ..
                } => status.canonical_reason().unwrap_or("Error").to_owned(),
                _ => kind.title().to_owned(),
            },
            status: self.status().as_u16(),
            detail: self.to_string(),
            errors: match self {
                ApiError::Invalid { errors, .. } | ApiError::InvalidEvents(errors) => Some(errors.clone()),
                _ => None,
            },
            checks: match self {
                ApiError::NotReady(checks) => Some(checks.clone()),
                _ => None,
            },
        }
    }

    /// Logs what the client will not see, then renders the problem.
    pub(crate) fn render(&self) -> Response {
        match self {
            ApiError::Internal(e) => tracing::error!(error = format!("{e:#}"), "request failed"),
            ApiError::BrokerUnavailable(e) => tracing::warn!(error = %e, "broker unavailable"),
            ApiError::CacheUnavailable(e) => tracing::warn!(error = %e, "cache unavailable"),
            ApiError::DatabaseUnavailable(e) => {
                tracing::warn!(error = format!("{e:#}"), "history database unavailable")
            }
            ApiError::NotReady(checks) => tracing::warn!(?checks, "not ready"),
            _ => {}
        }
        let status = self.status();
        let body = self
            .problem()
            .to_json()
            .map(|v| v.to_string())
            .unwrap_or_default();
        let mut resp = Response::builder()
            .status(status)
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(body);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if let ApiError::RateLimited { retry_after } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, retry_after_s(*retry_after).into());
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, crate::auth::www_authenticate());
        }
        resp
    }

    /// An error poem or poem-openapi produced before (or instead of) a handler.
    fn from_poem(err: poem::Error, method: &Method, path: &str) -> Self {
        let status = err.status();
        let http = |kind: ProblemType, detail: String| ApiError::Http { status, kind, detail };
        match status {
            StatusCode::NOT_FOUND => ApiError::NotFound(format!("no route for {method} {path}")),
            StatusCode::METHOD_NOT_ALLOWED => http(
                ProblemType::MethodNotAllowed,
                format!("{method} is not allowed on {path}"),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => http(ProblemType::PayloadTooLarge, err.to_string()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => http(
                ProblemType::UnsupportedMediaType,
                format!("{err}; send Content-Type: application/json"),
            ),
            s if s.is_server_error() => ApiError::Internal(anyhow::anyhow!("{err}")),
            _ => http(ProblemType::BadRequest, err.to_string()),
        }
    }
}

impl ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        self.render()
    }
}

/// Documents the problem responses of every operation (poem-openapi reads this for the spec).
impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let responses = [
            (
                400,
                "Malformed request: not JSON, or a malformed id or queue name",
            ),
            (401, "No API key, or a malformed, unknown, revoked or expired one"),
            (403, "The API key's role may not call this route"),
            (404, "No such job, queue or schedule"),
            (409, "The job can no longer be canceled"),
            (413, "The request body is over the size limit"),
            (415, "The request body is not application/json"),
            (
                422,
                "The request is well-formed JSON but invalid; `errors` lists each field",
            ),
            (429, "Over a rate limit; retry after `Retry-After` seconds"),
            (500, "Internal error (details are logged, not shown)"),
            (
                503,
                "The broker or database is unavailable; retry after `Retry-After` seconds",
            ),
        ];
        MetaResponses {
            responses: responses
                .into_iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: PROBLEM_CONTENT_TYPE,
                        schema: Problem::schema_ref(),
                    }],
                    headers: if status == 503 || status == 429 {
                        vec![MetaHeader {
                            name: "Retry-After".to_owned(),
                            description: Some("Seconds to wait before retrying".to_owned()),
                            required: true,
                            deprecated: false,
                            schema: u32::schema_ref(),
                        }]
                    } else {
                        Vec::new()
                    },
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// Middleware (used with `EndpointExt::around`): every error becomes a problem+json response,
/// keeping the matched route and operation for the metrics middleware outside it.
pub(crate) async fn problem_responses<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match ep.call(req).await {
        Ok(resp) => Ok(resp.into_response()),
        Err(err) => {
            let operation = err.data::<OperationId>().copied();
            let pattern = err.data::<PathPattern>().cloned();
            let api_error = match err.downcast::<ApiError>() {
                Ok(e) => e,
                Err(err) => ApiError::from_poem(err, &method, &path),
            };
            let mut resp = api_error.render();
            if let Some(operation) = operation {
                resp.set_data(operation);
            }
            if let Some(pattern) = pattern {
                resp.set_data(pattern);
            }
            Ok(resp)
        }
    }
}

/// `CatchPanic` handler: a panicking handler answers a generic 500 problem.
pub(crate) fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    ApiError::Internal(anyhow::anyhow!("a handler panicked: {message}")).render()
}

impl From<jobs::cache::CacheError> for ApiError {
    fn from(e: jobs::cache::CacheError) -> Self {
        match e {
            jobs::cache::CacheError::Redis(_) => ApiError::CacheUnavailable(e),
            other => ApiError::Internal(anyhow::Error::new(other).context("a cached read model")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_request_takes_the_type_of_its_first_error() {
        let err = ApiError::Invalid {
            errors: vec![
                FieldError::new(ProblemType::UnknownKind, "kind", "unknown job kind \"x\""),
                FieldError::new(ProblemType::InvalidQueue, "queue", "bad"),
            ],
            batch: false,
        };
        let problem = err.problem();
        assert_eq!(problem.type_, "https://drover.dev/problems/unknown-kind");
        assert_eq!(problem.status, 422);
        assert_eq!(problem.detail, "kind: unknown job kind \"x\"; queue: bad");
    }

    #[test]
    fn internal_errors_do_not_show_their_cause() {
        let err = ApiError::Internal(anyhow::anyhow!("password=hunter2").context("connecting"));
        let problem = err.problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("hunter2") && !problem.detail.contains("connecting"));
    }

    #[test]
    fn unavailable_dependencies_ask_clients_to_retry() {
        let err = ApiError::from(jobs::BrokerError::Unavailable("refused".into()));
        let resp = err.render();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(
            resp.headers().get(header::CONTENT_TYPE).unwrap(),
            PROBLEM_CONTENT_TYPE
        );
    }
}
