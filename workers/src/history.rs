//! Job history from the worker's side: one `Started` and one `Finished` event per attempt,
//! handed to the batched [`schema::history::HistoryWriter`] without waiting. A slow or down
//! database delays these rows; it never delays a job.

use chrono::{DateTime, TimeZone, Utc};
use jobs::{Job, Outcome};
use schema::history::{HistoryEvent, HistoryWriter};

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_else(Utc::now)
}

pub fn started(writer: &HistoryWriter, job: &Job, worker: &str, at_ms: i64) {
    writer.record(HistoryEvent::Started {
        id: job.id.0,
        queue: job.queue.as_str().to_owned(),
        kind: job.kind.as_ref().to_owned(),
        attempt: job.attempt as i32,
        max_attempts: job.max_attempts as i32,
        worker_id: worker.to_owned(),
        trace_id: job.trace_id.clone(),
        at: ts(at_ms),
    });
}

pub fn finished(
    writer: &HistoryWriter,
    job: &Job,
    worker: &str,
    started_ms: i64,
    at_ms: i64,
    outcome: &Outcome,
) {
    let (how, next_run_at) = match outcome {
        Outcome::Succeeded => (schema::history::AttemptOutcome::Succeeded, None),
        Outcome::Retry { at_ms, how, .. } => (*how, Some(ts(*at_ms))),
        Outcome::Dead { how, .. } => (*how, None),
    };
    writer.record(HistoryEvent::Finished {
        id: job.id.0,
        queue: job.queue.as_str().to_owned(),
        kind: job.kind.as_ref().to_owned(),
        attempt: job.attempt as i32,
        max_attempts: job.max_attempts as i32,
        worker_id: worker.to_owned(),
        trace_id: job.trace_id.clone(),
        started_at: ts(started_ms),
        at: ts(at_ms),
        outcome: how,
        error: outcome.error().map(str::to_owned),
        status: outcome.state(),
        next_run_at,
    });
}
