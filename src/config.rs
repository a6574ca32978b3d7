//! Settings: `DROVER_*` environment variables and CLI flags (flags win), plus an optional TOML
//! file (`DROVER_CONFIG`) for per-family retry policies and timeouts and default schedules.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use jobs::{CatalogConfig, QueueName, schedule::ScheduleConfig};

/// A value that must never reach a log: prints as `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Where drover's state lives. URLs may carry credentials, hence [`Secret`].
#[derive(Args, Clone, Debug)]
pub struct Connections {
    /// Queue broker: redis://…, amqp://… or sqlite://….
    #[arg(long, env = "DROVER_BROKER_URL", default_value = "sqlite://drover-dev.db")]
    pub broker_url: Secret,
    /// History database: postgres://… or sqlite://….
    #[arg(long, env = "DROVER_DATABASE_URL", default_value = "sqlite://drover-dev.db")]
    pub database_url: Secret,
    /// Namespace of drover's Redis keys / AMQP queues / SQLite tables.
    #[arg(long, env = "DROVER_BROKER_PREFIX", default_value = "drover")]
    pub broker_prefix: String,
    /// Optional TOML file with `[retry.<queue or kind>]` tables, `default_retry`, `timeout_ms`
    /// and `[[schedules]]` (default schedules, inserted when absent).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// HTTP API settings.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// Address the API listens on.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
}

/// Worker settings.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Queues to consume, comma separated (default: all built-in queues).
    #[arg(long, env = "DROVER_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Attempts running at once, per queue.
    #[arg(long, env = "DROVER_CONCURRENCY", default_value_t = 50)]
    pub concurrency: usize,
    /// Jobs fetched ahead, per queue.
    #[arg(long, env = "DROVER_PREFETCH", default_value_t = 100)]
    pub prefetch: usize,
    /// Visibility timeout in seconds: a dead worker's jobs come back after this.
    #[arg(long, env = "DROVER_LEASE_S", default_value_t = 30)]
    pub lease_s: u64,
    /// Seconds running jobs get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "DROVER_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
}

/// The worker's probe listener (`drover worker` only; `drover dev` serves probes on the API).
#[derive(Args, Clone, Debug, Default)]
pub struct WorkerHealthArgs {
    /// Address of the worker's `/healthz`, `/readyz` and `/metrics` listener, e.g.
    /// `0.0.0.0:9091` (Kubernetes probes, Prometheus). Off when unset.
    #[arg(long, env = "DROVER_WORKER_LISTEN")]
    pub health_listen: Option<String>,
}

/// Scheduler settings (`drover scheduler`, `drover dev`).
#[derive(Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// Longest time between two reads of the schedules, in ms: edits through the API take
    /// effect within it (due ticks wake the scheduler on time regardless).
    #[arg(long, env = "DROVER_SCHEDULER_POLL_MS", default_value_t = 1000)]
    pub scheduler_poll_ms: u64,
    /// Ticks up to this many seconds late still fire; older ones are missed and follow each
    /// schedule's `missed_ticks` policy.
    #[arg(long, env = "DROVER_SCHEDULER_MISFIRE_GRACE_S", default_value_t = 60)]
    pub misfire_grace_s: u64,
    /// Seconds a claimed tick waits for its replica to enqueue it before another replica does
    /// (how late a tick can be when a scheduler dies right after claiming it).
    #[arg(long, env = "DROVER_SCHEDULER_LEASE_S", default_value_t = 30)]
    pub tick_lease_s: u64,
}

impl SchedulerArgs {
    pub fn settings(&self) -> workers::SchedulerSettings {
        workers::SchedulerSettings {
            poll: Duration::from_millis(self.scheduler_poll_ms.max(10)),
            misfire_grace: Duration::from_secs(self.misfire_grace_s),
            lease: Duration::from_secs(self.tick_lease_s.max(1)),
            ..Default::default()
        }
    }
}

/// The scheduler's probe listener (`drover scheduler` only).
#[derive(Args, Clone, Debug, Default)]
pub struct SchedulerHealthArgs {
    /// Address of the scheduler's `/healthz`, `/readyz` and `/metrics` listener, e.g.
    /// `0.0.0.0:9091`. Off when unset.
    #[arg(long, env = "DROVER_SCHEDULER_LISTEN")]
    pub health_listen: Option<String>,
}

impl WorkerArgs {
    pub fn settings(&self) -> anyhow::Result<workers::WorkerSettings> {
        let mut s = workers::WorkerSettings {
            concurrency: self.concurrency,
            prefetch: self.prefetch,
            lease: Duration::from_secs(self.lease_s.max(1)),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            ..Default::default()
        };
        if !self.queues.is_empty() {
            s.queues = self
                .queues
                .iter()
                .map(|q| QueueName::parse(q.trim()).map_err(anyhow::Error::from))
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(s)
    }
}

/// The default retry policy, overridable field by field from the environment.
#[derive(Args, Clone, Debug, Default)]
pub struct RetryArgs {
    /// Attempts in all, the first included.
    #[arg(long, env = "DROVER_RETRY_MAX_ATTEMPTS")]
    pub retry_max_attempts: Option<u32>,
    /// Delay before the second attempt, ms.
    #[arg(long, env = "DROVER_RETRY_INITIAL_MS")]
    pub retry_initial_ms: Option<u64>,
    #[arg(long, env = "DROVER_RETRY_MULTIPLIER")]
    pub retry_multiplier: Option<f64>,
    /// Largest delay between attempts, ms.
    #[arg(long, env = "DROVER_RETRY_MAX_DELAY_MS")]
    pub retry_max_delay_ms: Option<u64>,
    /// Jitter fraction (0.2 = ±20 %).
    #[arg(long, env = "DROVER_RETRY_JITTER")]
    pub retry_jitter: Option<f64>,
}

/// The TOML file (`DROVER_CONFIG`), split by owner.
#[derive(Clone, Debug, Default)]
pub struct FileConfig {
    /// `[retry.*]`, `[default_retry]`, `[timeout_ms]`.
    pub catalog: CatalogConfig,
    /// `[[schedules]]`: default schedules, inserted at startup by the scheduler when no schedule
    /// of that name exists (see `workers::scheduler::seed`).
    pub schedules: Vec<ScheduleConfig>,
}

/// Reads the TOML file named by `--config`/`DROVER_CONFIG` (empty settings without one).
pub fn file(conn: &Connections) -> anyhow::Result<FileConfig> {
    let Some(path) = &conn.config else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_file(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Parses the text of the TOML config file.
pub fn parse_file(text: &str) -> anyhow::Result<FileConfig> {
    let mut table: toml::Table = toml::from_str(text)?;
    // Each section is read by its owner's type (each rejecting unknown fields); what is left
    // is the catalog's.
    let schedules = match table.remove("schedules") {
        Some(v) => v
            .try_into::<Vec<ScheduleConfig>>()
            .context("parsing [[schedules]]")?,
        None => Vec::new(),
    };
    let catalog = toml::Value::Table(table).try_into::<CatalogConfig>()?;
    Ok(FileConfig { catalog, schedules })
}

/// Builds the job catalog: built-in policies, then the TOML file, then the environment.
pub fn catalog(conn: &Connections, retry: &RetryArgs) -> anyhow::Result<jobs::Catalog> {
    let mut cfg = file(conn)?.catalog;
    let any = retry.retry_max_attempts.is_some()
        || retry.retry_initial_ms.is_some()
        || retry.retry_multiplier.is_some()
        || retry.retry_max_delay_ms.is_some()
        || retry.retry_jitter.is_some();
    if any {
        let mut p = cfg.default_retry.take().unwrap_or_default();
        p.max_attempts = retry.retry_max_attempts.unwrap_or(p.max_attempts).max(1);
        p.initial_ms = retry.retry_initial_ms.unwrap_or(p.initial_ms);
        p.multiplier = retry.retry_multiplier.unwrap_or(p.multiplier);
        p.max_delay_ms = retry.retry_max_delay_ms.unwrap_or(p.max_delay_ms);
        p.jitter = retry.retry_jitter.unwrap_or(p.jitter);
        cfg.default_retry = Some(p);
    }
    Ok(jobs::Catalog::new(&cfg))
}
