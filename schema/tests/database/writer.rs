use std::time::Duration;

use schema::history::{HistoryConfig, HistoryWriter};
use uuid::Uuid;

use crate::support::{enqueued, eventually, job_count, t, with_empty_databases, with_migrated_databases};

#[tokio::test]
async fn the_writer_writes_ten_thousand_events_and_flush_waits_for_them() {
    with_migrated_databases(|db| async move {
        let (writer, task) = HistoryWriter::spawn(db.clone(), HistoryConfig::default());
        for i in 0..10_000 {
            writer.record(enqueued(Uuid::now_v7(), t(i)));
        }
        writer.flush().await;
        assert_eq!(job_count(&db).await, 10_000);
        assert_eq!(writer.lag(), 0);
        assert_eq!(writer.dropped(), 0);
        assert_eq!(task.shutdown(Duration::from_secs(5)).await, 0);
    })
    .await;
}

#[tokio::test]
async fn the_writer_keeps_its_batch_until_the_database_accepts_it() {
    // No tables yet: every write fails, as if the database were down.
    with_empty_databases(|db| async move {
        let (writer, task) = HistoryWriter::spawn(db.clone(), HistoryConfig::default());
        for i in 0..50 {
            writer.record(enqueued(Uuid::now_v7(), t(i)));
        }
        eventually("the writer holds all 50 events", || writer.lag() == 50).await;

        schema::migrate(&db).await.expect("migrate");
        writer.flush().await;
        assert_eq!(job_count(&db).await, 50);
        assert_eq!(writer.dropped(), 0);
        assert_eq!(task.shutdown(Duration::from_secs(5)).await, 0);
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_drops_events_and_counts_them_instead_of_blocking() {
    with_empty_databases(|db| async move {
        let cfg = HistoryConfig {
            capacity: 10,
            max_batch: 5,
            ..HistoryConfig::default()
        };
        let (writer, task) = HistoryWriter::spawn(db.clone(), cfg);
        for i in 0..100 {
            writer.record(enqueued(Uuid::now_v7(), t(i)));
        }
        // At most 10 queued plus one batch of 5 held by the task.
        assert!(writer.dropped() >= 85, "dropped {}", writer.dropped());
        eventually("every event is either held or dropped", || {
            writer.lag() as u64 + writer.dropped() == 100
        })
        .await;
        let held = writer.lag();
        assert_eq!(task.shutdown(Duration::from_millis(200)).await, held);
        // After shutdown, recording is still safe: the event is just dropped.
        writer.record(enqueued(Uuid::now_v7(), t(0)));
        assert_eq!(writer.dropped(), 101 - held as u64);
        writer.flush().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_writes_what_is_left_before_returning() {
    with_migrated_databases(|db| async move {
        // A long interval and a big batch: nothing is written until shutdown.
        let cfg = HistoryConfig {
            flush_interval: Duration::from_secs(3600),
            ..HistoryConfig::default()
        };
        let (writer, task) = HistoryWriter::spawn(db.clone(), cfg);
        for i in 0..20 {
            writer.record(enqueued(Uuid::now_v7(), t(i)));
        }
        assert_eq!(task.shutdown(Duration::from_secs(5)).await, 0);
        assert_eq!(job_count(&db).await, 20);
    })
    .await;
}

#[tokio::test]
async fn written_waits_for_the_next_write_and_does_not_wait_for_a_failing_database() {
    with_empty_databases(|db| async move {
        // No tables yet: the first write fails. `written` must not wait for the database.
        let cfg = HistoryConfig {
            flush_interval: Duration::from_millis(100),
            ..HistoryConfig::default()
        };
        let (writer, task) = HistoryWriter::spawn(db.clone(), cfg);
        writer.record(enqueued(Uuid::now_v7(), t(0)));
        tokio::time::timeout(Duration::from_secs(2), writer.written())
            .await
            .expect("written() waited for a database that refuses every write");
        eventually("the writer reports its failing writes", || writer.failing()).await;

        schema::migrate(&db).await.expect("migrate");
        writer.flush().await;
        assert!(!writer.failing());
        // Once writes succeed, `written` returns only when the events before it are stored.
        for i in 1..=30 {
            writer.record(enqueued(Uuid::now_v7(), t(i)));
        }
        writer.written().await;
        assert_eq!(job_count(&db).await, 31);
        assert_eq!(task.shutdown(Duration::from_secs(5)).await, 0);
    })
    .await;
}
