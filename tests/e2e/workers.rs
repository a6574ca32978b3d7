//! Worker presence across processes' worth of workers: every worker run records its heartbeat
//! in the shared database, so the API lists all of them; a worker that stops cleanly leaves
//! the list at once.

use std::time::{Duration, Instant};

use drover::config::WorkerArgs;
use serde_json::Value;

use crate::support::{Broker, Options, TestApp, spawn_app};

/// `GET /v1/workers` once the listed workers satisfy `done`; fails after `within`.
async fn workers_when(app: &TestApp, within: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let (status, body) = app.get("/v1/workers").await;
        assert_eq!(status, 200, "{body}");
        let workers = body["workers"].as_array().cloned().unwrap_or_default();
        if done(&workers) {
            return workers;
        }
        assert!(
            start.elapsed() < within,
            "the worker list never became as expected: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_worker_replica_is_listed_with_its_queues_and_one_that_stops_leaves_the_list() {
    let app = spawn_app(Broker::Redis, Options::default()).await;
    let first = workers_when(&app, Duration::from_secs(20), |w| w.len() == 1).await;
    let mut queues: Vec<&str> = first[0]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap())
        .collect();
    queues.sort_unstable();
    assert_eq!(queues, ["default", "noop"], "{first:?}");
    assert_eq!(first[0]["concurrency"], 50);

    let replica = app.spawn_replica(WorkerArgs {
        queues: vec!["backups".into()],
        concurrency: 3,
        prefetch: 1,
        lease_s: 30,
        quarantine_after: jobs::broker::QUARANTINE_AFTER,
        shutdown_grace_s: 10,
        chaos_drills: false,
        limits_url: None,
    });
    let both = workers_when(&app, Duration::from_secs(20), |w| w.len() == 2).await;
    let second = both
        .iter()
        .find(|w| w["id"] != first[0]["id"])
        .expect("a second worker");
    assert_eq!(second["queues"], serde_json::json!(["backups"]), "{both:?}");
    assert_eq!(second["concurrency"], 3);
    assert!(second["host"].as_str().is_some_and(|h| !h.is_empty()), "{second}");

    replica.stop().await;
    let after = workers_when(&app, Duration::from_secs(20), |w| w.len() == 1).await;
    assert_eq!(after[0]["id"], first[0]["id"]);
    app.shutdown().await;
}
