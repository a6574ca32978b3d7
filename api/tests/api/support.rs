//! `TestApp`: the API's routes over an isolated broker namespace and history database.

use std::{sync::Arc, time::Duration};

use api::{ApiConfig, AppState};
use poem::{
    EndpointExt, Response,
    endpoint::BoxEndpoint,
    http::StatusCode,
    test::{TestClient, TestResponse},
};
use schema::history::{HistoryConfig, HistoryTask, HistoryWriter};
use sea_orm::DatabaseConnection;
use serde_json::Value;

pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Nothing listens on port 1: a broker that is down.
pub(crate) const DOWN_REDIS_URL: &str = "redis://127.0.0.1:1/0";

pub(crate) struct TestApp {
    /// Sends every request with [`TestApp::admin_key`]: tests of the routes themselves need not
    /// think about authentication. Tests of authentication use [`TestApp::anonymous`].
    pub(crate) client: TestClient<BoxEndpoint<'static, Response>>,
    /// An admin key of this app's database, made at spawn.
    pub(crate) admin_key: String,
    pub(crate) db: DatabaseConnection,
    pub(crate) history: HistoryWriter,
    /// The state the routes were built from (for tests that serve it themselves).
    pub(crate) state: AppState,
    /// Every Redis key of this test starts with `{prefix}:`; dropped when the app is.
    pub(crate) prefix: String,
    _history_task: HistoryTask,
    _dir: tempfile::TempDir,
}

/// An app on the local Redis with the default limits.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(REDIS_URL, ApiConfig::default()).await
}

pub(crate) async fn spawn_app_with(broker_url: &str, config: ApiConfig) -> TestApp {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db_url = format!("sqlite://{}", dir.path().join("history.db").display());
    let db = schema::connect(&db_url)
        .await
        .expect("the SQLite history database opens");
    schema::migrate(&db).await.expect("the history database migrates");

    let prefix = format!("drover-api-test-{}", uuid::Uuid::now_v7().simple());
    let opts = jobs::BrokerOptions {
        prefix: prefix.clone(),
        db: db.clone(),
        amqp_queue_type: Default::default(),
    };
    let broker = jobs::broker::connect(broker_url, opts)
        .await
        .expect("connecting is lazy and cannot fail");
    if broker_url == REDIS_URL {
        let ping = tokio::time::timeout(Duration::from_secs(5), broker.ping()).await;
        if !matches!(ping, Ok(Ok(()))) {
            panic!(
                "Redis is not reachable at {REDIS_URL} ({ping:?}). These tests need a local Redis: \
                 start one with `redis-server --daemonize yes` or `docker run -d -p 6379:6379 redis:7`."
            );
        }
    }

    let (history, history_task) = HistoryWriter::spawn(db.clone(), HistoryConfig::default());
    let admin_key = api::auth::create_key(&db, "test admin", api::Role::Admin, None)
        .await
        .expect("creating the test's admin key")
        .key;
    let state = AppState::new(
        broker.clone(),
        db.clone(),
        Arc::new(jobs::Catalog::default()),
        api::install_metrics(),
    )
    .with_history(history.clone())
    .with_config(config);
    TestApp {
        client: TestClient::new(api::routes(state.clone()).boxed())
            .default_header("authorization", format!("Bearer {}", admin_key.expose())),
        admin_key: admin_key.expose().to_owned(),
        state,
        db,
        history,
        prefix,
        _history_task: history_task,
        _dir: dir,
    }
}

impl TestApp {
    /// A client of the same routes that sends no key unless a request adds one.
    pub(crate) fn anonymous(&self) -> TestClient<BoxEndpoint<'static, Response>> {
        TestClient::new(api::routes(self.state.clone()).boxed())
    }

    /// A reqwest client that sends [`TestApp::admin_key`], for tests that serve the app on a
    /// socket.
    pub(crate) fn http_client(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = format!("Bearer {}", self.admin_key)
            .parse()
            .expect("a header value");
        headers.insert(reqwest::header::AUTHORIZATION, value);
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("an HTTP client")
    }

    /// A new key of `role` in this app's database.
    pub(crate) async fn key(
        &self,
        role: api::Role,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> String {
        api::auth::create_key(&self.db, "test", role, expires_at)
            .await
            .expect("creating a key")
            .key
            .expose()
            .to_owned()
    }

    pub(crate) async fn enqueue(&self, body: Value) -> TestResponse {
        self.client.post("/v1/jobs").body_json(&body).send().await
    }

    /// Enqueues a job that must be accepted; returns its id.
    pub(crate) async fn enqueue_ok(&self, body: Value) -> String {
        let (status, _, json) = read(self.enqueue(body).await).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        json["id"].as_str().expect("an id").to_owned()
    }

    pub(crate) async fn get(&self, uri: &str) -> (StatusCode, poem::http::HeaderMap, Value) {
        read(self.client.get(uri).send().await).await
    }

    pub(crate) async fn queue_depth(&self, queue: &str) -> u64 {
        let (status, _, json) = self.get(&format!("/v1/queues/{queue}")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        json["depth"].as_u64().expect("a numeric depth")
    }
}

impl Drop for TestApp {
    /// Deletes this test's keys, and only those (never FLUSHDB).
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(REDIS_URL) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let pattern = format!("{}:*", self.prefix);
        let keys: Vec<String> = match redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(&pattern)
            .clone()
            .iter(&mut conn)
        {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
        for key in keys {
            assert!(key.starts_with(&self.prefix));
            let _: Result<(), _> = redis::cmd("DEL").arg(&key).query(&mut conn);
        }
    }
}

/// Status, headers and JSON body (`Value::Null` if the body is not JSON).
pub(crate) async fn read(resp: TestResponse) -> (StatusCode, poem::http::HeaderMap, Value) {
    let resp = resp.0;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().into_bytes().await.expect("a readable body");
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts a problem+json response of `status` and `type` `https://drover.dev/problems/{slug}`;
/// returns the problem.
pub(crate) async fn assert_problem(resp: TestResponse, status: StatusCode, slug: &str) -> Value {
    let (actual, headers, problem) = read(resp).await;
    assert_eq!(actual, status, "{problem}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    assert_eq!(
        problem["type"],
        format!("https://drover.dev/problems/{slug}"),
        "{problem}"
    );
    assert_eq!(problem["status"], status.as_u16(), "{problem}");
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "{problem}"
    );
    problem
}
