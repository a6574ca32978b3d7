//! The dead set through the API: list a queue's dead jobs, retry one or all, discard one
//! (`DELETE /v1/jobs/{id}`) or all.

use std::time::Duration;

use jobs::{ConsumerConfig, Outcome, Settlement, job::AttemptOutcome, job::now_ms};
use poem::http::StatusCode;
use serde_json::json;

use crate::support::{TestApp, assert_problem, read, spawn_app};

/// Enqueues `n` sleep jobs and lets a worker fail each for good; returns their ids.
async fn dead_jobs(app: &TestApp, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            app.enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}}))
                .await,
        );
    }
    let cfg = ConsumerConfig::default();
    let queue = jobs::QueueName::parse("default").unwrap();
    let driver = app.state.broker.driver(&queue, &cfg).await.unwrap();
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(driver.fetch(n, Duration::from_millis(500)).await.unwrap());
    }
    let settled: Vec<Settlement> = got
        .into_iter()
        .map(|job| Settlement {
            job: job.into(),
            outcome: Outcome::Dead {
                error: "the payment provider refused".into(),
                how: AttemptOutcome::Failed,
            },
            worker: cfg.worker.clone(),
            started_at_ms: now_ms(),
            finished_at_ms: now_ms(),
        })
        .collect();
    driver.settle(&settled).await.unwrap();
    ids
}

#[tokio::test]
async fn a_dead_job_is_listed_with_its_error_and_can_be_retried_once() {
    let app = spawn_app().await;
    let ids = dead_jobs(&app, 2).await;
    let (status, _, list) = app.get("/v1/queues/default/dead?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed = list["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{list}");
    assert_eq!(listed[0]["last_error"], "the payment provider refused");
    assert_eq!(listed[0]["attempts"], 1);
    let (_, _, page) = app.get("/v1/queues/default/dead?offset=1&limit=1").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "{page}");

    let resp = app.client.post(format!("/v1/jobs/{}/retry", ids[0])).send().await;
    let (status, _, body) = read(resp).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("pending")),
        "{body}"
    );
    let (_, _, job) = app.get(&format!("/v1/jobs/{}", ids[0])).await;
    assert_eq!(job["status"], "pending", "{job}");
    // Its one attempt counts on; its budget is the kind's again.
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(
        job["max_attempts"],
        1 + jobs::RetryPolicy::default().max_attempts,
        "{job}"
    );

    // Pending now, so not retryable again.
    let resp = app.client.post(format!("/v1/jobs/{}/retry", ids[0])).send().await;
    let problem = assert_problem(resp, StatusCode::CONFLICT, "not-dead").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("pending"),
        "{problem}"
    );
}

#[tokio::test]
async fn delete_discards_a_dead_job_and_the_whole_dead_set_can_be_retried_or_discarded() {
    let app = spawn_app().await;
    let ids = dead_jobs(&app, 3).await;
    let (status, _, body) = read(app.client.delete(format!("/v1/jobs/{}", ids[0])).send().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["discarded"].as_bool()),
        (Some("dead"), Some(true))
    );
    let (_, _, list) = app.get("/v1/queues/default/dead").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2, "{list}");

    let (status, _, body) = read(app.client.post("/v1/queues/default/dead/retry").send().await).await;
    assert_eq!(
        (status, body["jobs"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    assert_eq!(app.queue_depth("default").await, 2);
    let (_, _, list) = app.get("/v1/queues/default/dead").await;
    assert!(list["jobs"].as_array().unwrap().is_empty(), "{list}");

    let _ = dead_jobs(&app, 1).await;
    let (status, _, body) = read(app.client.delete("/v1/queues/default/dead").send().await).await;
    assert_eq!(
        (status, body["jobs"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
}

#[tokio::test]
async fn dead_set_requests_that_cannot_apply_are_problems() {
    let app = spawn_app().await;
    let unknown = jobs::JobId::new();
    let resp = app.client.post(format!("/v1/jobs/{unknown}/retry")).send().await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not-found").await;
    let resp = app.client.post("/v1/jobs/not-a-uuid/retry").send().await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-id").await;
    let resp = app.client.get("/v1/queues/Bad%20Name/dead").send().await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-queue").await;
    let resp = app.client.get("/v1/queues/never-used/dead").send().await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not-found").await;
    let (status, headers, problem) =
        read(app.client.get("/v1/queues/default/dead?limit=0").send().await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    // A pending job is canceled by DELETE, and a running one is neither canceled nor retried.
    let id = app
        .enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}}))
        .await;
    let resp = app.client.post(format!("/v1/jobs/{id}/retry")).send().await;
    assert_problem(resp, StatusCode::CONFLICT, "not-dead").await;
}
