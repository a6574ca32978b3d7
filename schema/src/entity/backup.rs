use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;

/// Column meanings are documented in the migration that created them.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "backup")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub source: String,
    pub target: String,
    pub status: String,
    pub attempts: i32,
    pub store: String,
    pub object_key: String,
    pub format: String,
    pub encrypted: bool,
    pub source_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    pub sha256: Option<String>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub table_counts: Option<serde_json::Value>,
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
