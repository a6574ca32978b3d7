//! Scoring: models (weights, half-life, normalization), full recomputes and their runs, the
//! leaderboard served from Redis, and a subject's score with its explanation.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use jobs::{
    cache::{self, CacheResult},
    families::scoring::{self as family, Normalization, ScoreModel},
};
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use schema::scores as tables;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiTags;
use crate::{
    ApiConfig, AppState,
    enqueue::{self, Context},
    error::{ApiError, FieldError, ProblemType},
    metrics,
    payload::{BodySchema, JsonBody},
    trace,
};

/// Most entries one `top` returns.
pub(crate) const MAX_TOP: u64 = 1_000;

pub(crate) struct ScoresApi {
    state: AppState,
}

impl ScoresApi {
    pub(crate) fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn model_name(name: &str) -> Result<(), ApiError> {
    family::check_model_name(name).map_err(|reason| ApiError::Invalid {
        errors: vec![FieldError::new(ProblemType::InvalidField, "model", reason)],
        batch: false,
    })
}

async fn model_row(state: &AppState, name: &str) -> Result<tables::ScoreModelRow, ApiError> {
    model_name(name)?;
    tables::get_model(&state.db, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no scoring model is named {name:?}")))
}

#[OpenApi(tag = "ApiTags::Scores")]
impl ScoresApi {
    /// Create or replace a scoring model
    ///
    /// `score = Σ weight(name) · value · 2^(−age / half_life_s)` over each subject's events,
    /// normalized to 0–100 (`max` or `minmax`). Takes effect at the next recompute.
    #[oai(path = "/v1/scores/:model", method = "put", operation_id = "putScoreModel")]
    async fn put(&self, model: Path<String>, body: JsonBody<ModelRequest>) -> Result<PutResponse, ApiError> {
        let v = body.value()?;
        let mut errors = Vec::new();
        let weights: BTreeMap<String, f64> = match v.get("weights").cloned().map(serde_json::from_value) {
            Some(Ok(w)) => w,
            _ => {
                errors.push(FieldError::new(
                    ProblemType::InvalidField,
                    "weights",
                    "must be an object of event name → number",
                ));
                BTreeMap::new()
            }
        };
        let half_life_s = v.get("half_life_s").and_then(Value::as_f64).unwrap_or(f64::NAN);
        let normalization = match v
            .get("normalization")
            .map(|n| n.as_str().and_then(Normalization::parse))
        {
            None => Normalization::Max,
            Some(Some(n)) => n,
            Some(None) => {
                errors.push(FieldError::new(
                    ProblemType::InvalidField,
                    "normalization",
                    "must be max or minmax",
                ));
                Normalization::Max
            }
        };
        if let Some(obj) = v.as_object() {
            for k in obj.keys() {
                if !matches!(k.as_str(), "weights" | "half_life_s" | "normalization") {
                    errors.push(FieldError::new(
                        ProblemType::InvalidField,
                        k.clone(),
                        "unknown field",
                    ));
                }
            }
        }
        let m = ScoreModel {
            name: model.0.clone(),
            weights,
            half_life_s,
            normalization,
        };
        let skip_weights = errors.iter().any(|e| e.field == "weights");
        for (field, reason) in m.problems() {
            if !(skip_weights && field == "weights") {
                let field = if field == "name" {
                    "model".to_owned()
                } else {
                    field
                };
                errors.push(FieldError::new(ProblemType::InvalidField, field, reason));
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid { errors, batch: false });
        }
        let created = tables::put_model(
            &self.state.db,
            &m.name,
            serde_json::to_value(&m.weights).expect("weights serialize"),
            m.half_life_s,
            m.normalization.as_str(),
            Utc::now(),
        )
        .await?;
        let view = Json(model_view(&m));
        Ok(if created {
            PutResponse::Created(view)
        } else {
            PutResponse::Replaced(view)
        })
    }

    /// Read a scoring model and its latest runs
    #[oai(path = "/v1/scores/:model", method = "get", operation_id = "getScoreModel")]
    async fn get(&self, model: Path<String>) -> Result<Json<ModelDetail>, ApiError> {
        let row = model_row(&self.state, &model).await?;
        let runs = tables::runs(&self.state.db, &row.name, 10).await?;
        Ok(Json(ModelDetail {
            name: row.name,
            weights: row.weights,
            half_life_s: row.half_life_s,
            normalization: row.normalization,
            updated_at: row.updated_at,
            runs: runs.into_iter().map(|r| run_view(r, None)).collect(),
        }))
    }

    /// Recompute every subject's score
    ///
    /// Enqueues a `scoring.recompute` job. It plans a run and fans it out into `scoring.chunk`
    /// jobs; the run (at `run_url`) stays `running` until its last chunk is done.
    #[oai(
        path = "/v1/scores/:model/recompute",
        method = "post",
        operation_id = "recomputeScores"
    )]
    async fn recompute(
        &self,
        model: Path<String>,
        /// Subjects per chunk job (default from `[scoring] chunk_size`).
        chunk_size: Query<Option<u32>>,
        traceparent: poem_openapi::param::Header<Option<String>>,
    ) -> Result<RecomputeResponse, ApiError> {
        model_row(&self.state, &model).await?;
        let traceparent = trace::request_traceparent(traceparent.0.as_deref());
        let cx = Context {
            catalog: &self.state.catalog,
            now_ms: jobs::job::now_ms(),
            traceparent: &traceparent,
        };
        let mut payload = json!({"model": &model.0});
        if let Some(n) = chunk_size.0 {
            payload["chunk_size"] = json!(n);
        }
        let prepared = enqueue::single(json!({"kind": family::RECOMPUTE, "payload": payload}), &cx)
            .map_err(|errors| ApiError::Invalid { errors, batch: false })?;
        let enqueued = super::jobs::push(&self.state, prepared).await?;
        let run_id = family::run_id(enqueued.id.0, &model);
        let status_url = format!("/v1/jobs/{}", enqueued.id);
        Ok(RecomputeResponse::Accepted(
            Json(RecomputeAccepted {
                id: enqueued.id.0,
                status_url: status_url.clone(),
                run_id,
                run_url: format!("/v1/scores/{}/runs/{run_id}", model.0),
            }),
            status_url,
        ))
    }

    /// Read a recompute run and its chunks
    #[oai(
        path = "/v1/scores/:model/runs/:id",
        method = "get",
        operation_id = "getScoreRun"
    )]
    async fn run(&self, model: Path<String>, id: Path<String>) -> Result<Json<RunView>, ApiError> {
        model_name(&model)?;
        let uuid = Uuid::try_parse(&id).map_err(|_| ApiError::InvalidJobId(id.0.clone()))?;
        let run = tables::get_run(&self.state.db, uuid)
            .await?
            .filter(|r| r.model == model.0)
            .ok_or_else(|| ApiError::NotFound(format!("model {} has no run {uuid}", model.0)))?;
        let chunks = tables::chunks(&self.state.db, uuid).await?;
        Ok(Json(run_view(run, Some(chunks))))
    }

    /// The leaderboard
    ///
    /// The `n` best subjects (default 10, at most 1000), best first. Served from the Redis
    /// sorted set of the model when warm; on a miss one request rebuilds it from the
    /// database while the others wait for it (`drover_cache_requests_total{cache="leaderboard"}`).
    #[oai(path = "/v1/scores/:model/top", method = "get", operation_id = "topScores")]
    async fn top(&self, model: Path<String>, n: Query<Option<u64>>) -> Result<Json<TopView>, ApiError> {
        model_name(&model)?;
        let n = n.0.unwrap_or(10);
        if n == 0 || n > MAX_TOP {
            return Err(ApiError::Invalid {
                errors: vec![FieldError::new(
                    ProblemType::InvalidField,
                    "n",
                    format!("must be between 1 and {MAX_TOP}"),
                )],
                batch: false,
            });
        }
        let db = &self.state.db;
        let not_found = || ApiError::NotFound(format!("no scoring model is named {:?}", model.0));
        let (top, result) = match &self.state.cache {
            Some(c) => c
                .top_or_build::<ApiError, _, _>(&model, n as usize, || async {
                    Ok(cache::build_board(db, &model).await?)
                })
                .await?
                .ok_or_else(not_found)?,
            None => {
                let board = cache::build_board(db, &model).await?.ok_or_else(not_found)?;
                (cache::top_of(&board, n as usize), CacheResult::Miss)
            }
        };
        metrics::cache_request(cache::LEADERBOARD_CACHE, result);
        Ok(Json(TopView {
            model: model.0,
            run_id: top.meta.run_id,
            as_of: top.meta.as_of,
            subjects: top.meta.subjects,
            cached: result == CacheResult::Hit,
            top: top
                .entries
                .into_iter()
                .enumerate()
                .map(|(i, (subject, score))| Entry {
                    rank: i as u64 + 1,
                    subject,
                    score,
                })
                .collect(),
        }))
    }

    /// A subject's score, explained
    ///
    /// The normalized score, its rank, the raw score and each event name's contribution
    /// (weight, events, Σ weight · value · 2^(−age / half_life)).
    #[oai(
        path = "/v1/scores/:model/subjects/:id",
        method = "get",
        operation_id = "getSubjectScore"
    )]
    async fn subject(&self, model: Path<String>, id: Path<String>) -> Result<Json<SubjectView>, ApiError> {
        let row = model_row(&self.state, &model).await?;
        let s = tables::get_score(&self.state.db, &row.name, &id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("subject {:?} has no {} score", id.0, row.name)))?;
        let rank = tables::rank(&self.state.db, &row.name, s.score).await?;
        Ok(Json(SubjectView {
            model: s.model,
            subject: s.subject,
            score: s.score,
            rank,
            raw: s.raw,
            half_life_s: row.half_life_s,
            normalization: row.normalization,
            components: s.components,
            run_id: s.run_id,
            as_of: s.as_of,
        }))
    }
}

fn model_view(m: &ScoreModel) -> ModelView {
    ModelView {
        name: m.name.clone(),
        weights: serde_json::to_value(&m.weights).expect("weights serialize"),
        half_life_s: m.half_life_s,
        normalization: m.normalization.as_str().into(),
    }
}

fn run_view(r: tables::Run, chunks: Option<Vec<tables::Chunk>>) -> RunView {
    RunView {
        id: r.id,
        model: r.model,
        status: r.status,
        as_of: r.as_of,
        subjects: r.subjects,
        chunks: r.chunks,
        chunks_done: chunks
            .as_ref()
            .map(|c| c.iter().filter(|c| c.status == "done").count() as i32),
        started_at: r.started_at,
        finished_at: r.finished_at,
        error: r.error,
        chunk_list: chunks.map(|cs| {
            cs.into_iter()
                .map(|c| ChunkView {
                    chunk: c.chunk,
                    first_subject: c.first_subject,
                    last_subject: c.last_subject,
                    subjects: c.subjects,
                    job_id: c.job_id,
                    status: c.status,
                    worker_id: c.worker_id,
                    done_at: c.done_at,
                })
                .collect()
        }),
    }
}

/// A scoring model.
#[derive(Object)]
pub(crate) struct ModelRequest {
    /// Event name → weight.
    weights: BTreeMap<String, f64>,
    /// Seconds after which an event's contribution has halved.
    half_life_s: f64,
    /// max (default) or minmax.
    #[oai(skip_serializing_if_is_none)]
    normalization: Option<String>,
}

impl BodySchema for ModelRequest {
    fn max_bytes(config: &ApiConfig) -> usize {
        config.max_body_bytes
    }
}

#[derive(Object)]
pub(crate) struct ModelView {
    name: String,
    weights: Value,
    half_life_s: f64,
    normalization: String,
}

#[derive(ApiResponse)]
pub(crate) enum PutResponse {
    /// Created.
    #[oai(status = 201)]
    Created(Json<ModelView>),
    /// Replaced.
    #[oai(status = 200)]
    Replaced(Json<ModelView>),
}

#[derive(Object)]
pub(crate) struct ModelDetail {
    name: String,
    weights: Value,
    half_life_s: f64,
    normalization: String,
    updated_at: DateTime<Utc>,
    /// The newest runs, newest first.
    runs: Vec<RunView>,
}

#[derive(Object)]
pub(crate) struct RecomputeAccepted {
    /// The recompute job's id.
    id: Uuid,
    status_url: String,
    /// The run the job plans: done when all its chunks are.
    run_id: Uuid,
    run_url: String,
}

#[derive(ApiResponse)]
pub(crate) enum RecomputeResponse {
    /// Enqueued; `Location` is the job's status URL.
    #[oai(status = 202)]
    Accepted(Json<RecomputeAccepted>, #[oai(header = "Location")] String),
}

/// A recompute run: the parent of its chunk jobs.
#[derive(Object)]
pub(crate) struct RunView {
    id: Uuid,
    model: String,
    /// running (chunks outstanding), succeeded or failed.
    status: String,
    /// The instant ages are measured from.
    as_of: DateTime<Utc>,
    subjects: i64,
    chunks: i32,
    #[oai(skip_serializing_if_is_none)]
    chunks_done: Option<i32>,
    started_at: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    finished_at: Option<DateTime<Utc>>,
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
    #[oai(rename = "chunk_list", skip_serializing_if_is_none)]
    chunk_list: Option<Vec<ChunkView>>,
}

#[derive(Object)]
pub(crate) struct ChunkView {
    chunk: i32,
    first_subject: String,
    last_subject: String,
    subjects: i32,
    job_id: Uuid,
    /// pending or done.
    status: String,
    #[oai(skip_serializing_if_is_none)]
    worker_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    done_at: Option<DateTime<Utc>>,
}

#[derive(Object)]
pub(crate) struct TopView {
    model: String,
    /// The run the scores come from (null before the first run).
    #[oai(skip_serializing_if_is_none)]
    run_id: Option<Uuid>,
    #[oai(skip_serializing_if_is_none)]
    as_of: Option<DateTime<Utc>>,
    /// Subjects on the board.
    subjects: u64,
    /// Served from Redis.
    cached: bool,
    top: Vec<Entry>,
}

#[derive(Object)]
pub(crate) struct Entry {
    rank: u64,
    subject: String,
    score: f64,
}

#[derive(Object)]
pub(crate) struct SubjectView {
    model: String,
    subject: String,
    /// 0–100.
    score: f64,
    /// 1 + subjects scoring strictly more.
    rank: u64,
    raw: f64,
    half_life_s: f64,
    normalization: String,
    /// Event name → {weight, events, contribution}.
    components: Value,
    run_id: Uuid,
    as_of: DateTime<Utc>,
}
