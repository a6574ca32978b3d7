use api::ApiConfig;
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{DOWN_REDIS_URL, assert_problem, read, spawn_app, spawn_app_with};

#[tokio::test]
async fn liveness_and_readiness_answer_200_when_everything_is_up() {
    let app = spawn_app().await;
    let (status, _, health) = app.get("/healthz").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let (status, _, ready) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"], json!({"database": "ok", "broker": "ok"}));
}

#[tokio::test]
async fn readiness_names_the_broker_when_it_is_down() {
    let app = spawn_app_with(DOWN_REDIS_URL, ApiConfig::default()).await;
    let (status, _, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let problem = assert_problem(
        app.client.get("/readyz").send().await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
    )
    .await;
    assert_eq!(problem["checks"]["database"], "ok");
    assert_ne!(problem["checks"]["broker"], "ok");
    assert!(
        problem["detail"].as_str().unwrap().contains("broker"),
        "{problem}"
    );
}

#[tokio::test]
async fn metrics_count_jobs_and_requests_by_route_template_and_show_queue_depths() {
    let app = spawn_app().await;
    // A queue of its own, so counters from other tests in this process do not interfere.
    let queue = format!("m-{}", uuid::Uuid::now_v7().simple());
    let id = app
        .enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}, "queue": queue}))
        .await;
    app.get(&format!("/v1/jobs/{id}")).await;
    app.get("/no/such/route").await;

    let resp = app.client.get("/metrics").send().await;
    resp.assert_status_is_ok();
    let text = resp.0.into_body().into_string().await.unwrap();
    let has = |needle: &str| text.lines().any(|l| l.contains(needle));
    assert!(
        has(&format!(
            r#"drover_jobs_enqueued_total{{queue="{queue}",kind="sleep"}} 1"#
        )),
        "{text}"
    );
    assert!(
        has(r#"drover_http_requests_total{route="/v1/jobs",status="202"}"#),
        "{text}"
    );
    assert!(
        has(r#"drover_http_requests_total{route="/v1/jobs/{id}",status="200"}"#),
        "{text}"
    );
    assert!(
        has(r#"drover_http_requests_total{route="unmatched",status="404"}"#),
        "{text}"
    );
    assert!(
        has(r#"drover_http_request_duration_seconds_bucket{route="/v1/jobs""#),
        "{text}"
    );
    assert!(
        has(&format!(
            r#"drover_queue_depth{{queue="{queue}",state="pending"}} 1"#
        )),
        "{text}"
    );
    assert!(!text.contains(&id), "a job id leaked into a label");
}

#[tokio::test]
async fn metrics_answer_promptly_while_the_broker_is_down() {
    let app = spawn_app_with(DOWN_REDIS_URL, ApiConfig::default()).await;
    let started = std::time::Instant::now();
    app.client.get("/metrics").send().await.assert_status_is_ok();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_the_docs_page_serves_it() {
    let app = spawn_app().await;
    let (status, _, spec) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let paths = spec["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/v1/jobs", "post"),
        ("/v1/jobs/batch", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}", "delete"),
        ("/v1/queues", "get"),
        ("/v1/queues/{queue}", "get"),
        ("/v1/backups", "get"),
        ("/v1/backups", "post"),
        ("/v1/backups/{id}", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    let problem =
        &spec["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/problem+json"];
    assert_ne!(problem, &Value::Null, "422 is documented as problem+json");

    let resp = app.client.get("/docs").send().await;
    resp.assert_status_is_ok();
    let html = resp.0.into_body().into_string().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_too() {
    let app = spawn_app().await;
    assert_problem(
        app.client.get("/v2/anything").send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    let resp = app.client.put("/v1/jobs").send().await;
    assert_problem(resp, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed").await;
    let (status, _, _) = read(app.client.get("/healthz").send().await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn serve_answers_on_a_port_0_listener_until_shutdown() {
    let app = spawn_app().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, app.state.clone(), async {
        let _ = stopped.await;
    }));

    let http = app.http_client();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let too_big = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"kind":"noop","pad":"{}"}}"#, "x".repeat(2 << 20)))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_big.headers()["content-type"], "application/problem+json");

    stop.send(()).unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "serve did not stop cleanly: {result:?}"
    );
}
