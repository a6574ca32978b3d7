//! Migrations run in file-name order. A migration that has shipped is never edited: add a new one.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261123_000001_job_history;
mod m20261123_100000_schedules;
mod m20261123_110000_backups;
mod m20261201_120000_families;
mod m20261201_130000_api_keys_and_audit;
mod m20261201_140000_idempotency_keys;
mod m20261202_010000_dashboard;

/// Every migration this build knows, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_job_history::Migration),
            Box::new(m20261123_100000_schedules::Migration),
            Box::new(m20261123_110000_backups::Migration),
            Box::new(m20261201_120000_families::Migration),
            Box::new(m20261201_130000_api_keys_and_audit::Migration),
            Box::new(m20261201_140000_idempotency_keys::Migration),
            Box::new(m20261202_010000_dashboard::Migration),
        ]
    }
}
