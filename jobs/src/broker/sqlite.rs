//! drover's SQLite broker: the embedded default of `drover dev` (`sqlite://drover-dev.db`), for
//! one process running the API and the workers, or for a few processes sharing the file on one
//! machine.
//!
//! Tables, for prefix `P` (broker internals created at connect, like the Redis broker's keys):
//!
//! | table | holds |
//! |---|---|
//! | `P_queue_job` | one row per job: the envelope, status, attempts, when it is due, the lease (deadline and worker), timings and the last error |
//! | `P_queue` | every queue that has had jobs, with its `done` and `failed` counters (they outlive the rows of finished jobs) |
//! | `P_queue_idempotency_key` | `(queue, key)` → the first job pushed with that key, for 24 hours |
//!
//! The semantics are the Redis broker's: a fetch first takes back expired leases (to pending, or
//! to the dead set when the attempt was the last one), then leases due jobs by priority, due time
//! and id; a settlement counts only while its worker still holds the job; a release gives the
//! attempt back; succeeded and canceled jobs stay an hour for `GET /v1/jobs/{id}`, dead ones stay.
//!
//! Every state change is one `BEGIN IMMEDIATE` transaction on the single writer connection this
//! process keeps per file (SQLite has one writer anyway; waiting in-process is cheaper than
//! SQLite's busy-retry sleeps); reads run on a small pool of their own beside it, which WAL allows.
//!
//! An idle fetch waits on an in-process signal that pushes, retries and releases raise, so a
//! worker in the same process picks a new job up at once. Another process's commits are noticed
//! by a watcher that reads `PRAGMA data_version` (a counter SQLite bumps when any other
//! connection commits) every [`CHANGE_POLL`] and raises every signal when it moves; idle fetches
//! also look again every [`CROSS_PROCESS_POLL`] for delayed jobs falling due.
//!
//! In [`QueueStats`], `pending` counts waiting jobs that are due, including delayed jobs and
//! retries whose time has come that no worker has taken yet; `scheduled` counts those not due
//! yet. (Redis counts a due job as scheduled until a fetch moves it; counting it as pending here
//! lets an autoscaler see work that is ready.) KEDA cannot read a SQLite file: scale on
//! `GET /v1/queues/{q}` with the metrics-api scaler.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    str::FromStr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    AssertSqlSafe, Row, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous},
};
use tokio::{sync::Notify, time::Instant};

use super::{
    BrokerError, CancelOutcome, ConsumerConfig, DeadOutcome, Driver, Enqueued, Producer, QueueStats,
};
use crate::{
    job::{Job, JobId, JobRecord, JobState, Outcome, Settlement, now_ms},
    queue::QueueName,
};

/// How long a succeeded or canceled job's row stays for `GET /v1/jobs/{id}`; after that the
/// history database answers.
const DONE_TTL_MS: i64 = 3_600_000;
/// How long an idempotency key maps to its first job.
const IDEMPOTENCY_WINDOW_MS: i64 = 86_400_000;
/// How often an idle fetch looks at the file for jobs another process pushed (within one
/// process a push wakes it at once). Also bounds how late an expired lease is noticed by an
/// idle worker.
pub const CROSS_PROCESS_POLL: Duration = Duration::from_millis(100);
/// How often the change watcher asks SQLite whether another connection committed: a cheap
/// pragma that reads a counter in shared memory, about a microsecond of SQLite's time.
pub const CHANGE_POLL: Duration = Duration::from_millis(2);
/// Rows per multi-row `INSERT` when pushing: 10 parameters each, far below SQLite's limit of
/// 32,766 bound parameters, and large enough that a batch costs few statements.
const PUSH_CHUNK: usize = 500;
/// How often finished rows and expired idempotency keys are deleted (checked during fetches).
const CLEANUP_EVERY_MS: i64 = 60_000;
/// Rows deleted per cleanup transaction, so one never holds the writer for long; a full round
/// makes the next one due at once.
const CLEANUP_LIMIT: i64 = 10_000;
/// How long a write waits for another process holding the file's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections per file and process.
const READERS: u32 = 4;
/// Dead jobs revived per write transaction when retrying a whole dead set.
const DEAD_SLICE: i64 = 500;
const LEASE_EXPIRED: &str = "lease expired: the worker running it stopped responding";
/// The statuses of a job waiting for a worker; the text must match the partial index's.
const WAITING: &str = "status IN ('pending', 'scheduled', 'retrying')";

impl From<sqlx::Error> for BrokerError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Busy or locked beyond the busy timeout, I/O error, disk full, cannot open.
            sqlx::Error::Database(db) => db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14)),
            _ => false,
        };
        if unavailable {
            BrokerError::Unavailable(format!("sqlite: {e}"))
        } else {
            BrokerError::Other(format!("sqlite: {e}"))
        }
    }
}

/// One database file as this process uses it, shared by every broker connected to it so that
/// they queue on one writer connection and wake each other's idle fetches.
struct Database {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Raised when a queue (of a prefix) gets work; idle fetches wait on it.
    wakeups: Mutex<Wakeups>,
    /// Whether the change watcher runs (never for an in-memory database: one process only).
    watching: AtomicBool,
}

/// One signal per (prefix, queue).
type Wakeups = HashMap<(Arc<str>, QueueName), Arc<Notify>>;

/// Open files by absolute path (or URL, for in-memory databases); dropped with their last broker.
type OpenDatabases = BTreeMap<String, Weak<Database>>;

/// The files open in this process.
static DATABASES: tokio::sync::Mutex<OpenDatabases> = tokio::sync::Mutex::const_new(BTreeMap::new());

impl Database {
    async fn open(url: &str) -> Result<Arc<Self>, BrokerError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| BrokerError::Other(format!("sqlite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Durable at each checkpoint rather than each commit: WAL's recommended setting.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let key = if in_memory {
            url.to_owned()
        } else {
            absolute(opts.get_filename())
        };
        let mut open = DATABASES.lock().await;
        open.retain(|_, db| db.strong_count() > 0);
        if let Some(db) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(db);
        }
        // The writer keeps its connection (and its prepared statements) for good; an in-memory
        // database also lives only as long as a connection to it.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await?;
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(READERS)
                .connect_lazy_with(opts)
        };
        let db = Arc::new(Self {
            writer,
            reader,
            wakeups: Mutex::default(),
            watching: AtomicBool::new(in_memory),
        });
        open.insert(key, Arc::downgrade(&db));
        Ok(db)
    }

    fn wakeup(&self, prefix: &Arc<str>, queue: &QueueName) -> Arc<Notify> {
        let mut map = self.wakeups.lock().expect("wakeups poisoned");
        map.entry((prefix.clone(), queue.clone())).or_default().clone()
    }

    fn wake(&self, prefix: &Arc<str>, queue: &QueueName) {
        self.wakeup(prefix, queue).notify_waiters();
    }

    /// Starts the change watcher once per file and process, at the first idle fetch. It asks
    /// the writer connection, whose `data_version` moves only with *other* connections'
    /// commits: this process's own leases and settlements wake nobody (they signal in-process).
    fn watch_for_other_processes(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let db = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(CHANGE_POLL).await;
                let Some(db) = db.upgrade() else { return };
                // On an error it is asked again at the next tick; idle fetches still poll.
                let Ok(v) = sqlx::query_scalar::<_, i64>("PRAGMA data_version")
                    .fetch_one(&db.writer)
                    .await
                else {
                    continue;
                };
                if last.is_some_and(|l| l != v) {
                    let wakeups: Vec<Arc<Notify>> = db
                        .wakeups
                        .lock()
                        .expect("wakeups poisoned")
                        .values()
                        .cloned()
                        .collect();
                    for w in wakeups {
                        w.notify_waiters();
                    }
                }
                last = Some(v);
            }
        });
    }
}

/// `path` made absolute with its directory resolved, so that two spellings of one file share
/// one [`Database`].
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .ok()
        .and_then(|p| Some(p.parent()?.canonicalize().ok()?.join(p.file_name()?)))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn valid_prefix(prefix: &str) -> Result<(), BrokerError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && !prefix.starts_with("sqlite")
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::Other(format!(
            "invalid broker prefix {prefix:?}: 1 to 64 of a-z, 0-9 and _, not starting with \"sqlite\""
        )))
    }
}

/// The statements of one prefix. Table names cannot be bound, so they are formatted in once,
/// from a validated prefix.
struct Sql {
    create: String,
    remember_queue: Arc<str>,
    claim_key: Arc<str>,
    key_owner: Arc<str>,
    insert_chunk: Arc<str>,
    insert_one: Arc<str>,
    reclaim: Arc<str>,
    lease: Arc<str>,
    next_due: Arc<str>,
    settle: Arc<str>,
    count: Arc<str>,
    release: Arc<str>,
    renew: Arc<str>,
    cancel: Arc<str>,
    status: Arc<str>,
    revive: Arc<str>,
    dead_envelopes: Arc<str>,
    discard: Arc<str>,
    discard_all: Arc<str>,
    get: Arc<str>,
    dead: Arc<str>,
    stats: Arc<str>,
    queues: Arc<str>,
    clean_jobs: Arc<str>,
    clean_keys: Arc<str>,
}

/// The columns a [`JobRecord`] is read from.
const RECORD_COLUMNS: &str =
    "id, queue, envelope, status, attempts, priority, run_at_ms, started_ms, finished_ms, last_error, worker";

const INSERT_COLUMNS: &str =
    "id, queue, kind, envelope, status, max_attempts, priority, run_at_ms, created_ms, idempotency_key";

impl Sql {
    fn new(p: &str) -> Self {
        let job = format!("\"{p}_queue_job\"");
        let queue = format!("\"{p}_queue\"");
        let key = format!("\"{p}_queue_idempotency_key\"");
        let s = |sql: String| -> Arc<str> { sql.into() };
        Self {
            create: format!(
                r#"
CREATE TABLE IF NOT EXISTS {job} (
    id TEXT PRIMARY KEY NOT NULL,        -- the job id (UUIDv7)
    queue TEXT NOT NULL,
    kind TEXT NOT NULL,
    envelope TEXT NOT NULL,              -- the Job as pushed, JSON; `attempt` is set on delivery
    status TEXT NOT NULL,                -- scheduled | pending | running | succeeded | retrying | dead | canceled
    attempts INTEGER NOT NULL DEFAULT 0, -- attempts started; a released one is given back
    crashes INTEGER NOT NULL DEFAULT 0,  -- leases that ran out (the worker died holding it)
    max_attempts INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    run_at_ms INTEGER NOT NULL,          -- when it is (was) due: push time, delay or retry time
    lease_until_ms INTEGER,              -- while running: when the lease runs out
    worker TEXT,                         -- the worker that leased it last
    created_ms INTEGER NOT NULL,         -- when the API accepted it
    started_ms INTEGER,                  -- start of the last attempt
    finished_ms INTEGER,                 -- end of the last attempt, or time of cancel
    last_error TEXT,
    idempotency_key TEXT                 -- informational; the mapping is in the key table
);
-- Serves the fetch: due jobs of a queue by priority, due time, id.
CREATE INDEX IF NOT EXISTS "{p}_queue_job_waiting"
    ON {job} (queue, priority DESC, run_at_ms, id) WHERE {WAITING};
-- Serves taking back expired leases and counting running jobs.
CREATE INDEX IF NOT EXISTS "{p}_queue_job_leased" ON {job} (queue, lease_until_ms) WHERE status = 'running';
-- The dead set, newest first.
CREATE INDEX IF NOT EXISTS "{p}_queue_job_dead" ON {job} (queue, finished_ms, id) WHERE status = 'dead';
-- Serves deleting finished rows after an hour.
CREATE INDEX IF NOT EXISTS "{p}_queue_job_finished"
    ON {job} (finished_ms) WHERE status IN ('succeeded', 'canceled');
CREATE TABLE IF NOT EXISTS {queue} (
    name TEXT PRIMARY KEY NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,     -- succeeded attempts, ever
    failed INTEGER NOT NULL DEFAULT 0    -- failed attempts (retried or dead), ever
);
CREATE TABLE IF NOT EXISTS {key} (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,                -- the first job pushed with this key
    expires_ms INTEGER NOT NULL,         -- after this a push with the key makes a new job
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS "{p}_queue_idempotency_key_expires" ON {key} (expires_ms);
"#
            ),
            remember_queue: s(format!(
                "INSERT INTO {queue} (name) VALUES (?1) ON CONFLICT DO NOTHING"
            )),
            // Takes the key unless an unexpired job holds it; returns the id only if taken.
            claim_key: s(format!(
                "INSERT INTO {key} (queue, key, job_id, expires_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (queue, key) DO UPDATE SET job_id = excluded.job_id, expires_ms = excluded.expires_ms \
                 WHERE {key}.expires_ms <= ?5 RETURNING job_id"
            )),
            key_owner: s(format!("SELECT job_id FROM {key} WHERE queue = ?1 AND key = ?2")),
            insert_chunk: s(insert_sql(&job, PUSH_CHUNK)),
            insert_one: s(insert_sql(&job, 1)),
            // A lease that ran out: the worker died or hung. The attempt counts, and so does the
            // crash; out of attempts, or `?4` crashes, means dead. The worker column stays, so
            // that worker's late result still counts while nobody else has taken the job (as on
            // Redis). (The right-hand sides read the row as it was.)
            reclaim: s(format!(
                "UPDATE {job} SET \
                   crashes = crashes + 1, \
                   status = CASE WHEN attempts >= max_attempts OR crashes + 1 >= ?4 THEN 'dead' ELSE 'pending' END, \
                   last_error = CASE \
                     WHEN crashes + 1 >= ?4 THEN 'quarantined: its worker died ' || (crashes + 1) || ' times while running it' \
                     WHEN attempts >= max_attempts THEN ?3 ELSE last_error END, \
                   finished_ms = CASE WHEN attempts >= max_attempts OR crashes + 1 >= ?4 THEN ?2 ELSE finished_ms END, \
                   lease_until_ms = NULL \
                 WHERE queue = ?1 AND status = 'running' AND lease_until_ms <= ?2 \
                 RETURNING status"
            )),
            lease: s(format!(
                "UPDATE {job} SET status = 'running', attempts = attempts + 1, worker = ?2, started_ms = ?3, \
                   lease_until_ms = ?4 \
                 WHERE rowid IN ( \
                   SELECT rowid FROM {job} WHERE queue = ?1 AND {WAITING} AND run_at_ms <= ?3 \
                   ORDER BY priority DESC, run_at_ms, id LIMIT ?5) \
                 RETURNING envelope, attempts, crashes, priority, run_at_ms, id"
            )),
            next_due: s(format!(
                "SELECT MIN(run_at_ms) FROM {job} WHERE queue = ?1 AND {WAITING}"
            )),
            // ?1: a JSON array of [id, new status, retry at, error, worker, finished at,
            // 1 if a panic ended the attempt (it counts as a crash)].
            settle: s(format!(
                "UPDATE {job} SET \
                   status = s.new_status, \
                   run_at_ms = CASE WHEN s.new_status = 'retrying' THEN s.retry_at ELSE {job}.run_at_ms END, \
                   last_error = COALESCE(s.error, {job}.last_error), \
                   finished_ms = s.finished, \
                   crashes = crashes + s.panicked, \
                   lease_until_ms = NULL \
                 FROM (SELECT value ->> 0 AS job_id, value ->> 1 AS new_status, value ->> 2 AS retry_at, \
                         value ->> 3 AS error, value ->> 4 AS by_worker, value ->> 5 AS finished, \
                         value ->> 6 AS panicked \
                       FROM json_each(?1)) AS s \
                 WHERE {job}.id = s.job_id AND {job}.worker = s.by_worker \
                   AND {job}.status IN ('running', 'pending') \
                 RETURNING queue, status"
            )),
            count: s(format!(
                "INSERT INTO {queue} (name, done, failed) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET done = done + excluded.done, failed = failed + excluded.failed"
            )),
            // Back in line with its old due time, so ahead of newer jobs; the attempt is given back.
            release: s(format!(
                "UPDATE {job} SET status = 'pending', attempts = attempts - 1, lease_until_ms = NULL \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'running' AND worker = ?2 \
                 RETURNING queue"
            )),
            renew: s(format!(
                "UPDATE {job} SET lease_until_ms = ?1 \
                 WHERE id IN (SELECT value FROM json_each(?2)) AND status = 'running' AND worker = ?3"
            )),
            cancel: s(format!(
                "UPDATE {job} SET status = 'canceled', finished_ms = ?2 WHERE id = ?1 AND {WAITING} RETURNING id"
            )),
            status: s(format!("SELECT status FROM {job} WHERE id = ?1")),
            // ?1: a JSON array of [id, revived envelope, its max attempts]; ?2: now.
            revive: s(format!(
                "UPDATE {job} SET status = 'pending', envelope = r.envelope, max_attempts = r.max_attempts, \
                   crashes = 0, run_at_ms = ?2, lease_until_ms = NULL \
                 FROM (SELECT value ->> 0 AS job_id, value ->> 1 AS envelope, value ->> 2 AS max_attempts \
                       FROM json_each(?1)) AS r \
                 WHERE {job}.id = r.job_id AND {job}.status = 'dead' \
                 RETURNING queue"
            )),
            // ?1: the queue, or NULL with ?2 a job id.
            dead_envelopes: s(format!(
                "SELECT id, envelope, attempts FROM {job} \
                 WHERE status = 'dead' AND (queue = ?1 OR (?1 IS NULL AND id = ?2)) LIMIT ?3"
            )),
            discard: s(format!("DELETE FROM {job} WHERE id = ?1 AND status = 'dead'")),
            discard_all: s(format!("DELETE FROM {job} WHERE queue = ?1 AND status = 'dead'")),
            get: s(format!("SELECT {RECORD_COLUMNS} FROM {job} WHERE id = ?1")),
            dead: s(format!(
                "SELECT {RECORD_COLUMNS} FROM {job} WHERE queue = ?1 AND status = 'dead' \
                 ORDER BY finished_ms DESC, id DESC LIMIT ?2 OFFSET ?3"
            )),
            stats: s(format!(
                "SELECT \
                   (SELECT COUNT(*) FROM {job} WHERE queue = ?1 AND {WAITING} AND run_at_ms <= ?2), \
                   (SELECT COUNT(*) FROM {job} WHERE queue = ?1 AND {WAITING} AND run_at_ms > ?2), \
                   (SELECT COUNT(*) FROM {job} WHERE queue = ?1 AND status = 'running'), \
                   (SELECT COUNT(*) FROM {job} WHERE queue = ?1 AND status = 'dead'), \
                   COALESCE((SELECT done FROM {queue} WHERE name = ?1), 0), \
                   COALESCE((SELECT failed FROM {queue} WHERE name = ?1), 0)"
            )),
            queues: s(format!("SELECT name FROM {queue}")),
            clean_jobs: s(format!(
                "DELETE FROM {job} WHERE rowid IN ( \
                   SELECT rowid FROM {job} WHERE status IN ('succeeded', 'canceled') AND finished_ms < ?1 LIMIT ?2)"
            )),
            clean_keys: s(format!(
                "DELETE FROM {key} WHERE (queue, key) IN ( \
                   SELECT queue, key FROM {key} WHERE expires_ms <= ?1 LIMIT ?2)"
            )),
        }
    }
}

fn insert_sql(table: &str, rows: usize) -> String {
    let row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = format!("INSERT INTO {table} ({INSERT_COLUMNS}) VALUES {row}");
    for _ in 1..rows {
        sql.push_str(", ");
        sql.push_str(row);
    }
    sql
}

/// The producer side, cheap to clone; every broker on one file in this process shares its
/// connections.
#[derive(Clone)]
pub struct SqliteBroker {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    prefix: Arc<str>,
    sql: Sql,
    known_queues: Mutex<HashSet<QueueName>>,
    last_cleanup_ms: AtomicI64,
    cleaning: AtomicBool,
}

/// A job ready to insert: what the row needs besides the envelope.
struct NewJob {
    id: String,
    queue: QueueName,
    kind: Arc<str>,
    envelope: String,
    status: &'static str,
    max_attempts: u32,
    priority: i32,
    run_at_ms: i64,
    created_ms: i64,
    idempotency_key: Option<String>,
}

impl SqliteBroker {
    /// Opens (creating when missing) the file named by `url` (`sqlite://path`, `sqlite:path`,
    /// `sqlite::memory:`) and the broker's tables for `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BrokerError> {
        valid_prefix(prefix)?;
        let db = Database::open(url).await?;
        let sql = Sql::new(prefix);
        let mut tx = db.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(AssertSqlSafe(sql.create.clone()))
            .execute(&mut *tx)
            .await?;
        // Files created before poison-pill counting lack the column.
        let has_crashes: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('{prefix}_queue_job') WHERE name = 'crashes'"
        )))
        .fetch_one(&mut *tx)
        .await?;
        if !has_crashes {
            sqlx::raw_sql(AssertSqlSafe(format!(
                r#"ALTER TABLE "{prefix}_queue_job" ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0"#
            )))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                prefix: prefix.into(),
                sql,
                known_queues: Mutex::default(),
                last_cleanup_ms: AtomicI64::new(0),
                cleaning: AtomicBool::new(false),
            }),
        })
    }

    fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    async fn begin_write(&self) -> Result<sqlx::SqliteTransaction<'static>, BrokerError> {
        Ok(self.inner.db.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    fn unknown_queues<'a>(&self, queues: impl IntoIterator<Item = &'a QueueName>) -> Vec<QueueName> {
        let known = self.inner.known_queues.lock().expect("known queues poisoned");
        let mut new: Vec<QueueName> = queues
            .into_iter()
            .filter(|q| !known.contains(*q))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        new
    }

    async fn remember_queues(
        &self,
        tx: &mut sqlx::SqliteConnection,
        queues: &[QueueName],
    ) -> Result<(), BrokerError> {
        for q in queues {
            sqlx::query(q_(&self.sql().remember_queue))
                .bind(q.as_str())
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    fn mark_known(&self, queues: Vec<QueueName>) {
        self.inner
            .known_queues
            .lock()
            .expect("known queues poisoned")
            .extend(queues);
    }

    /// Deletes finished rows older than an hour and expired idempotency keys, at most once a
    /// minute per broker, in the background.
    fn maybe_clean(&self) {
        let now = now_ms();
        let last = self.inner.last_cleanup_ms.load(Ordering::Relaxed);
        if now - last < CLEANUP_EVERY_MS || self.inner.cleaning.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match this.clean(now).await {
                Ok(deleted) => {
                    // A full round means more is left: allow the next one at once.
                    let next = if deleted >= CLEANUP_LIMIT as u64 { 0 } else { now };
                    this.inner.last_cleanup_ms.store(next, Ordering::Relaxed);
                    if deleted > 0 {
                        tracing::debug!(deleted, "deleted finished jobs and expired idempotency keys");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cleaning the sqlite broker failed"),
            }
            this.inner.cleaning.store(false, Ordering::Release);
        });
    }

    async fn clean(&self, now: i64) -> Result<u64, BrokerError> {
        let mut tx = self.begin_write().await?;
        let jobs = sqlx::query(q_(&self.sql().clean_jobs))
            .bind(now - DONE_TTL_MS)
            .bind(CLEANUP_LIMIT)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let keys = sqlx::query(q_(&self.sql().clean_keys))
            .bind(now)
            .bind(CLEANUP_LIMIT)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(jobs.max(keys))
    }
}

impl SqliteBroker {
    /// Puts dead jobs back in line with a fresh attempt budget — up to [`DEAD_SLICE`] of
    /// `queue`'s, or the one job `id` — in one write transaction; returns how many.
    async fn revive(&self, queue: Option<&QueueName>, id: Option<JobId>) -> Result<u64, BrokerError> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(q_(&self.sql().dead_envelopes))
            .bind(queue.map(QueueName::as_str))
            .bind(id.map(|id| id.to_string()))
            .bind(DEAD_SLICE)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let envelope: &str = row.try_get("envelope")?;
            let job: Job = serde_json::from_str(envelope).map_err(|e| corrupt(format!("job {id}: {e}")))?;
            let revived = job.revived(row.try_get::<i64, _>("attempts")?.max(0) as u32);
            let text = serde_json::to_string(&revived).map_err(|e| BrokerError::Other(e.to_string()))?;
            items.push(serde_json::json!([id, text, revived.max_attempts]));
        }
        let items = serde_json::to_string(&items).map_err(|e| BrokerError::Other(e.to_string()))?;
        let queues: Vec<String> = sqlx::query_scalar(q_(&self.sql().revive))
            .bind(items)
            .bind(now_ms())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        for q in queues.iter().collect::<HashSet<_>>() {
            if let Ok(q) = QueueName::parse(q) {
                self.inner.db.wake(&self.inner.prefix, &q);
            }
        }
        Ok(queues.len() as u64)
    }

    /// What a dead-set operation on `id` that took `n` rows found.
    async fn one_dead_outcome(&self, id: JobId, n: u64) -> Result<DeadOutcome, BrokerError> {
        if n > 0 {
            return Ok(DeadOutcome::Done);
        }
        let status: Option<String> = sqlx::query_scalar(q_(&self.sql().status))
            .bind(id.to_string())
            .fetch_optional(&self.inner.db.reader)
            .await?;
        Ok(match status {
            None => DeadOutcome::NotFound,
            Some(s) => DeadOutcome::NotDead(
                s.parse()
                    .map_err(|_| corrupt(format!("job {id}: status {s:?}")))?,
            ),
        })
    }
}

/// A stored statement as sqlx takes it; the text was built from a validated prefix only.
fn q_(sql: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(sql.clone())
}

fn corrupt(what: impl std::fmt::Display) -> BrokerError {
    BrokerError::Corrupt(format!("sqlite: {what}"))
}

fn record_from_row(row: &SqliteRow) -> Result<JobRecord, BrokerError> {
    let id: String = row.try_get("id")?;
    let id = JobId::parse(&id).ok_or_else(|| corrupt(format!("job id {id:?}")))?;
    let envelope: String = row.try_get("envelope")?;
    let job: Job = serde_json::from_str(&envelope).map_err(|e| corrupt(format!("job {id}: {e}")))?;
    let status: String = row.try_get("status")?;
    let status = status
        .parse::<JobState>()
        .map_err(|_| corrupt(format!("job {id}: status {status:?}")))?;
    let run_at_ms: i64 = row.try_get("run_at_ms")?;
    Ok(JobRecord {
        id,
        queue: row.try_get("queue")?,
        kind: job.kind.to_string(),
        status,
        attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
        max_attempts: job.max_attempts,
        priority: row.try_get::<i64, _>("priority")? as i32,
        payload: serde_json::from_str(job.payload.get()).ok(),
        created_at_ms: job.enqueued_at_ms,
        // While it waits for its time, the time it waits for (a retry's differs from the envelope's).
        run_at_ms: match status {
            JobState::Scheduled | JobState::Retrying => Some(run_at_ms),
            _ => job.run_at_ms,
        },
        started_at_ms: row.try_get("started_ms")?,
        finished_at_ms: row.try_get("finished_ms")?,
        last_error: row.try_get("last_error")?,
        worker_id: row.try_get("worker")?,
        trace_id: job.trace_id,
    })
}

#[async_trait]
impl Producer for SqliteBroker {
    async fn push(&self, job: Job) -> Result<Enqueued, BrokerError> {
        let mut out = self.push_batch(vec![job]).await?;
        out.pop().ok_or_else(|| corrupt("push returned nothing"))
    }

    async fn push_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>, BrokerError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // Everything but the writes happens before the write lock is taken.
        let rows: Vec<NewJob> = jobs
            .iter()
            .map(|job| {
                let run_at_ms = job.run_at_ms.unwrap_or(now);
                Ok(NewJob {
                    id: job.id.to_string(),
                    queue: job.queue.clone(),
                    kind: job.kind.clone(),
                    envelope: serde_json::to_string(job).map_err(|e| BrokerError::Other(e.to_string()))?,
                    status: if run_at_ms > now { "scheduled" } else { "pending" },
                    max_attempts: job.max_attempts,
                    priority: job.priority,
                    run_at_ms,
                    created_ms: job.enqueued_at_ms,
                    idempotency_key: job.idempotency_key.clone(),
                })
            })
            .collect::<Result<_, BrokerError>>()?;
        let new_queues = self.unknown_queues(jobs.iter().map(|j| &j.queue));

        let mut tx = self.begin_write().await?;
        self.remember_queues(&mut tx, &new_queues).await?;
        // Keys first, in request order, so that a key repeated within the batch returns the
        // first job of the batch.
        let mut out = Vec::with_capacity(rows.len());
        let mut fresh = Vec::with_capacity(rows.len());
        for (row, job) in rows.iter().zip(&jobs) {
            let Some(key) = &row.idempotency_key else {
                out.push(Enqueued {
                    id: job.id,
                    duplicate: false,
                });
                fresh.push(row);
                continue;
            };
            let claimed: Option<String> = sqlx::query_scalar(q_(&self.sql().claim_key))
                .bind(row.queue.as_str())
                .bind(key)
                .bind(&row.id)
                .bind(now + IDEMPOTENCY_WINDOW_MS)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if claimed.is_some() {
                out.push(Enqueued {
                    id: job.id,
                    duplicate: false,
                });
                fresh.push(row);
            } else {
                let first: String = sqlx::query_scalar(q_(&self.sql().key_owner))
                    .bind(row.queue.as_str())
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?;
                let id = JobId::parse(&first).ok_or_else(|| corrupt(format!("job id {first:?}")))?;
                out.push(Enqueued { id, duplicate: true });
            }
        }
        for chunk in fresh.chunks(PUSH_CHUNK) {
            let sql = match chunk.len() {
                PUSH_CHUNK => q_(&self.sql().insert_chunk),
                1 => q_(&self.sql().insert_one),
                n => AssertSqlSafe(insert_sql(&format!("\"{}_queue_job\"", self.inner.prefix), n).into()),
            };
            // Odd-sized tails are one-offs: not worth a slot in the statement cache.
            let persistent = matches!(chunk.len(), 1 | PUSH_CHUNK);
            let mut q = sqlx::query(sql).persistent(persistent);
            for r in chunk {
                q = q
                    .bind(r.id.as_str())
                    .bind(r.queue.as_str())
                    .bind(&*r.kind)
                    .bind(r.envelope.as_str())
                    .bind(r.status)
                    .bind(r.max_attempts as i64)
                    .bind(r.priority as i64)
                    .bind(r.run_at_ms)
                    .bind(r.created_ms)
                    .bind(r.idempotency_key.as_deref());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.mark_known(new_queues);

        let mut woken = HashSet::new();
        for r in fresh {
            if woken.insert(&r.queue) {
                self.inner.db.wake(&self.inner.prefix, &r.queue);
            }
        }
        Ok(out)
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError> {
        let row = sqlx::query(q_(&self.sql().get))
            .bind(id.to_string())
            .fetch_optional(&self.inner.db.reader)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError> {
        let id = id.to_string();
        let mut tx = self.begin_write().await?;
        let canceled: Option<String> = sqlx::query_scalar(q_(&self.sql().cancel))
            .bind(&id)
            .bind(now_ms())
            .fetch_optional(&mut *tx)
            .await?;
        let outcome = if canceled.is_some() {
            CancelOutcome::Canceled
        } else {
            let status: Option<String> = sqlx::query_scalar(q_(&self.sql().status))
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await?;
            match status {
                None => CancelOutcome::NotFound,
                Some(s) => CancelOutcome::NotCancelable(
                    s.parse()
                        .map_err(|_| corrupt(format!("job {id}: status {s:?}")))?,
                ),
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError> {
        let row = sqlx::query(q_(&self.sql().stats))
            .bind(queue.as_str())
            .bind(now_ms())
            .fetch_one(&self.inner.db.reader)
            .await?;
        let n = |i: usize| -> Result<u64, BrokerError> { Ok(row.try_get::<i64, _>(i)?.max(0) as u64) };
        Ok(QueueStats {
            queue: queue.to_string(),
            pending: n(0)?,
            scheduled: n(1)?,
            running: n(2)?,
            dead: n(3)?,
            done: n(4)?,
            failed: n(5)?,
        })
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        let seen: Vec<String> = sqlx::query_scalar(q_(&self.sql().queues))
            .fetch_all(&self.inner.db.reader)
            .await?;
        Ok(crate::queue::builtin_and(
            seen.iter().filter_map(|q| QueueName::parse(q).ok()),
        ))
    }

    async fn dead(&self, queue: &QueueName, offset: u64, limit: u64) -> Result<Vec<JobRecord>, BrokerError> {
        let rows = sqlx::query(q_(&self.sql().dead))
            .bind(queue.as_str())
            .bind(limit.min(i64::MAX as u64) as i64)
            .bind(offset.min(i64::MAX as u64) as i64)
            .fetch_all(&self.inner.db.reader)
            .await?;
        rows.iter().map(record_from_row).collect()
    }

    async fn retry_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        let revived = self.revive(None, Some(id)).await?;
        self.one_dead_outcome(id, revived).await
    }

    async fn retry_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        let mut total = 0;
        loop {
            let n = self.revive(Some(queue), None).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    async fn discard_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(q_(&self.sql().discard))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        self.one_dead_outcome(id, n).await
    }

    async fn discard_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(q_(&self.sql().discard_all))
            .bind(queue.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        sqlx::query("SELECT 1").execute(&self.inner.db.reader).await?;
        Ok(())
    }

    async fn driver(&self, queue: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError> {
        let new_queues = self.unknown_queues([queue]);
        if !new_queues.is_empty() {
            let mut tx = self.begin_write().await?;
            self.remember_queues(&mut tx, &new_queues).await?;
            tx.commit().await?;
            self.mark_known(new_queues);
        }
        Ok(Arc::new(SqliteDriver {
            broker: self.clone(),
            queue: queue.clone(),
            worker: cfg.worker.clone(),
            lease_ms: cfg.lease.as_millis().min(i64::MAX as u128) as i64,
            quarantine_after: cfg.quarantine_after.max(1),
            wakeup: self.inner.db.wakeup(&self.inner.prefix, queue),
        }))
    }

    fn depth_source(&self, queue: &QueueName) -> String {
        format!("sqlite: not readable by KEDA; use GET /v1/queues/{queue} (metrics-api scaler)")
    }

    async fn destroy(&self) -> Result<(), BrokerError> {
        let p = &self.inner.prefix;
        let mut tx = self.begin_write().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            r#"DROP TABLE IF EXISTS "{p}_queue_job"; DROP TABLE IF EXISTS "{p}_queue";
               DROP TABLE IF EXISTS "{p}_queue_idempotency_key";"#
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.inner
            .known_queues
            .lock()
            .expect("known queues poisoned")
            .clear();
        Ok(())
    }
}

/// One worker's view of one queue.
struct SqliteDriver {
    broker: SqliteBroker,
    queue: QueueName,
    worker: Arc<str>,
    lease_ms: i64,
    quarantine_after: u32,
    wakeup: Arc<Notify>,
}

impl SqliteDriver {
    /// One write transaction: take back expired leases, then lease up to `max` due jobs. When
    /// none is due, also returns when the next waiting job falls due.
    async fn lease(&self, max: usize) -> Result<(Vec<Job>, Option<i64>), BrokerError> {
        let sql = self.broker.sql();
        let now = now_ms();
        let mut tx = self.broker.begin_write().await?;
        let reclaimed: Vec<String> = sqlx::query_scalar(q_(&sql.reclaim))
            .bind(self.queue.as_str())
            .bind(now)
            .bind(LEASE_EXPIRED)
            .bind(i64::from(self.quarantine_after))
            .fetch_all(&mut *tx)
            .await?;
        if !reclaimed.is_empty() {
            let dead = reclaimed.iter().filter(|s| *s == "dead").count();
            tracing::warn!(
                queue = %self.queue,
                expired = reclaimed.len(),
                dead,
                "took back jobs whose lease ran out"
            );
            if dead > 0 {
                sqlx::query(q_(&sql.count))
                    .bind(self.queue.as_str())
                    .bind(0_i64)
                    .bind(dead as i64)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let rows = sqlx::query(q_(&sql.lease))
            .bind(self.queue.as_str())
            .bind(&*self.worker)
            .bind(now)
            .bind(now.saturating_add(self.lease_ms))
            .bind(max.min(i64::MAX as usize) as i64)
            .fetch_all(&mut *tx)
            .await?;
        let next_due: Option<i64> = if rows.is_empty() {
            sqlx::query_scalar(q_(&sql.next_due))
                .bind(self.queue.as_str())
                .fetch_one(&mut *tx)
                .await?
        } else {
            None
        };
        tx.commit().await?;

        let mut leased = Vec::with_capacity(rows.len());
        for row in &rows {
            let envelope: &str = row.try_get("envelope")?;
            let mut job: Job =
                serde_json::from_str(envelope).map_err(|e| corrupt(format!("job envelope: {e}")))?;
            job.attempt = row.try_get::<i64, _>("attempts")?.max(0) as u32;
            job.crashes = row.try_get::<i64, _>("crashes")?.max(0) as u32;
            let order = (
                std::cmp::Reverse(row.try_get::<i64, _>("priority")?),
                row.try_get::<i64, _>("run_at_ms")?,
            );
            leased.push((order, job));
        }
        // RETURNING does not keep the subquery's order; the backend hands jobs out in this one.
        leased.sort_by(|(a, ja), (b, jb)| a.cmp(b).then(ja.id.cmp(&jb.id)));
        Ok((leased.into_iter().map(|(_, j)| j).collect(), next_due))
    }
}

#[async_trait]
impl Driver for SqliteDriver {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Job>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.broker.maybe_clean();
        self.broker.inner.db.watch_for_other_processes();
        let deadline = Instant::now() + wait;
        loop {
            // Listen before looking, so that a push landing in between still wakes this fetch.
            let notified = self.wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (jobs, next_due) = self.lease(max).await?;
            let now = Instant::now();
            if !jobs.is_empty() || now >= deadline {
                return Ok(jobs);
            }
            let mut nap = (deadline - now).min(CROSS_PROCESS_POLL);
            if let Some(at) = next_due {
                nap = nap.min(Duration::from_millis((at - now_ms()).max(0) as u64));
            }
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn settle(&self, batch: &[Settlement]) -> Result<(), BrokerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let items: Vec<serde_json::Value> = batch
            .iter()
            .map(|s| {
                let (status, at, error) = match &s.outcome {
                    Outcome::Succeeded => ("succeeded", None, None),
                    Outcome::Retry { at_ms, error, .. } => ("retrying", Some(*at_ms), Some(error.as_str())),
                    Outcome::Dead { error, .. } => ("dead", None, Some(error.as_str())),
                };
                serde_json::json!([
                    s.job.id.to_string(),
                    status,
                    at,
                    error,
                    &*s.worker,
                    s.finished_at_ms,
                    u8::from(s.outcome.is_panicked_retry())
                ])
            })
            .collect();
        let items = serde_json::to_string(&items).map_err(|e| BrokerError::Other(e.to_string()))?;
        let sql = self.broker.sql();
        let mut tx = self.broker.begin_write().await?;
        let settled: Vec<(String, String)> = sqlx::query_as(q_(&sql.settle))
            .bind(items)
            .fetch_all(&mut *tx)
            .await?;
        // done, failed and whether a retry was scheduled, per queue.
        let mut counts: HashMap<&str, (i64, i64, bool)> = HashMap::new();
        for (queue, status) in &settled {
            let c = counts.entry(queue.as_str()).or_default();
            match status.as_str() {
                "succeeded" => c.0 += 1,
                "retrying" => {
                    c.1 += 1;
                    c.2 = true;
                }
                _ => c.1 += 1,
            }
        }
        for (queue, (done, failed, _)) in &counts {
            sqlx::query(q_(&sql.count))
                .bind(*queue)
                .bind(done)
                .bind(failed)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // A waiting fetch may be sleeping past the new retry's time.
        for (queue, _) in counts.iter().filter(|(_, c)| c.2) {
            if let Ok(q) = QueueName::parse(queue) {
                self.broker.inner.db.wake(&self.broker.inner.prefix, &q);
            }
        }
        Ok(())
    }

    async fn release(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| BrokerError::Other(e.to_string()))?;
        let mut tx = self.broker.begin_write().await?;
        let released: Vec<String> = sqlx::query_scalar(q_(&self.broker.sql().release))
            .bind(ids)
            .bind(&*self.worker)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let queues: HashSet<&String> = released.iter().collect();
        for queue in queues {
            if let Ok(q) = QueueName::parse(queue) {
                self.broker.inner.db.wake(&self.broker.inner.prefix, &q);
            }
        }
        Ok(())
    }

    async fn renew(&self, held: &[JobId]) -> Result<(), BrokerError> {
        if held.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = held.iter().map(JobId::to_string).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| BrokerError::Other(e.to_string()))?;
        let mut tx = self.broker.begin_write().await?;
        sqlx::query(q_(&self.broker.sql().renew))
            .bind(now_ms().saturating_add(self.lease_ms))
            .bind(ids)
            .bind(&*self.worker)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
