//! What recording job history costs: pushes a worker's `Started` + `Finished` events for many jobs
//! through [`HistoryWriter`] into a scratch database and prints rates and CPU per job. It prints
//! figures; it asserts nothing about them.
//!
//! ```text
//! cargo run --release -p schema --example history_bench -- postgres://postgres@127.0.0.1:5432/postgres [jobs] [phase]
//! cargo run --release -p schema --example history_bench -- sqlite [jobs] [phase]
//! ```
//!
//! `BENCH_MAX_BATCH` overrides [`HistoryConfig::max_batch`].
//!
//! For Postgres the URL names any database on the server: the bench creates its own database next
//! to it and drops it at the end. For SQLite it uses a temporary file.
//!
//! Two phases (or the one named), each with `jobs` jobs (default 100 000) whose events are recorded as a worker with
//! 50 jobs in flight would (job i starts, then job i−50 finishes), all queued at once so that the
//! writer runs flat out:
//! - `fresh`: no row exists yet (what `drover bench` does: it enqueues without the API);
//! - `enqueued`: the jobs' `Enqueued` events were written first (not measured), as when the API
//!   records them: every write is the update path of the upsert.
//!
//! CPU is read from `/proc`: this process's user+system time (every thread, the SQLite one
//! included), and for Postgres the backends serving this database (WAL writer, checkpointer and
//! other shared server processes are not counted).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use schema::history::{AttemptOutcome, HistoryConfig, HistoryEvent, HistoryWriter, JobState, apply_batch};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use uuid::Uuid;

/// Jobs in flight, as `BENCH_CONC` in the queue benchmark.
const IN_FLIGHT: usize = 50;
/// Linux's USER_HZ: the unit of utime/stime in `/proc/<pid>/stat`.
const TICKS_PER_S: f64 = 100.0;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "sqlite".to_owned());
    let jobs: usize = args
        .next()
        .map_or(100_000, |n| n.parse().expect("jobs: a number"));
    let only = args.next();

    let scratch = Scratch::create(&target).await;
    let db = schema::connect(&scratch.url).await.expect("connect");
    schema::migrate(&db).await.expect("migrate");

    for phase in [Phase::Fresh, Phase::Enqueued] {
        if only.as_ref().is_some_and(|only| *only != phase.name()) {
            continue;
        }
        let ids: Vec<Uuid> = (0..jobs).map(|_| Uuid::now_v7()).collect();
        if phase == Phase::Enqueued {
            for chunk in ids.chunks(1000) {
                let events: Vec<_> = chunk.iter().map(|id| enqueued(*id)).collect();
                apply_batch(&db, &events).await.expect("write the enqueues");
            }
        }
        let events = worker_events(&ids);
        run(&db, &scratch, phase, jobs, events).await;
    }

    db.close().await.expect("close");
    scratch.destroy().await;
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    Fresh,
    Enqueued,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Fresh => "fresh",
            Phase::Enqueued => "enqueued",
        }
    }
}

async fn run(
    db: &DatabaseConnection,
    scratch: &Scratch,
    phase: Phase,
    jobs: usize,
    events: Vec<HistoryEvent>,
) {
    let count = events.len();
    let mut cfg = HistoryConfig {
        capacity: count + 1,
        ..HistoryConfig::default()
    };
    if let Ok(max_batch) = std::env::var("BENCH_MAX_BATCH") {
        cfg.max_batch = max_batch.parse().expect("BENCH_MAX_BATCH: a number");
    }
    let max_batch = cfg.max_batch;
    let server_before = scratch.server_cpu(db).await;
    let client_before = process_cpu(std::process::id());
    let clock = Instant::now();

    let (writer, task) = HistoryWriter::spawn(db.clone(), cfg);
    for event in events {
        writer.record(event);
    }
    writer.flush().await;
    let wall = clock.elapsed();
    let client = process_cpu(std::process::id()) - client_before;
    let server = scratch
        .server_cpu(db)
        .await
        .map(|after| after - server_before.unwrap_or(0.0));
    let unwritten = task.shutdown(Duration::from_secs(5)).await;

    let per_job_us = |s: f64| s * 1e6 / jobs as f64;
    println!(
        "history_bench backend={} phase={} max_batch={} jobs={jobs} events={count} wall_s={:.3} events_per_s={:.0} \
         client_cpu_us_per_job={:.2} server_cpu_us_per_job={} dropped={} unwritten={unwritten}",
        scratch.backend(),
        phase.name(),
        max_batch,
        wall.as_secs_f64(),
        count as f64 / wall.as_secs_f64(),
        per_job_us(client),
        server.map_or("n/a".to_owned(), |s| format!("{:.2}", per_job_us(s))),
        writer.dropped(),
    );
}

/// What a worker with [`IN_FLIGHT`] jobs at a time records: job i starts as job i − 50 finishes.
fn worker_events(ids: &[Uuid]) -> Vec<HistoryEvent> {
    let base = Utc::now();
    let at = |i: usize| base + chrono::Duration::microseconds(i as i64 * 10);
    let mut events = Vec::with_capacity(ids.len() * 2);
    for i in 0..ids.len() + IN_FLIGHT {
        if let Some(id) = ids.get(i) {
            events.push(HistoryEvent::Started {
                id: *id,
                queue: "noop".to_owned(),
                kind: "bench.noop".to_owned(),
                attempt: 1,
                max_attempts: 3,
                worker_id: "bench-worker-1".to_owned(),
                trace_id: None,
                at: at(i),
            });
        }
        if let Some(done) = i.checked_sub(IN_FLIGHT) {
            events.push(HistoryEvent::Finished {
                id: ids[done],
                queue: "noop".to_owned(),
                kind: "bench.noop".to_owned(),
                attempt: 1,
                max_attempts: 3,
                worker_id: "bench-worker-1".to_owned(),
                trace_id: None,
                started_at: at(done),
                at: at(i),
                outcome: AttemptOutcome::Succeeded,
                error: None,
                status: JobState::Succeeded,
                next_run_at: None,
            });
        }
    }
    events
}

fn enqueued(id: Uuid) -> HistoryEvent {
    let at: DateTime<Utc> = Utc::now() - chrono::Duration::seconds(60);
    HistoryEvent::Enqueued {
        id,
        queue: "noop".to_owned(),
        kind: "bench.noop".to_owned(),
        payload: serde_json::json!({}),
        max_attempts: 3,
        priority: 0,
        idempotency_key: None,
        trace_id: None,
        run_at: None,
        at,
    }
}

/// The bench's own database.
struct Scratch {
    url: String,
    kind: ScratchKind,
}

enum ScratchKind {
    Postgres { admin: String, name: String },
    Sqlite { path: std::path::PathBuf },
}

impl Scratch {
    async fn create(target: &str) -> Scratch {
        let name = format!("drover_history_bench_{}", Uuid::now_v7().simple());
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            let admin = schema::connect(target).await.expect("connect to Postgres");
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create the bench database");
            admin.close().await.expect("close");
            let (server, _db) = target.rsplit_once('/').expect("postgres://host/database");
            Scratch {
                url: format!("{server}/{name}"),
                kind: ScratchKind::Postgres {
                    admin: target.to_owned(),
                    name,
                },
            }
        } else {
            let path = std::env::temp_dir().join(format!("{name}.db"));
            Scratch {
                url: format!("sqlite://{}", path.display()),
                kind: ScratchKind::Sqlite { path },
            }
        }
    }

    fn backend(&self) -> &'static str {
        match self.kind {
            ScratchKind::Postgres { .. } => "postgres",
            ScratchKind::Sqlite { .. } => "sqlite",
        }
    }

    /// CPU seconds used so far by the Postgres backends serving the bench database.
    async fn server_cpu(&self, db: &DatabaseConnection) -> Option<f64> {
        let ScratchKind::Postgres { name, .. } = &self.kind else {
            return None;
        };
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                [name.clone().into()],
            ))
            .await
            .expect("list the backends");
        let pids: Vec<i32> = rows
            .iter()
            .map(|row| row.try_get("", "pid").expect("pid"))
            .collect();
        Some(pids.into_iter().map(|pid| process_cpu(pid as u32)).sum())
    }

    async fn destroy(self) {
        match self.kind {
            ScratchKind::Postgres { admin, name } => {
                let admin = schema::connect(&admin).await.expect("connect to Postgres");
                admin
                    .execute_unprepared(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                    .await
                    .expect("drop the bench database");
                admin.close().await.expect("close");
            }
            ScratchKind::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }
}

/// User + system CPU seconds of process `pid`, every thread included (0 if it is gone).
fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may contain spaces; the fields after it are space-separated.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based, name = 2).
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(14) + ticks(15)) as f64 / TICKS_PER_S
}
