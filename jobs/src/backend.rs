//! The apalis backend every broker shares.
//!
//! A background fetcher leases jobs from the broker's [`Driver`] in batches into a bounded
//! in-memory buffer; `poll_next` hands them out one at a time. Finished attempts travel through
//! [`SettleLayer`] into a channel, unawaited, and one flusher turns whatever has arrived into
//! one broker call. A renewer extends the leases of held jobs. `poll_close` stops fetching,
//! gives back prefetched jobs that never started and flushes every pending settlement.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::{
    backend::{Backend, BackendConfig},
    error::BoxDynError,
    task::Task,
    worker::context::WorkerContext,
};
use futures::future::BoxFuture;
use schema::history::HistoryWriter;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tower::{Layer, Service};

use crate::{
    broker::{BrokerError, ConsumerConfig, Driver, HISTORY_WAIT},
    job::{AttemptOutcome, Job, JobId, Outcome, Settlement, now_ms},
    queue::QueueName,
};

/// What workers receive: the job envelope, shared so that settling needs no copy.
pub type JobRef = Arc<Job>;

/// How many finished attempts the broker has recorded — acknowledged, rescheduled or moved to
/// the dead set — since the process started. One atomic add per settled batch; waiters are
/// woken after each batch (the benchmark waits on it to know a drain is complete).
#[derive(Clone, Debug, Default)]
pub struct SettledCount(Arc<SettledInner>);

#[derive(Debug, Default)]
struct SettledInner {
    n: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl SettledCount {
    pub fn get(&self) -> u64 {
        self.0.n.load(std::sync::atomic::Ordering::Acquire)
    }

    fn add(&self, n: usize) {
        self.0.n.fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }

    /// Resolves once at least `n` attempts have been settled.
    pub async fn reached(&self, n: u64) {
        loop {
            let changed = self.0.changed.notified();
            if self.get() >= n {
                return;
            }
            changed.await;
        }
    }
}

/// Leased jobs not yet settled; their leases are renewed while they are here.
type Held = Arc<Mutex<HashSet<JobId, IdHash>>>;

/// Hashes a [`JobId`] by its last 64 bits, which in a UUIDv7 are random: the held set takes an
/// insert and a remove per job, and SipHash over all 16 bytes showed in the worker's profile.
#[derive(Clone, Copy, Default)]
struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `Uuid` hashes as its 16 bytes (one call); anything else folds in byte by byte.
        match <[u8; 16]>::try_from(bytes) {
            Ok(b) => self.0 ^= u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
            Err(_) => {
                for &b in bytes {
                    self.0 = self.0.rotate_left(8) ^ u64::from(b);
                }
            }
        }
    }
}

/// One worker's source of jobs on one queue.
pub struct QueueBackend {
    queue: QueueName,
    cfg: ConsumerConfig,
    driver: Arc<dyn Driver>,
    jobs: mpsc::Receiver<Job>,
    stop: watch::Sender<bool>,
    fetcher: Option<JoinHandle<()>>,
    renewer: Option<JoinHandle<()>>,
    settle_tx: Option<mpsc::UnboundedSender<Settlement>>,
    flusher: Option<JoinHandle<()>>,
    held: Held,
    closing: Option<BoxFuture<'static, Result<(), BrokerError>>>,
}

impl std::fmt::Debug for QueueBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBackend")
            .field("queue", &self.queue)
            .field("worker", &self.cfg.worker)
            .finish()
    }
}

impl QueueBackend {
    /// Starts fetching at once; must be called inside a tokio runtime. The driver's calls are
    /// timed and beat the worker's heartbeat ([`crate::metrics`]).
    pub fn new(queue: QueueName, driver: Arc<dyn Driver>, cfg: ConsumerConfig) -> Self {
        let driver = crate::metrics::TimedDriver::wrap(driver, &queue);
        let (tx, jobs) = mpsc::channel(cfg.prefetch.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let held: Held = Arc::default();
        let fetcher = tokio::spawn(fetch_loop(
            driver.clone(),
            tx,
            stop_rx.clone(),
            held.clone(),
            cfg.clone(),
        ));
        let renewer = tokio::spawn(renew_loop(
            driver.clone(),
            stop_rx.clone(),
            held.clone(),
            cfg.lease / 3,
        ));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let flusher = tokio::spawn(settle_loop(
            driver.clone(),
            settle_rx,
            stop_rx,
            held.clone(),
            cfg.settled.clone(),
            cfg.history.clone(),
        ));
        Self {
            queue,
            cfg,
            driver,
            jobs,
            stop,
            fetcher: Some(fetcher),
            renewer: Some(renewer),
            settle_tx: Some(settle_tx),
            flusher: Some(flusher),
            held,
            closing: None,
        }
    }

    pub fn queue(&self) -> &QueueName {
        &self.queue
    }

    fn close_future(&mut self) -> BoxFuture<'static, Result<(), BrokerError>> {
        let _ = self.stop.send(true);
        let fetcher = self.fetcher.take();
        let renewer = self.renewer.take();
        let flusher = self.flusher.take();
        drop(self.settle_tx.take());
        let driver = self.driver.clone();
        let held = self.held.clone();
        // The receiver is replaced so that jobs buffered after the fetcher stops can be drained.
        let (_, empty) = mpsc::channel(1);
        let mut jobs = std::mem::replace(&mut self.jobs, empty);
        Box::pin(async move {
            if let Some(f) = fetcher {
                let _ = f.await;
            }
            let mut unstarted = Vec::new();
            while let Ok(job) = jobs.try_recv() {
                unstarted.push(job);
            }
            if !unstarted.is_empty() {
                {
                    let mut held = held.lock().expect("held set poisoned");
                    for j in &unstarted {
                        held.remove(&j.id);
                    }
                }
                tracing::debug!(count = unstarted.len(), "releasing prefetched jobs");
                retry_forever("release", || driver.release(&unstarted), Duration::from_secs(10)).await?;
            }
            if let Some(f) = flusher {
                let _ = f.await;
            }
            if let Some(r) = renewer {
                let _ = r.await;
            }
            Ok(())
        })
    }
}

async fn fetch_loop(
    driver: Arc<dyn Driver>,
    tx: mpsc::Sender<Job>,
    mut stop: watch::Receiver<bool>,
    held: Held,
    cfg: ConsumerConfig,
) {
    let mut failures = 0u32;
    let refill_at = tx.max_capacity().div_ceil(2);
    loop {
        if *stop.borrow() {
            return;
        }
        // Wait until the buffer is half empty, so that a full buffer never leases jobs nobody
        // can start soon, and so that each fetch takes a batch: refilling one slot at a time
        // would cost a broker round trip per job.
        let permits = tokio::select! {
            p = tx.reserve_many(refill_at) => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let room = tx.capacity() + permits.len();
        drop(permits);
        match driver.fetch(room, cfg.block).await {
            Ok(batch) => {
                failures = 0;
                if batch.is_empty() {
                    continue;
                }
                held.lock()
                    .expect("held set poisoned")
                    .extend(batch.iter().map(|j| j.id));
                for job in batch {
                    // Capacity was reserved above and only this task sends.
                    if let Err(e) = tx.try_send(job) {
                        let job = match e {
                            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
                        };
                        held.lock().expect("held set poisoned").remove(&job.id);
                        let _ = driver.release(&[job]).await;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                let wait = backoff_delay(failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "fetching jobs failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

async fn renew_loop(driver: Arc<dyn Driver>, mut stop: watch::Receiver<bool>, held: Held, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        // Stop is only signalled from `poll_close`, after every running attempt has finished,
        // so nothing still needs its lease; a dropped backend stops the renewer too.
        tokio::select! {
            _ = tick.tick() => {}
            res = stop.changed() => if res.is_err() || *stop.borrow() { return },
        }
        let ids: Vec<JobId> = held.lock().expect("held set poisoned").iter().copied().collect();
        if !ids.is_empty()
            && let Err(e) = driver.renew(&ids).await
        {
            tracing::warn!(error = %e, held = ids.len(), "renewing leases failed");
        }
    }
}

/// Most settlements taken into one batch: while a batch waits for the history, the next one
/// accumulates, so a busy worker's batches are as large as its rate × the history's cadence.
const SETTLE_BATCH: usize = 16_384;
/// Most settlements per broker call (one script's arguments stay within Lua's limits).
const SETTLE_CHUNK: usize = 1024;

async fn settle_loop(
    driver: Arc<dyn Driver>,
    mut rx: mpsc::UnboundedReceiver<Settlement>,
    mut stop: watch::Receiver<bool>,
    held: Held,
    settled: SettledCount,
    history: Option<HistoryWriter>,
) {
    let mut buf = Vec::with_capacity(SETTLE_CHUNK);
    loop {
        // `stop` comes from `poll_close`, which apalis calls only after every running attempt
        // has finished and sent its settlement: what is in the channel then is the last of it.
        // (The senders themselves live in the worker's service until after the close.)
        let closing = tokio::select! {
            n = rx.recv_many(&mut buf, SETTLE_BATCH) => n == 0,
            res = stop.changed() => {
                if res.is_ok() && !*stop.borrow() { continue }
                while let Ok(s) = rx.try_recv() {
                    buf.push(s);
                }
                true
            }
        };
        if !buf.is_empty() {
            let batch = std::mem::take(&mut buf);
            // The attempts' history first (see `ConsumerConfig::history`); settlements keep
            // arriving meanwhile and make the next batch.
            if let Some(h) = &history {
                let _ = tokio::time::timeout(HISTORY_WAIT, h.written()).await;
            }
            for chunk in batch.chunks(SETTLE_CHUNK) {
                // A settlement is never dropped: a lost ack would rerun the job, a lost retry
                // or dead-set move would lose the job's fate. Keep trying.
                if retry_forever(
                    "settle",
                    || driver.settle(chunk),
                    Duration::from_secs(u64::MAX / 4),
                )
                .await
                .is_ok()
                {
                    {
                        let mut held = held.lock().expect("held set poisoned");
                        for s in chunk {
                            held.remove(&s.job.id);
                        }
                    }
                    settled.add(chunk.len());
                }
            }
        }
        if closing {
            return;
        }
    }
}

fn backoff_delay(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(7)).min(5_000))
}

async fn retry_forever<F, Fut>(what: &str, mut f: F, give_up_after: Duration) -> Result<(), BrokerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let start = tokio::time::Instant::now();
    let mut failures = 0;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() < give_up_after => {
                failures += 1;
                let wait = backoff_delay(failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} failed");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Backend for QueueBackend {
    type Task = Task<JobRef>;
    type Error = BrokerError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        if self.closing.is_some() {
            return Poll::Ready(None);
        }
        match self.jobs.poll_recv(cx) {
            Poll::Ready(Some(job)) => Poll::Ready(Some(Ok(Task::new(Arc::new(job))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        if self.closing.is_none() {
            self.closing = Some(self.close_future());
        }
        self.closing.as_mut().expect("set above").as_mut().poll(cx)
    }
}

impl BackendConfig for QueueBackend {
    type Args = JobRef;
    type Id = JobId;
    type Kind = apalis_core::backend::finalize::Ephemeral;
    type Config = ConsumerConfig;
    type Layer = SettleLayer;

    fn config(&self) -> &Self::Config {
        &self.cfg
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        SettleLayer {
            tx: self
                .settle_tx
                .clone()
                .expect("middleware is taken before the backend closes"),
            worker: self.cfg.worker.clone(),
        }
    }
}

/// Reports every finished attempt to the broker. The worker runtime's layers below decide the
/// [`Outcome`]; an error that still reaches this layer (a bug, or a layer outside drover's
/// control) is retried after a second, or dead on the last attempt.
#[derive(Clone)]
pub struct SettleLayer {
    tx: mpsc::UnboundedSender<Settlement>,
    worker: Arc<str>,
}

impl<S> Layer<S> for SettleLayer {
    type Service = SettleService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SettleService {
            inner,
            tx: self.tx.clone(),
            worker: self.worker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct SettleService<S> {
    inner: S,
    tx: mpsc::UnboundedSender<Settlement>,
    worker: Arc<str>,
}

impl<S> Service<Task<JobRef>> for SettleService<S>
where
    S: Service<Task<JobRef>, Response = Outcome>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<JobRef>) -> Self::Future {
        let job = task.args.clone();
        let tx = self.tx.clone();
        let worker = self.worker.clone();
        let started_at_ms = now_ms();
        let fut = self.inner.call(task);
        Box::pin(async move {
            let outcome = match fut.await {
                Ok(outcome) => outcome,
                Err(e) => {
                    let error = e.into().to_string();
                    if job.attempt >= job.max_attempts {
                        Outcome::Dead {
                            error,
                            how: AttemptOutcome::Failed,
                        }
                    } else {
                        Outcome::Retry {
                            at_ms: now_ms() + 1_000,
                            error,
                            how: AttemptOutcome::Failed,
                        }
                    }
                }
            };
            let settlement = Settlement {
                job,
                outcome: outcome.clone(),
                worker,
                started_at_ms,
                finished_at_ms: now_ms(),
            };
            // Only fails once the backend has closed, after every attempt was awaited.
            let _ = tx.send(settlement);
            Ok(outcome)
        })
    }
}
