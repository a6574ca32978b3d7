//! `POST /v1/events`: batches of events for the analytics and scoring families, stored in one
//! statement. All or nothing: a batch with an invalid event stores none and lists every bad
//! field of every bad event (`index`, `field`, `reason`).

use chrono::{DateTime, Utc};
use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json};
use schema::events::NewEvent;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiTags;
use crate::{
    ApiConfig, AppState,
    error::{ApiError, FieldError, ProblemType},
    payload::{BodySchema, JsonBody},
};

/// Longest event name.
pub(crate) const MAX_NAME: usize = 128;
/// Longest subject.
pub(crate) const MAX_SUBJECT: usize = 256;

pub(crate) struct EventsApi {
    state: AppState,
}

impl EventsApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "ApiTags::Events")]
impl EventsApi {
    /// Ingest events
    ///
    /// Stores a batch of events (at most 10 000 per request). An event whose `attrs.error` is
    /// `true` counts as a failure in the rollups' error rate. Nothing is stored unless every
    /// event is valid.
    #[oai(path = "/v1/events", method = "post", operation_id = "ingestEvents")]
    async fn ingest(&self, body: JsonBody<EventBatch>) -> Result<IngestResponse, ApiError> {
        let now = Utc::now();
        let max = self.state.config.max_batch_jobs;
        let events = match fast(&body.bytes, now, max) {
            Some(events) => events,
            None => slow(body.value()?, now, max)?,
        };
        let n = schema::events::insert(&self.state.db, &events).await?;
        Ok(IngestResponse::Accepted(Json(Ingested { ingested: n })))
    }
}

/// The body of `POST /v1/events`.
#[derive(Object)]
pub(crate) struct EventBatch {
    events: Vec<EventIn>,
}

/// One event.
#[derive(Object)]
pub(crate) struct EventIn {
    /// What happened: 1–128 characters of `A-Z a-z 0-9 . _ - : /`.
    name: String,
    /// Whom it happened to: 1–256 characters.
    subject: String,
    /// The measure (a duration, an amount); default 1.
    value: Option<f64>,
    /// When it happened (RFC 3339); default: when it was received.
    ts: Option<DateTime<Utc>>,
    /// Free-form attributes (an object); `"error": true` marks a failure.
    attrs: Option<Value>,
}

impl BodySchema for EventBatch {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_batch_body_bytes
    }
}

#[derive(Object)]
pub(crate) struct Ingested {
    /// Events stored.
    ingested: u64,
}

#[derive(ApiResponse)]
pub(crate) enum IngestResponse {
    /// Stored.
    #[oai(status = 202)]
    Accepted(Json<Ingested>),
}

/// The strict reading: a body of well-typed events with no unknown field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickBatch {
    events: Vec<Quick>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Quick {
    name: String,
    subject: String,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    ts: Option<DateTime<Utc>>,
    #[serde(default)]
    attrs: Option<Map<String, Value>>,
}

/// Every event when the whole body reads strictly and passes the checks; `None` sends it to
/// [`slow`], which says what is wrong.
fn fast(body: &[u8], now: DateTime<Utc>, max: usize) -> Option<Vec<NewEvent>> {
    let batch: QuickBatch = serde_json::from_slice(body).ok()?;
    if batch.events.is_empty() || batch.events.len() > max {
        return None;
    }
    batch
        .events
        .into_iter()
        .map(|q| {
            (name_problem(&q.name).is_none() && subject_problem(&q.subject).is_none()).then_some(())?;
            let value = q.value.unwrap_or(1.0);
            value.is_finite().then_some(())?;
            let error = q.attrs.as_ref().is_some_and(is_error);
            Some(NewEvent {
                name: q.name,
                subject: q.subject,
                value,
                ts: q.ts.unwrap_or(now),
                attrs: q.attrs.map(Value::Object),
                error,
            })
        })
        .collect()
}

fn is_error(attrs: &Map<String, Value>) -> bool {
    attrs.get("error") == Some(&Value::Bool(true))
}

fn name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    (!ok).then(|| format!("must be 1 to {MAX_NAME} characters of A-Z, a-z, 0-9, '.', '_', '-', ':', '/'"))
}

fn subject_problem(subject: &str) -> Option<String> {
    let ok = !subject.is_empty() && subject.len() <= MAX_SUBJECT && !subject.chars().any(char::is_control);
    (!ok).then(|| format!("must be 1 to {MAX_SUBJECT} bytes without control characters"))
}

/// Validates field by field, collecting every problem.
fn slow(body: Value, now: DateTime<Utc>, max: usize) -> Result<Vec<NewEvent>, ApiError> {
    let top = |reason: &str| {
        ApiError::InvalidEvents(vec![FieldError::new(ProblemType::InvalidEvent, "events", reason)])
    };
    let Value::Object(mut body) = body else {
        return Err(top("the body must be an object {\"events\": [...]}"));
    };
    let Some(Value::Array(items)) = body.remove("events") else {
        return Err(top("must be an array of events"));
    };
    let mut errors: Vec<FieldError> = body
        .keys()
        .map(|k| FieldError::new(ProblemType::InvalidEvent, k.clone(), "unknown field"))
        .collect();
    if items.is_empty() || items.len() > max {
        return Err(top(&format!("must hold 1 to {max} events")));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let mut bad = |field: &str, reason: String| {
            errors.push(FieldError::new(ProblemType::InvalidEvent, field, reason).at(i));
        };
        let Value::Object(mut e) = item else {
            bad("", "must be an object".into());
            continue;
        };
        let name = match e.remove("name") {
            Some(Value::String(s)) => {
                if let Some(r) = name_problem(&s) {
                    bad("name", r);
                }
                s
            }
            Some(_) => {
                bad("name", "must be a string".into());
                String::new()
            }
            None => {
                bad("name", "is required".into());
                String::new()
            }
        };
        let subject = match e.remove("subject") {
            Some(Value::String(s)) => {
                if let Some(r) = subject_problem(&s) {
                    bad("subject", r);
                }
                s
            }
            Some(_) => {
                bad("subject", "must be a string".into());
                String::new()
            }
            None => {
                bad("subject", "is required".into());
                String::new()
            }
        };
        let value = match e.remove("value") {
            None | Some(Value::Null) => 1.0,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() => v,
                _ => {
                    bad("value", "must be a finite number".into());
                    0.0
                }
            },
            Some(_) => {
                bad("value", "must be a number".into());
                0.0
            }
        };
        let ts = match e.remove("ts") {
            None | Some(Value::Null) => now,
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(&s) {
                Ok(t) => t.with_timezone(&Utc),
                Err(err) => {
                    bad("ts", format!("must be an RFC 3339 timestamp ({err})"));
                    now
                }
            },
            Some(_) => {
                bad("ts", "must be an RFC 3339 timestamp string".into());
                now
            }
        };
        let attrs = match e.remove("attrs") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                bad("attrs", "must be an object".into());
                None
            }
        };
        for k in e.keys() {
            bad(k, "unknown field".into());
        }
        let error = attrs.as_ref().is_some_and(is_error);
        out.push(NewEvent {
            name,
            subject,
            value,
            ts,
            attrs: attrs.map(Value::Object),
            error,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::InvalidEvents(errors))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_strict_and_the_field_by_field_readings_agree_on_valid_batches() {
        let now = Utc::now();
        let body = json!({"events": [
            {"name": "page.view", "subject": "u1"},
            {"name": "checkout", "subject": "u2", "value": 12.5, "ts": "2026-12-01T10:00:00Z",
             "attrs": {"error": true, "plan": "pro"}},
        ]});
        let bytes = serde_json::to_vec(&body).unwrap();
        let a = fast(&bytes, now, 10).expect("valid");
        let b = slow(body, now, 10).expect("valid");
        assert_eq!(a, b);
        assert_eq!((a[0].value, a[0].ts, a[0].error), (1.0, now, false));
        assert!(a[1].error);
    }

    #[test]
    fn every_bad_field_of_every_bad_event_is_reported() {
        let body = json!({"events": [
            {"name": "ok", "subject": "u1"},
            {"name": "", "subject": 5, "value": "x", "ts": "yesterday", "attrs": [], "extra": 1},
            "nope",
        ]});
        let bytes = serde_json::to_vec(&body).unwrap();
        assert!(fast(&bytes, Utc::now(), 10).is_none());
        let ApiError::InvalidEvents(errors) = slow(body, Utc::now(), 10).unwrap_err() else {
            panic!("not invalid-events");
        };
        let got: Vec<(Option<u32>, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(1), "name"),
                (Some(1), "subject"),
                (Some(1), "value"),
                (Some(1), "ts"),
                (Some(1), "attrs"),
                (Some(1), "extra"),
                (Some(2), ""),
            ]
        );
        assert!(errors.iter().all(|e| e.type_.ends_with("/invalid-event")));
    }
}
