//! Turning an enqueue request body into job envelopes, or into the full list of what is wrong
//! with it.
//!
//! Validation reports every bad field at once (and, for a batch, every bad job with its index),
//! so the body is checked field by field rather than through one derived deserializer that
//! stops at the first error. The kind and payload are checked by [`jobs::Catalog::validate`],
//! the queue by [`jobs::QueueName::parse`].
//!
//! That field-by-field reading builds a JSON tree per job, which under load costs more than the
//! rest of the request. So a body is first read strictly, straight from its bytes into borrowed
//! fields ([`single_fast`], [`batch_fast`]); only a body that this strict reading or a check
//! refuses goes through the detailed path, which then says everything that is wrong with it.
//! Both paths build the job with [`build`], so they accept the same bodies and make the same
//! jobs (the fast path keeps the payload's text as sent instead of re-serialising it).

use chrono::{DateTime, Utc};
use jobs::{Catalog, CatalogError, Job, JobId, KindSpec, QueueName};
use schema::history::HistoryEvent;
use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue};

use crate::error::{FieldError, ProblemType};

/// The longest `delay_s` accepted: 366 days.
pub(crate) const MAX_DELAY_S: u64 = 366 * 24 * 3600;
/// The longest idempotency key accepted, in bytes.
pub(crate) const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// What every job of one request shares.
pub(crate) struct Context<'a> {
    pub(crate) catalog: &'a Catalog,
    /// Epoch milliseconds the request was accepted at.
    pub(crate) now_ms: i64,
    /// The W3C `traceparent` the jobs carry.
    pub(crate) traceparent: &'a str,
}

/// A validated job, ready to push.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) job: Job,
}

impl Prepared {
    /// The history record of this job's enqueue.
    pub(crate) fn enqueued_event(&self) -> HistoryEvent {
        let job = &self.job;
        HistoryEvent::Enqueued {
            id: job.id.0,
            queue: job.queue.to_string(),
            kind: job.kind.to_string(),
            // Validated JSON, so it parses; the history column is JSON, not text.
            payload: serde_json::from_str(job.payload.get()).unwrap_or(Value::Null),
            max_attempts: i32::try_from(job.max_attempts).unwrap_or(i32::MAX),
            priority: job.priority,
            idempotency_key: job.idempotency_key.clone(),
            trace_id: job.trace_id.clone(),
            run_at: job.run_at_ms.and_then(DateTime::from_timestamp_millis),
            at: DateTime::from_timestamp_millis(job.enqueued_at_ms).unwrap_or_else(Utc::now),
        }
    }
}

/// One job request read strictly: right field names and types, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Quick<'a> {
    // Borrowed strings fail on escaped text; such a body takes the detailed path.
    kind: &'a str,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    queue: Option<&'a str>,
    #[serde(default)]
    delay_s: Option<u64>,
    #[serde(default)]
    run_at: Option<&'a str>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    idempotency_key: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickBatch<'a> {
    #[serde(borrow)]
    jobs: Vec<Object<Quick<'a>>>,
}

/// A struct read only from a JSON object. serde's derived `Deserialize` also takes an array of
/// the fields in order (`["noop"]` as `{"kind": "noop"}`), which the detailed reading refuses:
/// without this the two readings disagreed (found by `enqueue::fuzz`).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData)).map(Object)
    }
}

/// The body of `POST /v1/jobs` as a job, if it is valid and strictly shaped; `None` sends it
/// to [`single`] for the full list of what is wrong (or for a shape this reading refuses).
pub(crate) fn single_fast(body: &[u8], cx: &Context<'_>) -> Option<Prepared> {
    let Object(quick) = serde_json::from_slice::<Object<Quick<'_>>>(body).ok()?;
    quick_job(quick, cx)
}

/// The body of `POST /v1/jobs/batch` as jobs, if every one is valid; `None` sends it to
/// [`batch`].
pub(crate) fn batch_fast(body: &[u8], cx: &Context<'_>, max_jobs: usize) -> Option<Vec<Prepared>> {
    let Object(quick) = serde_json::from_slice::<Object<QuickBatch<'_>>>(body).ok()?;
    if quick.jobs.len() > max_jobs {
        return None;
    }
    quick.jobs.into_iter().map(|Object(q)| quick_job(q, cx)).collect()
}

fn quick_job(q: Quick<'_>, cx: &Context<'_>) -> Option<Prepared> {
    const EMPTY: &str = "{}";
    if q.kind.is_empty()
        || q.delay_s.is_some_and(|d| d > MAX_DELAY_S)
        || (q.delay_s.is_some() && q.run_at.is_some())
        || q.idempotency_key
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES)
    {
        return None;
    }
    let run_at = match q.run_at {
        Some(t) => Some(DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc)),
        None => None,
    };
    let payload = match q.payload {
        Some(raw) => raw.to_owned(),
        None => RawValue::from_string(EMPTY.to_owned()).ok()?,
    };
    let spec = cx.catalog.validate(q.kind, &payload).ok()?;
    let queue = match q.queue {
        Some(name) => QueueName::parse(name).ok()?,
        None => cx.catalog.default_queue(spec),
    };
    let fields = Chosen {
        delay_s: q.delay_s,
        run_at,
        priority: q.priority,
        idempotency_key: q.idempotency_key.map(str::to_owned),
    };
    Some(build(spec, queue, payload, fields, cx))
}

/// What a request chose beyond kind, payload and queue.
struct Chosen {
    delay_s: Option<u64>,
    run_at: Option<DateTime<Utc>>,
    priority: Option<i32>,
    idempotency_key: Option<String>,
}

/// The job of a valid request; shared by both paths so they cannot disagree.
fn build(spec: &KindSpec, queue: QueueName, payload: Box<RawValue>, f: Chosen, cx: &Context<'_>) -> Prepared {
    let run_at_ms = match (f.delay_s, f.run_at) {
        (Some(delay), _) if delay > 0 => Some(cx.now_ms.saturating_add(delay as i64 * 1000)),
        (_, Some(at)) if at.timestamp_millis() > cx.now_ms => Some(at.timestamp_millis()),
        _ => None,
    };
    let job = Job {
        id: JobId::new(),
        queue,
        kind: spec.name.into(),
        payload,
        max_attempts: spec.retry.max_attempts.max(1),
        priority: f.priority.unwrap_or(0),
        enqueued_at_ms: cx.now_ms,
        run_at_ms,
        trace_id: Some(cx.traceparent.to_owned()),
        idempotency_key: f.idempotency_key,
        attempt: 0,
        crashes: 0,
        attempts_before: 0,
        receipt: 0,
    };
    Prepared { job }
}

/// Validates the body of `POST /v1/jobs`.
pub(crate) fn single(body: Value, cx: &Context<'_>) -> Result<Prepared, Vec<FieldError>> {
    let mut errors = Vec::new();
    let prepared = prepare(body, cx, &mut errors);
    match prepared {
        Some(p) if errors.is_empty() => Ok(p),
        _ => Err(errors),
    }
}

/// Validates the body of `POST /v1/jobs/batch`: all jobs or none.
pub(crate) fn batch(
    body: Value,
    cx: &Context<'_>,
    max_jobs: usize,
) -> Result<Vec<Prepared>, Vec<FieldError>> {
    let invalid = |reason: String| vec![FieldError::new(ProblemType::InvalidField, "jobs", reason)];
    let Value::Object(mut map) = body else {
        return Err(invalid(
            "the body must be an object of the form {\"jobs\": [...]}".into(),
        ));
    };
    let mut errors: Vec<FieldError> = map
        .keys()
        .filter(|k| k.as_str() != "jobs")
        .map(|k| FieldError::new(ProblemType::InvalidField, k.as_str(), "unknown field"))
        .collect();
    let items = match map.remove("jobs") {
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid("must be an array of jobs".into())),
        None => return Err(invalid("is required".into())),
    };
    if items.len() > max_jobs {
        return Err(invalid(format!(
            "at most {max_jobs} jobs per request (got {})",
            items.len()
        )));
    }
    let mut prepared = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let mut item_errors = Vec::new();
        match prepare(item, cx, &mut item_errors) {
            Some(p) if item_errors.is_empty() => prepared.push(p),
            _ => errors.extend(item_errors.into_iter().map(|e| e.at(index))),
        }
    }
    if errors.is_empty() {
        Ok(prepared)
    } else {
        Err(errors)
    }
}

/// The fields of one job request that have the right JSON type.
#[derive(Default)]
struct Fields {
    kind: Option<String>,
    payload: Option<Value>,
    queue: Option<String>,
    delay_s: Option<u64>,
    run_at: Option<DateTime<Utc>>,
    priority: Option<i32>,
    idempotency_key: Option<String>,
}

/// Checks one job request; pushes what is wrong to `errors`, ordered so that the first error
/// names the most telling problem (unknown kind, then payload, then queue, then the rest).
fn prepare(value: Value, cx: &Context<'_>, errors: &mut Vec<FieldError>) -> Option<Prepared> {
    let fields = match value {
        Value::Object(map) => read_fields(map, errors),
        _ => {
            errors.push(FieldError::new(
                ProblemType::InvalidField,
                "job",
                "must be a JSON object",
            ));
            return None;
        }
    };
    let prepared = validate(fields, cx, errors);
    errors.sort_by_key(|e| match e.kind {
        ProblemType::UnknownKind => 0,
        ProblemType::InvalidPayload => 1,
        ProblemType::InvalidQueue => 2,
        _ => 3,
    });
    prepared
}

fn read_fields(map: Map<String, Value>, errors: &mut Vec<FieldError>) -> Fields {
    let mut f = Fields::default();
    let mut kind_given = false;
    let mut bad = |field: &str, reason: String| {
        errors.push(FieldError::new(ProblemType::InvalidField, field, reason));
    };
    for (key, value) in map {
        // `null` means "not given" for every optional field.
        if value.is_null() && key != "kind" {
            continue;
        }
        kind_given |= key == "kind";
        match key.as_str() {
            "kind" => match value {
                Value::String(s) if !s.is_empty() => f.kind = Some(s),
                _ => bad("kind", "must be a non-empty string".into()),
            },
            "payload" => f.payload = Some(value),
            "queue" => match value {
                Value::String(s) => f.queue = Some(s),
                _ => bad("queue", "must be a string".into()),
            },
            "delay_s" => match value.as_u64() {
                Some(n) if n <= MAX_DELAY_S => f.delay_s = Some(n),
                _ => bad(
                    "delay_s",
                    format!("must be a whole number of seconds from 0 to {MAX_DELAY_S}"),
                ),
            },
            "run_at" => match value.as_str().map(DateTime::parse_from_rfc3339) {
                Some(Ok(t)) => f.run_at = Some(t.with_timezone(&Utc)),
                Some(Err(e)) => bad(
                    "run_at",
                    format!("must be an RFC 3339 timestamp like 2030-01-31T02:00:00Z ({e})"),
                ),
                None => bad("run_at", "must be an RFC 3339 timestamp string".into()),
            },
            "priority" => match value.as_i64().and_then(|n| i32::try_from(n).ok()) {
                Some(n) => f.priority = Some(n),
                None => bad("priority", "must be a 32-bit signed integer".into()),
            },
            "idempotency_key" => match value {
                Value::String(s) if !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY_BYTES => {
                    f.idempotency_key = Some(s)
                }
                _ => bad(
                    "idempotency_key",
                    format!("must be a string of 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
                ),
            },
            other => bad(other, "unknown field".into()),
        }
    }
    if !kind_given {
        bad("kind", "is required".into());
    }
    if f.delay_s.is_some() && f.run_at.is_some() {
        bad("run_at", "give either delay_s or run_at, not both".into());
    }
    f
}

fn validate(f: Fields, cx: &Context<'_>, errors: &mut Vec<FieldError>) -> Option<Prepared> {
    let payload = f.payload.unwrap_or_else(|| Value::Object(Map::new()));
    let raw = match serde_json::value::to_raw_value(&payload) {
        Ok(raw) => raw,
        Err(e) => {
            errors.push(FieldError::new(
                ProblemType::InvalidPayload,
                "payload",
                e.to_string(),
            ));
            return None;
        }
    };
    let spec = f
        .kind
        .as_deref()
        .and_then(|kind| match cx.catalog.validate(kind, &raw) {
            Ok(spec) => Some(spec),
            Err(CatalogError::UnknownKind(kind)) => {
                let mut known: Vec<&str> = cx.catalog.kinds().map(|k| k.name).collect();
                known.sort_unstable();
                errors.push(FieldError::new(
                    ProblemType::UnknownKind,
                    "kind",
                    format!(
                        "no job kind is named {kind:?} (known kinds: {})",
                        known.join(", ")
                    ),
                ));
                None
            }
            Err(CatalogError::InvalidPayload { reason, .. }) => {
                let (field, reason) = payload_error(raw.get(), &reason);
                errors.push(FieldError::new(ProblemType::InvalidPayload, field, reason));
                None
            }
        });
    let queue = match f.queue {
        Some(name) => match QueueName::parse(&name) {
            Ok(q) => Some(q),
            Err(e) => {
                errors.push(FieldError::new(
                    ProblemType::InvalidQueue,
                    "queue",
                    format!("{name:?} is not a valid queue name: it {}", e.reason),
                ));
                None
            }
        },
        None => spec.map(|s| cx.catalog.default_queue(s)),
    };
    let (spec, queue) = (spec?, queue?);
    if !errors.is_empty() {
        return None;
    }
    let chosen = Chosen {
        delay_s: f.delay_s,
        run_at: f.run_at,
        priority: f.priority,
        idempotency_key: f.idempotency_key,
    };
    Some(build(spec, queue, raw, chosen, cx))
}

/// Names the payload field a catalog error is about, and drops serde's position suffix (the
/// position is in drover's re-serialised payload, not in what the client sent).
///
/// serde says `unknown field `x``, `missing field `x``, or (for a wrong value) only where it
/// stopped; catalog checks say `x: …`. For the last case the field is the key just before the
/// position, which is exact for the flat payloads of the built-in kinds.
pub(crate) fn payload_error(raw: &str, reason: &str) -> (String, String) {
    let (reason, column) = match reason.rsplit_once(" at line ") {
        Some((head, pos)) => {
            let column = pos
                .split_once(" column ")
                .and_then(|(_, c)| c.trim().parse::<usize>().ok());
            (head.to_owned(), column)
        }
        None => (reason.to_owned(), None),
    };
    let between_backticks = reason
        .split_once("field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name.to_owned());
    let prefixed = reason
        .split_once(": ")
        .map(|(head, _)| head)
        .filter(|head| !head.is_empty() && head.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let before_position = || {
        let text = raw.get(..column?)?;
        let colon = text.rfind("\":")?;
        let open = text[..colon].rfind('"')?;
        Some(text[open + 1..colon].to_owned())
    };
    let field = between_backticks
        .or_else(|| prefixed.map(str::to_owned))
        .or_else(before_position);
    match field {
        Some(name) => (format!("payload.{name}"), reason),
        None => ("payload".to_owned(), reason),
    }
}

/// Bounded fuzzing of the decoders (proptest).
#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn cx(catalog: &Catalog) -> Context<'_> {
        Context {
            catalog,
            now_ms: 1_000_000,
            traceparent: TRACE,
        }
    }

    #[test]
    fn a_noop_job_goes_to_its_kinds_queue_with_its_kinds_retry_policy() {
        let catalog = Catalog::default();
        let p = single(json!({"kind": "noop"}), &cx(&catalog)).unwrap();
        assert_eq!(p.job.queue.as_str(), "noop");
        assert_eq!(
            p.job.max_attempts,
            catalog.get("noop").unwrap().retry.max_attempts
        );
        assert_eq!(p.job.payload.get(), "{}");
        assert_eq!(p.job.trace_id.as_deref(), Some(TRACE));
        assert_eq!((p.job.attempt, p.job.run_at_ms), (0, None));
    }

    /// The fields of a job that do not depend on the id or on payload whitespace.
    fn shape(job: &Job) -> String {
        let payload: Value = serde_json::from_str(job.payload.get()).unwrap();
        format!(
            "{} {} {payload} {} {} {:?} {:?} {:?}",
            job.queue,
            job.kind,
            job.max_attempts,
            job.priority,
            job.run_at_ms,
            job.idempotency_key,
            job.trace_id
        )
    }

    #[test]
    fn the_fast_reading_makes_the_same_job_as_the_detailed_one() {
        let catalog = Catalog::default();
        let bodies = [
            json!({"kind": "noop"}),
            json!({"kind": "noop", "payload": null, "queue": null}),
            json!({"kind": "sleep", "payload": {"ms": 5, "fail_first": 1}, "queue": "other", "priority": -3}),
            json!({"kind": "sleep", "payload": {"ms": 1}, "delay_s": 7, "idempotency_key": "k-1"}),
            json!({"kind": "noop", "run_at": "2100-01-01T00:00:00+02:00"}),
            json!({"kind": "noop", "delay_s": 0}),
        ];
        for body in bodies {
            let bytes = serde_json::to_vec(&body).unwrap();
            let fast =
                single_fast(&bytes, &cx(&catalog)).unwrap_or_else(|| panic!("{body} took the slow path"));
            let slow = single(body.clone(), &cx(&catalog)).unwrap();
            assert_eq!(shape(&fast.job), shape(&slow.job), "{body}");
        }
    }

    #[test]
    fn the_fast_reading_passes_every_doubtful_body_to_the_detailed_one() {
        let catalog = Catalog::default();
        let bodies = [
            r#"{"kind": "nope"}"#,
            r#"{"kind": ""}"#,
            r#"{"kind": null}"#,
            r#"{"payload": {}}"#,
            r#"{"kind": "noop", "colour": "red"}"#,
            r#"{"kind": "noop", "queue": "Bad Queue"}"#,
            r#"{"kind": "noop", "delay_s": -1}"#,
            r#"{"kind": "noop", "delay_s": 99999999999}"#,
            r#"{"kind": "noop", "delay_s": 5, "run_at": "2100-01-01T00:00:00Z"}"#,
            r#"{"kind": "noop", "run_at": "tomorrow"}"#,
            r#"{"kind": "noop", "priority": 3000000000}"#,
            r#"{"kind": "noop", "idempotency_key": ""}"#,
            r#"{"kind": "noop", "payload": []}"#,
            r#"{"kind": "sleep", "payload": {"ms": "soon"}}"#,
            r#"{"kind": "no\u006fp"}"#,
            r#"[{"kind": "noop"}]"#,
            r#"["noop"]"#,
            r#"{"kind": "noop""#,
        ];
        for body in bodies {
            assert!(single_fast(body.as_bytes(), &cx(&catalog)).is_none(), "{body}");
        }
        let batch = br#"{"jobs": [{"kind": "noop"}, {"kind": "nope"}]}"#;
        assert!(batch_fast(batch, &cx(&catalog), 10).is_none());
        assert!(batch_fast(br#"[[]]"#, &cx(&catalog), 10).is_none());
        assert!(batch_fast(br#"{"jobs": [["noop"]]}"#, &cx(&catalog), 10).is_none());
        let over = br#"{"jobs": [{"kind": "noop"}, {"kind": "noop"}]}"#;
        assert!(batch_fast(over, &cx(&catalog), 1).is_none());
        assert_eq!(batch_fast(over, &cx(&catalog), 2).map(|p| p.len()), Some(2));
    }

    #[test]
    fn a_delay_or_a_future_run_at_schedules_the_job() {
        let catalog = Catalog::default();
        let delayed = single(json!({"kind": "noop", "delay_s": 5}), &cx(&catalog)).unwrap();
        assert_eq!(delayed.job.run_at_ms, Some(1_005_000));
        let at = single(
            json!({"kind": "noop", "run_at": "2100-01-01T00:00:00Z"}),
            &cx(&catalog),
        )
        .unwrap();
        assert_eq!(at.job.run_at_ms, Some(4_102_444_800_000));
        let past = single(
            json!({"kind": "noop", "run_at": "1970-01-01T00:00:00Z"}),
            &cx(&catalog),
        )
        .unwrap();
        assert_eq!(past.job.run_at_ms, None);
    }

    #[test]
    fn every_bad_field_is_reported_with_the_unknown_kind_first() {
        let catalog = Catalog::default();
        let errors = single(
            json!({"kind": "nope", "queue": "Bad Queue", "delay_s": -1, "colour": "red"}),
            &cx(&catalog),
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields[0], "kind");
        assert_eq!(errors[0].kind, ProblemType::UnknownKind);
        for f in ["queue", "delay_s", "colour"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn a_bad_payload_names_its_field() {
        let catalog = Catalog::default();
        let cases = [
            (json!({"ms": "soon"}), "payload.ms"),
            (json!({"ms": 1, "colour": 1}), "payload.colour"),
            (json!({}), "payload.ms"),
            (json!({"ms": 99_999_999_u64}), "payload.ms"),
            (json!("soon"), "payload"),
        ];
        for (payload, field) in cases {
            let errors = single(json!({"kind": "sleep", "payload": payload}), &cx(&catalog)).unwrap_err();
            assert_eq!(errors[0].kind, ProblemType::InvalidPayload, "{payload}");
            assert_eq!(errors[0].field, field, "{payload}: {}", errors[0].reason);
            assert!(!errors[0].reason.contains(" at line "), "{}", errors[0].reason);
        }
    }

    #[test]
    fn a_batch_reports_each_bad_job_by_index_and_prepares_none() {
        let catalog = Catalog::default();
        let body = json!({"jobs": [{"kind": "noop"}, {"kind": "nope"}, {"kind": "noop"}, 7]});
        let errors = batch(body, &cx(&catalog), 10).unwrap_err();
        let indexes: Vec<Option<u32>> = errors.iter().map(|e| e.index).collect();
        assert_eq!(indexes, [Some(1), Some(3)]);
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_before_its_jobs_are_read() {
        let catalog = Catalog::default();
        let body = json!({"jobs": [{"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}]});
        let errors = batch(body, &cx(&catalog), 2).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "jobs");
    }

    #[test]
    fn the_enqueued_event_carries_what_only_the_api_knows() {
        let catalog = Catalog::default();
        let p = single(
            json!({"kind": "sleep", "payload": {"ms": 1}, "priority": 3, "idempotency_key": "k"}),
            &cx(&catalog),
        )
        .unwrap();
        match p.enqueued_event() {
            HistoryEvent::Enqueued {
                id,
                payload,
                priority,
                idempotency_key,
                trace_id,
                ..
            } => {
                assert_eq!(id, p.job.id.0);
                assert_eq!(payload, json!({"ms": 1}));
                assert_eq!(priority, 3);
                assert_eq!(idempotency_key.as_deref(), Some("k"));
                assert_eq!(trace_id.as_deref(), Some(TRACE));
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
}
