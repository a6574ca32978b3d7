//! Idempotency keys for brokers that cannot keep them (RabbitMQ): a key maps to the first job
//! pushed with it until it expires. Claims are atomic across processes through the table's
//! primary key, so two API replicas pushing the same key at once get one job.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TryInsertResult};
use uuid::Uuid;

use crate::DbError;
use crate::entity::idempotency_key;

/// Claims `key` of `queue` for `job_id` until `expires_at`. Returns `None` when the claim is
/// this job's (a new key, or one whose holder expired), else the id of the job holding it.
#[tracing::instrument(skip(db))]
pub async fn claim(
    db: &impl ConnectionTrait,
    queue: &str,
    key: &str,
    job_id: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<Option<Uuid>, DbError> {
    let row = idempotency_key::ActiveModel {
        queue: Set(queue.to_owned()),
        key: Set(key.to_owned()),
        job_id: Set(job_id),
        expires_at: Set(expires_at),
    };
    let inserted = idempotency_key::Entity::insert(row)
        .on_conflict_do_nothing()
        .exec_without_returning(db)
        .await?;
    if matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
        return Ok(None);
    }
    // Taken: ours only if its holder expired, and only for one of several racing claimers.
    let taken_over = idempotency_key::Entity::update_many()
        .col_expr(idempotency_key::Column::JobId, Expr::value(job_id))
        .col_expr(idempotency_key::Column::ExpiresAt, Expr::value(expires_at))
        .filter(idempotency_key::Column::Queue.eq(queue))
        .filter(idempotency_key::Column::Key.eq(key))
        .filter(idempotency_key::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?;
    if taken_over.rows_affected > 0 {
        return Ok(None);
    }
    let holder = idempotency_key::Entity::find_by_id((queue.to_owned(), key.to_owned()))
        .one(db)
        .await?;
    // Deleted in between (its push failed): the next push claims it afresh.
    Ok(Some(holder.map_or(job_id, |h| h.job_id)))
}

/// Gives a key back after the push of its job failed, so that the client's retry is not
/// answered with the id of a job the broker never stored.
#[tracing::instrument(skip(db))]
pub async fn release(db: &impl ConnectionTrait, queue: &str, key: &str, job_id: Uuid) -> Result<(), DbError> {
    idempotency_key::Entity::delete_many()
        .filter(idempotency_key::Column::Queue.eq(queue))
        .filter(idempotency_key::Column::Key.eq(key))
        .filter(idempotency_key::Column::JobId.eq(job_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Deletes keys that expired before `now`; returns how many.
#[tracing::instrument(skip(db))]
pub async fn delete_expired(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<u64, DbError> {
    let res = idempotency_key::Entity::delete_many()
        .filter(idempotency_key::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}
