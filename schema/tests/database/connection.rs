use std::time::Duration;

use schema::DbError;
use schema::history::{HistoryConfig, HistoryWriter};
use uuid::Uuid;

use crate::support::{enqueued, job_count, t};

#[tokio::test]
async fn connect_refuses_a_database_it_does_not_support() {
    let error = schema::connect("mysql://root:hunter2@localhost/drover")
        .await
        .expect_err("mysql is not supported");
    assert!(matches!(error, DbError::UnsupportedUrl { .. }), "{error:?}");
    assert!(
        !error.to_string().contains("hunter2"),
        "the password leaked: {error}"
    );
}

#[tokio::test]
async fn two_processes_can_write_one_sqlite_file_at_once() {
    let path = std::env::temp_dir().join(format!("drover_schema_{}.db", Uuid::now_v7().simple()));
    let url = format!("sqlite://{}", path.display());
    // Two pools stand for the API and a worker in `drover dev`; the file does not exist yet.
    let api = schema::connect(&url).await.expect("connect");
    let worker = schema::connect(&url).await.expect("connect again");
    schema::migrate(&api).await.expect("migrate");

    let writers = [api.clone(), worker.clone()].map(|db| {
        tokio::spawn(async move {
            let cfg = HistoryConfig {
                max_batch: 100,
                ..HistoryConfig::default()
            };
            let (writer, task) = HistoryWriter::spawn(db, cfg);
            for i in 0..2_000 {
                writer.record(enqueued(Uuid::now_v7(), t(i)));
            }
            writer.flush().await;
            task.shutdown(Duration::from_secs(5)).await
        })
    });
    for writer in writers {
        assert_eq!(writer.await.expect("writer task"), 0);
    }
    assert_eq!(job_count(&worker).await, 4_000);

    api.close().await.expect("close");
    worker.close().await.expect("close");
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}
