//! SQLite has no arrays to bind, so each round of a table's rows is written as multi-row
//! `INSERT … VALUES (…), (…) …` statements of a few fixed sizes, largest first. There are few
//! distinct statements, so each connection prepares each once and keeps it in its cache.
//!
//! Values are bound as SQLite stores them through sea-orm (the entities read them back the same
//! way): UUIDs as 16-byte blobs, times as RFC 3339 text with `+00:00`, JSON as text. Strings
//! that repeat from row to row (queue, kind, worker, status) are bound as one shared `Arc<str>`
//! rather than copied per row.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;
use sqlx::types::Json;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::{Attempt, Batch, Cancel, Dialect, Enqueue, Progress};

const SQLITE: Dialect = Dialect {
    greatest: "MAX",
    least: "MIN",
};

/// Rows per statement, largest first. Small statements cost far more per row: each is a round
/// trip to sqlx's SQLite thread, and copies the pages it touches to the statement journal. SQLite
/// allows 32 766 bound parameters; the widest row here binds 14.
const SIZES: [usize; 5] = [256, 64, 16, 4, 1];

/// One upsert, as a statement per size in [`SIZES`].
struct Upsert {
    statements: Vec<String>,
}

impl Upsert {
    fn new(table: &str, columns: &str, on_conflict: &str) -> Upsert {
        let width = columns.split(',').count();
        let row = format!("({})", vec!["?"; width].join(", "));
        let statements = SIZES
            .iter()
            .map(|&rows| {
                let values = vec![row.as_str(); rows].join(", ");
                format!("INSERT INTO {table} ({columns}) VALUES {values} {on_conflict}")
            })
            .collect();
        Upsert { statements }
    }

    /// Writes `rows` in as few statements as [`SIZES`] allows, binding each row with `bind`.
    async fn write<R>(
        &'static self,
        conn: &mut SqliteConnection,
        rows: &[R],
        mut bind: impl FnMut(SqliteQuery, &R) -> SqliteQuery,
    ) -> Result<(), sqlx::Error> {
        let mut rest = rows;
        for (size, sql) in SIZES.iter().zip(&self.statements) {
            while rest.len() >= *size {
                let (chunk, tail) = rest.split_at(*size);
                let mut query = sqlx::query(sql.as_str());
                for row in chunk {
                    query = bind(query, row);
                }
                query.execute(&mut *conn).await?;
                rest = tail;
            }
        }
        Ok(())
    }
}

type SqliteQuery = Query<'static, Sqlite, SqliteArguments>;

static ENQUEUE: LazyLock<Upsert> =
    LazyLock::new(|| Upsert::new("job", Enqueue::COLUMNS, &Enqueue::on_conflict(SQLITE)));
static PROGRESS: LazyLock<Upsert> =
    LazyLock::new(|| Upsert::new("job", Progress::COLUMNS, &Progress::on_conflict(SQLITE)));
static ATTEMPT: LazyLock<Upsert> =
    LazyLock::new(|| Upsert::new("job_attempt", Attempt::COLUMNS, Attempt::on_conflict()));
static CANCEL: LazyLock<String> = LazyLock::new(|| Cancel::update("?1", "?2"));

pub(super) async fn write(pool: &SqlitePool, batch: &Batch<'_>) -> Result<(), sqlx::Error> {
    let mut shared = Shared::default();
    let mut tx = pool.begin().await?;
    for round in &batch.enqueues {
        ENQUEUE
            .write(&mut tx, round, |query, r: &Enqueue<'_>| {
                let at = time(r.at);
                query
                    .bind(r.id)
                    .bind(shared.text(r.queue))
                    .bind(shared.text(r.kind))
                    .bind(shared.text(r.status.as_str()))
                    .bind(r.max_attempts)
                    .bind(Json(r.payload))
                    .bind(r.priority)
                    .bind(r.idempotency_key.map(Arc::<str>::from))
                    .bind(r.trace_id.map(Arc::<str>::from))
                    .bind(at.clone())
                    .bind(r.run_at.map(time))
                    .bind(at)
            })
            .await?;
    }
    for round in &batch.progress {
        PROGRESS
            .write(&mut tx, round, |query, r: &Progress<'_>| {
                let started_at = time(r.started_at);
                query
                    .bind(r.id)
                    .bind(shared.text(r.queue))
                    .bind(shared.text(r.kind))
                    .bind(shared.text(r.status.as_str()))
                    .bind(r.attempt)
                    .bind(r.max_attempts)
                    .bind(shared.text(r.worker_id))
                    .bind(r.trace_id.map(Arc::<str>::from))
                    .bind(r.last_error.map(|e| shared.text(e)))
                    .bind(started_at.clone())
                    .bind(r.run_at.map(time))
                    .bind(started_at)
                    .bind(r.finished_at.map(time))
                    .bind(time(r.event_at))
            })
            .await?;
    }
    for cancel in &batch.cancels {
        sqlx::query(CANCEL.as_str())
            .bind(cancel.id)
            .bind(time(cancel.at))
            .execute(&mut *tx)
            .await?;
    }
    for round in &batch.attempts {
        ATTEMPT
            .write(&mut tx, round, |query, r: &Attempt<'_>| {
                query
                    .bind(r.job_id)
                    .bind(r.attempt)
                    .bind(shared.text(r.worker_id))
                    .bind(time(r.started_at))
                    .bind(r.finished_at.map(time))
                    .bind(r.outcome.map(|o| shared.text(o.as_str())))
                    .bind(r.error.map(|e| shared.text(e)))
                    .bind(r.trace_id.map(Arc::<str>::from))
            })
            .await?;
    }
    tx.commit().await
}

/// The batch's repeated strings, each allocated once.
#[derive(Default)]
struct Shared<'a> {
    texts: HashMap<&'a str, Arc<str>>,
}

impl<'a> Shared<'a> {
    fn text(&mut self, s: &'a str) -> Arc<str> {
        self.texts.entry(s).or_insert_with(|| Arc::from(s)).clone()
    }
}

/// `t` as sqlx stores a `DateTime<Utc>` in SQLite, `t.to_rfc3339_opts(SecondsFormat::AutoSi,
/// false)`, without chrono's formatting machinery. The upserts compare times as text, so every
/// time must be written exactly this way.
fn time(t: DateTime<Utc>) -> Arc<str> {
    let utc = t.naive_utc();
    let year = utc.year();
    let nanos = utc.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        // Years chrono writes with a sign, and leap seconds: left to chrono.
        return t.to_rfc3339_opts(SecondsFormat::AutoSi, false).into();
    }
    let mut text = Ascii::default();
    text.digits(year as u32, 4);
    text.push(b"-");
    text.digits(utc.month(), 2);
    text.push(b"-");
    text.digits(utc.day(), 2);
    text.push(b"T");
    text.digits(utc.hour(), 2);
    text.push(b":");
    text.digits(utc.minute(), 2);
    text.push(b":");
    text.digits(utc.second(), 2);
    // As few digits as keep the value: none, milli-, micro- or nanoseconds.
    if nanos == 0 {
    } else if nanos.is_multiple_of(1_000_000) {
        text.push(b".");
        text.digits(nanos / 1_000_000, 3);
    } else if nanos.is_multiple_of(1_000) {
        text.push(b".");
        text.digits(nanos / 1_000, 6);
    } else {
        text.push(b".");
        text.digits(nanos, 9);
    }
    text.push(b"+00:00");
    Arc::from(text.as_str())
}

/// A short ASCII string built on the stack; 35 bytes fit the longest time above.
struct Ascii {
    buf: [u8; 35],
    len: usize,
}

impl Default for Ascii {
    fn default() -> Self {
        Ascii { buf: [0; 35], len: 0 }
    }
}

impl Ascii {
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `n` in decimal, zero-padded to `width` digits (`n` must fit).
    fn digits(&mut self, mut n: u32, width: usize) {
        for i in (0..width).rev() {
            self.buf[self.len + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("only ASCII is pushed")
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

    use super::time;

    #[test]
    fn times_are_written_as_sqlx_writes_them() {
        let mut cases: Vec<DateTime<Utc>> = vec![
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 23, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc::now(),
            // A leap second.
            DateTime::from_timestamp(1_483_228_799, 1_500_000_000).unwrap(),
        ];
        // Every fraction width, from a cheap deterministic spread of instants.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 4_000_000_000) as i64;
            let nanos = match i % 4 {
                0 => 0,
                1 => (x >> 40) as u32 % 1000 * 1_000_000,
                2 => (x >> 40) as u32 % 1_000_000 * 1000,
                _ => (x >> 34) as u32 % 1_000_000_000,
            };
            cases.push(DateTime::from_timestamp(secs, nanos).unwrap());
        }
        for t in cases {
            assert_eq!(
                &*time(t),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, false),
                "{t:?}"
            );
        }
    }
}
