//! Schedules and their ticks: the writes the API and the config file make, and the
//! compare-and-set steps scheduler replicas coordinate through. Every function takes any
//! `ConnectionTrait` where one statement suffices, so callers can pass a pool or a transaction.
//!
//! How replicas share the work without a leader:
//!
//! 1. **Claim** ([`claim`]): one transaction that moves the schedule's `next_tick` on, guarded by
//!    the `version` the replica planned from (`UPDATE … WHERE version = ?`), and inserts one
//!    `schedule_tick` row per tick with the job it will enqueue. Of replicas racing for the same
//!    tick exactly one sees its update apply; the others roll back and fire nothing.
//! 2. **Enqueue**, then [`mark_enqueued`]. The tick row holds the job (its id and idempotency key
//!    fixed) and a lease, so a replica that dies between claim and enqueue loses nothing: once
//!    the lease runs out, another replica [`take_over`]s the row and pushes the same job.
//!
//! Timing rules (the cron expression, the misfire grace) live in `jobs::schedule`; this module
//! only stores their results.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait, TryInsertResult,
};
use uuid::Uuid;

use crate::DbError;
use crate::entity::{schedule, schedule_tick};

/// Where a schedule's latest write came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Api,
    /// A `[[schedules]]` default from the config file, inserted at startup.
    Config,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Config => "config",
        }
    }
}

/// A schedule as an operator or the config file defines it (validated by the caller).
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleWrite {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub queue: Option<String>,
    pub priority: Option<i32>,
    pub enabled: bool,
    pub missed_ticks: String,
    pub origin: Origin,
}

/// What [`put`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Put {
    Created(schedule::Model),
    Updated(schedule::Model),
}

/// Concurrent edits of one schedule kept winning the compare-and-set; the caller may retry.
#[derive(Debug, thiserror::Error)]
#[error("schedule {0:?} changed concurrently too many times; try again")]
pub struct Contended(pub String);

/// Rounds of read-compare-write [`put`] tries before giving up (a claim bumps the version about
/// once per tick, so two losses in a row are already rare).
const PUT_ROUNDS: usize = 8;

/// Creates or replaces a schedule (and revives a deleted one).
///
/// `fresh_next_tick` is the first tick after now under the new expression. It becomes the
/// schedule's `next_tick` unless the timing is unchanged (same expression and timezone, enabled
/// before and after): then the pending `next_tick` stays, so an edit of the job template never
/// drops or repeats a tick. A disabled schedule has no `next_tick`; enabling it starts from the
/// next tick after now (ticks while disabled are not "missed").
#[tracing::instrument(skip_all, fields(schedule = %w.name))]
pub async fn put(
    db: &impl ConnectionTrait,
    w: &ScheduleWrite,
    fresh_next_tick: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Put, PutError> {
    for _ in 0..PUT_ROUNDS {
        let existing = schedule::Entity::find_by_id(w.name.clone()).one(db).await?;
        let Some(row) = existing else {
            let model = new_row(w, fresh_next_tick, now);
            if insert_if_absent_row(db, &model).await? {
                return Ok(Put::Created(model));
            }
            continue;
        };
        let revived = row.deleted_at.is_some();
        let same_timing =
            !revived && row.enabled && w.enabled && row.cron == w.cron && row.timezone == w.timezone;
        let next_tick = match (w.enabled, same_timing) {
            (false, _) => None,
            (true, true) => row.next_tick,
            (true, false) => fresh_next_tick,
        };
        let model = schedule::Model {
            name: w.name.clone(),
            cron: w.cron.clone(),
            timezone: w.timezone.clone(),
            kind: w.kind.clone(),
            payload: w.payload.clone(),
            queue: w.queue.clone(),
            priority: w.priority,
            enabled: w.enabled,
            missed_ticks: w.missed_ticks.clone(),
            origin: w.origin.as_str().to_owned(),
            version: row.version + 1,
            last_tick: if revived { None } else { row.last_tick },
            next_tick,
            created_at: if revived { now } else { row.created_at },
            updated_at: now,
            deleted_at: None,
        };
        let updated = schedule::Entity::update_many()
            .col_expr(schedule::Column::Cron, Expr::value(model.cron.clone()))
            .col_expr(schedule::Column::Timezone, Expr::value(model.timezone.clone()))
            .col_expr(schedule::Column::Kind, Expr::value(model.kind.clone()))
            .col_expr(schedule::Column::Payload, Expr::value(model.payload.clone()))
            .col_expr(schedule::Column::Queue, Expr::value(model.queue.clone()))
            .col_expr(schedule::Column::Priority, Expr::value(model.priority))
            .col_expr(schedule::Column::Enabled, Expr::value(model.enabled))
            .col_expr(
                schedule::Column::MissedTicks,
                Expr::value(model.missed_ticks.clone()),
            )
            .col_expr(schedule::Column::Origin, Expr::value(model.origin.clone()))
            .col_expr(schedule::Column::Version, Expr::value(model.version))
            .col_expr(schedule::Column::LastTick, Expr::value(model.last_tick))
            .col_expr(schedule::Column::NextTick, Expr::value(model.next_tick))
            .col_expr(schedule::Column::CreatedAt, Expr::value(model.created_at))
            .col_expr(schedule::Column::UpdatedAt, Expr::value(model.updated_at))
            .col_expr(schedule::Column::DeletedAt, Expr::value(None::<DateTime<Utc>>))
            .filter(schedule::Column::Name.eq(w.name.as_str()))
            .filter(schedule::Column::Version.eq(row.version))
            .exec(db)
            .await?;
        if updated.rows_affected == 1 {
            return Ok(if revived {
                Put::Created(model)
            } else {
                Put::Updated(model)
            });
        }
    }
    Err(PutError::Contended(Contended(w.name.clone())))
}

/// Why [`put`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Contended(Contended),
}

impl From<sea_orm::DbErr> for PutError {
    fn from(e: sea_orm::DbErr) -> Self {
        PutError::Db(e.into())
    }
}

fn new_row(w: &ScheduleWrite, fresh_next_tick: Option<DateTime<Utc>>, now: DateTime<Utc>) -> schedule::Model {
    schedule::Model {
        name: w.name.clone(),
        cron: w.cron.clone(),
        timezone: w.timezone.clone(),
        kind: w.kind.clone(),
        payload: w.payload.clone(),
        queue: w.queue.clone(),
        priority: w.priority,
        enabled: w.enabled,
        missed_ticks: w.missed_ticks.clone(),
        origin: w.origin.as_str().to_owned(),
        version: 1,
        last_tick: None,
        next_tick: if w.enabled { fresh_next_tick } else { None },
        created_at: now,
        updated_at: now,
        deleted_at: None,
    }
}

async fn insert_if_absent_row(db: &impl ConnectionTrait, m: &schedule::Model) -> Result<bool, DbError> {
    let row = schedule::ActiveModel {
        name: Set(m.name.clone()),
        cron: Set(m.cron.clone()),
        timezone: Set(m.timezone.clone()),
        kind: Set(m.kind.clone()),
        payload: Set(m.payload.clone()),
        queue: Set(m.queue.clone()),
        priority: Set(m.priority),
        enabled: Set(m.enabled),
        missed_ticks: Set(m.missed_ticks.clone()),
        origin: Set(m.origin.clone()),
        version: Set(m.version),
        last_tick: Set(m.last_tick),
        next_tick: Set(m.next_tick),
        created_at: Set(m.created_at),
        updated_at: Set(m.updated_at),
        deleted_at: Set(m.deleted_at),
    };
    let result = schedule::Entity::insert(row)
        .on_conflict_do_nothing()
        .exec_without_returning(db)
        .await?;
    Ok(matches!(result, TryInsertResult::Inserted(n) if n > 0))
}

/// Inserts a default schedule unless a schedule of that name exists — or existed: a deleted
/// schedule's tombstone keeps a config default from coming back. Safe to run from every replica
/// at once. Returns whether it inserted.
#[tracing::instrument(skip_all, fields(schedule = %w.name))]
pub async fn insert_if_absent(
    db: &impl ConnectionTrait,
    w: &ScheduleWrite,
    fresh_next_tick: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    insert_if_absent_row(db, &new_row(w, fresh_next_tick, now)).await
}

/// A schedule that has not been deleted.
#[tracing::instrument(skip(db))]
pub async fn get(db: &impl ConnectionTrait, name: &str) -> Result<Option<schedule::Model>, DbError> {
    Ok(schedule::Entity::find_by_id(name.to_owned())
        .filter(schedule::Column::DeletedAt.is_null())
        .one(db)
        .await?)
}

/// Every schedule that has not been deleted, by name.
#[tracing::instrument(skip(db))]
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<schedule::Model>, DbError> {
    Ok(schedule::Entity::find()
        .filter(schedule::Column::DeletedAt.is_null())
        .order_by_asc(schedule::Column::Name)
        .all(db)
        .await?)
}

/// Deletes a schedule (leaving a tombstone, see [`insert_if_absent`]). Ticks already claimed are
/// still enqueued. Returns whether there was a schedule to delete.
#[tracing::instrument(skip(db))]
pub async fn delete(db: &impl ConnectionTrait, name: &str, now: DateTime<Utc>) -> Result<bool, DbError> {
    let updated = schedule::Entity::update_many()
        .col_expr(schedule::Column::DeletedAt, Expr::value(now))
        .col_expr(schedule::Column::Enabled, Expr::value(false))
        .col_expr(schedule::Column::NextTick, Expr::value(None::<DateTime<Utc>>))
        .col_expr(schedule::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            schedule::Column::Version,
            Expr::col(schedule::Column::Version).add(1),
        )
        .filter(schedule::Column::Name.eq(name))
        .filter(schedule::Column::DeletedAt.is_null())
        .exec(db)
        .await?;
    Ok(updated.rows_affected > 0)
}

/// Schedules a scheduler should look at: enabled, not deleted, with a next tick.
#[tracing::instrument(skip(db))]
pub async fn active(db: &impl ConnectionTrait) -> Result<Vec<schedule::Model>, DbError> {
    Ok(schedule::Entity::find()
        .filter(schedule::Column::Enabled.eq(true))
        .filter(schedule::Column::DeletedAt.is_null())
        .filter(schedule::Column::NextTick.is_not_null())
        .all(db)
        .await?)
}

/// The most recent ticks of a schedule, newest first.
#[tracing::instrument(skip(db))]
pub async fn recent_ticks(
    db: &impl ConnectionTrait,
    name: &str,
    limit: u64,
) -> Result<Vec<schedule_tick::Model>, DbError> {
    Ok(schedule_tick::Entity::find()
        .filter(schedule_tick::Column::Schedule.eq(name))
        .order_by_desc(schedule_tick::Column::TickAt)
        .limit(limit)
        .all(db)
        .await?)
}

/// A tick a replica is about to claim, with the job it will enqueue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTick {
    pub tick_at: DateTime<Utc>,
    pub job_id: Uuid,
    pub envelope: String,
    pub stands_for: i64,
}

/// What a replica asks [`claim`] to record.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    pub schedule: &'a str,
    /// The version the replica planned from.
    pub version: i64,
    /// The schedule's new `next_tick`: the first tick this claim does not cover.
    pub next_tick: Option<DateTime<Utc>>,
    pub ticks: Vec<NewTick>,
    pub replica: &'a str,
    pub lease_until: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Claims ticks of a schedule for one replica (see the module documentation). Returns the
/// ticks now held by this replica, or `None` when another replica claimed first or the schedule
/// was edited since `version` was read (nothing changed then).
#[tracing::instrument(skip_all, fields(schedule = %c.schedule, version = c.version, ticks = c.ticks.len()))]
pub async fn claim(
    db: &DatabaseConnection,
    c: Claim<'_>,
) -> Result<Option<Vec<schedule_tick::Model>>, DbError> {
    let txn = db.begin().await?;
    let mut update = schedule::Entity::update_many()
        .col_expr(schedule::Column::Version, Expr::value(c.version + 1))
        .col_expr(schedule::Column::NextTick, Expr::value(c.next_tick));
    if let Some(last) = c.ticks.iter().map(|t| t.tick_at).max() {
        update = update.col_expr(schedule::Column::LastTick, Expr::value(last));
    }
    let updated = update
        .filter(schedule::Column::Name.eq(c.schedule))
        .filter(schedule::Column::Version.eq(c.version))
        .filter(schedule::Column::Enabled.eq(true))
        .filter(schedule::Column::DeletedAt.is_null())
        .exec(&txn)
        .await?;
    if updated.rows_affected != 1 {
        txn.rollback().await?;
        return Ok(None);
    }
    let mut held = Vec::with_capacity(c.ticks.len());
    for t in c.ticks {
        let row = schedule_tick::Model {
            schedule: c.schedule.to_owned(),
            tick_at: t.tick_at,
            job_id: t.job_id,
            envelope: t.envelope,
            stands_for: t.stands_for,
            claimed_by: c.replica.to_owned(),
            claims: 1,
            lease_until: c.lease_until,
            claimed_at: c.now,
            enqueued_at: None,
        };
        // A tick recorded before (possible only if an edit moved `next_tick` back over fired
        // ticks, e.g. between hosts with skewed clocks) keeps its first firing.
        let inserted = schedule_tick::Entity::insert(tick_active_model(&row))
            .on_conflict_do_nothing()
            .exec_without_returning(&txn)
            .await?;
        if matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
            held.push(row);
        }
    }
    txn.commit().await?;
    Ok(Some(held))
}

fn tick_active_model(t: &schedule_tick::Model) -> schedule_tick::ActiveModel {
    schedule_tick::ActiveModel {
        schedule: Set(t.schedule.clone()),
        tick_at: Set(t.tick_at),
        job_id: Set(t.job_id),
        envelope: Set(t.envelope.clone()),
        stands_for: Set(t.stands_for),
        claimed_by: Set(t.claimed_by.clone()),
        claims: Set(t.claims),
        lease_until: Set(t.lease_until),
        claimed_at: Set(t.claimed_at),
        enqueued_at: Set(t.enqueued_at),
    }
}

/// Extends the holder's lease on a tick it has not enqueued yet (while a broker is down).
/// Returns false if the tick was taken over or enqueued meanwhile: the holder then stops.
#[tracing::instrument(skip_all, fields(schedule = %t.schedule, tick = %t.tick_at))]
pub async fn extend_lease(
    db: &impl ConnectionTrait,
    t: &schedule_tick::Model,
    until: DateTime<Utc>,
) -> Result<bool, DbError> {
    let updated = schedule_tick::Entity::update_many()
        .col_expr(schedule_tick::Column::LeaseUntil, Expr::value(until))
        .filter(schedule_tick::Column::Schedule.eq(t.schedule.as_str()))
        .filter(schedule_tick::Column::TickAt.eq(t.tick_at))
        .filter(schedule_tick::Column::Claims.eq(t.claims))
        .filter(schedule_tick::Column::EnqueuedAt.is_null())
        .exec(db)
        .await?;
    Ok(updated.rows_affected == 1)
}

/// Records that a broker has the tick's job.
#[tracing::instrument(skip_all, fields(schedule = %t.schedule, tick = %t.tick_at))]
pub async fn mark_enqueued(
    db: &impl ConnectionTrait,
    t: &schedule_tick::Model,
    job_id: Uuid,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    schedule_tick::Entity::update_many()
        .col_expr(schedule_tick::Column::EnqueuedAt, Expr::value(at))
        .col_expr(schedule_tick::Column::JobId, Expr::value(job_id))
        .filter(schedule_tick::Column::Schedule.eq(t.schedule.as_str()))
        .filter(schedule_tick::Column::TickAt.eq(t.tick_at))
        .filter(schedule_tick::Column::EnqueuedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Claimed ticks not enqueued yet that `replica` should try now, oldest first: its own (a push
/// that failed) and any whose holder's lease ran out (a replica that died or hangs).
#[tracing::instrument(skip(db))]
pub async fn unenqueued_ticks(
    db: &impl ConnectionTrait,
    replica: &str,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<schedule_tick::Model>, DbError> {
    Ok(schedule_tick::Entity::find()
        .filter(schedule_tick::Column::EnqueuedAt.is_null())
        .filter(
            schedule_tick::Column::LeaseUntil
                .lt(now)
                .or(schedule_tick::Column::ClaimedBy.eq(replica)),
        )
        .order_by_asc(schedule_tick::Column::TickAt)
        .limit(limit)
        .all(db)
        .await?)
}

/// Takes a stranded tick over for `replica`: compare-and-set on its claim count, so of replicas
/// racing for it one wins. Returns the tick as now held, or `None` if another replica won.
#[tracing::instrument(skip_all, fields(schedule = %t.schedule, tick = %t.tick_at))]
pub async fn take_over(
    db: &impl ConnectionTrait,
    t: &schedule_tick::Model,
    replica: &str,
    lease_until: DateTime<Utc>,
) -> Result<Option<schedule_tick::Model>, DbError> {
    let updated = schedule_tick::Entity::update_many()
        .col_expr(schedule_tick::Column::ClaimedBy, Expr::value(replica))
        .col_expr(schedule_tick::Column::Claims, Expr::value(t.claims + 1))
        .col_expr(schedule_tick::Column::LeaseUntil, Expr::value(lease_until))
        .filter(schedule_tick::Column::Schedule.eq(t.schedule.as_str()))
        .filter(schedule_tick::Column::TickAt.eq(t.tick_at))
        .filter(schedule_tick::Column::Claims.eq(t.claims))
        .filter(schedule_tick::Column::EnqueuedAt.is_null())
        .exec(db)
        .await?;
    Ok((updated.rows_affected == 1).then(|| schedule_tick::Model {
        claimed_by: replica.to_owned(),
        claims: t.claims + 1,
        lease_until,
        ..t.clone()
    }))
}

/// Deletes enqueued ticks older than `before`; returns how many.
#[tracing::instrument(skip(db))]
pub async fn prune_ticks(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64, DbError> {
    let deleted = schedule_tick::Entity::delete_many()
        .filter(schedule_tick::Column::EnqueuedAt.lt(before))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}
