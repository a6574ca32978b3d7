use chrono::Duration;
use schema::entity::{job, job_attempt};
use schema::history::{AttemptOutcome, HistoryEvent, apply_batch};
use schema::queries::get_job;
use uuid::Uuid;

use crate::support::{enqueued, finished, started, t, with_migrated_databases};

/// One job's whole life: enqueued at 0, started at 100, succeeded at 250.
fn life(id: Uuid) -> [HistoryEvent; 3] {
    [
        enqueued(id, t(0)),
        started(id, 1, t(100)),
        finished(id, 1, t(100), t(250), AttemptOutcome::Succeeded),
    ]
}

fn expected_row(id: Uuid) -> job::Model {
    job::Model {
        id,
        queue: "default".into(),
        kind: "backup.snapshot".into(),
        status: "succeeded".into(),
        attempts: 1,
        max_attempts: 3,
        payload: Some(serde_json::json!({ "volume": "data" })),
        priority: 5,
        idempotency_key: Some(format!("key-{id}")),
        trace_id: Some("trace-enqueue".into()),
        worker_id: Some("worker-1".into()),
        last_error: None,
        created_at: t(0),
        run_at: None,
        started_at: Some(t(100)),
        finished_at: Some(t(250)),
        event_at: t(250),
    }
}

#[tokio::test]
async fn a_job_ends_the_same_whatever_order_its_events_arrive_in() {
    with_migrated_databases(|db| async move {
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        for order in orders {
            // Each event in its own batch, as when the API and a worker flush separately.
            let id = Uuid::now_v7();
            let events = life(id);
            for i in order {
                apply_batch(&db, std::slice::from_ref(&events[i]))
                    .await
                    .expect("apply");
            }
            let view = get_job(&db, id).await.expect("query").expect("job exists");
            assert_eq!(view.job, expected_row(id), "events applied in order {order:?}");
            assert_eq!(view.attempts.len(), 1);
            assert_eq!(view.attempts[0].outcome.as_deref(), Some("succeeded"));
            assert_eq!(view.attempts[0].started_at, t(100));
            assert_eq!(view.attempts[0].finished_at, Some(t(250)));
        }

        // All three in one batch, newest first: the same job twice in one statement is not allowed
        // on Postgres, so this also checks that the batch is split.
        let id = Uuid::now_v7();
        let mut events = life(id);
        events.reverse();
        apply_batch(&db, &events).await.expect("apply");
        let view = get_job(&db, id).await.expect("query").expect("job exists");
        assert_eq!(view.job, expected_row(id));
    })
    .await;
}

#[tokio::test]
async fn a_job_that_fails_twice_then_succeeds_keeps_three_attempts() {
    with_migrated_databases(|db| async move {
        let id = Uuid::now_v7();
        let mut events = vec![enqueued(id, t(0))];
        for attempt in 1..=2 {
            let start = t(i64::from(attempt) * 1_000);
            events.push(started(id, attempt, start));
            events.push(finished(
                id,
                attempt,
                start,
                start + Duration::milliseconds(10),
                AttemptOutcome::Failed,
            ));
        }
        events.push(started(id, 3, t(3_000)));
        apply_batch(&db, &events).await.expect("apply");

        let running = get_job(&db, id).await.expect("query").expect("job exists").job;
        assert_eq!(running.status, "running");
        assert_eq!(running.attempts, 3);
        assert_eq!(running.worker_id.as_deref(), Some("worker-3"));
        // The retry that is running still shows why the previous attempt failed.
        assert_eq!(running.last_error.as_deref(), Some("boom 2"));
        assert_eq!(running.run_at, Some(t(2_010) + Duration::seconds(1)));

        apply_batch(
            &db,
            &[finished(id, 3, t(3_000), t(3_050), AttemptOutcome::Succeeded)],
        )
        .await
        .expect("apply");
        let view = get_job(&db, id).await.expect("query").expect("job exists");
        assert_eq!(view.job.status, "succeeded");
        assert_eq!(view.job.last_error, None);
        assert_eq!(view.job.finished_at, Some(t(3_050)));
        let attempts: Vec<_> = view
            .attempts
            .iter()
            .map(|a| (a.attempt, a.outcome.as_deref(), a.error.as_deref()))
            .collect();
        assert_eq!(
            attempts,
            [
                (1, Some("failed"), Some("boom 1")),
                (2, Some("failed"), Some("boom 2")),
                (3, Some("succeeded"), None),
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_job_that_exhausts_its_attempts_ends_dead_with_its_last_error() {
    with_migrated_databases(|db| async move {
        let id = Uuid::now_v7();
        let mut events = vec![enqueued(id, t(0))];
        for attempt in 1..=3 {
            let start = t(i64::from(attempt) * 1_000);
            events.push(started(id, attempt, start));
            events.push(finished(
                id,
                attempt,
                start,
                start + Duration::milliseconds(10),
                AttemptOutcome::Panicked,
            ));
        }
        apply_batch(&db, &events).await.expect("apply");
        let view = get_job(&db, id).await.expect("query").expect("job exists");
        assert_eq!(view.job.status, "dead");
        assert_eq!(view.job.last_error.as_deref(), Some("boom 3"));
        assert_eq!(view.job.finished_at, Some(t(3_010)));
        assert_eq!(view.attempts.len(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_job_enqueued_to_run_later_is_scheduled() {
    with_migrated_databases(|db| async move {
        let id = Uuid::now_v7();
        let mut event = enqueued(id, t(0));
        if let HistoryEvent::Enqueued { run_at, .. } = &mut event {
            *run_at = Some(t(60_000));
        }
        apply_batch(&db, &[event]).await.expect("apply");
        let job = get_job(&db, id).await.expect("query").expect("job exists").job;
        assert_eq!(job.status, "scheduled");
        assert_eq!(job.run_at, Some(t(60_000)));
    })
    .await;
}

#[tokio::test]
async fn a_cancel_event_stops_a_waiting_job_but_not_a_finished_one() {
    with_migrated_databases(|db| async move {
        let waiting = Uuid::now_v7();
        let done = Uuid::now_v7();
        let unknown = Uuid::now_v7();
        let mut events = vec![enqueued(waiting, t(0))];
        events.extend(life(done));
        apply_batch(&db, &events).await.expect("apply");

        let cancels = [waiting, done, unknown].map(|id| HistoryEvent::Canceled { id, at: t(500) });
        apply_batch(&db, &cancels).await.expect("apply");
        // A start older than the cancel (it lost the race) does not bring the job back.
        apply_batch(&db, &[started(waiting, 1, t(400))])
            .await
            .expect("apply");

        let waiting = get_job(&db, waiting).await.expect("query").expect("exists").job;
        assert_eq!(waiting.status, "canceled");
        assert_eq!(waiting.finished_at, Some(t(500)));
        let done = get_job(&db, done).await.expect("query").expect("exists").job;
        assert_eq!(done.status, "succeeded");
        assert_eq!(get_job(&db, unknown).await.expect("query"), None);
    })
    .await;
}

#[tokio::test]
async fn a_batch_bigger_than_one_statement_is_written_whole() {
    with_migrated_databases(|db| async move {
        let events: Vec<_> = (0..1_234)
            .flat_map(|i| {
                let id = Uuid::now_v7();
                [enqueued(id, t(i)), started(id, 1, t(i + 1))]
            })
            .collect();
        apply_batch(&db, &events).await.expect("apply");
        assert_eq!(crate::support::job_count(&db).await, 1_234);
    })
    .await;
}

/// Job `i`'s events, in the order they are written, for a sequence that covers every kind of
/// event: attempts that succeed, fail, time out and die, jobs still running, cancels of waiting
/// and of finished jobs, worker events before the enqueue, and a retry's events before the first
/// attempt's.
fn every_kind_of_event(i: usize, id: Uuid) -> Vec<HistoryEvent> {
    let base = i as i64 * 10;
    let at = |ms: i64| t(base + ms);
    let mut enqueue = enqueued(id, at(0));
    if let HistoryEvent::Enqueued {
        idempotency_key,
        run_at,
        ..
    } = &mut enqueue
    {
        // Not the id, so that two copies of a sequence can be compared.
        *idempotency_key = Some(format!("key-{i}"));
        if i % 12 == 2 {
            *run_at = Some(at(60_000));
        }
    }
    let cancel = |ms| HistoryEvent::Canceled { id, at: at(ms) };
    match i % 6 {
        0 => vec![
            enqueue,
            started(id, 1, at(100)),
            finished(id, 1, at(100), at(150), AttemptOutcome::Succeeded),
        ],
        1 => vec![
            finished(id, 1, at(100), at(150), AttemptOutcome::Failed),
            started(id, 2, at(1_200)),
            enqueue,
            started(id, 1, at(100)),
            finished(id, 2, at(1_200), at(1_300), AttemptOutcome::Succeeded),
        ],
        // Scheduled for later, or canceled while waiting.
        2 if i % 12 == 2 => vec![enqueue],
        2 => vec![enqueue, cancel(50)],
        // Retrying, or running its retry.
        3 => {
            let mut events = vec![
                enqueue,
                started(id, 1, at(100)),
                finished(id, 1, at(100), at(180), AttemptOutcome::TimedOut),
            ];
            if i % 12 == 3 {
                events.push(started(id, 2, at(1_200)));
            }
            events
        }
        4 => (1..=3)
            .flat_map(|attempt| {
                let start = at(i64::from(attempt) * 1_000);
                [
                    started(id, attempt, start),
                    finished(
                        id,
                        attempt,
                        start,
                        start + Duration::milliseconds(5),
                        AttemptOutcome::Panicked,
                    ),
                ]
            })
            .collect(),
        _ => vec![
            enqueue,
            started(id, 1, at(100)),
            finished(id, 1, at(100), at(150), AttemptOutcome::Succeeded),
            cancel(200),
        ],
    }
}

#[tokio::test]
async fn a_batch_of_every_kind_of_event_ends_as_if_each_event_were_written_alone() {
    with_migrated_databases(|db| async move {
        // Enough jobs that SQLite writes each table in statements of several sizes.
        let jobs = 96;
        let together: Vec<Uuid> = (0..jobs).map(|_| Uuid::now_v7()).collect();
        let alone: Vec<Uuid> = (0..jobs).map(|_| Uuid::now_v7()).collect();
        // The jobs' sequences interleaved, as a worker and the API would record them.
        let interleaved = |ids: &[Uuid]| -> Vec<HistoryEvent> {
            let mut sequences: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| every_kind_of_event(i, *id).into_iter())
                .collect();
            let mut events = Vec::new();
            loop {
                let before = events.len();
                events.extend(sequences.iter_mut().filter_map(Iterator::next));
                if events.len() == before {
                    return events;
                }
            }
        };

        apply_batch(&db, &interleaved(&together)).await.expect("apply");
        for event in interleaved(&alone) {
            apply_batch(&db, std::slice::from_ref(&event))
                .await
                .expect("apply");
        }

        let mut statuses = std::collections::BTreeSet::new();
        for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
            let mut batched = get_job(&db, *a).await.expect("query").expect("job exists");
            let one_by_one = get_job(&db, *b).await.expect("query").expect("job exists");
            batched.job.id = *b;
            for attempt in &mut batched.attempts {
                attempt.job_id = *b;
            }
            assert_eq!(batched, one_by_one, "job {i}");
            statuses.insert(one_by_one.job.status);
        }
        // The values themselves, for a job whose first attempt failed (job 1 starts at t(10)).
        let retried = get_job(&db, alone[1]).await.expect("query").expect("job exists");
        let attempt =
            |attempt: i32, start: i64, end: i64, outcome: &str, error: Option<&str>| job_attempt::Model {
                job_id: alone[1],
                attempt,
                worker_id: Some(format!("worker-{attempt}")),
                started_at: t(10 + start),
                finished_at: Some(t(10 + end)),
                outcome: Some(outcome.to_owned()),
                error: error.map(str::to_owned),
                trace_id: Some("trace-enqueue".to_owned()),
            };
        assert_eq!(
            retried.attempts,
            [
                attempt(1, 100, 150, "failed", Some("boom 1")),
                attempt(2, 1_200, 1_300, "succeeded", None),
            ]
        );
        assert_eq!(retried.job.status, "succeeded");
        assert_eq!(retried.job.attempts, 2);
        assert_eq!(retried.job.created_at, t(10));

        assert_eq!(
            statuses.into_iter().collect::<Vec<_>>(),
            [
                "canceled",
                "dead",
                "retrying",
                "running",
                "scheduled",
                "succeeded"
            ]
            .map(String::from),
        );
    })
    .await;
}
