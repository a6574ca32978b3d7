//! End-to-end tests: the composed drover against real Redis, RabbitMQ, Postgres and SQLite.
//! Each test owns its database and broker namespace, so they run in parallel.

/// Backups through the API, the workers and the CLI: retries, the dead set, the webhook.
mod backups;
/// Analytics rollups and the fanned-out rescoring against Postgres, Redis and two worker processes.
mod families;
/// Fault drills: workers killed with SIGKILL mid-run.
mod faults;
/// The Kubernetes manifests (k8s/) against the code: KEDA triggers, scaling, drain periods.
mod k8s;
mod lifecycle;
/// `[[limits]]` held across worker processes.
mod limits;
/// Metrics scraped and parsed as Prometheus does; one trace id from a request to its job's logs.
mod observability;
/// Broker restarts mid-run, on broker instances of the tests' own.
mod outages;
mod process;
/// The cron scheduler: replicas firing each tick once, stranded ticks, missed ticks.
mod scheduler;
mod support;
/// Worker presence: every replica's heartbeat, listed by the API.
mod workers;
