use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, assert_problem, read, spawn_app};

async fn put(app: &TestApp, name: &str, body: Value) -> poem::test::TestResponse {
    app.client
        .put(format!("/v1/schedules/{name}"))
        .body_json(&body)
        .send()
        .await
}

fn field_errors(problem: &Value) -> Vec<(String, String)> {
    problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().rsplit('/').next().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_schedule_is_created_read_listed_replaced_and_deleted() {
    let app = spawn_app().await;
    let body = json!({"cron": "0 2 * * *", "timezone": "Europe/Berlin",
                      "job": {"kind": "sleep", "payload": {"ms": 5}, "priority": 1},
                      "missed_ticks": "run_once"});
    let (status, headers, created) = read(put(&app, "nightly", body.clone()).await).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(headers.get("location").unwrap(), "/v1/schedules/nightly");
    assert_eq!(created["name"], "nightly");
    assert_eq!(created["origin"], "api");
    assert_eq!(created["missed_ticks"], "run_once");
    assert_eq!(
        created["job"],
        json!({"kind": "sleep", "payload": {"ms": 5}, "priority": 1})
    );
    // 02:00 in Berlin is 00:00 or 01:00 UTC, depending on the season.
    let next = created["next_tick"].as_str().expect("a next tick");
    assert!(next.contains("T00:00:00") || next.contains("T01:00:00"), "{next}");

    let (status, _, one) = app.get("/v1/schedules/nightly").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["recent_ticks"], json!([]));
    assert_eq!(one["next_tick"], created["next_tick"]);

    // Only the job changes: same next tick, 200.
    let mut edited = body.clone();
    edited["job"]["payload"]["ms"] = json!(6);
    let (status, _, replaced) = read(put(&app, "nightly", edited).await).await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["next_tick"], created["next_tick"]);
    assert_eq!(replaced["job"]["payload"]["ms"], 6);

    // Disabled: no next tick.
    let mut off = body.clone();
    off["enabled"] = json!(false);
    let (status, _, disabled) = read(put(&app, "nightly", off).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disabled["enabled"], false);
    assert!(disabled.get("next_tick").is_none(), "{disabled}");

    put(
        &app,
        "every-minute",
        json!({"cron": "0 * * * * *", "job": {"kind": "noop"}}),
    )
    .await;
    let (status, _, list) = app.get("/v1/schedules").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["every-minute", "nightly"]);

    let resp = app.client.delete("/v1/schedules/nightly").send().await;
    assert_eq!(resp.0.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.client.get("/v1/schedules/nightly").send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    assert_problem(
        app.client.delete("/v1/schedules/nightly").send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
    // A PUT brings a deleted name back, as new.
    let (status, _, _) = read(put(&app, "nightly", body).await).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_bad_cron_expression_is_a_422_naming_the_field() {
    let app = spawn_app().await;
    for cron in ["0 2 * *", "61 * * * *", "0 3 * * 8", "whenever"] {
        let problem = assert_problem(
            put(&app, "s", json!({"cron": cron, "job": {"kind": "noop"}})).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-field",
        )
        .await;
        assert_eq!(
            field_errors(&problem),
            [("cron".to_owned(), "invalid-field".to_owned())],
            "{problem}"
        );
        assert!(
            problem["detail"].as_str().unwrap().starts_with("cron: "),
            "{problem}"
        );
    }
    let problem = assert_problem(
        put(
            &app,
            "s",
            json!({"cron": "* * * * *", "timezone": "Moon/Base", "job": {"kind": "noop"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
    )
    .await;
    assert_eq!(
        field_errors(&problem),
        [("timezone".to_owned(), "invalid-field".to_owned())]
    );
    // Nothing was stored.
    assert_problem(
        app.client.get("/v1/schedules/s").send().await,
        StatusCode::NOT_FOUND,
        "not-found",
    )
    .await;
}

#[tokio::test]
async fn the_job_template_is_checked_against_the_catalog_with_the_enqueue_problem_types() {
    let app = spawn_app().await;
    let problem = assert_problem(
        put(&app, "s", json!({"cron": "* * * * *", "job": {"kind": "nope"}})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown-kind",
    )
    .await;
    assert_eq!(
        field_errors(&problem),
        [("job.kind".to_owned(), "unknown-kind".to_owned())]
    );

    let problem = assert_problem(
        put(
            &app,
            "s",
            json!({"cron": "* * * * *", "job": {"kind": "sleep", "payload": {"ms": "x"}}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-payload",
    )
    .await;
    assert_eq!(
        field_errors(&problem),
        [("job.payload.ms".to_owned(), "invalid-payload".to_owned())]
    );

    let problem = assert_problem(
        put(
            &app,
            "s",
            json!({"cron": "* * * * *", "job": {"kind": "noop", "queue": "No Such"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-queue",
    )
    .await;
    assert_eq!(
        field_errors(&problem),
        [("job.queue".to_owned(), "invalid-queue".to_owned())]
    );
}

#[tokio::test]
async fn every_bad_field_is_reported_at_once() {
    let app = spawn_app().await;
    let problem = assert_problem(
        put(
            &app,
            "Bad%20Name",
            json!({"cron": 5, "job": {"kind": "nope", "extra": 1}, "enabled": "yes",
                   "missed_ticks": "sometimes", "colour": "red"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-field",
    )
    .await;
    let fields: Vec<String> = field_errors(&problem).into_iter().map(|(f, _)| f).collect();
    for f in ["name", "cron", "job.extra", "enabled", "missed_ticks", "colour"] {
        assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
    }
    // Not JSON, and the wrong media type, are the API's usual problems.
    let resp = app
        .client
        .put("/v1/schedules/s")
        .content_type("application/json")
        .body("{")
        .send()
        .await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-json").await;
}

#[tokio::test]
async fn the_schedule_routes_are_in_the_openapi_document() {
    let app = spawn_app().await;
    let (status, _, spec) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let paths = &spec["paths"];
    assert!(paths["/v1/schedules"]["get"].is_object(), "{paths}");
    for method in ["get", "put", "delete"] {
        let op = &paths["/v1/schedules/{name}"][method];
        assert!(op.is_object(), "{method} missing");
        assert!(op["responses"]["422"].is_object() || method != "put", "{op}");
    }
    assert_eq!(paths["/v1/schedules/{name}"]["put"]["operationId"], "putSchedule");
}
