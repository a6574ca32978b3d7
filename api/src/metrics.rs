//! Prometheus metrics: the names (a contract — dashboards, alerts and KEDA use them), the
//! process-wide recorder, the HTTP middleware, and the queue-depth gauges refreshed on scrape.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::{Endpoint, IntoResponse, Middleware, PathPattern, Request, Response};
use poem_openapi::{OpenApi, OperationId};

// The names recorded below the API (workers, brokers, scheduler, history writers), gathered
// here so that this module lists every name drover exports.
pub use jobs::metrics::{
    BROKER_REQUEST_DURATION_SECONDS, JOB_DURATION_SECONDS, JOB_WAIT_SECONDS, JOBS_COMPLETED_TOTAL,
    JOBS_ENQUEUED_TOTAL, SCHEDULE_MISSED_TICKS_TOTAL, SCHEDULE_TICK_DELAY_SECONDS, SCHEDULE_TICKS_TOTAL,
    WORKER_BUSY_SLOTS, WORKER_HEARTBEAT_TIMESTAMP_SECONDS, WORKER_SLOTS,
};
pub use schema::history::{HISTORY_DROPPED_EVENTS_TOTAL, HISTORY_LAG_EVENTS, HISTORY_LAG_SECONDS};

/// Counter `{route, status}`: HTTP requests answered, by route template and status code.
pub const HTTP_REQUESTS_TOTAL: &str = "drover_http_requests_total";
/// Histogram `{route}`: time to produce a response (headers ready), in seconds.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "drover_http_request_duration_seconds";
/// Gauge `{queue, state}`: jobs per queue in `pending`, `scheduled`, `running` and `dead`,
/// refreshed from the broker whenever `/metrics` is scraped.
pub const QUEUE_DEPTH: &str = "drover_queue_depth";

/// Counter `{cache, result}`: reads of cached read models (`leaderboard`,
/// `analytics-summary`), `hit` when Redis had it, `miss` when the request computed it (every
/// read is a miss when no cache is configured).
pub const CACHE_REQUESTS_TOTAL: &str = "drover_cache_requests_total";

/// The kind of a Prometheus metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric drover exports, with its kind and labels: what dashboards and alert rules may
/// name (tests check `deploy/` against it, and docs/observability.md documents each).
pub const EXPORTED: &[(&str, MetricKind, &[&str])] = &[
    (JOBS_ENQUEUED_TOTAL, MetricKind::Counter, &["queue", "kind"]),
    (
        JOBS_COMPLETED_TOTAL,
        MetricKind::Counter,
        &["queue", "kind", "outcome"],
    ),
    (JOB_DURATION_SECONDS, MetricKind::Histogram, &["queue", "kind"]),
    (JOB_WAIT_SECONDS, MetricKind::Histogram, &["queue"]),
    (QUEUE_DEPTH, MetricKind::Gauge, &["queue", "state"]),
    (HTTP_REQUESTS_TOTAL, MetricKind::Counter, &["route", "status"]),
    (HTTP_REQUEST_DURATION_SECONDS, MetricKind::Histogram, &["route"]),
    (CACHE_REQUESTS_TOTAL, MetricKind::Counter, &["cache", "result"]),
    (
        BROKER_REQUEST_DURATION_SECONDS,
        MetricKind::Histogram,
        &["operation"],
    ),
    (WORKER_HEARTBEAT_TIMESTAMP_SECONDS, MetricKind::Gauge, &["queue"]),
    (WORKER_SLOTS, MetricKind::Gauge, &["queue"]),
    (WORKER_BUSY_SLOTS, MetricKind::Gauge, &["queue"]),
    (HISTORY_LAG_EVENTS, MetricKind::Gauge, &["writer"]),
    (HISTORY_LAG_SECONDS, MetricKind::Gauge, &["writer"]),
    (HISTORY_DROPPED_EVENTS_TOTAL, MetricKind::Counter, &["writer"]),
    (SCHEDULE_TICKS_TOTAL, MetricKind::Counter, &["schedule"]),
    (SCHEDULE_MISSED_TICKS_TOTAL, MetricKind::Counter, &["schedule"]),
    (SCHEDULE_TICK_DELAY_SECONDS, MetricKind::Histogram, &["schedule"]),
];

/// Renders the process's metrics for a scrape, after bringing the gauges that are computed on
/// scrape (the history writers' lag) up to date.
pub fn render(handle: &PrometheusHandle) -> String {
    schema::history::publish_metrics();
    handle.run_upkeep();
    handle.render()
}

/// The `route` label of requests no route matched (kept to one value to bound cardinality).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Histogram buckets, in seconds: sub-millisecond HTTP calls up to hour-long jobs (the
/// recorder is process-wide, so the workers' `drover_job_duration_seconds` shares them).
const BUCKETS: [f64; 21] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on first call and returns its handle; later
/// calls return the same handle, so tests and `drover dev` (API and workers in one process)
/// can all call it.
///
/// If some other recorder was installed first, metrics go to that one and the handle returned
/// here renders nothing; a warning says so.
pub fn install_metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .expect("the bucket list is not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    handle
                }
                Err(error) => {
                    tracing::warn!(%error, "another metrics recorder is installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(JOBS_ENQUEUED_TOTAL, "Jobs accepted by the API");
    metrics::describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered");
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer an HTTP request"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Jobs per queue and state, as of the last scrape");
    metrics::describe_counter!(
        CACHE_REQUESTS_TOTAL,
        "Reads of cached read models, by cache and result"
    );
    metrics::describe_counter!(JOBS_COMPLETED_TOTAL, "Attempts finished, by outcome");
    metrics::describe_histogram!(
        JOB_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "How long an attempt's handler ran"
    );
    metrics::describe_histogram!(
        JOB_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "From a job being due to its attempt starting"
    );
    metrics::describe_histogram!(
        BROKER_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "One broker call (enqueue, fetch, settle, renew, release)"
    );
    metrics::describe_gauge!(
        WORKER_HEARTBEAT_TIMESTAMP_SECONDS,
        metrics::Unit::Seconds,
        "Unix time of the last broker call a queue's worker completed"
    );
    metrics::describe_gauge!(WORKER_SLOTS, "Attempts a queue's worker runs at once");
    metrics::describe_gauge!(WORKER_BUSY_SLOTS, "Attempts running now");
    metrics::describe_gauge!(
        HISTORY_LAG_EVENTS,
        "Events recorded, not yet written to the database"
    );
    metrics::describe_gauge!(
        HISTORY_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest unwritten event"
    );
    metrics::describe_counter!(
        HISTORY_DROPPED_EVENTS_TOTAL,
        "Events dropped because the writer's queue was full"
    );
    // The scheduler describes its own (`workers::scheduler`).
}

/// `drover_jobs_enqueued_total` handles by queue, then kind: registered once per pair, so that
/// an enqueue neither allocates label strings nor hashes a label set in the registry.
static ENQUEUED: OnceLock<RwLock<HashMap<String, HashMap<String, Counter>>>> = OnceLock::new();

pub(crate) fn job_enqueued(queue: &str, kind: &str) {
    let handles = ENQUEUED.get_or_init(RwLock::default);
    let known = handles
        .read()
        .expect("metric handles poisoned")
        .get(queue)
        .and_then(|kinds| kinds.get(kind))
        .cloned();
    let counter = known.unwrap_or_else(|| {
        let counter =
            metrics::counter!(JOBS_ENQUEUED_TOTAL, "queue" => queue.to_owned(), "kind" => kind.to_owned());
        handles
            .write()
            .expect("metric handles poisoned")
            .entry(queue.to_owned())
            .or_default()
            .insert(kind.to_owned(), counter.clone());
        counter
    });
    counter.increment(1);
}

/// Counts one read of cache `cache` (a handful of fixed names: the label set stays small).
pub(crate) fn cache_request(cache: &'static str, result: jobs::cache::CacheResult) {
    metrics::counter!(CACHE_REQUESTS_TOTAL, "cache" => cache, "result" => result.as_str()).increment(1);
}

/// Sets the queue-depth gauges from the broker's statistics; gives up after `timeout` so that
/// a down broker cannot hang a scrape (the gauges then keep their previous values).
pub(crate) async fn refresh_queue_depths(broker: &dyn jobs::Producer, timeout: Duration) {
    let refresh = async {
        let queues = broker.queues().await?;
        let stats = futures::future::join_all(queues.iter().map(|q| broker.stats(q))).await;
        for (queue, stats) in queues.iter().zip(stats) {
            match stats {
                Ok(s) => {
                    for (state, n) in [
                        ("pending", s.pending),
                        ("scheduled", s.scheduled),
                        ("running", s.running),
                        ("dead", s.dead),
                    ] {
                        metrics::gauge!(QUEUE_DEPTH, "queue" => queue.to_string(), "state" => state)
                            .set(n as f64);
                    }
                }
                Err(error) => tracing::warn!(%queue, %error, "queue statistics unavailable"),
            }
        }
        Ok::<_, jobs::BrokerError>(())
    };
    match tokio::time::timeout(timeout, refresh).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "queue depths not refreshed"),
        Err(_) => tracing::warn!(
            ?timeout,
            "queue depths not refreshed: the broker did not answer in time"
        ),
    }
}

/// Maps OpenAPI operation ids to their path templates (`/v1/jobs/{id}`): poem-openapi's router
/// knows its paths only as `/v1/jobs/:param0`, but every operation tags its response with its
/// id.
pub(crate) struct RouteLabels {
    by_operation: HashMap<&'static str, Arc<str>>,
}

impl RouteLabels {
    pub(crate) fn from_api<T: OpenApi>() -> Self {
        let by_operation = T::meta()
            .into_iter()
            .flat_map(|api| api.paths)
            .flat_map(|path| {
                let template: Arc<str> = path.path.into();
                path.operations
                    .into_iter()
                    .filter_map(move |op| Some((op.operation_id?, template.clone())))
            })
            .collect();
        Self { by_operation }
    }

    /// The route label of a response: its operation's template, else the pattern poem matched
    /// (`/openapi.json`, `/docs`), else [`UNMATCHED_ROUTE`].
    fn label(&self, resp: &Response) -> Arc<str> {
        if let Some(template) = resp
            .data::<OperationId>()
            .and_then(|op| self.by_operation.get(op.0))
        {
            return template.clone();
        }
        match resp.data::<PathPattern>() {
            // A 404 under a nested router carries the nest's pattern, not a route of its own;
            // parameterised patterns are poem-openapi's (`:param0`) and handled above.
            Some(p) if resp.status() != poem::http::StatusCode::NOT_FOUND && !p.0.contains(':') => {
                p.0.clone()
            }
            _ => UNMATCHED_ROUTE.into(),
        }
    }
}

/// Counts and times every request by route template and status.
pub(crate) struct HttpMetrics {
    labels: Arc<RouteLabels>,
}

impl HttpMetrics {
    pub(crate) fn new(labels: RouteLabels) -> Self {
        Self {
            labels: Arc::new(labels),
        }
    }
}

impl<E: Endpoint> Middleware<E> for HttpMetrics {
    type Output = HttpMetricsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        HttpMetricsEndpoint {
            inner,
            labels: self.labels.clone(),
        }
    }
}

pub(crate) struct HttpMetricsEndpoint<E> {
    inner: E,
    labels: Arc<RouteLabels>,
}

impl<E: Endpoint> Endpoint for HttpMetricsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let resp = match self.inner.call(req).await {
            Ok(resp) => resp.into_response(),
            Err(err) => err.into_response(),
        };
        let route = self.labels.label(&resp);
        metrics::counter!(
            HTTP_REQUESTS_TOTAL,
            "route" => route.clone(),
            "status" => resp.status().as_str().to_owned()
        )
        .increment(1);
        metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route)
            .record(started.elapsed().as_secs_f64());
        Ok(resp)
    }
}
