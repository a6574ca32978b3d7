//! `drover`: parses the command line and runs the process it names.
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use drover::{
    app::{self, Migrations, Stack},
    bench,
    config::{
        self, ApiArgs, BackupArgs, Connections, FamilyArgs, RetryArgs, SchedulerArgs, SchedulerHealthArgs,
        WorkerArgs, WorkerHealthArgs,
    },
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "A job platform: HTTP API, queues, workers, schedules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API, workers and the scheduler in one process on an embedded SQLite broker and database:
    /// no services needed.
    Dev {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        scheduler: SchedulerArgs,
        #[command(flatten)]
        retry: RetryArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        families: FamilyArgs,
    },
    /// The HTTP API.
    Api {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        retry: RetryArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        families: FamilyArgs,
    },
    /// A worker process: consumes the given queues until SIGTERM/SIGINT.
    Worker {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        health: WorkerHealthArgs,
        #[command(flatten)]
        retry: RetryArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        families: FamilyArgs,
    },
    /// The cron scheduler: enqueues each schedule's job at its ticks until SIGTERM/SIGINT. Run
    /// any number of replicas; each tick fires once.
    Scheduler {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        scheduler: SchedulerArgs,
        #[command(flatten)]
        health: SchedulerHealthArgs,
        #[command(flatten)]
        retry: RetryArgs,
        /// The backup targets, whose default schedules it seeds (`backup.schedules`).
        #[command(flatten)]
        backup: BackupArgs,
    },
    /// Applies pending database migrations.
    Migrate {
        #[command(flatten)]
        conn: Connections,
    },
    /// Enqueues one job straight into the broker and prints its id.
    Enqueue {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        retry: RetryArgs,
        /// Job kind, e.g. `noop` or `sleep`.
        kind: String,
        /// The payload, as JSON.
        #[arg(default_value = "{}")]
        payload: String,
        /// Queue (default: the kind's own).
        #[arg(long)]
        queue: Option<String>,
        /// Run no earlier than this many seconds from now.
        #[arg(long)]
        delay_s: Option<u64>,
    },
    /// API keys: create (printed once), list, revoke.
    Keys {
        #[command(flatten)]
        conn: Connections,
        #[command(subcommand)]
        command: drover::keys::KeysCommand,
    },
    /// Backups: list, verify, restore; take or prune one now.
    Backup {
        #[command(flatten)]
        conn: Connections,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(subcommand)]
        command: drover::backup::BackupCommand,
    },
    /// The queue benchmark (../shared/bench/WORKLOAD.md) on one broker: prints a `RESULT` line.
    Bench(bench::BenchArgs),
    /// The benchmark's worker process (started by `drover bench`).
    #[command(hide = true)]
    BenchWorker(bench::BenchWorkerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = drover::telemetry::init();
    match Cli::parse().command {
        Command::Dev {
            conn,
            api,
            worker,
            scheduler,
            retry,
            backup,
            families,
        } => {
            let backup = config::backup_config(&conn, &backup)?;
            let defaults = config::default_schedules(&conn, &backup)?;
            let mut stack = Stack::connect(&conn, config::catalog(&conn, &retry)?, Migrations::Apply).await?;
            stack.enable_backups_with(&conn, backup)?;
            stack
                .enable_limits(&conn, worker.limits_url.as_ref().map(|u| u.expose()))
                .await?;
            stack.api_config = api.security.api_config();
            stack.enable_families(&conn, &families)?;
            app::seed_schedules(&stack, &defaults).await?;
            let first_key = drover::keys::first_dev_key(&stack.db).await?;
            let listener = app::bind(&api)?;
            let addr = listener.local_addr()?;
            println!("drover dev is up: http://{addr}  (API docs: http://{addr}/docs)");
            println!("dashboard: http://{addr}/dashboard");
            match first_key {
                Some(key) => println!(
                    "admin API key (shown only this once; more with `drover keys create`):\n  export DROVER_KEY={}",
                    key.expose()
                ),
                None => println!(
                    "API keys: the database has some already (`drover keys list`, `drover keys create`)"
                ),
            }
            let (stop, wait) = app::broadcast_shutdown();
            tokio::spawn(async move {
                app::shutdown_signal().await;
                let _ = stop.send(true);
            });
            let (a, w, s) = tokio::join!(
                app::serve_api(&stack, listener, wait()),
                app::run_workers(&stack, &worker, workers::Deps::default(), wait()),
                app::run_scheduler(&stack, &scheduler, wait()),
            );
            stack.close(Duration::from_secs(5)).await;
            a.and(w).and(s)
        }
        Command::Api {
            conn,
            api,
            retry,
            backup,
            families,
        } => {
            let mut stack =
                Stack::connect(&conn, config::catalog(&conn, &retry)?, Migrations::Require).await?;
            stack.enable_backups(&conn, &backup)?;
            stack.api_config = api.security.api_config();
            stack.enable_families(&conn, &families)?;
            let listener = app::bind(&api)?;
            tracing::info!(addr = %listener.local_addr()?, "API listening");
            let res = app::serve_api(&stack, listener, app::shutdown_signal()).await;
            stack.close(Duration::from_secs(5)).await;
            res
        }
        Command::Worker {
            conn,
            worker,
            health,
            retry,
            backup,
            families,
        } => {
            let mut stack =
                Stack::connect(&conn, config::catalog(&conn, &retry)?, Migrations::Require).await?;
            stack.enable_backups(&conn, &backup)?;
            stack
                .enable_limits(&conn, worker.limits_url.as_ref().map(|u| u.expose()))
                .await?;
            stack.enable_families(&conn, &families)?;
            let res = app::run_worker_process(
                &stack,
                &worker,
                &health,
                workers::Deps::default(),
                app::shutdown_signal(),
            )
            .await;
            stack.close(Duration::from_secs(5)).await;
            res
        }
        Command::Scheduler {
            conn,
            scheduler,
            health,
            retry,
            backup,
        } => {
            let defaults = config::default_schedules(&conn, &config::backup_config(&conn, &backup)?)?;
            let stack = Stack::connect(&conn, config::catalog(&conn, &retry)?, Migrations::Require).await?;
            app::seed_schedules(&stack, &defaults).await?;
            let res = app::run_scheduler_process(&stack, &scheduler, &health, app::shutdown_signal()).await;
            stack.close(Duration::from_secs(5)).await;
            res
        }
        Command::Migrate { conn } => {
            let db = schema::connect(conn.database_url.expose())
                .await
                .context("connecting to the database")?;
            schema::migrate(&db).await.context("migrating")?;
            println!("database migrated");
            Ok(())
        }
        Command::Enqueue {
            conn,
            retry,
            kind,
            payload,
            queue,
            delay_s,
        } => {
            let catalog = config::catalog(&conn, &retry)?;
            let raw =
                serde_json::value::RawValue::from_string(payload).context("the payload is not valid JSON")?;
            let spec = catalog.validate(&kind, &raw)?;
            let queue = match queue {
                Some(q) => jobs::QueueName::parse(&q)?,
                None => catalog.default_queue(spec),
            };
            let db = schema::connect(conn.database_url.expose())
                .await
                .context("connecting to the database")?;
            let broker = jobs::broker::connect(
                conn.broker_url.expose(),
                jobs::BrokerOptions {
                    prefix: conn.broker_prefix.clone(),
                    db,
                    amqp_queue_type: conn.amqp_queue_type,
                },
            )
            .await?;
            let now = jobs::job::now_ms();
            let job = jobs::Job {
                id: jobs::JobId::new(),
                queue,
                kind: spec.name.into(),
                payload: raw,
                max_attempts: spec.retry.max_attempts,
                priority: 0,
                enqueued_at_ms: now,
                run_at_ms: delay_s.map(|s| now + s as i64 * 1_000),
                trace_id: None,
                idempotency_key: None,
                attempt: 0,
                crashes: 0,
                attempts_before: 0,
                receipt: 0,
            };
            let res = broker.push(job).await?;
            println!("{}", res.id);
            Ok(())
        }
        Command::Backup {
            conn,
            backup,
            command,
        } => drover::backup::run(conn, backup, command).await,
        Command::Keys { conn, command } => drover::keys::run(conn, command).await,
        Command::Bench(args) => bench::run(args).await,
        Command::BenchWorker(args) => bench::worker(args).await,
    }
}
