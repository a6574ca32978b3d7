//! Cron schedules: what a schedule is (a name, a cron expression in a timezone, a job template,
//! a missed-tick policy) and the pure computations the scheduler runs on it — the next tick,
//! and which ticks to fire when a scheduler comes back after a gap.
//!
//! Expressions are parsed by the `cron` crate (the parser apalis-cron is built on). drover
//! accepts the usual five fields (`min hour dom month dow`), six with seconds first, or seven
//! with a year last, and the `@hourly`/`@daily`/`@weekly`/`@monthly`/`@yearly` shorthands.
//! Numeric days of the week follow crontab (0 or 7 = Sunday, 1 = Monday); they are rewritten to
//! names before parsing, because the `cron` crate itself counts 1 = Sunday. Times are computed
//! in the schedule's IANA timezone (UTC unless given), so `0 2 * * *` in `Europe/Berlin` stays at
//! 02:00 local time across daylight-saving changes.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, SecondsFormat, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    catalog::{Catalog, CatalogError},
    job::{Job, JobId},
    queue::QueueName,
};

/// Ticks counted one by one when a scheduler comes back after a gap; beyond this the count of
/// missed ticks is reported as this number (a per-second schedule down for a day).
pub const MISSED_COUNT_CAP: u64 = 100_000;

/// A validated schedule name: 1–64 characters of `a-z`, `0-9`, `-`, `_`, starting with a letter
/// or digit — the queue-name rules, since the name is a URL segment, a metric label
/// (`drover_schedule_ticks_total{schedule}`) and part of each job's idempotency key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ScheduleName(String);

impl ScheduleName {
    pub fn parse(name: &str) -> Result<Self, String> {
        match QueueName::parse(name) {
            Ok(_) => Ok(Self(name.to_owned())),
            Err(e) => Err(format!("{name:?} is not a valid schedule name: it {}", e.reason)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScheduleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to do with ticks that passed while no scheduler could fire them (all replicas down, the
/// database unreachable) for longer than the misfire grace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedTicks {
    /// Drop them; the schedule resumes at its next tick.
    #[default]
    Skip,
    /// Fire once, for the latest missed tick, however many were missed.
    RunOnce,
}

impl MissedTicks {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedTicks::Skip => "skip",
            MissedTicks::RunOnce => "run_once",
        }
    }
}

impl FromStr for MissedTicks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(MissedTicks::Skip),
            "run_once" => Ok(MissedTicks::RunOnce),
            other => Err(format!("{other:?} is not a policy: use \"skip\" or \"run_once\"")),
        }
    }
}

impl fmt::Display for MissedTicks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a cron expression or timezone was refused; [`ScheduleError::field`] names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Cron(String),
    #[error("{0}")]
    Timezone(String),
}

impl ScheduleError {
    pub fn field(&self) -> &'static str {
        match self {
            ScheduleError::Cron(_) => "cron",
            ScheduleError::Timezone(_) => "timezone",
        }
    }
}

/// A parsed cron expression in its timezone.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expression: String,
    timezone: Tz,
    schedule: cron::Schedule,
}

impl CronSchedule {
    /// Parses `expression` (see the module documentation for the accepted forms) in `timezone`
    /// (an IANA name such as `Europe/Berlin`; UTC when `None`), and requires a tick after now:
    /// what a new definition must pass.
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let parsed = Self::read(expression, timezone)?;
        // An expression like `0 0 0 30 2 *` (30 February) parses but never fires.
        if parsed.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::Cron(format!("{expression:?} has no future tick")));
        }
        Ok(parsed)
    }

    /// Parses a stored expression, which may have run out of ticks since it was written (a
    /// year field in the past): the scheduler then just finds no next tick.
    pub fn read(expression: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let timezone = match timezone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                ScheduleError::Timezone(format!(
                    "{name:?} is not an IANA timezone name (e.g. \"UTC\", \"Europe/Berlin\", \"America/New_York\")"
                ))
            })?,
        };
        let normalized = normalize(expression).map_err(ScheduleError::Cron)?;
        let schedule = cron::Schedule::from_str(&normalized).map_err(|e| {
            ScheduleError::Cron(format!("{expression:?} is not a valid cron expression: {e}"))
        })?;
        Ok(Self {
            expression: expression.trim().to_owned(),
            timezone,
            schedule,
        })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Ticks fall on whole seconds: from `t`'s second, the next whole-second tick is the
        // first tick after `t` whether or not `t` had a fraction.
        let from = self.timezone.from_utc_datetime(&floor_second(t).naive_utc());
        self.schedule.after(&from).next().map(|d| d.with_timezone(&Utc))
    }

    /// The last tick strictly before `t`.
    pub fn latest_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // `cron` looks strictly before a whole second; a tick at `t`'s own second is still
        // before `t` when `t` has a fraction, so start from the second after.
        let ceil = if t.nanosecond() == 0 {
            t
        } else {
            floor_second(t) + chrono::Duration::seconds(1)
        };
        let from = self.timezone.from_utc_datetime(&ceil.naive_utc());
        self.schedule
            .after(&from)
            .next_back()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The first tick at `t` or later.
    fn first_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if t.nanosecond() == 0 {
            self.next_after(t - chrono::Duration::seconds(1))
        } else {
            self.next_after(t)
        }
    }

    /// Which ticks to fire now, for a schedule whose next unfired tick is `due`.
    ///
    /// Ticks up to `grace` old are late, not missed: each fires (so a scheduler that stalls
    /// for a few seconds loses nothing). Older ones are missed and follow `policy`. At most
    /// `max_fires` ticks are planned at once; [`TickPlan::next`] is then the first tick left
    /// for the next round.
    pub fn plan(
        &self,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        grace: Duration,
        policy: MissedTicks,
        max_fires: usize,
    ) -> TickPlan {
        let mut plan = TickPlan {
            fire: Vec::new(),
            missed: 0,
            next: Some(due),
        };
        if due > now {
            return plan;
        }
        let cutoff = now - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        if due < cutoff {
            let mut missed = 1;
            let mut t = self.next_after(due);
            while let Some(at) = t.filter(|at| *at < cutoff) {
                if missed >= MISSED_COUNT_CAP {
                    break;
                }
                missed += 1;
                t = self.next_after(at);
            }
            plan.missed = missed;
            if policy == MissedTicks::RunOnce {
                let latest = self.latest_before(cutoff).filter(|l| *l >= due).unwrap_or(due);
                plan.fire.push(PlannedTick {
                    at: latest,
                    stands_for: missed,
                });
            }
            plan.next = self.first_at_or_after(cutoff);
        }
        while let Some(at) = plan.next.filter(|at| *at <= now) {
            if plan.fire.len() >= max_fires.max(1) {
                break;
            }
            plan.fire.push(PlannedTick { at, stands_for: 1 });
            plan.next = self.next_after(at);
        }
        plan
    }
}

fn floor_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0).unwrap_or(t)
}

/// What the scheduler does for one schedule in one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickPlan {
    /// Ticks to fire, oldest first.
    pub fire: Vec<PlannedTick>,
    /// Ticks older than the grace (capped at [`MISSED_COUNT_CAP`]); with `skip` none of them
    /// fires, with `run_once` one firing stands for all of them.
    pub missed: u64,
    /// The first tick not handled by this plan: the schedule's new `next_tick`. `None` when the
    /// expression has no tick left (a year in the past).
    pub next: Option<DateTime<Utc>>,
}

/// One firing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedTick {
    /// The tick's time: part of the job's idempotency key.
    pub at: DateTime<Utc>,
    /// How many scheduled ticks this firing covers: 1, or the missed count for `run_once`.
    pub stands_for: u64,
}

/// The idempotency key of the job fired for `tick` of `schedule`: `schedule:{name}:{tick}`,
/// the tick in RFC 3339 UTC (`schedule:nightly:2026-11-23T02:00:00Z`).
pub fn idempotency_key(schedule: &str, tick: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        tick.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// Rewrites `expression` into the six- or seven-field form the `cron` crate reads.
fn normalize(expression: &str) -> Result<String, String> {
    let expression = expression.trim();
    if expression.starts_with('@') {
        return Ok(expression.to_owned());
    }
    let mut fields: Vec<String> = expression.split_whitespace().map(str::to_owned).collect();
    match fields.len() {
        5 => fields.insert(0, "0".into()),
        6 | 7 => {}
        n => {
            return Err(format!(
                "{expression:?} has {n} fields; expected 5 (minute hour day-of-month month day-of-week), \
                 6 (seconds first) or 7 (a year last)"
            ));
        }
    }
    fields[5] = day_of_week(&fields[5])?;
    Ok(fields.join(" "))
}

const DAY_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Crontab's numeric days of the week (0–7, Sunday = 0 or 7) as names, which the `cron` crate
/// reads unambiguously. Names and `*`/`?` pass through.
fn day_of_week(field: &str) -> Result<String, String> {
    let number = |s: &str| -> Result<Option<usize>, String> {
        if !s.bytes().all(|b| b.is_ascii_digit()) || s.is_empty() {
            return Ok(None);
        }
        match s.parse::<usize>() {
            Ok(n) if n <= 7 => Ok(Some(n)),
            _ => Err(format!(
                "day of week {s} is out of range: use 0-7 (0 and 7 are Sunday) or SUN-SAT"
            )),
        }
    };
    let mut items = Vec::new();
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((b, s)) => (b, Some(s)),
            None => (item, None),
        };
        let suffix = step.map(|s| format!("/{s}")).unwrap_or_default();
        match base.split_once('-') {
            Some((a, b)) => {
                let (na, nb) = (number(a)?, number(b)?);
                let start = na.map_or(a.to_owned(), |n| DAY_NAMES[n].to_owned());
                match nb {
                    // `cron` has no day after Saturday: a range ending on Sunday (7) ends on
                    // Saturday, and Sunday joins the list if the range's step reaches it.
                    Some(7) => {
                        items.push(format!("{start}-SAT{suffix}"));
                        let from = na.unwrap_or(1);
                        let step = step.and_then(|s| s.parse::<usize>().ok()).unwrap_or(1).max(1);
                        if from != 0 && (7 - from) % step == 0 {
                            items.push("SUN".into());
                        }
                    }
                    Some(n) => items.push(format!("{start}-{}{suffix}", DAY_NAMES[n])),
                    None => items.push(format!("{start}-{b}{suffix}")),
                }
            }
            None => match number(base)? {
                Some(n) => items.push(format!("{}{suffix}", DAY_NAMES[n])),
                None => items.push(item.to_owned()),
            },
        }
    }
    Ok(items.join(","))
}

/// The job a schedule enqueues at each tick: a kind from the catalog, its payload, and
/// optionally a queue and a priority (the kind's queue and 0 otherwise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub payload: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// What is wrong with a job template, per field (`job.kind`, `job.payload`, `job.queue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    UnknownKind(String),
    InvalidPayload(String),
    InvalidQueue(String),
}

impl TemplateError {
    pub fn field(&self) -> &'static str {
        match self {
            TemplateError::UnknownKind(_) => "job.kind",
            TemplateError::InvalidPayload(_) => "job.payload",
            TemplateError::InvalidQueue(_) => "job.queue",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            TemplateError::UnknownKind(r)
            | TemplateError::InvalidPayload(r)
            | TemplateError::InvalidQueue(r) => r,
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field(), self.reason())
    }
}

impl JobTemplate {
    /// Checks the template against the catalog; returns every problem.
    pub fn validate(&self, catalog: &Catalog) -> Result<(), Vec<TemplateError>> {
        let mut errors = Vec::new();
        if let Err(e) = self
            .raw_payload()
            .and_then(|raw| match catalog.validate(&self.kind, &raw) {
                Ok(_) => Ok(()),
                Err(CatalogError::UnknownKind(kind)) => {
                    let mut known: Vec<&str> = catalog.kinds().map(|k| k.name).collect();
                    known.sort_unstable();
                    Err(TemplateError::UnknownKind(format!(
                        "no job kind is named {kind:?} (known kinds: {})",
                        known.join(", ")
                    )))
                }
                Err(CatalogError::InvalidPayload { reason, .. }) => {
                    Err(TemplateError::InvalidPayload(reason))
                }
            })
        {
            errors.push(e);
        }
        if let Some(q) = &self.queue
            && let Err(e) = QueueName::parse(q)
        {
            errors.push(TemplateError::InvalidQueue(format!(
                "{q:?} is not a valid queue name: it {}",
                e.reason
            )));
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn raw_payload(&self) -> Result<Box<RawValue>, TemplateError> {
        serde_json::value::to_raw_value(&self.payload)
            .map_err(|e| TemplateError::InvalidPayload(e.to_string()))
    }

    /// The envelope to enqueue for `tick` of `schedule`: validated against the catalog as it is
    /// now (a kind can disappear between builds), with the kind's retry policy and the tick's
    /// idempotency key.
    pub fn to_job(
        &self,
        catalog: &Catalog,
        schedule: &str,
        tick: DateTime<Utc>,
        now_ms: i64,
    ) -> Result<Job, Vec<TemplateError>> {
        self.validate(catalog)?;
        let payload = self.raw_payload().map_err(|e| vec![e])?;
        let spec = catalog
            .get(&self.kind)
            .ok_or_else(|| vec![TemplateError::UnknownKind(self.kind.clone())])?;
        let queue = match &self.queue {
            Some(q) => QueueName::parse(q).map_err(|e| vec![TemplateError::InvalidQueue(e.to_string())])?,
            None => catalog.default_queue(spec),
        };
        Ok(Job {
            id: JobId::new(),
            queue,
            kind: spec.name.into(),
            payload,
            max_attempts: spec.retry.max_attempts,
            priority: self.priority.unwrap_or(0),
            enqueued_at_ms: now_ms,
            run_at_ms: None,
            trace_id: None,
            idempotency_key: Some(idempotency_key(schedule, tick)),
            attempt: 0,
            crashes: 0,
            attempts_before: 0,
            receipt: 0,
        })
    }
}

/// A schedule as written in the `[[schedules]]` tables of the TOML config file: defaults that
/// are inserted at startup when no schedule of that name exists (an operator's edits through
/// the API, or a deletion, are never overwritten).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    pub cron: String,
    /// IANA timezone; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub job: JobTemplate,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub missed_ticks: MissedTicks,
}

fn yes() -> bool {
    true
}

impl ScheduleConfig {
    /// Checks every field; the error names the schedule and each bad field.
    pub fn validate(&self, catalog: &Catalog) -> Result<CronSchedule, String> {
        let mut problems = Vec::new();
        if let Err(e) = ScheduleName::parse(&self.name) {
            problems.push(format!("name: {e}"));
        }
        let cron = CronSchedule::parse(&self.cron, self.timezone.as_deref())
            .map_err(|e| problems.push(format!("{}: {e}", e.field())))
            .ok();
        if let Err(errors) = self.job.validate(catalog) {
            problems.extend(errors.iter().map(ToString::to_string));
        }
        match cron {
            Some(cron) if problems.is_empty() => Ok(cron),
            _ => Err(format!(
                "schedule {:?} in the config file: {}",
                self.name,
                problems.join("; ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cron(expr: &str) -> CronSchedule {
        CronSchedule::parse(expr, None).unwrap()
    }

    #[test]
    fn five_six_and_seven_field_expressions_tick_where_crontab_would() {
        let five = cron("30 2 * * *");
        assert_eq!(
            five.next_after(at("2030-01-01T00:00:00Z")),
            Some(at("2030-01-01T02:30:00Z"))
        );
        let six = cron("*/15 * * * * *");
        assert_eq!(
            six.next_after(at("2030-01-01T00:00:07Z")),
            Some(at("2030-01-01T00:00:15Z"))
        );
        let seven = cron("0 0 12 1 1 * 2031");
        assert_eq!(
            seven.next_after(at("2030-06-01T00:00:00Z")),
            Some(at("2031-01-01T12:00:00Z"))
        );
        assert_eq!(
            cron("@daily").next_after(at("2030-01-01T00:00:00Z")),
            Some(at("2030-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn the_next_tick_is_strictly_after_even_from_a_fraction_of_a_second() {
        let every_second = cron("* * * * * *");
        assert_eq!(
            every_second.next_after(at("2030-01-01T00:00:00Z")),
            Some(at("2030-01-01T00:00:01Z"))
        );
        assert_eq!(
            every_second.next_after(at("2030-01-01T00:00:00.999Z")),
            Some(at("2030-01-01T00:00:01Z"))
        );
        assert_eq!(
            every_second.latest_before(at("2030-01-01T00:00:01Z")),
            Some(at("2030-01-01T00:00:00Z"))
        );
        assert_eq!(
            every_second.latest_before(at("2030-01-01T00:00:00.5Z")),
            Some(at("2030-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn numeric_days_of_week_count_from_sunday_as_in_crontab() {
        // 2030-01-06 is a Sunday.
        let sunday = at("2030-01-06T03:00:00Z");
        for expr in ["0 3 * * 0", "0 3 * * 7", "0 3 * * SUN", "0 3 * * sun"] {
            assert_eq!(
                cron(expr).next_after(at("2030-01-01T00:00:00Z")),
                Some(sunday),
                "{expr}"
            );
        }
        // Monday to Friday, from a Saturday: the next Monday.
        assert_eq!(
            cron("0 9 * * 1-5").next_after(at("2030-01-05T12:00:00Z")),
            Some(at("2030-01-07T09:00:00Z"))
        );
        // Friday to Sunday (7), from a Monday: Friday, then Saturday, then Sunday.
        let weekend = cron("0 0 * * 5-7");
        let fri = weekend.next_after(at("2030-01-07T00:00:00Z")).unwrap();
        let sat = weekend.next_after(fri).unwrap();
        let sun = weekend.next_after(sat).unwrap();
        assert_eq!(
            [fri, sat, sun],
            [
                at("2030-01-11T00:00:00Z"),
                at("2030-01-12T00:00:00Z"),
                at("2030-01-13T00:00:00Z")
            ]
        );
        assert_eq!(day_of_week("1-7/2").unwrap(), "MON-SAT/2,SUN");
        assert_eq!(day_of_week("2-7/2").unwrap(), "TUE-SAT/2");
        assert_eq!(day_of_week("*/2").unwrap(), "*/2");
        assert_eq!(day_of_week("MON,3").unwrap(), "MON,WED");
    }

    #[test]
    fn bad_expressions_and_timezones_name_their_field() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "0 3 * * 8",
            "every day",
            "0 0 0 30 2 *",
        ] {
            let err = CronSchedule::parse(bad, None).unwrap_err();
            assert_eq!(err.field(), "cron", "{bad:?}: {err}");
        }
        let err = CronSchedule::parse("* * * * *", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(err.field(), "timezone");
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }

    #[test]
    fn a_local_time_schedule_follows_daylight_saving_time() {
        let berlin = CronSchedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // Winter: 02:00 CET is 01:00 UTC; summer: 02:00 CEST is 00:00 UTC.
        assert_eq!(
            berlin.next_after(at("2030-01-10T12:00:00Z")),
            Some(at("2030-01-11T01:00:00Z"))
        );
        assert_eq!(
            berlin.next_after(at("2030-07-10T12:00:00Z")),
            Some(at("2030-07-11T00:00:00Z"))
        );
    }

    #[test]
    fn a_stored_expression_whose_ticks_ran_out_still_reads_but_a_new_one_is_refused() {
        let ended = "0 0 0 1 1 * 2020-2021";
        assert_eq!(CronSchedule::parse(ended, None).unwrap_err().field(), "cron");
        let c = CronSchedule::read(ended, None).unwrap();
        assert_eq!(c.next_after(at("2030-01-01T00:00:00Z")), None);
        let plan = c.plan(
            at("2020-01-01T00:00:00Z"),
            at("2030-01-01T00:00:00Z"),
            GRACE,
            MissedTicks::RunOnce,
            100,
        );
        assert_eq!(
            plan.fire,
            [PlannedTick {
                at: at("2021-01-01T00:00:00Z"),
                stands_for: 2
            }]
        );
        assert_eq!(plan.next, None);
    }

    #[test]
    fn a_local_time_skipped_in_spring_does_not_fire_and_one_repeated_in_autumn_fires_once() {
        let berlin = CronSchedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        // 2030-03-31 02:00 CET jumps to 03:00 CEST: no 02:30 that day.
        assert_eq!(
            berlin.next_after(at("2030-03-30T12:00:00Z")),
            Some(at("2030-04-01T00:30:00Z"))
        );
        // 2030-10-27 03:00 CEST falls back to 02:00 CET: 02:30 happens at two instants, and
        // fires at the first only (a daily job runs once that day).
        let first = berlin.next_after(at("2030-10-26T12:00:00Z")).unwrap();
        let second = berlin.next_after(first).unwrap();
        assert_eq!(
            (first, second),
            (at("2030-10-27T00:30:00Z"), at("2030-10-28T01:30:00Z"))
        );
    }

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn an_on_time_tick_fires_once_and_the_next_one_follows() {
        let c = cron("0 * * * * *");
        let due = at("2030-01-01T10:00:00Z");
        let plan = c.plan(due, at("2030-01-01T10:00:00.003Z"), GRACE, MissedTicks::Skip, 100);
        assert_eq!(
            plan.fire,
            [PlannedTick {
                at: due,
                stands_for: 1
            }]
        );
        assert_eq!(plan.missed, 0);
        assert_eq!(plan.next, Some(at("2030-01-01T10:01:00Z")));
        let early = c.plan(due, at("2030-01-01T09:59:59.9Z"), GRACE, MissedTicks::Skip, 100);
        assert!(early.fire.is_empty());
        assert_eq!(early.next, Some(due));
    }

    #[test]
    fn late_ticks_within_the_grace_all_fire_whatever_the_policy() {
        let c = cron("* * * * * *");
        let due = at("2030-01-01T10:00:00Z");
        for policy in [MissedTicks::Skip, MissedTicks::RunOnce] {
            let plan = c.plan(due, at("2030-01-01T10:00:05.5Z"), GRACE, policy, 100);
            let fired: Vec<_> = plan.fire.iter().map(|t| t.at).collect();
            assert_eq!(fired.len(), 6, "{policy}: 10:00:00 to 10:00:05");
            assert_eq!(fired[5], at("2030-01-01T10:00:05Z"));
            assert_eq!(plan.missed, 0);
            assert_eq!(plan.next, Some(at("2030-01-01T10:00:06Z")));
        }
    }

    #[test]
    fn after_downtime_skip_drops_the_missed_ticks_and_run_once_fires_the_latest_once() {
        let c = cron("0 * * * * *");
        let due = at("2030-01-01T10:00:00Z");
        // Down from 10:00 to 12:30:30: ticks 10:00 … 12:29 are older than the 60 s grace
        // (150 of them), 12:30 is late but within it.
        let now = at("2030-01-01T12:30:30Z");
        let skip = c.plan(due, now, GRACE, MissedTicks::Skip, 100);
        assert_eq!(skip.missed, 150);
        assert_eq!(
            skip.fire,
            [PlannedTick {
                at: at("2030-01-01T12:30:00Z"),
                stands_for: 1
            }]
        );
        assert_eq!(skip.next, Some(at("2030-01-01T12:31:00Z")));

        let once = c.plan(due, now, GRACE, MissedTicks::RunOnce, 100);
        assert_eq!(once.missed, 150);
        assert_eq!(
            once.fire,
            [
                PlannedTick {
                    at: at("2030-01-01T12:29:00Z"),
                    stands_for: 150
                },
                PlannedTick {
                    at: at("2030-01-01T12:30:00Z"),
                    stands_for: 1
                }
            ]
        );
        assert_eq!(once.next, Some(at("2030-01-01T12:31:00Z")));
    }

    #[test]
    fn a_daily_schedule_down_for_three_days_runs_once_or_not_at_all() {
        let c = cron("0 2 * * *");
        let due = at("2030-01-01T02:00:00Z");
        let now = at("2030-01-04T09:00:00Z");
        let skip = c.plan(due, now, GRACE, MissedTicks::Skip, 100);
        assert_eq!((skip.fire.len(), skip.missed), (0, 4));
        assert_eq!(skip.next, Some(at("2030-01-05T02:00:00Z")));
        let once = c.plan(due, now, GRACE, MissedTicks::RunOnce, 100);
        assert_eq!(
            once.fire,
            [PlannedTick {
                at: at("2030-01-04T02:00:00Z"),
                stands_for: 4
            }]
        );
        assert_eq!(once.next, Some(at("2030-01-05T02:00:00Z")));
    }

    #[test]
    fn the_grace_boundary_is_exact() {
        let c = cron("* * * * * *");
        let due = at("2030-01-01T10:00:00Z");
        // Exactly 60 s old: still within the grace. 60.5 s old: missed.
        let plan = c.plan(due, at("2030-01-01T10:01:00Z"), GRACE, MissedTicks::Skip, 1000);
        assert_eq!((plan.missed, plan.fire.len()), (0, 61));
        let plan = c.plan(due, at("2030-01-01T10:01:00.5Z"), GRACE, MissedTicks::Skip, 1000);
        assert_eq!(plan.missed, 1);
        assert_eq!(plan.fire.first().map(|t| t.at), Some(at("2030-01-01T10:00:01Z")));
        assert_eq!(plan.fire.len(), 60);
    }

    #[test]
    fn a_round_fires_at_most_max_fires_and_leaves_the_rest_due() {
        let c = cron("* * * * * *");
        let due = at("2030-01-01T10:00:00Z");
        let plan = c.plan(due, at("2030-01-01T10:00:30Z"), GRACE, MissedTicks::Skip, 10);
        assert_eq!(plan.fire.len(), 10);
        assert_eq!(plan.next, Some(at("2030-01-01T10:00:10Z")));
        let rest = c.plan(
            plan.next.unwrap(),
            at("2030-01-01T10:00:30Z"),
            GRACE,
            MissedTicks::Skip,
            100,
        );
        assert_eq!(rest.fire.len(), 21);
        assert_eq!(rest.next, Some(at("2030-01-01T10:00:31Z")));
    }

    #[test]
    fn a_very_long_gap_is_counted_up_to_the_cap() {
        let c = cron("* * * * * *");
        let plan = c.plan(
            at("2030-01-01T00:00:00Z"),
            at("2030-01-10T00:00:00Z"),
            GRACE,
            MissedTicks::RunOnce,
            100,
        );
        assert_eq!(plan.missed, MISSED_COUNT_CAP);
        assert_eq!(plan.fire[0].at, at("2030-01-09T23:58:59Z"));
        assert_eq!(plan.fire.len(), 62);
    }

    #[test]
    fn the_idempotency_key_names_the_schedule_and_the_tick() {
        assert_eq!(
            idempotency_key("nightly", at("2030-01-01T02:00:00Z")),
            "schedule:nightly:2030-01-01T02:00:00Z"
        );
    }

    #[test]
    fn a_template_becomes_a_job_of_its_kind_on_its_queue_with_the_ticks_key() {
        let catalog = Catalog::default();
        let t = JobTemplate {
            kind: "sleep".into(),
            payload: json!({"ms": 5}),
            queue: None,
            priority: Some(3),
        };
        let job = t
            .to_job(&catalog, "nightly", at("2030-01-01T02:00:00Z"), 42)
            .unwrap();
        assert_eq!(
            (job.queue.as_str(), &*job.kind, job.priority),
            ("default", "sleep", 3)
        );
        assert_eq!(job.payload.get(), r#"{"ms":5}"#);
        assert_eq!(
            job.idempotency_key.as_deref(),
            Some("schedule:nightly:2030-01-01T02:00:00Z")
        );
        let bad = JobTemplate {
            kind: "nope".into(),
            payload: json!({}),
            queue: Some("Bad Queue".into()),
            priority: None,
        };
        let errors = bad.validate(&catalog).unwrap_err();
        let fields: Vec<_> = errors.iter().map(TemplateError::field).collect();
        assert_eq!(fields, ["job.kind", "job.queue"]);
    }

    #[test]
    fn a_config_entry_reads_from_toml_and_reports_every_bad_field() {
        let text = r#"
            [[schedules]]
            name = "nightly"
            cron = "0 2 * * *"
            timezone = "Europe/Berlin"
            missed_ticks = "run_once"
            job = { kind = "sleep", payload = { ms = 10 } }

            [[schedules]]
            name = "Bad Name"
            cron = "0 2 * *"
            job = { kind = "nope" }
        "#;
        #[derive(Deserialize)]
        struct File {
            schedules: Vec<ScheduleConfig>,
        }
        let file: File = toml::from_str(text).unwrap();
        let catalog = Catalog::default();
        let good = &file.schedules[0];
        assert_eq!(good.missed_ticks, MissedTicks::RunOnce);
        assert!(good.enabled);
        assert_eq!(good.job.payload, json!({"ms": 10}));
        assert_eq!(
            good.validate(&catalog).unwrap().timezone(),
            chrono_tz::Europe::Berlin
        );
        let err = file.schedules[1].validate(&catalog).unwrap_err();
        for field in ["name:", "cron:", "job.kind:"] {
            assert!(err.contains(field), "{field} missing from {err}");
        }
    }
}
