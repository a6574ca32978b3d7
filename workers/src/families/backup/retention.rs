//! Which backups a target keeps: grandfather-father-son selection as a pure function.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use uuid::Uuid;

use super::config::Retention;

/// A good backup of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    pub at: DateTime<Utc>,
}

/// The ids to keep: the newest `keep_last`; the newest backup of each of the `keep_daily`
/// most recent days that have one; the newest of each of the `keep_weekly` most recent ISO
/// weeks that have one (UTC). Counting days and weeks that have backups, rather than
/// calendar days back from today, means a stretch of failed backups never lets retention eat
/// into the history it was meant to keep. The newest backup is always kept, whatever the policy.
pub fn select(good: &[Candidate], policy: Retention) -> BTreeSet<Uuid> {
    let mut sorted: Vec<&Candidate> = good.iter().collect();
    sorted.sort_by(|a, b| b.at.cmp(&a.at).then(b.id.cmp(&a.id)));
    let mut keep = BTreeSet::new();
    if let Some(newest) = sorted.first() {
        keep.insert(newest.id);
    }
    keep.extend(sorted.iter().take(policy.keep_last as usize).map(|c| c.id));
    keep_newest_per_bucket(&sorted, policy.keep_daily, |c| c.at.date_naive(), &mut keep);
    keep_newest_per_bucket(
        &sorted,
        policy.keep_weekly,
        |c| iso_week(c.at.date_naive()),
        &mut keep,
    );
    keep
}

fn iso_week(d: NaiveDate) -> (i32, u32) {
    let w = d.iso_week();
    (w.year(), w.week())
}

/// `sorted` is newest first, so the first backup seen in a bucket is that bucket's newest.
fn keep_newest_per_bucket<K: PartialEq>(
    sorted: &[&Candidate],
    buckets: u32,
    bucket: impl Fn(&Candidate) -> K,
    keep: &mut BTreeSet<Uuid>,
) {
    let mut last: Option<K> = None;
    let mut taken = 0;
    for c in sorted {
        if taken >= buckets {
            break;
        }
        let k = bucket(c);
        if last.as_ref() != Some(&k) {
            keep.insert(c.id);
            taken += 1;
            last = Some(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;

    /// One backup a day at 02:00 from 2026-01-01 to 2026-03-31 (a Tuesday).
    fn ninety_dailies() -> Vec<Candidate> {
        let first = Utc.with_ymd_and_hms(2026, 1, 1, 2, 0, 0).unwrap();
        (0..90)
            .map(|i| Candidate {
                id: Uuid::from_u128(i as u128 + 1),
                at: first + Duration::days(i),
            })
            .collect()
    }

    fn days(kept: &BTreeSet<Uuid>, all: &[Candidate]) -> Vec<String> {
        let mut d: Vec<String> = all
            .iter()
            .filter(|c| kept.contains(&c.id))
            .map(|c| c.at.format("%m-%d").to_string())
            .collect();
        d.sort();
        d
    }

    #[test]
    fn ninety_daily_backups_keep_the_last_days_and_one_per_week() {
        let all = ninety_dailies();
        let policy = Retention {
            keep_last: 3,
            keep_daily: 7,
            keep_weekly: 6,
        };
        let kept = select(&all, policy);
        // Dailies: 03-25 … 03-31. Weeklies (newest of ISO weeks 14 … 9): 03-31, then the
        // Sundays 03-29, 03-22, 03-15, 03-08, 03-01.
        assert_eq!(
            days(&kept, &all),
            [
                "03-01", "03-08", "03-15", "03-22", "03-25", "03-26", "03-27", "03-28", "03-29", "03-30",
                "03-31"
            ]
        );
    }

    #[test]
    fn the_order_of_the_input_does_not_matter() {
        let mut all = ninety_dailies();
        let policy = Retention::default();
        let expected = select(&all, policy);
        all.reverse();
        all.swap(3, 70);
        assert_eq!(select(&all, policy), expected);
        // 7 last ⊂ 14 daily (03-18 … 03-31); of the 8 weeklies (ISO weeks 14 … 7) the newest
        // three fall among the dailies, the Sundays of weeks 11 … 7 are added.
        assert_eq!(expected.len(), 14 + 5);
    }

    #[test]
    fn the_newest_backup_survives_a_policy_that_keeps_nothing() {
        let all = ninety_dailies();
        let kept = select(
            &all,
            Retention {
                keep_last: 0,
                keep_daily: 0,
                keep_weekly: 0,
            },
        );
        assert_eq!(days(&kept, &all), ["03-31"]);
        assert!(select(&[], Retention::default()).is_empty());
    }

    #[test]
    fn days_without_backups_do_not_count_against_the_daily_quota() {
        // Backups on 03-01 and 03-02 only, then nothing for weeks: both stay with keep_daily 2.
        let a = Candidate {
            id: Uuid::from_u128(1),
            at: Utc.with_ymd_and_hms(2026, 3, 1, 2, 0, 0).unwrap(),
        };
        let b = Candidate {
            id: Uuid::from_u128(2),
            at: Utc.with_ymd_and_hms(2026, 3, 2, 2, 0, 0).unwrap(),
        };
        let extra_same_day = Candidate {
            id: Uuid::from_u128(3),
            at: Utc.with_ymd_and_hms(2026, 3, 2, 1, 0, 0).unwrap(),
        };
        let kept = select(
            &[a, b, extra_same_day],
            Retention {
                keep_last: 0,
                keep_daily: 2,
                keep_weekly: 0,
            },
        );
        assert_eq!(kept, BTreeSet::from([a.id, b.id]));
    }
}
