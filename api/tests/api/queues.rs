use poem::http::StatusCode;
use serde_json::json;

use crate::support::{assert_problem, spawn_app};

#[tokio::test]
async fn the_noop_queue_reports_its_depth_at_the_top_level() {
    let app = spawn_app().await;
    assert_eq!(app.queue_depth("noop").await, 0);
    app.enqueue_ok(json!({"kind": "noop"})).await;
    app.enqueue_ok(json!({"kind": "noop"})).await;
    let (status, _, queue) = app.get("/v1/queues/noop").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(queue["queue"], "noop");
    assert_eq!(queue["depth"], 2);
    for field in ["scheduled", "running", "dead", "done", "failed"] {
        assert_eq!(queue[field], 0, "{field} in {queue}");
    }
}

#[tokio::test]
async fn every_builtin_queue_and_every_used_queue_is_listed() {
    let app = spawn_app().await;
    app.enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}, "queue": "reports"}))
        .await;
    let (status, _, list) = app.get("/v1/queues").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    for q in jobs::queue::BUILTIN_QUEUES.iter().chain(&["reports"]) {
        assert!(names.contains(q), "{q} missing from {names:?}");
    }
    let reports = list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "reports")
        .unwrap();
    assert_eq!(reports["depth"], 1);
}

#[tokio::test]
async fn an_unknown_queue_is_a_404_and_an_invalid_name_a_400() {
    let app = spawn_app().await;
    assert_problem(
        app.client.get("/v1/queues/never-used").send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    assert_problem(
        app.client.get("/v1/queues/Not%20Valid").send().await,
        StatusCode::BAD_REQUEST,
        "invalid-queue",
    )
    .await;
}
