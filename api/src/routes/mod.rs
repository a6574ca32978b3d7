//! The HTTP resources, one module each; every module is an `OpenApi` implementation over a
//! clone of [`AppState`](crate::AppState). Every operation has an `operation_id`: the metrics
//! middleware labels requests by the path template it maps to.

use poem_openapi::Tags;

use crate::AppState;

/// `GET /v1/analytics/rollups|anomalies|forecasts|sla|summary`.
pub(crate) mod analytics;
/// `GET /v1/backups`, `GET /v1/backups/{id}`, `POST /v1/backups`.
pub(crate) mod backups;
/// `POST /v1/events`.
pub(crate) mod events;
/// `GET /healthz`, `GET /readyz`, `GET /metrics`.
pub(crate) mod health;
/// `POST /v1/jobs`, `POST /v1/jobs/batch`, `GET /v1/jobs` (search), `GET /v1/jobs/{id}`,
/// `DELETE /v1/jobs/{id}`, `POST /v1/jobs/{id}/retry`.
pub(crate) mod jobs;
/// `GET /v1/queues`, `GET /v1/queues/{queue}`, `…/jobs`, `…/dead`, `GET /v1/activity`.
pub(crate) mod queues;
/// `GET /v1/schedules`, `GET|PUT|DELETE /v1/schedules/{name}`, `PUT …/enabled`.
pub(crate) mod schedules;
/// `PUT|GET /v1/scores/{model}`, `POST …/recompute`, `GET …/runs/{id}`, `GET …/top`,
/// `GET …/subjects/{id}`.
pub(crate) mod scores;
/// `GET /v1/workers`.
pub(crate) mod workers;

/// The whole API, as poem-openapi composes it.
pub(crate) type Api = (
    jobs::JobsApi,
    queues::QueuesApi,
    schedules::SchedulesApi,
    backups::BackupsApi,
    events::EventsApi,
    analytics::AnalyticsApi,
    scores::ScoresApi,
    workers::WorkersApi,
    health::HealthApi,
);

pub(crate) fn api(state: AppState) -> Api {
    (
        jobs::JobsApi::new(state.clone()),
        queues::QueuesApi::new(state.clone()),
        schedules::SchedulesApi::new(state.clone()),
        backups::BackupsApi::new(state.clone()),
        events::EventsApi::new(state.clone()),
        analytics::AnalyticsApi::new(state.clone()),
        scores::ScoresApi::new(state.clone()),
        workers::WorkersApi::new(state.clone()),
        health::HealthApi::new(state),
    )
}

#[derive(Tags)]
pub(crate) enum ApiTags {
    /// Enqueue, inspect and cancel jobs.
    Jobs,
    /// Queue depths and totals (also read by KEDA's metrics-api scaler).
    Queues,
    /// Cron schedules that enqueue a job at each tick.
    Schedules,
    /// Backups: the catalog, and taking one now.
    Backups,
    /// Events for the analytics and scoring families.
    Events,
    /// Rollups, anomalies, forecasts and SLA reports computed from events and job history.
    Analytics,
    /// Scoring models, leaderboards and explained scores.
    Scores,
    /// The worker processes and their heartbeats.
    Workers,
    /// Liveness, readiness and Prometheus metrics.
    Health,
}
