//! Rate and concurrency limits shared by every worker replica.
//!
//! A limit applies to the jobs of a queue or of a kind, optionally split by a payload field (a
//! tenant id, say): `[[limits]]` in the config file.
//!
//! ```toml
//! [[limits]]
//! queue = "default"      # or kind = "sleep"
//! key = "tenant"         # one limit per distinct payload.tenant (absent: one for all)
//! rate_per_s = 100       # attempts started per second, across all replicas
//! burst = 10             # started at once after a quiet spell (default 1)
//! concurrency = 5        # attempts running at once, across all replicas
//! ```
//!
//! The state lives where every replica sees it: in Redis (the broker's, or `DROVER_LIMITS_URL`),
//! as a GCRA timestamp per rate limit and a sorted set of holders per concurrency limit, each
//! changed by one script that reads Redis's own clock. Without a Redis the state is in this
//! process, which holds only for one process (`drover dev`).
//!
//! A job waits for its permit in its worker slot before its handler starts; the attempt's
//! timeout starts after the wait. A concurrency permit is held until the attempt ends; the
//! holder entry expires after the kind's timeout, so a worker that dies frees its permits.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};

use crate::job::Job;

/// One `[[limits]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    /// The queue whose jobs this limits (exactly one of `queue` and `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The kind whose jobs this limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A top-level payload field: one limit per distinct value (jobs without it share one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Attempts started per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// Attempts that may start at once after a quiet spell. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Attempts running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

impl LimitRule {
    /// Checks the entry; the error says what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        let target = match (&self.queue, &self.kind) {
            (Some(q), None) => format!("queue {q:?}"),
            (None, Some(k)) => format!("kind {k:?}"),
            _ => return Err("a limit names exactly one of `queue` and `kind`".into()),
        };
        if self.rate_per_s.is_none() && self.concurrency.is_none() {
            return Err(format!(
                "the limit of {target} sets neither `rate_per_s` nor `concurrency`"
            ));
        }
        if let Some(r) = self.rate_per_s
            && !(r.is_finite() && r > 0.0 && r <= 1e6)
        {
            return Err(format!(
                "the limit of {target}: rate_per_s must be in (0, 1e6], not {r}"
            ));
        }
        if self.burst == Some(0) || self.concurrency == Some(0) {
            return Err(format!(
                "the limit of {target}: burst and concurrency must be at least 1"
            ));
        }
        Ok(())
    }

    fn applies_to(&self, job: &Job) -> bool {
        self.queue.as_deref().is_some_and(|q| q == job.queue.as_str())
            || self.kind.as_deref().is_some_and(|k| k == &*job.kind)
    }

    /// The name of this rule's state for `job`: the rule and the job's key value.
    fn state_name(&self, index: usize, job: &Job) -> String {
        let value = self.key.as_deref().map_or(String::new(), |field| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(job.payload.get())
                .ok()
                .and_then(|m| m.get(field).cloned())
                .map_or_else(String::new, |v| match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
        });
        let target = self.queue.as_deref().or(self.kind.as_deref()).unwrap_or_default();
        format!("{index}:{target}:{value}")
    }
}

/// Reserves the next start for the caller and returns how long to wait for it (µs; 0: start
/// now). GCRA: the key holds the theoretical arrival time of the next attempt; a reservation
/// moves it on by one interval. Reserving (rather than answering "ask again later") keeps the
/// schedule in Redis: a waiter that wakes late delays its own start, not the ones after it.
const RATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local start = tat - interval * (burst - 1)
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
if start > now then return start - now end
return 0
";

/// Adds ARGV[1] to the holders if fewer than ARGV[2] hold (expired holders dropped first).
const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
";

/// Longest single wait for a concurrency slot before asking again.
const SLOT_POLL: Duration = Duration::from_millis(25);
/// Wait before asking a limits store that failed again.
const STORE_RETRY: Duration = Duration::from_millis(500);

enum Store {
    Redis {
        conn: ConnectionManager,
        prefix: String,
        rate: Script,
        acquire: Script,
    },
    Local(Mutex<LocalState>),
}

#[derive(Default)]
struct LocalState {
    /// Theoretical arrival time of the next attempt, per rate limit.
    tat: HashMap<String, Instant>,
    /// Running attempts, per concurrency limit.
    held: HashMap<String, u32>,
}

/// The limits of this process's workers, with their shared state.
pub struct Limiter {
    rules: Vec<LimitRule>,
    store: Store,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match self.store {
            Store::Redis { .. } => "redis",
            Store::Local(_) => "process",
        };
        f.debug_struct("Limiter")
            .field("rules", &self.rules)
            .field("store", &store)
            .finish()
    }
}

/// A concurrency slot taken for one attempt; [`Permit::release`] gives it back (a permit
/// dropped unreleased frees its slot when its holder entry expires).
#[must_use = "release the permit when the attempt ends"]
pub struct Permit {
    limiter: Option<Arc<Limiter>>,
    held: Vec<String>,
    holder: String,
}

impl Limiter {
    /// Limits kept in Redis at `redis_url` under `prefix`, shared by every process using it.
    pub async fn redis(rules: Vec<LimitRule>, redis_url: &str, prefix: &str) -> Result<Self, String> {
        for r in &rules {
            r.validate()?;
        }
        let client = redis::Client::open(redis_url).map_err(|e| format!("limits store {redis_url}: {e}"))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| format!("limits store: connecting to Redis: {e}"))?;
        Ok(Self {
            rules,
            store: Store::Redis {
                conn,
                prefix: prefix.to_owned(),
                rate: Script::new(RATE_SCRIPT),
                acquire: Script::new(ACQUIRE_SCRIPT),
            },
        })
    }

    /// Limits kept in this process: they hold for its workers only.
    pub fn local(rules: Vec<LimitRule>) -> Result<Self, String> {
        for r in &rules {
            r.validate()?;
        }
        Ok(Self {
            rules,
            store: Store::Local(Mutex::default()),
        })
    }

    /// Whether any limit applies to jobs of this kind on this queue.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Waits until every limit that applies to `job` lets one more attempt start. `hold_for`
    /// bounds how long a concurrency slot stays taken if the permit is never released.
    pub async fn acquire(self: &Arc<Self>, job: &Job, hold_for: Duration) -> Permit {
        let mut permit = Permit {
            limiter: Some(self.clone()),
            held: Vec::new(),
            holder: format!("{}:{}", job.id, job.attempt),
        };
        for (i, rule) in self.rules.iter().enumerate().filter(|(_, r)| r.applies_to(job)) {
            let name = rule.state_name(i, job);
            if let Some(limit) = rule.concurrency {
                self.take_slot(&name, limit, &permit.holder, hold_for).await;
                permit.held.push(name.clone());
            }
            if let Some(rate) = rule.rate_per_s {
                self.take_token(&name, rate, rule.burst.unwrap_or(1)).await;
            }
        }
        permit
    }

    async fn take_token(&self, name: &str, rate: f64, burst: u32) {
        let interval_us = (1e6 / rate).round().max(1.0) as i64;
        loop {
            let reserved = match &self.store {
                Store::Redis {
                    conn, prefix, rate, ..
                } => {
                    let mut conn = conn.clone();
                    rate.key(format!("{prefix}:{{limit:{name}}}:rate"))
                        .arg(interval_us)
                        .arg(burst)
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .map_err(|e| {
                            // The store is away: wait and ask again rather than run unlimited.
                            tracing::warn!(error = %e, limit = name, "rate limit store unavailable");
                        })
                }
                Store::Local(state) => {
                    let mut s = state.lock().expect("limits state poisoned");
                    let now = Instant::now();
                    let interval = Duration::from_micros(interval_us as u64);
                    let tat = s.tat.get(name).copied().unwrap_or(now).max(now);
                    s.tat.insert(name.to_owned(), tat + interval);
                    let start = tat.checked_sub(interval * (burst - 1)).unwrap_or(now);
                    Ok(start.saturating_duration_since(now).as_micros() as i64)
                }
            };
            match reserved {
                Ok(wait_us) => {
                    if wait_us > 0 {
                        tokio::time::sleep(Duration::from_micros(wait_us as u64)).await;
                    }
                    return;
                }
                Err(()) => tokio::time::sleep(STORE_RETRY).await,
            }
        }
    }

    async fn take_slot(&self, name: &str, limit: u32, holder: &str, hold_for: Duration) {
        loop {
            let taken = match &self.store {
                Store::Redis {
                    conn,
                    prefix,
                    acquire,
                    ..
                } => {
                    let mut conn = conn.clone();
                    acquire
                        .key(format!("{prefix}:{{limit:{name}}}:running"))
                        .arg(holder)
                        .arg(limit)
                        .arg(hold_for.as_millis() as u64)
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .map_err(|e| tracing::warn!(error = %e, limit = name, "concurrency limit store unavailable"))
                        .unwrap_or(0)
                        == 1
                }
                Store::Local(state) => {
                    let mut s = state.lock().expect("limits state poisoned");
                    let n = s.held.entry(name.to_owned()).or_default();
                    if *n < limit {
                        *n += 1;
                        true
                    } else {
                        false
                    }
                }
            };
            if taken {
                return;
            }
            tokio::time::sleep(SLOT_POLL).await;
        }
    }
}

impl Permit {
    /// Gives back the concurrency slots this attempt held.
    pub async fn release(mut self) {
        let Some(limiter) = self.limiter.take() else {
            return;
        };
        for name in std::mem::take(&mut self.held) {
            match &limiter.store {
                Store::Redis { conn, prefix, .. } => {
                    let mut conn = conn.clone();
                    let key = format!("{prefix}:{{limit:{name}}}:running");
                    if let Err(e) = redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&self.holder)
                        .query_async::<i64>(&mut conn)
                        .await
                    {
                        // The entry expires by itself after the kind's timeout.
                        tracing::warn!(error = %e, limit = name, "releasing a concurrency slot failed");
                    }
                }
                Store::Local(state) => {
                    let mut s = state.lock().expect("limits state poisoned");
                    if let Some(n) = s.held.get_mut(&name) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Dropped unreleased (the attempt's future was dropped at shutdown): a local slot is
        // given back here; a Redis one expires with its holder entry.
        if let Some(limiter) = &self.limiter
            && let Store::Local(state) = &limiter.store
        {
            let mut s = state.lock().expect("limits state poisoned");
            for name in &self.held {
                if let Some(n) = s.held.get_mut(name) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(queue: &str, kind: &str, payload: &str) -> Job {
        Job {
            id: crate::JobId::new(),
            queue: crate::QueueName::parse(queue).unwrap(),
            kind: kind.into(),
            payload: serde_json::value::RawValue::from_string(payload.into()).unwrap(),
            max_attempts: 3,
            priority: 0,
            enqueued_at_ms: 0,
            run_at_ms: None,
            trace_id: None,
            idempotency_key: None,
            attempt: 1,
            receipt: 0,
            crashes: 0,
            attempts_before: 0,
        }
    }

    fn rule(toml_text: &str) -> LimitRule {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_limit_names_one_target_and_sets_a_limit() {
        assert!(rule("queue = \"default\"\nrate_per_s = 5").validate().is_ok());
        assert!(rule("kind = \"sleep\"\nconcurrency = 2").validate().is_ok());
        assert!(
            rule("queue = \"default\"")
                .validate()
                .unwrap_err()
                .contains("neither")
        );
        assert!(
            rule("queue = \"a\"\nkind = \"b\"\nrate_per_s = 1")
                .validate()
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(rule("queue = \"a\"\nrate_per_s = -1").validate().is_err());
        assert!(rule("queue = \"a\"\nconcurrency = 0").validate().is_err());
        assert!(toml::from_str::<LimitRule>("queue = \"a\"\nrate = 1").is_err());
    }

    #[tokio::test]
    async fn a_local_rate_limit_spaces_attempts_by_its_interval_after_the_burst() {
        let limiter =
            Arc::new(Limiter::local(vec![rule("queue = \"default\"\nrate_per_s = 50\nburst = 2")]).unwrap());
        let job = job("default", "sleep", r#"{"ms":0}"#);
        let start = Instant::now();
        for _ in 0..12 {
            limiter
                .acquire(&job, Duration::from_secs(1))
                .await
                .release()
                .await;
        }
        // 2 at once, then 10 more at 20 ms each.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(195),
            "12 permits at 50/s (burst 2) took {took:?}"
        );
    }

    #[tokio::test]
    async fn a_local_concurrency_limit_holds_until_release() {
        let limiter = Arc::new(
            Limiter::local(vec![rule("kind = \"sleep\"\nconcurrency = 1\nkey = \"tenant\"")]).unwrap(),
        );
        let a = job("default", "sleep", r#"{"ms":0,"tenant":"a"}"#);
        let b = job("default", "sleep", r#"{"ms":0,"tenant":"b"}"#);
        let held = limiter.acquire(&a, Duration::from_secs(60)).await;
        // Another tenant is not held up; the same tenant waits for the release.
        tokio::time::timeout(
            Duration::from_secs(1),
            limiter.acquire(&b, Duration::from_secs(60)),
        )
        .await
        .expect("tenant b waited on tenant a's limit")
        .release()
        .await;
        assert!(
            tokio::time::timeout(
                Duration::from_millis(200),
                limiter.acquire(&a, Duration::from_secs(60))
            )
            .await
            .is_err()
        );
        held.release().await;
        tokio::time::timeout(
            Duration::from_secs(1),
            limiter.acquire(&a, Duration::from_secs(60)),
        )
        .await
        .expect("the slot came back")
        .release()
        .await;
    }
}
