//! The job catalog: every kind drover can run, its typed payload, its queue and its retry
//! policy. The API validates payloads here before a job reaches a broker, so a worker never
//! receives a payload its handler cannot decode.

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{queue::QueueName, retry::RetryPolicy};

/// `noop`: does nothing. Used by benchmarks and smoke tests.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noop {
    /// Epoch microseconds taken just before the enqueue call; the benchmark's latency probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_at_us: Option<i64>,
}

/// `sleep`: waits `ms` milliseconds; fails its first `fail_first` attempts. Used by tests
/// and chaos drills run from outside the process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    pub ms: u64,
    #[serde(default)]
    pub fail_first: u32,
    /// Fail every attempt (to exercise the dead set).
    #[serde(default)]
    pub always_fail: bool,
    /// Crash after the sleep instead of returning: drills of panic capture, crash recovery
    /// and poison-pill quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<Crash>,
    /// A free label (a tenant, say) that `[[limits]]` with `key = "tag"` split by: drills of
    /// per-key limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// How a `sleep` job crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crash {
    /// The handler panics (the worker catches it: a failed attempt).
    Panic,
    /// The worker process aborts, as a segfault or an OOM kill would end it. Only in workers
    /// started with `DROVER_CHAOS_DRILLS`; elsewhere the job fails for good.
    Abort,
}

/// The longest `sleep` accepted: one hour.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// What the catalog knows about one kind.
#[derive(Clone, Debug)]
pub struct KindSpec {
    pub name: &'static str,
    pub queue: &'static str,
    pub retry: RetryPolicy,
    /// Hard limit of one attempt; the worker drops the attempt's future when it passes.
    pub timeout: Duration,
    pub(crate) validate: fn(&RawValue) -> Result<(), String>,
}

/// A validator for kinds whose payload needs no check beyond decoding.
pub(crate) fn check<T: serde::de::DeserializeOwned>(raw: &RawValue) -> Result<(), String> {
    decode::<T>(raw).map(drop)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(raw: &RawValue) -> Result<T, String> {
    serde_json::from_str(raw.get()).map_err(|e| e.to_string())
}

fn builtin() -> Vec<KindSpec> {
    let mut kinds = vec![
        KindSpec {
            name: "noop",
            queue: "noop",
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            validate: |raw| decode::<Noop>(raw).map(drop),
        },
        KindSpec {
            name: "sleep",
            queue: "default",
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(3_700),
            validate: |raw| {
                let s: Sleep = decode(raw)?;
                if s.ms > MAX_SLEEP_MS {
                    return Err(format!("ms: must be at most {MAX_SLEEP_MS}"));
                }
                Ok(())
            },
        },
    ];
    kinds.extend(crate::families::backup::kinds());
    kinds.extend(crate::families::analytics::kinds());
    kinds.extend(crate::families::scoring::kinds());
    kinds.extend(crate::families::cache_warm::kinds());
    kinds
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogError {
    #[error("unknown job kind {0:?}")]
    UnknownKind(String),
    #[error("invalid payload for kind {kind:?}: {reason}")]
    InvalidPayload { kind: String, reason: String },
}

/// Overrides of the built-in retry policies and timeouts, keyed by kind or by queue
/// (a kind's own entry wins over its queue's).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    pub retry: HashMap<String, RetryPolicy>,
    /// Default retry policy for kinds and queues without an entry of their own.
    pub default_retry: Option<RetryPolicy>,
    pub timeout_ms: HashMap<String, u64>,
}

/// The kinds this build can run, with configuration applied.
#[derive(Clone, Debug)]
pub struct Catalog {
    kinds: HashMap<&'static str, KindSpec>,
}

impl Catalog {
    pub fn new(cfg: &CatalogConfig) -> Self {
        let kinds = builtin()
            .into_iter()
            .map(|mut k| {
                let policy = cfg
                    .retry
                    .get(k.name)
                    .or_else(|| cfg.retry.get(k.queue))
                    .or(cfg.default_retry.as_ref());
                if let Some(p) = policy {
                    k.retry = p.clone();
                }
                if let Some(ms) = cfg.timeout_ms.get(k.name).or_else(|| cfg.timeout_ms.get(k.queue)) {
                    k.timeout = Duration::from_millis(*ms);
                }
                (k.name, k)
            })
            .collect();
        Self { kinds }
    }

    pub fn get(&self, kind: &str) -> Option<&KindSpec> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &KindSpec> {
        self.kinds.values()
    }

    /// Checks that `kind` exists and `payload` decodes into its typed payload.
    pub fn validate(&self, kind: &str, payload: &RawValue) -> Result<&KindSpec, CatalogError> {
        let spec = self
            .get(kind)
            .ok_or_else(|| CatalogError::UnknownKind(kind.to_owned()))?;
        // serde builds a struct from a JSON array too; payloads are objects, named fields only.
        if !payload.get().trim_start().starts_with('{') {
            return Err(CatalogError::InvalidPayload {
                kind: kind.to_owned(),
                reason: "must be a JSON object".into(),
            });
        }
        (spec.validate)(payload).map_err(|reason| CatalogError::InvalidPayload {
            kind: kind.to_owned(),
            reason,
        })?;
        Ok(spec)
    }

    pub fn default_queue(&self, spec: &KindSpec) -> QueueName {
        QueueName::parse(spec.queue).expect("built-in queue names are valid")
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new(&CatalogConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn unknown_kinds_and_unknown_fields_are_rejected() {
        let c = Catalog::default();
        assert_eq!(
            c.validate("nope", &raw("{}")).unwrap_err(),
            CatalogError::UnknownKind("nope".into())
        );
        assert!(matches!(
            c.validate("noop", &raw(r#"{"x":1}"#)),
            Err(CatalogError::InvalidPayload { .. })
        ));
        assert!(matches!(
            c.validate("sleep", &raw(r#"{"ms":-1}"#)),
            Err(CatalogError::InvalidPayload { .. })
        ));
        assert!(matches!(
            c.validate("sleep", &raw(r#"{"ms":99999999}"#)),
            Err(CatalogError::InvalidPayload { .. })
        ));
        assert_eq!(
            c.validate("sleep", &raw(r#"{"ms":5,"fail_first":2}"#))
                .unwrap()
                .queue,
            "default"
        );
    }

    #[test]
    fn a_payload_must_be_an_object() {
        let c = Catalog::default();
        for bad in ["[1]", "[]", "null", "1", r#""x""#] {
            assert!(
                matches!(
                    c.validate("sleep", &raw(bad)),
                    Err(CatalogError::InvalidPayload { .. })
                ),
                "{bad} accepted"
            );
        }
        assert!(c.validate("noop", &raw(" {}")).is_ok());
    }

    #[test]
    fn a_kind_override_wins_over_its_queue_and_the_default() {
        let mut retry = HashMap::new();
        retry.insert(
            "default".into(),
            RetryPolicy {
                max_attempts: 4,
                ..Default::default()
            },
        );
        retry.insert(
            "sleep".into(),
            RetryPolicy {
                max_attempts: 2,
                ..Default::default()
            },
        );
        let cfg = CatalogConfig {
            retry,
            default_retry: Some(RetryPolicy {
                max_attempts: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Catalog::new(&cfg);
        assert_eq!(c.get("sleep").unwrap().retry.max_attempts, 2);
        assert_eq!(c.get("noop").unwrap().retry.max_attempts, 9);
    }
}
