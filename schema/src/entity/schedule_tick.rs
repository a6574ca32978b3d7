use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;

/// Column meanings are documented in the migration that created them.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "schedule_tick")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub schedule: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub tick_at: DateTime<Utc>,
    pub job_id: Uuid,
    #[sea_orm(column_type = "Text")]
    pub envelope: String,
    pub stands_for: i64,
    pub claimed_by: String,
    pub claims: i32,
    pub lease_until: DateTime<Utc>,
    pub claimed_at: DateTime<Utc>,
    pub enqueued_at: Option<DateTime<Utc>>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
