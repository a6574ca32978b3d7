//! The backup family's configuration: where backups go, how they are protected, what is backed
//! up and how long it is kept. Read from the `[backup]` table of the TOML config, with the
//! `DROVER_BACKUP_*` environment variables on top (see README). Defaults are documented on each
//! field.

use std::{collections::BTreeMap, path::PathBuf};

use jobs::families::backup::Source;
use serde::{Deserialize, Serialize};

/// `[backup]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Object store URL: `file:///abs/path`, a plain path (made absolute), or
    /// `s3://bucket/prefix` (credentials in `store_options` or the `AWS_*` environment).
    /// Default: `drover-backups` in the working directory.
    pub store: String,
    /// Options of the store's builder (object_store keys such as `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_region`, `aws_endpoint`, `aws_allow_http`). Secret: the
    /// config backup redacts every value.
    pub store_options: BTreeMap<String, String>,
    /// age recipients (`age1…`) backups are encrypted to; none means unencrypted.
    pub age_recipients: Vec<String>,
    /// File holding the age identities (`AGE-SECRET-KEY-1…`) verify and restore decrypt with.
    /// Only verify/restore processes need it; a backup worker never does.
    pub age_identity_file: Option<PathBuf>,
    /// URL that receives a JSON POST when a backup or verify fails for good (after its last
    /// attempt), and on success when `webhook_on_success`.
    pub webhook_url: Option<String>,
    pub webhook_on_success: bool,
    /// zstd level, 1–19. Default 3: about as fast as the disk on one core.
    pub zstd_level: i32,
    /// Whether the scheduler installs the family's default schedules (see docs/backups.md).
    pub schedules: bool,
    pub retention: Retention,
    /// Back up drover's own database (`DROVER_DATABASE_URL`) as postgres target `drover` when
    /// it is a Postgres URL. Default true.
    pub drover_database: bool,
    /// Back up drover's effective configuration as config target `drover`. Default true.
    pub drover_config: bool,
    pub postgres: Vec<PostgresTarget>,
    pub files: Vec<FilesTarget>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            store: "drover-backups".into(),
            store_options: BTreeMap::new(),
            age_recipients: Vec::new(),
            age_identity_file: None,
            webhook_url: None,
            webhook_on_success: false,
            zstd_level: 3,
            schedules: true,
            retention: Retention::default(),
            drover_database: true,
            drover_config: true,
            postgres: Vec::new(),
            files: Vec::new(),
        }
    }
}

/// Grandfather-father-son retention of one target's good backups: the union of the newest
/// `keep_last`, the newest of each of the last `keep_daily` days that have backups, and the
/// newest of each of the last `keep_weekly` ISO weeks that have backups (days and weeks in
/// UTC). The newest good backup is always kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
}

impl Default for Retention {
    /// 7 last, 14 daily, 8 weekly: two weeks of dailies and two months of weeklies.
    fn default() -> Self {
        Self {
            keep_last: 7,
            keep_daily: 14,
            keep_weekly: 8,
        }
    }
}

/// `[[backup.postgres]]`: a database to `pg_dump`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTarget {
    pub name: String,
    /// `postgres://user:password@host:port/db`. Secret: redacted in the config backup.
    pub url: String,
}

/// `[[backup.files]]`: a tar of `paths` (files or directories, recursively).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesTarget {
    pub name: String,
    pub paths: Vec<PathBuf>,
    /// Globs over paths relative to each of `paths` (`**/*.csv`); a file is kept when it
    /// matches one (or when the list is empty).
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs over the same relative paths; a match leaves the file (or the whole directory) out.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A configured target, resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Postgres(PostgresTarget),
    Files(FilesTarget),
    /// drover's effective configuration.
    Config,
}

impl BackupConfig {
    /// The configured targets of every source, `drover_database_url` being drover's own.
    pub fn targets(&self, drover_database_url: Option<&str>) -> Vec<(Source, String)> {
        let mut out: Vec<(Source, String)> = self
            .postgres_targets(drover_database_url)
            .into_iter()
            .map(|t| (Source::Postgres, t.name))
            .collect();
        out.extend(self.files.iter().map(|t| (Source::Files, t.name.clone())));
        if self.drover_config {
            out.push((Source::Config, "drover".into()));
        }
        out
    }

    fn postgres_targets(&self, drover_database_url: Option<&str>) -> Vec<PostgresTarget> {
        let mut out = self.postgres.clone();
        if let Some(url) = drover_database_url.filter(|u| is_postgres_url(u))
            && self.drover_database
            && !out.iter().any(|t| t.name == "drover")
        {
            out.insert(
                0,
                PostgresTarget {
                    name: "drover".into(),
                    url: url.to_owned(),
                },
            );
        }
        out
    }

    /// Finds the target `name` of `source`.
    pub fn target(&self, source: Source, name: &str, drover_database_url: Option<&str>) -> Option<Target> {
        match source {
            Source::Postgres => self
                .postgres_targets(drover_database_url)
                .into_iter()
                .find(|t| t.name == name)
                .map(Target::Postgres),
            Source::Files => self
                .files
                .iter()
                .find(|t| t.name == name)
                .cloned()
                .map(Target::Files),
            Source::Config => (self.drover_config && name == "drover").then_some(Target::Config),
        }
    }

    /// Checks names, globs, recipients and the zstd level, so that a bad config stops the
    /// process at start rather than failing backups at 02:00.
    pub fn validate(&self) -> Result<(), String> {
        for name in self
            .postgres
            .iter()
            .map(|t| &t.name)
            .chain(self.files.iter().map(|t| &t.name))
        {
            jobs::families::backup::check_target_name(name).map_err(|e| format!("backup {e} ({name:?})"))?;
        }
        for t in &self.files {
            if t.paths.is_empty() {
                return Err(format!("backup.files {:?}: paths is empty", t.name));
            }
            super::sources::globs(&t.include)
                .map_err(|e| format!("backup.files {:?}: include: {e}", t.name))?;
            super::sources::globs(&t.exclude)
                .map_err(|e| format!("backup.files {:?}: exclude: {e}", t.name))?;
        }
        for r in &self.age_recipients {
            r.parse::<age::x25519::Recipient>()
                .map_err(|e| format!("backup.age_recipients: {r:?} is not an age X25519 recipient: {e}"))?;
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(format!("backup.zstd_level: {} is not in 1..=19", self.zstd_level));
        }
        Ok(())
    }
}

pub(crate) fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}
