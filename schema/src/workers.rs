//! Worker presence: each worker process upserts its row at every heartbeat, so every API
//! replica can list the workers of the whole deployment; a row whose heartbeat is older than
//! the expiry is a worker that died without saying so, and is deleted by the next heartbeat of
//! any worker (and never listed).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use crate::DbError;
use crate::entity::worker;

pub use crate::entity::worker::Model as WorkerRow;

/// A worker whose last heartbeat is older than this is gone: six missed beats of the workers'
/// 5 s heartbeat, so a busy database does not make a live worker vanish from the list.
pub const EXPIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Records that the worker `row.id` is alive at `row.heartbeat_at` (creating its row on the
/// first beat, replacing what it says about itself on later ones).
#[tracing::instrument(skip_all, fields(worker = %row.id))]
pub async fn heartbeat(db: &impl ConnectionTrait, row: WorkerRow) -> Result<(), DbError> {
    worker::Entity::insert(worker::ActiveModel::from(row))
        .on_conflict(
            OnConflict::column(worker::Column::Id)
                .update_columns([
                    worker::Column::Host,
                    worker::Column::Queues,
                    worker::Column::Concurrency,
                    worker::Column::HeartbeatAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Deletes the rows of workers whose last heartbeat is older than `before`; returns how many.
#[tracing::instrument(skip(db))]
pub async fn expire(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64, DbError> {
    let deleted = worker::Entity::delete_many()
        .filter(worker::Column::HeartbeatAt.lt(before))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// A worker that stops cleanly takes its row with it.
#[tracing::instrument(skip(db))]
pub async fn remove(db: &impl ConnectionTrait, id: &str) -> Result<(), DbError> {
    worker::Entity::delete_by_id(id.to_owned()).exec(db).await?;
    Ok(())
}

/// Workers whose last heartbeat is at or after `since`, by id.
#[tracing::instrument(skip(db))]
pub async fn live(db: &impl ConnectionTrait, since: DateTime<Utc>) -> Result<Vec<WorkerRow>, DbError> {
    Ok(worker::Entity::find()
        .filter(worker::Column::HeartbeatAt.gte(since))
        .order_by_asc(worker::Column::Id)
        .all(db)
        .await?)
}

/// A worker's queues as stored (comma-separated), as a list.
pub fn queues_of(row: &WorkerRow) -> Vec<String> {
    row.queues
        .split(',')
        .filter(|q| !q.is_empty())
        .map(str::to_owned)
        .collect()
}
