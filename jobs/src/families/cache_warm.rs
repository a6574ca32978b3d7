//! Cache warming (queue `cache-warm`): `cache.warm` runs one warmer from the `[cache]`
//! configuration — an internal one that precomputes read models the API serves from Redis
//! (score leaderboards, analytics summaries), or an HTTP one that GETs a list of URLs.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{catalog::KindSpec, retry::RetryPolicy, schedule::ScheduleConfig};

pub const QUEUE: &str = "cache-warm";
pub const WARM: &str = "cache.warm";

/// `cache.warm`: runs the configured warmer named `warmer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warm {
    pub warmer: String,
}

/// A warm that fails is superseded by the next scheduled one within minutes: retry twice,
/// quickly, then let it go.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial_ms: 2_000,
        multiplier: 2.0,
        max_delay_ms: 30_000,
        max_attempts: 3,
        jitter: 0.2,
    }
}

/// Warmer names: 1–64 of `a-z 0-9 - _ .` (they name schedules too).
pub fn check_warmer_name(name: &str) -> Result<(), String> {
    crate::families::scoring::check_model_name(name)
}

pub(crate) fn kinds() -> Vec<KindSpec> {
    vec![KindSpec {
        name: WARM,
        queue: QUEUE,
        retry: retry_policy(),
        timeout: Duration::from_secs(600),
        validate: |raw| {
            let w: Warm = crate::catalog::decode(raw)?;
            check_warmer_name(&w.warmer).map_err(|e| format!("warmer: {e}"))
        },
    }]
}

/// One schedule per warmer, `cache-warm-<name>`, at the warmer's cron.
pub fn default_schedules<'a>(warmers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<ScheduleConfig> {
    warmers
        .into_iter()
        .map(|(name, cron)| {
            crate::families::analytics::schedule(
                &format!("cache-warm-{name}"),
                cron,
                WARM,
                json!({"warmer": name}),
            )
        })
        .collect()
}
