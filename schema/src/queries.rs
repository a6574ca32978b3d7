//! Reads for the API and dashboard, and the API's cancel. Every function takes any
//! `ConnectionTrait`, so callers can pass a pool or a transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait};
use uuid::Uuid;

use crate::DbError;
use crate::entity::{job, job_attempt};
use crate::history::JobState;

/// A job with its attempts, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub job: job::Model,
    pub attempts: Vec<job_attempt::Model>,
}

#[tracing::instrument(skip(db))]
pub async fn get_job(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<JobView>, DbError> {
    let Some(job) = job::Entity::find_by_id(id).one(db).await? else {
        return Ok(None);
    };
    let attempts = job_attempt::Entity::find()
        .filter(job_attempt::Column::JobId.eq(id))
        .order_by_asc(job_attempt::Column::Attempt)
        .all(db)
        .await?;
    Ok(Some(JobView { job, attempts }))
}

/// Jobs per status in `queue`, with every status present (zero if none).
#[tracing::instrument(skip(db))]
pub async fn count_by_status(
    db: &impl ConnectionTrait,
    queue: &str,
) -> Result<HashMap<String, u64>, DbError> {
    let rows: Vec<(String, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "count")
        .filter(job::Column::Queue.eq(queue))
        .group_by(job::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let mut counts: HashMap<String, u64> = JobState::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), 0))
        .collect();
    for (status, count) in rows {
        counts.insert(status, u64::try_from(count).unwrap_or_default());
    }
    Ok(counts)
}

/// Jobs, newest first, optionally only those in `queue` and/or with `status`.
#[tracing::instrument(skip(db))]
pub async fn list_jobs(
    db: &impl ConnectionTrait,
    queue: Option<&str>,
    status: Option<&str>,
    limit: u64,
    offset: u64,
) -> Result<Vec<job::Model>, DbError> {
    let jobs = job::Entity::find()
        .apply_if(queue, |q, queue| q.filter(job::Column::Queue.eq(queue)))
        .apply_if(status, |q, status| q.filter(job::Column::Status.eq(status)))
        .order_by_desc(job::Column::CreatedAt)
        // UUIDv7 ids break ties in creation order.
        .order_by_desc(job::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?;
    Ok(jobs)
}

/// What [`cancel_job`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelResult {
    Canceled,
    NotFound,
    /// The job has already started or finished; carries its status.
    NotCancelable(String),
}

/// Cancels a job that has not started yet (pending or scheduled).
#[tracing::instrument(skip(db))]
pub async fn cancel_job(
    db: &impl ConnectionTrait,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<CancelResult, DbError> {
    let cancelable = [JobState::Pending.as_str(), JobState::Scheduled.as_str()];
    let updated = job::Entity::update_many()
        .col_expr(job::Column::Status, Expr::value(JobState::Canceled.as_str()))
        .col_expr(job::Column::FinishedAt, Expr::value(at))
        // Never move `event_at` back: an event older than the stored one must not undo the cancel.
        .col_expr(
            job::Column::EventAt,
            Func::greatest([Expr::col(job::Column::EventAt), Expr::value(at)]).into(),
        )
        .filter(job::Column::Id.eq(id))
        .filter(job::Column::Status.is_in(cancelable))
        .exec(db)
        .await?;
    if updated.rows_affected > 0 {
        return Ok(CancelResult::Canceled);
    }
    let status: Option<String> = job::Entity::find_by_id(id)
        .select_only()
        .column(job::Column::Status)
        .into_tuple()
        .one(db)
        .await?;
    Ok(match status {
        Some(status) => CancelResult::NotCancelable(status),
        None => CancelResult::NotFound,
    })
}

/// Records that dead jobs were put back in line (RabbitMQ, whose job state lives here);
/// returns how many were recorded as dead.
#[tracing::instrument(skip(db, ids), fields(jobs = ids.len()))]
pub async fn revive_dead_jobs(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
    at: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let updated = job::Entity::update_many()
        .col_expr(job::Column::Status, Expr::value(JobState::Pending.as_str()))
        .col_expr(
            job::Column::EventAt,
            Func::greatest([Expr::col(job::Column::EventAt), Expr::value(at)]).into(),
        )
        .filter(job::Column::Id.is_in(ids.iter().copied()))
        .filter(job::Column::Status.eq(JobState::Dead.as_str()))
        .exec(db)
        .await?;
    Ok(updated.rows_affected)
}

/// Ids of jobs canceled at or after `since`: workers poll this to skip jobs they hold.
#[tracing::instrument(skip(db))]
pub async fn canceled_since(db: &impl ConnectionTrait, since: DateTime<Utc>) -> Result<Vec<Uuid>, DbError> {
    let ids = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(JobState::Canceled.as_str()))
        .filter(job::Column::EventAt.gte(since))
        .into_tuple()
        .all(db)
        .await?;
    Ok(ids)
}
