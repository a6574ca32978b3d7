use schema::history::{AttemptOutcome, apply_batch};
use schema::queries::{CancelResult, cancel_job, canceled_since, count_by_status, get_job, list_jobs};
use uuid::Uuid;

use crate::support::{enqueued, finished, started, t, with_migrated_databases};

#[tokio::test]
async fn a_job_is_read_back_with_its_attempts_in_order() {
    with_migrated_databases(|db| async move {
        let id = Uuid::now_v7();
        // Attempts recorded newest first still come back oldest first.
        let events = [
            started(id, 2, t(2_000)),
            finished(id, 1, t(1_000), t(1_500), AttemptOutcome::TimedOut),
            enqueued(id, t(0)),
        ];
        apply_batch(&db, &events).await.expect("apply");
        let view = get_job(&db, id).await.expect("query").expect("job exists");
        assert_eq!(view.job.id, id);
        let attempts: Vec<_> = view.attempts.iter().map(|a| a.attempt).collect();
        assert_eq!(attempts, [1, 2]);
        assert_eq!(view.attempts[0].outcome.as_deref(), Some("timed_out"));
        assert_eq!(view.attempts[1].outcome, None);
        assert_eq!(get_job(&db, Uuid::now_v7()).await.expect("query"), None);
    })
    .await;
}

#[tokio::test]
async fn counts_by_status_cover_one_queue_and_every_status() {
    with_migrated_databases(|db| async move {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut other_queue = enqueued(c, t(0));
        if let schema::history::HistoryEvent::Enqueued { queue, .. } = &mut other_queue {
            *queue = "reports".into();
        }
        let events = [
            enqueued(a, t(0)),
            enqueued(b, t(0)),
            started(b, 1, t(10)),
            other_queue,
        ];
        apply_batch(&db, &events).await.expect("apply");

        let counts = count_by_status(&db, "default").await.expect("query");
        assert_eq!(counts["pending"], 1);
        assert_eq!(counts["running"], 1);
        assert_eq!(counts["dead"], 0);
        assert_eq!(counts.len(), 7);
        assert_eq!(
            count_by_status(&db, "reports").await.expect("query")["pending"],
            1
        );
    })
    .await;
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered() {
    with_migrated_databases(|db| async move {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut events: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| enqueued(*id, t(i as i64)))
            .collect();
        events.push(started(ids[1], 1, t(100)));
        apply_batch(&db, &events).await.expect("apply");

        let listed: Vec<Uuid> = list_jobs(&db, None, None, 10, 0)
            .await
            .expect("query")
            .iter()
            .map(|job| job.id)
            .collect();
        let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();
        assert_eq!(listed, newest_first);

        let page: Vec<Uuid> = list_jobs(&db, Some("default"), Some("pending"), 2, 1)
            .await
            .expect("query")
            .iter()
            .map(|job| job.id)
            .collect();
        assert_eq!(page, [ids[3], ids[2]]);
        assert!(
            list_jobs(&db, Some("reports"), None, 10, 0)
                .await
                .expect("query")
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn only_a_job_that_has_not_started_can_be_canceled() {
    with_migrated_databases(|db| async move {
        let (waiting, running) = (Uuid::now_v7(), Uuid::now_v7());
        let events = [
            enqueued(waiting, t(0)),
            enqueued(running, t(0)),
            started(running, 1, t(10)),
        ];
        apply_batch(&db, &events).await.expect("apply");

        assert_eq!(
            cancel_job(&db, waiting, t(50)).await.expect("cancel"),
            CancelResult::Canceled
        );
        assert_eq!(
            cancel_job(&db, waiting, t(60)).await.expect("cancel"),
            CancelResult::NotCancelable("canceled".into())
        );
        assert_eq!(
            cancel_job(&db, running, t(50)).await.expect("cancel"),
            CancelResult::NotCancelable("running".into())
        );
        assert_eq!(
            cancel_job(&db, Uuid::now_v7(), t(50)).await.expect("cancel"),
            CancelResult::NotFound
        );

        // The worker's view of the job, written late with an older time, loses to the cancel.
        apply_batch(&db, &[started(waiting, 1, t(40))])
            .await
            .expect("apply");
        let job = get_job(&db, waiting).await.expect("query").expect("exists").job;
        assert_eq!(job.status, "canceled");
        assert_eq!(job.finished_at, Some(t(50)));

        assert_eq!(canceled_since(&db, t(50)).await.expect("query"), [waiting]);
        assert!(canceled_since(&db, t(51)).await.expect("query").is_empty());
    })
    .await;
}
