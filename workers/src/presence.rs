//! Worker presence: while a worker process runs, it writes its row in the database (id, host,
//! queues, concurrency) every [`HEARTBEAT_EVERY`], so every API replica can list the workers
//! of the whole deployment. Each beat also expires rows silent for [`EXPIRE_AFTER`] (workers
//! that died without saying so); a clean stop removes the process's own row.
//!
//! A failed beat is logged and retried at the next one: the database being down must never
//! stop a worker from running jobs.

use std::time::Duration;

use chrono::Utc;
use schema::workers::WorkerRow;
use sea_orm::DatabaseConnection;
use tokio::{sync::oneshot, task::JoinHandle};

/// How often a worker process records that it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
pub use schema::workers::EXPIRE_AFTER;

/// The running heartbeat of one worker process.
pub struct Presence {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// What a worker process says about itself.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub queues: Vec<String>,
    pub concurrency: usize,
}

impl Presence {
    /// Starts beating now (the first beat is immediate, so the worker shows up at once).
    pub fn spawn(db: DatabaseConnection, info: WorkerInfo) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let started_at = Utc::now();
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => beat(&db, &info, started_at).await,
                    _ = &mut stopped => break,
                }
            }
            if let Err(error) = schema::workers::remove(&db, &info.id).await {
                tracing::warn!(worker = %info.id, %error, "could not remove this worker's presence row; it expires on its own");
            }
        });
        Self { stop, task }
    }

    /// Stops beating and removes this process's row.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn beat(db: &DatabaseConnection, info: &WorkerInfo, started_at: chrono::DateTime<Utc>) {
    let now = Utc::now();
    let row = WorkerRow {
        id: info.id.clone(),
        host: info.host.clone(),
        queues: info.queues.join(","),
        concurrency: i32::try_from(info.concurrency).unwrap_or(i32::MAX),
        started_at,
        heartbeat_at: now,
    };
    if let Err(error) = schema::workers::heartbeat(db, row).await {
        tracing::warn!(worker = %info.id, %error, "worker heartbeat not recorded");
        return;
    }
    let stale = now - chrono::Duration::from_std(EXPIRE_AFTER).unwrap_or_default();
    match schema::workers::expire(db, stale).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            workers = n,
            "expired the presence of workers that stopped heartbeating"
        ),
        Err(error) => tracing::warn!(%error, "expiring stale workers failed"),
    }
}

/// This machine's host name (the pod name under Kubernetes).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}
