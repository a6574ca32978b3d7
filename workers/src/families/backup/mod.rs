//! Backups: the `backup.run`, `backup.verify` and `backup.prune` handlers, and the operations
//! behind them that the CLI also uses (take, verify, restore, prune, list).
//!
//! A backup streams its source (`pg_dump`, a tar of files, the effective config) through zstd,
//! optional age encryption and SHA-256 into the object store ([`pipeline`]), and records a
//! catalog row (`schema::backups`). Only a backup whose object was completely written is marked
//! succeeded; a verify or restore re-reads it and refuses it if a single byte differs from the
//! digest recorded then.

use std::{collections::BTreeMap, io, path::PathBuf, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use jobs::{
    Job,
    families::backup::{Prune as PrunePayload, Run, Source, Verify as VerifyPayload},
};
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use schema::backups::{self as catalog, Backup, BackupStatus};
use sea_orm::DatabaseConnection;
use serde::Serialize;
use uuid::Uuid;

use crate::handlers::{Deps, JobError, payload};

mod config;
mod pipeline;
pub mod retention;
mod sources;
mod webhook;

pub use config::{BackupConfig, FilesTarget, PostgresTarget, Retention, Target};
pub use webhook::Notification;

/// Everything that can go wrong with a backup, a verify, a restore or a prune.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no {origin} backup target is named {target:?} in the [backup] configuration")]
    UnknownTarget { origin: Source, target: String },
    #[error("no backup has id {0}")]
    NotFound(Uuid),
    #[error("backup {id} is {status}, not succeeded; it cannot be {action}")]
    NotGood {
        id: Uuid,
        status: String,
        action: &'static str,
    },
    #[error("backup {id} is corrupt: {detail}")]
    Corrupt { id: Uuid, detail: String },
    #[error(
        "backup {id} is encrypted: decrypting it needs the age identity file (DROVER_BACKUP_AGE_IDENTITY_FILE or --identity)"
    )]
    NoIdentity { id: Uuid },
    /// The source could not be read (unreachable database, missing path, pg_dump failed).
    #[error("{origin} target {target:?}: {detail}")]
    Source {
        origin: Source,
        target: String,
        detail: String,
    },
    #[error("object store: {0}")]
    Store(String),
    #[error("backup catalog: {0}")]
    Db(#[from] schema::DbError),
    /// The restore's destination refused it (not empty, pg_restore failed, …).
    #[error("restoring backup {id}: {detail}")]
    Restore { id: Uuid, detail: String },
    #[error("backup {id}: the restore check failed: {detail}")]
    RestoreCheck { id: Uuid, detail: String },
    #[error("backup configuration: {0}")]
    Config(String),
}

impl BackupError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackupError::Source { .. }
                | BackupError::Store(_)
                | BackupError::Db(_)
                | BackupError::RestoreCheck { .. }
        )
    }

    fn into_job_error(self) -> JobError {
        if self.is_retryable() {
            JobError::retryable(self)
        } else {
            JobError::permanent(self)
        }
    }
}

/// Reports the progress of a verify or restore (the CLI draws bars with it).
pub trait Progress: Send + Sync {
    /// A phase begins that reads `total_bytes` of the stored object.
    fn phase(&self, name: &'static str, total_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &'static str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// The backup family's state in a process: configuration, catalog database, object store.
pub struct Backups {
    db: DatabaseConnection,
    config: BackupConfig,
    drover_database_url: Option<String>,
    effective_config: String,
    /// The store's URL without credentials, as recorded in catalog rows.
    store_url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    recipients: Vec<age::x25519::Recipient>,
    identity_file: Option<PathBuf>,
    http: reqwest::Client,
    deadline: Option<Duration>,
}

/// What [`Backups::verify`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub id: Uuid,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
    /// Rows per table in the scratch restore (restore_check only).
    pub table_counts: Option<BTreeMap<String, i64>>,
}

/// What [`Backups::restore`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    pub id: Uuid,
    pub source: String,
    pub to: String,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
}

/// What [`Backups::prune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub kept: usize,
    pub deleted: Vec<Uuid>,
}

impl Backups {
    /// Opens the store and reads the recipients. `drover_database_url` is drover's own
    /// database (backed up as postgres target `drover` when it is Postgres);
    /// `effective_config` is what the config source stores (already redacted).
    pub fn new(
        db: DatabaseConnection,
        config: BackupConfig,
        drover_database_url: Option<String>,
        effective_config: String,
    ) -> Result<Self, BackupError> {
        config.validate().map_err(BackupError::Config)?;
        let store_url = normalize_store_url(&config.store)?;
        let (store, prefix) = open_store(&store_url, &config.store_options)?;
        let recipients = config
            .age_recipients
            .iter()
            .map(|r| {
                r.parse()
                    .map_err(|e| BackupError::Config(format!("age recipient {r:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BackupError::Config(format!("webhook client: {e}")))?;
        Ok(Self {
            db,
            identity_file: config.age_identity_file.clone(),
            config,
            drover_database_url,
            effective_config,
            store_url,
            store,
            prefix,
            recipients,
            http,
            deadline: None,
        })
    }

    /// Makes attempts stop themselves after `deadline` (a little under the kind's timeout), so
    /// that a backup that runs too long is recorded as failed and notified rather than dropped.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Decrypts with the identities in `path` instead of the configured file.
    pub fn with_identity_file(mut self, path: PathBuf) -> Self {
        self.identity_file = Some(path);
        self
    }

    pub fn config(&self) -> &BackupConfig {
        &self.config
    }

    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// Every configured target.
    pub fn targets(&self) -> Vec<(Source, String)> {
        self.config.targets(self.drover_database_url.as_deref())
    }

    /// Takes backup `id` of `target`: streams it to the store and records it in the catalog.
    #[tracing::instrument(skip(self), fields(backup.id = %id))]
    pub async fn take(&self, id: Uuid, source: Source, target: &str) -> Result<Backup, BackupError> {
        let resolved = self
            .config
            .target(source, target, self.drover_database_url.as_deref())
            .ok_or_else(|| BackupError::UnknownTarget {
                origin: source,
                target: target.to_owned(),
            })?;
        let started = Utc::now();
        let encrypted = !self.recipients.is_empty();
        let key = self.object_key(id, source, target, encrypted);
        catalog::start(
            &self.db,
            catalog::Started {
                id,
                source: source.to_string(),
                target: target.to_owned(),
                store: self.store_url.clone(),
                object_key: key.to_string(),
                format: format_of(source).into(),
                encrypted,
                at: started,
            },
        )
        .await?;
        let taken = async {
            match self.deadline {
                Some(d) => tokio::time::timeout(d, self.stream(&resolved, source, target, key.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(BackupError::Source {
                            origin: source,
                            target: target.to_owned(),
                            detail: format!("gave up after {} s", d.as_secs()),
                        })
                    }),
                None => self.stream(&resolved, source, target, key.clone()).await,
            }
        }
        .await;
        match taken {
            Ok((stored, counts)) => {
                catalog::succeeded(
                    &self.db,
                    id,
                    catalog::Stored {
                        source_bytes: stored.source_bytes as i64,
                        stored_bytes: stored.stored_bytes as i64,
                        sha256: stored.sha256,
                        table_counts: counts.map(|c| serde_json::to_value(c).unwrap_or_default()),
                        at: Utc::now(),
                    },
                )
                .await?;
                tracing::info!(
                    %source, target, key = %key,
                    source_bytes = stored.source_bytes, stored_bytes = stored.stored_bytes,
                    "backup stored"
                );
                catalog::get(&self.db, id).await?.ok_or(BackupError::NotFound(id))
            }
            Err(e) => {
                if let Err(db) = catalog::failed(&self.db, id, &e.to_string(), Utc::now()).await {
                    tracing::warn!(error = %db, "recording the failed backup in the catalog failed");
                }
                Err(e)
            }
        }
    }

    async fn stream(
        &self,
        resolved: &Target,
        source: Source,
        target: &str,
        key: ObjectPath,
    ) -> Result<(pipeline::Stored, Option<BTreeMap<String, i64>>), BackupError> {
        let encoding = pipeline::Encoding {
            zstd_level: self.config.zstd_level,
            recipients: self.recipients.clone(),
        };
        let source_error = |detail: String| BackupError::Source {
            origin: source,
            target: target.to_owned(),
            detail,
        };
        let map = |e: pipeline::StoreError| match e {
            pipeline::StoreError::Source(e) => source_error(e.to_string()),
            pipeline::StoreError::Upload(e) => BackupError::Store(e.to_string()),
        };
        match resolved.clone() {
            Target::Postgres(t) => {
                let url = sources::PgUrl::parse(&t.url)
                    .map_err(|e| BackupError::Config(format!("postgres target {:?}: {e}", t.name)))?;
                let snapshot = sources::Snapshot::take(&url).await.map_err(source_error)?;
                let name = snapshot.name.clone();
                let stored = pipeline::store(self.store.clone(), key, encoding, move |out| {
                    sources::pg_dump(&url, &name, out)
                })
                .await;
                let counts = snapshot.counts.clone();
                snapshot.close().await;
                Ok((stored.map_err(map)?, Some(counts)))
            }
            Target::Files(t) => {
                let stored = pipeline::store(self.store.clone(), key, encoding, move |out| {
                    sources::write_tar(&t, out)
                })
                .await
                .map_err(map)?;
                Ok((stored, None))
            }
            Target::Config => {
                let text = self.effective_config.clone();
                let stored = pipeline::store(self.store.clone(), key, encoding, move |out| {
                    out.write_all(text.as_bytes())
                })
                .await
                .map_err(map)?;
                Ok((stored, None))
            }
        }
    }

    /// `{prefix}/{source}/{target}/{YYYY-MM-DD}/{id}.{ext}`: the date of the backup's id
    /// (UUIDv7), so every attempt of one job writes the same key.
    fn object_key(&self, id: Uuid, source: Source, target: &str, encrypted: bool) -> ObjectPath {
        let day = id
            .get_timestamp()
            .map(|ts| ts.to_unix().0)
            .and_then(|s| DateTime::from_timestamp(s as i64, 0))
            .unwrap_or_else(Utc::now)
            .format("%Y-%m-%d")
            .to_string();
        let ext = match source {
            Source::Postgres => "pgdump.zst",
            Source::Files => "tar.zst",
            Source::Config => "toml.zst",
        };
        let file = if encrypted {
            format!("{id}.{ext}.age")
        } else {
            format!("{id}.{ext}")
        };
        let mut key = self.prefix.clone();
        for part in [source.as_str(), target, &day, &file] {
            key = key.join(part);
        }
        key
    }

    pub async fn get(&self, id: Uuid) -> Result<Backup, BackupError> {
        catalog::get(&self.db, id).await?.ok_or(BackupError::NotFound(id))
    }

    pub async fn list(&self, filter: catalog::Filter<'_>, limit: u64) -> Result<Vec<Backup>, BackupError> {
        Ok(catalog::list(&self.db, filter, limit, 0).await?)
    }

    fn store_of(&self, row: &Backup) -> Result<Arc<dyn ObjectStore>, BackupError> {
        if row.store == self.store_url {
            return Ok(self.store.clone());
        }
        // Written when the store was configured elsewhere: open that one.
        Ok(open_store(&row.store, &self.config.store_options)?.0)
    }

    fn identities(
        &self,
        row: &Backup,
    ) -> Result<Option<Vec<Box<dyn age::Identity + Send + Sync>>>, BackupError> {
        if !row.encrypted {
            return Ok(None);
        }
        let path = self
            .identity_file
            .as_ref()
            .ok_or(BackupError::NoIdentity { id: row.id })?;
        let file = age::IdentityFile::from_file(path.display().to_string())
            .map_err(|e| BackupError::Config(format!("age identity file {}: {e}", path.display())))?;
        let ids = file
            .into_identities()
            .map_err(|e| BackupError::Config(format!("age identity file {}: {e}", path.display())))?;
        Ok(Some(ids))
    }

    /// Streams the stored object once to compare its SHA-256 with the catalog's; marks the
    /// backup corrupt on a mismatch.
    async fn check_digest(
        &self,
        row: &Backup,
        store: &dyn ObjectStore,
        progress: &dyn Progress,
    ) -> Result<(), BackupError> {
        let key = ObjectPath::from(row.object_key.as_str());
        progress.phase("checking the digest", row.stored_bytes.unwrap_or(0) as u64);
        let (sha, bytes) = match pipeline::digest(store, &key, &|n| progress.advance(n)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self
                    .mark_corrupt(
                        row,
                        format!("its object {} is missing from the store", row.object_key),
                    )
                    .await);
            }
            Err(e) => return Err(BackupError::Store(e.to_string())),
        };
        let expected = row.sha256.as_deref().unwrap_or_default();
        if sha != expected {
            return Err(self
                .mark_corrupt(
                    row,
                    format!(
                        "its object {} has SHA-256 {sha} ({bytes} bytes) but the catalog recorded {expected} ({} bytes) when it was taken",
                        row.object_key,
                        row.stored_bytes.unwrap_or(0)
                    ),
                )
                .await);
        }
        Ok(())
    }

    async fn mark_corrupt(&self, row: &Backup, detail: String) -> BackupError {
        if let Err(e) = catalog::corrupt(&self.db, row.id, &detail, Utc::now()).await {
            tracing::warn!(error = %e, "recording the corrupt backup in the catalog failed");
        }
        BackupError::Corrupt { id: row.id, detail }
    }

    fn loaded_error(&self, row: &Backup, e: pipeline::LoadError, action: &'static str) -> LoadFailure {
        match e {
            pipeline::LoadError::Store(e) => LoadFailure::Final(BackupError::Store(e.to_string())),
            pipeline::LoadError::Decode(detail) => LoadFailure::Corrupt(format!(
                "{} could not be {}: {detail}",
                row.object_key,
                if row.encrypted {
                    "decrypted and decompressed"
                } else {
                    "decompressed"
                }
            )),
            pipeline::LoadError::Consume(e) => LoadFailure::Final(BackupError::Restore {
                id: row.id,
                detail: format!("{action}: {e}"),
            }),
        }
    }

    async fn check_loaded(&self, row: &Backup, loaded: &pipeline::Loaded) -> Result<(), BackupError> {
        let expected = row.sha256.as_deref().unwrap_or_default();
        if loaded.sha256 != expected {
            return Err(self
                .mark_corrupt(
                    row,
                    format!(
                        "its object {} changed while it was read: SHA-256 {} instead of {expected}",
                        row.object_key, loaded.sha256
                    ),
                )
                .await);
        }
        if let Some(n) = row.source_bytes
            && loaded.plain_bytes != n as u64
        {
            return Err(self
                .mark_corrupt(
                    row,
                    format!(
                        "it decompressed to {} bytes, but {n} were backed up",
                        loaded.plain_bytes
                    ),
                )
                .await);
        }
        Ok(())
    }

    /// Re-reads backup `id`: digest, decryption, decompression, and with `restore_check` (postgres
    /// only) a restore into a scratch database whose row counts must match the backup's.
    #[tracing::instrument(skip(self, progress), fields(backup.id = %id))]
    pub async fn verify(
        &self,
        id: Uuid,
        restore_check: bool,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, BackupError> {
        let row = self.get(id).await?;
        let status = BackupStatus::parse(&row.status);
        if !matches!(status, Some(BackupStatus::Succeeded | BackupStatus::Corrupt)) {
            return Err(BackupError::NotGood {
                id,
                status: row.status.clone(),
                action: "verified",
            });
        }
        let store = self.store_of(&row)?;
        self.check_digest(&row, store.as_ref(), progress).await?;
        let identities = self.identities(&row)?;
        let key = ObjectPath::from(row.object_key.as_str());
        let scratch = if restore_check && row.source == Source::Postgres.as_str() {
            Some(self.scratch_database(&row).await?)
        } else {
            None
        };
        progress.phase("decoding", row.stored_bytes.unwrap_or(0) as u64);
        let restore_url = scratch.as_ref().map(|s| s.url.clone());
        let loaded = pipeline::load(
            store.as_ref(),
            &key,
            identities,
            &|n| progress.advance(n),
            move |r| match restore_url {
                Some(url) => sources::pg_restore(&url, r),
                None => io::copy(r, &mut io::sink()).map(drop),
            },
        )
        .await;
        let counted = match (&scratch, &loaded) {
            (Some(s), Ok(_)) => Some(s.counts().await),
            _ => None,
        };
        if let Some(s) = scratch {
            s.drop_database().await;
        }
        let ((), loaded) = match loaded {
            Ok(l) => l,
            Err(e) => {
                return Err(
                    match self.loaded_error(&row, e, "restoring into the scratch database") {
                        LoadFailure::Corrupt(detail) => self.mark_corrupt(&row, detail).await,
                        LoadFailure::Final(e) => e,
                    },
                );
            }
        };
        self.check_loaded(&row, &loaded).await?;
        let table_counts = match counted {
            None => None,
            Some(Err(detail)) => return Err(BackupError::RestoreCheck { id, detail }),
            Some(Ok(counts)) => {
                let recorded: BTreeMap<String, i64> = row
                    .table_counts
                    .clone()
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                if counts != recorded {
                    return Err(self
                        .mark_corrupt(
                            &row,
                            format!(
                                "restored into a scratch database, its row counts {} differ from those recorded when it was taken {}",
                                serde_json::to_string(&counts).unwrap_or_default(),
                                serde_json::to_string(&recorded).unwrap_or_default()
                            ),
                        )
                        .await);
                }
                Some(counts)
            }
        };
        catalog::verified(&self.db, id, Utc::now()).await?;
        if status == Some(BackupStatus::Corrupt) {
            catalog::succeeded_again(&self.db, id).await?;
        }
        Ok(VerifyReport {
            id,
            stored_bytes: loaded.stored_bytes,
            plain_bytes: loaded.plain_bytes,
            table_counts,
        })
    }

    async fn scratch_database(&self, row: &Backup) -> Result<Scratch, BackupError> {
        let Some(Target::Postgres(t)) =
            self.config
                .target(Source::Postgres, &row.target, self.drover_database_url.as_deref())
        else {
            return Err(BackupError::UnknownTarget {
                origin: Source::Postgres,
                target: row.target.clone(),
            });
        };
        let server = sources::PgUrl::parse(&t.url).map_err(BackupError::Config)?;
        let name = format!("drover_verify_{}", row.id.simple());
        Scratch::create(server, name)
            .await
            .map_err(|detail| BackupError::RestoreCheck { id: row.id, detail })
    }

    /// Restores backup `id` to `to`: a `postgres://` URL of an existing (empty) database for a
    /// postgres backup, a directory (absent or empty) for files and config backups. Refuses a
    /// backup whose object does not match its recorded digest before writing anything.
    #[tracing::instrument(skip(self, progress), fields(backup.id = %id))]
    pub async fn restore(
        &self,
        id: Uuid,
        to: &str,
        progress: &dyn Progress,
    ) -> Result<RestoreReport, BackupError> {
        let row = self.get(id).await?;
        if row.status != BackupStatus::Succeeded.as_str() {
            return Err(BackupError::NotGood {
                id,
                status: row.status.clone(),
                action: "restored",
            });
        }
        let source = Source::parse(&row.source).ok_or_else(|| BackupError::Restore {
            id,
            detail: format!("unknown source {:?}", row.source),
        })?;
        let restore_error = |detail: String| BackupError::Restore { id, detail };
        let destination = match source {
            Source::Postgres => {
                if !config::is_postgres_url(to) {
                    return Err(restore_error(format!(
                        "a postgres backup restores into a database: --to postgres://…, not {to:?}"
                    )));
                }
                Destination::Postgres(sources::PgUrl::parse(to).map_err(restore_error)?)
            }
            Source::Files | Source::Config => {
                let dir = PathBuf::from(to.strip_prefix("file://").unwrap_or(to));
                if config::is_postgres_url(to) {
                    return Err(restore_error(format!(
                        "a {source} backup restores into a directory, not {to:?}"
                    )));
                }
                Destination::Dir(dir)
            }
        };
        let store = self.store_of(&row)?;
        // Before touching the destination: a backup that does not match its digest is refused.
        self.check_digest(&row, store.as_ref(), progress).await?;
        let identities = self.identities(&row)?;
        if let Destination::Dir(dir) = &destination {
            sources::prepare_empty_dir(dir).map_err(|e| restore_error(e.to_string()))?;
        }
        progress.phase("restoring", row.stored_bytes.unwrap_or(0) as u64);
        let key = ObjectPath::from(row.object_key.as_str());
        let config_file = format!("drover-config-{id}.toml");
        let loaded = pipeline::load(
            store.as_ref(),
            &key,
            identities,
            &|n| progress.advance(n),
            move |r| match destination {
                Destination::Postgres(url) => sources::pg_restore(&url, r),
                Destination::Dir(dir) => match source {
                    Source::Config => {
                        let mut f = std::fs::File::create_new(dir.join(config_file))?;
                        io::copy(r, &mut f).map(drop)
                    }
                    _ => sources::unpack_tar(r, &dir).map(drop),
                },
            },
        )
        .await;
        let ((), loaded) = match loaded {
            Ok(l) => l,
            Err(e) => {
                return Err(match self.loaded_error(&row, e, "writing the restore") {
                    LoadFailure::Corrupt(detail) => self.mark_corrupt(&row, detail).await,
                    LoadFailure::Final(e) => e,
                });
            }
        };
        self.check_loaded(&row, &loaded).await?;
        Ok(RestoreReport {
            id,
            source: row.source.clone(),
            to: to.to_owned(),
            stored_bytes: loaded.stored_bytes,
            plain_bytes: loaded.plain_bytes,
        })
    }

    /// Applies the retention policy to one target, or to every target with backups: deletes
    /// the objects of the backups it does not keep, then their catalog rows. Failed and
    /// corrupt backups older than the oldest kept good one go too. Running backups and the
    /// newest good backup of each target are never touched.
    #[tracing::instrument(skip(self))]
    pub async fn prune(&self, only: Option<(Source, String)>) -> Result<PruneReport, BackupError> {
        let targets = match only {
            Some((s, t)) => vec![(s.to_string(), t)],
            None => catalog::targets(&self.db).await?,
        };
        let mut report = PruneReport::default();
        let mut failures = Vec::new();
        for (source, target) in targets {
            let rows = catalog::of_target(&self.db, &source, &target).await?;
            let good: Vec<retention::Candidate> = rows
                .iter()
                .filter(|r| r.status == BackupStatus::Succeeded.as_str())
                .map(|r| retention::Candidate {
                    id: r.id,
                    at: r.started_at,
                })
                .collect();
            let keep = retention::select(&good, self.config.retention);
            let oldest_kept = good.iter().filter(|c| keep.contains(&c.id)).map(|c| c.at).min();
            let doomed: Vec<&Backup> = rows
                .iter()
                .filter(|r| match BackupStatus::parse(&r.status) {
                    Some(BackupStatus::Succeeded) => !keep.contains(&r.id),
                    Some(BackupStatus::Failed | BackupStatus::Corrupt) => {
                        oldest_kept.is_some_and(|o| r.started_at < o)
                    }
                    _ => false,
                })
                .collect();
            report.kept += keep.len();
            let mut gone = Vec::new();
            for row in doomed {
                let store = match self.store_of(row) {
                    Ok(s) => s,
                    Err(e) => {
                        failures.push(format!("{}: {e}", row.id));
                        continue;
                    }
                };
                match store.delete(&ObjectPath::from(row.object_key.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => gone.push(row.id),
                    Err(e) => failures.push(format!("{} ({}): {e}", row.id, row.object_key)),
                }
            }
            catalog::delete(&self.db, &gone).await?;
            tracing::info!(%source, %target, kept = keep.len(), deleted = gone.len(), "pruned backups");
            report.deleted.extend(gone);
        }
        if !failures.is_empty() {
            return Err(BackupError::Store(format!(
                "pruning could not delete {} object(s); their catalog rows stay: {}",
                failures.len(),
                failures.join("; ")
            )));
        }
        Ok(report)
    }

    async fn notify(&self, n: Notification) {
        if let Some(url) = &self.config.webhook_url {
            webhook::send(&self.http, url, &n).await;
        }
    }
}

enum LoadFailure {
    Corrupt(String),
    Final(BackupError),
}

enum Destination {
    Postgres(sources::PgUrl),
    Dir(PathBuf),
}

/// A database restored into by a verify's restore check, dropped afterwards.
struct Scratch {
    server: sources::PgUrl,
    name: String,
    url: sources::PgUrl,
}

impl Scratch {
    async fn create(server: sources::PgUrl, name: String) -> Result<Self, String> {
        use sea_orm::sqlx::{Connection, postgres::PgConnection};
        let mut conn = PgConnection::connect(&server.connect_url())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", server.redacted()))?;
        sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            sources::quote_ident(&name)
        )))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("creating the scratch database {name}: {e}"))?;
        let _ = conn.close().await;
        let url = server.with_database(&name);
        Ok(Self { server, name, url })
    }

    async fn counts(&self) -> Result<BTreeMap<String, i64>, String> {
        use sea_orm::sqlx::{Connection, postgres::PgConnection};
        let mut conn = PgConnection::connect(&self.url.connect_url())
            .await
            .map_err(|e| format!("cannot connect to the scratch database {}: {e}", self.name))?;
        let counts = sources::table_counts(&mut conn).await;
        let _ = conn.close().await;
        counts
    }

    async fn drop_database(self) {
        use sea_orm::sqlx::{Connection, postgres::PgConnection};
        let dropped = async {
            let mut conn = PgConnection::connect(&self.server.connect_url()).await?;
            sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                sources::quote_ident(&self.name)
            )))
            .execute(&mut conn)
            .await?;
            conn.close().await
        }
        .await;
        if let Err(e) = dropped {
            tracing::warn!(database = %self.name, error = %e, "dropping the scratch database failed; drop it by hand");
        }
    }
}

fn format_of(source: Source) -> &'static str {
    match source {
        Source::Postgres => "pg_dump-custom",
        Source::Files => "tar",
        Source::Config => "toml",
    }
}

/// A plain path becomes a `file://` URL of its absolute form; URLs pass unchanged (without
/// a trailing `/`).
fn normalize_store_url(store: &str) -> Result<String, BackupError> {
    if store.contains("://") {
        return Ok(store.trim_end_matches('/').to_owned());
    }
    let path = std::path::absolute(store)
        .map_err(|e| BackupError::Config(format!("backup store {store:?}: {e}")))?;
    let url = url::Url::from_file_path(&path)
        .map_err(|()| BackupError::Config(format!("backup store {store:?} is not a usable path")))?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn open_store(
    store_url: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), BackupError> {
    let url = url::Url::parse(store_url)
        .map_err(|e| BackupError::Config(format!("backup store {store_url:?}: {e}")))?;
    if url.scheme() == "file" {
        let dir = url
            .to_file_path()
            .map_err(|()| BackupError::Config(format!("backup store {store_url:?} is not a local path")))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| BackupError::Config(format!("backup store {}: {e}", dir.display())))?;
    }
    let (store, prefix) =
        object_store::parse_url_opts(&url, options.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .map_err(|e| BackupError::Config(format!("backup store {store_url:?}: {e}")))?;
    Ok((Arc::from(store), prefix))
}

/// `backup.run`.
pub async fn run(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let backups = family(&deps)?;
    let p: Run = payload(&job)?;
    let id = job.id.0;
    match backups.take(id, p.source, &p.target).await {
        Ok(row) => {
            if backups.config.webhook_on_success {
                backups.notify(Notification::succeeded(&job, &row)).await;
            }
            Ok(())
        }
        Err(e) => {
            if !e.is_retryable() || job.attempt >= job.max_attempts {
                backups
                    .notify(Notification::failed(&job, id, p.source.as_str(), &p.target, &e))
                    .await;
            }
            Err(e.into_job_error())
        }
    }
}

/// `backup.verify`.
pub async fn verify(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let backups = family(&deps)?;
    let p: VerifyPayload = payload(&job)?;
    match backups.verify(p.backup_id, p.restore_check, &NoProgress).await {
        Ok(report) => {
            tracing::info!(backup.id = %report.id, stored_bytes = report.stored_bytes, "backup verified");
            Ok(())
        }
        Err(e) => {
            if !e.is_retryable() || job.attempt >= job.max_attempts {
                let (source, target) = match catalog::get(&backups.db, p.backup_id).await {
                    Ok(Some(row)) => (row.source, row.target),
                    _ => (String::new(), String::new()),
                };
                backups
                    .notify(Notification::failed(&job, p.backup_id, &source, &target, &e))
                    .await;
            }
            Err(e.into_job_error())
        }
    }
}

/// `backup.prune`.
pub async fn prune(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let backups = family(&deps)?;
    let p: PrunePayload = payload(&job)?;
    let only = p.source.zip(p.target);
    backups
        .prune(only)
        .await
        .map(drop)
        .map_err(BackupError::into_job_error)
}

fn family(deps: &Deps) -> Result<&Backups, JobError> {
    deps.backups
        .as_deref()
        .ok_or_else(|| JobError::permanent("this worker has no backup configuration"))
}
