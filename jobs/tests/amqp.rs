//! The RabbitMQ broker against a real RabbitMQ on 127.0.0.1:5672 (guest/guest), through the
//! `Producer` / `Driver` interface the API and the workers use. Each test has its own queue
//! prefix and history database, so tests run in parallel, and deletes its queues when done.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jobs::{
    BrokerError, BrokerOptions, ConsumerConfig, Driver, Job, JobId, JobState, Outcome, Producer, QueueName,
    Settlement,
    broker::CancelOutcome,
    job::{AttemptOutcome, now_ms},
};
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicGetOptions, QueueDeleteOptions},
    types::AMQPValue,
};
use sea_orm::DatabaseConnection;
use serde_json::value::RawValue;

const ADDR: &str = "127.0.0.1:5672";
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Env {
    broker: Arc<dyn Producer>,
    db: DatabaseConnection,
    prefix: String,
    queue: QueueName,
    _cleanup: Cleanup,
}

/// Deletes the test's queues and database file, also when the test fails.
struct Cleanup {
    prefix: String,
    db_path: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // Drop cannot await; a thread of its own with a small runtime can.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(delete_queues(&prefix))
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!(
                "could not delete the RabbitMQ queues of prefix {}: {deleted:?}",
                self.prefix
            );
        }
        let _ = std::fs::remove_file(&self.db_path);
    }
}

fn queue_names(prefix: &str, queue: &str) -> Vec<String> {
    let main = format!("{prefix}.{queue}");
    let mut names = vec![main.clone(), format!("{main}.dead")];
    names.extend((0..25).map(|k| format!("{main}.delay.{k}")));
    names
}

async fn delete_queues(prefix: &str) -> Result<(), lapin::Error> {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for name in queue_names(prefix, "default") {
        ch.queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
    }
    ch.exchange_delete(format!("{prefix}.canceled").as_str().into(), Default::default())
        .await?;
    Ok(())
}

async fn env() -> Env {
    env_of(jobs::broker::amqp::QueueType::Classic).await
}

async fn env_of(queue_type: jobs::broker::amqp::QueueType) -> Env {
    if tokio::net::TcpStream::connect(ADDR).await.is_err() {
        panic!("RabbitMQ is not reachable at {ADDR}; start it with `rabbitmq-server -detached`");
    }
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let db_path = std::env::temp_dir().join(format!("{prefix}-history.db"));
    let db = schema::connect(&format!("sqlite://{}", db_path.display()))
        .await
        .unwrap();
    schema::migrate(&db).await.unwrap();
    let broker = jobs::broker::connect(
        URL,
        BrokerOptions {
            prefix: prefix.clone(),
            db: db.clone(),
            amqp_queue_type: queue_type,
        },
    )
    .await
    .unwrap();
    Env {
        broker,
        db,
        prefix: prefix.clone(),
        queue: QueueName::parse("default").unwrap(),
        _cleanup: Cleanup { prefix, db_path },
    }
}

fn job(q: &QueueName, max_attempts: u32) -> Job {
    Job {
        id: JobId::new(),
        queue: q.clone(),
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

fn settle(job: Job, outcome: Outcome, worker: &ConsumerConfig) -> Settlement {
    Settlement {
        job: job.into(),
        outcome,
        worker: worker.worker.clone(),
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
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

/// Polls `stats` until `done` holds for them, or fails after 5 s.
async fn wait_for_stats(e: &Env, what: &str, done: impl Fn(&jobs::QueueStats) -> bool) -> jobs::QueueStats {
    let start = Instant::now();
    loop {
        let s = e.broker.stats(&e.queue).await.unwrap();
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_job_is_delivered_once_and_gone_after_its_ack() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let pushed = job(&e.queue, 3);
    let res = e.broker.push(pushed.clone()).await.unwrap();
    assert_eq!((res.id, res.duplicate), (pushed.id, false));

    let got = fetch_n(&d, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let j = &got[0];
    assert_eq!((j.id, j.attempt, j.max_attempts), (pushed.id, 1, 3));
    assert_eq!(j.payload.get(), r#"{"ms":0}"#);
    assert_ne!(j.receipt, 0, "a delivery carries its receipt");

    d.settle(
        &got.into_iter()
            .map(|j| settle(j, Outcome::Succeeded, &c))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(
        d.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty(),
        "nothing delivered twice"
    );
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!((s.pending, s.scheduled, s.dead), (0, 0, 0), "{s:?}");
    assert_eq!(
        e.broker.depth_source(&e.queue),
        format!("rabbitmq queue {}.default (messages ready)", e.prefix)
    );
    assert!(e.broker.queues().await.unwrap().contains(&e.queue));
    e.broker.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_job_lands_in_the_dead_queue_with_its_error_and_is_counted() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let id = e.broker.push(job(&e.queue, 1)).await.unwrap().id;
    let j = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    let dead = Outcome::Dead {
        error: "bad input".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(j, dead, &c)]).await.unwrap();

    let s = wait_for_stats(&e, "dead job counted", |s| s.dead == 1).await;
    assert_eq!((s.pending, s.scheduled), (0, 0), "{s:?}");
    assert!(
        d.fetch(1, Duration::from_millis(300)).await.unwrap().is_empty(),
        "a dead job is not delivered"
    );

    // What an operator finds in the dead queue: the envelope, attempts made, and the error.
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            format!("{}.default.dead", e.prefix).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a message in the dead queue");
    let body: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["attempt"], 1);
    let headers = msg.delivery.properties.headers().clone().unwrap();
    let error = headers.inner().get("x-drover-error").cloned();
    assert_eq!(error, Some(AMQPValue::LongString("bad input".into())));
    assert_eq!(
        msg.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(id.to_string())
    );
    assert_eq!(msg.delivery.properties.delivery_mode(), &Some(2), "persistent");
}

/// Acks go out as one `multiple` ack below the oldest open delivery and singly above it. A
/// wrong `multiple` (covering a job still running, or a tag already acknowledged) would either
/// lose a job or make RabbitMQ close the channel, which sends every unacknowledged job back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_settled_out_of_delivery_order_are_each_acknowledged_once() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    e.broker
        .push_batch((0..20).map(|_| job(&e.queue, 3)).collect())
        .await
        .unwrap();
    let mut got = fetch_n(&d, 20, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 20);
    got.sort_by_key(|j| j.receipt);
    let ok = |range: std::ops::Range<usize>| -> Vec<Settlement> {
        got[range]
            .iter()
            .map(|j| settle(j.clone(), Outcome::Succeeded, &c))
            .collect()
    };

    // Job 0 runs long: everything settled meanwhile is acknowledged around it.
    d.settle(&ok(6..10)).await.unwrap();
    d.settle(&ok(1..4)).await.unwrap();
    d.release(&[got[4].clone()]).await.unwrap();
    d.settle(&ok(10..15)).await.unwrap();
    let retry = Outcome::Retry {
        at_ms: now_ms() + 60_000,
        error: "boom".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(got[15].clone(), retry, &c)]).await.unwrap();
    // Settled twice (a flush tried again): the second time is a no-op, not a second ack.
    d.settle(&ok(4..7)).await.unwrap();
    let again = fetch_n(&d, 1, Duration::from_secs(5)).await;
    assert_eq!(
        again.iter().map(|j| (j.id, j.attempt)).collect::<Vec<_>>(),
        [(got[4].id, 1)],
        "only the released job comes back"
    );
    d.settle(&ok(16..20)).await.unwrap();
    d.settle(&ok(0..1)).await.unwrap();
    d.settle(&[settle(again[0].clone(), Outcome::Succeeded, &c)])
        .await
        .unwrap();

    assert!(
        d.fetch(20, Duration::from_millis(500)).await.unwrap().is_empty(),
        "nothing delivered twice: the channel stayed open and every ack counted"
    );
    let s = wait_for_stats(&e, "queue drained", |s| s.pending == 0).await;
    assert_eq!(s.scheduled, 1, "the retry waits: {s:?}");
    // A fresh consumer finds nothing either: no job is left unacknowledged.
    drop(d);
    let fresh = e.broker.driver(&e.queue, &c).await.unwrap();
    assert!(
        fresh
            .fetch(20, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_due_in_less_than_a_delay_step_waits_for_its_time() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    // Consuming already, as a worker is: opening the consumer, or the push's confirm (an fsync),
    // may take longer than the delay itself on a busy machine.
    assert!(d.fetch(1, Duration::ZERO).await.unwrap().is_empty());
    let consumer = d.clone();
    let fetching = tokio::spawn(async move {
        let got = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        (got, now_ms())
    });
    let mut j = job(&e.queue, 3);
    let at = now_ms() + 60;
    j.run_at_ms = Some(at);
    e.broker.push(j).await.unwrap();
    let (got, delivered_at) = fetching.await.unwrap();
    let late = delivered_at - at;
    assert_eq!(got.len(), 1);
    assert!((-5..100).contains(&late), "delivered {late} ms after its time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_canceled_through_another_process_is_never_delivered() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    // The API: a broker of its own on the same queues and history database.
    let api = jobs::broker::connect(
        URL,
        BrokerOptions {
            prefix: e.prefix.clone(),
            db: e.db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();

    let mut doomed = job(&e.queue, 3);
    doomed.run_at_ms = Some(now_ms() + 2_000);
    api.push(doomed.clone()).await.unwrap();
    let enqueued = schema::history::HistoryEvent::Enqueued {
        id: doomed.id.0,
        queue: e.queue.to_string(),
        kind: doomed.kind.to_string(),
        payload: serde_json::from_str(doomed.payload.get()).unwrap(),
        max_attempts: 3,
        priority: 0,
        idempotency_key: None,
        trace_id: None,
        run_at: chrono::DateTime::from_timestamp_millis(doomed.run_at_ms.unwrap()),
        at: chrono::Utc::now(),
    };
    schema::history::apply_batch(&e.db, &[enqueued]).await.unwrap();
    assert_eq!(api.cancel(doomed.id).await.unwrap(), CancelOutcome::Canceled);
    let record = e.broker.get(doomed.id).await.unwrap().expect("recorded");
    assert_eq!(
        (record.status, record.queue.as_str(), record.max_attempts),
        (JobState::Canceled, "default", 3)
    );
    assert_eq!(api.cancel(JobId::new()).await.unwrap(), CancelOutcome::NotFound);

    let kept = api.push(job(&e.queue, 3)).await.unwrap().id;
    let got = fetch_n(&d, 2, Duration::from_secs(3)).await;
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        [kept],
        "the canceled job never runs"
    );
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!(
        (s.pending, s.scheduled),
        (0, 0),
        "the canceled job is gone: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_behind_drovers_back_is_declared_again_on_the_next_push() {
    let e = env().await;
    e.broker.push(job(&e.queue, 3)).await.unwrap();
    delete_queues(&e.prefix).await.unwrap();
    let id = e.broker.push(job(&e.queue, 3)).await.unwrap().id;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let got = fetch_n(&d, 1, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_rabbitmq_makes_calls_fail_as_unavailable_without_hanging() {
    let dir = tempfile_path("unreachable");
    let db = schema::connect(&format!("sqlite://{}", dir.display()))
        .await
        .unwrap();
    // Connecting is lazy: drover starts while RabbitMQ is down.
    let broker = jobs::broker::connect(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        BrokerOptions {
            prefix: "unreachable".into(),
            db,
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let q = QueueName::parse("default").unwrap();
    let start = Instant::now();
    let err = broker.push(job(&q, 3)).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    assert!(broker.ping().await.unwrap_err().is_unavailable());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_file(dir);
}

fn tempfile_path(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("t{}-{what}.db", uuid::Uuid::new_v4().simple()))
}

/// A TCP proxy in front of RabbitMQ whose connections the test can cut, as a network failure
/// or a RabbitMQ restart would.
struct Proxy {
    url: String,
    cut: tokio::sync::broadcast::Sender<()>,
    /// Connections the proxy is still forwarding.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    /// Cuts every connection and returns once none forwards anything any more: a publish
    /// racing the cut could otherwise still reach RabbitMQ and, its confirm lost, be published
    /// again (at least once), which is not what this test is about.
    async fn cut_all(&self) {
        self.cut.send(()).unwrap();
        let start = Instant::now();
        while self.open.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "the proxy did not cut");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn proxy() -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cut, _) = tokio::sync::broadcast::channel(1);
    let cuts = cut.clone();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut stop = cuts.subscribe();
            let open = counted.clone();
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(ADDR).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = stop.recv() => {}
                    }
                }
                // Both sockets are closed before the count drops.
                drop(client);
                open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    Proxy {
        url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        cut,
        open,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_connection_pushes_and_consumers_resume_and_unacked_jobs_come_back() {
    let e = env().await;
    let p = proxy().await;
    let broker = jobs::broker::connect(
        &p.url,
        BrokerOptions {
            prefix: e.prefix.clone(),
            db: e.db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap();
    let c = ConsumerConfig::default();
    let d = broker.driver(&e.queue, &c).await.unwrap();
    let a = broker.push(job(&e.queue, 3)).await.unwrap().id;
    let held = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    assert_eq!(held.id, a);

    p.cut_all().await;

    // A client retries a push that failed as unavailable; it goes through once redialed.
    let start = Instant::now();
    let mut failures = 0;
    let b = loop {
        match broker.push(job(&e.queue, 3)).await {
            Ok(r) => break r.id,
            Err(err) => {
                assert!(err.is_unavailable(), "{err:?}");
                failures += 1;
                println!("push failed: {err}");
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "push never recovered: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    println!(
        "push recovered after {failures} failures in {:?}",
        start.elapsed()
    );

    // The worker's backend retries a failed fetch; the consumer reopens, and the job that was
    // unacknowledged when the connection died is delivered again.
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "consumer never recovered: got {got:?}"
        );
        match d.fetch(2 - got.len(), Duration::from_millis(200)).await {
            Ok(batch) => got.extend(batch),
            Err(err) => {
                assert!(err.is_unavailable(), "{err:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut ids: Vec<JobId> = got.iter().map(|j| j.id).collect();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);
    // The job held across the cut lost its attempt with the connection: counted, as a crash
    // (the same as a lease running out on Redis).
    for j in &got {
        let want = if j.id == held.id { (2, 1) } else { (1, 0) };
        assert_eq!((j.attempt, j.crashes), want, "{}", j.id);
    }

    // The ack of the delivery from before the cut is void; it must not ack anything else.
    d.settle(&[settle(held, Outcome::Succeeded, &c)]).await.unwrap();
    assert!(
        d.fetch(2, Duration::from_millis(300)).await.unwrap().is_empty(),
        "nothing lost or doubled"
    );
    d.settle(
        &got.into_iter()
            .map(|j| settle(j, Outcome::Succeeded, &c))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(d.fetch(2, Duration::from_millis(300)).await.unwrap().is_empty());
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!(s.pending, 0, "{s:?}");
}

/// Another process on the same queues and history database (an API replica, another worker).
async fn second_broker(e: &Env) -> Arc<dyn Producer> {
    jobs::broker::connect(
        URL,
        BrokerOptions {
            prefix: e.prefix.clone(),
            db: e.db.clone(),
            amqp_queue_type: Default::default(),
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_in_the_queue_are_delivered_by_priority() {
    let e = env().await;
    let jobs: Vec<Job> = [0, 5, -1, 3, 9, -9]
        .into_iter()
        .map(|p| Job {
            priority: p,
            ..job(&e.queue, 3)
        })
        .collect();
    // Pushed before any consumer exists, so RabbitMQ orders all of them.
    e.broker.push_batch(jobs).await.unwrap();
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let got: Vec<i32> = fetch_n(&d, 6, Duration::from_secs(5))
        .await
        .iter()
        .map(|j| j.priority)
        .collect();
    // 9 and 5 share the top level (5 and above), -9 and -1 keep their order apart.
    assert_eq!(got.len(), 6);
    assert!(got[..2].contains(&9) && got[..2].contains(&5), "{got:?}");
    assert_eq!(&got[2..], [3, 0, -1, -9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_without_priorities_by_an_older_drover_keeps_working() {
    let e = env().await;
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
    ch.queue_declare(
        format!("{}.default", e.prefix).as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        args,
    )
    .await
    .unwrap();
    let id = e.broker.push(job(&e.queue, 3)).await.unwrap().id;
    let d = e
        .broker
        .driver(&e.queue, &ConsumerConfig::default())
        .await
        .unwrap();
    let got = fetch_n(&d, 1, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), [id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_quorum_queues_jobs_retries_delays_and_the_dead_set_work() {
    let e = env_of(jobs::broker::amqp::QueueType::Quorum).await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    // The queues really are quorum queues.
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
    let redeclare = ch
        .queue_declare(
            format!("{}.default", e.prefix).as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await;
    assert!(
        redeclare.is_err(),
        "a classic declaration of a quorum queue is refused"
    );

    let mut delayed = job(&e.queue, 2);
    let at = now_ms() + 500;
    delayed.run_at_ms = Some(at);
    let id = e.broker.push(delayed).await.unwrap().id;
    let first = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("delivered");
    assert!(now_ms() >= at - 5, "delivered early");
    let retry = Outcome::Retry {
        at_ms: now_ms() + 300,
        error: "boom".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(first, retry, &c)]).await.unwrap();
    let second = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("retried");
    assert_eq!((second.id, second.attempt), (id, 2));
    let dead = Outcome::Dead {
        error: "bad".into(),
        how: AttemptOutcome::Failed,
    };
    d.settle(&[settle(second, dead, &c)]).await.unwrap();
    wait_for_stats(&e, "one dead", |s| s.dead == 1).await;
    assert_eq!(e.broker.retry_dead(id).await.unwrap(), jobs::DeadOutcome::Done);
    let third = fetch_n(&d, 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("revived");
    assert_eq!((third.id, third.attempt, third.max_attempts), (id, 3, 4));
}

/// Two API replicas push the same key at once: one job, both answered with its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_pushed_by_two_replicas_at_once_makes_one_job() {
    let e = env().await;
    let other = second_broker(&e).await;
    for round in 0..20 {
        let key = format!("order-{round}");
        let mut a = job(&e.queue, 3);
        a.idempotency_key = Some(key.clone());
        let mut b = job(&e.queue, 3);
        b.idempotency_key = Some(key);
        let (ra, rb) = tokio::join!(e.broker.push(a.clone()), other.push(b.clone()));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.id, rb.id, "round {round}: both get the one job");
        assert_eq!(
            [ra.duplicate, rb.duplicate].iter().filter(|d| **d).count(),
            1,
            "round {round}"
        );
        assert!(ra.id == a.id || ra.id == b.id);
    }
    let s = wait_for_stats(&e, "20 jobs", |s| s.pending == 20).await;
    assert_eq!(s.pending, 20);
}

/// A graceful release is not a crash: the job comes back uncounted, with no crash against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_job_is_not_counted_as_a_crash() {
    let e = env().await;
    let c = ConsumerConfig {
        quarantine_after: 1,
        ..ConsumerConfig::default()
    };
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let id = e.broker.push(job(&e.queue, 3)).await.unwrap().id;
    for _ in 0..3 {
        let got = fetch_n(&d, 1, Duration::from_secs(5)).await;
        assert_eq!(
            got.iter()
                .map(|j| (j.id, j.attempt, j.crashes))
                .collect::<Vec<_>>(),
            [(id, 1, 0)]
        );
        d.release(&got).await.unwrap();
    }
    let s = e.broker.stats(&e.queue).await.unwrap();
    assert_eq!(s.dead, 0, "{s:?}");
}

/// A cancel through another process reaches consumers as a notice within milliseconds, not
/// at the next one-second refresh: jobs due 150 ms after their cancel never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_another_process_reaches_consumers_at_once() {
    let e = env().await;
    let c = ConsumerConfig::default();
    let d = e.broker.driver(&e.queue, &c).await.unwrap();
    let api = second_broker(&e).await;
    // The consumer's process subscribes to cancel notices when its first driver starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut doomed = Vec::new();
    for _ in 0..5 {
        let mut j = job(&e.queue, 3);
        j.run_at_ms = Some(now_ms() + 150);
        api.push(j.clone()).await.unwrap();
        let enqueued = schema::history::HistoryEvent::Enqueued {
            id: j.id.0,
            queue: e.queue.to_string(),
            kind: j.kind.to_string(),
            payload: serde_json::from_str(j.payload.get()).unwrap(),
            max_attempts: 3,
            priority: 0,
            idempotency_key: None,
            trace_id: None,
            run_at: chrono::DateTime::from_timestamp_millis(j.run_at_ms.unwrap()),
            at: chrono::Utc::now(),
        };
        schema::history::apply_batch(&e.db, &[enqueued]).await.unwrap();
        assert_eq!(api.cancel(j.id).await.unwrap(), CancelOutcome::Canceled);
        doomed.push(j.id);
        let kept = api.push(job(&e.queue, 3)).await.unwrap().id;
        let got = fetch_n(&d, 2, Duration::from_millis(600)).await;
        assert_eq!(
            got.iter().map(|j| j.id).collect::<Vec<_>>(),
            [kept],
            "the job canceled 150 ms before it was due never runs"
        );
        d.settle(
            &got.into_iter()
                .map(|j| settle(j, Outcome::Succeeded, &c))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    }
}
