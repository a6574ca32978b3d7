//! One module per table. Statuses and outcomes are plain strings here; their meaning lives in
//! [`crate::history::JobState`] and [`crate::history::AttemptOutcome`].

/// One row per backup: where its object is, how big, its digest and status.
pub mod backup;
/// One row per idempotency key a RabbitMQ push claimed, until it expires.
pub mod idempotency_key;
/// One row per job: its latest known state.
pub mod job;
/// One row per attempt at running a job.
pub mod job_attempt;
/// One row per cron schedule (tombstoned, not removed, when deleted).
pub mod schedule;
/// One row per tick a scheduler replica claimed, until it is pruned.
pub mod schedule_tick;
