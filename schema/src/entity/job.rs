use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;

/// Column meanings are documented in the migration that created them.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "job")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub queue: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub payload: Option<serde_json::Value>,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub trace_id: Option<String>,
    pub worker_id: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub run_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub event_at: DateTime<Utc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::job_attempt::Entity")]
    Attempts,
}

impl Related<super::job_attempt::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Attempts.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
