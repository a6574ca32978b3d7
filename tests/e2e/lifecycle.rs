//! The job lifecycle over HTTP, the same test list on every broker.

use std::time::Duration;

use jobs::RetryPolicy;
use serde_json::json;

use crate::support::{Broker, Options, percentile, spawn_app};

async fn a_thousand_jobs_enqueued_one_by_one_and_in_batches_all_succeed(broker: Broker) {
    let app = spawn_app(broker, Options::default()).await;
    let mut ids = Vec::new();
    for _ in 0..500 {
        ids.push(app.enqueue("noop", json!({})).await);
    }
    for _ in 0..5 {
        let batch: Vec<_> = (0..100).map(|_| json!({"kind": "noop", "payload": {}})).collect();
        let (status, body) = app.post("/v1/jobs/batch", &json!({ "jobs": batch })).await;
        assert_eq!(status, 202, "{body}");
        ids.extend(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(ids.len(), 1_000);
    app.wait_all_succeeded(&ids, Duration::from_secs(60)).await;
    let q = app.queue("noop").await;
    assert_eq!(q["depth"], 0, "{q}");
    app.shutdown().await;
}

async fn a_job_that_fails_twice_then_succeeds_shows_three_attempts_spaced_by_the_backoff(broker: Broker) {
    let policy = RetryPolicy {
        initial_ms: 300,
        multiplier: 2.0,
        max_delay_ms: 10_000,
        max_attempts: 5,
        jitter: 0.0,
    };
    let app = spawn_app(
        broker,
        Options {
            retry: Some(policy),
            ..Default::default()
        },
    )
    .await;
    let id = app.enqueue("sleep", json!({"ms": 0, "fail_first": 2})).await;
    // Attempt history is written off the hot path: wait for all three rows.
    let job = app
        .wait_job(&id, Duration::from_secs(30), |j| {
            j["status"] == "succeeded" && j["attempt_history"].as_array().is_some_and(|a| a.len() == 3)
        })
        .await;
    assert_eq!(job["attempts"], 3, "{job}");
    let history = job["attempt_history"].as_array().unwrap();
    let outcomes: Vec<_> = history
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "succeeded"], "{job}");
    // The gap between the end of attempt n and the start of n+1 follows 300 ms · 2^(n-1).
    let ms = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp"))
            .unwrap()
            .timestamp_millis()
    };
    let gap = |n: usize| ms(&history[n + 1]["started_at"]) - ms(&history[n]["finished_at"]);
    for (n, nominal) in [(0, 300), (1, 600)] {
        let g = gap(n);
        println!(
            "{broker:?}: delay before attempt {} = {g} ms (policy: {nominal} ms)",
            n + 2
        );
        // Never early; late by at most the broker's scheduling granularity plus load.
        assert!(
            g >= nominal - 5,
            "attempt {} started after {g} ms, before the {nominal} ms backoff",
            n + 2
        );
        assert!(
            g < nominal + 1_500,
            "attempt {} started {g} ms later, far past the {nominal} ms backoff",
            n + 2
        );
    }
    app.shutdown().await;
}

async fn a_job_that_always_fails_ends_dead_after_max_attempts_and_is_counted(broker: Broker) {
    let policy = RetryPolicy {
        initial_ms: 50,
        multiplier: 2.0,
        max_delay_ms: 1_000,
        max_attempts: 3,
        jitter: 0.1,
    };
    let app = spawn_app(
        broker,
        Options {
            retry: Some(policy),
            ..Default::default()
        },
    )
    .await;
    let id = app.enqueue("sleep", json!({"ms": 0, "always_fail": true})).await;
    let job = app
        .wait_job(&id, Duration::from_secs(30), |j| j["status"] == "dead")
        .await;
    assert_eq!(job["attempts"], 3, "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("failing every attempt"),
        "{job}"
    );
    let start = std::time::Instant::now();
    loop {
        let q = app.queue("default").await;
        if q["dead"] == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dead job not counted in /v1/queues/default: {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, all) = app.get("/v1/queues").await;
    let default = all["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "default")
        .cloned();
    assert_eq!(default.expect("default queue listed")["dead"], 1, "{all}");
    app.shutdown().await;
}

/// Prints p50/p99 of enqueue → pickup over 200 jobs sent one at a time to an idle worker.
async fn an_idle_worker_picks_up_a_new_job_without_a_polling_delay(broker: Broker) {
    let mut app = spawn_app(broker, Options::default()).await;
    let mut lat = Vec::new();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await; // let the worker go idle
        let at = workers::families::builtin::now_us();
        app.enqueue("noop", json!({ "enqueued_at_us": at })).await;
        let pickup = tokio::time::timeout(Duration::from_secs(10), app.pickups.recv())
            .await
            .expect("the job was picked up")
            .expect("probe open");
        lat.push(pickup.latency_us() as f64 / 1_000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "PICKUP broker={broker:?} n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} (HTTP enqueue → handler start)",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat[lat.len() - 1]
    );
    app.shutdown().await;
}

async fn a_pending_job_can_be_canceled_and_never_runs(broker: Broker) {
    // No worker consumes `default` here, so the job stays pending.
    let app = spawn_app(
        broker,
        Options {
            queues: vec!["noop"],
            ..Default::default()
        },
    )
    .await;
    let id = app.enqueue("sleep", json!({"ms": 0})).await;
    app.wait_job(&id, Duration::from_secs(10), |j| j["status"] == "pending")
        .await;
    let res = app
        .http
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    app.wait_job(&id, Duration::from_secs(10), |j| j["status"] == "canceled")
        .await;
    app.shutdown().await;
}

/// The attempt's future is dropped at the kind's timeout: a 10 s sleep under a 300 ms timeout
/// ends each attempt within about 300 ms, is retried, and ends dead with both attempts
/// recorded as timed out.
async fn a_job_that_sleeps_past_its_timeout_is_stopped_and_retried(broker: Broker) {
    let app = spawn_app(
        broker,
        Options {
            retry: Some(RetryPolicy {
                initial_ms: 100,
                multiplier: 2.0,
                max_delay_ms: 1_000,
                max_attempts: 2,
                jitter: 0.0,
            }),
            timeout_ms: vec![("sleep", 300)],
            ..Default::default()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let id = app.enqueue("sleep", json!({"ms": 10_000})).await;
    let job = app
        .wait_job(&id, Duration::from_secs(20), |j| {
            j["status"] == "dead" && j["attempt_history"].as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(8),
        "two timed-out attempts took {elapsed:?}"
    );
    let ms = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp"))
            .unwrap()
            .timestamp_millis()
    };
    for a in job["attempt_history"].as_array().unwrap() {
        assert_eq!(a["outcome"], "timed_out", "{job}");
        let took = ms(&a["finished_at"]) - ms(&a["started_at"]);
        assert!(
            (290..2_000).contains(&took),
            "an attempt ran {took} ms under a 300 ms timeout: {job}"
        );
    }
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 300 ms"),
        "{job}"
    );
    app.shutdown().await;
}

/// A panicking handler fails its attempt (the worker survives) and is retried like any failure.
async fn a_job_that_panics_fails_its_attempt_and_the_worker_carries_on(broker: Broker) {
    let app = spawn_app(
        broker,
        Options {
            retry: Some(RetryPolicy {
                initial_ms: 50,
                multiplier: 2.0,
                max_delay_ms: 1_000,
                max_attempts: 2,
                jitter: 0.0,
            }),
            ..Default::default()
        },
    )
    .await;
    let id = app.enqueue("sleep", json!({"ms": 0, "crash": "panic"})).await;
    let job = app
        .wait_job(&id, Duration::from_secs(20), |j| {
            j["status"] == "dead" && j["attempt_history"].as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    for a in job["attempt_history"].as_array().unwrap() {
        assert_eq!(a["outcome"], "panicked", "{job}");
    }
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("panicked: sleep: crashing as asked"),
        "{job}"
    );
    // The same worker still runs jobs.
    let ok = app.enqueue("sleep", json!({"ms": 0})).await;
    app.wait_all_succeeded(&[ok], Duration::from_secs(10)).await;
    app.shutdown().await;
}

/// A panic is a crash the worker survives: a job that panics `DROVER_QUARANTINE_AFTER` (3)
/// times is quarantined in the dead set, its remaining attempts unspent.
async fn a_job_that_panics_three_times_is_quarantined(broker: Broker) {
    let app = spawn_app(
        broker,
        Options {
            retry: Some(RetryPolicy {
                initial_ms: 50,
                multiplier: 1.0,
                max_delay_ms: 50,
                max_attempts: 10,
                jitter: 0.0,
            }),
            ..Default::default()
        },
    )
    .await;
    let id = app.enqueue("sleep", json!({"ms": 0, "crash": "panic"})).await;
    let job = app
        .wait_job(&id, Duration::from_secs(20), |j| j["status"] == "dead")
        .await;
    let attempts = job["attempt_history"].as_array().expect("attempt history");
    assert_eq!(
        attempts.len(),
        3,
        "quarantined at the third panic, not after 10 attempts: {job}"
    );
    assert!(attempts.iter().all(|a| a["outcome"] == "panicked"), "{job}");
    let error = job["last_error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("quarantined: it crashed 3 times") && error.contains("crashing as asked"),
        "{job}"
    );
    app.shutdown().await;
}

macro_rules! for_each_broker {
    ($($test:ident),* $(,)?) => {
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::support::Broker::Redis).await } )* }
        mod amqp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::support::Broker::Amqp).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(crate::support::Broker::Sqlite).await } )* }
    };
}

for_each_broker!(
    a_thousand_jobs_enqueued_one_by_one_and_in_batches_all_succeed,
    a_job_that_fails_twice_then_succeeds_shows_three_attempts_spaced_by_the_backoff,
    a_job_that_always_fails_ends_dead_after_max_attempts_and_is_counted,
    an_idle_worker_picks_up_a_new_job_without_a_polling_delay,
    a_pending_job_can_be_canceled_and_never_runs,
    a_job_that_sleeps_past_its_timeout_is_stopped_and_retried,
    a_job_that_panics_fails_its_attempt_and_the_worker_carries_on,
    a_job_that_panics_three_times_is_quarantined,
);
