//! The worker's probe listener: a small HTTP server of its own (workers serve no API) for
//! Kubernetes probes and Prometheus.
//!
//! - `GET /healthz` — 200 while the process answers. It stays 200 while the worker drains after
//!   SIGTERM, so a liveness probe never kills a pod that is finishing its jobs.
//! - `GET /readyz` — 200 when the broker answers a ping within 2 s; 503 when it does not, or once
//!   the worker is draining (it takes no new jobs then).
//! - `GET /metrics` — the process's Prometheus metrics (`drover_jobs_completed_total`,
//!   `drover_job_duration_seconds`, `drover_job_wait_seconds`, …), the same exporter the API uses.
//!
//! The database is not part of readiness: a slow or down database delays job history, never
//! jobs (see `schema::history`).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    EndpointExt, IntoResponse, Response, Route, Server, get, handler,
    http::StatusCode,
    listener::{Acceptor, TcpAcceptor},
    web::{Data, Json},
};
use serde_json::json;
use tokio::sync::watch;

/// How long `/readyz` waits for the broker's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct HealthState {
    broker: Arc<dyn jobs::Producer>,
    metrics: PrometheusHandle,
    /// `true` once the worker stopped taking jobs (shutdown requested).
    draining: watch::Receiver<bool>,
}

#[handler]
fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[handler]
async fn readyz(state: Data<&HealthState>) -> Response {
    if *state.draining.borrow() {
        return not_ready("draining");
    }
    match tokio::time::timeout(PROBE_TIMEOUT, state.broker.ping()).await {
        Ok(Ok(())) => Json(json!({"status": "ready", "checks": {"broker": "ok"}})).into_response(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "worker readiness: broker unreachable");
            not_ready("unreachable")
        }
        Err(_) => {
            tracing::warn!(timeout = ?PROBE_TIMEOUT, "worker readiness: broker did not answer");
            not_ready("no answer within 2000 ms")
        }
    }
}

fn not_ready(broker: &str) -> Response {
    let body = Json(json!({"status": "not ready", "checks": {"broker": broker}}));
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

#[handler]
fn metrics(state: Data<&HealthState>) -> String {
    state.metrics.run_upkeep();
    state.metrics.render()
}

/// Serves the probes on an already bound listener until `stop` resolves. `draining` turns
/// `/readyz` to 503 while running jobs finish.
pub async fn serve(
    listener: std::net::TcpListener,
    broker: Arc<dyn jobs::Producer>,
    metrics_handle: PrometheusHandle,
    draining: watch::Receiver<bool>,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let acceptor = TcpAcceptor::from_std(listener).context("worker health listener")?;
    if let Some(addr) = acceptor.local_addr().first() {
        tracing::info!(addr = %addr, "worker health endpoint listening");
    }
    let state = HealthState {
        broker,
        metrics: metrics_handle,
        draining,
    };
    let routes = Route::new()
        .at("/healthz", get(healthz))
        .at("/readyz", get(readyz))
        .at("/metrics", get(metrics))
        .data(state);
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(routes, stop, Some(Duration::from_secs(1)))
        .await
        .context("serving the worker health endpoint")
}
