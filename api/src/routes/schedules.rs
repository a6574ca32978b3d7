//! Schedules: cron expressions that enqueue a job template at each tick, fired by the
//! scheduler replicas (`drover scheduler`, `drover dev`). Create or replace, read, list, delete.
//!
//! A body is checked field by field so that every bad field is reported at once: the cron
//! expression and timezone by `jobs::schedule`, the job template against the job catalog (the
//! same problem types as `POST /v1/jobs`: `unknown-kind`, `invalid-payload`, `invalid-queue`),
//! with fields named from the body's root (`cron`, `job.kind`, `job.payload.ms`).

use chrono::{DateTime, Utc};
use jobs::schedule::{CronSchedule, JobTemplate, MissedTicks, ScheduleName, TemplateError};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, param::Path, payload::Json};
use schema::{
    entity::{schedule, schedule_tick},
    schedules::{self, Origin, Put, PutError, ScheduleWrite},
};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::ApiTags;
use crate::{
    ApiConfig, AppState,
    enqueue::payload_error,
    error::{ApiError, FieldError, ProblemType},
    payload::{BodySchema, JsonBody},
};

/// Ticks `GET /v1/schedules/{name}` shows.
const RECENT_TICKS: u64 = 10;

pub(crate) struct SchedulesApi {
    state: AppState,
}

impl SchedulesApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Schedules")]
impl SchedulesApi {
    /// List schedules
    ///
    /// Every schedule, by name, with its last and next tick.
    #[oai(path = "/v1/schedules", method = "get", operation_id = "listSchedules")]
    async fn list(&self) -> Result<Json<ScheduleList>, ApiError> {
        let rows = schedules::list(&self.state.db).await?;
        Ok(Json(ScheduleList {
            schedules: rows
                .into_iter()
                .map(|r| ScheduleDetails::from_row(r, None))
                .collect(),
        }))
    }

    /// Read a schedule
    ///
    /// The schedule and its most recent ticks (up to 10, newest first): when each fired, which
    /// job it enqueued, and whether the broker has it yet.
    #[oai(path = "/v1/schedules/:name", method = "get", operation_id = "getSchedule")]
    async fn get(&self, name: Path<String>) -> Result<Json<ScheduleDetails>, ApiError> {
        let Some(row) = schedules::get(&self.state.db, &name).await? else {
            return Err(not_found(&name));
        };
        let ticks = schedules::recent_ticks(&self.state.db, &name, RECENT_TICKS).await?;
        Ok(Json(ScheduleDetails::from_row(row, Some(ticks))))
    }

    /// Create or replace a schedule
    ///
    /// 201 when the name is new, 200 when it replaces a schedule. While the expression,
    /// timezone and `enabled` stay the same, a replacement keeps the pending next tick (editing
    /// the job never drops or repeats a tick); otherwise the schedule restarts from the next
    /// tick after now. Replacing a default from the config file makes it the operator's: the
    /// config file never overwrites it.
    #[oai(path = "/v1/schedules/:name", method = "put", operation_id = "putSchedule")]
    async fn put(
        &self,
        name: Path<String>,
        body: JsonBody<ScheduleRequest>,
    ) -> Result<PutResponse, ApiError> {
        let (write, cron) = validate(&name, body.value()?, &self.state.catalog)
            .map_err(|errors| ApiError::Invalid { errors, batch: false })?;
        let now = Utc::now();
        let put = schedules::put(&self.state.db, &write, cron.next_after(now), now)
            .await
            .map_err(put_error)?;
        Ok(match put {
            Put::Created(row) => {
                let location = format!("/v1/schedules/{}", row.name);
                PutResponse::Created(Json(ScheduleDetails::from_row(row, None)), location)
            }
            Put::Updated(row) => PutResponse::Replaced(Json(ScheduleDetails::from_row(row, None))),
        })
    }

    /// Enable or disable a schedule
    ///
    /// Body `{"enabled": true|false}`; the rest of the schedule stays. A disabled schedule
    /// fires nothing; enabling one starts from its next tick after now (`next_tick` in the
    /// answer). Like any `PUT`, it makes a config-file default the operator's. Role: operator.
    #[oai(
        path = "/v1/schedules/:name/enabled",
        method = "put",
        operation_id = "setScheduleEnabled"
    )]
    async fn set_enabled(
        &self,
        name: Path<String>,
        body: JsonBody<EnabledRequest>,
    ) -> Result<Json<ScheduleDetails>, ApiError> {
        let enabled = match body.value()? {
            Value::Object(map) if map.len() == 1 && map.get("enabled").is_some_and(Value::is_boolean) => {
                map["enabled"].as_bool().unwrap_or_default()
            }
            _ => {
                return Err(ApiError::Invalid {
                    errors: vec![FieldError::new(
                        ProblemType::InvalidField,
                        "enabled",
                        "the body must be {\"enabled\": true} or {\"enabled\": false}",
                    )],
                    batch: false,
                });
            }
        };
        // A name no schedule can have (one `PUT` would refuse) names no schedule.
        if ScheduleName::parse(&name).is_err() {
            return Err(not_found(&name));
        }
        let Some(row) = schedules::get(&self.state.db, &name).await? else {
            return Err(not_found(&name));
        };
        let cron = CronSchedule::parse(&row.cron, Some(&row.timezone))
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored schedule {:?}: {e}", row.name)))?;
        let write = ScheduleWrite {
            name: row.name,
            cron: row.cron,
            timezone: row.timezone,
            kind: row.kind,
            payload: row.payload,
            queue: row.queue,
            priority: row.priority,
            enabled,
            missed_ticks: row.missed_ticks,
            origin: Origin::Api,
        };
        let now = Utc::now();
        let put = schedules::put(&self.state.db, &write, cron.next_after(now), now)
            .await
            .map_err(put_error)?;
        let (Put::Created(row) | Put::Updated(row)) = put;
        Ok(Json(ScheduleDetails::from_row(row, None)))
    }

    /// Delete a schedule
    ///
    /// No tick fires after this; a tick already claimed is still enqueued. A default from the
    /// config file stays deleted across restarts (`PUT` it to bring it back).
    #[oai(
        path = "/v1/schedules/:name",
        method = "delete",
        operation_id = "deleteSchedule"
    )]
    async fn delete(&self, name: Path<String>) -> Result<DeleteResponse, ApiError> {
        if schedules::delete(&self.state.db, &name, Utc::now()).await? {
            Ok(DeleteResponse::Deleted)
        } else {
            Err(not_found(&name))
        }
    }
}

fn put_error(e: PutError) -> ApiError {
    match e {
        PutError::Db(e) => ApiError::from(e),
        PutError::Contended(e) => ApiError::DatabaseUnavailable(e.into()),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no schedule is named {name:?}"))
}

/// Checks a `PUT` body and the name in the path; returns every problem at once, the most
/// telling first (unknown kind, payload, queue, then the rest).
fn validate(
    name: &str,
    body: Value,
    catalog: &jobs::Catalog,
) -> Result<(ScheduleWrite, CronSchedule), Vec<FieldError>> {
    let mut errors = Vec::new();
    let invalid = |field: &str, reason: String| FieldError::new(ProblemType::InvalidField, field, reason);
    if let Err(reason) = ScheduleName::parse(name) {
        errors.push(invalid("name", reason));
    }
    let Value::Object(map) = body else {
        errors.push(invalid("schedule", "the body must be a JSON object".into()));
        return Err(errors);
    };
    let mut cron = None;
    let mut timezone = None;
    let mut job = None;
    let mut enabled = true;
    let mut missed_ticks = MissedTicks::default();
    for (key, value) in map {
        if value.is_null() && key != "cron" && key != "job" {
            continue;
        }
        match key.as_str() {
            "cron" => match value {
                Value::String(s) if !s.trim().is_empty() => cron = Some(s),
                _ => errors.push(invalid(
                    "cron",
                    "must be a cron expression string, e.g. \"0 2 * * *\"".into(),
                )),
            },
            "timezone" => match value {
                Value::String(s) => timezone = Some(s),
                _ => errors.push(invalid("timezone", "must be an IANA timezone name string".into())),
            },
            "job" => job = read_template(value, &mut errors),
            "enabled" => match value {
                Value::Bool(b) => enabled = b,
                _ => errors.push(invalid("enabled", "must be true or false".into())),
            },
            "missed_ticks" => match value.as_str().map(str::parse::<MissedTicks>) {
                Some(Ok(policy)) => missed_ticks = policy,
                Some(Err(reason)) => errors.push(invalid("missed_ticks", reason)),
                None => errors.push(invalid("missed_ticks", "must be \"skip\" or \"run_once\"".into())),
            },
            other => errors.push(invalid(other, "unknown field".into())),
        }
    }
    if !errors.iter().any(|e| e.field == "cron") && cron.is_none() {
        errors.push(invalid("cron", "is required".into()));
    }
    if !errors.iter().any(|e| e.field.starts_with("job")) && job.is_none() {
        errors.push(invalid(
            "job",
            "is required: {\"kind\": …, \"payload\": {…}}".into(),
        ));
    }
    let parsed = cron
        .as_deref()
        .and_then(|expr| match CronSchedule::parse(expr, timezone.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(invalid(e.field(), e.to_string()));
                None
            }
        });
    if let Some(template) = &job
        && let Err(problems) = template.validate(catalog)
    {
        errors.extend(problems.into_iter().map(|p| template_error(template, p)));
    }
    errors.sort_by_key(|e| match e.kind {
        ProblemType::UnknownKind => 0,
        ProblemType::InvalidPayload => 1,
        ProblemType::InvalidQueue => 2,
        _ => 3,
    });
    match (parsed, job, cron) {
        (Some(parsed), Some(job), Some(cron)) if errors.is_empty() => Ok((
            ScheduleWrite {
                name: name.to_owned(),
                cron: cron.trim().to_owned(),
                timezone: parsed.timezone().name().to_owned(),
                kind: job.kind,
                payload: job.payload,
                queue: job.queue,
                priority: job.priority,
                enabled,
                missed_ticks: missed_ticks.as_str().to_owned(),
                origin: Origin::Api,
            },
            parsed,
        )),
        _ => Err(errors),
    }
}

/// The `job` member, with each field's JSON type checked; `None` if it cannot be a template.
fn read_template(value: Value, errors: &mut Vec<FieldError>) -> Option<JobTemplate> {
    let invalid = |field: &str, reason: &str| FieldError::new(ProblemType::InvalidField, field, reason);
    let Value::Object(map) = value else {
        errors.push(invalid(
            "job",
            "must be an object: {\"kind\": …, \"payload\": {…}}",
        ));
        return None;
    };
    let before = errors.len();
    let (mut kind, mut payload, mut queue, mut priority) = (None, None, None, None);
    for (key, value) in map {
        if value.is_null() && key != "kind" {
            continue;
        }
        match key.as_str() {
            "kind" => match value {
                Value::String(s) if !s.is_empty() => kind = Some(s),
                _ => errors.push(invalid("job.kind", "must be a non-empty string")),
            },
            "payload" => payload = Some(value),
            "queue" => match value {
                Value::String(s) => queue = Some(s),
                _ => errors.push(invalid("job.queue", "must be a string")),
            },
            "priority" => match value.as_i64().and_then(|n| i32::try_from(n).ok()) {
                Some(n) => priority = Some(n),
                None => errors.push(invalid("job.priority", "must be a 32-bit signed integer")),
            },
            other => errors.push(invalid(&format!("job.{other}"), "unknown field")),
        }
    }
    if kind.is_none() && !errors[before..].iter().any(|e| e.field == "job.kind") {
        errors.push(invalid("job.kind", "is required"));
    }
    Some(JobTemplate {
        kind: kind?,
        payload: payload.unwrap_or_else(|| Value::Object(Map::new())),
        queue,
        priority,
    })
    .filter(|_| errors.len() == before)
}

fn template_error(template: &JobTemplate, e: TemplateError) -> FieldError {
    match e {
        TemplateError::UnknownKind(reason) => FieldError::new(ProblemType::UnknownKind, "job.kind", reason),
        TemplateError::InvalidPayload(reason) => {
            let raw = serde_json::to_string(&template.payload).unwrap_or_default();
            let (field, reason) = payload_error(&raw, &reason);
            FieldError::new(ProblemType::InvalidPayload, format!("job.{field}"), reason)
        }
        TemplateError::InvalidQueue(reason) => {
            FieldError::new(ProblemType::InvalidQueue, "job.queue", reason)
        }
    }
}

/// A schedule to create or replace (the name is in the path).
#[derive(Object)]
pub(crate) struct ScheduleRequest {
    /// Cron expression: 5 fields (`min hour day-of-month month day-of-week`), 6 with seconds
    /// first, or 7 with a year last; or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    /// Days of the week as in crontab (0 or 7 = Sunday) or by name (`MON-FRI`).
    cron: String,
    /// IANA timezone the expression is read in (`Europe/Berlin`); default `UTC`.
    timezone: Option<String>,
    job: JobTemplateBody,
    /// Default true. A disabled schedule fires nothing; enabling it starts from the next tick.
    enabled: Option<bool>,
    /// What to do with ticks missed while no scheduler ran (beyond the misfire grace): `skip`
    /// (default) or `run_once` (one job for all of them).
    missed_ticks: Option<MissedTicksPolicy>,
}

impl BodySchema for ScheduleRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_body_bytes
    }
}

/// Whether a schedule fires.
#[derive(Object)]
pub(crate) struct EnabledRequest {
    enabled: bool,
}

impl BodySchema for EnabledRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_body_bytes
    }
}

/// The job each tick enqueues.
#[derive(Object)]
pub(crate) struct JobTemplateBody {
    /// A kind from the job catalog (`noop`, `sleep`, …).
    kind: String,
    /// The kind's payload; `{}` when absent.
    payload: Option<Value>,
    /// The queue to use instead of the kind's own.
    queue: Option<String>,
    /// Higher runs first within the queue; default 0.
    priority: Option<i32>,
}

#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub(crate) enum MissedTicksPolicy {
    /// Missed ticks are dropped; the schedule resumes at its next tick.
    Skip,
    /// One job is enqueued for the latest missed tick, however many were missed.
    RunOnce,
}

#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub(crate) enum ScheduleOrigin {
    /// Written through this API.
    Api,
    /// A `[[schedules]]` default from the config file, not edited since.
    Config,
}

#[derive(Object)]
pub(crate) struct ScheduleList {
    schedules: Vec<ScheduleDetails>,
}

/// A schedule.
#[derive(Object)]
pub(crate) struct ScheduleDetails {
    name: String,
    cron: String,
    timezone: String,
    job: JobTemplateView,
    enabled: bool,
    missed_ticks: MissedTicksPolicy,
    origin: ScheduleOrigin,
    /// The latest tick fired.
    #[oai(skip_serializing_if_is_none)]
    last_tick: Option<DateTime<Utc>>,
    /// The next tick to fire; absent while disabled.
    #[oai(skip_serializing_if_is_none)]
    next_tick: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The most recent ticks, newest first (`GET /v1/schedules/{name}` only).
    #[oai(skip_serializing_if_is_none)]
    recent_ticks: Option<Vec<TickDetails>>,
}

/// The job a schedule enqueues.
#[derive(Object)]
pub(crate) struct JobTemplateView {
    kind: String,
    payload: Value,
    #[oai(skip_serializing_if_is_none)]
    queue: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    priority: Option<i32>,
}

/// One firing of a schedule.
#[derive(Object)]
pub(crate) struct TickDetails {
    /// The tick's time; the job's idempotency key is `schedule:{name}:{tick}`.
    tick: DateTime<Utc>,
    /// The job enqueued for it (`GET /v1/jobs/{id}`).
    job_id: Uuid,
    /// When the broker accepted the job; absent while the tick waits to be enqueued.
    #[oai(skip_serializing_if_is_none)]
    enqueued_at: Option<DateTime<Utc>>,
    /// Scheduled ticks this firing stands for: 1, or the missed ticks of a `run_once` firing.
    stands_for: i64,
    /// The scheduler replica that claimed (or took over) the tick.
    replica: String,
}

impl ScheduleDetails {
    fn from_row(r: schedule::Model, ticks: Option<Vec<schedule_tick::Model>>) -> Self {
        Self {
            name: r.name,
            cron: r.cron,
            timezone: r.timezone,
            job: JobTemplateView {
                kind: r.kind,
                payload: r.payload,
                queue: r.queue,
                priority: r.priority,
            },
            enabled: r.enabled,
            missed_ticks: match r.missed_ticks.parse::<MissedTicks>().unwrap_or_default() {
                MissedTicks::Skip => MissedTicksPolicy::Skip,
                MissedTicks::RunOnce => MissedTicksPolicy::RunOnce,
            },
            origin: if r.origin == Origin::Config.as_str() {
                ScheduleOrigin::Config
            } else {
                ScheduleOrigin::Api
            },
            last_tick: r.last_tick,
            next_tick: r.next_tick,
            created_at: r.created_at,
            updated_at: r.updated_at,
            recent_ticks: ticks.map(|ticks| {
                ticks
                    .into_iter()
                    .map(|t| TickDetails {
                        tick: t.tick_at,
                        job_id: t.job_id,
                        enqueued_at: t.enqueued_at,
                        stands_for: t.stands_for,
                        replica: t.claimed_by,
                    })
                    .collect()
            }),
        }
    }
}

#[derive(ApiResponse)]
pub(crate) enum PutResponse {
    /// Created; `Location` is the schedule's URL.
    #[oai(status = 201)]
    Created(Json<ScheduleDetails>, #[oai(header = "Location")] String),
    /// Replaced.
    #[oai(status = 200)]
    Replaced(Json<ScheduleDetails>),
}

#[derive(ApiResponse)]
pub(crate) enum DeleteResponse {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(errors: &[FieldError]) -> Vec<(&str, ProblemType)> {
        errors.iter().map(|e| (e.field.as_str(), e.kind)).collect()
    }

    #[test]
    fn a_valid_body_becomes_a_write_in_the_given_timezone() {
        let catalog = jobs::Catalog::default();
        let body = json!({"cron": "0 2 * * *", "timezone": "Europe/Berlin",
                          "job": {"kind": "sleep", "payload": {"ms": 1}, "priority": 2},
                          "missed_ticks": "run_once"});
        let (w, cron) = validate("nightly", body, &catalog).unwrap();
        assert_eq!(
            (
                w.timezone.as_str(),
                w.missed_ticks.as_str(),
                w.priority,
                w.enabled
            ),
            ("Europe/Berlin", "run_once", Some(2), true)
        );
        assert_eq!(cron.expression(), "0 2 * * *");
    }

    #[test]
    fn every_bad_field_is_named_with_the_unknown_kind_first() {
        let catalog = jobs::Catalog::default();
        let body = json!({"cron": "0 2 * *", "job": {"kind": "nope", "queue": "Bad Queue"},
                          "enabled": "yes", "colour": 1});
        let errors = validate("Bad Name", body, &catalog).unwrap_err();
        let got = fields(&errors);
        assert_eq!(got[0], ("job.kind", ProblemType::UnknownKind));
        for f in ["name", "cron", "job.queue", "enabled", "colour"] {
            assert!(
                got.iter().any(|(field, _)| *field == f),
                "{f} missing from {got:?}"
            );
        }
    }

    #[test]
    fn a_bad_payload_is_named_inside_the_job() {
        let catalog = jobs::Catalog::default();
        let body = json!({"cron": "* * * * *", "job": {"kind": "sleep", "payload": {"ms": "soon"}}});
        let errors = validate("s", body, &catalog).unwrap_err();
        assert_eq!(fields(&errors), [("job.payload.ms", ProblemType::InvalidPayload)]);
    }

    #[test]
    fn missing_cron_and_job_are_required() {
        let catalog = jobs::Catalog::default();
        let errors = validate("s", json!({}), &catalog).unwrap_err();
        let got = fields(&errors);
        assert!(got.contains(&("cron", ProblemType::InvalidField)), "{got:?}");
        assert!(got.contains(&("job", ProblemType::InvalidField)), "{got:?}");
        let errors = validate("s", json!({"cron": "* * * * *", "job": {}}), &catalog).unwrap_err();
        assert_eq!(fields(&errors), [("job.kind", ProblemType::InvalidField)]);
    }
}
