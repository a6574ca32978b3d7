//! What a job is on the wire (the envelope brokers store and workers receive) and what a
//! finished attempt reports back to its broker.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::queue::QueueName;

pub use schema::history::{AttemptOutcome, JobState};

/// A job's id: a UUIDv7, so ids sort by creation time and index well.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub uuid::Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::try_parse(s).ok().map(Self)
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.as_hyphenated(), f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The envelope every broker stores and every worker receives.
///
/// The payload stays raw JSON from the API to the handler: brokers never parse it, and the
/// handler decodes it into its kind's typed payload once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub queue: QueueName,
    pub kind: Arc<str>,
    pub payload: Box<RawValue>,
    /// Attempts allowed in all, fixed at enqueue time from the kind's retry policy.
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Epoch milliseconds when the API accepted the job.
    pub enqueued_at_ms: i64,
    /// Epoch milliseconds before which the job must not run (delayed jobs and retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at_ms: Option<i64>,
    /// W3C `traceparent` of the request that enqueued the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// 1-based number of the attempt this delivery is. Brokers set it on delivery.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub attempt: u32,
    /// Deliveries of this job whose attempt never finished because its worker died holding it
    /// (lease expired; on RabbitMQ, redelivered after its channel closed). At
    /// [`crate::ConsumerConfig::quarantine_after`] the broker moves the job to the dead set
    /// instead of running it again. Brokers set it on delivery.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub crashes: u32,
    /// Attempts made before the job was last retried from the dead set (0 if never): its
    /// attempt budget is `max_attempts - attempts_before`, and a retry from the dead set gives
    /// that budget again while attempt numbers keep counting, so no attempt's history is lost.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub attempts_before: u32,
    /// Broker-specific handle of this delivery (an AMQP delivery tag); not stored.
    #[serde(skip)]
    pub receipt: u64,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// How one attempt ended, as decided by the worker runtime (which owns the retry policy);
/// brokers only carry the decision out.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded,
    /// Failed; run again at `at_ms` (epoch milliseconds).
    Retry {
        at_ms: i64,
        error: String,
        how: AttemptOutcome,
    },
    /// Failed for the last time, or with an error retrying cannot fix: keep it in the dead set.
    Dead {
        error: String,
        how: AttemptOutcome,
    },
}

impl Outcome {
    pub fn state(&self) -> JobState {
        match self {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Retry { .. } => JobState::Retrying,
            Outcome::Dead { .. } => JobState::Dead,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Retry { error, .. } | Outcome::Dead { error, .. } => Some(error),
        }
    }
}

/// One finished attempt, handed to the broker to acknowledge.
#[derive(Clone, Debug)]
pub struct Settlement {
    /// Shared with the attempt that ran it: settling copies nothing.
    pub job: Arc<Job>,
    pub outcome: Outcome,
    pub worker: Arc<str>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

/// A job as the API reports it: the broker's view while the broker still holds it,
/// otherwise the history database's.
#[derive(Clone, Debug, Serialize)]
pub struct JobRecord {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub status: JobState,
    pub attempts: u32,
    pub max_attempts: u32,
    pub priority: i32,
    pub payload: Option<serde_json::Value>,
    pub created_at_ms: i64,
    pub run_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub worker_id: Option<String>,
    pub trace_id: Option<String>,
}

impl Job {
    /// The envelope of this job taken out of the dead set after `made` attempts: a fresh
    /// attempt budget, no crashes counted, due now. `attempt` is the attempts made, as a
    /// RabbitMQ message carries it (the other brokers set it on delivery).
    pub fn revived(&self, made: u32) -> Job {
        let budget = self.max_attempts.saturating_sub(self.attempts_before).max(1);
        Job {
            max_attempts: made.saturating_add(budget),
            attempts_before: made,
            crashes: 0,
            attempt: made,
            run_at_ms: None,
            ..self.clone()
        }
    }
}

/// The error a job quarantined as a poison pill is left with.
pub fn quarantine_error(crashes: u32) -> String {
    format!("quarantined: its worker died {crashes} times while running it")
}

/// The error a job is quarantined with when its last crash was a panic its worker caught
/// (worker deaths and panics count alike: both are bugs retrying will not fix).
pub fn panic_quarantine_error(crashes: u32, panic: &str) -> String {
    format!("quarantined: it crashed {crashes} times (worker deaths and panics); last: {panic}")
}

impl Outcome {
    /// Whether this outcome is a retry after a panic: the broker counts it as a crash
    /// ([`Job::crashes`]), so a job that keeps panicking is quarantined like one that keeps
    /// killing its worker.
    pub fn is_panicked_retry(&self) -> bool {
        matches!(
            self,
            Outcome::Retry {
                how: AttemptOutcome::Panicked,
                ..
            }
        )
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_without_touching_the_payload() {
        let job = Job {
            id: JobId::new(),
            queue: QueueName::parse("noop").unwrap(),
            kind: "noop".into(),
            payload: RawValue::from_string(r#"{"a": [1, 2]}"#.into()).unwrap(),
            max_attempts: 3,
            priority: 0,
            enqueued_at_ms: 1,
            run_at_ms: None,
            trace_id: None,
            idempotency_key: None,
            attempt: 0,
            crashes: 0,
            attempts_before: 0,
            receipt: 7,
        };
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("receipt") && !text.contains("priority"));
        let back: Job = serde_json::from_str(&text).unwrap();
        assert_eq!(back.payload.get(), r#"{"a": [1, 2]}"#);
        assert_eq!(back.id, job.id);
        assert_eq!(back.receipt, 0);
    }

    #[test]
    fn a_revived_job_gets_its_budget_again_and_keeps_counting_attempts() {
        let mut job: Job = serde_json::from_str(
            r#"{"id":"0190b5a0-0000-7000-8000-000000000000","queue":"noop","kind":"noop","payload":{},"max_attempts":3,"enqueued_at_ms":1,"crashes":2}"#,
        )
        .unwrap();
        job.run_at_ms = Some(5);
        let once = job.revived(3);
        assert_eq!((once.max_attempts, once.attempts_before, once.crashes), (6, 3, 0));
        assert_eq!(once.run_at_ms, None);
        // Died early (an error retrying cannot fix) on its second life: 3 more attempts again.
        let twice = once.revived(4);
        assert_eq!((twice.max_attempts, twice.attempts_before), (7, 4));
    }
}
