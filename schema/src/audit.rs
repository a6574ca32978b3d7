//! The audit log: one row per mutating API call (who, what, the outcome), written in batches by
//! a [`BatchWriter`] so that recording never holds up a request, and one structured log line
//! (`target: "drover::audit"`) per call, emitted by that same background task.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ConnectionTrait, DatabaseConnection, EntityTrait, QueryOrder, QuerySelect};

use crate::{
    DbError,
    entity::audit_log,
    history::{BatchSink, BatchTask, BatchWriter},
};

/// One audited call. Column meanings are in the migration that created `audit_log`.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub key_id: Option<String>,
    pub role: Option<String>,
    pub method: String,
    pub route: String,
    pub target: String,
    pub status: u16,
    pub outcome: &'static str,
    pub client_ip: Option<String>,
}

/// Records [`AuditEntry`]s; see [`BatchWriter`].
pub type AuditWriter = BatchWriter<AuditEntry>;
/// The audit writer's task.
pub type AuditTask = BatchTask<AuditEntry>;

/// Rows per INSERT: well under SQLite's 32 766 bound parameters (9 columns).
const ROWS_PER_INSERT: usize = 1000;

impl BatchSink for AuditEntry {
    const WHAT: &'static str = "audit log";
    const LABEL: &'static str = "audit";

    async fn write(db: &DatabaseConnection, batch: &[Self]) -> Result<(), DbError> {
        for chunk in batch.chunks(ROWS_PER_INSERT) {
            let rows = chunk.iter().map(|e| audit_log::ActiveModel {
                at: Set(e.at),
                key_id: Set(e.key_id.clone()),
                role: Set(e.role.clone()),
                method: Set(e.method.clone()),
                route: Set(e.route.clone()),
                target: Set(e.target.clone()),
                status: Set(i16::try_from(e.status).unwrap_or(i16::MAX)),
                outcome: Set(e.outcome.to_owned()),
                client_ip: Set(e.client_ip.clone()),
                ..Default::default()
            });
            audit_log::Entity::insert_many(rows)
                .exec_without_returning(db)
                .await?;
        }
        // The log line goes out once the row is written (or at least tried): the writer task
        // emits it, so a request never formats or writes a log line for its audit.
        for e in batch {
            tracing::info!(
                target: "drover::audit",
                key_id = e.key_id.as_deref().unwrap_or("-"),
                role = e.role.as_deref().unwrap_or("-"),
                method = %e.method,
                route = %e.route,
                target_ = %e.target,
                status = e.status,
                outcome = e.outcome,
                client_ip = e.client_ip.as_deref().unwrap_or("-"),
                "audit"
            );
        }
        Ok(())
    }
}

/// The newest `limit` audit rows, newest first.
pub async fn recent(db: &impl ConnectionTrait, limit: u64) -> Result<Vec<audit_log::Model>, DbError> {
    Ok(audit_log::Entity::find()
        .order_by_desc(audit_log::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}
