//! The kinds every build has: `noop` and `sleep`, for benchmarks, smoke tests and drills.

use std::{sync::Arc, time::Duration};

use jobs::{
    Job,
    catalog::{Crash, Noop, Sleep},
};

use crate::handlers::{Deps, JobError, Pickup, payload};

pub async fn noop(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    if let Some(probe) = &deps.pickup_probe {
        let picked_up_at_us = now_us();
        let p: Noop = payload(&job)?;
        if let Some(enqueued_at_us) = p.enqueued_at_us {
            let _ = probe.send(Pickup {
                id: job.id,
                enqueued_at_us,
                picked_up_at_us,
            });
        }
    }
    Ok(())
}

/// Waits `ms`; then crashes if asked to, or fails while `attempt <= fail_first` (or always,
/// with `always_fail`).
pub async fn sleep(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let p: Sleep = payload(&job)?;
    if p.ms > 0 {
        tokio::time::sleep(Duration::from_millis(p.ms)).await;
    }
    match p.crash {
        None => {}
        Some(Crash::Panic) => panic!("sleep: crashing as asked (attempt {})", job.attempt),
        Some(Crash::Abort) if deps.chaos_drills => {
            tracing::error!(job.id = %job.id, "sleep: aborting the worker process as asked (chaos drill)");
            std::process::abort();
        }
        Some(Crash::Abort) => {
            return Err(JobError::permanent(
                "sleep: \"crash\": \"abort\" needs a worker started with DROVER_CHAOS_DRILLS",
            ));
        }
    }
    if p.always_fail {
        return Err(JobError::retryable(format!(
            "sleep: failing every attempt (attempt {})",
            job.attempt
        )));
    }
    if job.attempt <= p.fail_first {
        return Err(JobError::retryable(format!(
            "sleep: failing attempt {} of the first {}",
            job.attempt, p.fail_first
        )));
    }
    Ok(())
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
