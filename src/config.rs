//! Settings: `DROVER_*` environment variables and CLI flags (flags win), plus an optional TOML
//! file (`DROVER_CONFIG`) for per-family retry policies and timeouts, default schedules and the
//! `[backup]` table.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use jobs::{CatalogConfig, QueueName, schedule::ScheduleConfig};
use workers::families::backup::BackupConfig;
use workers::families::config::{AnalyticsConfig, CacheConfig, ScoringConfig};

pub use api::Secret;

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
    #[command(flatten)]
    pub security: ApiSecurityArgs,
}

/// Authentication, rate limits and HTTP hardening of the API. The defaults are
/// [`api::ApiConfig`]'s.
#[derive(Args, Clone, Debug)]
pub struct ApiSecurityArgs {
    /// `open` (anyone may scrape /metrics) or `key` (a viewer key or better).
    #[arg(long, env = "DROVER_METRICS_AUTH", default_value = "open", value_parser = ["open", "key"])]
    pub metrics_auth: String,
    /// Seconds a verified key is trusted before the database is read again: a revoked key is
    /// refused within this long.
    #[arg(long, env = "DROVER_KEY_CACHE_TTL_S", default_value_t = 5)]
    pub key_cache_ttl_s: u64,
    /// Requests per second per API key, shared by every API replica on the same Redis; 0: off.
    #[arg(long, env = "DROVER_RATE_LIMIT_KEY_RPS", default_value_t = 0.0)]
    pub rate_limit_key_rps: f64,
    /// Burst above the per-key rate (default: one second's worth).
    #[arg(long, env = "DROVER_RATE_LIMIT_KEY_BURST")]
    pub rate_limit_key_burst: Option<u32>,
    /// Requests per second per client IP; 0: off.
    #[arg(long, env = "DROVER_RATE_LIMIT_IP_RPS", default_value_t = 0.0)]
    pub rate_limit_ip_rps: f64,
    /// Burst above the per-IP rate (default: one second's worth).
    #[arg(long, env = "DROVER_RATE_LIMIT_IP_BURST")]
    pub rate_limit_ip_burst: Option<u32>,
    /// Failed authentications per minute per client IP before it is answered 429; 0: off.
    #[arg(long, env = "DROVER_RATE_LIMIT_AUTH_FAILURES_PER_MIN", default_value_t = 60.0)]
    pub rate_limit_auth_failures_per_min: f64,
    /// Failed authentications in a row a client IP may have before the per-minute rate applies.
    #[arg(long, env = "DROVER_RATE_LIMIT_AUTH_FAILURES_BURST", default_value_t = 20)]
    pub rate_limit_auth_failures_burst: u32,
    /// Origins allowed to call the API from a browser, comma separated (default: none, CORS off).
    #[arg(long, env = "DROVER_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Seconds to answer one request, reading its body included (slow clients get a 408).
    #[arg(long, env = "DROVER_REQUEST_TIMEOUT_S", default_value_t = 60)]
    pub request_timeout_s: u64,
    /// Seconds without traffic after which a connection is closed.
    #[arg(long, env = "DROVER_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub idle_timeout_s: u64,
}

impl Default for ApiSecurityArgs {
    fn default() -> Self {
        Self {
            metrics_auth: "open".into(),
            key_cache_ttl_s: 5,
            rate_limit_key_rps: 0.0,
            rate_limit_key_burst: None,
            rate_limit_ip_rps: 0.0,
            rate_limit_ip_burst: None,
            rate_limit_auth_failures_per_min: 60.0,
            rate_limit_auth_failures_burst: 20,
            cors_origins: Vec::new(),
            request_timeout_s: 60,
            idle_timeout_s: 60,
        }
    }
}

impl ApiSecurityArgs {
    /// The API's configuration: the defaults with these settings applied.
    pub fn api_config(&self) -> api::ApiConfig {
        let rate = |per_second: f64, burst: Option<u32>| {
            (per_second > 0.0).then(|| api::Rate {
                per_second,
                burst: burst.unwrap_or(per_second.ceil() as u32).max(1),
            })
        };
        api::ApiConfig {
            key_cache_ttl: Duration::from_secs(self.key_cache_ttl_s),
            metrics_auth: if self.metrics_auth == "key" {
                api::MetricsAuth::Key
            } else {
                api::MetricsAuth::Open
            },
            rate_limits: api::RateLimits {
                per_key: rate(self.rate_limit_key_rps, self.rate_limit_key_burst),
                per_ip: rate(self.rate_limit_ip_rps, self.rate_limit_ip_burst),
                auth_failures: rate(
                    self.rate_limit_auth_failures_per_min / 60.0,
                    Some(self.rate_limit_auth_failures_burst),
                ),
            },
            cors_origins: self
                .cors_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            request_timeout: Duration::from_secs(self.request_timeout_s.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_s.max(1)),
            ..Default::default()
        }
    }
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
    /// Let `sleep` jobs with `"crash": "abort"` abort this process (chaos drills: poison-pill
    /// quarantine, crash recovery). Off in production: without it such a job fails for good.
    #[arg(long, env = "DROVER_CHAOS_DRILLS")]
    pub chaos_drills: bool,
    /// Redis that holds the state of `[[limits]]` for every replica (default: the broker's
    /// Redis; without either, limits hold per process only).
    #[arg(long, env = "DROVER_LIMITS_URL")]
    pub limits_url: Option<Secret>,
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
    /// `[[limits]]`: rate and concurrency limits of queues and kinds (see `jobs::limits`).
    pub limits: Vec<jobs::limits::LimitRule>,
    /// `[analytics]`: default schedules, anomaly threshold, webhook.
    pub analytics: AnalyticsConfig,
    /// `[scoring]`: default schedule, chunk size.
    pub scoring: ScoringConfig,
    /// `[cache]`: Redis URL, TTLs, warmers.
    pub cache: CacheConfig,
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
    let limits = match table.remove("limits") {
        Some(v) => v
            .try_into::<Vec<jobs::limits::LimitRule>>()
            .context("parsing [[limits]]")?,
        None => Vec::new(),
    };
    for l in &limits {
        l.validate()
            .map_err(anyhow::Error::msg)
            .context("in [[limits]]")?;
    }
    let analytics = match table.remove("analytics") {
        Some(v) => v.try_into::<AnalyticsConfig>().context("in [analytics]")?,
        None => AnalyticsConfig::default(),
    };
    let scoring = match table.remove("scoring") {
        Some(v) => v.try_into::<ScoringConfig>().context("in [scoring]")?,
        None => ScoringConfig::default(),
    };
    let cache = match table.remove("cache") {
        Some(v) => v.try_into::<CacheConfig>().context("in [cache]")?,
        None => CacheConfig::default(),
    };
    cache.validate().map_err(anyhow::Error::msg)?;
    let catalog = toml::Value::Table(table).try_into::<CatalogConfig>()?;
    Ok(FileConfig {
        catalog,
        schedules,
        backup,
        limits,
        analytics,
        scoring,
        cache,
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

/// The schedules a scheduler seeds at start: the config file's `[[schedules]]`, then each
/// family's defaults where its table enables them (`backup.schedules`: every configured
/// target; `analytics.schedules`: rollups, anomalies, forecast; `scoring.schedules`: the
/// recompute; `cache.schedules`: one per warmer), except those whose name the file already
/// defines.
pub fn default_schedules(conn: &Connections, backup: &BackupConfig) -> anyhow::Result<Vec<ScheduleConfig>> {
    let file = file(conn)?;
    let mut out = file.schedules;
    let mut family = Vec::new();
    if backup.schedules {
        let targets = backup.targets(Some(conn.database_url.expose()));
        family.extend(jobs::families::backup::default_schedules(
            targets.iter().map(|(s, t)| (*s, t.as_str())),
        ));
    }
    if file.analytics.schedules {
        family.extend(jobs::families::analytics::default_schedules(
            file.analytics.anomaly_threshold,
        ));
    }
    if file.scoring.schedules {
        family.extend(jobs::families::scoring::default_schedules());
    }
    if file.cache.schedules {
        family.extend(jobs::families::cache_warm::default_schedules(
            file.cache
                .warmers
                .iter()
                .map(|w| (w.name.as_str(), w.cron.as_str())),
        ));
    }
    for s in family {
        if !out.iter().any(|d| d.name == s.name) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The analytics, scoring and cache settings from the environment; the rest is `[analytics]`,
/// `[scoring]` and `[cache]` in the TOML file.
#[derive(Args, Clone, Debug, Default)]
pub struct FamilyArgs {
    /// Redis for the API's cached read models (leaderboards, analytics summaries); overrides
    /// `cache.url`. Default: the broker's URL when it is a Redis URL; otherwise none (every
    /// such read is computed from the database and counted as a miss).
    #[arg(long, env = "DROVER_CACHE_URL")]
    pub cache_url: Option<Secret>,
}

/// The three families' configuration: the file's tables, then the environment. The cache URL
/// falls back to the broker's when that is Redis.
pub fn family_config(
    conn: &Connections,
    args: &FamilyArgs,
) -> anyhow::Result<(AnalyticsConfig, ScoringConfig, CacheConfig)> {
    let f = file(conn)?;
    let mut cache = f.cache;
    if let Some(url) = &args.cache_url {
        cache.url = Some(url.expose().to_owned());
    }
    if cache.url.is_none() {
        let broker = conn.broker_url.expose();
        if broker.starts_with("redis://") || broker.starts_with("rediss://") {
            cache.url = Some(broker.to_owned());
        }
    }
    cache.validate().map_err(anyhow::Error::msg)?;
    Ok((f.analytics, f.scoring, cache))
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
    let families = file(conn).unwrap_or_default();
    let mut analytics = families.analytics;
    if analytics.webhook_url.is_some() {
        analytics.webhook_url = Some("[redacted]".into());
    }
    let mut cache = families.cache;
    cache.url = cache.url.as_deref().map(redact_url);
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
        analytics: AnalyticsConfig,
        scoring: ScoringConfig,
        cache: CacheConfig,
    }
    let doc = Effective {
        broker_url: redact_url(conn.broker_url.expose()),
        database_url: redact_url(conn.database_url.expose()),
        broker_prefix: &conn.broker_prefix,
        catalog,
        backup,
        analytics,
        scoring: families.scoring,
        cache,
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
    fn the_backup_family_adds_its_default_schedules_unless_the_file_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.toml");
        std::fs::write(
            &path,
            r#"
            [[schedules]]
            name = "backup-prune"
            cron = "0 0 6 * * *"
            job = { kind = "backup.prune" }
            "#,
        )
        .unwrap();
        let conn = Connections {
            broker_url: "redis://127.0.0.1/0".parse().unwrap(),
            database_url: "postgres://drover@db/drover".parse().unwrap(),
            broker_prefix: "drover".into(),
            config: Some(path),
            amqp_queue_type: Default::default(),
        };
        let mut backup = BackupConfig::default();
        backup.files.push(workers::families::backup::FilesTarget {
            name: "uploads".into(),
            paths: vec!["/srv/uploads".into()],
            include: vec![],
            exclude: vec![],
        });
        // The other families add theirs; this test is about the backup family's.
        let names = |s: &[ScheduleConfig]| {
            s.iter()
                .filter(|s| s.name.starts_with("backup-"))
                .map(|s| (s.name.clone(), s.cron.clone()))
                .collect::<Vec<_>>()
        };
        let all = default_schedules(&conn, &backup).unwrap();
        assert_eq!(
            names(&all),
            [
                ("backup-prune".to_owned(), "0 0 6 * * *".to_owned()),
                ("backup-postgres-drover".to_owned(), "0 0 2 * * *".to_owned()),
                ("backup-files-uploads".to_owned(), "0 0 3 * * Sun".to_owned()),
                ("backup-config-drover".to_owned(), "0 0 4 * * *".to_owned()),
            ]
        );
        let catalog = jobs::Catalog::default();
        for s in &all {
            s.validate(&catalog).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        }
        backup.schedules = false;
        assert_eq!(
            names(&default_schedules(&conn, &backup).unwrap()),
            [("backup-prune".to_owned(), "0 0 6 * * *".to_owned())]
        );
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
