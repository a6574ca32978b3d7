//! Cron schedules and the ticks the scheduler has claimed. Any number of scheduler replicas
//! share these two tables: a replica fires a tick only after winning a compare-and-set on the
//! schedule's `version` in the same transaction that records the tick, so each tick is claimed
//! once; the tick row then carries the job until a broker has it, so a replica that dies in
//! between does not lose the tick (another one enqueues the recorded job after the lease).

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
                    .table(Schedule::Table)
                    // 1–64 characters of a-z 0-9 - _; the URL segment and metric label.
                    .col(string(Schedule::Name).primary_key())
                    // The cron expression as the operator wrote it (5, 6 or 7 fields).
                    .col(string(Schedule::Cron))
                    // IANA timezone the expression is read in.
                    .col(string(Schedule::Timezone).default("UTC"))
                    // The job template: kind, payload, optional queue and priority.
                    .col(string(Schedule::Kind))
                    .col(json_binary(Schedule::Payload))
                    // Null: the kind's own queue.
                    .col(string_null(Schedule::Queue))
                    // Null: priority 0.
                    .col(integer_null(Schedule::Priority))
                    .col(boolean(Schedule::Enabled).default(true))
                    // skip or run_once: what to do with ticks missed while no scheduler ran.
                    .col(string(Schedule::MissedTicks).default("skip"))
                    // api or config: where the latest write came from (config defaults are only
                    // ever inserted, never written over an existing row).
                    .col(string(Schedule::Origin))
                    // Bumped by every write, edits and claims alike: the compare-and-set token
                    // that lets exactly one replica claim a tick and makes a claim planned
                    // from an edited-away version fail.
                    .col(big_integer(Schedule::Version).default(1))
                    // The latest tick fired.
                    .col(timestamp_with_time_zone_null(Schedule::LastTick))
                    // The earliest tick not fired yet; null while disabled or when the
                    // expression has no future tick.
                    .col(timestamp_with_time_zone_null(Schedule::NextTick))
                    .col(timestamp_with_time_zone(Schedule::CreatedAt))
                    // The latest write through the API or the config file (not claims).
                    .col(timestamp_with_time_zone(Schedule::UpdatedAt))
                    // Set by DELETE: the row stays as a tombstone so that a default from the
                    // config file is not inserted again at the next start.
                    .col(timestamp_with_time_zone_null(Schedule::DeletedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ScheduleTick::Table)
                    .col(string(ScheduleTick::Schedule))
                    // The tick's time; one row per (schedule, tick) is what makes a tick fire once.
                    .col(timestamp_with_time_zone(ScheduleTick::TickAt))
                    // The job enqueued for this tick (also the broker's id for it).
                    .col(uuid(ScheduleTick::JobId))
                    // The job envelope as JSON, fixed at claim time: whoever enqueues it (the
                    // claimer or, after its lease, another replica) pushes exactly this job,
                    // with the idempotency key `schedule:{name}:{tick}`.
                    .col(text(ScheduleTick::Envelope))
                    // Scheduled ticks this firing stands for: 1, or the missed ticks a
                    // run_once firing covers.
                    .col(big_integer(ScheduleTick::StandsFor).default(1))
                    // The replica that holds the tick until it is enqueued.
                    .col(string(ScheduleTick::ClaimedBy))
                    // Times the tick was claimed (1, plus one per take-over): the fencing token
                    // of take-overs.
                    .col(integer(ScheduleTick::Claims).default(1))
                    // Until when the holder may still enqueue it; after that any replica may.
                    .col(timestamp_with_time_zone(ScheduleTick::LeaseUntil))
                    .col(timestamp_with_time_zone(ScheduleTick::ClaimedAt))
                    // When a broker accepted the job; null while the tick waits to be enqueued.
                    .col(timestamp_with_time_zone_null(ScheduleTick::EnqueuedAt))
                    .primary_key(
                        Index::create()
                            .col(ScheduleTick::Schedule)
                            .col(ScheduleTick::TickAt),
                    )
                    .to_owned(),
            )
            .await?;

        // Replicas look for ticks whose holder's lease ran out before they were enqueued; the
        // retention sweep deletes old enqueued ones.
        manager
            .create_index(
                Index::create()
                    .name("schedule_tick_enqueued_at_lease_until_idx")
                    .table(ScheduleTick::Table)
                    .col(ScheduleTick::EnqueuedAt)
                    .col(ScheduleTick::LeaseUntil)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ScheduleTick::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Schedule::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Schedule {
    Table,
    Name,
    Cron,
    Timezone,
    Kind,
    Payload,
    Queue,
    Priority,
    Enabled,
    MissedTicks,
    Origin,
    Version,
    LastTick,
    NextTick,
    CreatedAt,
    UpdatedAt,
    DeletedAt,
}

#[derive(DeriveIden)]
enum ScheduleTick {
    Table,
    Schedule,
    TickAt,
    JobId,
    Envelope,
    StandsFor,
    ClaimedBy,
    Claims,
    LeaseUntil,
    ClaimedAt,
    EnqueuedAt,
}
