//! drover's database: the sea-orm entities, the migrations and the read/write queries behind job
//! history (one row per job in `job`, one per attempt in `job_attempt`). Postgres in production,
//! a SQLite file for `drover dev`; every query here runs on both. Workers and the API record what
//! happens to jobs through [`history::HistoryWriter`] and read it back through [`queries`].
//! Cron schedules and the ticks scheduler replicas claim live in [`schedules`]; API keys in
//! [`keys`], the audit log of mutating API calls in [`audit`].
//! This crate depends on no other drover crate.
#![forbid(unsafe_code)]

/// The analytics family's tables: rollups, anomalies, forecasts.
pub mod analytics;
/// The audit log of mutating API calls and its batched writer.
pub mod audit;
/// The backup catalog: rows the backup workers write and the API, CLI and prune read.
pub mod backups;
/// The tables as sea-orm entities: persistence only, no domain rules.
pub mod entity;
/// Events posted to `POST /v1/events`: the batch insert and the scans.
pub mod events;
/// Recording job events: the event types, the batched upsert and the background writer.
pub mod history;
/// Idempotency keys for brokers that cannot keep them (RabbitMQ).
pub mod idempotency;
/// API keys as stored (hashed): insert, look up, list, revoke, record use.
pub mod keys;
/// Schema migrations, applied by `drover migrate`.
pub mod migration;
/// Read queries and the few direct writes the API makes (cancel).
pub mod queries;
/// Cron schedules: the API's and config file's writes, and the scheduler replicas' claims.
pub mod schedules;
/// Scoring models, scores, recompute runs and their chunks.
pub mod scores;
/// What the HTTP cache warmers' URLs answered.
pub mod warm;
/// Worker presence: heartbeats, expiry, the live list.
pub mod workers;

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;

use crate::migration::Migrator;

/// What can go wrong talking to the history database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database at {url}")]
    Connect {
        /// The URL with any password replaced, safe to log.
        url: String,
        #[source]
        source: DbErr,
    },
    #[error("unsupported database URL {url}: expected postgres://… or sqlite://…")]
    UnsupportedUrl { url: String },
    #[error(
        "database is not migrated ({} pending migrations: {}); run `drover migrate`",
        pending.len(),
        pending.join(", ")
    )]
    NotMigrated { pending: Vec<String> },
    #[error("migrating the database failed")]
    Migration(#[source] DbErr),
    #[error(transparent)]
    Query(#[from] DbErr),
}

/// Opens a pool on `postgres://…` or `sqlite://path` (the file is created when missing).
///
/// SQLite runs in WAL mode with a 5 s busy timeout so that the API and several worker processes
/// can write to the same `drover dev` file without failing on each other's locks.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbError> {
    let mut opts = ConnectOptions::new(url);
    // Statement logging at info level would drown everything else; sea-orm's tracing spans remain.
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10));
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        opts.max_connections(10).min_connections(1);
    } else if url.starts_with("sqlite:") {
        opts.map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                // Durable at each checkpoint rather than each commit: WAL's recommended setting.
                .synchronous(SqliteSynchronous::Normal)
                // Statement journals (one per multi-row upsert of the history writer) and temporary
                // tables in memory: as files, writing them cost the history writer a tenth of its time.
                .pragma("temp_store", "memory")
        });
        if url.contains(":memory:") || url.contains("mode=memory") {
            // Every connection to an in-memory database opens a new, empty one, so keep exactly one
            // and never let the pool close it.
            opts.max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else {
            // Readers run concurrently under WAL; writers queue on the file lock anyway.
            opts.max_connections(4);
        }
    } else {
        return Err(DbError::UnsupportedUrl { url: redact(url) });
    }
    Database::connect(opts).await.map_err(|source| DbError::Connect {
        url: redact(url),
        source,
    })
}

/// Applies every pending migration.
#[tracing::instrument(skip_all)]
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbError> {
    Migrator::up(db, None).await.map_err(DbError::Migration)
}

/// Fails with [`DbError::NotMigrated`] unless every migration this build knows has been applied.
/// Processes call it at startup so that a forgotten `drover migrate` is a clear message, not a
/// "no such table" on the first job. Creates nothing, so a read-only user can run it.
pub async fn ensure_migrated(db: &DatabaseConnection) -> Result<(), DbError> {
    let pending: Vec<String> = Migrator::get_pending_migrations_read_only(db)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    if pending.is_empty() {
        Ok(())
    } else {
        Err(DbError::NotMigrated { pending })
    }
}

/// `scheme://user:password@host/db` → `scheme://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_database_url_loses_its_password_before_it_is_shown() {
        assert_eq!(
            redact("postgres://drover:s3cret@db:5432/drover"),
            "postgres://drover:***@db:5432/drover"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(
            redact("sqlite://drover.db?mode=rwc"),
            "sqlite://drover.db?mode=rwc"
        );
    }
}
