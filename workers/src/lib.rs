//! drover's worker runtime and the job families' handlers.
//!
//! [`runtime`] runs one apalis worker per queue over the shared [`jobs::QueueBackend`]: per-queue
//! concurrency, a hard timeout per attempt, panics caught, retries scheduled by the kind's
//! [`jobs::RetryPolicy`], job history written off the hot path in batches, a tracing span per
//! attempt, and a graceful shutdown that lets running jobs finish within a grace period.
//! [`handlers`] maps job kinds to their handlers; [`families`] holds the handlers themselves.
//! [`scheduler`] fires the cron schedules stored in the database, exactly once per tick across
//! any number of replicas. [`presence`] records each worker process's heartbeat for the API's
//! worker list.
//!
//! Depends on `jobs` and `schema`; never on `api`.
#![forbid(unsafe_code)]

pub mod families;
pub mod handlers;
pub mod history;
pub mod presence;
pub mod runtime;
pub mod scheduler;

pub use handlers::{Deps, JobError, Pickup, Registry};
pub use runtime::{WorkerSettings, run};
pub use scheduler::SchedulerSettings;
