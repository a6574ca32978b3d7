//! What the dashboard reads beyond job history: the workers' presence (one row per worker
//! process, refreshed by its heartbeat), and indexes for its per-minute activity charts, its
//! listings and its search.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub(super) struct Migration;

/// On Postgres, trigram indexes make the search's `lower(…) LIKE '%text%'` an index scan. The
/// `pg_trgm` extension ships with Postgres and is trusted (a database owner may create it), but
/// a managed server may still refuse it: then the search scans, and the migration still applies
/// (the subtransaction of the `EXCEPTION` block keeps the migration's own transaction usable).
const POSTGRES_TRIGRAM_INDEXES: &str = r#"
DO $$
BEGIN
  BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
  EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm is not available (%): job search will scan instead of using an index', SQLERRM;
  END;
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
    CREATE INDEX IF NOT EXISTS job_kind_trgm_idx ON job USING gin (lower(kind) gin_trgm_ops);
    CREATE INDEX IF NOT EXISTS job_last_error_trgm_idx ON job USING gin (lower(last_error) gin_trgm_ops);
    CREATE INDEX IF NOT EXISTS job_payload_trgm_idx ON job USING gin (lower(CAST(payload AS text)) gin_trgm_ops);
    CREATE INDEX IF NOT EXISTS job_attempt_error_trgm_idx ON job_attempt USING gin (lower(error) gin_trgm_ops);
  END IF;
END
$$;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Worker::Table)
                    // The worker process's name: `<host>-<pid>` unless configured.
                    .col(string(Worker::Id).primary_key())
                    // The host (pod) it runs on.
                    .col(string(Worker::Host))
                    // The queues it consumes, comma-separated (queue names hold no comma).
                    .col(text(Worker::Queues))
                    // Attempts it runs at once, per queue.
                    .col(integer(Worker::Concurrency))
                    .col(timestamp_with_time_zone(Worker::StartedAt))
                    // Its latest heartbeat; a row without one for a while is a worker that
                    // died without saying so, and is expired.
                    .col(timestamp_with_time_zone(Worker::HeartbeatAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("worker_heartbeat_at_idx")
                    .table(Worker::Table)
                    .col(Worker::HeartbeatAt)
                    .to_owned(),
            )
            .await?;
        // Activity charts: attempts finished in the last hour.
        manager
            .create_index(
                Index::create()
                    .name("job_attempt_finished_at_idx")
                    .table(JobAttempt::Table)
                    .col(JobAttempt::FinishedAt)
                    .to_owned(),
            )
            .await?;
        // A queue's jobs in one state, newest first (the queue page), and search results, newest first.
        manager
            .create_index(
                Index::create()
                    .name("job_queue_status_created_at_idx")
                    .table(Job::Table)
                    .col(Job::Queue)
                    .col(Job::Status)
                    .col(Job::CreatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("job_created_at_idx")
                    .table(Job::Table)
                    .col(Job::CreatedAt)
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(POSTGRES_TRIGRAM_INDEXES)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (index, table) in [
            ("job_created_at_idx", Job::Table.into_iden()),
            ("job_queue_status_created_at_idx", Job::Table.into_iden()),
            ("job_attempt_finished_at_idx", JobAttempt::Table.into_iden()),
        ] {
            manager
                .drop_index(Index::drop().name(index).table(table).to_owned())
                .await?;
        }
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "DROP INDEX IF EXISTS job_kind_trgm_idx; DROP INDEX IF EXISTS job_last_error_trgm_idx; DROP INDEX IF EXISTS job_payload_trgm_idx; \
                     DROP INDEX IF EXISTS job_attempt_error_trgm_idx;",
                )
                .await?;
        }
        manager
            .drop_table(Table::drop().table(Worker::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Worker {
    Table,
    Id,
    Host,
    Queues,
    Concurrency,
    StartedAt,
    HeartbeatAt,
}

#[derive(DeriveIden)]
enum Job {
    Table,
    Queue,
    Status,
    CreatedAt,
}

#[derive(DeriveIden)]
enum JobAttempt {
    Table,
    FinishedAt,
}
