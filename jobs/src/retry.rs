//! Retry schedules: the `backoff` crate's exponential policy with jitter, evaluated for a
//! given attempt number so that any worker can compute the delay from the job alone.

use std::time::Duration;

use backoff::backoff::Backoff;
use serde::{Deserialize, Serialize};

/// How a kind of job is retried. Defaults: 1 s, ×2, at most 5 min between attempts,
/// 5 attempts in all, ±20 % jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the second attempt, in milliseconds.
    pub initial_ms: u64,
    pub multiplier: f64,
    /// Upper bound of any delay, in milliseconds (before jitter).
    pub max_delay_ms: u64,
    /// Attempts in all, the first one included. 1 means never retry.
    pub max_attempts: u32,
    /// Jitter as a fraction: a delay `d` becomes uniform in `[d·(1−j), d·(1+j)]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            multiplier: 2.0,
            max_delay_ms: 300_000,
            max_attempts: 5,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `attempt` (1-based) fails; `None` when `attempt` was
    /// the last one allowed.
    pub fn delay_after(&self, attempt: u32, max_attempts: u32) -> Option<Duration> {
        if attempt >= max_attempts {
            return None;
        }
        Some(self.jittered(self.nominal_delay_after(attempt)))
    }

    /// The delay without jitter: `initial · multiplier^(attempt−1)`, capped.
    pub fn nominal_delay_after(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let ms = (self.initial_ms as f64) * self.multiplier.max(1.0).powi(exp);
        Duration::from_millis(ms.min(self.max_delay_ms as f64) as u64)
    }

    fn jittered(&self, nominal: Duration) -> Duration {
        // One step of `ExponentialBackoff` from `current_interval = nominal` yields exactly the
        // randomized interval around `nominal`; the crate's own state is not kept between
        // attempts because the next attempt may run on another worker.
        let mut b = backoff::ExponentialBackoff {
            current_interval: nominal,
            initial_interval: nominal,
            randomization_factor: self.jitter.clamp(0.0, 1.0),
            multiplier: self.multiplier.max(1.0),
            max_interval: Duration::from_millis(self.max_delay_ms).max(nominal),
            max_elapsed_time: None,
            ..Default::default()
        };
        b.next_backoff().unwrap_or(nominal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap() {
        let p = RetryPolicy {
            initial_ms: 100,
            multiplier: 3.0,
            max_delay_ms: 1_000,
            max_attempts: 10,
            jitter: 0.0,
        };
        let delays: Vec<u64> = (1..=5)
            .map(|a| p.delay_after(a, 10).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 300, 900, 1_000, 1_000]);
    }

    #[test]
    fn the_last_attempt_has_no_retry() {
        let p = RetryPolicy::default();
        assert!(p.delay_after(5, 5).is_none());
        assert!(p.delay_after(4, 5).is_some());
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = RetryPolicy {
            initial_ms: 1_000,
            multiplier: 2.0,
            max_delay_ms: 60_000,
            max_attempts: 9,
            jitter: 0.25,
        };
        for attempt in 1..8 {
            let nominal = p.nominal_delay_after(attempt).as_secs_f64();
            for _ in 0..200 {
                let d = p.delay_after(attempt, 9).unwrap().as_secs_f64();
                assert!(
                    d >= nominal * 0.75 - 1e-3 && d <= nominal * 1.25 + 1e-3,
                    "{d} vs {nominal}"
                );
            }
        }
    }
}
