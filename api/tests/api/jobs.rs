use std::time::Duration;

use api::ApiConfig;
use chrono::Utc;
use poem::http::StatusCode;
use schema::history::{AttemptOutcome, HistoryEvent, JobState};
use serde_json::{Value, json};

use crate::support::{DOWN_REDIS_URL, assert_problem, read, spawn_app, spawn_app_with};

#[tokio::test]
async fn an_accepted_job_can_be_read_back() {
    let app = spawn_app().await;
    let (status, headers, accepted) = read(app.enqueue(json!({"kind": "noop"})).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(accepted["status_url"], format!("/v1/jobs/{id}"));
    assert_eq!(accepted["duplicate"], false);
    assert_eq!(headers.get("location").unwrap(), &format!("/v1/jobs/{id}"));

    let (status, _, job) = app.get(accepted["status_url"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["id"], id);
    assert_eq!(job["kind"], "noop");
    assert_eq!(job["queue"], "noop");
    assert_eq!(job["status"], "pending");
    assert_eq!(job["source"], "broker");
    assert_eq!(job["max_attempts"], jobs::RetryPolicy::default().max_attempts);
    assert!(job["trace_id"].as_str().unwrap().starts_with("00-"), "{job}");
}

#[tokio::test]
async fn a_delayed_job_is_scheduled() {
    let app = spawn_app().await;
    let id = app
        .enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}, "delay_s": 3600}))
        .await;
    let (_, _, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "scheduled", "{job}");
    assert_eq!(job["queue"], "default");
    assert!(job["run_at"].is_string(), "{job}");
}

#[tokio::test]
async fn the_callers_traceparent_is_carried_by_the_job() {
    let app = spawn_app().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app
        .client
        .post("/v1/jobs")
        .header("traceparent", traceparent)
        .body_json(&json!({"kind": "noop"}))
        .send()
        .await;
    let (status, _, accepted) = read(resp).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, _, job) = app.get(accepted["status_url"].as_str().unwrap()).await;
    assert_eq!(job["trace_id"], traceparent);
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_job() {
    let app = spawn_app().await;
    let body = json!({"kind": "noop", "idempotency_key": "order-42"});
    let (_, _, first) = read(app.enqueue(body.clone()).await).await;
    let (status, _, second) = read(app.enqueue(body).await).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(app.queue_depth("noop").await, 1);
}

#[tokio::test]
async fn accepted_jobs_are_recorded_in_history() {
    let app = spawn_app().await;
    let id = app
        .enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 5}, "priority": 7}))
        .await;
    app.history.flush().await;
    let view = schema::queries::get_job(&app.db, id.parse().unwrap())
        .await
        .unwrap()
        .expect("a history row");
    assert_eq!(view.job.kind, "sleep");
    assert_eq!(view.job.status, "pending");
    assert_eq!(view.job.priority, 7);
    assert_eq!(view.job.payload, Some(json!({"ms": 5})));
}

#[tokio::test]
async fn malformed_json_is_a_400_problem() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post("/v1/jobs")
        .content_type("application/json")
        .body(r#"{"kind": "noop""#)
        .send()
        .await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-json").await;
    let resp = app
        .client
        .post("/v1/jobs/batch")
        .content_type("application/json")
        .body("")
        .send()
        .await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-json").await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_415_problem() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post("/v1/jobs")
        .content_type("text/plain")
        .body("kind=noop")
        .send()
        .await;
    assert_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type").await;
}

#[tokio::test]
async fn an_unknown_kind_is_a_422_problem() {
    let app = spawn_app().await;
    let problem = assert_problem(
        app.enqueue(json!({"kind": "mine-bitcoin"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown-kind",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "kind");
    assert!(
        problem["detail"].as_str().unwrap().contains("mine-bitcoin"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_bad_payload_field_is_a_422_problem_naming_the_field() {
    let app = spawn_app().await;
    let resp = app
        .enqueue(json!({"kind": "sleep", "payload": {"ms": "soon"}}))
        .await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-payload").await;
    assert_eq!(problem["errors"][0]["field"], "payload.ms", "{problem}");
    assert!(
        problem["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "{problem}"
    );

    let resp = app
        .enqueue(json!({"kind": "noop", "payload": {"colour": "red"}}))
        .await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-payload").await;
    assert_eq!(problem["errors"][0]["field"], "payload.colour", "{problem}");
}

#[tokio::test]
async fn an_invalid_queue_or_field_is_a_422_problem() {
    let app = spawn_app().await;
    let resp = app.enqueue(json!({"kind": "noop", "queue": "Not A Queue"})).await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-queue").await;
    assert_eq!(problem["errors"][0]["field"], "queue");

    let resp = app
        .enqueue(json!({"kind": "noop", "delay_s": "later", "run_at": "tomorrow"}))
        .await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-field").await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"delay_s") && fields.contains(&"run_at"),
        "{problem}"
    );

    let resp = app.enqueue(json!({"payload": {}})).await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-field").await;
    assert_eq!(problem["errors"][0]["field"], "kind");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem() {
    let app = spawn_app_with(
        crate::support::REDIS_URL,
        ApiConfig {
            max_body_bytes: 1024,
            ..ApiConfig::default()
        },
    )
    .await;
    let big = json!({"kind": "noop", "idempotency_key": "k", "payload": {"enqueued_at_us": 1}, "pad": "x".repeat(2000)});
    // Without a declared length the body is counted while it is read…
    let problem = assert_problem(
        app.enqueue(big.clone()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("1024"), "{problem}");
    // …with one, it is refused before being read.
    let body = big.to_string();
    let resp = app
        .client
        .post("/v1/jobs")
        .content_type("application/json")
        .header("content-length", body.len())
        .body(body)
        .send()
        .await;
    assert_problem(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large").await;
    assert_eq!(app.queue_depth("noop").await, 0);
}

#[tokio::test]
async fn a_valid_batch_enqueues_every_job_in_order() {
    let app = spawn_app().await;
    let jobs: Vec<Value> = (0..25).map(|_| json!({"kind": "noop"})).collect();
    let resp = app
        .client
        .post("/v1/jobs/batch")
        .body_json(&json!({"jobs": jobs}))
        .send()
        .await;
    let (status, _, accepted) = read(resp).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let ids = accepted["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 25);
    assert_eq!(app.queue_depth("noop").await, 25);
    let (status, _, job) = app.get(&format!("/v1/jobs/{}", ids[24].as_str().unwrap())).await;
    assert_eq!((status, &job["kind"]), (StatusCode::OK, &json!("noop")));
}

#[tokio::test]
async fn a_batch_with_one_bad_job_is_refused_and_enqueues_nothing() {
    let app = spawn_app().await;
    let body = json!({"jobs": [
        {"kind": "noop"},
        {"kind": "noop"},
        {"kind": "sleep", "payload": {"ms": "soon"}},
        {"kind": "noop"},
        {"kind": "who-knows"},
    ]});
    let resp = app.client.post("/v1/jobs/batch").body_json(&body).send().await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-batch").await;
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{problem}");
    assert_eq!(
        (errors[0]["index"].as_u64(), errors[0]["field"].as_str()),
        (Some(2), Some("payload.ms"))
    );
    assert_eq!(
        (errors[1]["index"].as_u64(), errors[1]["field"].as_str()),
        (Some(4), Some("kind"))
    );
    assert_eq!(errors[1]["type"], "https://drover.dev/problems/unknown-kind");
    assert_eq!(app.queue_depth("noop").await, 0);
    assert_eq!(app.queue_depth("default").await, 0);
}

#[tokio::test]
async fn a_batch_over_the_job_limit_is_refused() {
    let app = spawn_app_with(
        crate::support::REDIS_URL,
        ApiConfig {
            max_batch_jobs: 3,
            ..ApiConfig::default()
        },
    )
    .await;
    let jobs: Vec<Value> = (0..4).map(|_| json!({"kind": "noop"})).collect();
    let resp = app
        .client
        .post("/v1/jobs/batch")
        .body_json(&json!({"jobs": jobs}))
        .send()
        .await;
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-batch").await;
    assert_eq!(problem["errors"][0]["field"], "jobs");
    assert_eq!(app.queue_depth("noop").await, 0);
}

#[tokio::test]
async fn a_down_broker_answers_503_with_retry_after() {
    let app = spawn_app_with(DOWN_REDIS_URL, ApiConfig::default()).await;
    let started = std::time::Instant::now();
    let resp = app.enqueue(json!({"kind": "noop"})).await;
    let retry_after = resp.0.headers().get("retry-after").cloned();
    assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable").await;
    assert_eq!(retry_after.unwrap(), "1");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    let resp = app
        .client
        .post("/v1/jobs/batch")
        .body_json(&json!({"jobs": [{"kind": "noop"}]}))
        .send()
        .await;
    assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable").await;
    let resp = app.client.get("/v1/queues").send().await;
    assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable").await;
    // Bad input is still bad input.
    let resp = app.enqueue(json!({"kind": "nope"})).await;
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "unknown-kind").await;
}

#[tokio::test]
async fn a_pending_job_can_be_canceled_once() {
    let app = spawn_app().await;
    let id = app.enqueue_ok(json!({"kind": "noop"})).await;
    let (status, _, canceled) = read(app.client.delete(format!("/v1/jobs/{id}")).send().await).await;
    assert_eq!(status, StatusCode::OK, "{canceled}");
    assert_eq!(
        canceled,
        json!({"id": id, "status": "canceled", "discarded": false})
    );
    let (_, _, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "canceled");

    let resp = app.client.delete(format!("/v1/jobs/{id}")).send().await;
    assert_problem(resp, StatusCode::CONFLICT, "not-cancelable").await;
}

#[tokio::test]
async fn an_unknown_job_is_a_404_problem_and_a_malformed_id_a_400() {
    let app = spawn_app().await;
    let unknown = uuid::Uuid::now_v7();
    assert_problem(
        app.client.get(format!("/v1/jobs/{unknown}")).send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    assert_problem(
        app.client.delete(format!("/v1/jobs/{unknown}")).send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    assert_problem(
        app.client.get("/v1/jobs/not-a-uuid").send().await,
        StatusCode::BAD_REQUEST,
        "invalid-id",
    )
    .await;
}

#[tokio::test]
async fn a_job_only_history_knows_is_read_from_the_database_with_its_attempts() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7();
    let at = Utc::now();
    let common = |attempt| (id, "default".to_owned(), "sleep".to_owned(), attempt);
    let (id_, queue, kind, _) = common(1);
    let events = [
        HistoryEvent::Enqueued {
            id: id_,
            queue: queue.clone(),
            kind: kind.clone(),
            payload: json!({"ms": 1, "fail_first": 1}),
            max_attempts: 3,
            priority: 0,
            idempotency_key: None,
            trace_id: None,
            run_at: None,
            at,
        },
        HistoryEvent::Finished {
            id,
            queue: queue.clone(),
            kind: kind.clone(),
            attempt: 1,
            max_attempts: 3,
            worker_id: "w1".into(),
            trace_id: None,
            started_at: at,
            at: at + chrono::Duration::milliseconds(5),
            outcome: AttemptOutcome::Failed,
            error: Some("failing as asked".into()),
            status: JobState::Retrying,
            next_run_at: Some(at + chrono::Duration::seconds(1)),
        },
        HistoryEvent::Finished {
            id,
            queue,
            kind,
            attempt: 2,
            max_attempts: 3,
            worker_id: "w2".into(),
            trace_id: None,
            started_at: at + chrono::Duration::seconds(1),
            at: at + chrono::Duration::milliseconds(1005),
            outcome: AttemptOutcome::Succeeded,
            error: None,
            status: JobState::Succeeded,
            next_run_at: None,
        },
    ];
    schema::history::apply_batch(&app.db, &events).await.unwrap();

    let (status, _, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["source"], "history");
    assert_eq!(job["status"], "succeeded");
    let attempts = job["attempt_history"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(
        (&attempts[0]["outcome"], &attempts[0]["error"]),
        (&json!("failed"), &json!("failing as asked"))
    );
    assert_eq!(attempts[1]["worker_id"], "w2");

    let resp = app.client.delete(format!("/v1/jobs/{id}")).send().await;
    assert_problem(resp, StatusCode::CONFLICT, "not-cancelable").await;
}
