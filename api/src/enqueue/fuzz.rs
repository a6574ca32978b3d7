//! Property tests (bounded fuzzing) of the enqueue decoders: for bodies that are near-valid
//! job requests, arbitrary JSON, and byte-mangled versions of both, no decoder panics, and
//! whenever the strict fast reading accepts a body the detailed reading accepts it too and
//! makes the same job. The catalog's payload validation is fuzzed for every kind as well.
//!
//! Bounded (a few thousand cases, seconds) so that it runs with the other unit tests;
//! `PROPTEST_CASES=100000 cargo nextest run -p api -E 'test(/fuzz/)'` runs it longer.

use jobs::Catalog;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::{Context, batch, batch_fast, single, single_fast};

fn cx(catalog: &Catalog) -> Context<'_> {
    Context {
        catalog,
        now_ms: 1_700_000_000_000,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
}

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(default_cases),
        // No regression files in the source tree; a failure prints its minimal case.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "[a-z_\\\\\"\u{e9}\u{1F600}]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One job request, mostly shaped like a real one, with every field sometimes wrong.
fn job_request() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        4 => Just(json!("noop")),
        4 => Just(json!("sleep")),
        1 => Just(json!("backup.run")),
        1 => Just(json!("nope")),
        1 => Just(json!("")),
        1 => Just(json!("no\\u006fp")),
        1 => any_json(),
    ];
    let payload = prop_oneof![
        3 => (0u64..100, prop::option::of(0u32..5)).prop_map(|(ms, ff)| match ff {
            Some(k) => json!({"ms": ms, "fail_first": k}),
            None => json!({"ms": ms}),
        }),
        2 => Just(json!({})),
        1 => Just(json!({"source": "config", "target": "drover"})),
        2 => any_json(),
    ];
    let queue = prop_oneof![
        Just(json!("default")),
        Just(json!("noop")),
        "[a-z0-9_-]{1,64}".prop_map(Value::String),
        "[A-Z !]{0,70}".prop_map(Value::String),
        any_json(),
    ];
    let delay = prop_oneof![
        (0u64..100_000).prop_map(|n| json!(n)),
        Just(json!(31_622_401u64)),
        any::<i64>().prop_map(|n| json!(n)),
        any_json(),
    ];
    let run_at = prop_oneof![
        Just(json!("2100-01-01T00:00:00Z")),
        Just(json!("1970-01-01T00:00:00+02:00")),
        "[0-9T:Z+-]{0,25}".prop_map(Value::String),
        any_json(),
    ];
    let priority = prop_oneof![
        any::<i32>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any_json()
    ];
    let key = prop_oneof!["[a-z0-9:-]{0,300}".prop_map(Value::String), any_json()];
    (
        prop::option::weighted(0.95, kind),
        prop::option::of(payload),
        prop::option::weighted(0.3, queue),
        prop::option::weighted(0.2, delay),
        prop::option::weighted(0.1, run_at),
        prop::option::weighted(0.2, priority),
        prop::option::weighted(0.2, key),
        prop::option::weighted(0.05, ("[a-z]{1,6}", any_json())),
    )
        .prop_map(|(kind, payload, queue, delay, run_at, priority, key, extra)| {
            let mut m = Map::new();
            let fields = [
                ("kind", kind),
                ("payload", payload),
                ("queue", queue),
                ("delay_s", delay),
                ("run_at", run_at),
                ("priority", priority),
                ("idempotency_key", key),
            ];
            for (name, v) in fields {
                if let Some(v) = v {
                    m.insert(name.to_owned(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

/// Bytes of a body: serialised as is, or with a few bytes changed, or cut short.
fn mangled(body: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
    (
        body,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(|(v, edits, cut)| {
            let mut bytes = serde_json::to_vec(&v).unwrap();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

/// The job's fields that do not depend on its id or the payload's whitespace.
fn shape(job: &jobs::Job) -> String {
    let payload: Value = serde_json::from_str(job.payload.get()).unwrap();
    format!(
        "{} {} {payload} {} {} {:?} {:?} {:?} {}",
        job.queue,
        job.kind,
        job.max_attempts,
        job.priority,
        job.run_at_ms,
        job.idempotency_key,
        job.trace_id,
        job.enqueued_at_ms
    )
}

/// Runs both readings of a single-job body; panics (fails the property) if they disagree.
fn check_single(bytes: &[u8]) {
    let catalog = Catalog::default();
    let cx = cx(&catalog);
    let fast = single_fast(bytes, &cx);
    let slow = serde_json::from_slice::<Value>(bytes)
        .ok()
        .map(|v| single(v, &cx));
    if let Some(fast) = fast {
        let body = String::from_utf8_lossy(bytes);
        match slow {
            Some(Ok(slow)) => assert_eq!(shape(&fast.job), shape(&slow.job), "{body}"),
            other => panic!("the fast reading accepted {body} but the detailed one said {other:?}"),
        }
    }
}

fn check_batch(bytes: &[u8]) {
    let catalog = Catalog::default();
    let cx = cx(&catalog);
    let fast = batch_fast(bytes, &cx, 8);
    let slow = serde_json::from_slice::<Value>(bytes)
        .ok()
        .map(|v| batch(v, &cx, 8));
    if let Some(fast) = fast {
        let body = String::from_utf8_lossy(bytes);
        match slow {
            Some(Ok(slow)) => {
                let f: Vec<String> = fast.iter().map(|p| shape(&p.job)).collect();
                let s: Vec<String> = slow.iter().map(|p| shape(&p.job)).collect();
                assert_eq!(f, s, "{body}");
            }
            other => panic!("the fast reading accepted {body} but the detailed one said {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn fuzz_single_job_bodies_never_panic_and_both_readings_agree(bytes in mangled(job_request())) {
        check_single(&bytes);
    }

    #[test]
    fn fuzz_arbitrary_json_is_never_a_job_by_accident_of_one_reading(bytes in mangled(any_json())) {
        check_single(&bytes);
        check_batch(&bytes);
    }
}

proptest! {
    #![proptest_config(config(600))]

    #[test]
    fn fuzz_batch_bodies_never_panic_and_both_readings_agree(
        jobs in prop::collection::vec(prop_oneof![
            9 => job_request(),
            // A job written as an array of its field values: only an object is a job.
            1 => job_request().prop_map(|v| Value::Array(v.as_object().unwrap().values().cloned().collect())),
        ], 0..10),
        wrap in prop::option::weighted(0.05, ("[a-z]{1,5}", any_json())),
    ) {
        let mut body = json!({"jobs": jobs});
        if let Some((k, v)) = wrap {
            body[k] = v;
        }
        check_batch(&serde_json::to_vec(&body).unwrap());
    }

    #[test]
    fn fuzz_the_catalog_validates_any_payload_of_any_kind_without_panicking(payload in any_json()) {
        let catalog = Catalog::default();
        let raw = serde_json::value::to_raw_value(&payload).unwrap();
        let kinds: Vec<&str> = catalog.kinds().map(|k| k.name).collect();
        for kind in kinds {
            let _ = catalog.validate(kind, &raw);
        }
    }
}
