//! The probe listener of the processes that serve no API (`drover worker`, `drover scheduler`):
//! a small HTTP server of their own for Kubernetes probes and Prometheus.
//!
//! - `GET /healthz` — 200 while the process answers. It stays 200 while the worker drains after
//!   SIGTERM, so a liveness probe never kills a pod that is finishing its jobs.
//! - `GET /readyz` — 200 when the broker (and, for the scheduler, the database) answers within
//!   2 s; 503 when not, or once the process is draining (it takes no new work then).
//! - `GET /metrics` — the process's Prometheus metrics (`drover_jobs_completed_total`,
//!   `drover_job_duration_seconds`, `drover_schedule_ticks_total`, …), the same exporter the API
//!   uses.
//!
//! A worker's readiness leaves the database out: a slow or down database delays job history,
//! never jobs (see `schema::history`). The scheduler cannot fire anything without it (the
//! schedules live there), so its readiness includes it.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    EndpointExt, IntoResponse, Response, Route, Server, get, handler,
    http::StatusCode,
    listener::{Acceptor, TcpAcceptor},
    web::{Data, Json},
};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::json;
use tokio::sync::watch;

/// How long `/readyz` waits for the broker's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct HealthState {
    broker: Arc<dyn jobs::Producer>,
    /// Checked by `/readyz` when set (the scheduler's).
    db: Option<DatabaseConnection>,
    metrics: PrometheusHandle,
    /// `true` once the process stopped taking work (shutdown requested).
    draining: watch::Receiver<bool>,
}

#[handler]
fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[handler]
async fn readyz(state: Data<&HealthState>) -> Response {
    if *state.draining.borrow() {
        return not_ready(json!({"broker": "draining"}));
    }
    let broker = probe(state.broker.ping()).await;
    let database = match &state.db {
        Some(db) => Some(probe(async { db.execute_unprepared("SELECT 1").await.map(drop) }).await),
        None => None,
    };
    let mut checks = serde_json::Map::new();
    checks.insert(
        "broker".into(),
        broker.clone().err().unwrap_or_else(|| "ok".into()).into(),
    );
    if let Some(database) = &database {
        checks.insert(
            "database".into(),
            database.clone().err().unwrap_or_else(|| "ok".into()).into(),
        );
    }
    if broker.is_ok() && database.as_ref().is_none_or(Result::is_ok) {
        Json(json!({"status": "ready", "checks": checks})).into_response()
    } else {
        tracing::warn!(?checks, "not ready");
        not_ready(checks.into())
    }
}

/// `Ok` when `check` answers within [`PROBE_TIMEOUT`]; otherwise what went wrong.
async fn probe<E: std::fmt::Display>(check: impl Future<Output = Result<(), E>>) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::debug!(%error, "readiness check failed");
            Err("unreachable".into())
        }
        Err(_) => Err("no answer within 2000 ms".into()),
    }
}

fn not_ready(checks: serde_json::Value) -> Response {
    let body = Json(json!({"status": "not ready", "checks": checks}));
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

#[handler]
fn metrics(state: Data<&HealthState>) -> String {
    api::metrics::render(&state.metrics)
}

/// Serves the probes on an already bound listener until `stop` resolves. `draining` turns
/// `/readyz` to 503 while running jobs finish; `db`, when given, is part of readiness.
pub async fn serve(
    listener: std::net::TcpListener,
    broker: Arc<dyn jobs::Producer>,
    db: Option<DatabaseConnection>,
    metrics_handle: PrometheusHandle,
    draining: watch::Receiver<bool>,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let acceptor = TcpAcceptor::from_std(listener).context("health listener")?;
    if let Some(addr) = acceptor.local_addr().first() {
        tracing::info!(addr = %addr, "health endpoint listening");
    }
    let state = HealthState {
        broker,
        db,
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
        .context("serving the health endpoint")
}
