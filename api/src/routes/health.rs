//! Probes and metrics: `/healthz` (the process answers), `/readyz` (its dependencies answer),
//! `/metrics` (Prometheus text).

use std::{collections::BTreeMap, future::Future, time::Duration};

use poem_openapi::{
    Object, OpenApi,
    payload::{Json, PlainText},
};
use sea_orm::ConnectionTrait;

use super::ApiTags;
use crate::{AppState, error::ApiError, metrics};

pub(crate) struct HealthApi {
    state: AppState,
}

impl HealthApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness
    ///
    /// 200 whenever the process can answer; it checks nothing else.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".to_owned(),
            checks: None,
        })
    }

    /// Readiness
    ///
    /// 200 when the history database answers `SELECT 1` and the broker answers a ping, each
    /// within the probe timeout; otherwise 503 with `checks` naming what failed.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self) -> Result<Json<Health>, ApiError> {
        let timeout = self.state.config.probe_timeout;
        let (database, broker) = tokio::join!(
            probe("database", timeout, self.state.db.execute_unprepared("SELECT 1")),
            probe("broker", timeout, self.state.broker.ping()),
        );
        let ready = database.is_ok() && broker.is_ok();
        let checks: BTreeMap<String, String> = [("database", database), ("broker", broker)]
            .into_iter()
            .map(|(name, state)| (name.to_owned(), state.err().unwrap_or_else(|| "ok".to_owned())))
            .collect();
        if ready {
            Ok(Json(Health {
                status: "ready".to_owned(),
                checks: Some(checks),
            }))
        } else {
            Err(ApiError::NotReady(checks))
        }
    }

    /// Prometheus metrics
    ///
    /// Refreshes `drover_queue_depth` from the broker first (bounded by the probe timeout, so a
    /// down broker delays a scrape by at most that long).
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self) -> PlainText<String> {
        metrics::refresh_queue_depths(self.state.broker.as_ref(), self.state.config.probe_timeout).await;
        PlainText(metrics::render(&self.state.metrics))
    }
}

/// Runs one readiness check; the error says what a client may know (details go to the log).
async fn probe<T, E: std::fmt::Display>(
    name: &str,
    timeout: Duration,
    check: impl Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(check = name, %error, "readiness check failed");
            Err("unreachable".to_owned())
        }
        Err(_) => {
            tracing::warn!(check = name, ?timeout, "readiness check timed out");
            Err(format!("no answer within {} ms", timeout.as_millis()))
        }
    }
}

#[derive(Object)]
pub(crate) struct Health {
    /// `ok` (liveness) or `ready` (readiness).
    status: String,
    /// Readiness: each dependency's state.
    #[oai(skip_serializing_if_is_none)]
    checks: Option<BTreeMap<String, String>>,
}
