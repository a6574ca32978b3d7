//! What each URL of an HTTP cache warmer answered the last time it was fetched.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use crate::DbError;
use crate::entity::warm_url;

pub use crate::entity::warm_url::Model as WarmUrl;

/// Records the outcome of one GET (replacing the previous one of the same warmer and URL).
pub async fn record(db: &impl ConnectionTrait, row: WarmUrl) -> Result<(), DbError> {
    warm_url::Entity::insert(warm_url::ActiveModel::from(row))
        .on_conflict(
            OnConflict::columns([warm_url::Column::Warmer, warm_url::Column::Url])
                .update_columns([
                    warm_url::Column::Status,
                    warm_url::Column::LatencyMs,
                    warm_url::Column::Bytes,
                    warm_url::Column::Error,
                    warm_url::Column::CheckedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The URLs of `warmer` as last fetched, by URL.
pub async fn of_warmer(db: &impl ConnectionTrait, warmer: &str) -> Result<Vec<WarmUrl>, DbError> {
    Ok(warm_url::Entity::find()
        .filter(warm_url::Column::Warmer.eq(warmer))
        .order_by_asc(warm_url::Column::Url)
        .all(db)
        .await?)
}

/// When `warmer` last checked anything.
pub fn last_checked(rows: &[WarmUrl]) -> Option<DateTime<Utc>> {
    rows.iter().map(|r| r.checked_at).max()
}
