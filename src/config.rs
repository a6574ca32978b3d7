//! Settings: `DROVER_*` environment variables and CLI flags (flags win), plus an optional TOML
//! file (`DROVER_CONFIG`) for per-family retry policies and timeouts, default schedules and the
//! `[backup]` table.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use jobs::{CatalogConfig, QueueName, schedule::ScheduleConfig};
use workers::families::backup::BackupConfig;

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
    /// RabbitMQ only: `classic` (priorities) or `quorum` (replicated across a RabbitMQ
    /// cluster, no priorities). Every process of a deployment must use the same.
    #[arg(long, env = "DROVER_AMQP_QUEUE_TYPE", default_value = "classic")]
    pub amqp_queue_type: jobs::broker::amqp::QueueType,
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
    /// A job whose worker dies while running it this many times (kill -9, OOM, abort) goes to
    /// the dead set as a poison pill instead of being delivered again.
    #[arg(long, env = "DROVER_QUARANTINE_AFTER", default_value_t = jobs::broker::QUARANTINE_AFTER,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub quarantine_after: u32,
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
            quarantine_after: self.quarantine_after,
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
    /// `[backup]`: targets, store, encryption, retention, webhook.
    pub backup: BackupConfig,
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
    let backup = match table.remove("backup") {
        Some(v) => v.try_into::<BackupConfig>().context("in [backup]")?,
        None => BackupConfig::default(),
    };
    let catalog = toml::Value::Table(table).try_into::<CatalogConfig>()?;
    Ok(FileConfig {
        catalog,
        schedules,
        backup,
    })
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

/// The backup family's settings from the environment; the rest is `[backup]` in the TOML file.
#[derive(Args, Clone, Debug, Default)]
pub struct BackupArgs {
    /// Where backups go: `file:///path`, a plain path, or `s3://bucket/prefix` (overrides
    /// `backup.store`).
    #[arg(long, env = "DROVER_BACKUP_STORE")]
    pub backup_store: Option<String>,
    /// age recipients (`age1…`, comma separated) to encrypt backups to (overrides
    /// `backup.age_recipients`).
    #[arg(long, env = "DROVER_BACKUP_AGE_RECIPIENT", value_delimiter = ',')]
    pub backup_age_recipient: Vec<String>,
    /// File with the age identity that verify and restore decrypt with.
    #[arg(long, env = "DROVER_BACKUP_AGE_IDENTITY_FILE")]
    pub backup_age_identity_file: Option<PathBuf>,
    /// URL notified (JSON POST) when a backup or verify fails for good.
    #[arg(long, env = "DROVER_BACKUP_WEBHOOK_URL")]
    pub backup_webhook_url: Option<Secret>,
}

/// The backup configuration: defaults, then the TOML file's `[backup]`, then the environment.
pub fn backup_config(conn: &Connections, args: &BackupArgs) -> anyhow::Result<BackupConfig> {
    let mut cfg = file(conn)?.backup;
    if let Some(store) = &args.backup_store {
        cfg.store = store.clone();
    }
    if !args.backup_age_recipient.is_empty() {
        cfg.age_recipients = args.backup_age_recipient.clone();
    }
    if let Some(p) = &args.backup_age_identity_file {
        cfg.age_identity_file = Some(p.clone());
    }
    if let Some(url) = &args.backup_webhook_url {
        cfg.webhook_url = Some(url.expose().to_owned());
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// The schedules a scheduler seeds at start: the config file's `[[schedules]]`, then (with
/// `backup.schedules`) the backup family's defaults for every configured target, except those
/// whose name the file already defines.
pub fn default_schedules(conn: &Connections, backup: &BackupConfig) -> anyhow::Result<Vec<ScheduleConfig>> {
    let mut out = file(conn)?.schedules;
    if backup.schedules {
        let targets = backup.targets(Some(conn.database_url.expose()));
        let family = jobs::families::backup::default_schedules(targets.iter().map(|(s, t)| (*s, t.as_str())));
        for s in family {
            if !out.iter().any(|d| d.name == s.name) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// drover's effective configuration as TOML, with every secret replaced: what the `config`
/// backup source stores. URL passwords become `***`, store options and webhook URLs
/// `[redacted]`.
pub fn effective_config(conn: &Connections, catalog: &CatalogConfig, backup: &BackupConfig) -> String {
    let mut backup = backup.clone();
    for v in backup.store_options.values_mut() {
        *v = "[redacted]".into();
    }
    if backup.webhook_url.is_some() {
        backup.webhook_url = Some("[redacted]".into());
    }
    for t in &mut backup.postgres {
        t.url = redact_url(&t.url);
    }
    #[derive(serde::Serialize)]
    struct Effective<'a> {
        broker_url: String,
        database_url: String,
        broker_prefix: &'a str,
        catalog: &'a CatalogConfig,
        backup: BackupConfig,
    }
    let doc = Effective {
        broker_url: redact_url(conn.broker_url.expose()),
        database_url: redact_url(conn.database_url.expose()),
        broker_prefix: &conn.broker_prefix,
        catalog,
        backup,
    };
    toml::to_string(&doc)
        .unwrap_or_else(|e| format!("# the effective configuration could not be rendered: {e}\n"))
}

/// The TOML file's catalog part (the same [`catalog`] reads), for [`effective_config`].
pub fn catalog_config(conn: &Connections) -> anyhow::Result<CatalogConfig> {
    Ok(file(conn)?.catalog)
}

/// `scheme://user:password@host/…` → `scheme://user:***@host/…`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_table_is_read_apart_from_the_catalog() {
        let FileConfig { catalog, backup, .. } = parse_file(
            r#"
            [retry.backups]
            max_attempts = 2
            [backup]
            store = "s3://bucket/drover"
            [backup.retention]
            keep_last = 3
            [[backup.files]]
            name = "uploads"
            paths = ["/srv/uploads"]
            exclude = ["**/*.tmp"]
            "#,
        )
        .unwrap();
        assert_eq!(catalog.retry["backups"].max_attempts, 2);
        assert_eq!(backup.store, "s3://bucket/drover");
        assert_eq!(backup.retention.keep_last, 3);
        assert_eq!(backup.retention.keep_daily, 14);
        assert_eq!(backup.files[0].exclude, ["**/*.tmp"]);
        assert!(parse_file("[backup]\nstroe = 1\n").is_err());
        assert!(parse_file("[retyr]\n").is_err());
    }

    #[test]
    fn the_effective_config_carries_no_secret() {
        let conn = Connections {
            broker_url: "redis://:hunter2@redis:6379/0".parse().unwrap(),
            database_url: "postgres://drover:s3cret@db/drover".parse().unwrap(),
            broker_prefix: "drover".into(),
            amqp_queue_type: Default::default(),
            config: None,
        };
        let mut backup = BackupConfig::default();
        backup
            .store_options
            .insert("aws_secret_access_key".into(), "AKIASECRET".into());
        backup.webhook_url = Some("https://hooks.example/T0K3N".into());
        backup.postgres.push(workers::families::backup::PostgresTarget {
            name: "app".into(),
            url: "postgres://app:pa55@db/app".into(),
        });
        let text = effective_config(&conn, &CatalogConfig::default(), &backup);
        for secret in ["hunter2", "s3cret", "AKIASECRET", "T0K3N", "pa55"] {
            assert!(!text.contains(secret), "{secret} leaked into:\n{text}");
        }
        assert!(text.contains("postgres://drover:***@db/drover"), "{text}");
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert!(parsed.contains_key("backup"));
    }
}
