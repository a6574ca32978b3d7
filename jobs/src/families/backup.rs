//! Backups (queue `backups`): `backup.run` takes one backup of a configured target,
//! `backup.verify` re-reads a stored backup end to end, `backup.prune` applies the retention
//! policy. Also the default schedules of the family, as data the scheduler reads.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    catalog::{KindSpec, check},
    retry::RetryPolicy,
    schedule::{JobTemplate, MissedTicks, ScheduleConfig},
};

pub const QUEUE: &str = "backups";
pub const RUN: &str = "backup.run";
pub const VERIFY: &str = "backup.verify";
pub const PRUNE: &str = "backup.prune";

/// What a backup reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `pg_dump --format=custom` of a configured database URL.
    Postgres,
    /// A tar of configured paths, with include/exclude globs.
    Files,
    /// drover's effective configuration, secrets redacted.
    Config,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Postgres, Source::Files, Source::Config];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Postgres => "postgres",
            Source::Files => "files",
            Source::Config => "config",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `backup.run`: one backup of the target named `target` among the configured targets of
/// `source`. The job's id becomes the backup's id, so a retried attempt updates the same
/// catalog row and overwrites the same object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub source: Source,
    pub target: String,
}

/// `backup.verify`: re-reads backup `backup_id` from the store, checks its SHA-256, decrypts
/// and decompresses it; with `restore_check` a postgres backup is also restored into a scratch
/// database whose per-table row counts must match those recorded when it was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    pub backup_id: uuid::Uuid,
    #[serde(default)]
    pub restore_check: bool,
}

/// `backup.prune`: applies the retention policy to one target (`source` and `target`), or to
/// every target when both are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prune {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The longest target name accepted (it becomes part of object keys).
pub const MAX_TARGET_LEN: usize = 64;

/// Target names appear in object keys and file names: `a-z`, `0-9`, `-`, `_`, `.`.
pub fn check_target_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TARGET_LEN {
        return Err(format!("target: must be 1 to {MAX_TARGET_LEN} characters long"));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !ok || name.starts_with('.') {
        return Err("target: may contain only a-z, 0-9, '-', '_' and '.', not starting with '.'".into());
    }
    Ok(())
}

/// A failed backup is retried a few times over about an hour: the usual causes (a database
/// restarting, a store throttling) pass within minutes, and a backup that is hours late is
/// still worth more than none. Then the job is dead and the webhook says so.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial_ms: 60_000,
        multiplier: 2.0,
        max_delay_ms: 1_800_000,
        max_attempts: 4,
        jitter: 0.2,
    }
}

pub(crate) fn kinds() -> Vec<KindSpec> {
    vec![
        KindSpec {
            name: RUN,
            queue: QUEUE,
            retry: retry_policy(),
            // A dump of a large database takes hours; the handler stops itself a little before
            // this so that the failure is recorded and notified.
            timeout: Duration::from_secs(6 * 3600),
            validate: |raw| {
                let run: Run = crate::catalog::decode(raw)?;
                check_target_name(&run.target)
            },
        },
        KindSpec {
            name: VERIFY,
            queue: QUEUE,
            retry: retry_policy(),
            timeout: Duration::from_secs(6 * 3600),
            validate: check::<Verify>,
        },
        KindSpec {
            name: PRUNE,
            queue: QUEUE,
            retry: retry_policy(),
            timeout: Duration::from_secs(3600),
            validate: |raw| {
                let p: Prune = crate::catalog::decode(raw)?;
                if let Some(t) = &p.target {
                    check_target_name(t)?;
                }
                if p.target.is_some() != p.source.is_some() {
                    return Err("source and target: give both or neither".into());
                }
                Ok(())
            },
        },
    ]
}

/// The family's default schedules for the given targets: each postgres target daily at 02:00,
/// each files target weekly on Sunday at 03:00, each config target daily at 04:00, and a prune
/// of every target weekly on Sunday at 05:00 (UTC; cron with seconds, as apalis-cron reads it).
/// Enabled by `[backup] schedules = true`. A tick missed while no scheduler ran fires once when
/// one is back: a backup skipped for an outage is the one most likely to be needed.
pub fn default_schedules<'a>(targets: impl IntoIterator<Item = (Source, &'a str)>) -> Vec<ScheduleConfig> {
    let schedule = |name: String, cron: &str, kind: &str, payload: serde_json::Value| ScheduleConfig {
        name,
        cron: cron.to_owned(),
        timezone: None,
        job: JobTemplate {
            kind: kind.to_owned(),
            payload,
            queue: None,
            priority: None,
        },
        enabled: true,
        missed_ticks: MissedTicks::RunOnce,
    };
    let mut out: Vec<ScheduleConfig> = targets
        .into_iter()
        .map(|(source, target)| {
            let cron = match source {
                Source::Postgres => "0 0 2 * * *",
                Source::Files => "0 0 3 * * Sun",
                Source::Config => "0 0 4 * * *",
            };
            schedule(
                format!("backup-{source}-{target}"),
                cron,
                RUN,
                json!({"source": source, "target": target}),
            )
        })
        .collect();
    out.push(schedule("backup-prune".into(), "0 0 5 * * Sun", PRUNE, json!({})));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::Catalog;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn backup_kinds_go_to_the_backups_queue_and_reject_unknown_fields() {
        let c = Catalog::default();
        let spec = c
            .validate(RUN, &raw(r#"{"source":"postgres","target":"main"}"#))
            .unwrap();
        assert_eq!(spec.queue, "backups");
        assert_eq!(spec.retry, retry_policy());
        for bad in [
            r#"{"source":"postgres","target":"main","x":1}"#,
            r#"{"source":"mysql","target":"main"}"#,
            r#"{"source":"files","target":"../etc"}"#,
            r#"{"source":"files"}"#,
        ] {
            assert!(c.validate(RUN, &raw(bad)).is_err(), "{bad} accepted");
        }
        assert!(
            c.validate(
                VERIFY,
                &raw(r#"{"backup_id":"0193a1f2-7d3e-7000-8000-000000000000"}"#)
            )
            .is_ok()
        );
        assert!(c.validate(VERIFY, &raw(r#"{"backup_id":"nope"}"#)).is_err());
        assert!(c.validate(PRUNE, &raw("{}")).is_ok());
        assert!(c.validate(PRUNE, &raw(r#"{"target":"main"}"#)).is_err());
        assert!(
            c.validate(PRUNE, &raw(r#"{"source":"files","target":"main"}"#))
                .is_ok()
        );
    }

    #[test]
    fn the_default_schedules_are_the_documented_ones() {
        let s = default_schedules([
            (Source::Postgres, "drover"),
            (Source::Files, "uploads"),
            (Source::Config, "drover"),
        ]);
        let got: Vec<(&str, &str)> = s.iter().map(|s| (s.name.as_str(), s.cron.as_str())).collect();
        assert_eq!(
            got,
            [
                ("backup-postgres-drover", "0 0 2 * * *"),
                ("backup-files-uploads", "0 0 3 * * Sun"),
                ("backup-config-drover", "0 0 4 * * *"),
                ("backup-prune", "0 0 5 * * Sun"),
            ]
        );
        let c = Catalog::default();
        for s in &s {
            assert!(s.validate(&c).is_ok(), "{s:?}");
        }
    }
}
