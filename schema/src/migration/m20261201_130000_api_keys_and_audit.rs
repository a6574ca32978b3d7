//! API keys (who may call the API, with which role) and the audit log (every mutating call).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(super) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKey::Table)
                    // The public part of the key (`drv_<id>_<secret>`): lookups are by id, so the
                    // secret is only ever compared against its hash.
                    .col(string(ApiKey::Id).primary_key())
                    // Who or what the key is for; not unique (a rotated key may keep its name).
                    .col(string(ApiKey::Name))
                    // viewer, operator or admin.
                    .col(string(ApiKey::Role))
                    // Hex SHA-256 of the whole key string. The key itself is never stored.
                    .col(string(ApiKey::SecretSha256))
                    .col(timestamp_with_time_zone(ApiKey::CreatedAt))
                    // Updated off the request path, at most about once a minute per key.
                    .col(timestamp_with_time_zone_null(ApiKey::LastUsedAt))
                    // Null: never expires.
                    .col(timestamp_with_time_zone_null(ApiKey::ExpiresAt))
                    // Set by `drover keys revoke`; a revoked key is kept for the audit trail.
                    .col(timestamp_with_time_zone_null(ApiKey::RevokedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(big_integer(AuditLog::Id).auto_increment().primary_key())
                    // When the API answered the call.
                    .col(timestamp_with_time_zone(AuditLog::At))
                    // The key the caller presented (its id only); null without a readable key.
                    .col(string_null(AuditLog::KeyId))
                    // The key's role when it was verified; null when it was not.
                    .col(string_null(AuditLog::Role))
                    .col(string(AuditLog::Method))
                    // The route template (`/v1/jobs/{id}`), or `unmatched`.
                    .col(string(AuditLog::Route))
                    // What the call acted on: the path it named, or the job it created
                    // (the response's `Location`).
                    .col(string(AuditLog::Target))
                    // The HTTP status answered.
                    .col(small_integer(AuditLog::Status))
                    // ok (2xx), rejected (other 4xx), unauthorized (401), forbidden (403),
                    // limited (429) or failed (5xx).
                    .col(string(AuditLog::Outcome))
                    // The peer address the request came from.
                    .col(string_null(AuditLog::ClientIp))
                    .to_owned(),
            )
            .await?;
        // "What did this key do" and "what happened lately".
        manager
            .create_index(
                Index::create()
                    .name("audit_log_key_at_idx")
                    .table(AuditLog::Table)
                    .col(AuditLog::KeyId)
                    .col(AuditLog::At)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("audit_log_at_idx")
                    .table(AuditLog::Table)
                    .col(AuditLog::At)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AuditLog::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ApiKey::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKey {
    Table,
    Id,
    Name,
    Role,
    SecretSha256,
    CreatedAt,
    LastUsedAt,
    ExpiresAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    KeyId,
    Role,
    Method,
    Route,
    Target,
    Status,
    Outcome,
    ClientIp,
}
