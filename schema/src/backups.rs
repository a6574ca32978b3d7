//! The backup catalog's reads and writes. Every function takes any `ConnectionTrait`, so callers
//! can pass a pool or a transaction; every query runs on Postgres and SQLite.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait,
};
use uuid::Uuid;

use crate::DbError;
use crate::entity::backup;

pub use crate::entity::backup::Model as Backup;

/// A backup's status, as stored in `backup.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackupStatus {
    Running,
    Succeeded,
    Failed,
    /// A verify could not read it back (digest mismatch, decryption or decompression failure).
    Corrupt,
}

impl BackupStatus {
    pub const ALL: [BackupStatus; 4] = [Self::Running, Self::Succeeded, Self::Failed, Self::Corrupt];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Corrupt => "corrupt",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for BackupStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known when an attempt at a backup starts.
#[derive(Clone, Debug)]
pub struct Started {
    pub id: Uuid,
    pub source: String,
    pub target: String,
    pub store: String,
    pub object_key: String,
    pub format: String,
    pub encrypted: bool,
    pub at: DateTime<Utc>,
}

/// What is known when a backup has been stored.
#[derive(Clone, Debug)]
pub struct Stored {
    pub source_bytes: i64,
    pub stored_bytes: i64,
    pub sha256: String,
    pub table_counts: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
}

/// Records the start of an attempt: a new row, or the row of the job's earlier attempt reset to
/// `running` (a retried job overwrites its own object).
#[tracing::instrument(skip_all, fields(backup.id = %s.id))]
pub async fn start(db: &impl ConnectionTrait, s: Started) -> Result<(), DbError> {
    let row = backup::ActiveModel {
        id: Set(s.id),
        source: Set(s.source),
        target: Set(s.target),
        status: Set(BackupStatus::Running.as_str().into()),
        attempts: Set(1),
        store: Set(s.store),
        object_key: Set(s.object_key),
        format: Set(s.format),
        encrypted: Set(s.encrypted),
        source_bytes: Set(None),
        stored_bytes: Set(None),
        sha256: Set(None),
        table_counts: Set(None),
        error: Set(None),
        started_at: Set(s.at),
        finished_at: Set(None),
        verified_at: Set(None),
    };
    backup::Entity::insert(row)
        .on_conflict(
            OnConflict::column(backup::Column::Id)
                .update_columns([
                    backup::Column::Status,
                    backup::Column::Store,
                    backup::Column::ObjectKey,
                    backup::Column::Format,
                    backup::Column::Encrypted,
                    backup::Column::SourceBytes,
                    backup::Column::StoredBytes,
                    backup::Column::Sha256,
                    backup::Column::TableCounts,
                    backup::Column::Error,
                    backup::Column::StartedAt,
                    backup::Column::FinishedAt,
                    backup::Column::VerifiedAt,
                ])
                .value(
                    backup::Column::Attempts,
                    Expr::col((backup::Entity, backup::Column::Attempts)).add(1),
                )
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Marks a running backup succeeded, with its sizes and digest.
#[tracing::instrument(skip_all, fields(backup.id = %id))]
pub async fn succeeded(db: &impl ConnectionTrait, id: Uuid, s: Stored) -> Result<(), DbError> {
    backup::Entity::update_many()
        .col_expr(
            backup::Column::Status,
            Expr::value(BackupStatus::Succeeded.as_str()),
        )
        .col_expr(backup::Column::SourceBytes, Expr::value(s.source_bytes))
        .col_expr(backup::Column::StoredBytes, Expr::value(s.stored_bytes))
        .col_expr(backup::Column::Sha256, Expr::value(s.sha256))
        .col_expr(backup::Column::TableCounts, Expr::value(s.table_counts))
        .col_expr(backup::Column::FinishedAt, Expr::value(s.at))
        .col_expr(backup::Column::Error, Expr::value(Option::<String>::None))
        .filter(backup::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Marks a backup failed with `error`.
#[tracing::instrument(skip_all, fields(backup.id = %id))]
pub async fn failed(
    db: &impl ConnectionTrait,
    id: Uuid,
    error: &str,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    set_status(db, id, BackupStatus::Failed, Some(error), at).await
}

/// Marks a stored backup corrupt: a verify could not read it back.
#[tracing::instrument(skip_all, fields(backup.id = %id))]
pub async fn corrupt(
    db: &impl ConnectionTrait,
    id: Uuid,
    error: &str,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    set_status(db, id, BackupStatus::Corrupt, Some(error), at).await
}

async fn set_status(
    db: &impl ConnectionTrait,
    id: Uuid,
    status: BackupStatus,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    let mut update = backup::Entity::update_many()
        .col_expr(backup::Column::Status, Expr::value(status.as_str()))
        .col_expr(backup::Column::Error, Expr::value(error.map(str::to_owned)));
    if status != BackupStatus::Corrupt {
        update = update.col_expr(backup::Column::FinishedAt, Expr::value(at));
    }
    update.filter(backup::Column::Id.eq(id)).exec(db).await?;
    Ok(())
}

/// Records a successful verify.
#[tracing::instrument(skip_all, fields(backup.id = %id))]
pub async fn verified(db: &impl ConnectionTrait, id: Uuid, at: DateTime<Utc>) -> Result<(), DbError> {
    backup::Entity::update_many()
        .col_expr(backup::Column::VerifiedAt, Expr::value(at))
        .filter(backup::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

#[tracing::instrument(skip(db))]
pub async fn get(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Backup>, DbError> {
    Ok(backup::Entity::find_by_id(id).one(db).await?)
}

/// Which backups [`list`] returns.
#[derive(Clone, Debug, Default)]
pub struct Filter<'a> {
    pub source: Option<&'a str>,
    pub target: Option<&'a str>,
    pub status: Option<BackupStatus>,
}

/// Backups, newest first.
#[tracing::instrument(skip(db))]
pub async fn list(
    db: &impl ConnectionTrait,
    filter: Filter<'_>,
    limit: u64,
    offset: u64,
) -> Result<Vec<Backup>, DbError> {
    let rows = backup::Entity::find()
        .apply_if(filter.source, |q, v| q.filter(backup::Column::Source.eq(v)))
        .apply_if(filter.target, |q, v| q.filter(backup::Column::Target.eq(v)))
        .apply_if(filter.status, |q, v| {
            q.filter(backup::Column::Status.eq(v.as_str()))
        })
        .order_by_desc(backup::Column::StartedAt)
        .order_by_desc(backup::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?;
    Ok(rows)
}

/// Every `(source, target)` that has backups.
#[tracing::instrument(skip(db))]
pub async fn targets(db: &impl ConnectionTrait) -> Result<Vec<(String, String)>, DbError> {
    let rows = backup::Entity::find()
        .select_only()
        .column(backup::Column::Source)
        .column(backup::Column::Target)
        .distinct()
        .order_by_asc(backup::Column::Source)
        .order_by_asc(backup::Column::Target)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows)
}

/// Deletes catalog rows (after their objects are gone).
#[tracing::instrument(skip(db))]
pub async fn delete(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let res = backup::Entity::delete_many()
        .filter(backup::Column::Id.is_in(ids.iter().copied()))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Every backup of one target, newest first (what retention looks at).
#[tracing::instrument(skip(db))]
pub async fn of_target(
    db: &impl ConnectionTrait,
    source: &str,
    target: &str,
) -> Result<Vec<Backup>, DbError> {
    let rows = backup::Entity::find()
        .filter(backup::Column::Source.eq(source))
        .filter(backup::Column::Target.eq(target))
        .order_by_desc(backup::Column::StartedAt)
        .order_by_desc(backup::Column::Id)
        .all(db)
        .await?;
    Ok(rows)
}

/// A corrupt backup that a later verify read back intact is good again.
#[tracing::instrument(skip(db))]
pub async fn succeeded_again(db: &impl ConnectionTrait, id: Uuid) -> Result<(), DbError> {
    backup::Entity::update_many()
        .col_expr(
            backup::Column::Status,
            Expr::value(BackupStatus::Succeeded.as_str()),
        )
        .col_expr(backup::Column::Error, Expr::value(Option::<String>::None))
        .filter(backup::Column::Id.eq(id))
        .filter(backup::Column::Status.eq(BackupStatus::Corrupt.as_str()))
        .exec(db)
        .await?;
    Ok(())
}
