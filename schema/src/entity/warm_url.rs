use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;

/// Column meanings are documented in the migration that created them.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "warm_url")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub warmer: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub url: String,
    pub status: Option<i32>,
    pub latency_ms: f64,
    pub bytes: Option<i64>,
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
