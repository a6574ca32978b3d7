//! The worker runtime: an apalis `Monitor` with one worker per queue.
//!
//! Each attempt runs inside [`AttemptService`], which owns everything the attempt's fate
//! depends on — the handler lookup, the hard timeout (the handler's future is dropped when it
//! passes, so the work really stops), panic capture, the retry decision and the history and
//! metrics — and returns an [`Outcome`] that the backend's settle layer hands to the broker.
//! Keeping the decision in one place is what makes retry semantics identical on every broker.

use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis::layers::WorkerBuilderExt;
use apalis_core::{error::BoxDynError, monitor::Monitor, task::Task, worker::builder::WorkerBuilder};
use futures::{FutureExt, future::BoxFuture};
use jobs::{
    Catalog, ConsumerConfig, Job, JobRef, Outcome, Producer, QueueBackend, QueueName,
    job::AttemptOutcome,
    job::now_ms,
    limits::Limiter,
    metrics::{
        JOB_DURATION_SECONDS, JOB_WAIT_SECONDS, JOBS_COMPLETED_TOTAL, WORKER_BUSY_SLOTS, WORKER_SLOTS,
    },
};
use schema::history::HistoryWriter;
use tracing::Instrument;

use crate::{
    handlers::{Deps, JobError, Registry},
    history,
};

/// How this process runs workers. Defaults are the production defaults.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub queues: Vec<QueueName>,
    /// Attempts running at once, per queue.
    pub concurrency: usize,
    /// Jobs fetched ahead of need, per queue.
    pub prefetch: usize,
    /// Visibility timeout: a job held by a worker that stops renewing comes back after this.
    pub lease: Duration,
    /// Crashes of its worker after which a job is quarantined in the dead set.
    pub quarantine_after: u32,
    /// How long running jobs may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Prefix of this process's worker names (unique names are derived from it).
    pub name: String,
    /// Attempts settled with the broker by this process's workers.
    pub settled: jobs::SettledCount,
    /// Rate and concurrency limits every attempt waits for before its handler starts.
    pub limits: Option<Arc<Limiter>>,
    /// Where this process records its heartbeat ([`crate::presence`]); `None` records none.
    pub presence: Option<sea_orm::DatabaseConnection>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            queues: jobs::queue::BUILTIN_QUEUES
                .iter()
                .map(|q| QueueName::parse(q).expect("valid"))
                .collect(),
            concurrency: 50,
            prefetch: 100,
            lease: Duration::from_secs(30),
            quarantine_after: jobs::broker::QUARANTINE_AFTER,
            shutdown_grace: Duration::from_secs(30),
            name: default_name(),
            settled: Default::default(),
            limits: None,
            presence: None,
        }
    }
}

fn default_name() -> String {
    format!("{}-{}", crate::presence::host_name(), std::process::id())
}

/// Runs workers for every configured queue until `shutdown` resolves, then stops fetching,
/// lets running attempts finish within the grace period, returns prefetched jobs to the broker
/// and flushes acknowledgements.
pub async fn run(
    broker: Arc<dyn Producer>,
    catalog: Arc<Catalog>,
    registry: Arc<Registry>,
    deps: Arc<Deps>,
    history: Option<HistoryWriter>,
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut monitor = Monitor::new().shutdown_timeout(settings.shutdown_grace);
    for queue in &settings.queues {
        let worker: Arc<str> = format!(
            "{}-{}-{}",
            settings.name,
            queue,
            &jobs::JobId::new().to_string()[24..]
        )
        .into();
        let cfg = ConsumerConfig {
            worker: worker.clone(),
            prefetch: settings.prefetch,
            lease: settings.lease,
            quarantine_after: settings.quarantine_after,
            settled: settings.settled.clone(),
            history: history.clone(),
            ..ConsumerConfig::default()
        };
        let driver = broker
            .driver(queue, &cfg)
            .await
            .map_err(|e| anyhow::anyhow!("starting a consumer on queue {queue}: {e}"))?;
        let service = AttemptService {
            catalog: catalog.clone(),
            registry: registry.clone(),
            deps: deps.clone(),
            history: history.clone(),
            worker: worker.clone(),
            metrics: Arc::new(QueueMetrics::new(
                queue,
                settings.concurrency.max(1),
                registry.kinds(),
            )),
            limits: settings.limits.clone().filter(|l| !l.is_empty()),
            quarantine_after: settings.quarantine_after.max(1),
        };
        let queue = queue.clone();
        let concurrency = settings.concurrency.max(1);
        monitor = monitor.register(move |_restart| {
            WorkerBuilder::new(&*worker)
                .backend(QueueBackend::new(queue.clone(), driver.clone(), cfg.clone()))
                .concurrency(concurrency)
                .build(service.clone())
        });
    }
    tracing::info!(queues = ?settings.queues, concurrency = settings.concurrency, "workers started");
    let presence = settings.presence.clone().map(|db| {
        crate::presence::Presence::spawn(
            db,
            crate::presence::WorkerInfo {
                // Unique per run, as the per-queue worker names are: two runs in one process
                // (tests, `drover dev` restarts) must not share a row.
                id: format!("{}-{}", settings.name, &jobs::JobId::new().to_string()[24..]),
                host: crate::presence::host_name(),
                queues: settings.queues.iter().map(ToString::to_string).collect(),
                concurrency: settings.concurrency.max(1),
            },
        )
    });
    let stopped = monitor
        .run_with_signal(async move {
            shutdown.await;
            tracing::info!("shutdown requested: finishing running jobs");
            Ok(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("worker monitor: {e}"));
    if let Some(presence) = presence {
        presence.stop().await;
    }
    stopped?;
    tracing::info!("workers stopped");
    Ok(())
}

/// Runs one attempt and decides its [`Outcome`].
#[derive(Clone)]
pub struct AttemptService {
    catalog: Arc<Catalog>,
    registry: Arc<Registry>,
    deps: Arc<Deps>,
    history: Option<HistoryWriter>,
    worker: Arc<str>,
    metrics: Arc<QueueMetrics>,
    limits: Option<Arc<Limiter>>,
    /// Crashes (worker deaths and panics) after which a job is quarantined.
    quarantine_after: u32,
}

/// One queue's metric handles, registered once: looking a metric up by its labels on every
/// attempt would allocate the label strings and hash them each time.
struct QueueMetrics {
    wait: metrics::Histogram,
    /// Attempts running: up when one starts, down when it ends (see [`BusySlot`]).
    busy: metrics::Gauge,
    kinds: HashMap<&'static str, KindMetrics>,
}

struct KindMetrics {
    duration: metrics::Histogram,
    succeeded: metrics::Counter,
    retried: metrics::Counter,
    dead: metrics::Counter,
}

impl KindMetrics {
    fn new(queue: &QueueName, kind: &str) -> Self {
        let (queue, kind) = (queue.to_string(), kind.to_owned());
        let completed = |outcome: &'static str| metrics::counter!(JOBS_COMPLETED_TOTAL, "queue" => queue.clone(), "kind" => kind.clone(), "outcome" => outcome);
        Self {
            duration: metrics::histogram!(JOB_DURATION_SECONDS, "queue" => queue.clone(), "kind" => kind.clone()),
            succeeded: completed("succeeded"),
            retried: completed("retried"),
            dead: completed("dead"),
        }
    }
}

impl QueueMetrics {
    fn new(queue: &QueueName, slots: usize, kinds: impl Iterator<Item = &'static str>) -> Self {
        metrics::gauge!(WORKER_SLOTS, "queue" => queue.to_string()).set(slots as f64);
        Self {
            wait: metrics::histogram!(JOB_WAIT_SECONDS, "queue" => queue.to_string()),
            busy: metrics::gauge!(WORKER_BUSY_SLOTS, "queue" => queue.to_string()),
            kinds: kinds.map(|k| (k, KindMetrics::new(queue, k))).collect(),
        }
    }

    fn record(&self, job: &Job, elapsed: Duration, outcome: &Outcome) {
        let fallback;
        let m = match self.kinds.get(&*job.kind) {
            Some(m) => m,
            // A kind this worker has no handler for: rare, so registered on the spot.
            None => {
                fallback = KindMetrics::new(&job.queue, &job.kind);
                &fallback
            }
        };
        m.duration.record(elapsed.as_secs_f64());
        match outcome {
            Outcome::Succeeded => &m.succeeded,
            Outcome::Retry { .. } => &m.retried,
            Outcome::Dead { .. } => &m.dead,
        }
        .increment(1);
    }
}

/// One running attempt in [`QueueMetrics::busy`]; dropping it (the attempt ended, or its
/// future was dropped at shutdown) frees the slot.
struct BusySlot<'a>(&'a metrics::Gauge);

impl<'a> BusySlot<'a> {
    fn take(gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for BusySlot<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl tower::Service<Task<JobRef>> for AttemptService {
    type Response = Outcome;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<Outcome, BoxDynError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<JobRef>) -> Self::Future {
        let this = self.clone();
        let job = task.args;
        let span = tracing::info_span!(
            "job",
            job.id = %job.id,
            job.kind = %job.kind,
            queue = %job.queue,
            attempt = job.attempt,
            // Workers that died running this job before; at `DROVER_QUARANTINE_AFTER` the
            // broker quarantines it instead of delivering it.
            crashes = job.crashes,
            // The trace of the request that enqueued the job: its log lines carry the same id.
            trace_id = jobs::trace::trace_id(job.trace_id.as_deref().unwrap_or("")),
        );
        if let Some(traceparent) = &job.trace_id {
            jobs::trace::set_parent(&span, traceparent);
        }
        Box::pin(async move { Ok(this.attempt(job).await) }.instrument(span))
    }
}

impl AttemptService {
    async fn attempt(&self, job: JobRef) -> Outcome {
        // Waiting for a limit is not part of the attempt: its timeout starts after.
        let permit = match &self.limits {
            Some(l) => Some(
                l.acquire(&job, self.timeout(&job) + Duration::from_secs(60))
                    .await,
            ),
            None => None,
        };
        let busy = BusySlot::take(&self.metrics.busy);
        let started = now_ms();
        if let Some(h) = &self.history {
            history::started(h, &job, &self.worker, started);
        }
        self.metrics.wait.record(
            (started
                - job
                    .run_at_ms
                    .unwrap_or(job.enqueued_at_ms)
                    .max(job.enqueued_at_ms))
            .max(0) as f64
                / 1e3,
        );
        let clock = std::time::Instant::now();
        let result = self.execute(&job).await;
        let elapsed = clock.elapsed();
        let outcome = self.decide(&job, result);
        let finished = now_ms();
        match &outcome {
            Outcome::Succeeded => tracing::debug!(elapsed_ms = elapsed.as_millis() as u64, "job succeeded"),
            Outcome::Retry { error, at_ms, .. } => {
                tracing::warn!(error = %error, retry_in_ms = at_ms - finished, "attempt failed; will retry")
            }
            Outcome::Dead { error, .. } => {
                tracing::error!(error = %error, "job failed for good: moved to the dead set")
            }
        }
        self.metrics.record(&job, elapsed, &outcome);
        drop(busy);
        if let Some(h) = &self.history {
            history::finished(h, &job, &self.worker, started, finished, &outcome);
        }
        if let Some(p) = permit {
            p.release().await;
        }
        outcome
    }

    fn timeout(&self, job: &Job) -> Duration {
        self.catalog
            .get(&job.kind)
            .map_or(Duration::from_secs(300), |k| k.timeout)
    }

    /// Runs the handler under the kind's timeout, with panics turned into failures.
    async fn execute(&self, job: &JobRef) -> Result<(), (AttemptOutcome, JobError)> {
        let Some(handler) = self.registry.get(&job.kind) else {
            return Err((
                AttemptOutcome::Failed,
                JobError::permanent(format!("no handler for kind {:?} in this worker", job.kind)),
            ));
        };
        let timeout = self.timeout(job);
        let run = AssertUnwindSafe(handler(job.clone(), self.deps.clone())).catch_unwind();
        match tokio::time::timeout(timeout, run).await {
            Err(_) => Err((
                AttemptOutcome::TimedOut,
                JobError::retryable(format!("timed out after {} ms", timeout.as_millis())),
            )),
            Ok(Err(panic)) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err((
                    AttemptOutcome::Panicked,
                    JobError::retryable(format!("panicked: {msg}")),
                ))
            }
            Ok(Ok(Err(e))) => Err((AttemptOutcome::Failed, e)),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    fn decide(&self, job: &Job, result: Result<(), (AttemptOutcome, JobError)>) -> Outcome {
        let (how, err) = match result {
            Ok(()) => return Outcome::Succeeded,
            Err(e) => e,
        };
        // A panic is a crash the worker survived: the broker counts it with the deaths
        // (`Job::crashes`), and the one that reaches `quarantine_after` quarantines the job
        // rather than spending its remaining attempts on a bug.
        if how == AttemptOutcome::Panicked {
            let crashes = job.crashes.saturating_add(1);
            if crashes >= self.quarantine_after {
                let error = jobs::job::panic_quarantine_error(crashes, &err.to_string());
                return Outcome::Dead { error, how };
            }
        }
        match err {
            JobError::Permanent(error) => Outcome::Dead { error, how },
            JobError::Retryable(error) => {
                let policy = self
                    .catalog
                    .get(&job.kind)
                    .map(|k| k.retry.clone())
                    .unwrap_or_default();
                match policy.delay_after(job.attempt, job.max_attempts) {
                    Some(delay) => Outcome::Retry {
                        at_ms: now_ms() + delay.as_millis() as i64,
                        error,
                        how,
                    },
                    None => Outcome::Dead { error, how },
                }
            }
        }
    }
}
