//! The scoring family's tables: models, the latest score per model and subject (with its
//! components), recompute runs and their chunks. Chunks write raw scores; the run's last step
//! normalizes them all at once ([`raw_scores`], [`set_normalized`]), so a reader never sees
//! one chunk's scale mixed with another's. Bulk writes use sqlx directly (one statement of
//! arrays per batch on Postgres).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use sqlx::types::Json;
use uuid::Uuid;

use crate::DbError;
use crate::entity::{score, score_chunk, score_model, score_run};

pub use crate::entity::score::Model as Score;
pub use crate::entity::score_chunk::Model as Chunk;
pub use crate::entity::score_model::Model as ScoreModelRow;
pub use crate::entity::score_run::Model as Run;

fn sql_error(e: sqlx::Error) -> DbError {
    DbError::Query(sea_orm::DbErr::Query(sea_orm::RuntimeErr::SqlxError(e.into())))
}

/// Creates or replaces model `name`; returns whether it was created.
pub async fn put_model(
    db: &impl ConnectionTrait,
    name: &str,
    weights: serde_json::Value,
    half_life_s: f64,
    normalization: &str,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let existed = score_model::Entity::find_by_id(name).one(db).await?.is_some();
    let row = score_model::ActiveModel {
        name: Set(name.to_owned()),
        weights: Set(weights),
        half_life_s: Set(half_life_s),
        normalization: Set(normalization.to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    };
    score_model::Entity::insert(row)
        .on_conflict(
            OnConflict::column(score_model::Column::Name)
                .update_columns([
                    score_model::Column::Weights,
                    score_model::Column::HalfLifeS,
                    score_model::Column::Normalization,
                    score_model::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(!existed)
}

pub async fn get_model(db: &impl ConnectionTrait, name: &str) -> Result<Option<ScoreModelRow>, DbError> {
    Ok(score_model::Entity::find_by_id(name).one(db).await?)
}

pub async fn list_models(db: &impl ConnectionTrait) -> Result<Vec<ScoreModelRow>, DbError> {
    Ok(score_model::Entity::find()
        .order_by_asc(score_model::Column::Name)
        .all(db)
        .await?)
}

/// Records a planned run and its chunks unless the run exists already (a retried recompute);
/// returns whether it was new.
pub async fn create_run(db: &impl ConnectionTrait, run: Run, chunks: Vec<Chunk>) -> Result<bool, DbError> {
    if score_run::Entity::find_by_id(run.id).one(db).await?.is_some() {
        return Ok(false);
    }
    for batch in chunks.chunks(500) {
        score_chunk::Entity::insert_many(batch.iter().cloned().map(score_chunk::ActiveModel::from))
            .on_conflict(
                OnConflict::columns([score_chunk::Column::RunId, score_chunk::Column::Chunk])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    // The run row last: a run that exists has all its chunks.
    score_run::Entity::insert(score_run::ActiveModel::from(run))
        .on_conflict(OnConflict::column(score_run::Column::Id).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
    Ok(true)
}

pub async fn get_run(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Run>, DbError> {
    Ok(score_run::Entity::find_by_id(id).one(db).await?)
}

/// The newest runs of `model`, newest first.
pub async fn runs(db: &impl ConnectionTrait, model: &str, limit: u64) -> Result<Vec<Run>, DbError> {
    Ok(score_run::Entity::find()
        .filter(score_run::Column::Model.eq(model))
        .order_by_desc(score_run::Column::StartedAt)
        .limit(limit)
        .all(db)
        .await?)
}

/// Sets a running run's final status; returns false when it was no longer running.
pub async fn finish_run(
    db: &impl ConnectionTrait,
    id: Uuid,
    status: &str,
    error: Option<String>,
    at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let res = score_run::Entity::update_many()
        .col_expr(score_run::Column::Status, Expr::value(status))
        .col_expr(score_run::Column::FinishedAt, Expr::value(at))
        .col_expr(score_run::Column::Error, Expr::value(error))
        .filter(score_run::Column::Id.eq(id))
        .filter(score_run::Column::Status.eq("running"))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

pub async fn get_chunk(
    db: &impl ConnectionTrait,
    run_id: Uuid,
    chunk: i32,
) -> Result<Option<Chunk>, DbError> {
    Ok(score_chunk::Entity::find_by_id((run_id, chunk)).one(db).await?)
}

pub async fn chunks(db: &impl ConnectionTrait, run_id: Uuid) -> Result<Vec<Chunk>, DbError> {
    Ok(score_chunk::Entity::find()
        .filter(score_chunk::Column::RunId.eq(run_id))
        .order_by_asc(score_chunk::Column::Chunk)
        .all(db)
        .await?)
}

/// Marks a chunk done (again, for a redelivered chunk job: harmless).
pub async fn mark_chunk_done(
    db: &impl ConnectionTrait,
    run_id: Uuid,
    chunk: i32,
    worker_id: &str,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    score_chunk::Entity::update_many()
        .col_expr(score_chunk::Column::Status, Expr::value("done"))
        .col_expr(score_chunk::Column::WorkerId, Expr::value(worker_id))
        .col_expr(score_chunk::Column::DoneAt, Expr::value(at))
        .filter(score_chunk::Column::RunId.eq(run_id))
        .filter(score_chunk::Column::Chunk.eq(chunk))
        .exec(db)
        .await?;
    Ok(())
}

/// Chunks of the run not done yet.
pub async fn chunks_pending(db: &impl ConnectionTrait, run_id: Uuid) -> Result<u64, DbError> {
    Ok(score_chunk::Entity::find()
        .filter(score_chunk::Column::RunId.eq(run_id))
        .filter(score_chunk::Column::Status.ne("done"))
        .count(db)
        .await?)
}

/// A subject's raw score from one chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct RawScore {
    pub subject: String,
    pub raw: f64,
    pub components: serde_json::Value,
}

const PG_UPSERT: &str = "INSERT INTO score (model, subject, raw, score, components, run_id, as_of) \
     SELECT $1, unnest($2::text[]), unnest($3::float8[]), 0, unnest($4::jsonb[]), $5, $6 \
     ON CONFLICT (model, subject) DO UPDATE SET raw = excluded.raw, components = excluded.components, \
     run_id = excluded.run_id, as_of = excluded.as_of";

const SQLITE_UPSERT: &str = "INSERT INTO score (model, subject, raw, score, components, run_id, as_of) \
     VALUES (?, ?, ?, 0, ?, ?, ?) \
     ON CONFLICT (model, subject) DO UPDATE SET raw = excluded.raw, components = excluded.components, \
     run_id = excluded.run_id, as_of = excluded.as_of";

/// Writes one chunk's raw scores (the normalized `score` of a subject already scored keeps
/// its previous value until the run normalizes).
pub async fn upsert_raw(
    db: &DatabaseConnection,
    model: &str,
    run_id: Uuid,
    as_of: DateTime<Utc>,
    rows: &[RawScore],
) -> Result<(), DbError> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            for batch in rows.chunks(10_000) {
                sqlx::query(PG_UPSERT)
                    .bind(model)
                    .bind(batch.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>())
                    .bind(batch.iter().map(|r| r.raw).collect::<Vec<_>>())
                    .bind(batch.iter().map(|r| Json(&r.components)).collect::<Vec<_>>())
                    .bind(run_id)
                    .bind(as_of)
                    .execute(db.get_postgres_connection_pool())
                    .await
                    .map_err(sql_error)?;
            }
        }
        _ => {
            let mut tx = db.get_sqlite_connection_pool().begin().await.map_err(sql_error)?;
            for r in rows {
                sqlx::query(SQLITE_UPSERT)
                    .bind(model)
                    .bind(&r.subject)
                    .bind(r.raw)
                    .bind(Json(&r.components))
                    .bind(run_id)
                    .bind(as_of)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
            }
            tx.commit().await.map_err(sql_error)?;
        }
    }
    Ok(())
}

/// (subject, raw) of every score run `run_id` wrote for `model`.
pub async fn raw_scores(
    db: &impl ConnectionTrait,
    model: &str,
    run_id: Uuid,
) -> Result<Vec<(String, f64)>, DbError> {
    Ok(score::Entity::find()
        .select_only()
        .column(score::Column::Subject)
        .column(score::Column::Raw)
        .filter(score::Column::Model.eq(model))
        .filter(score::Column::RunId.eq(run_id))
        .into_tuple::<(String, f64)>()
        .all(db)
        .await?)
}

/// Sets the normalized scores of run `run_id` and removes the model's scores of older runs
/// (subjects the run no longer has), in one transaction.
pub async fn set_normalized(
    db: &DatabaseConnection,
    model: &str,
    run_id: Uuid,
    scores: &[(String, f64)],
) -> Result<(), DbError> {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let mut tx = db
                .get_postgres_connection_pool()
                .begin()
                .await
                .map_err(sql_error)?;
            for batch in scores.chunks(10_000) {
                sqlx::query(
                    "UPDATE score SET score = v.score FROM \
                     (SELECT unnest($1::text[]) AS subject, unnest($2::float8[]) AS score) AS v \
                     WHERE score.model = $3 AND score.subject = v.subject",
                )
                .bind(batch.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
                .bind(batch.iter().map(|r| r.1).collect::<Vec<_>>())
                .bind(model)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            }
            sqlx::query("DELETE FROM score WHERE model = $1 AND run_id <> $2")
                .bind(model)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            tx.commit().await.map_err(sql_error)?;
        }
        _ => {
            let mut tx = db.get_sqlite_connection_pool().begin().await.map_err(sql_error)?;
            for (subject, s) in scores {
                sqlx::query("UPDATE score SET score = ? WHERE model = ? AND subject = ?")
                    .bind(s)
                    .bind(model)
                    .bind(subject)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
            }
            sqlx::query("DELETE FROM score WHERE model = ? AND run_id <> ?")
                .bind(model)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            tx.commit().await.map_err(sql_error)?;
        }
    }
    Ok(())
}

/// The best `n` (subject, score) of `model`, best first; equal scores by descending subject
/// (the order of the Redis leaderboard).
pub async fn top(db: &impl ConnectionTrait, model: &str, n: u64) -> Result<Vec<(String, f64)>, DbError> {
    Ok(score::Entity::find()
        .select_only()
        .column(score::Column::Subject)
        .column(score::Column::Score)
        .filter(score::Column::Model.eq(model))
        .order_by_desc(score::Column::Score)
        .order_by_desc(score::Column::Subject)
        .limit(n)
        .into_tuple::<(String, f64)>()
        .all(db)
        .await?)
}

/// Every (subject, score) of `model`: what its leaderboard is built from.
pub async fn ranking(db: &impl ConnectionTrait, model: &str) -> Result<Vec<(String, f64)>, DbError> {
    Ok(score::Entity::find()
        .select_only()
        .column(score::Column::Subject)
        .column(score::Column::Score)
        .filter(score::Column::Model.eq(model))
        .into_tuple::<(String, f64)>()
        .all(db)
        .await?)
}

/// Every score row of `model`, by subject (tests and comparisons).
pub async fn all_scores(db: &impl ConnectionTrait, model: &str) -> Result<Vec<Score>, DbError> {
    Ok(score::Entity::find()
        .filter(score::Column::Model.eq(model))
        .order_by_asc(score::Column::Subject)
        .all(db)
        .await?)
}

pub async fn get_score(
    db: &impl ConnectionTrait,
    model: &str,
    subject: &str,
) -> Result<Option<Score>, DbError> {
    Ok(score::Entity::find_by_id((model.to_owned(), subject.to_owned()))
        .one(db)
        .await?)
}

/// 1 + the number of subjects of `model` scoring strictly more than `score`.
pub async fn rank(db: &impl ConnectionTrait, model: &str, score_value: f64) -> Result<u64, DbError> {
    let above = score::Entity::find()
        .filter(score::Column::Model.eq(model))
        .filter(score::Column::Score.gt(score_value))
        .count(db)
        .await?;
    Ok(above + 1)
}
