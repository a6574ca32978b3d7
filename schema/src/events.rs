//! Events clients post (`POST /v1/events`): the batch insert and the scans the analytics and
//! scoring jobs make. The hot paths talk sqlx directly: one statement per batch on Postgres
//! (`unnest` of one array per column, so its text and plan never depend on the batch size),
//! multi-row `INSERT`s in one transaction on SQLite.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use sqlx::AssertSqlSafe;
use sqlx::types::Json;

use crate::DbError;

/// One event, validated by the API.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub name: String,
    pub subject: String,
    pub value: f64,
    pub ts: DateTime<Utc>,
    pub attrs: Option<serde_json::Value>,
    /// The event reports a failure (counted in the rollups' error rate).
    pub error: bool,
}

/// One event as the rollups read it.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub name: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
    pub error: bool,
}

/// One event as scoring reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectEvent {
    pub subject: String,
    pub name: String,
    pub value: f64,
    pub ts: DateTime<Utc>,
}

fn sql_error(e: sqlx::Error) -> DbError {
    DbError::Query(sea_orm::DbErr::Query(sea_orm::RuntimeErr::SqlxError(e.into())))
}

static PG_INSERT: &str = "INSERT INTO event (name, subject, value, ts, attrs, error) \
     SELECT unnest($1::text[]), unnest($2::text[]), unnest($3::float8[]), unnest($4::timestamptz[]), \
            unnest($5::jsonb[]), unnest($6::bool[])";

/// Rows per SQLite statement: 6 parameters each, well under SQLite's 32 766.
const SQLITE_ROWS: usize = 1_000;

static SQLITE_INSERT: LazyLock<String> = LazyLock::new(|| sqlite_insert(SQLITE_ROWS));

fn sqlite_insert(rows: usize) -> String {
    let mut s = String::from("INSERT INTO event (name, subject, value, ts, attrs, error) VALUES ");
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        s.push_str("(?,?,?,?,?,?)");
    }
    s
}

/// Inserts `events` in one transaction: all of them or none.
#[tracing::instrument(skip_all, fields(events = events.len()))]
pub async fn insert(db: &DatabaseConnection, events: &[NewEvent]) -> Result<u64, DbError> {
    if events.is_empty() {
        return Ok(0);
    }
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            sqlx::query(PG_INSERT)
                .bind(events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.value).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.ts).collect::<Vec<_>>())
                .bind(
                    events
                        .iter()
                        .map(|e| e.attrs.as_ref().map(Json))
                        .collect::<Vec<_>>(),
                )
                .bind(events.iter().map(|e| e.error).collect::<Vec<_>>())
                .execute(pool)
                .await
                .map_err(sql_error)?;
        }
        _ => {
            let pool = db.get_sqlite_connection_pool();
            let mut tx = pool.begin().await.map_err(sql_error)?;
            for rows in events.chunks(SQLITE_ROWS) {
                // Placeholders only, no value, in the statement's text.
                let sql = if rows.len() == SQLITE_ROWS {
                    SQLITE_INSERT.clone()
                } else {
                    sqlite_insert(rows.len())
                };
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for e in rows {
                    q = q
                        .bind(e.name.as_str())
                        .bind(e.subject.as_str())
                        .bind(e.value)
                        .bind(e.ts)
                        .bind(e.attrs.as_ref().map(Json))
                        .bind(e.error);
                }
                q.execute(&mut *tx).await.map_err(sql_error)?;
            }
            tx.commit().await.map_err(sql_error)?;
        }
    }
    Ok(events.len() as u64)
}

/// Calls `each` with every event of `from ≤ ts < to`, streamed (never all in memory at once).
#[tracing::instrument(skip_all)]
pub async fn scan(
    db: &DatabaseConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut each: impl FnMut(Point),
) -> Result<u64, DbError> {
    let mut n = 0;
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let mut rows = sqlx::query_as::<_, (String, DateTime<Utc>, f64, bool)>(
                "SELECT name, ts, value, error FROM event WHERE ts >= $1 AND ts < $2",
            )
            .bind(from)
            .bind(to)
            .fetch(db.get_postgres_connection_pool());
            while let Some((name, ts, value, error)) = rows.try_next().await.map_err(sql_error)? {
                n += 1;
                each(Point {
                    name,
                    ts,
                    value,
                    error,
                });
            }
        }
        _ => {
            let mut rows = sqlx::query_as::<_, (String, DateTime<Utc>, f64, bool)>(
                "SELECT name, ts, value, error FROM event WHERE ts >= ? AND ts < ?",
            )
            .bind(from)
            .bind(to)
            .fetch(db.get_sqlite_connection_pool());
            while let Some((name, ts, value, error)) = rows.try_next().await.map_err(sql_error)? {
                n += 1;
                each(Point {
                    name,
                    ts,
                    value,
                    error,
                });
            }
        }
    }
    Ok(n)
}

/// The distinct subjects with at least one event named in `names` at or before `as_of`, in the
/// database's order of subjects (the order chunk ranges are cut in).
pub async fn subjects(
    db: &DatabaseConnection,
    names: &[String],
    as_of: DateTime<Utc>,
) -> Result<Vec<String>, DbError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    match db.get_database_backend() {
        DbBackend::Postgres => sqlx::query_scalar(
            "SELECT DISTINCT subject FROM event WHERE name = ANY($1) AND ts <= $2 ORDER BY subject",
        )
        .bind(names)
        .bind(as_of)
        .fetch_all(db.get_postgres_connection_pool())
        .await
        .map_err(sql_error),
        _ => {
            let sql = format!(
                "SELECT DISTINCT subject FROM event WHERE name IN ({}) AND ts <= ? ORDER BY subject",
                placeholders(names.len())
            );
            let mut q = sqlx::query_scalar(AssertSqlSafe(sql));
            for n in names {
                q = q.bind(n);
            }
            q.bind(as_of)
                .fetch_all(db.get_sqlite_connection_pool())
                .await
                .map_err(sql_error)
        }
    }
}

/// Events named in `names` of the subjects `first ≤ subject ≤ last`, at or before `as_of`,
/// ordered by subject, time and id: each subject's events in the same order whoever reads
/// them, so that sums come out bit for bit the same.
pub async fn of_subjects(
    db: &DatabaseConnection,
    names: &[String],
    first: &str,
    last: &str,
    as_of: DateTime<Utc>,
) -> Result<Vec<SubjectEvent>, DbError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    type Row = (String, String, f64, DateTime<Utc>);
    let rows: Vec<Row> = match db.get_database_backend() {
        DbBackend::Postgres => sqlx::query_as(
            "SELECT subject, name, value, ts FROM event \
             WHERE subject >= $1 AND subject <= $2 AND name = ANY($3) AND ts <= $4 \
             ORDER BY subject, ts, id",
        )
        .bind(first)
        .bind(last)
        .bind(names)
        .bind(as_of)
        .fetch_all(db.get_postgres_connection_pool())
        .await
        .map_err(sql_error)?,
        _ => {
            let sql = format!(
                "SELECT subject, name, value, ts FROM event \
                 WHERE subject >= ? AND subject <= ? AND name IN ({}) AND ts <= ? \
                 ORDER BY subject, ts, id",
                placeholders(names.len())
            );
            let mut q = sqlx::query_as(AssertSqlSafe(sql)).bind(first).bind(last);
            for n in names {
                q = q.bind(n);
            }
            q.bind(as_of)
                .fetch_all(db.get_sqlite_connection_pool())
                .await
                .map_err(sql_error)?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(subject, name, value, ts)| SubjectEvent {
            subject,
            name,
            value,
            ts,
        })
        .collect())
}

/// How many events there are (tests and the acceptance program).
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, DbError> {
    use sea_orm::{FromQueryResult, Statement};
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    let n = N::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM event",
    ))
    .one(db)
    .await?
    .map_or(0, |r| r.n);
    Ok(n as u64)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}
