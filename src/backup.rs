//! `drover backup …`: list, verify, restore, run and prune backups from the command line, with
//! a progress bar on the terminal for the long reads.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use jobs::families::backup::Source;
use schema::backups::{self as catalog, BackupStatus};
use uuid::Uuid;
use workers::families::backup::{Backups, Progress};

use crate::config::{self, BackupArgs, Connections};

#[derive(Subcommand, Clone, Debug)]
pub enum BackupCommand {
    /// Lists backups, newest first.
    List {
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// running, succeeded, failed or corrupt.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-reads a backup: digest, decryption, decompression; with --restore-check a postgres
    /// backup is also restored into a scratch database and its row counts compared.
    Verify {
        id: Uuid,
        #[arg(long)]
        restore_check: bool,
        /// age identity file (default: DROVER_BACKUP_AGE_IDENTITY_FILE).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Restores a backup: `--to postgres://…` (an existing, empty database) for postgres
    /// backups, `--to DIR` (absent or empty) for files and config backups. A backup whose
    /// object does not match its recorded SHA-256 is refused before anything is written.
    Restore {
        id: Uuid,
        #[arg(long)]
        to: String,
        /// age identity file (default: DROVER_BACKUP_AGE_IDENTITY_FILE).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Takes a backup of one configured target now, in this process (no broker, no worker).
    Run {
        /// postgres, files or config.
        source: String,
        target: String,
    },
    /// Applies the retention policy now (to one target, or to all).
    Prune {
        #[arg(long, requires = "target")]
        source: Option<String>,
        #[arg(long, requires = "source")]
        target: Option<String>,
    },
    /// Prints the family's default schedules for the configured targets (TOML).
    Schedules,
}

pub async fn run(conn: Connections, args: BackupArgs, command: BackupCommand) -> anyhow::Result<()> {
    let cfg = config::backup_config(&conn, &args)?;
    let effective = config::effective_config(&conn, &config::catalog_config(&conn)?, &cfg);
    let db = schema::connect(conn.database_url.expose())
        .await
        .context("connecting to the database")?;
    let identity = match &command {
        BackupCommand::Verify { identity, .. } | BackupCommand::Restore { identity, .. } => identity.clone(),
        _ => None,
    };
    if !matches!(command, BackupCommand::Schedules) {
        schema::ensure_migrated(&db).await?;
    }
    let mut backups = Backups::new(db, cfg, Some(conn.database_url.expose().to_owned()), effective)
        .context("backup configuration")?;
    if let Some(path) = identity {
        backups = backups.with_identity_file(path);
    }
    match command {
        BackupCommand::List {
            source,
            target,
            status,
            limit,
            json,
        } => {
            let status = status
                .as_deref()
                .map(|s| {
                    BackupStatus::parse(s).ok_or_else(|| anyhow::anyhow!("--status: unknown status {s:?}"))
                })
                .transpose()?;
            let rows = backups
                .list(
                    catalog::Filter {
                        source: source.as_deref(),
                        target: target.as_deref(),
                        status,
                    },
                    limit,
                )
                .await?;
            print_list(&rows, json);
        }
        BackupCommand::Verify {
            id, restore_check, ..
        } => {
            let bar = Bar::new();
            let report = backups.verify(id, restore_check, &bar).await;
            bar.done();
            let report = report?;
            println!(
                "backup {id} verified: {} stored bytes, {} bytes once decoded{}",
                report.stored_bytes,
                report.plain_bytes,
                match &report.table_counts {
                    Some(c) => format!(", restore check: {} tables with matching row counts", c.len()),
                    None => String::new(),
                }
            );
        }
        BackupCommand::Restore { id, to, .. } => {
            let bar = Bar::new();
            let report = backups.restore(id, &to, &bar).await;
            bar.done();
            let report = report?;
            println!(
                "backup {id} ({}) restored to {}: {} bytes",
                report.source,
                config::redact_url(&report.to),
                report.plain_bytes
            );
        }
        BackupCommand::Run { source, target } => {
            let source = Source::parse(&source)
                .ok_or_else(|| anyhow::anyhow!("unknown source {source:?}: postgres, files or config"))?;
            let row = backups.take(Uuid::now_v7(), source, &target).await?;
            println!(
                "backup {} of {source} target {target:?} stored at {}: {} bytes read, {} stored, sha256 {}",
                row.id,
                location(&row),
                row.source_bytes.unwrap_or(0),
                row.stored_bytes.unwrap_or(0),
                row.sha256.as_deref().unwrap_or("")
            );
        }
        BackupCommand::Prune { source, target } => {
            let only = match (source, target) {
                (Some(s), Some(t)) => Some((
                    Source::parse(&s).ok_or_else(|| anyhow::anyhow!("unknown source {s:?}"))?,
                    t,
                )),
                _ => None,
            };
            let report = backups.prune(only).await?;
            println!("kept {} backups, deleted {}", report.kept, report.deleted.len());
        }
        BackupCommand::Schedules => {
            let targets = backups.targets();
            let schedules =
                jobs::families::backup::default_schedules(targets.iter().map(|(s, t)| (*s, t.as_str())));
            #[derive(serde::Serialize)]
            struct Doc {
                schedules: Vec<jobs::schedule::ScheduleConfig>,
            }
            print!("{}", toml::to_string(&Doc { schedules })?);
        }
    }
    Ok(())
}

/// The object's full URL: keys are relative to the store's root (the bucket, or `/`), and
/// already hold the store URL's prefix.
fn location(row: &catalog::Backup) -> String {
    match url::Url::parse(&row.store) {
        Ok(mut u) => {
            u.set_path(&format!("/{}", row.object_key));
            u.to_string()
        }
        Err(_) => row.object_key.clone(),
    }
}

fn print_list(rows: &[catalog::Backup], json: bool) {
    if json {
        for r in rows {
            let v = serde_json::json!({
                "id": r.id, "source": r.source, "target": r.target, "status": r.status,
                "encrypted": r.encrypted, "source_bytes": r.source_bytes, "stored_bytes": r.stored_bytes,
                "sha256": r.sha256, "location": location(r), "error": r.error,
                "started_at": r.started_at, "finished_at": r.finished_at, "verified_at": r.verified_at,
            });
            println!("{v}");
        }
        return;
    }
    println!(
        "{:<36}  {:<8}  {:<16}  {:<9}  {:>12}  {:<3}  {:<20}  verified",
        "id", "source", "target", "status", "stored", "enc", "started"
    );
    for r in rows {
        println!(
            "{:<36}  {:<8}  {:<16}  {:<9}  {:>12}  {:<3}  {:<20}  {}",
            r.id,
            r.source,
            r.target,
            r.status,
            r.stored_bytes.map(|b| b.to_string()).unwrap_or_default(),
            if r.encrypted { "yes" } else { "no" },
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.verified_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_default(),
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
}

/// An indicatif bar per phase (it draws only on a terminal, so scripts see clean output).
struct Bar {
    bar: Arc<ProgressBar>,
}

impl Bar {
    fn new() -> Self {
        Self {
            bar: Arc::new(ProgressBar::hidden()),
        }
    }

    fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn phase(&self, name: &'static str, total_bytes: u64) {
        self.bar.finish_and_clear();
        self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.set_length(total_bytes);
        self.bar.set_position(0);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{msg:>20} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.bar.set_message(name);
        self.bar.reset();
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
}
