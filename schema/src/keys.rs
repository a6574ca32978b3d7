//! API keys as stored: id, name, role, the SHA-256 of the key, and when it was created, last
//! used, expires and was revoked. Generating and verifying keys is the API's (`api::auth`); this
//! module only reads and writes rows.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    sea_query::Expr,
};

use crate::{DbError, entity::api_key};

/// Stores a new key.
pub async fn insert(db: &impl ConnectionTrait, key: api_key::Model) -> Result<(), DbError> {
    let row = api_key::ActiveModel {
        id: Set(key.id),
        name: Set(key.name),
        role: Set(key.role),
        secret_sha256: Set(key.secret_sha256),
        created_at: Set(key.created_at),
        last_used_at: Set(key.last_used_at),
        expires_at: Set(key.expires_at),
        revoked_at: Set(key.revoked_at),
    };
    api_key::Entity::insert(row).exec_without_returning(db).await?;
    Ok(())
}

/// The key with this id, revoked and expired ones included.
pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<api_key::Model>, DbError> {
    Ok(api_key::Entity::find_by_id(id.to_owned()).one(db).await?)
}

/// Every key, oldest first.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<api_key::Model>, DbError> {
    Ok(api_key::Entity::find()
        .order_by_asc(api_key::Column::CreatedAt)
        .order_by_asc(api_key::Column::Id)
        .all(db)
        .await?)
}

/// How many keys exist, revoked and expired ones included.
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, DbError> {
    Ok(api_key::Entity::find().count(db).await?)
}

/// Revokes a key; false if there is no key with this id or it was already revoked.
pub async fn revoke(db: &impl ConnectionTrait, id: &str, at: DateTime<Utc>) -> Result<bool, DbError> {
    let res = api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokedAt, Expr::value(at))
        .filter(api_key::Column::Id.eq(id))
        .filter(api_key::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Records that a key was used at `at` (never moving the time back).
pub async fn touch(db: &impl ConnectionTrait, id: &str, at: DateTime<Utc>) -> Result<(), DbError> {
    api_key::Entity::update_many()
        .col_expr(api_key::Column::LastUsedAt, Expr::value(at))
        .filter(api_key::Column::Id.eq(id))
        .filter(
            sea_orm::Condition::any()
                .add(api_key::Column::LastUsedAt.is_null())
                .add(api_key::Column::LastUsedAt.lt(at)),
        )
        .exec(db)
        .await?;
    Ok(())
}
