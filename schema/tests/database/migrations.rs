use schema::DbError;
use sea_orm_migration::MigratorTrait;

use crate::support::{with_empty_databases, with_migrated_databases};

#[tokio::test]
async fn a_migrated_database_passes_the_startup_check() {
    with_migrated_databases(|db| async move {
        schema::ensure_migrated(&db).await.expect("migrated");
        // Running it again is a no-op, as `drover migrate` on every deploy expects.
        schema::migrate(&db).await.expect("migrate twice");
        schema::ensure_migrated(&db).await.expect("still migrated");
    })
    .await;
}

#[tokio::test]
async fn an_empty_database_is_refused_with_the_command_that_fixes_it() {
    with_empty_databases(|db| async move {
        let error = schema::ensure_migrated(&db).await.expect_err("not migrated");
        let DbError::NotMigrated { pending } = &error else {
            panic!("expected NotMigrated, got {error:?}");
        };
        let all: Vec<String> = schema::migration::Migrator::migrations()
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        assert_eq!(pending, &all);
        assert_eq!(pending[0], "m20261123_000001_job_history");
        assert_eq!(
            error.to_string(),
            format!(
                "database is not migrated ({} pending migrations: {}); run `drover migrate`",
                all.len(),
                all.join(", ")
            )
        );
    })
    .await;
}
