//! Settings: `DROVER_*` environment variables and CLI flags (flags win), plus an optional TOML
//! file (`DROVER_CONFIG`) for per-family retry policies and timeouts.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use jobs::{CatalogConfig, QueueName};

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
    /// Optional TOML file with `[retry.<queue or kind>]` tables, `default_retry` and `timeout_ms`.
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

/// Builds the job catalog: built-in policies, then the TOML file, then the environment.
pub fn catalog(conn: &Connections, retry: &RetryArgs) -> anyhow::Result<jobs::Catalog> {
    let mut cfg = match &conn.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<CatalogConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => CatalogConfig::default(),
    };
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
