//! Scoring (queue `scoring`): models weigh each subject's events into one score,
//! `score = Σ weight(name) · value · 2^(−age / half_life)`, kept with its components per event
//! name and normalized to 0–100 over all subjects of the model. `scoring.recompute` plans a run
//! and fans it out into `scoring.chunk` jobs, one per range of subjects; the chunk that
//! completes the run normalizes the scores and writes the leaderboard.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::{
    catalog::{KindSpec, check},
    retry::RetryPolicy,
    schedule::ScheduleConfig,
};

pub const QUEUE: &str = "scoring";
pub const RECOMPUTE: &str = "scoring.recompute";
pub const CHUNK: &str = "scoring.chunk";

/// Subjects per chunk when a recompute names none.
pub const DEFAULT_CHUNK_SIZE: u32 = 5_000;

/// `scoring.recompute`: a full recompute of model `model` (every model when absent), ages
/// measured from the moment the run is planned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recompute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Subjects per chunk job (default 5 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
}

/// `scoring.chunk`: scores the subjects of chunk `chunk` of run `run_id` (the range is in the
/// run's chunk row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub run_id: Uuid,
    pub chunk: u32,
}

/// How raw scores become 0–100.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    /// `100 · raw / max raw`, clamped to 0–100 (0 for everyone when no raw score is positive).
    #[default]
    Max,
    /// `100 · (raw − min) / (max − min)` (0 for everyone when all raw scores are equal).
    Minmax,
}

impl Normalization {
    pub fn as_str(self) -> &'static str {
        match self {
            Normalization::Max => "max",
            Normalization::Minmax => "minmax",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Normalization::Max, Normalization::Minmax]
            .into_iter()
            .find(|n| n.as_str() == s)
    }

    /// Normalizes `raw` given the run's smallest and largest raw score.
    pub fn apply(self, raw: f64, min: f64, max: f64) -> f64 {
        let v = match self {
            Normalization::Max if max > 0.0 => 100.0 * raw / max,
            Normalization::Max => 0.0,
            Normalization::Minmax if max > min => 100.0 * (raw - min) / (max - min),
            Normalization::Minmax => 0.0,
        };
        v.clamp(0.0, 100.0)
    }
}

/// A scoring model, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreModel {
    pub name: String,
    /// Weight per event name; events of other names do not count.
    pub weights: BTreeMap<String, f64>,
    pub half_life_s: f64,
    pub normalization: Normalization,
}

/// The longest model name (it is part of Redis keys and URLs).
pub const MAX_MODEL_NAME: usize = 64;

/// Model names: 1–64 of `a-z 0-9 - _ .`.
pub fn check_model_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_MODEL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {MAX_MODEL_NAME} characters of a-z, 0-9, '-', '_', '.'"
        ))
    }
}

impl ScoreModel {
    /// Every problem with the model, as (field, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Err(e) = check_model_name(&self.name) {
            out.push(("name".into(), e));
        }
        if self.weights.is_empty() {
            out.push(("weights".into(), "must name at least one event".into()));
        }
        for (name, w) in &self.weights {
            if !w.is_finite() {
                out.push((format!("weights.{name}"), "must be a finite number".into()));
            }
            if name.is_empty() || name.len() > 128 {
                out.push(("weights".into(), "event names are 1 to 128 characters".into()));
            }
        }
        if !(self.half_life_s.is_finite() && self.half_life_s > 0.0) {
            out.push((
                "half_life_s".into(),
                "must be a positive number of seconds".into(),
            ));
        }
        out
    }

    pub fn event_names(&self) -> Vec<String> {
        self.weights.keys().cloned().collect()
    }
}

/// One event name's share of a subject's score: its explanation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub weight: f64,
    pub events: u64,
    /// Σ weight · value · 2^(−age / half_life) over those events.
    pub contribution: f64,
}

/// A subject's raw score and its components.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub raw: f64,
    pub components: BTreeMap<String, Component>,
}

/// `weight · value · 2^(−age / half_life)`.
pub fn contribution(weight: f64, value: f64, age_s: f64, half_life_s: f64) -> f64 {
    weight * value * (-age_s / half_life_s).exp2()
}

impl ScoreModel {
    /// Scores one subject's events `(name, value, ts)` as of `as_of`: events after `as_of`
    /// and of names the model does not weigh are ignored. Each component sums in the events'
    /// order and the total sums components in name order, so the same events in the same
    /// order give the same bits on any worker.
    pub fn score<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a str, f64, DateTime<Utc>)>,
        as_of: DateTime<Utc>,
    ) -> Scored {
        let mut components: BTreeMap<String, Component> = BTreeMap::new();
        for (name, value, ts) in events {
            let Some(&weight) = self.weights.get(name) else {
                continue;
            };
            if ts > as_of {
                continue;
            }
            let age_s = (as_of - ts).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            let c = components.entry(name.to_owned()).or_insert(Component {
                weight,
                events: 0,
                contribution: 0.0,
            });
            c.events += 1;
            c.contribution += contribution(weight, value, age_s, self.half_life_s);
        }
        let raw = components.values().map(|c| c.contribution).sum();
        Scored { raw, components }
    }
}

/// Chunk jobs of one run: their ids derive from the run's, so a recompute that is retried
/// after enqueuing some of them enqueues the same jobs again (the broker's idempotency key
/// makes the repeat a no-op).
pub fn chunk_job_id(run_id: Uuid, chunk: u32) -> Uuid {
    Uuid::new_v5(&run_id, format!("scoring.chunk/{chunk}").as_bytes())
}

/// The run of model `model` planned by recompute job `job_id` (one job may plan several).
pub fn run_id(job_id: Uuid, model: &str) -> Uuid {
    Uuid::new_v5(&job_id, format!("scoring.run/{model}").as_bytes())
}

/// A chunk fails on the database; the run waits for it, so retry soon and often.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial_ms: 2_000,
        multiplier: 2.0,
        max_delay_ms: 120_000,
        max_attempts: 6,
        jitter: 0.2,
    }
}

pub(crate) fn kinds() -> Vec<KindSpec> {
    vec![
        KindSpec {
            name: RECOMPUTE,
            queue: QUEUE,
            retry: retry_policy(),
            timeout: Duration::from_secs(600),
            validate: |raw| {
                let r: Recompute = crate::catalog::decode(raw)?;
                if let Some(m) = &r.model {
                    check_model_name(m).map_err(|e| format!("model: {e}"))?;
                }
                if r.chunk_size.is_some_and(|n| n == 0 || n > 1_000_000) {
                    return Err("chunk_size: must be 1 to 1000000".into());
                }
                Ok(())
            },
        },
        KindSpec {
            name: CHUNK,
            queue: QUEUE,
            retry: retry_policy(),
            timeout: Duration::from_secs(1800),
            validate: check::<Chunk>,
        },
    ]
}

/// The family's default schedule (enabled by `[scoring] schedules = true`): every model
/// recomputed every 15 minutes.
pub fn default_schedules() -> Vec<ScheduleConfig> {
    vec![crate::families::analytics::schedule(
        "scoring-recompute",
        "0 */15 * * * *",
        RECOMPUTE,
        json!({}),
    )]
}

#[cfg(test)]
mod tests {
    //! Reference values: `python3 scripts/fixtures/stats.py scoring` (`math.pow`), pasted here.
    use super::*;

    // FIXTURES-BEGIN (generated by scripts/fixtures/stats.py scoring)
    const CONTRIBUTION_CASES: &[(f64, f64, f64, f64, f64)] = &[
        (1.0, 1.0, 0.0, 3600.0, 1.0),
        (2.0, 5.0, 3600.0, 3600.0, 5.0),
        (0.5, 10.0, 7200.0, 3600.0, 1.25),
        (3.0, 1.0, 86400.0, 604800.0, 2.7171709927917203),
        (-1.5, 4.0, 1800.0, 3600.0, -4.242640687119286),
        (1.25, 99.5, 123456.0, 86400.0, 46.19496875783695),
    ];
    const SUBJECT_VIEW: f64 = 1.9571067811865475;
    const SUBJECT_BUY: f64 = 125.0;
    const SUBJECT_TOTAL: f64 = 126.95710678118655;
    // FIXTURES-END

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn contributions_decay_by_half_every_half_life() {
        for &(w, v, age, hl, want) in CONTRIBUTION_CASES {
            let got = contribution(w, v, age, hl);
            assert!(
                close(got, want),
                "contribution({w}, {v}, {age}, {hl}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn a_subject_scores_the_reference_total_with_its_components() {
        let model = ScoreModel {
            name: "engagement".into(),
            weights: [("view".to_owned(), 1.0), ("buy".to_owned(), 10.0)].into(),
            half_life_s: 86_400.0,
            normalization: Normalization::Max,
        };
        let as_of: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
        let ago = |s: i64| as_of - chrono::TimeDelta::seconds(s);
        let events = [
            ("view", 1.0, ago(0)),
            ("view", 1.0, ago(43_200)),
            ("buy", 25.0, ago(86_400)),
            ("view", 1.0, ago(172_800)),
            ("ignored", 100.0, ago(0)),
            // After as_of: not counted.
            ("buy", 1000.0, as_of + chrono::TimeDelta::seconds(1)),
        ];
        let s = model.score(events.iter().map(|(n, v, t)| (*n, *v, *t)), as_of);
        assert!(close(s.raw, SUBJECT_TOTAL), "{s:?}");
        assert!(close(s.components["view"].contribution, SUBJECT_VIEW));
        assert!(close(s.components["buy"].contribution, SUBJECT_BUY));
        assert_eq!((s.components["view"].events, s.components["buy"].events), (3, 1));
        assert!(!s.components.contains_key("ignored"));
        // No events: a zero score without components.
        assert_eq!(model.score([], as_of), Scored::default());
    }

    #[test]
    fn normalization_maps_onto_0_to_100() {
        assert_eq!(Normalization::Max.apply(50.0, 0.0, 200.0), 25.0);
        assert_eq!(Normalization::Max.apply(-5.0, -5.0, 200.0), 0.0);
        assert_eq!(Normalization::Max.apply(3.0, 3.0, 0.0), 0.0);
        assert_eq!(Normalization::Minmax.apply(150.0, 100.0, 200.0), 50.0);
        assert_eq!(Normalization::Minmax.apply(7.0, 7.0, 7.0), 0.0);
        assert_eq!(Normalization::Max.apply(200.0, 0.0, 200.0), 100.0);
    }

    #[test]
    fn models_and_names_are_checked() {
        let mut m = ScoreModel {
            name: "Bad Name".into(),
            weights: BTreeMap::new(),
            half_life_s: 0.0,
            normalization: Normalization::Max,
        };
        let fields: Vec<String> = m.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["name", "weights", "half_life_s"]);
        m.name = "ok".into();
        m.weights.insert("view".into(), f64::NAN);
        m.half_life_s = 60.0;
        assert_eq!(m.problems()[0].0, "weights.view");
        assert_ne!(chunk_job_id(Uuid::nil(), 1), chunk_job_id(Uuid::nil(), 2));
    }
}
