//! Schedules and ticks on both databases: the compare-and-set steps scheduler replicas rely on.

use chrono::{DateTime, Duration, Utc};
use schema::schedules::{self, Claim, NewTick, Origin, Put, ScheduleWrite};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::support::{t, with_migrated_databases};

fn write(name: &str, cron: &str) -> ScheduleWrite {
    ScheduleWrite {
        name: name.into(),
        cron: cron.into(),
        timezone: "UTC".into(),
        kind: "noop".into(),
        payload: serde_json::json!({}),
        queue: None,
        priority: None,
        enabled: true,
        missed_ticks: "skip".into(),
        origin: Origin::Api,
    }
}

fn tick(at: DateTime<Utc>) -> NewTick {
    NewTick {
        tick_at: at,
        job_id: Uuid::now_v7(),
        envelope: format!("{{\"tick\":\"{at}\"}}"),
        stands_for: 1,
    }
}

async fn claim(
    db: &DatabaseConnection,
    name: &str,
    version: i64,
    replica: &str,
    ticks: Vec<NewTick>,
    next: DateTime<Utc>,
) -> Option<Vec<schema::entity::schedule_tick::Model>> {
    schedules::claim(
        db,
        Claim {
            schedule: name,
            version,
            next_tick: Some(next),
            ticks,
            replica,
            lease_until: t(30_000),
            now: t(0),
        },
    )
    .await
    .expect("claim")
}

#[tokio::test]
async fn of_many_replicas_claiming_the_same_tick_at_once_exactly_one_wins() {
    with_migrated_databases(|db| async move {
        let Put::Created(s) = schedules::put(&db, &write("every", "* * * * * *"), Some(t(0)), t(-1000))
            .await
            .unwrap()
        else {
            panic!("expected a new schedule")
        };
        let replicas: Vec<_> = (0..8)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    claim(
                        &db,
                        "every",
                        s.version,
                        &format!("r{i}"),
                        vec![tick(t(0))],
                        t(1000),
                    )
                    .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for r in replicas {
            if let Some(held) = r.await.unwrap() {
                winners.push(held);
            }
        }
        assert_eq!(winners.len(), 1, "exactly one replica holds the tick");
        assert_eq!(winners[0].len(), 1);
        let row = schedules::get(&db, "every").await.unwrap().unwrap();
        assert_eq!(
            (row.version, row.last_tick, row.next_tick),
            (s.version + 1, Some(t(0)), Some(t(1000)))
        );
        let ticks = schedules::recent_ticks(&db, "every", 10).await.unwrap();
        assert_eq!(ticks.len(), 1);
        assert_eq!(ticks[0].claimed_by, winners[0][0].claimed_by);
    })
    .await;
}

#[tokio::test]
async fn a_claim_planned_before_an_edit_applies_nothing() {
    with_migrated_databases(|db| async move {
        schedules::put(&db, &write("s", "* * * * * *"), Some(t(0)), t(-1000))
            .await
            .unwrap();
        let before = schedules::get(&db, "s").await.unwrap().unwrap();
        // The job template changes: the pending tick is kept, the version moves on.
        let mut edited = write("s", "* * * * * *");
        edited.payload = serde_json::json!({"x": 1});
        let Put::Updated(after) = schedules::put(&db, &edited, Some(t(5000)), t(-500))
            .await
            .unwrap()
        else {
            panic!("expected an update")
        };
        assert_eq!(
            after.next_tick, before.next_tick,
            "same timing keeps the pending tick"
        );
        assert!(after.version > before.version);
        assert!(
            claim(&db, "s", before.version, "r", vec![tick(t(0))], t(1000))
                .await
                .is_none()
        );
        assert!(schedules::recent_ticks(&db, "s", 10).await.unwrap().is_empty());
        // A new expression restarts from the tick after now that the caller computed.
        let Put::Updated(moved) = schedules::put(&db, &write("s", "0 * * * * *"), Some(t(60_000)), t(-400))
            .await
            .unwrap()
        else {
            panic!("expected an update")
        };
        assert_eq!(moved.next_tick, Some(t(60_000)));
        // Disabled: no next tick, and nothing to claim.
        let mut off = write("s", "0 * * * * *");
        off.enabled = false;
        schedules::put(&db, &off, Some(t(60_000)), t(-300)).await.unwrap();
        let row = schedules::get(&db, "s").await.unwrap().unwrap();
        assert_eq!(row.next_tick, None);
        assert!(schedules::active(&db).await.unwrap().is_empty());
        assert!(
            claim(&db, "s", row.version, "r", vec![tick(t(0))], t(1000))
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
async fn config_defaults_never_overwrite_an_edit_or_come_back_after_a_delete() {
    with_migrated_databases(|db| async move {
        let mut default = write("backup", "0 2 * * *");
        default.origin = Origin::Config;
        assert!(
            schedules::insert_if_absent(&db, &default, Some(t(0)), t(-1))
                .await
                .unwrap()
        );
        assert!(
            !schedules::insert_if_absent(&db, &default, Some(t(0)), t(-1))
                .await
                .unwrap()
        );
        // The operator edits it; the next start's default leaves the edit alone.
        let mut edited = write("backup", "0 3 * * *");
        edited.payload = serde_json::json!({"edited": true});
        schedules::put(&db, &edited, Some(t(3_600_000)), t(0))
            .await
            .unwrap();
        assert!(
            !schedules::insert_if_absent(&db, &default, Some(t(0)), t(1))
                .await
                .unwrap()
        );
        let row = schedules::get(&db, "backup").await.unwrap().unwrap();
        assert_eq!((row.cron.as_str(), row.origin.as_str()), ("0 3 * * *", "api"));
        // Deleted: gone from reads, and the default does not come back.
        assert!(schedules::delete(&db, "backup", t(2)).await.unwrap());
        assert!(!schedules::delete(&db, "backup", t(3)).await.unwrap());
        assert!(
            !schedules::insert_if_absent(&db, &default, Some(t(0)), t(4))
                .await
                .unwrap()
        );
        assert!(schedules::get(&db, "backup").await.unwrap().is_none());
        assert!(schedules::list(&db).await.unwrap().is_empty());
        // A PUT brings it back, as new.
        let put = schedules::put(&db, &default, Some(t(10_000)), t(5))
            .await
            .unwrap();
        assert!(matches!(&put, Put::Created(r) if r.created_at == t(5) && r.last_tick.is_none()));
    })
    .await;
}

#[tokio::test]
async fn a_tick_whose_holder_stopped_is_taken_over_once_and_enqueued_once() {
    with_migrated_databases(|db| async move {
        let Put::Created(s) = schedules::put(&db, &write("s", "* * * * * *"), Some(t(0)), t(-1000))
            .await
            .unwrap()
        else {
            panic!("expected a new schedule")
        };
        let held = claim(&db, "s", s.version, "dead", vec![tick(t(0))], t(1000))
            .await
            .unwrap();
        let lease = held[0].lease_until;
        // Before the lease runs out only the holder sees it.
        assert!(
            schedules::unenqueued_ticks(&db, "other", lease - Duration::seconds(1), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            schedules::unenqueued_ticks(&db, "dead", t(0), 10)
                .await
                .unwrap()
                .len(),
            1
        );
        // After it, anyone does; of two replicas taking over, one wins.
        let stranded = schedules::unenqueued_ticks(&db, "a", lease + Duration::seconds(1), 10)
            .await
            .unwrap();
        assert_eq!(stranded.len(), 1);
        let a = schedules::take_over(&db, &stranded[0], "a", lease + Duration::seconds(31))
            .await
            .unwrap();
        let b = schedules::take_over(&db, &stranded[0], "b", lease + Duration::seconds(31))
            .await
            .unwrap();
        let a = a.expect("the first take-over wins");
        assert!(b.is_none(), "the second take-over must lose");
        assert_eq!((a.claimed_by.as_str(), a.claims), ("a", 2));
        // The old holder can no longer extend its lease.
        assert!(
            !schedules::extend_lease(&db, &held[0], lease + Duration::seconds(60))
                .await
                .unwrap()
        );
        assert!(
            schedules::extend_lease(&db, &a, lease + Duration::seconds(60))
                .await
                .unwrap()
        );
        schedules::mark_enqueued(&db, &a, a.job_id, t(40_000))
            .await
            .unwrap();
        assert!(
            schedules::unenqueued_ticks(&db, "a", lease + Duration::seconds(600), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            schedules::take_over(&db, &a, "b", t(99_000))
                .await
                .unwrap()
                .is_none()
        );
        // Retention removes enqueued ticks only.
        assert_eq!(schedules::prune_ticks(&db, t(40_000)).await.unwrap(), 0);
        assert_eq!(schedules::prune_ticks(&db, t(40_001)).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_tick_recorded_before_keeps_its_first_firing() {
    with_migrated_databases(|db| async move {
        schedules::put(&db, &write("s", "* * * * * *"), Some(t(0)), t(-1000))
            .await
            .unwrap();
        let v = schedules::get(&db, "s").await.unwrap().unwrap().version;
        let first = claim(&db, "s", v, "r1", vec![tick(t(0))], t(1000)).await.unwrap();
        assert_eq!(first.len(), 1);
        // Some later claim covering the same tick again (clock skew across an edit).
        let again = claim(&db, "s", v + 1, "r2", vec![tick(t(0)), tick(t(1000))], t(2000))
            .await
            .unwrap();
        assert_eq!(again.iter().map(|t| t.tick_at).collect::<Vec<_>>(), [t(1000)]);
        let ticks = schedules::recent_ticks(&db, "s", 10).await.unwrap();
        let owners: Vec<_> = ticks.iter().map(|t| (t.tick_at, t.claimed_by.as_str())).collect();
        assert_eq!(owners, [(t(1000), "r2"), (t(0), "r1")]);
    })
    .await;
}
