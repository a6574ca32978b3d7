//! One module per table. Statuses and outcomes are plain strings here; their meaning lives in
//! [`crate::history::JobState`] and [`crate::history::AttemptOutcome`].

/// An anomalous bucket the analytics jobs found.
pub mod anomaly;
/// One row per API key (hashed), with its role, expiry and revocation.
pub mod api_key;
/// One row per mutating API call: who, what, the outcome.
pub mod audit_log;
/// One row per backup: where its object is, how big, its digest and status.
pub mod backup;
/// The latest forecast per source, name, bucket size and metric.
pub mod forecast;
/// One row per idempotency key a RabbitMQ push claimed, until it expires.
pub mod idempotency_key;
/// One row per job: its latest known state.
pub mod job;
/// One row per attempt at running a job.
pub mod job_attempt;
/// One row per source, name, bucket size and bucket: the aggregates.
pub mod rollup;
/// One row per cron schedule (tombstoned, not removed, when deleted).
pub mod schedule;
/// One row per tick a scheduler replica claimed, until it is pruned.
pub mod schedule_tick;
/// The latest score of each subject under each model.
pub mod score;
/// One row per chunk of a recompute run.
pub mod score_chunk;
/// A scoring model: weights per event name, half-life, normalization.
pub mod score_model;
/// One row per full recompute of a model.
pub mod score_run;
/// What each URL of an HTTP cache warmer answered last.
pub mod warm_url;
/// One row per running worker process, refreshed by its heartbeat.
pub mod worker;
