//! Job history: one row per job and one per attempt, written by the history writer as events
//! arrive (possibly out of order, from several processes) and read by the API and dashboard.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(super) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Job::Table)
                    // Chosen by the API at enqueue time (UUIDv7, so ids sort by creation).
                    .col(pk_uuid(Job::Id))
                    // The queue the job was sent to.
                    .col(string(Job::Queue))
                    // What the job does, e.g. `backup.snapshot`; selects the handler.
                    .col(string(Job::Kind))
                    // scheduled, pending, running, succeeded, retrying, dead or canceled.
                    .col(string(Job::Status))
                    // Attempts started so far (the highest attempt number seen).
                    .col(integer(Job::Attempts).default(0))
                    // Attempts allowed before the job is dead.
                    .col(integer(Job::MaxAttempts))
                    // The job's arguments as enqueued; null until the enqueue event arrives.
                    .col(json_binary_null(Job::Payload))
                    // Higher runs first within a queue.
                    .col(integer(Job::Priority).default(0))
                    // The caller's key that made a repeated enqueue return the same job.
                    .col(string_null(Job::IdempotencyKey))
                    // Trace of the request that enqueued the job, to follow it across processes.
                    .col(string_null(Job::TraceId))
                    // Worker that ran the latest attempt.
                    .col(string_null(Job::WorkerId))
                    // Why the latest finished attempt failed (null once one succeeds); kept while a retry runs.
                    .col(text_null(Job::LastError))
                    // When the job was enqueued.
                    .col(timestamp_with_time_zone(Job::CreatedAt))
                    // When the job is (next) due: requested at enqueue, or the retry's time.
                    // Null means as soon as possible.
                    .col(timestamp_with_time_zone_null(Job::RunAt))
                    // When the latest attempt started.
                    .col(timestamp_with_time_zone_null(Job::StartedAt))
                    // When the job reached succeeded, dead or canceled; null before that.
                    .col(timestamp_with_time_zone_null(Job::FinishedAt))
                    // Time of the latest event applied to this row. Events from different
                    // processes arrive out of order; an older one must not undo a newer one.
                    .col(timestamp_with_time_zone(Job::EventAt))
                    .to_owned(),
            )
            .await?;

        // Queue dashboards: counts and listings per status.
        manager
            .create_index(
                Index::create()
                    .name("job_queue_status_idx")
                    .table(Job::Table)
                    .col(Job::Queue)
                    .col(Job::Status)
                    .to_owned(),
            )
            .await?;
        // Retention sweeps and "recently finished / canceled since" queries.
        manager
            .create_index(
                Index::create()
                    .name("job_status_finished_at_idx")
                    .table(Job::Table)
                    .col(Job::Status)
                    .col(Job::FinishedAt)
                    .to_owned(),
            )
            .await?;
        // Per-kind analytics.
        manager
            .create_index(
                Index::create()
                    .name("job_kind_idx")
                    .table(Job::Table)
                    .col(Job::Kind)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(JobAttempt::Table)
                    // The job this attempt belongs to; attempts go when their job is deleted.
                    .col(uuid(JobAttempt::JobId))
                    // 1 for the first run, 2 for the first retry, …
                    .col(integer(JobAttempt::Attempt))
                    // Worker that ran this attempt.
                    .col(string_null(JobAttempt::WorkerId))
                    .col(timestamp_with_time_zone(JobAttempt::StartedAt))
                    // Null while the attempt runs (or if its worker vanished unnoticed).
                    .col(timestamp_with_time_zone_null(JobAttempt::FinishedAt))
                    // succeeded, failed, timed_out, panicked or lost; null while running.
                    .col(string_null(JobAttempt::Outcome))
                    // What went wrong, as the handler reported it.
                    .col(text_null(JobAttempt::Error))
                    // Trace of this attempt's execution.
                    .col(string_null(JobAttempt::TraceId))
                    .primary_key(Index::create().col(JobAttempt::JobId).col(JobAttempt::Attempt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("job_attempt_job_id_fkey")
                            .from(JobAttempt::Table, JobAttempt::JobId)
                            .to(Job::Table, Job::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobAttempt::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Job::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Job {
    Table,
    Id,
    Queue,
    Kind,
    Status,
    Attempts,
    MaxAttempts,
    Payload,
    Priority,
    IdempotencyKey,
    TraceId,
    WorkerId,
    LastError,
    CreatedAt,
    RunAt,
    StartedAt,
    FinishedAt,
    EventAt,
}

#[derive(DeriveIden)]
enum JobAttempt {
    Table,
    JobId,
    Attempt,
    WorkerId,
    StartedAt,
    FinishedAt,
    Outcome,
    Error,
    TraceId,
}
