//! Reads for the API and dashboard, and the API's cancel. Every function takes any
//! `ConnectionTrait`, so callers can pass a pool or a transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Condition, Expr, ExprTrait, Func, LikeExpr, Query, UnionType};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement,
};
use uuid::Uuid;

use crate::DbError;
use crate::entity::{job, job_attempt};
use crate::history::{AttemptOutcome, JobState};

/// A job with its attempts, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub job: job::Model,
    pub attempts: Vec<job_attempt::Model>,
}

#[tracing::instrument(skip(db))]
pub async fn get_job(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<JobView>, DbError> {
    let Some(job) = job::Entity::find_by_id(id).one(db).await? else {
        return Ok(None);
    };
    let attempts = job_attempt::Entity::find()
        .filter(job_attempt::Column::JobId.eq(id))
        .order_by_asc(job_attempt::Column::Attempt)
        .all(db)
        .await?;
    Ok(Some(JobView { job, attempts }))
}

/// Jobs per status in `queue`, with every status present (zero if none).
#[tracing::instrument(skip(db))]
pub async fn count_by_status(
    db: &impl ConnectionTrait,
    queue: &str,
) -> Result<HashMap<String, u64>, DbError> {
    let rows: Vec<(String, i64)> = job::Entity::find()
        .select_only()
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "count")
        .filter(job::Column::Queue.eq(queue))
        .group_by(job::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let mut counts: HashMap<String, u64> = JobState::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), 0))
        .collect();
    for (status, count) in rows {
        counts.insert(status, u64::try_from(count).unwrap_or_default());
    }
    Ok(counts)
}

/// Jobs, newest first, optionally only those in `queue` and/or with `status`.
#[tracing::instrument(skip(db))]
pub async fn list_jobs(
    db: &impl ConnectionTrait,
    queue: Option<&str>,
    status: Option<&str>,
    limit: u64,
    offset: u64,
) -> Result<Vec<job::Model>, DbError> {
    let jobs = job::Entity::find()
        .apply_if(queue, |q, queue| q.filter(job::Column::Queue.eq(queue)))
        .apply_if(status, |q, status| q.filter(job::Column::Status.eq(status)));
    page_newest_first(db, jobs, limit, offset).await
}

/// One page of `jobs`, newest first.
async fn page_newest_first(
    db: &impl ConnectionTrait,
    jobs: sea_orm::Select<job::Entity>,
    limit: u64,
    offset: u64,
) -> Result<Vec<job::Model>, DbError> {
    Ok(jobs
        .order_by_desc(job::Column::CreatedAt)
        // UUIDv7 ids break ties in creation order.
        .order_by_desc(job::Column::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?)
}

/// What [`cancel_job`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelResult {
    Canceled,
    NotFound,
    /// The job has already started or finished; carries its status.
    NotCancelable(String),
}

/// Cancels a job that has not started yet (pending or scheduled).
#[tracing::instrument(skip(db))]
pub async fn cancel_job(
    db: &impl ConnectionTrait,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<CancelResult, DbError> {
    let cancelable = [JobState::Pending.as_str(), JobState::Scheduled.as_str()];
    let updated = job::Entity::update_many()
        .col_expr(job::Column::Status, Expr::value(JobState::Canceled.as_str()))
        .col_expr(job::Column::FinishedAt, Expr::value(at))
        // Never move `event_at` back: an event older than the stored one must not undo the cancel.
        .col_expr(
            job::Column::EventAt,
            Func::greatest([Expr::col(job::Column::EventAt), Expr::value(at)]).into(),
        )
        .filter(job::Column::Id.eq(id))
        .filter(job::Column::Status.is_in(cancelable))
        .exec(db)
        .await?;
    if updated.rows_affected > 0 {
        return Ok(CancelResult::Canceled);
    }
    let status: Option<String> = job::Entity::find_by_id(id)
        .select_only()
        .column(job::Column::Status)
        .into_tuple()
        .one(db)
        .await?;
    Ok(match status {
        Some(status) => CancelResult::NotCancelable(status),
        None => CancelResult::NotFound,
    })
}

/// Records that dead jobs were put back in line (RabbitMQ, whose job state lives here);
/// returns how many were recorded as dead.
#[tracing::instrument(skip(db, ids), fields(jobs = ids.len()))]
pub async fn revive_dead_jobs(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
    at: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let updated = job::Entity::update_many()
        .col_expr(job::Column::Status, Expr::value(JobState::Pending.as_str()))
        .col_expr(
            job::Column::EventAt,
            Func::greatest([Expr::col(job::Column::EventAt), Expr::value(at)]).into(),
        )
        .filter(job::Column::Id.is_in(ids.iter().copied()))
        .filter(job::Column::Status.eq(JobState::Dead.as_str()))
        .exec(db)
        .await?;
    Ok(updated.rows_affected)
}

/// Ids of jobs canceled at or after `since`: workers poll this to skip jobs they hold.
#[tracing::instrument(skip(db))]
pub async fn canceled_since(db: &impl ConnectionTrait, since: DateTime<Utc>) -> Result<Vec<Uuid>, DbError> {
    let ids = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::Status.eq(JobState::Canceled.as_str()))
        .filter(job::Column::EventAt.gte(since))
        .into_tuple()
        .all(db)
        .await?;
    Ok(ids)
}

/// `%text%` for `LIKE … ESCAPE '\'`, lower-cased, with the pattern characters in `text` taken
/// literally.
fn contains_pattern(text: &str) -> LikeExpr {
    let mut escaped = String::with_capacity(text.len() + 2);
    escaped.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped.push('%');
    LikeExpr::new(escaped).escape('\\')
}

/// Jobs, newest first, that `text` finds: by id (a whole job id), or as a case-insensitive
/// substring of the kind, the payload's JSON text, the last error or any attempt's error.
///
/// On Postgres the text conditions use the trigram indexes of the dashboard migration (when
/// `pg_trgm` could be installed); elsewhere they scan the `job` table newest first and stop at
/// `limit`.
#[tracing::instrument(skip(db))]
pub async fn search_jobs(
    db: &impl ConnectionTrait,
    text: &str,
    queue: Option<&str>,
    limit: u64,
    offset: u64,
) -> Result<Vec<job::Model>, DbError> {
    let text = text.trim();
    let pattern = || contains_pattern(text);
    let lower = |col: Expr| Expr::expr(Func::lower(col));
    // Ids from each indexed condition, united: an `OR` spanning `job` and an `EXISTS` on
    // `job_attempt` would make Postgres scan `job`, where each branch alone is a trigram index
    // scan (a bitmap OR within `job`).
    let mut in_job = Condition::any()
        .add(lower(Expr::col(job::Column::Kind)).like(pattern()))
        .add(
            lower(Expr::expr(Func::cast_as(
                Expr::col(job::Column::Payload),
                Alias::new("text"),
            )))
            .like(pattern()),
        )
        .add(lower(Expr::col(job::Column::LastError)).like(pattern()));
    if let Ok(id) = Uuid::parse_str(text) {
        in_job = in_job.add(Expr::col(job::Column::Id).eq(id));
    }
    let matching_ids = Query::select()
        .column(job::Column::Id)
        .from(job::Entity)
        .cond_where(in_job)
        .union(
            UnionType::Distinct,
            Query::select()
                .column(job_attempt::Column::JobId)
                .from(job_attempt::Entity)
                .and_where(lower(Expr::col(job_attempt::Column::Error)).like(pattern()))
                .to_owned(),
        )
        .to_owned();
    let matches = job::Column::Id.in_subquery(matching_ids);
    let jobs = job::Entity::find()
        .filter(matches)
        .apply_if(queue, |q, queue| q.filter(job::Column::Queue.eq(queue)));
    page_newest_first(db, jobs, limit, offset).await
}

/// Attempts of one queue that finished within one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinuteActivity {
    pub queue: String,
    /// Start of the minute, in whole minutes since the Unix epoch.
    pub minute: i64,
    pub succeeded: u64,
    /// Attempts that failed, timed out, panicked or were lost.
    pub failed: u64,
}

#[derive(FromQueryResult)]
struct ActivityRow {
    queue: String,
    minute: i64,
    succeeded: bool,
    attempts: i64,
}

/// Finished attempts per queue and minute since `since`, from the attempt history; minutes with
/// none are absent. Ordered by queue, then minute.
#[tracing::instrument(skip(db))]
pub async fn activity_since(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<MinuteActivity>, DbError> {
    let backend = db.get_database_backend();
    // The minute as an integer, so both backends bucket the same way whatever their session
    // timezone.
    let minute = match backend {
        DbBackend::Postgres => "CAST(floor(extract(epoch FROM a.finished_at) / 60) AS bigint)",
        _ => "CAST(strftime('%s', a.finished_at) AS integer) / 60",
    };
    let placeholder = if backend == DbBackend::Postgres { "$1" } else { "?" };
    let sql = format!(
        "SELECT j.queue AS queue, {minute} AS minute, a.outcome = '{ok}' AS succeeded, count(*) AS attempts \
         FROM job_attempt a JOIN job j ON j.id = a.job_id \
         WHERE a.finished_at >= {placeholder} AND a.outcome IS NOT NULL \
         GROUP BY 1, 2, 3 ORDER BY 1, 2",
        ok = AttemptOutcome::Succeeded.as_str(),
    );
    let rows = ActivityRow::find_by_statement(Statement::from_sql_and_values(backend, sql, [since.into()]))
        .all(db)
        .await?;
    let mut out: Vec<MinuteActivity> = Vec::new();
    for row in rows {
        let count = u64::try_from(row.attempts).unwrap_or_default();
        let same = out
            .last()
            .is_some_and(|last| last.queue == row.queue && last.minute == row.minute);
        if !same {
            out.push(MinuteActivity {
                queue: row.queue,
                minute: row.minute,
                succeeded: 0,
                failed: 0,
            });
        }
        let bucket = out.last_mut().expect("pushed above");
        if row.succeeded {
            bucket.succeeded += count;
        } else {
            bucket.failed += count;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::contains_pattern;
    use sea_orm::sea_query::{Expr, ExprTrait, Query, SqliteQueryBuilder};

    #[test]
    fn a_search_for_pattern_characters_matches_them_literally() {
        let sql = Query::select()
            .expr(Expr::val("a").like(contains_pattern("50%_off\\Now")))
            .to_string(SqliteQueryBuilder);
        assert_eq!(sql, r"SELECT 'a' LIKE '%50\%\_off\\now%' ESCAPE '\'");
    }
}
