//! The backup catalog: one row per backup (per `backup.run` job, whose id it shares), written by
//! the backup workers and read by the API, the CLI's restore and the retention prune.

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
                    .table(Backup::Table)
                    // The id of the job that takes the backup (a fresh UUIDv7 for `drover backup run`).
                    .col(pk_uuid(Backup::Id))
                    // postgres, files or config.
                    .col(string(Backup::Source))
                    // The configured target's name within its source.
                    .col(string(Backup::Target))
                    // running, succeeded, failed, or corrupt (a verify found it unreadable).
                    // Only succeeded backups count as good: restore and retention rely on it.
                    .col(string(Backup::Status))
                    // Attempts that wrote this row (a retried job updates the same row).
                    .col(integer(Backup::Attempts).default(1))
                    // The object store's URL, without credentials (file:///…, s3://bucket/prefix).
                    .col(string(Backup::Store))
                    // The object's key within the store.
                    .col(string(Backup::ObjectKey))
                    // What the object holds once decrypted and decompressed: pg_dump-custom, tar or toml.
                    .col(string(Backup::Format))
                    // Encrypted to an age recipient (restoring needs the matching identity).
                    .col(boolean(Backup::Encrypted))
                    // Bytes read from the source, before compression.
                    .col(big_integer_null(Backup::SourceBytes))
                    // Bytes of the stored object.
                    .col(big_integer_null(Backup::StoredBytes))
                    // Hex SHA-256 of the stored object, computed while streaming it to the store.
                    .col(string_null(Backup::Sha256))
                    // postgres: rows per table ("schema.table": n) in the dump's snapshot, which
                    // a verify with restore_check compares against.
                    .col(json_binary_null(Backup::TableCounts))
                    // Why the latest attempt failed, or why the latest verify found it corrupt.
                    .col(text_null(Backup::Error))
                    .col(timestamp_with_time_zone(Backup::StartedAt))
                    // When the backup succeeded or failed; null while running.
                    .col(timestamp_with_time_zone_null(Backup::FinishedAt))
                    // When a verify last read it back successfully.
                    .col(timestamp_with_time_zone_null(Backup::VerifiedAt))
                    .to_owned(),
            )
            .await?;
        // Listings and retention: a target's backups by status, newest first.
        manager
            .create_index(
                Index::create()
                    .name("backup_target_status_started_idx")
                    .table(Backup::Table)
                    .col(Backup::Source)
                    .col(Backup::Target)
                    .col(Backup::Status)
                    .col(Backup::StartedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("backup_started_idx")
                    .table(Backup::Table)
                    .col(Backup::StartedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Backup::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Backup {
    Table,
    Id,
    Source,
    Target,
    Status,
    Attempts,
    Store,
    ObjectKey,
    Format,
    Encrypted,
    SourceBytes,
    StoredBytes,
    Sha256,
    TableCounts,
    Error,
    StartedAt,
    FinishedAt,
    VerifiedAt,
}
