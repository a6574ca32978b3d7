//! The SQLite broker on its own: each test gets a fresh database file in the temp directory,
//! deleted when the test ends. (The semantics every broker shares are in `conformance.rs`.)

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use jobs::{
    ConsumerConfig, Driver, Job, JobId, JobState, Outcome, Producer, QueueName, Settlement,
    broker::sqlite::SqliteBroker,
    job::{AttemptOutcome, now_ms},
};
use serde_json::value::RawValue;

/// A broker on a file of its own, removed (with its WAL files) on drop.
struct TestBroker {
    broker: SqliteBroker,
    queue: QueueName,
    path: PathBuf,
}

impl TestBroker {
    async fn new() -> Self {
        let path = std::env::temp_dir().join(format!("drover-sqlite-{}.db", uuid::Uuid::new_v4().simple()));
        let broker = SqliteBroker::connect(&format!("sqlite://{}", path.display()), "drover")
            .await
            .unwrap();
        Self {
            broker,
            queue: QueueName::parse("default").unwrap(),
            path,
        }
    }

    async fn driver(&self, lease: Duration) -> (Arc<dyn Driver>, ConsumerConfig) {
        let cfg = ConsumerConfig {
            lease,
            ..ConsumerConfig::default()
        };
        (self.broker.driver(&self.queue, &cfg).await.unwrap(), cfg)
    }

    fn job(&self, max_attempts: u32) -> Job {
        Job {
            id: JobId::new(),
            queue: self.queue.clone(),
            kind: "sleep".into(),
            payload: RawValue::from_string(r#"{"ms":0}"#.into()).unwrap(),
            max_attempts,
            priority: 0,
            enqueued_at_ms: now_ms(),
            run_at_ms: None,
            trace_id: None,
            idempotency_key: None,
            attempt: 0,
            crashes: 0,
            attempts_before: 0,
            receipt: 0,
        }
    }

    async fn status(&self, id: JobId) -> Option<JobState> {
        self.broker.get(id).await.unwrap().map(|r| r.status)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

const LONG: Duration = Duration::from_secs(30);

fn settlement(job: Job, outcome: Outcome, cfg: &ConsumerConfig) -> Settlement {
    Settlement {
        job: job.into(),
        outcome,
        worker: cfg.worker.clone(),
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
    }
}

fn retry_at(at_ms: i64) -> Outcome {
    Outcome::Retry {
        at_ms,
        error: "boom".into(),
        how: AttemptOutcome::Failed,
    }
}

/// Fetches until `n` jobs arrived or `within` passed.
async fn fetch_n(d: &Arc<dyn Driver>, n: usize, within: Duration) -> Vec<Job> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < n && start.elapsed() < within {
        got.extend(d.fetch(n - got.len(), Duration::from_millis(200)).await.unwrap());
    }
    got
}

async fn fetch_one(d: &Arc<dyn Driver>) -> Job {
    fetch_n(d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("a job is delivered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_job_is_fetched_settled_and_counted_as_done() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    let pushed = t.broker.push(t.job(3)).await.unwrap();
    assert!(!pushed.duplicate);
    assert_eq!(t.broker.stats(&t.queue).await.unwrap().pending, 1);

    let job = fetch_one(&d).await;
    assert_eq!((job.id, job.attempt), (pushed.id, 1));
    let running = t.broker.get(job.id).await.unwrap().unwrap();
    assert_eq!(running.status, JobState::Running);
    assert_eq!(running.worker_id.as_deref(), Some(&*cfg.worker));
    assert_eq!(running.payload, Some(serde_json::json!({"ms": 0})));

    d.settle(&[settlement(job, Outcome::Succeeded, &cfg)])
        .await
        .unwrap();
    let done = t.broker.get(pushed.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.attempts), (JobState::Succeeded, 1));
    assert!(done.finished_at_ms.is_some());
    let s = t.broker.stats(&t.queue).await.unwrap();
    assert_eq!(
        (s.pending, s.scheduled, s.running, s.dead, s.done, s.failed),
        (0, 0, 0, 0, 1, 0),
        "{s:?}"
    );
    assert!(d.fetch(1, Duration::from_millis(150)).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_thousand_jobs_is_each_delivered_once() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    let jobs: Vec<Job> = (0..1_000).map(|_| t.job(3)).collect();
    let mut ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let res = t.broker.push_batch(jobs).await.unwrap();
    assert_eq!(
        res.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "results come back in request order"
    );
    assert_eq!(t.broker.stats(&t.queue).await.unwrap().pending, 1_000);

    let got = fetch_n(&d, 1_000, Duration::from_secs(20)).await;
    assert!(got.iter().all(|j| j.attempt == 1));
    let mut seen: Vec<JobId> = got.iter().map(|j| j.id).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every job delivered exactly once");
    assert_eq!(t.broker.stats(&t.queue).await.unwrap().running, 1_000);

    d.settle(
        &got.into_iter()
            .map(|j| settlement(j, Outcome::Succeeded, &cfg))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(
        d.fetch(10, Duration::from_millis(200)).await.unwrap().is_empty(),
        "nothing delivered twice"
    );
    let s = t.broker.stats(&t.queue).await.unwrap();
    assert_eq!((s.pending, s.running, s.done), (0, 0, 1_000), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_delivered_before_its_time_and_comes_back_as_attempt_two() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    t.broker.push(t.job(3)).await.unwrap();
    let first = fetch_one(&d).await;
    let at = now_ms() + 300;
    d.settle(&[settlement(first.clone(), retry_at(at), &cfg)])
        .await
        .unwrap();

    let record = t.broker.get(first.id).await.unwrap().unwrap();
    assert_eq!((record.status, record.run_at_ms), (JobState::Retrying, Some(at)));
    assert_eq!(record.last_error.as_deref(), Some("boom"));
    let s = t.broker.stats(&t.queue).await.unwrap();
    assert_eq!((s.pending, s.scheduled, s.failed), (0, 1, 1), "{s:?}");

    assert!(
        d.fetch(1, Duration::from_millis(150)).await.unwrap().is_empty(),
        "not before its time"
    );
    let again = fetch_one(&d).await;
    let late = now_ms() - at;
    println!("retry delivered {late} ms after its time");
    assert!(late >= 0, "retry delivered {} ms early", -late);
    assert_eq!((again.id, again.attempt), (first.id, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_always_fails_ends_dead_after_max_attempts_and_is_counted() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    let id = t.broker.push(t.job(3)).await.unwrap().id;
    for attempt in 1..=3 {
        let job = fetch_one(&d).await;
        assert_eq!((job.id, job.attempt), (id, attempt));
        // What the runtime decides: retry while attempts are left, dead on the last one.
        let outcome = if attempt < job.max_attempts {
            retry_at(now_ms())
        } else {
            Outcome::Dead {
                error: format!("failed attempt {attempt}"),
                how: AttemptOutcome::Failed,
            }
        };
        d.settle(&[settlement(job, outcome, &cfg)]).await.unwrap();
    }
    assert!(
        d.fetch(1, Duration::from_millis(150)).await.unwrap().is_empty(),
        "a dead job is not delivered"
    );
    let s = t.broker.stats(&t.queue).await.unwrap();
    assert_eq!((s.dead, s.failed, s.done, s.pending), (1, 3, 0, 0), "{s:?}");
    let dead = t.broker.dead(&t.queue, 0, 10).await.unwrap();
    assert_eq!(dead.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert_eq!((dead[0].status, dead[0].attempts), (JobState::Dead, 3));
    assert_eq!(dead[0].last_error.as_deref(), Some("failed attempt 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_does_not_expire() {
    let t = TestBroker::new().await;
    let (d1, _) = t.driver(Duration::from_millis(200)).await;
    t.broker.push(t.job(3)).await.unwrap();
    let held = fetch_one(&d1).await;
    let (d2, _) = t.driver(LONG).await;
    for _ in 0..5 {
        d1.renew(&[held.id]).await.unwrap();
        assert!(d2.fetch(1, Duration::from_millis(100)).await.unwrap().is_empty());
    }
    assert_eq!(t.status(held.id).await, Some(JobState::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fetch_wakes_up_within_milliseconds_of_a_push_in_the_same_process() {
    let t = TestBroker::new().await;
    // A second broker on the same file, as the API and the workers of `drover dev` may have.
    let url = format!("sqlite://{}", t.path.display());
    let api = SqliteBroker::connect(&url, "drover").await.unwrap();
    let (d, cfg) = t.driver(LONG).await;
    let mut lat = Vec::new();
    for _ in 0..20 {
        let d2 = d.clone();
        let waiter = tokio::spawn(async move {
            loop {
                let got = d2.fetch(1, Duration::from_secs(1)).await.unwrap();
                if !got.is_empty() {
                    return (Instant::now(), got);
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let sent = Instant::now();
        api.push(t.job(3)).await.unwrap();
        let (at, got) = waiter.await.unwrap();
        lat.push((at - sent).as_secs_f64() * 1e3);
        d.settle(
            &got.into_iter()
                .map(|j| settlement(j, Outcome::Succeeded, &cfg))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "idle pickup after push: p50 {:.2} ms, max {:.2} ms",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    assert!(
        lat[lat.len() / 2] < 100.0,
        "woken by the push, not by the poll: {lat:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_jobs_are_delivered_first() {
    let t = TestBroker::new().await;
    let (d, _) = t.driver(LONG).await;
    let jobs: Vec<Job> = [0, 5, -1, 5, 9]
        .into_iter()
        .map(|p| Job {
            priority: p,
            ..t.job(3)
        })
        .collect();
    t.broker.push_batch(jobs.clone()).await.unwrap();
    let got: Vec<i32> = fetch_n(&d, 5, Duration::from_secs(5))
        .await
        .iter()
        .map(|j| j.priority)
        .collect();
    assert_eq!(got, [9, 5, 5, 0, -1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_job_is_deleted_an_hour_after_it_finished_but_stays_counted() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    let old = t.broker.push(t.job(3)).await.unwrap().id;
    let recent = t.broker.push(t.job(3)).await.unwrap().id;
    let got = fetch_n(&d, 2, Duration::from_secs(5)).await;
    let two_hours_ago = now_ms() - 7_200_000;
    let batch: Vec<_> = got
        .into_iter()
        .map(|j| {
            let finished_at_ms = if j.id == old { two_hours_ago } else { now_ms() };
            Settlement {
                finished_at_ms,
                ..settlement(j, Outcome::Succeeded, &cfg)
            }
        })
        .collect();
    d.settle(&batch).await.unwrap();
    // A broker cleans up at its first fetch (in the background), then once a minute; the one
    // above has had its turn, so a worker of a new broker on the same file triggers it.
    let later = SqliteBroker::connect(&format!("sqlite://{}", t.path.display()), "drover")
        .await
        .unwrap();
    let d = later.driver(&t.queue, &cfg).await.unwrap();
    let start = Instant::now();
    while t.status(old).await.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the old job was not deleted"
        );
        d.fetch(1, Duration::from_millis(20)).await.unwrap();
    }
    assert_eq!(t.status(recent).await, Some(JobState::Succeeded));
    assert_eq!(t.broker.stats(&t.queue).await.unwrap().done, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_lists_the_built_in_ones_and_every_queue_seen() {
    let t = TestBroker::new().await;
    t.broker
        .push(Job {
            queue: QueueName::parse("reports").unwrap(),
            ..t.job(3)
        })
        .await
        .unwrap();
    let queues: Vec<String> = t
        .broker
        .queues()
        .await
        .unwrap()
        .iter()
        .map(|q| q.to_string())
        .collect();
    for q in [
        "analytics",
        "backups",
        "cache-warm",
        "default",
        "noop",
        "scoring",
        "reports",
    ] {
        assert!(queues.iter().any(|x| x == q), "{q} missing from {queues:?}");
    }
    t.broker.ping().await.unwrap();
    assert!(t.broker.depth_source(&t.queue).contains("GET /v1/queues/default"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_outside_a_to_z_digits_and_underscore_is_refused() {
    let path = std::env::temp_dir().join(format!("drover-sqlite-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", path.display());
    for bad in ["", "Drover", "dro-ver", "x\"; DROP TABLE y; --", "sqlite_x"] {
        assert!(
            SqliteBroker::connect(&url, bad).await.is_err(),
            "{bad:?} accepted"
        );
    }
    let _ = std::fs::remove_file(path);
}

/// 20,000 jobs pushed in one batch, then drained by one worker in batches of 100 with batched
/// acknowledgements, as the backend does. Prints rates; run with `--release` for real figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_jobs_are_pushed_and_drained_once_each() {
    let t = TestBroker::new().await;
    let (d, cfg) = t.driver(LONG).await;
    let jobs: Vec<Job> = (0..20_000).map(|_| t.job(3)).collect();
    let start = Instant::now();
    t.broker.push_batch(jobs).await.unwrap();
    let push = start.elapsed();

    let start = Instant::now();
    let mut drained = 0;
    loop {
        let got = d.fetch(100, Duration::from_millis(50)).await.unwrap();
        if got.is_empty() {
            break;
        }
        drained += got.len();
        d.settle(
            &got.into_iter()
                .map(|j| settlement(j, Outcome::Succeeded, &cfg))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    }
    let drain = start.elapsed();
    println!(
        "push_batch of 20,000: {:.0} ms ({:.0} jobs/s); drain: {:.0} ms ({:.0} jobs/s)",
        push.as_secs_f64() * 1e3,
        20_000.0 / push.as_secs_f64(),
        drain.as_secs_f64() * 1e3,
        20_000.0 / drain.as_secs_f64()
    );
    assert_eq!(drained, 20_000);
    let s = t.broker.stats(&t.queue).await.unwrap();
    assert_eq!((s.pending, s.running, s.done), (0, 0, 20_000), "{s:?}");
}
