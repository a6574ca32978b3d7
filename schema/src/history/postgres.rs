//! Each round of a table's rows is one `INSERT … SELECT … FROM (SELECT unnest($1::uuid[]) AS id,
//! …)`: one array per column, so the statement's text never depends on the number of rows.
//! Postgres parses and plans it once per connection, and the client encodes each value straight
//! into the wire buffer. The arrays are unnested in the select list rather than with
//! `FROM unnest(a, b, …)`, which would first copy every row into a tuplestore.

use std::sync::LazyLock;

use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use super::{Attempt, Batch, Cancel, Dialect, Enqueue, Progress};

const POSTGRES: Dialect = Dialect {
    greatest: "GREATEST",
    least: "LEAST",
};

static ENQUEUE: LazyLock<String> = LazyLock::new(|| {
    let incoming = arrays(&[
        ("id", "uuid"),
        ("queue", "text"),
        ("kind", "text"),
        ("status", "text"),
        ("max_attempts", "int4"),
        ("payload", "jsonb"),
        ("priority", "int4"),
        ("idempotency_key", "text"),
        ("trace_id", "text"),
        ("at", "timestamptz"),
        ("run_at", "timestamptz"),
    ]);
    format!(
        "INSERT INTO job ({columns}) \
         SELECT id, queue, kind, status, max_attempts, payload, priority, idempotency_key, trace_id, \
                at, run_at, at \
         FROM ({incoming}) AS incoming {on_conflict}",
        columns = Enqueue::COLUMNS,
        on_conflict = Enqueue::on_conflict(POSTGRES),
    )
});

static PROGRESS: LazyLock<String> = LazyLock::new(|| {
    let incoming = arrays(&[
        ("id", "uuid"),
        ("queue", "text"),
        ("kind", "text"),
        ("status", "text"),
        ("attempts", "int4"),
        ("max_attempts", "int4"),
        ("worker_id", "text"),
        ("trace_id", "text"),
        ("last_error", "text"),
        ("run_at", "timestamptz"),
        ("started_at", "timestamptz"),
        ("finished_at", "timestamptz"),
        ("event_at", "timestamptz"),
    ]);
    format!(
        "INSERT INTO job ({columns}) \
         SELECT id, queue, kind, status, attempts, max_attempts, worker_id, trace_id, last_error, \
                started_at, run_at, started_at, finished_at, event_at \
         FROM ({incoming}) AS incoming {on_conflict}",
        columns = Progress::COLUMNS,
        on_conflict = Progress::on_conflict(POSTGRES),
    )
});

static CANCEL: LazyLock<String> = LazyLock::new(|| Cancel::update("$1", "$2"));

static ATTEMPT: LazyLock<String> = LazyLock::new(|| {
    let incoming = arrays(&[
        ("job_id", "uuid"),
        ("attempt", "int4"),
        ("worker_id", "text"),
        ("started_at", "timestamptz"),
        ("finished_at", "timestamptz"),
        ("outcome", "text"),
        ("error", "text"),
        ("trace_id", "text"),
    ]);
    format!(
        "INSERT INTO job_attempt ({columns}) SELECT * FROM ({incoming}) AS incoming {on_conflict}",
        columns = Attempt::COLUMNS,
        on_conflict = Attempt::on_conflict(),
    )
});

/// `SELECT unnest($1::uuid[]) AS id, unnest($2::text[]) AS queue, …`: the rows whose columns are
/// bound as arrays, in this order. Postgres walks equally long arrays in step.
fn arrays(columns: &[(&str, &str)]) -> String {
    let unnested: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, element))| format!("unnest(${}::{element}[]) AS {name}", i + 1))
        .collect();
    format!("SELECT {}", unnested.join(", "))
}

pub(super) async fn write(pool: &PgPool, batch: &Batch<'_>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for round in &batch.enqueues {
        enqueues(&mut tx, round).await?;
    }
    for round in &batch.progress {
        progress(&mut tx, round).await?;
    }
    for cancel in &batch.cancels {
        sqlx::query(CANCEL.as_str())
            .bind(cancel.id)
            .bind(cancel.at)
            .execute(&mut *tx)
            .await?;
    }
    for round in &batch.attempts {
        attempts(&mut tx, round).await?;
    }
    tx.commit().await
}

async fn enqueues(conn: &mut PgConnection, rows: &[Enqueue<'_>]) -> Result<(), sqlx::Error> {
    sqlx::query(ENQUEUE.as_str())
        .bind(column(rows, |r| r.id))
        .bind(column(rows, |r| r.queue))
        .bind(column(rows, |r| r.kind))
        .bind(column(rows, |r| r.status.as_str()))
        .bind(column(rows, |r| r.max_attempts))
        .bind(column(rows, |r| Json(r.payload)))
        .bind(column(rows, |r| r.priority))
        .bind(column(rows, |r| r.idempotency_key))
        .bind(column(rows, |r| r.trace_id))
        .bind(column(rows, |r| r.at))
        .bind(column(rows, |r| r.run_at))
        .execute(conn)
        .await?;
    Ok(())
}

async fn progress(conn: &mut PgConnection, rows: &[Progress<'_>]) -> Result<(), sqlx::Error> {
    sqlx::query(PROGRESS.as_str())
        .bind(column(rows, |r| r.id))
        .bind(column(rows, |r| r.queue))
        .bind(column(rows, |r| r.kind))
        .bind(column(rows, |r| r.status.as_str()))
        .bind(column(rows, |r| r.attempt))
        .bind(column(rows, |r| r.max_attempts))
        .bind(column(rows, |r| r.worker_id))
        .bind(column(rows, |r| r.trace_id))
        .bind(column(rows, |r| r.last_error))
        .bind(column(rows, |r| r.run_at))
        .bind(column(rows, |r| r.started_at))
        .bind(column(rows, |r| r.finished_at))
        .bind(column(rows, |r| r.event_at))
        .execute(conn)
        .await?;
    Ok(())
}

async fn attempts(conn: &mut PgConnection, rows: &[Attempt<'_>]) -> Result<(), sqlx::Error> {
    sqlx::query(ATTEMPT.as_str())
        .bind(column(rows, |r| r.job_id))
        .bind(column(rows, |r| r.attempt))
        .bind(column(rows, |r| r.worker_id))
        .bind(column(rows, |r| r.started_at))
        .bind(column(rows, |r| r.finished_at))
        .bind(column(rows, |r| r.outcome.map(|o| o.as_str())))
        .bind(column(rows, |r| r.error))
        .bind(column(rows, |r| r.trace_id))
        .execute(conn)
        .await?;
    Ok(())
}

/// One column of `rows`, to bind as an array.
fn column<R, T>(rows: &[R], value: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}
