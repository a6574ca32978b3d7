//! What the dashboard serves and reads: its embedded page and assets, a queue's jobs by state,
//! search, per-minute activity, workers, and enabling or disabling a schedule.

use chrono::{Duration, Utc};
use poem::http::StatusCode;
use schema::history::{AttemptOutcome, HistoryEvent, JobState};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{TestApp, assert_problem, read, spawn_app};

/// Records a job in the history database as the API and a worker would: enqueued, then one
/// finished attempt per entry of `attempts` (outcome, error); the job ends in `status`.
async fn record_job(
    app: &TestApp,
    kind: &str,
    payload: Value,
    attempts: &[(AttemptOutcome, Option<&str>)],
    status: JobState,
) -> Uuid {
    let id = Uuid::now_v7();
    let at = Utc::now();
    let mut events = vec![HistoryEvent::Enqueued {
        id,
        queue: "default".into(),
        kind: kind.into(),
        payload,
        max_attempts: 5,
        priority: 0,
        idempotency_key: None,
        trace_id: None,
        run_at: None,
        at,
    }];
    for (i, (outcome, error)) in attempts.iter().enumerate() {
        let last = i + 1 == attempts.len();
        events.push(HistoryEvent::Finished {
            id,
            queue: "default".into(),
            kind: kind.into(),
            attempt: i32::try_from(i + 1).unwrap(),
            max_attempts: 5,
            worker_id: "test-worker".into(),
            trace_id: None,
            started_at: at,
            at: at + Duration::milliseconds(i64::try_from(i).unwrap() + 1),
            outcome: *outcome,
            error: error.map(str::to_owned),
            status: if last { status } else { JobState::Retrying },
            next_run_at: None,
        });
    }
    schema::history::apply_batch(&app.db, &events)
        .await
        .expect("history written");
    id
}

fn ids(list: &Value) -> Vec<String> {
    list["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("a job list: {list}"))
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_dashboard_page_and_its_assets_load_without_a_key_under_a_same_origin_policy() {
    let app = spawn_app().await;
    let anonymous = app.anonymous();
    for path in ["/dashboard", "/dashboard/"] {
        let resp = anonymous.get(path).send().await;
        let (status, headers, _) = read(resp).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self';") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
    }
    let resp = anonymous.get("/dashboard/app.js").send().await;
    resp.assert_status_is_ok();
    resp.assert_header("content-type", "text/javascript; charset=utf-8");
    resp.assert_header("cache-control", "no-cache");
    let etag = resp.0.headers()["etag"].to_str().unwrap().to_owned();
    let body = resp.0.into_body().into_string().await.unwrap();
    assert!(
        body.contains("Authorization") || body.contains("./api.js"),
        "the real app.js"
    );

    // A revalidation of an unchanged asset is answered without it.
    let again = anonymous
        .get("/dashboard/app.js")
        .header("if-none-match", &etag)
        .send()
        .await;
    again.assert_status(StatusCode::NOT_MODIFIED);

    anonymous
        .get("/dashboard/style.css")
        .send()
        .await
        .assert_header("content-type", "text/css; charset=utf-8");
    anonymous
        .get("/dashboard/no-such-file.js")
        .send()
        .await
        .assert_status(StatusCode::NOT_FOUND);
    // The page holds no data: the data routes still need a key.
    anonymous
        .get("/v1/queues/default/jobs")
        .send()
        .await
        .assert_status(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_queues_jobs_are_listed_newest_first_by_state_with_a_total_for_paging() {
    let app = spawn_app().await;
    let failed = [(AttemptOutcome::Failed, Some("boom"))];
    let dead_a = record_job(&app, "sleep", json!({"ms": 1}), &failed, JobState::Dead).await;
    let ok = record_job(
        &app,
        "sleep",
        json!({"ms": 2}),
        &[(AttemptOutcome::Succeeded, None)],
        JobState::Succeeded,
    )
    .await;
    let dead_b = record_job(&app, "sleep", json!({"ms": 3}), &failed, JobState::Dead).await;

    let (status, _, dead) = app.get("/v1/queues/default/jobs?state=dead").await;
    assert_eq!(status, StatusCode::OK, "{dead}");
    assert_eq!(ids(&dead), [dead_b.to_string(), dead_a.to_string()]);
    assert_eq!(
        (dead["total"].as_u64(), dead["state"].as_str()),
        (Some(2), Some("dead"))
    );
    assert_eq!(dead["jobs"][0]["last_error"], "boom");

    let (_, _, all) = app.get("/v1/queues/default/jobs").await;
    assert_eq!(all["total"], 3, "{all}");
    assert!(all.get("state").is_none(), "absent, not null: {all}");
    let (_, _, second) = app.get("/v1/queues/default/jobs?offset=1&limit=1").await;
    assert_eq!(ids(&second), [ok.to_string()]);

    let resp = app.client.get("/v1/queues/nowhere/jobs").send().await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not-found").await;
    let resp = app
        .client
        .get("/v1/queues/default/jobs?state=sleepy")
        .send()
        .await;
    let (status, _, _) = read(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn search(app: &TestApp, q: &str) -> Vec<String> {
    let q = q.replace('%', "%25").replace(' ', "%20");
    let (status, _, found) = app.get(&format!("/v1/jobs?q={q}")).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    ids(&found)
}

#[tokio::test]
async fn a_search_finds_jobs_by_id_kind_payload_text_and_any_attempts_error_ignoring_case() {
    let app = spawn_app().await;
    let by_attempt = record_job(
        &app,
        "sleep",
        json!({"ms": 1, "tag": "tenant-blue"}),
        &[
            (AttemptOutcome::Failed, Some("Connection REFUSED by upstream")),
            (AttemptOutcome::Succeeded, None),
        ],
        JobState::Succeeded,
    )
    .await;
    let by_last = record_job(
        &app,
        "noop",
        json!({}),
        &[(AttemptOutcome::Failed, Some("disk 100% full"))],
        JobState::Dead,
    )
    .await;

    // An error of an earlier attempt: the job succeeded since.
    assert_eq!(search(&app, "connection refused").await, [by_attempt.to_string()]);
    assert_eq!(search(&app, "tenant-blue").await, [by_attempt.to_string()]);
    assert_eq!(search(&app, "noop").await, [by_last.to_string()]);
    assert_eq!(search(&app, &by_last.to_string()).await, [by_last.to_string()]);
    // `%` and `_` are text, not patterns.
    assert_eq!(search(&app, "100% full").await, [by_last.to_string()]);
    assert!(search(&app, "0_ful").await.is_empty());
    // Newest first.
    assert_eq!(
        search(&app, "s").await,
        [by_last.to_string(), by_attempt.to_string()]
    );

    let resp = app.client.get("/v1/jobs?q=%20%20").send().await;
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid-field").await;
    let resp = app.client.get("/v1/jobs?q=x&queue=Not%20A%20Queue").send().await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid-queue").await;
}

#[tokio::test]
async fn activity_counts_each_queues_finished_attempts_per_minute_for_the_whole_window() {
    let app = spawn_app().await;
    record_job(
        &app,
        "sleep",
        json!({"ms": 1}),
        &[
            (AttemptOutcome::Failed, Some("x")),
            (AttemptOutcome::TimedOut, Some("y")),
            (AttemptOutcome::Succeeded, None),
        ],
        JobState::Succeeded,
    )
    .await;
    let (status, _, activity) = app.get("/v1/activity?minutes=5").await;
    assert_eq!(status, StatusCode::OK, "{activity}");
    let queues = activity["queues"].as_array().unwrap();
    assert!(
        queues.iter().any(|q| q["queue"] == "noop"),
        "every known queue: {activity}"
    );
    let default = queues.iter().find(|q| q["queue"] == "default").unwrap();
    let minutes = default["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 5, "{default}");
    let succeeded: u64 = minutes.iter().map(|m| m["succeeded"].as_u64().unwrap()).sum();
    let failed: u64 = minutes.iter().map(|m| m["failed"].as_u64().unwrap()).sum();
    assert_eq!((succeeded, failed), (1, 2), "{default}");

    let resp = app.client.get("/v1/activity?minutes=0").send().await;
    let (status, _, _) = read(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn workers_are_listed_while_their_heartbeat_is_recent_and_stale_ones_expire() {
    let app = spawn_app().await;
    let now = Utc::now();
    let row = |id: &str, beat| schema::workers::WorkerRow {
        id: id.into(),
        host: "pod-a".into(),
        queues: "default,noop".into(),
        concurrency: 8,
        started_at: now - Duration::minutes(5),
        heartbeat_at: beat,
    };
    schema::workers::heartbeat(&app.db, row("alive", now))
        .await
        .unwrap();
    schema::workers::heartbeat(&app.db, row("silent", now - Duration::minutes(2)))
        .await
        .unwrap();

    let (status, _, list) = app.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let workers = list["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{list}");
    assert_eq!(workers[0]["id"], "alive");
    assert_eq!(workers[0]["queues"], json!(["default", "noop"]));
    assert_eq!(workers[0]["concurrency"], 8);

    let expired = schema::workers::expire(&app.db, now - Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(expired, 1);
}

#[tokio::test]
async fn a_schedule_is_disabled_and_enabled_again_from_its_next_tick() {
    let app = spawn_app().await;
    let body = json!({"cron": "*/5 * * * *", "job": {"kind": "noop"}});
    let resp = app.client.put("/v1/schedules/tidy").body_json(&body).send().await;
    resp.assert_status(StatusCode::CREATED);
    let set = |enabled: Value| {
        let client = &app.client;
        async move {
            read(
                client
                    .put("/v1/schedules/tidy/enabled")
                    .body_json(&json!({ "enabled": enabled }))
                    .send()
                    .await,
            )
            .await
        }
    };

    let (status, _, off) = set(json!(false)).await;
    assert_eq!(status, StatusCode::OK, "{off}");
    assert_eq!(off["enabled"], false);
    assert!(
        off.get("next_tick").is_none(),
        "a disabled schedule has no next tick: {off}"
    );
    assert_eq!(off["job"]["kind"], "noop", "the rest stays");

    let (_, _, on) = set(json!(true)).await;
    assert_eq!(on["enabled"], true, "{on}");
    let next: chrono::DateTime<Utc> = on["next_tick"].as_str().unwrap().parse().unwrap();
    assert!(
        next > Utc::now() - Duration::seconds(1) && next <= Utc::now() + Duration::minutes(5),
        "{on}"
    );

    let (status, _, problem) = set(json!("yes")).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("https://drover.dev/problems/invalid-field")
        ),
        "{problem}"
    );
    let resp = app
        .client
        .put("/v1/schedules/nowhere/enabled")
        .body_json(&json!({"enabled": true}))
        .send()
        .await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not-found").await;
}
