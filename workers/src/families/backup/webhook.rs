//! The webhook: one JSON POST per backup or verify that failed for good (and per success
//! when asked). Delivery is tried three times; a receiver that stays down is logged, never a
//! reason to fail the job.

use std::time::Duration;

use chrono::Utc;
use jobs::Job;
use schema::backups::Backup;
use serde::Serialize;
use uuid::Uuid;

use super::BackupError;

/// The body of a webhook POST.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notification {
    /// `backup.failed`, `backup.succeeded`, `backup.verify_failed`.
    pub event: String,
    pub backup_id: Uuid,
    pub job_id: Uuid,
    pub kind: String,
    pub source: String,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    /// RFC 3339.
    pub at: String,
}

impl Notification {
    pub(crate) fn failed(
        job: &Job,
        backup_id: Uuid,
        source: &str,
        target: &str,
        error: &BackupError,
    ) -> Self {
        let event = if &*job.kind == jobs::families::backup::VERIFY {
            "backup.verify_failed"
        } else {
            "backup.failed"
        };
        Self::new(job, event, backup_id, source, target, Some(error.to_string()))
    }

    pub(crate) fn succeeded(job: &Job, row: &Backup) -> Self {
        Self::new(job, "backup.succeeded", row.id, &row.source, &row.target, None)
    }

    fn new(
        job: &Job,
        event: &str,
        backup_id: Uuid,
        source: &str,
        target: &str,
        error: Option<String>,
    ) -> Self {
        Self {
            event: event.into(),
            backup_id,
            job_id: job.id.0,
            kind: job.kind.to_string(),
            source: source.into(),
            target: target.into(),
            error,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            at: Utc::now().to_rfc3339(),
        }
    }
}

pub(crate) async fn send(http: &reqwest::Client, url: &str, n: &Notification) {
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
        match http.post(url).json(n).send().await {
            Ok(res) if res.status().is_success() => return,
            Ok(res) => last = format!("answered {}", res.status()),
            Err(e) => last = e.to_string(),
        }
    }
    tracing::warn!(event = %n.event, backup.id = %n.backup_id, error = %last, "the backup webhook was not delivered");
}
