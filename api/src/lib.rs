//! drover's HTTP API: the v1 routes (enqueue, look up and cancel jobs; queue depths; cron
//! schedules), health and readiness probes, Prometheus metrics, the OpenAPI document and its
//! Swagger UI, and the operator dashboard (embedded HTML/JS at `/dashboard`).
//!
//! Handlers are thin: they parse the request, call `jobs` (the broker behind
//! [`jobs::Producer`], the [`jobs::Catalog`]) or `schema` (history reads), and map the result.
//! Every error leaves as an RFC 9457 `application/problem+json` body (see [`error`]).
//!
//! Depends on `jobs` and `schema` only; never on `workers`.
//!
//! The binary composes it like this:
//!
//! ```no_run
//! # async fn run(broker: std::sync::Arc<dyn jobs::Producer>, db: sea_orm::DatabaseConnection) -> std::io::Result<()> {
//! let metrics = api::install_metrics(); // once per process
//! let state = api::AppState::new(broker, db, std::sync::Arc::new(jobs::Catalog::default()), metrics);
//! let listener = std::net::TcpListener::bind("0.0.0.0:8080")?;
//! api::serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![forbid(unsafe_code)]

use std::{future::Future, sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    Endpoint, EndpointExt, Route, Server,
    listener::{Acceptor, TcpAcceptor},
    middleware::CatchPanic,
};
use poem_openapi::OpenApiService;

/// API keys, roles, the route rules and the middleware that enforces them.
pub mod auth;
/// The operator dashboard: embedded HTML/CSS/JS under `/dashboard`.
mod dashboard;
/// Turning enqueue requests into validated job envelopes.
mod enqueue;
/// The one error type of every route, rendered as RFC 9457 problem+json.
pub mod error;
/// Metric names, the process-wide recorder and the HTTP metrics middleware.
pub mod metrics;
/// The JSON request-body extractor with size limits and problem+json parse errors.
mod payload;
/// Rate limits per key, per client IP and per failed authentication (GCRA; Redis or local).
pub mod ratelimit;
/// One module per API resource, each an `OpenApi` implementation.
mod routes;
/// The `Secret` type: credentials that print as `[redacted]`.
mod secret;
/// Security headers, CORS and the request deadline.
mod security;
/// W3C `traceparent` handling.
mod trace;

pub use crate::{
    auth::{Access, MetricsAuth, Role},
    error::{ApiError, FieldError, Problem},
    metrics::install_metrics,
    ratelimit::{Rate, RateLimiter, RateLimits},
    secret::Secret,
};

/// Limits and timeouts of the HTTP layer. The defaults are the production defaults.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Largest request body of single-job routes, in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest request body of `POST /v1/jobs/batch`, in bytes. Default 32 MiB.
    pub max_batch_body_bytes: usize,
    /// Most jobs in one batch. Default 10 000.
    pub max_batch_jobs: usize,
    /// How long `/metrics` waits for queue statistics before rendering without refreshing
    /// them, and how long `/readyz` waits for each dependency. Default 2 s.
    pub probe_timeout: Duration,
    /// How long [`serve`] lets in-flight requests finish after the shutdown signal. Default 25 s
    /// (inside Kubernetes' default 30 s termination grace period).
    pub shutdown_timeout: Duration,
    /// How long a verified API key is trusted without reading the database again: a revoked or
    /// expired key is refused within this long. Default 5 s.
    pub key_cache_ttl: Duration,
    /// Whether `/metrics` needs a key. Default open.
    pub metrics_auth: MetricsAuth,
    /// Per key, per client IP and per failed authentication; see [`RateLimits`].
    pub rate_limits: RateLimits,
    /// Deepest nesting of a JSON body (objects and arrays). Default 32.
    pub max_json_depth: usize,
    /// Most members of one JSON object or array (a batch's `jobs` may hold
    /// [`max_batch_jobs`](Self::max_batch_jobs)). Default 10 000.
    pub max_json_members: usize,
    /// Origins allowed to call the API from a browser (CORS). Default none: CORS is off, and
    /// browsers refuse cross-origin reads.
    pub cors_origins: Vec<String>,
    /// Longest time to answer one request, reading its body included: a client that sends its
    /// body slower than that gets a 408. Default 60 s.
    pub request_timeout: Duration,
    /// A connection with no traffic for this long is closed (slow or idle clients). Default 60 s.
    pub idle_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_batch_body_bytes: 32 << 20,
            max_batch_jobs: 10_000,
            probe_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(25),
            key_cache_ttl: Duration::from_secs(5),
            metrics_auth: MetricsAuth::Open,
            rate_limits: RateLimits::default(),
            max_json_depth: 32,
            max_json_members: 10_000,
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything the routes need, cheap to clone (every field is a handle).
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<dyn jobs::Producer>,
    /// The history database (jobs the broker no longer holds, attempt history; readiness).
    pub db: sea_orm::DatabaseConnection,
    pub catalog: Arc<jobs::Catalog>,
    /// Where accepted jobs are recorded; `None` records nothing (history then only has what
    /// workers write).
    pub history: Option<schema::history::HistoryWriter>,
    /// Renders `/metrics`; from [`install_metrics`].
    pub metrics: PrometheusHandle,
    pub config: ApiConfig,
    /// The configured backup targets; when known, `POST /v1/backups` refuses other names.
    pub backup_targets: Option<Arc<Vec<(jobs::families::backup::Source, String)>>>,
    /// Where rate-limit buckets live (this process by default; Redis to share them).
    pub rate_limiter: Arc<RateLimiter>,
    /// Where mutating calls are audited; `None` logs them only.
    pub audit: Option<schema::audit::AuditWriter>,
    /// Redis for cached read models (leaderboards, analytics summaries); without one every
    /// such read is computed from the database and counted as a miss.
    pub cache: Option<jobs::cache::ReadCache>,
}

impl AppState {
    /// A state without a history writer and with the default [`ApiConfig`].
    ///
    /// Single-job enqueues from concurrent requests reach `broker` as batches
    /// ([`jobs::broker::coalesce`]). Call it inside the tokio runtime that serves the API.
    pub fn new(
        broker: Arc<dyn jobs::Producer>,
        db: sea_orm::DatabaseConnection,
        catalog: Arc<jobs::Catalog>,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            broker: Arc::new(jobs::broker::coalesce::Coalescing::new(broker)),
            db,
            catalog,
            history: None,
            metrics,
            config: ApiConfig::default(),
            backup_targets: None,
            rate_limiter: Arc::new(RateLimiter::default()),
            audit: None,
            cache: None,
        }
    }

    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.rate_limiter = Arc::new(limiter);
        self
    }

    pub fn with_audit(mut self, audit: schema::audit::AuditWriter) -> Self {
        self.audit = Some(audit);
        self
    }

    pub fn with_cache(mut self, cache: jobs::cache::ReadCache) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn with_history(mut self, history: schema::history::HistoryWriter) -> Self {
        self.history = Some(history);
        self
    }

    pub fn with_backup_targets(mut self, targets: Vec<(jobs::families::backup::Source, String)>) -> Self {
        self.backup_targets = Some(Arc::new(targets));
        self
    }

    pub fn with_config(mut self, config: ApiConfig) -> Self {
        self.config = config;
        self
    }
}

fn openapi_service(state: &AppState) -> OpenApiService<routes::Api, ()> {
    OpenApiService::new(routes::api(state.clone()), "drover", env!("CARGO_PKG_VERSION"))
        .description("Enqueue, inspect and cancel background jobs; read queue depths; manage cron schedules.")
}

/// Every route, with problem+json errors, panic recovery, authentication, rate limits, the
/// audit log, security headers, HTTP metrics and a tracing span per request.
///
/// Serves `/v1/…`, `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, `/docs` and
/// `/dashboard`.
pub fn routes(state: AppState) -> impl Endpoint<Output = poem::Response> + 'static {
    let service = openapi_service(&state);
    let original = service.spec();
    let spec = security::spec_with_auth(&original, state.config.metrics_auth);
    let docs = security::docs_endpoint(service.swagger_ui_html(), &original, &spec);
    let labels = metrics::RouteLabels::from_api::<routes::Api>();
    let guard = auth::Guard::new::<routes::Api>(&state);
    let cors = security::cors(&state.config.cors_origins);
    let limit = state.config.request_timeout;
    Route::new()
        .at("/openapi.json", security::spec_endpoint(spec))
        .nest("/docs", docs)
        .nest("/dashboard", dashboard::endpoint())
        .nest("/", service)
        .data(state.config.clone())
        .with(CatchPanic::new().with_handler(error::panic_response))
        .around(move |ep, req| security::deadline(ep, req, limit))
        .around(error::problem_responses)
        .with(guard)
        .with_if(cors.is_some(), cors.unwrap_or_default())
        .around(security::headers)
        .with(metrics::HttpMetrics::new(labels))
        .with(trace::RequestTracing)
}

/// Serves [`routes`] on an already-bound listener until `shutdown` completes, then lets
/// in-flight requests finish for up to [`ApiConfig::shutdown_timeout`].
///
/// Taking a bound listener lets callers bind port 0 and read the port first
/// (`listener.local_addr()`).
pub async fn serve(
    listener: std::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let acceptor = TcpAcceptor::from_std(listener)?;
    if let Some(addr) = acceptor.local_addr().first() {
        tracing::info!(addr = %addr, "HTTP API listening");
    }
    let grace = state.config.shutdown_timeout;
    let idle = state.config.idle_timeout;
    Server::new_with_acceptor(acceptor)
        .idle_timeout(idle)
        .run_with_graceful_shutdown(routes(state), shutdown, Some(grace))
        .await
}
