//! Scoring: `scoring.recompute` plans a run — a fixed `as_of`, the model's subjects cut into
//! ranges — records it with one row per chunk, and enqueues one `scoring.chunk` job per range.
//! Each chunk scores its subjects and writes their raw scores; the chunk that leaves none
//! pending finalizes the run: normalization over all subjects, the run marked succeeded, the
//! leaderboard written to Redis. The run is the parent: `GET /v1/scores/{model}/runs/{id}`
//! shows it `running` until its last chunk is done.
//!
//! Every step is idempotent, so redeliveries and concurrent finalizers are harmless: chunk
//! job ids derive from the run id (a retried recompute re-enqueues the same jobs), a chunk
//! rewrites the same rows, and finalizing twice writes the same values.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, SubsecRound, Utc};
use jobs::{
    Job, JobId, QueueName,
    families::scoring::{self as kinds, Chunk, Normalization, Recompute, ScoreModel},
};
use schema::scores::{self as tables, RawScore};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::shared::{Families, db_error, families};
use crate::handlers::{Deps, JobError, payload};

/// Reads a stored model; `None` when there is none of that name.
pub async fn load_model(f: &Families, name: &str) -> Result<Option<ScoreModel>, JobError> {
    let Some(row) = tables::get_model(&f.db, name).await.map_err(db_error)? else {
        return Ok(None);
    };
    let weights: BTreeMap<String, f64> = serde_json::from_value(row.weights)
        .map_err(|e| JobError::permanent(format!("model {name}: weights: {e}")))?;
    Ok(Some(ScoreModel {
        name: row.name,
        weights,
        half_life_s: row.half_life_s,
        normalization: Normalization::parse(&row.normalization).unwrap_or_default(),
    }))
}

/// Plans (or, for a retried job, finds) the run of `model` and enqueues its pending chunks.
pub async fn plan(
    f: &Families,
    job_id: Uuid,
    model: &ScoreModel,
    chunk_size: u32,
) -> Result<tables::Run, JobError> {
    let run_id = kinds::run_id(job_id, &model.name);
    let run = match tables::get_run(&f.db, run_id).await.map_err(db_error)? {
        Some(run) => run,
        None => {
            // Microseconds: what Postgres keeps, so every chunk reads back the same instant.
            let as_of = Utc::now().trunc_subsecs(6);
            let subjects = schema::events::subjects(&f.db, &model.event_names(), as_of)
                .await
                .map_err(db_error)?;
            let chunks: Vec<tables::Chunk> = subjects
                .chunks(chunk_size.max(1) as usize)
                .enumerate()
                .map(|(i, s)| tables::Chunk {
                    run_id,
                    chunk: i as i32,
                    first_subject: s[0].clone(),
                    last_subject: s[s.len() - 1].clone(),
                    subjects: s.len() as i32,
                    job_id: kinds::chunk_job_id(run_id, i as u32),
                    status: "pending".into(),
                    worker_id: None,
                    done_at: None,
                })
                .collect();
            let run = tables::Run {
                id: run_id,
                model: model.name.clone(),
                status: "running".into(),
                as_of,
                subjects: subjects.len() as i64,
                chunks: chunks.len() as i32,
                started_at: Utc::now(),
                finished_at: None,
                error: None,
            };
            tables::create_run(&f.db, run.clone(), chunks)
                .await
                .map_err(db_error)?;
            run
        }
    };
    if run.status != "running" {
        return Ok(run);
    }
    let pending: Vec<tables::Chunk> = tables::chunks(&f.db, run.id)
        .await
        .map_err(db_error)?
        .into_iter()
        .filter(|c| c.status != "done")
        .collect();
    if run.chunks == 0 {
        finalize(f, &run, model).await?;
    } else if !pending.is_empty() {
        enqueue_chunks(f, &run, &pending).await?;
    }
    Ok(run)
}

async fn enqueue_chunks(f: &Families, run: &tables::Run, chunks: &[tables::Chunk]) -> Result<(), JobError> {
    let spec = f
        .catalog
        .get(kinds::CHUNK)
        .ok_or_else(|| JobError::permanent("scoring.chunk is not in the catalog"))?;
    let queue = QueueName::parse(spec.queue).map_err(JobError::permanent)?;
    let now = jobs::job::now_ms();
    let jobs: Vec<Job> = chunks
        .iter()
        .map(|c| {
            let payload = serde_json::to_string(&Chunk {
                run_id: run.id,
                chunk: c.chunk as u32,
            })
            .expect("a chunk payload serializes");
            Job {
                id: JobId(c.job_id),
                queue: queue.clone(),
                kind: spec.name.into(),
                payload: RawValue::from_string(payload).expect("valid JSON"),
                max_attempts: spec.retry.max_attempts,
                priority: 0,
                enqueued_at_ms: now,
                run_at_ms: None,
                trace_id: None,
                idempotency_key: Some(format!("scoring:{}:{}", run.id, c.chunk)),
                attempt: 0,
                receipt: 0,
                crashes: 0,
                attempts_before: 0,
            }
        })
        .collect();
    for batch in jobs.chunks(1_000) {
        f.broker
            .push_batch(batch.to_vec())
            .await
            .map_err(|e| JobError::retryable(format!("enqueuing chunk jobs: {e}")))?;
    }
    Ok(())
}

/// Scores one subject's events (in the order [`schema::events::of_subjects`] returns them).
pub fn score_events(
    model: &ScoreModel,
    events: &[schema::events::SubjectEvent],
    as_of: DateTime<Utc>,
) -> Vec<RawScore> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let subject = &events[start].subject;
        let end = start
            + events[start..]
                .iter()
                .take_while(|e| &e.subject == subject)
                .count();
        let scored = model.score(
            events[start..end]
                .iter()
                .map(|e| (e.name.as_str(), e.value, e.ts)),
            as_of,
        );
        out.push(RawScore {
            subject: subject.clone(),
            raw: scored.raw,
            components: serde_json::to_value(&scored.components).expect("components serialize"),
        });
        start = end;
    }
    out
}

/// Computes and stores one chunk, then finalizes the run if it was the last one pending.
pub async fn run_chunk(f: &Families, run_id: Uuid, chunk: i32) -> Result<(), JobError> {
    let run = tables::get_run(&f.db, run_id)
        .await
        .map_err(db_error)?
        .ok_or_else(|| JobError::permanent(format!("no scoring run {run_id}")))?;
    let c = tables::get_chunk(&f.db, run_id, chunk)
        .await
        .map_err(db_error)?
        .ok_or_else(|| JobError::permanent(format!("run {run_id} has no chunk {chunk}")))?;
    let model = load_model(f, &run.model)
        .await?
        .ok_or_else(|| JobError::permanent(format!("model {} was deleted", run.model)))?;
    if run.status == "running" {
        let events = schema::events::of_subjects(
            &f.db,
            &model.event_names(),
            &c.first_subject,
            &c.last_subject,
            run.as_of,
        )
        .await
        .map_err(db_error)?;
        let scores = score_events(&model, &events, run.as_of);
        tables::upsert_raw(&f.db, &model.name, run.id, run.as_of, &scores)
            .await
            .map_err(db_error)?;
        tables::mark_chunk_done(&f.db, run.id, chunk, &f.worker_id, Utc::now())
            .await
            .map_err(db_error)?;
    }
    if tables::chunks_pending(&f.db, run.id).await.map_err(db_error)? == 0 {
        finalize(f, &run, &model).await?;
    }
    Ok(())
}

/// Normalizes the run's raw scores onto 0–100 (given its minimum and maximum), in Rust so
/// that the result does not depend on the database's arithmetic.
pub fn normalize(model: &ScoreModel, raw: &[(String, f64)]) -> Vec<(String, f64)> {
    let min = raw.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let max = raw.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max);
    raw.iter()
        .map(|(s, r)| (s.clone(), model.normalization.apply(*r, min, max)))
        .collect()
}

async fn finalize(f: &Families, run: &tables::Run, model: &ScoreModel) -> Result<(), JobError> {
    let raw = tables::raw_scores(&f.db, &model.name, run.id)
        .await
        .map_err(db_error)?;
    let normalized = normalize(model, &raw);
    tables::set_normalized(&f.db, &model.name, run.id, &normalized)
        .await
        .map_err(db_error)?;
    let first = tables::finish_run(&f.db, run.id, "succeeded", None, Utc::now())
        .await
        .map_err(db_error)?;
    if let Some(cache) = &f.cache {
        let board = jobs::cache::Board {
            meta: jobs::cache::BoardMeta {
                run_id: Some(run.id),
                as_of: Some(run.as_of),
                subjects: normalized.len() as u64,
            },
            entries: normalized,
        };
        // A failed write leaves the old board until it expires or a warmer rebuilds it: the
        // scores are safe in the database, so this is no reason to fail the run.
        if let Err(error) = cache.put_board(&model.name, &board).await {
            tracing::warn!(%error, model = %model.name, "writing the leaderboard failed");
        }
    }
    if first {
        tracing::info!(run = %run.id, model = %model.name, subjects = raw.len(), "scoring run succeeded");
    }
    Ok(())
}

pub async fn recompute(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Recompute = payload(&job)?;
    let chunk_size = p.chunk_size.unwrap_or(f.scoring.chunk_size);
    let models = match &p.model {
        Some(name) => vec![
            load_model(f, name)
                .await?
                .ok_or_else(|| JobError::permanent(format!("no scoring model is named {name:?}")))?,
        ],
        None => {
            let mut out = Vec::new();
            for row in tables::list_models(&f.db).await.map_err(db_error)? {
                if let Some(m) = load_model(f, &row.name).await? {
                    out.push(m);
                }
            }
            out
        }
    };
    for model in &models {
        let run = plan(f, job.id.0, model, chunk_size).await?;
        tracing::info!(run = %run.id, model = %model.name, subjects = run.subjects, chunks = run.chunks, "scoring run planned");
    }
    Ok(())
}

pub async fn chunk(job: Arc<Job>, deps: Arc<Deps>) -> Result<(), JobError> {
    let f = families(&deps)?;
    let p: Chunk = payload(&job)?;
    run_chunk(f, p.run_id, p.chunk as i32).await
}
