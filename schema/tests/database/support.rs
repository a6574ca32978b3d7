//! Fresh databases per test, and event builders.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use schema::entity::job;
use schema::history::{AttemptOutcome, HistoryEvent, JobState};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait};
use uuid::Uuid;

const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
struct TestDb {
    db: DatabaseConnection,
    backend: Backend,
    name: String,
}

impl TestDb {
    async fn create(backend: Backend) -> TestDb {
        let name = format!("drover_schema_{}", Uuid::now_v7().simple());
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", sqlite_path(&name).display()),
            Backend::Postgres => {
                let admin = postgres_admin().await;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                    .await
                    .expect("create the test database");
                admin.close().await.expect("close the admin connection");
                format!("postgres://postgres@127.0.0.1:5432/{name}")
            }
        };
        let db = schema::connect(&url).await.expect("connect to the test database");
        TestDb { db, backend, name }
    }

    async fn destroy(self) {
        self.db.close().await.expect("close the test database");
        match self.backend {
            Backend::Sqlite => {
                let path = sqlite_path(&self.name);
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin().await;
                admin
                    .execute_unprepared(&format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name))
                    .await
                    .expect("drop the test database");
                admin.close().await.expect("close the admin connection");
            }
        }
    }
}

fn sqlite_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}.db"))
}

async fn postgres_admin() -> DatabaseConnection {
    match schema::connect(POSTGRES_ADMIN_URL).await {
        Ok(db) => db,
        Err(error) => panic!(
            "these tests need Postgres at {POSTGRES_ADMIN_URL} (trust auth) and it is unreachable: \
             {error:?}\nstart it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        ),
    }
}

/// Runs `test` on an empty SQLite database, then on an empty Postgres one, dropping each after
/// the test even if it panics.
pub(crate) async fn with_empty_databases<F, Fut>(test: F)
where
    F: Fn(DatabaseConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::create(backend).await;
        eprintln!("-- on {backend:?}");
        let outcome = tokio::spawn(test(db.db.clone())).await;
        db.destroy().await;
        if let Err(error) = outcome {
            match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("test on {backend:?} did not finish: {error}"),
            }
        }
    }
}

/// [`with_empty_databases`], with the migrations applied.
pub(crate) async fn with_migrated_databases<F, Fut>(test: F)
where
    F: Fn(DatabaseConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_empty_databases(|db| {
        let test = test(db.clone());
        async move {
            schema::migrate(&db).await.expect("migrate");
            test.await;
        }
    })
    .await;
}

/// Polls `condition` until it holds, failing after 10 s.
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn job_count(db: &DatabaseConnection) -> u64 {
    job::Entity::find().count(db).await.expect("count jobs")
}

/// A fixed instant plus `ms` milliseconds: whole microseconds survive Postgres unchanged.
pub(crate) fn t(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_795_000_000_000 + ms).expect("valid time")
}

pub(crate) fn enqueued(id: Uuid, at: DateTime<Utc>) -> HistoryEvent {
    HistoryEvent::Enqueued {
        id,
        queue: "default".into(),
        kind: "backup.snapshot".into(),
        payload: serde_json::json!({ "volume": "data" }),
        max_attempts: 3,
        priority: 5,
        idempotency_key: Some(format!("key-{id}")),
        trace_id: Some("trace-enqueue".into()),
        run_at: None,
        at,
    }
}

pub(crate) fn started(id: Uuid, attempt: i32, at: DateTime<Utc>) -> HistoryEvent {
    HistoryEvent::Started {
        id,
        queue: "default".into(),
        kind: "backup.snapshot".into(),
        attempt,
        max_attempts: 3,
        worker_id: format!("worker-{attempt}"),
        trace_id: Some("trace-enqueue".into()),
        at,
    }
}

/// Attempt `attempt` of job `id`, started at `started_at` and ending at `at` with `outcome`:
/// the job succeeds if the attempt did, retries 1 s later while attempts remain, else dies.
pub(crate) fn finished(
    id: Uuid,
    attempt: i32,
    started_at: DateTime<Utc>,
    at: DateTime<Utc>,
    outcome: AttemptOutcome,
) -> HistoryEvent {
    let (status, error, next_run_at) = match outcome {
        AttemptOutcome::Succeeded => (JobState::Succeeded, None, None),
        _ if attempt < 3 => (
            JobState::Retrying,
            Some(format!("boom {attempt}")),
            Some(at + chrono::Duration::seconds(1)),
        ),
        _ => (JobState::Dead, Some(format!("boom {attempt}")), None),
    };
    HistoryEvent::Finished {
        id,
        queue: "default".into(),
        kind: "backup.snapshot".into(),
        attempt,
        max_attempts: 3,
        worker_id: format!("worker-{attempt}"),
        trace_id: Some("trace-enqueue".into()),
        started_at,
        at,
        outcome,
        error,
        status,
        next_run_at,
    }
}
