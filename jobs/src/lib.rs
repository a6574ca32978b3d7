//! drover's job catalog and queue backends.
//!
//! - [`catalog`]: every job kind, its typed payload, queue, retry policy and timeout;
//! - [`families`]: the job families' kinds (payloads, queues, policies);
//! - [`job`]: the envelope brokers store and workers receive, and attempt outcomes;
//! - [`broker`]: the Redis, AMQP and SQLite brokers behind one [`broker::Producer`] /
//!   [`broker::Driver`] interface;
//! - [`backend`]: the apalis-core `Backend` every broker shares (batched fetch, batched acks,
//!   graceful release);
//! - [`metrics`]: the workers' and brokers' metric names;
//! - [`limits`]: rate and concurrency limits shared by every worker replica;
//! - [`schedule`]: cron schedules — expressions, timezones, job templates and which ticks to
//!   fire after a gap.
//!
//! Depends on `schema` only (for job states and the database AMQP keeps job state in); no
//! HTTP, no process-level runtime.
#![forbid(unsafe_code)]

pub mod backend;
pub mod broker;
pub mod cache;
pub mod catalog;
pub mod families;
pub mod job;
pub mod limits;
/// Metric names of workers and brokers, and the timed driver that records broker round trips.
pub mod metrics;
pub mod queue;
pub mod retry;
pub mod schedule;
pub mod stats;
/// W3C trace context of jobs: trace ids for log lines, remote parents for exporters.
pub mod trace;

pub use backend::{JobRef, QueueBackend, SettledCount};
pub use broker::{
    BrokerError, BrokerOptions, CancelOutcome, ConsumerConfig, DeadOutcome, Driver, Enqueued, Producer,
    QueueStats,
};
pub use catalog::{Catalog, CatalogConfig, CatalogError, KindSpec};
pub use job::{Job, JobId, JobRecord, JobState, Outcome, Settlement};
pub use queue::QueueName;
pub use retry::RetryPolicy;
