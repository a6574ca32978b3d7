//! The background writer that turns many small `record` calls into few batched writes.
//!
//! Recording must never slow a job (or a request) down or fail it, so [`BatchWriter::record`]
//! only tries to queue the event: when the queue is full it drops the event and counts it. One
//! task per process drains the queue into [`BatchSink::write`] (job history: [`apply_batch`]; the
//! API's audit log: `crate::audit`). While the database is unreachable that task keeps its
//! current batch and retries with backoff; new events wait in the queue until it is full.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::{HistoryEvent, apply_batch};
use crate::DbError;

/// Events a [`BatchWriter`] can write: how a batch of them becomes rows, and what to call them
/// in log lines.
pub trait BatchSink: Send + Sync + 'static + Sized {
    /// What the events are, for log lines: `job history`, `audit log`.
    const WHAT: &'static str;
    /// The `writer` label of its metrics ([`HISTORY_LAG_EVENTS`]): `history`, `audit`.
    const LABEL: &'static str;
    fn write(db: &DatabaseConnection, batch: &[Self]) -> impl Future<Output = Result<(), DbError>> + Send;
}

impl BatchSink for HistoryEvent {
    const WHAT: &'static str = "job history";
    const LABEL: &'static str = "history";
    fn write(db: &DatabaseConnection, batch: &[Self]) -> impl Future<Output = Result<(), DbError>> + Send {
        apply_batch(db, batch)
    }
}

/// Gauge `{writer}`: events recorded but not written to the database yet (queued, or in the
/// batch being written), as of the last scrape.
pub const HISTORY_LAG_EVENTS: &str = "drover_history_lag_events";
/// Gauge `{writer}`: age in seconds of the oldest event the writer holds unwritten (0 when it
/// holds none), as of the last scrape: how far the database is behind.
pub const HISTORY_LAG_SECONDS: &str = "drover_history_lag_seconds";
/// Counter `{writer}`: events dropped because the writer's queue was full (the database was
/// away too long) or the writer had shut down.
pub const HISTORY_DROPPED_EVENTS_TOTAL: &str = "drover_history_dropped_events_total";

/// Every writer of the process, for [`publish_metrics`]; entries of stopped writers are pruned
/// there.
static WRITERS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Sets the writers' lag gauges from their current state. Called by `/metrics` before
/// rendering, so recording an event costs nothing extra and the ages are current.
pub fn publish_metrics() {
    let mut writers = WRITERS.lock().expect("writer list poisoned");
    writers.retain(|w| w.strong_count() > 0);
    // Writers of one kind in one process (rare: tests) are summed, their ages maxed.
    let mut by_label: Vec<(&'static str, usize, f64, u64)> = Vec::new();
    for shared in writers.iter().filter_map(Weak::upgrade) {
        let (events, age, dropped) = (shared.lag(), shared.oldest_age().as_secs_f64(), shared.dropped());
        match by_label.iter_mut().find(|(l, ..)| *l == shared.label) {
            Some(entry) => {
                entry.1 += events;
                entry.2 = entry.2.max(age);
                entry.3 += dropped;
            }
            None => by_label.push((shared.label, events, age, dropped)),
        }
    }
    drop(writers);
    for (label, events, age, dropped) in by_label {
        metrics::gauge!(HISTORY_LAG_EVENTS, "writer" => label).set(events as f64);
        metrics::gauge!(HISTORY_LAG_SECONDS, "writer" => label).set(age);
        metrics::counter!(HISTORY_DROPPED_EVENTS_TOTAL, "writer" => label).absolute(dropped);
    }
}

/// The job history's writer (workers and the API record [`HistoryEvent`]s with it).
pub type HistoryWriter = BatchWriter<HistoryEvent>;
/// The job history writer's task.
pub type HistoryTask = BatchTask<HistoryEvent>;

/// Tuning for a [`BatchWriter`]; the defaults suit a worker process's job history.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// Events queued before `record` starts dropping them. Default 65 536, about a minute of
    /// a busy worker's events, held in memory while the database is away.
    pub capacity: usize,
    /// Most events written per transaction. Default 8192. A quiet process writes what it has
    /// every `flush_interval`; a busy or catching-up one fills batches this big, which costs far
    /// less per event than small ones (the commit, and on SQLite the WAL checkpoint, are paid per
    /// transaction, and a job that starts and finishes within one batch is written once).
    pub max_batch: usize,
    /// Longest an event waits for its batch to fill before being written. Default 50 ms.
    pub flush_interval: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            capacity: 65_536,
            max_batch: 8192,
            flush_interval: Duration::from_millis(50),
        }
    }
}

/// First wait after a failed write; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one "dropping events" warning per this long, however many are dropped.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

enum Command<T> {
    Record(T),
    /// Write everything received so far, then answer.
    Flush(oneshot::Sender<()>),
    /// Answer once everything received so far is written (which the writer then does at once,
    /// with whatever else is queued), or at once when a write fails.
    Written(oneshot::Sender<()>),
}

/// A cheap, cloneable handle for recording events. See the module docs.
#[derive(Debug)]
pub struct BatchWriter<T> {
    tx: mpsc::Sender<Command<T>>,
    shared: Arc<Shared>,
}

impl<T> Clone for BatchWriter<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Owns the background task; call [`BatchTask::shutdown`] when the process stops.
#[derive(Debug)]
pub struct BatchTask<T> {
    stop: oneshot::Sender<Instant>,
    handle: JoinHandle<usize>,
    shared: Arc<Shared>,
    events: std::marker::PhantomData<fn(T)>,
}

struct Shared {
    dropped: AtomicU64,
    /// Set while writes fail (the database is away), cleared by the next write that succeeds.
    failing: AtomicBool,
    /// Events the task holds but has not written yet.
    unflushed: AtomicUsize,
    /// Milliseconds after `started` before which no drop warning is logged.
    quiet_until_ms: AtomicU64,
    /// Milliseconds after `started`, plus one, at which the oldest event of the task's current
    /// batch arrived; 0 while the batch is empty. The channel is FIFO and drained before
    /// anything newer is taken, so this is the oldest unwritten event, give or take the moment
    /// it spent queued.
    oldest_ms: AtomicU64,
    /// Events sent to the task and not yet received by it (the channel's fill).
    queued: Box<dyn Fn() -> usize + Send + Sync>,
    started: Instant,
    what: &'static str,
    label: &'static str,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl<T: BatchSink> BatchWriter<T> {
    /// Starts the background task on the current tokio runtime.
    pub fn spawn(db: DatabaseConnection, cfg: HistoryConfig) -> (BatchWriter<T>, BatchTask<T>) {
        let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
        let (stop, stop_rx) = oneshot::channel();
        // A weak sender: it measures the queue without keeping the task alive.
        let probe = tx.downgrade();
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            unflushed: AtomicUsize::new(0),
            quiet_until_ms: AtomicU64::new(0),
            oldest_ms: AtomicU64::new(0),
            queued: Box::new(move || probe.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity())),
            started: Instant::now(),
            what: T::WHAT,
            label: T::LABEL,
        });
        {
            let mut writers = WRITERS.lock().expect("writer list poisoned");
            writers.retain(|w| w.strong_count() > 0);
            writers.push(Arc::downgrade(&shared));
        }
        let flusher = Flusher {
            db,
            rx,
            buffer: Vec::new(),
            waiting: Vec::new(),
            max_batch: cfg.max_batch.max(1),
            stop: Some(stop_rx),
            deadline: None,
            shared: shared.clone(),
        };
        let handle = tokio::spawn(flusher.run(cfg.flush_interval));
        let task = BatchTask {
            stop,
            handle,
            shared: shared.clone(),
            events: std::marker::PhantomData,
        };
        (BatchWriter { tx, shared }, task)
    }

    /// Queues an event without waiting. If the queue is full (the database has been away for
    /// a while) or the writer has shut down, the event is dropped and counted in
    /// [`dropped`](Self::dropped).
    pub fn record(&self, event: T) {
        if let Err(error) = self.tx.try_send(Command::Record(event)) {
            let total = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let reason = match error {
                mpsc::error::TrySendError::Full(_) => "the queue is full",
                mpsc::error::TrySendError::Closed(_) => "the writer has shut down",
            };
            self.shared.warn_dropped(reason, total);
        }
    }

    /// Events dropped since the writer started.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Events recorded but not written yet.
    pub fn lag(&self) -> usize {
        self.shared.lag()
    }

    /// Resolves once every event recorded before this call is in the database: the writer
    /// writes what it holds as soon as it has taken what is queued, so this takes about one
    /// write while the database answers. Resolves
    /// at once while writes are failing, when the queue is full, or after shutdown: callers use
    /// it to order their own work after the history's (a worker acknowledges attempts only once
    /// their events are stored, so a crash between the two cannot lose the history of a job the
    /// broker has forgotten), never to wait for a database that is away.
    pub async fn written(&self) {
        if self.shared.failing.load(Ordering::Relaxed) {
            return;
        }
        let (done, written) = oneshot::channel();
        if self.tx.try_send(Command::Written(done)).is_ok() {
            let _ = written.await;
        }
    }

    /// Whether the last write failed (the database is away or refusing the batch).
    pub fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed)
    }

    /// Waits until every event recorded before this call is written (for as long as that takes
    /// if the database is away). Returns at once if the writer has shut down.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Command::Flush(done)).await.is_ok() {
            // An error means the task gave up at shutdown: nothing more to wait for.
            let _ = written.await;
        }
    }
}

impl<T> BatchTask<T> {
    /// Stops taking events, writes what remains (retrying until `timeout`), and returns how
    /// many events could not be written.
    pub async fn shutdown(self, timeout: Duration) -> usize {
        // Fails only if the task already ended, which `handle` reports below.
        let _ = self.stop.send(Instant::now() + timeout);
        match self.handle.await {
            Ok(unwritten) => unwritten,
            Err(error) => {
                tracing::error!(error = %error, what = self.shared.what, "batch writer task failed");
                self.shared.unflushed.load(Ordering::Relaxed)
            }
        }
    }
}

impl Shared {
    fn lag(&self) -> usize {
        (self.queued)() + self.unflushed.load(Ordering::Relaxed)
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn oldest_age(&self) -> Duration {
        match self.oldest_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(at - 1)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn warn_dropped(&self, reason: &'static str, total: u64) {
        let now = self.now_ms();
        let quiet_until = self.quiet_until_ms.load(Ordering::Relaxed);
        let next = now.saturating_add(DROP_WARNING_EVERY.as_secs() * 1000);
        // Whoever wins the exchange warns; everyone else within the window stays quiet.
        if now >= quiet_until
            && self
                .quiet_until_ms
                .compare_exchange(quiet_until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(reason, dropped_total = total, what = self.what, "dropping events");
        }
    }
}

/// The background task's state.
struct Flusher<T> {
    db: DatabaseConnection,
    rx: mpsc::Receiver<Command<T>>,
    buffer: Vec<T>,
    /// `written()` callers waiting for the buffer to be written.
    waiting: Vec<oneshot::Sender<()>>,
    max_batch: usize,
    /// Fires with the shutdown deadline; `None` once received or once the `BatchTask` is gone.
    stop: Option<oneshot::Receiver<Instant>>,
    /// Set by shutdown: give up writing after this.
    deadline: Option<Instant>,
    shared: Arc<Shared>,
}

impl<T: BatchSink> Flusher<T> {
    async fn run(mut self, flush_interval: Duration) -> usize {
        let mut tick = tokio::time::interval(flush_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while self.deadline.is_none() {
            tokio::select! {
                deadline = stop_signal(&mut self.stop) => self.deadline = Some(deadline),
                command = self.rx.recv() => match command {
                    Some(command) => {
                        if self.handle(command).await {
                            self.handle_queued().await;
                        }
                        // Someone waits on this buffer (a worker's acknowledgements): write it
                        // now, with everything queued so far, rather than at the next tick. On
                        // RabbitMQ unacknowledged deliveries hold the consumer's prefetch
                        // window, so a tick's wait capped a worker at window / interval
                        // (150 / 50 ms = 3,000 jobs/s); batches still grow with the load,
                        // as events keep queueing while a write runs.
                        if !self.waiting.is_empty() {
                            self.write().await;
                        }
                    }
                    // Every `BatchWriter` is gone: write what is left, however long it takes.
                    None => break,
                },
                _ = tick.tick() => {
                    self.write().await;
                }
            }
        }
        self.drain().await
    }

    /// Handles what is already queued, up to a batch, without going back to `select!` for each
    /// event: under load, events arrive far faster than the other branches need looking at.
    async fn handle_queued(&mut self) {
        for _ in 0..self.max_batch {
            let Ok(command) = self.rx.try_recv() else {
                return;
            };
            if !self.handle(command).await {
                return;
            }
        }
    }

    /// Returns false once the shutdown deadline has passed with events unwritten.
    async fn handle(&mut self, command: Command<T>) -> bool {
        match command {
            Command::Record(event) => {
                if self.buffer.is_empty() {
                    let now = self.shared.now_ms();
                    self.shared.oldest_ms.store(now + 1, Ordering::Relaxed);
                }
                self.buffer.push(event);
                self.shared.unflushed.store(self.buffer.len(), Ordering::Relaxed);
                self.buffer.len() < self.max_batch || self.write().await
            }
            Command::Flush(done) => {
                let written = self.write().await;
                // The caller may have stopped waiting; nothing to do then.
                let _ = done.send(());
                written
            }
            Command::Written(done) => {
                if self.buffer.is_empty() {
                    let _ = done.send(());
                } else {
                    self.waiting.push(done);
                }
                true
            }
        }
    }

    /// Answers every `written()` caller (the buffer was written, or a write failed).
    fn release_waiting(&mut self) {
        for done in self.waiting.drain(..) {
            let _ = done.send(());
        }
    }

    /// Writes the buffer, retrying with backoff until it succeeds or the shutdown deadline
    /// passes. Returns whether the buffer is now empty.
    async fn write(&mut self) -> bool {
        let mut backoff = MIN_BACKOFF;
        while !self.buffer.is_empty() {
            let result = tokio::select! {
                result = T::write(&self.db, &self.buffer) => result,
                () = deadline_passed(&mut self.stop, &mut self.deadline) => return false,
            };
            match result {
                Ok(()) => {
                    self.buffer.clear();
                    self.shared.unflushed.store(0, Ordering::Relaxed);
                    self.shared.oldest_ms.store(0, Ordering::Relaxed);
                    self.shared.failing.store(false, Ordering::Relaxed);
                    self.release_waiting();
                }
                Err(error) => {
                    self.shared.failing.store(true, Ordering::Relaxed);
                    self.release_waiting();
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        events = self.buffer.len(),
                        retry_in = ?backoff,
                        what = T::WHAT,
                        "writing a batch failed; keeping it"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = deadline_passed(&mut self.stop, &mut self.deadline) => return false,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        true
    }

    /// Takes no more events and writes the ones already queued; returns how many it could not.
    async fn drain(mut self) -> usize {
        self.rx.close();
        self.release_waiting();
        while let Some(command) = self.rx.recv().await {
            if !self.handle(command).await {
                return self.abandon().await;
            }
        }
        if self.write().await {
            0
        } else {
            self.abandon().await
        }
    }

    async fn abandon(mut self) -> usize {
        let mut unwritten = self.buffer.len();
        while let Some(command) = self.rx.recv().await {
            if let Command::Record(_) = command {
                unwritten += 1;
            }
        }
        tracing::warn!(
            unwritten,
            what = T::WHAT,
            "batch writer stopped with events unwritten"
        );
        unwritten
    }
}

/// Resolves with the shutdown deadline; never, if the `BatchTask` was dropped without one.
async fn stop_signal(stop: &mut Option<oneshot::Receiver<Instant>>) -> Instant {
    if let Some(rx) = stop {
        let signal = rx.await;
        *stop = None;
        if let Ok(deadline) = signal {
            return deadline;
        }
    }
    std::future::pending().await
}

/// Resolves once the shutdown deadline has passed, taking it from `stop` when it arrives.
async fn deadline_passed(stop: &mut Option<oneshot::Receiver<Instant>>, deadline: &mut Option<Instant>) {
    let at = match *deadline {
        Some(at) => at,
        None => *deadline.insert(stop_signal(stop).await),
    };
    tokio::time::sleep_until(at).await;
}
