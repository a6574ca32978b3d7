//! Authentication and authorization: every route × every kind of credential, generated from the
//! OpenAPI document (so a route without a rule in `api::auth::RULES` fails here), and the
//! behaviours around it: revocation, expiry, rate limits, audit, headers, JSON limits.

use std::time::Duration;

use api::{Access, ApiConfig, MetricsAuth, Rate, RateLimits, Role, auth};
use chrono::Utc;
use poem::{EndpointExt, http::StatusCode, test::TestClient};
use serde_json::{Value, json};

use crate::support::{REDIS_URL, TestApp, read, spawn_app, spawn_app_with};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Credential {
    NoKey,
    /// A well-formed key with a real id and a wrong secret.
    BadKey,
    Revoked,
    Expired,
    Viewer,
    Operator,
    Admin,
}

const CREDENTIALS: [Credential; 7] = [
    Credential::NoKey,
    Credential::BadKey,
    Credential::Revoked,
    Credential::Expired,
    Credential::Viewer,
    Credential::Operator,
    Credential::Admin,
];

impl Credential {
    fn role(self) -> Option<Role> {
        match self {
            Credential::Viewer => Some(Role::Viewer),
            Credential::Operator => Some(Role::Operator),
            Credential::Admin => Some(Role::Admin),
            _ => None,
        }
    }
}

struct Keys {
    bad: String,
    revoked: String,
    expired: String,
    viewer: String,
    operator: String,
    admin: String,
}

impl Keys {
    async fn make(app: &TestApp) -> Self {
        let revoked = app.key(Role::Admin, None).await;
        let revoked_id = auth::key_id(&revoked).unwrap().to_owned();
        assert!(
            schema::keys::revoke(&app.db, &revoked_id, Utc::now())
                .await
                .unwrap()
        );
        let admin = app.key(Role::Admin, None).await;
        let id = auth::key_id(&admin).unwrap();
        Keys {
            bad: format!("drv_{id}_{}", "0".repeat(64)),
            revoked,
            expired: app
                .key(Role::Admin, Some(Utc::now() - chrono::Duration::seconds(1)))
                .await,
            viewer: app.key(Role::Viewer, None).await,
            operator: app.key(Role::Operator, None).await,
            admin,
        }
    }

    fn of(&self, c: Credential) -> Option<&str> {
        match c {
            Credential::NoKey => None,
            Credential::BadKey => Some(&self.bad),
            Credential::Revoked => Some(&self.revoked),
            Credential::Expired => Some(&self.expired),
            Credential::Viewer => Some(&self.viewer),
            Credential::Operator => Some(&self.operator),
            Credential::Admin => Some(&self.admin),
        }
    }
}

/// A request that the operation answers with a 2xx when it is allowed: (path, body). Fixtures
/// it needs (a job to cancel, a schedule to delete) are made with the admin client first.
/// An operation this does not know gets its template with `x` for each parameter and an
/// empty body: the matrix then checks its 401/403 answers, and for allowed credentials only
/// that it got past authentication.
async fn sample(app: &TestApp, operation: &str, template: &str, n: usize) -> (String, Option<Value>, bool) {
    let admin = &app.client;
    let known = |path: String, body: Option<Value>| (path, body, true);
    match operation {
        "getQueue" => known("/v1/queues/noop".into(), None),
        "getJob" => {
            let id = app.enqueue_ok(json!({"kind": "noop"})).await;
            known(format!("/v1/jobs/{id}"), None)
        }
        "enqueueJob" => known("/v1/jobs".into(), Some(json!({"kind": "noop"}))),
        "enqueueBatch" => known("/v1/jobs/batch".into(), Some(json!({"jobs": [{"kind": "noop"}]}))),
        "cancelJob" => {
            let id = app
                .enqueue_ok(json!({"kind": "sleep", "payload": {"ms": 1}, "delay_s": 3600}))
                .await;
            known(format!("/v1/jobs/{id}"), None)
        }
        "getSchedule" | "deleteSchedule" => {
            let name = format!("matrix-{n}");
            let resp = admin
                .put(format!("/v1/schedules/{name}"))
                .body_json(&json!({"cron": "0 0 * * *", "job": {"kind": "noop"}}))
                .send()
                .await;
            resp.assert_status(StatusCode::CREATED);
            known(format!("/v1/schedules/{name}"), None)
        }
        "putSchedule" => known(
            format!("/v1/schedules/matrix-put-{n}"),
            Some(json!({"cron": "0 0 * * *", "job": {"kind": "noop"}})),
        ),
        "getBackup" => {
            let id = uuid::Uuid::now_v7();
            schema::backups::start(
                &app.db,
                schema::backups::Started {
                    id,
                    source: "config".into(),
                    target: "drover".into(),
                    store: "file:///tmp/none".into(),
                    object_key: "k".into(),
                    format: "toml".into(),
                    encrypted: false,
                    at: Utc::now(),
                },
            )
            .await
            .unwrap();
            known(format!("/v1/backups/{id}"), None)
        }
        "enqueueBackup" => known(
            "/v1/backups".into(),
            Some(json!({"source": "config", "target": "drover"})),
        ),
        // Routes without parameters or body: their template is the request.
        "healthz" | "readyz" | "metrics" | "listQueues" | "listSchedules" | "listBackups" => {
            known(template.to_owned(), None)
        }
        _ => {
            let path: Vec<String> = template
                .split('/')
                .map(|s| {
                    if s.starts_with('{') {
                        "x".to_owned()
                    } else {
                        s.to_owned()
                    }
                })
                .collect();
            (path.join("/"), Some(json!({})), false)
        }
    }
}

fn matrix_config() -> ApiConfig {
    ApiConfig {
        // The matrix presents dozens of bad keys from one client on purpose.
        rate_limits: RateLimits {
            auth_failures: None,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_every_credential_exactly_as_its_rule_says() {
    let app = spawn_app_with(REDIS_URL, matrix_config()).await;
    let keys = Keys::make(&app).await;
    let anonymous = app.anonymous();
    let (status, _, doc) = read(anonymous.get("/openapi.json").send().await).await;
    assert_eq!(status, StatusCode::OK);

    let mut operations = Vec::new();
    for (template, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let id = op["operationId"]
                .as_str()
                .expect("every operation has an id")
                .to_owned();
            operations.push((template.clone(), method.to_uppercase(), id, op.clone()));
        }
    }
    let missing: Vec<String> = operations
        .iter()
        .filter(|(_, _, id, _)| auth::rule(id).is_none())
        .map(|(t, m, id, _)| format!("{m} {t} ({id})"))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without an authorization rule — add one line each to api::auth::RULES: {missing:?}"
    );
    for (op, _) in auth::RULES {
        assert!(
            operations.iter().any(|(_, _, id, _)| id == op),
            "api::auth::RULES names {op}, which is no operation of the API"
        );
    }

    let mut unchecked = Vec::new();
    let mut n = 0;
    for (template, method, id, op) in &operations {
        let access = auth::rule(id).unwrap();
        // The document says which operations need the bearer scheme.
        assert_eq!(
            op.get("security").is_some(),
            // `/metrics` is open by default.
            access != Access::Open && access != Access::Metrics,
            "{method} {template}: security in the OpenAPI document"
        );
        for credential in CREDENTIALS {
            n += 1;
            let (path, body, known) = sample(&app, id, template, n).await;
            let mut req = anonymous.request(method.parse().unwrap(), &path);
            if let Some(key) = keys.of(credential) {
                req = req.header("authorization", format!("Bearer {key}"));
            }
            if let Some(body) = &body {
                req = req.body_json(body);
            }
            let (status, _, problem) = read(req.send().await).await;
            let needed = match access {
                Access::Open | Access::Metrics => None,
                Access::Role(r) => Some(r),
            };
            let case = format!("{method} {template} ({id}) with {credential:?}: {status} {problem}");
            match (needed, credential.role()) {
                (None, _) => assert!(status.is_success(), "{case}: an open route answers 2xx"),
                (Some(_), None) => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}");
                    assert_eq!(
                        problem["type"], "https://drover.dev/problems/unauthorized",
                        "{case}"
                    );
                }
                (Some(needed), Some(role)) if role < needed => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{case}");
                    assert_eq!(problem["type"], "https://drover.dev/problems/forbidden", "{case}");
                }
                (Some(_), Some(_)) if known => assert!(status.is_success(), "{case}: expected 2xx"),
                (Some(_), Some(_)) => {
                    assert!(
                        ![401, 403, 429].contains(&status.as_u16()) && !status.is_server_error(),
                        "{case}: an allowed credential gets past authentication"
                    );
                    unchecked.push(format!("{method} {template}"));
                }
            }
        }
    }
    unchecked.dedup();
    if !unchecked.is_empty() {
        eprintln!("no 2xx sample request for {unchecked:?} (add one to `sample` in api/tests/api/auth.rs)");
    }
}

#[tokio::test]
async fn a_path_no_route_knows_needs_an_admin_key_before_it_is_a_404() {
    let app = spawn_app_with(REDIS_URL, matrix_config()).await;
    let viewer = app.key(Role::Viewer, None).await;
    let anonymous = app.anonymous();
    let status = |r: poem::test::TestResponse| r.0.status();
    assert_eq!(
        status(anonymous.get("/v1/nothing").send().await),
        StatusCode::UNAUTHORIZED
    );
    let as_viewer = anonymous
        .get("/v1/jobs/abc/")
        .header("authorization", format!("Bearer {viewer}"))
        .send()
        .await;
    assert_eq!(status(as_viewer), StatusCode::FORBIDDEN);
    assert_eq!(
        status(app.client.get("/v1/nothing").send().await),
        StatusCode::NOT_FOUND
    );
    // What holds no data stays open.
    assert_eq!(status(anonymous.get("/docs").send().await), StatusCode::OK);
    assert_eq!(status(anonymous.get("/healthz").send().await), StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_key_is_refused_within_the_key_cache_ttl() {
    let app = spawn_app_with(
        REDIS_URL,
        ApiConfig {
            key_cache_ttl: Duration::from_millis(300),
            ..matrix_config()
        },
    )
    .await;
    let key = app.key(Role::Viewer, None).await;
    let client = app.anonymous();
    let get = || {
        client
            .get("/v1/queues")
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    get().await.assert_status_is_ok();
    assert!(
        schema::keys::revoke(&app.db, auth::key_id(&key).unwrap(), Utc::now())
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, headers, problem) = read(get().await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
    assert_eq!(problem["detail"], "the API key has been revoked");
    assert!(headers.get("www-authenticate").is_some());
}

#[tokio::test]
async fn a_key_records_its_last_use_off_the_request_path() {
    let app = spawn_app().await;
    let key = app.key(Role::Viewer, None).await;
    let id = auth::key_id(&key).unwrap().to_owned();
    app.anonymous()
        .get("/v1/queues")
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .assert_status_is_ok();
    let start = std::time::Instant::now();
    loop {
        let row = schema::keys::get(&app.db, &id).await.unwrap().unwrap();
        if row.last_used_at.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "last_used_at never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn limited(rate_limits: RateLimits) -> ApiConfig {
    ApiConfig {
        rate_limits,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_key_over_its_rate_gets_a_429_problem_with_retry_after() {
    let app = spawn_app_with(
        REDIS_URL,
        limited(RateLimits {
            per_key: Some(Rate {
                per_second: 0.5,
                burst: 3,
            }),
            ..Default::default()
        }),
    )
    .await;
    for _ in 0..3 {
        app.client.get("/v1/queues").send().await.assert_status_is_ok();
    }
    let (status, headers, problem) = read(app.client.get("/v1/queues").send().await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    assert_eq!(problem["type"], "https://drover.dev/problems/rate-limited");
    assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    // Another key has its own bucket.
    let other = app.key(Role::Viewer, None).await;
    app.anonymous()
        .get("/v1/queues")
        .header("authorization", format!("Bearer {other}"))
        .send()
        .await
        .assert_status_is_ok();
}

#[tokio::test]
async fn a_client_that_keeps_failing_authentication_is_answered_429() {
    let app = spawn_app_with(
        REDIS_URL,
        limited(RateLimits {
            auth_failures: Some(Rate {
                per_second: 0.1,
                burst: 3,
            }),
            ..Default::default()
        }),
    )
    .await;
    // The admin key is verified (and cached) before the failures begin.
    app.client.get("/v1/queues").send().await.assert_status_is_ok();
    let anonymous = app.anonymous();
    let bad = format!("drv_{}_{}", "a".repeat(12), "b".repeat(64));
    for _ in 0..3 {
        let resp = anonymous
            .get("/v1/queues")
            .header("authorization", format!("Bearer {bad}"))
            .send()
            .await;
        resp.assert_status(StatusCode::UNAUTHORIZED);
    }
    let resp = anonymous
        .get("/v1/queues")
        .header("authorization", format!("Bearer {bad}"))
        .send()
        .await;
    resp.assert_status(StatusCode::TOO_MANY_REQUESTS);
    // A valid key the cache already vouches for is not held up by the failures.
    app.client.get("/v1/queues").send().await.assert_status_is_ok();
}

#[tokio::test]
async fn api_replicas_on_one_redis_share_a_keys_bucket() {
    let config = limited(RateLimits {
        per_key: Some(Rate {
            per_second: 0.5,
            burst: 4,
        }),
        ..Default::default()
    });
    let app = spawn_app_with(REDIS_URL, config).await;
    let (a, b) = (replica(&app).await, replica(&app).await);
    for client in [&a, &b, &a, &b] {
        client.get("/v1/queues").send().await.assert_status_is_ok();
    }
    a.get("/v1/queues")
        .send()
        .await
        .assert_status(StatusCode::TOO_MANY_REQUESTS);
    b.get("/v1/queues")
        .send()
        .await
        .assert_status(StatusCode::TOO_MANY_REQUESTS);
}

/// The app's routes as another API process would serve them: its own key cache, rate-limit
/// buckets in the same Redis under the same prefix.
async fn replica(app: &TestApp) -> TestClient<poem::endpoint::BoxEndpoint<'static, poem::Response>> {
    let limiter = api::RateLimiter::redis(REDIS_URL, &app.prefix)
        .await
        .expect("Redis");
    TestClient::new(api::routes(app.state.clone().with_rate_limiter(limiter)).boxed())
        .default_header("authorization", format!("Bearer {}", app.admin_key))
}

#[tokio::test]
async fn every_mutating_call_is_audited_with_key_route_target_and_outcome() {
    let app = spawn_app_with(REDIS_URL, matrix_config()).await;
    let (audit, task) = schema::audit::AuditWriter::spawn(app.db.clone(), Default::default());
    let client = TestClient::new(api::routes(app.state.clone().with_audit(audit.clone())).boxed());
    let operator = app.key(Role::Operator, None).await;
    let viewer = app.key(Role::Viewer, None).await;
    let bearer = |k: &str| format!("Bearer {k}");
    let accepted = client
        .post("/v1/jobs")
        .header("authorization", bearer(&operator))
        .body_json(&json!({"kind": "noop"}))
        .send()
        .await;
    let (status, _, body) = read(accepted).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    client
        .post("/v1/jobs")
        .header("authorization", bearer(&viewer))
        .body_json(&json!({"kind": "noop"}))
        .send()
        .await
        .assert_status(StatusCode::FORBIDDEN);
    client
        .delete("/v1/schedules/none")
        .send()
        .await
        .assert_status(StatusCode::UNAUTHORIZED);
    // Reads are not audited.
    client
        .get("/v1/queues")
        .header("authorization", bearer(&viewer))
        .send()
        .await
        .assert_status_is_ok();
    audit.flush().await;
    let rows = schema::audit::recent(&app.db, 10).await.unwrap();
    let seen: Vec<(Option<&str>, &str, &str, i16, &str)> = rows
        .iter()
        .rev()
        .map(|r| {
            (
                r.key_id.as_deref(),
                r.route.as_str(),
                r.target.as_str(),
                r.status,
                r.outcome.as_str(),
            )
        })
        .collect();
    let job = format!("/v1/jobs/{}", body["id"].as_str().unwrap());
    assert_eq!(
        seen,
        [
            (auth::key_id(&operator), "/v1/jobs", job.as_str(), 202, "ok"),
            (auth::key_id(&viewer), "/v1/jobs", "/v1/jobs", 403, "forbidden"),
            (
                None,
                "/v1/schedules/{name}",
                "/v1/schedules/none",
                401,
                "unauthorized"
            ),
        ]
    );
    assert_eq!(rows[2].role.as_deref(), Some("operator"));
    drop(audit);
    task.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn metrics_need_a_key_only_when_configured() {
    let open = spawn_app().await;
    open.anonymous()
        .get("/metrics")
        .send()
        .await
        .assert_status_is_ok();
    let keyed = spawn_app_with(
        REDIS_URL,
        ApiConfig {
            metrics_auth: MetricsAuth::Key,
            ..Default::default()
        },
    )
    .await;
    keyed
        .anonymous()
        .get("/metrics")
        .send()
        .await
        .assert_status(StatusCode::UNAUTHORIZED);
    keyed.client.get("/metrics").send().await.assert_status_is_ok();
}

#[tokio::test]
async fn html_pages_carry_security_headers_and_cors_is_off_by_default() {
    let app = spawn_app().await;
    let docs = app
        .anonymous()
        .get("/docs")
        .header("origin", "https://evil.example")
        .send()
        .await;
    docs.assert_status_is_ok();
    let h = docs.0.headers();
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h.get("access-control-allow-origin").is_none());
    let api = app
        .client
        .get("/v1/queues")
        .header("origin", "https://evil.example")
        .send()
        .await;
    assert_eq!(api.0.headers()["x-content-type-options"], "nosniff");
    assert!(api.0.headers().get("access-control-allow-origin").is_none());

    let cors = spawn_app_with(
        REDIS_URL,
        ApiConfig {
            cors_origins: vec!["https://ops.example".into()],
            ..Default::default()
        },
    )
    .await;
    let resp = cors
        .client
        .get("/v1/queues")
        .header("origin", "https://ops.example")
        .send()
        .await;
    assert_eq!(
        resp.0.headers()["access-control-allow-origin"],
        "https://ops.example"
    );
}

#[tokio::test]
async fn a_body_nested_too_deep_is_a_400_before_it_is_parsed() {
    let app = spawn_app().await;
    let deep = format!(
        r#"{{"kind":"sleep","payload":{{"ms":1,"x":{}1{}}}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let resp = app
        .client
        .post("/v1/jobs")
        .content_type("application/json")
        .body(deep)
        .send()
        .await;
    let problem = crate::support::assert_problem(resp, StatusCode::BAD_REQUEST, "json-too-complex").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("32 levels"),
        "{problem}"
    );
}
