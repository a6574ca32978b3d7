//! Composes database, broker, history writer, API, workers and the scheduler into running
//! processes.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use jobs::{BrokerOptions, Catalog, Producer};
use schema::history::{HistoryConfig, HistoryTask, HistoryWriter};
use sea_orm::DatabaseConnection;

use crate::config::{
    self, ApiArgs, BackupArgs, Connections, SchedulerArgs, SchedulerHealthArgs, WorkerArgs, WorkerHealthArgs,
};

/// What every drover process holds: one of each, shared by everything in the process.
pub struct Stack {
    pub db: DatabaseConnection,
    pub broker: Arc<dyn Producer>,
    pub catalog: Arc<Catalog>,
    pub history: HistoryWriter,
    history_task: HistoryTask,
    /// The backup family (configuration, store, catalog), once [`Stack::enable_backups`] ran:
    /// workers run backup jobs with it and the API checks backup targets against it.
    pub backups: Option<Arc<workers::families::backup::Backups>>,
    /// The `[[limits]]` of this process's workers, with their shared state.
    pub limits: Option<Arc<jobs::limits::Limiter>>,
    /// The API's limits, authentication and hardening settings ([`serve_api`]).
    pub api_config: api::ApiConfig,
    /// The Redis broker's URL and prefix, where the API keeps its rate-limit buckets so that
    /// replicas share them; `None` on other brokers (buckets per process).
    rate_limit_redis: Option<(crate::config::Secret, String)>,
    /// The analytics, scoring and cache-warming families, once [`Stack::enable_families`]
    /// ran: workers run their jobs with it and the API serves cached read models through its
    /// cache.
    pub families: Option<Arc<workers::families::Families>>,
}

/// Whether a process may migrate the database itself (`drover dev`) or must find it migrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migrations {
    Apply,
    Require,
}

impl Stack {
    pub async fn connect(
        conn: &Connections,
        catalog: Catalog,
        migrations: Migrations,
    ) -> anyhow::Result<Self> {
        let db = schema::connect(conn.database_url.expose())
            .await
            .context("connecting to the database")?;
        match migrations {
            Migrations::Apply => schema::migrate(&db).await.context("migrating the database")?,
            Migrations::Require => schema::ensure_migrated(&db).await?,
        }
        let broker = jobs::broker::connect(
            conn.broker_url.expose(),
            BrokerOptions {
                prefix: conn.broker_prefix.clone(),
                db: db.clone(),
                amqp_queue_type: conn.amqp_queue_type,
            },
        )
        .await
        .context("connecting to the broker")?;
        let (history, history_task) = HistoryWriter::spawn(db.clone(), HistoryConfig::default());
        Ok(Self {
            db,
            broker,
            catalog: Arc::new(catalog),
            history,
            history_task,
            backups: None,
            limits: None,
            api_config: api::ApiConfig::default(),
            rate_limit_redis: is_redis(conn.broker_url.expose())
                .then(|| (conn.broker_url.clone(), conn.broker_prefix.clone())),
            families: None,
        })
    }

    /// Opens the store of the config file's `[[limits]]`: `limits_url`, else the broker's
    /// Redis, else this process (with a warning: the limits then hold per process).
    pub async fn enable_limits(
        &mut self,
        conn: &Connections,
        limits_url: Option<&str>,
    ) -> anyhow::Result<()> {
        let rules = config::file(conn)?.limits;
        if rules.is_empty() {
            return Ok(());
        }
        let broker = conn.broker_url.expose();
        let plain_redis = broker.starts_with("redis://") || broker.starts_with("rediss://");
        if limits_url.is_none() && broker.contains("+cluster://") {
            // The limits' scripts speak to one Redis node; a cluster connection is not built
            // for them yet, and limits silently held per process would not be limits.
            anyhow::bail!(
                "[[limits]] on Redis Cluster need DROVER_LIMITS_URL: a standalone Redis every worker reaches"
            );
        }
        let redis_url = limits_url.or_else(|| plain_redis.then_some(broker));
        let limiter = match redis_url {
            Some(url) => jobs::limits::Limiter::redis(rules, url, &conn.broker_prefix).await,
            None => {
                tracing::warn!(
                    "[[limits]] hold for this process only: set DROVER_LIMITS_URL to a Redis shared by every replica"
                );
                jobs::limits::Limiter::local(rules)
            }
        }
        .map_err(anyhow::Error::msg)?;
        self.limits = Some(Arc::new(limiter));
        Ok(())
    }

    /// Reads the backup configuration (`[backup]`, `DROVER_BACKUP_*`) and opens its store;
    /// a bad configuration stops the process here rather than failing backups later.
    pub fn enable_backups(&mut self, conn: &Connections, args: &BackupArgs) -> anyhow::Result<()> {
        let cfg = config::backup_config(conn, args)?;
        self.enable_backups_with(conn, cfg)
    }

    /// [`Stack::enable_backups`] with a configuration already read.
    pub fn enable_backups_with(
        &mut self,
        conn: &Connections,
        cfg: workers::families::backup::BackupConfig,
    ) -> anyhow::Result<()> {
        let effective = config::effective_config(conn, &config::catalog_config(conn)?, &cfg);
        // An attempt stops itself a minute (at most 5 %) before the kind's timeout would drop
        // it, so that an overrunning backup is still recorded as failed and notified.
        let timeout = self
            .catalog
            .get(jobs::families::backup::RUN)
            .map_or(Duration::from_secs(6 * 3600), |k| k.timeout);
        let margin = Duration::from_secs(60).min(timeout / 20);
        let backups = workers::families::backup::Backups::new(
            self.db.clone(),
            cfg,
            Some(conn.database_url.expose().to_owned()),
            effective,
        )
        .context("backup configuration")?
        .with_deadline(timeout - margin);
        self.backups = Some(Arc::new(backups));
        Ok(())
    }

    /// Reads `[analytics]`, `[scoring]`, `[cache]` and `DROVER_CACHE_URL`, and opens the
    /// read-model cache (lazily: an unreachable Redis fails cached reads, not the start).
    pub fn enable_families(&mut self, conn: &Connections, args: &config::FamilyArgs) -> anyhow::Result<()> {
        let (analytics, scoring, cache_cfg) = config::family_config(conn, args)?;
        let cache = match &cache_cfg.url {
            Some(url) => Some(
                jobs::cache::ReadCache::connect(url, &conn.broker_prefix, cache_cfg.settings())
                    .context("the cache URL")?,
            ),
            None => None,
        };
        self.families = Some(Arc::new(workers::families::Families::new(
            self.db.clone(),
            self.broker.clone(),
            self.catalog.clone(),
            cache,
            analytics,
            scoring,
            cache_cfg,
        )));
        Ok(())
    }

    /// Flushes the job history still in memory (bounded by `timeout`).
    pub async fn close(self, timeout: Duration) {
        let left = self.history_task.shutdown(timeout).await;
        if left > 0 {
            tracing::warn!(left, "job history not written before exit");
        }
    }
}

fn is_redis(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://")
}

/// Serves the HTTP API on an already bound listener until `shutdown` resolves, with
/// [`Stack::api_config`], rate-limit buckets in Redis when the broker is Redis, and the audit
/// log written to the database in batches.
pub async fn serve_api(
    stack: &Stack,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (audit, audit_task) = schema::audit::AuditWriter::spawn(stack.db.clone(), HistoryConfig::default());
    let mut state = api::AppState::new(
        stack.broker.clone(),
        stack.db.clone(),
        stack.catalog.clone(),
        api::install_metrics(),
    )
    .with_history(stack.history.clone())
    .with_audit(audit)
    .with_config(stack.api_config.clone());
    if let Some((url, prefix)) = &stack.rate_limit_redis {
        let limiter = api::RateLimiter::redis(url.expose(), prefix)
            .await
            .context("connecting to Redis for the rate limits")?;
        state = state.with_rate_limiter(limiter);
    }
    if let Some(b) = &stack.backups {
        state = state.with_backup_targets(b.targets());
    }
    if let Some(c) = stack.families.as_ref().and_then(|f| f.cache.clone()) {
        state = state.with_cache(c);
    }
    let served = api::serve(listener, state, shutdown)
        .await
        .context("serving the API");
    let left = audit_task.shutdown(Duration::from_secs(5)).await;
    if left > 0 {
        tracing::warn!(left, "audit log entries not written before exit");
    }
    served
}

pub fn bind(args: &ApiArgs) -> anyhow::Result<std::net::TcpListener> {
    bind_addr(&args.listen)
}

fn bind_addr(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Runs workers until `shutdown` resolves and running jobs have finished.
pub async fn run_workers(
    stack: &Stack,
    args: &WorkerArgs,
    mut deps: workers::Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if deps.backups.is_none() {
        deps.backups = stack.backups.clone();
    }
    deps.chaos_drills |= args.chaos_drills;
    if deps.families.is_none() {
        deps.families = stack.families.clone();
    }
    // Workers register their metric handles once, at start: the recorder must exist by then.
    api::install_metrics();
    workers::run(
        stack.broker.clone(),
        stack.catalog.clone(),
        Arc::new(workers::Registry::standard()),
        Arc::new(deps),
        Some(stack.history.clone()),
        workers::WorkerSettings {
            limits: stack.limits.clone(),
            presence: Some(stack.db.clone()),
            ..args.settings()?
        },
        shutdown,
    )
    .await
}

/// `drover worker`: runs workers until `shutdown` resolves and their jobs are done, with the
/// probe listener (when `health` names an address) up for the whole drain, so liveness holds
/// while jobs finish and readiness turns 503 as soon as the worker stops taking jobs.
pub async fn run_worker_process(
    stack: &Stack,
    args: &WorkerArgs,
    health: &WorkerHealthArgs,
    deps: workers::Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Some(addr) = &health.health_listen else {
        return run_workers(stack, args, deps, shutdown).await;
    };
    with_probes(stack, addr, None, shutdown, |stop| {
        run_workers(stack, args, deps, stop)
    })
    .await
}

/// Inserts the config file's default schedules that do not exist yet (never overwriting one an
/// operator edited or deleted). Fails on an invalid entry, so a process refuses to start on it.
pub async fn seed_schedules(
    stack: &Stack,
    defaults: &[jobs::schedule::ScheduleConfig],
) -> anyhow::Result<()> {
    workers::scheduler::seed(&stack.db, &stack.catalog, defaults)
        .await
        .context("creating the default schedules of the config file")
}

/// Fires schedules until `shutdown` resolves.
pub async fn run_scheduler(
    stack: &Stack,
    args: &SchedulerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The scheduler registers its metrics as it fires: the recorder must exist by then.
    api::install_metrics();
    workers::scheduler::run(
        stack.db.clone(),
        stack.broker.clone(),
        stack.catalog.clone(),
        Some(stack.history.clone()),
        args.settings(),
        shutdown,
    )
    .await
}

/// `drover scheduler`: [`run_scheduler`] with the probe listener when `health` names an
/// address (readiness: database and broker reachable).
pub async fn run_scheduler_process(
    stack: &Stack,
    args: &SchedulerArgs,
    health: &SchedulerHealthArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Some(addr) = &health.health_listen else {
        return run_scheduler(stack, args, shutdown).await;
    };
    let db = Some(stack.db.clone());
    with_probes(stack, addr, db, shutdown, |stop| run_scheduler(stack, args, stop)).await
}

/// Runs `run` with the probe listener on `addr` up until it returns: `/readyz` turns 503 as
/// soon as `shutdown` resolves (the process stops taking work), `/healthz` stays 200.
async fn with_probes<'a, F, Fut>(
    stack: &Stack,
    addr: &str,
    db: Option<DatabaseConnection>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(futures::future::BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + 'a,
{
    let listener = bind_addr(addr)?;
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let probes = tokio::spawn(crate::health::serve(
        listener,
        stack.broker.clone(),
        db,
        api::install_metrics(),
        draining,
        async move {
            let _ = done.await;
        },
    ));
    let res = run(Box::pin(async move {
        shutdown.await;
        let _ = draining_tx.send(true);
    }))
    .await;
    let _ = done_tx.send(());
    match probes.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "health endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "health endpoint task failed"),
    }
    res
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A shutdown signal that several tasks can wait on.
pub fn broadcast_shutdown() -> (
    tokio::sync::watch::Sender<bool>,
    impl Fn() -> futures::future::BoxFuture<'static, ()> + Clone,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }) as futures::future::BoxFuture<'static, ()>
    };
    (tx, wait)
}
