//! Idempotency keys of brokers that cannot hold them (RabbitMQ): the first job pushed with a
//! key, per queue, until the key expires. The primary key makes a claim atomic across API
//! replicas.

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
                    .table(IdempotencyKey::Table)
                    // The broker prefix and queue, `prefix.queue`: keys are per queue, as on Redis.
                    .col(string(IdempotencyKey::Queue))
                    // The key as the client sent it (at most 256 characters).
                    .col(string(IdempotencyKey::Key))
                    // The job that first used the key; a repeated push returns this id.
                    .col(uuid(IdempotencyKey::JobId))
                    // After this a push with the key makes a new job (and takes the key over).
                    .col(timestamp_with_time_zone(IdempotencyKey::ExpiresAt))
                    .primary_key(
                        Index::create()
                            .col(IdempotencyKey::Queue)
                            .col(IdempotencyKey::Key),
                    )
                    .to_owned(),
            )
            .await?;
        // Deleting expired keys.
        manager
            .create_index(
                Index::create()
                    .name("idempotency_key_expires_at_idx")
                    .table(IdempotencyKey::Table)
                    .col(IdempotencyKey::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(IdempotencyKey::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum IdempotencyKey {
    Table,
    Queue,
    Key,
    JobId,
    ExpiresAt,
}
