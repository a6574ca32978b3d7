//! The cron scheduler: fires the schedules stored in the database by enqueuing each tick's job.
//!
//! Any number of replicas may run it (`drover scheduler`, `drover dev`); each tick still fires
//! once. There is no leader: every replica reads the schedules, and for a due one plans the
//! ticks to fire (`jobs::schedule::CronSchedule::plan`), then claims them with a
//! compare-and-set on the schedule's version in the transaction that records one row per tick
//! with its job (`schema::schedules::claim`). Only the replica whose claim applied pushes the
//! jobs. A tick row stays "not enqueued" until a broker has accepted its job, under a lease: the
//! holder retries a failed push every round, and once the lease runs out (the holder died
//! between claim and push) any replica takes the row over and pushes the same job — same id,
//! same idempotency key `schedule:{name}:{tick}`, which the Redis and SQLite brokers use to
//! answer a repeated push with the first job rather than a second one.
//!
//! apalis-cron's `CronScheduler` is not used to drive this: it is a per-process tick stream
//! with no shared state, so N replicas would fire every tick N times. The expressions are read
//! by the same `cron` crate it is built on.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use jobs::{
    Catalog, Job, Producer,
    schedule::{CronSchedule, JobTemplate, MissedTicks, ScheduleConfig},
};
use schema::{
    entity::{schedule, schedule_tick},
    history::{HistoryEvent, HistoryWriter},
    schedules::{self, Claim, NewTick, Origin, ScheduleWrite},
};
use sea_orm::DatabaseConnection;
use tracing::Instrument;

pub use jobs::metrics::{SCHEDULE_MISSED_TICKS_TOTAL, SCHEDULE_TICK_DELAY_SECONDS, SCHEDULE_TICKS_TOTAL};

/// Ticks one schedule fires in one round at most; the rest stay due for the next round.
const MAX_FIRES_PER_ROUND: usize = 100;
/// Not-enqueued ticks retried or taken over per round.
const RECOVERY_BATCH: u64 = 100;
/// How long one push may take before the tick is left for the next round.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often enqueued ticks past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// How the scheduler runs. The defaults are the production defaults.
#[derive(Clone, Debug)]
pub struct SchedulerSettings {
    /// Longest sleep between two looks at the schedules: edits through the API take effect
    /// within this. Due ticks wake the scheduler at their time regardless.
    pub poll: Duration,
    /// Ticks up to this late still fire; older ones are missed and follow the schedule's policy.
    pub misfire_grace: Duration,
    /// How long a claimed tick waits for its replica to enqueue it before another replica does.
    pub lease: Duration,
    /// Enqueued ticks are kept this long (shown by `GET /v1/schedules/{name}`), then deleted.
    pub tick_retention: Duration,
    /// This replica's name: unique per process.
    pub replica: String,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into());
        Self {
            poll: Duration::from_secs(1),
            misfire_grace: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            tick_retention: Duration::from_secs(7 * 24 * 3600),
            replica: format!(
                "{host}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }
}

/// Inserts the config file's `[[schedules]]` that do not exist yet (never overwriting a
/// schedule an operator edited or deleted through the API). Fails on an invalid entry, naming
/// it and each bad field. Every replica runs it at start; concurrent runs insert each once.
pub async fn seed(
    db: &DatabaseConnection,
    catalog: &Catalog,
    defaults: &[ScheduleConfig],
) -> anyhow::Result<()> {
    let mut valid = Vec::with_capacity(defaults.len());
    let mut seen = std::collections::HashSet::new();
    for d in defaults {
        if !seen.insert(d.name.as_str()) {
            anyhow::bail!("schedule {:?} is defined twice in the config file", d.name);
        }
        valid.push((d, d.validate(catalog).map_err(anyhow::Error::msg)?));
    }
    let now = Utc::now();
    for (d, cron) in valid {
        let write = ScheduleWrite {
            name: d.name.clone(),
            cron: d.cron.trim().to_owned(),
            timezone: cron.timezone().name().to_owned(),
            kind: d.job.kind.clone(),
            payload: d.job.payload.clone(),
            queue: d.job.queue.clone(),
            priority: d.job.priority,
            enabled: d.enabled,
            missed_ticks: d.missed_ticks.as_str().to_owned(),
            origin: Origin::Config,
        };
        let inserted = schedules::insert_if_absent(db, &write, cron.next_after(now), now)
            .await
            .with_context(|| format!("inserting the default schedule {:?}", d.name))?;
        if inserted {
            tracing::info!(schedule = %d.name, cron = %d.cron, "default schedule created from the config file");
        } else {
            tracing::debug!(schedule = %d.name, "default schedule exists already; left as it is");
        }
    }
    Ok(())
}

/// Runs the scheduler until `shutdown` resolves. A round in progress (claims and their pushes)
/// finishes first; a tick claimed but not enqueued is left to the other replicas, or to this
/// one's next start, through its lease.
pub async fn run(
    db: DatabaseConnection,
    broker: Arc<dyn Producer>,
    catalog: Arc<Catalog>,
    history: Option<HistoryWriter>,
    settings: SchedulerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    describe_metrics();
    let mut scheduler = Scheduler {
        db,
        broker,
        catalog,
        history,
        settings,
        last_prune: None,
    };
    tracing::info!(
        replica = %scheduler.settings.replica,
        poll_ms = scheduler.settings.poll.as_millis() as u64,
        misfire_grace_s = scheduler.settings.misfire_grace.as_secs(),
        lease_s = scheduler.settings.lease.as_secs(),
        "scheduler started"
    );
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    loop {
        let wake = match scheduler.round().await {
            Ok(wake) => {
                failures = 0;
                wake
            }
            Err(error) => {
                failures += 1;
                // 0.5 s, 1 s, 2 s … up to 30 s: a database outage must not become a busy loop.
                let delay =
                    Duration::from_millis(500 * 2u64.pow(failures.min(6) - 1)).min(Duration::from_secs(30));
                tracing::warn!(
                    error = format!("{error:#}"),
                    retry_in_ms = delay.as_millis() as u64,
                    "scheduler round failed"
                );
                Instant::now() + delay
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    tracing::info!(replica = %scheduler.settings.replica, "scheduler stopped");
    Ok(())
}

fn describe_metrics() {
    metrics::describe_counter!(SCHEDULE_TICKS_TOTAL, "Schedule ticks whose job a broker accepted");
    metrics::describe_counter!(
        SCHEDULE_MISSED_TICKS_TOTAL,
        "Schedule ticks older than the misfire grace when a scheduler got to them"
    );
    metrics::describe_histogram!(
        SCHEDULE_TICK_DELAY_SECONDS,
        metrics::Unit::Seconds,
        "Time from a schedule tick to its job's acceptance by the broker"
    );
}

struct Scheduler {
    db: DatabaseConnection,
    broker: Arc<dyn Producer>,
    catalog: Arc<Catalog>,
    history: Option<HistoryWriter>,
    settings: SchedulerSettings,
    last_prune: Option<Instant>,
}

impl Scheduler {
    /// One look at every schedule: fire what is due, retry or take over ticks not enqueued yet,
    /// prune old ticks. Returns when to look again.
    async fn round(&mut self) -> anyhow::Result<Instant> {
        let active = schedules::active(&self.db)
            .await
            .context("reading the schedules")?;
        let now = Utc::now();
        let mut wake_at: DateTime<Utc> = now + self.settings.poll;
        for s in &active {
            let Some(due) = s.next_tick else { continue };
            let cron = match CronSchedule::read(&s.cron, Some(&s.timezone)) {
                Ok(cron) => cron,
                Err(error) => {
                    // Only a row written around the API could hold this.
                    tracing::error!(schedule = %s.name, %error, "schedule has an invalid expression; not fired");
                    continue;
                }
            };
            if due > now {
                wake_at = wake_at.min(due);
                continue;
            }
            if let Some(next) = self.fire(s, &cron, due, now).await? {
                wake_at = wake_at.min(next);
            }
        }
        self.enqueue_unenqueued(now).await?;
        if self.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            self.last_prune = Some(Instant::now());
            let before = now - self.settings.tick_retention;
            match schedules::prune_ticks(&self.db, before).await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(deleted, "pruned old schedule ticks"),
                Err(error) => tracing::warn!(%error, "pruning old schedule ticks failed"),
            }
        }
        let wait = (wake_at - Utc::now()).to_std().unwrap_or_default();
        Ok(Instant::now() + wait)
    }

    /// Claims and enqueues the due ticks of one schedule. Returns when it is next due as far
    /// as this replica knows (`None`: never again).
    async fn fire(
        &self,
        s: &schedule::Model,
        cron: &CronSchedule,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Option<DateTime<Utc>>> {
        let policy: MissedTicks = s.missed_ticks.parse().unwrap_or_default();
        let plan = cron.plan(due, now, self.settings.misfire_grace, policy, MAX_FIRES_PER_ROUND);
        let template = JobTemplate {
            kind: s.kind.clone(),
            payload: s.payload.clone(),
            queue: s.queue.clone(),
            priority: s.priority,
        };
        let now_ms = now.timestamp_millis();
        let mut ticks = Vec::with_capacity(plan.fire.len());
        let mut invalid = None;
        for t in &plan.fire {
            match template.to_job(&self.catalog, &s.name, t.at, now_ms) {
                Ok(mut job) => {
                    job.trace_id = Some(new_traceparent());
                    ticks.push(NewTick {
                        tick_at: t.at,
                        job_id: job.id.0,
                        envelope: serde_json::to_string(&job).context("encoding a job envelope")?,
                        stands_for: i64::try_from(t.stands_for).unwrap_or(i64::MAX),
                    });
                }
                Err(errors) => {
                    invalid = Some(
                        errors
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                    );
                    break;
                }
            }
        }
        if invalid.is_some() {
            // The catalog of this build no longer accepts the template (a kind was removed):
            // the ticks pass unfired, but the schedule moves on rather than retrying forever.
            ticks.clear();
        }
        let lease_until = now + self.settings.lease;
        let claimed = schedules::claim(
            &self.db,
            Claim {
                schedule: &s.name,
                version: s.version,
                next_tick: plan.next,
                ticks,
                replica: &self.settings.replica,
                lease_until,
                now,
            },
        )
        .await
        .with_context(|| format!("claiming ticks of schedule {:?}", s.name))?;
        let Some(held) = claimed else {
            // The winner moved the schedule on; its next tick after now is when to look again.
            tracing::debug!(schedule = %s.name, due = %due, "another replica claimed this tick");
            return Ok(cron.next_after(now));
        };
        if let Some(reason) = invalid {
            tracing::error!(schedule = %s.name, %reason, ticks = plan.fire.len(), "the schedule's job is not valid in this build; ticks not fired");
        }
        if plan.missed > 0 {
            metrics::counter!(SCHEDULE_MISSED_TICKS_TOTAL, "schedule" => s.name.clone())
                .increment(plan.missed);
            match policy {
                MissedTicks::Skip => {
                    tracing::warn!(schedule = %s.name, missed = plan.missed, since = %due, "missed ticks skipped (policy skip)")
                }
                MissedTicks::RunOnce => {
                    tracing::warn!(schedule = %s.name, missed = plan.missed, since = %due, "missed ticks fired once (policy run_once)")
                }
            }
        }
        for tick in &held {
            if !self.enqueue(tick).await {
                // The broker is failing: later ticks would too. They are claimed; the next
                // round retries them (or, if this replica dies, another one after the lease).
                break;
            }
        }
        Ok(plan.next)
    }

    /// Retries this replica's ticks whose push failed and takes over ticks whose holder's
    /// lease ran out.
    async fn enqueue_unenqueued(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let replica = &self.settings.replica;
        let pending = schedules::unenqueued_ticks(&self.db, replica, now, RECOVERY_BATCH)
            .await
            .context("reading ticks not enqueued yet")?;
        let lease_until = now + self.settings.lease;
        for tick in pending {
            let held = if tick.claimed_by == *replica {
                schedules::extend_lease(&self.db, &tick, lease_until)
                    .await?
                    .then(|| schedule_tick::Model {
                        lease_until,
                        ..tick.clone()
                    })
            } else {
                let held = schedules::take_over(&self.db, &tick, replica, lease_until).await?;
                if held.is_some() {
                    tracing::warn!(
                        schedule = %tick.schedule,
                        tick = %tick.tick_at,
                        from = %tick.claimed_by,
                        "taking over a tick its replica claimed but did not enqueue within the lease"
                    );
                }
                held
            };
            if let Some(held) = held
                && !self.enqueue(&held).await
            {
                break;
            }
        }
        Ok(())
    }

    /// Pushes a claimed tick's job and records that the broker has it. Returns false if the
    /// broker failed (the tick stays claimed for a later try).
    async fn enqueue(&self, tick: &schedule_tick::Model) -> bool {
        let span = tracing::info_span!(
            "schedule_tick",
            schedule = %tick.schedule,
            tick = %tick.tick_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            job.id = %tick.job_id,
            replica = %self.settings.replica,
        );
        self.enqueue_in_span(tick).instrument(span).await
    }

    async fn enqueue_in_span(&self, tick: &schedule_tick::Model) -> bool {
        let job: Job = match serde_json::from_str(&tick.envelope) {
            Ok(job) => job,
            Err(error) => {
                // Written by this code a moment ago; if it ever fails to read, retrying cannot help.
                tracing::error!(%error, "a tick's job envelope is unreadable; tick dropped");
                let _ = schedules::mark_enqueued(&self.db, tick, tick.job_id, Utc::now()).await;
                return false;
            }
        };
        let (queue, kind) = (job.queue.clone(), job.kind.clone());
        let event = self.history.as_ref().map(|_| enqueued_event(&job));
        let pushed = tokio::time::timeout(PUSH_TIMEOUT, self.broker.push(job)).await;
        let enqueued = match pushed {
            Ok(Ok(enqueued)) => enqueued,
            Ok(Err(error)) => {
                tracing::warn!(%error, "enqueuing the tick's job failed; retrying next round");
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = PUSH_TIMEOUT.as_millis() as u64,
                    "the broker did not accept the tick's job in time; retrying next round"
                );
                return false;
            }
        };
        let accepted = Utc::now();
        let delay = (accepted - tick.tick_at).to_std().unwrap_or_default();
        if enqueued.duplicate {
            // An earlier push of this very job landed (its holder died before recording it).
            tracing::info!(job.id = %enqueued.id, "tick's job was already enqueued");
        } else {
            metrics::counter!(SCHEDULE_TICKS_TOTAL, "schedule" => tick.schedule.clone()).increment(1);
            metrics::histogram!(SCHEDULE_TICK_DELAY_SECONDS, "schedule" => tick.schedule.clone())
                .record(delay.as_secs_f64());
            metrics::counter!(jobs::metrics::JOBS_ENQUEUED_TOTAL, "queue" => queue.to_string(), "kind" => kind.to_string())
                .increment(1);
            if let (Some(history), Some(event)) = (&self.history, event) {
                history.record(event);
            }
            tracing::info!(
                job.kind = %kind,
                %queue,
                stands_for = tick.stands_for,
                delay_ms = delay.as_millis() as u64,
                "schedule tick fired"
            );
        }
        // A lost update here only means another replica pushes the job again after the lease,
        // and the broker answers that push with this job (idempotency key).
        for attempt in 1..=3 {
            match schedules::mark_enqueued(&self.db, tick, enqueued.id.0, accepted).await {
                Ok(()) => break,
                Err(error) if attempt == 3 => {
                    tracing::warn!(%error, "recording the enqueued tick failed; another replica will find it enqueued already")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
            }
        }
        true
    }
}

fn enqueued_event(job: &Job) -> HistoryEvent {
    HistoryEvent::Enqueued {
        id: job.id.0,
        queue: job.queue.to_string(),
        kind: job.kind.to_string(),
        payload: serde_json::from_str(job.payload.get()).unwrap_or_default(),
        max_attempts: i32::try_from(job.max_attempts).unwrap_or(i32::MAX),
        priority: job.priority,
        idempotency_key: job.idempotency_key.clone(),
        trace_id: job.trace_id.clone(),
        run_at: None,
        at: DateTime::from_timestamp_millis(job.enqueued_at_ms).unwrap_or_else(Utc::now),
    }
}

/// A new W3C `traceparent` (sampled): each tick's job starts a trace of its own.
fn new_traceparent() -> String {
    let trace_id: u128 = rand::random::<u128>().max(1);
    let span_id: u64 = rand::random::<u64>().max(1);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}
