//! The tables of the analytics, scoring and cache-warming families: the events clients post,
//! the rollups, anomalies and forecasts the analytics jobs compute from them (and from job
//! history), the scoring models with their results and recompute runs, and what the HTTP
//! cache warmers last saw.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub(super) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Event::Table)
                    .col(big_pk_auto(Event::Id))
                    // What happened (`page.view`, `checkout`): 1–128 of a-z 0-9 . _ - :.
                    .col(string(Event::Name))
                    // Whom it happened to (a user, an account): what scores are kept per.
                    .col(string(Event::Subject))
                    // The measure rollups aggregate and scores weigh (a latency, an amount, 1).
                    .col(double(Event::Value))
                    // When it happened (the client's clock), not when it was posted.
                    .col(timestamp_with_time_zone(Event::Ts))
                    // Free-form attributes, kept for drill-down; never aggregated.
                    .col(json_binary_null(Event::Attrs))
                    // The event reports a failure (`attrs.error` was true): the rollups' error rate.
                    .col(boolean(Event::Error).default(false))
                    .to_owned(),
            )
            .await?;
        // Rollups scan one time range of all names; scoring reads one range of subjects.
        for (name, cols) in [
            ("event_ts_idx", vec![Event::Ts]),
            ("event_subject_ts_idx", vec![Event::Subject, Event::Ts]),
        ] {
            let mut idx = Index::create();
            idx.name(name).table(Event::Table);
            for c in cols {
                idx.col(c);
            }
            manager.create_index(idx.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(Rollup::Table)
                    // events (POST /v1/events) or jobs (drover's own history, per kind).
                    .col(string(Rollup::Source))
                    // The event name, or the job kind.
                    .col(string(Rollup::Name))
                    // minute, hour or day.
                    .col(string(Rollup::Bucket))
                    // The bucket's first instant (UTC); the bucket is [start, start + size).
                    .col(timestamp_with_time_zone(Rollup::BucketStart))
                    .col(big_integer(Rollup::Count))
                    .col(double(Rollup::Sum))
                    .col(double(Rollup::Min))
                    .col(double(Rollup::Max))
                    .col(double(Rollup::Mean))
                    // Linear-interpolation percentiles (numpy's default, statistics' inclusive).
                    .col(double(Rollup::P50))
                    .col(double(Rollup::P90))
                    .col(double(Rollup::P95))
                    .col(double(Rollup::P99))
                    .col(big_integer(Rollup::Errors))
                    .col(double(Rollup::ErrorRate))
                    // When these values were last written; an identical recomputation keeps it.
                    .col(timestamp_with_time_zone(Rollup::ComputedAt))
                    .primary_key(
                        Index::create()
                            .col(Rollup::Source)
                            .col(Rollup::Name)
                            .col(Rollup::Bucket)
                            .col(Rollup::BucketStart),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Anomaly::Table)
                    .col(string(Anomaly::Source))
                    .col(string(Anomaly::Name))
                    .col(string(Anomaly::Bucket))
                    // The bucket found anomalous (the newest complete one when detected).
                    .col(timestamp_with_time_zone(Anomaly::BucketStart))
                    // The rollup column compared: count, mean, p95 or error_rate.
                    .col(string(Anomaly::Metric))
                    .col(double(Anomaly::Value))
                    // Mean and sample standard deviation of the trailing window.
                    .col(double(Anomaly::Mean))
                    .col(double(Anomaly::Stddev))
                    .col(double(Anomaly::Z))
                    .col(double(Anomaly::Threshold))
                    // Buckets in the trailing window.
                    .col(integer(Anomaly::Window))
                    .col(timestamp_with_time_zone(Anomaly::DetectedAt))
                    .primary_key(
                        Index::create()
                            .col(Anomaly::Source)
                            .col(Anomaly::Name)
                            .col(Anomaly::Bucket)
                            .col(Anomaly::BucketStart)
                            .col(Anomaly::Metric),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Forecast::Table)
                    .col(string(Forecast::Source))
                    .col(string(Forecast::Name))
                    .col(string(Forecast::Bucket))
                    .col(string(Forecast::Metric))
                    // Buckets the line was fitted on (the last K).
                    .col(integer(Forecast::Points))
                    // value ≈ intercept + slope · i, i = 0 for the oldest fitted bucket.
                    .col(double(Forecast::Slope))
                    .col(double(Forecast::Intercept))
                    // Coefficient of determination; null when the values have no variance.
                    .col(double_null(Forecast::R2))
                    // Buckets past the newest fitted one.
                    .col(integer(Forecast::Horizon))
                    .col(timestamp_with_time_zone(Forecast::LastBucket))
                    .col(timestamp_with_time_zone(Forecast::TargetAt))
                    .col(double(Forecast::Value))
                    .col(timestamp_with_time_zone(Forecast::ComputedAt))
                    .primary_key(
                        Index::create()
                            .col(Forecast::Source)
                            .col(Forecast::Name)
                            .col(Forecast::Bucket)
                            .col(Forecast::Metric),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ScoreModel::Table)
                    .col(string(ScoreModel::Name).primary_key())
                    // {"event name": weight}: events of other names do not count.
                    .col(json_binary(ScoreModel::Weights))
                    // An event's contribution halves every half_life_s seconds of age.
                    .col(double(ScoreModel::HalfLifeS))
                    // max (100 · raw / max raw) or minmax (100 · (raw − min) / (max − min)).
                    .col(string(ScoreModel::Normalization))
                    .col(timestamp_with_time_zone(ScoreModel::CreatedAt))
                    .col(timestamp_with_time_zone(ScoreModel::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Score::Table)
                    .col(string(Score::Model))
                    .col(string(Score::Subject))
                    // Σ weight · value · 2^(−age / half_life) at the run's as_of.
                    .col(double(Score::Raw))
                    // raw normalized to 0–100 over the run's subjects.
                    .col(double(Score::Score))
                    // Per event name: weight, events, contribution (the explanation).
                    .col(json_binary(Score::Components))
                    // The recompute run that wrote it.
                    .col(uuid(Score::RunId))
                    .col(timestamp_with_time_zone(Score::AsOf))
                    .primary_key(Index::create().col(Score::Model).col(Score::Subject))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("score_model_score_idx")
                    .table(Score::Table)
                    .col(Score::Model)
                    .col(Score::Score)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ScoreRun::Table)
                    // The id of the `scoring.recompute` job that planned it.
                    .col(pk_uuid(ScoreRun::Id))
                    .col(string(ScoreRun::Model))
                    // running (chunks outstanding), succeeded (all chunks done, normalized,
                    // leaderboard written) or failed.
                    .col(string(ScoreRun::Status))
                    // The instant ages are measured from: every chunk uses the same one.
                    .col(timestamp_with_time_zone(ScoreRun::AsOf))
                    .col(big_integer(ScoreRun::Subjects))
                    .col(integer(ScoreRun::Chunks))
                    .col(timestamp_with_time_zone(ScoreRun::StartedAt))
                    .col(timestamp_with_time_zone_null(ScoreRun::FinishedAt))
                    .col(text_null(ScoreRun::Error))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("score_run_model_started_idx")
                    .table(ScoreRun::Table)
                    .col(ScoreRun::Model)
                    .col(ScoreRun::StartedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ScoreChunk::Table)
                    .col(uuid(ScoreChunk::RunId))
                    .col(integer(ScoreChunk::Chunk))
                    // The chunk's subjects: first ≤ subject ≤ last, in the database's order.
                    .col(string(ScoreChunk::FirstSubject))
                    .col(string(ScoreChunk::LastSubject))
                    .col(integer(ScoreChunk::Subjects))
                    // The `scoring.chunk` job computing it.
                    .col(uuid(ScoreChunk::JobId))
                    // pending or done.
                    .col(string(ScoreChunk::Status))
                    // The worker that finished it.
                    .col(string_null(ScoreChunk::WorkerId))
                    .col(timestamp_with_time_zone_null(ScoreChunk::DoneAt))
                    .primary_key(Index::create().col(ScoreChunk::RunId).col(ScoreChunk::Chunk))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WarmUrl::Table)
                    // The HTTP warmer's name in `[[cache.warmers]]`.
                    .col(string(WarmUrl::Warmer))
                    .col(string(WarmUrl::Url))
                    // The HTTP status of the latest GET; null when it got no response.
                    .col(integer_null(WarmUrl::Status))
                    .col(double(WarmUrl::LatencyMs))
                    .col(big_integer_null(WarmUrl::Bytes))
                    .col(text_null(WarmUrl::Error))
                    .col(timestamp_with_time_zone(WarmUrl::CheckedAt))
                    .primary_key(Index::create().col(WarmUrl::Warmer).col(WarmUrl::Url))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            WarmUrl::Table.into_iden(),
            ScoreChunk::Table.into_iden(),
            ScoreRun::Table.into_iden(),
            Score::Table.into_iden(),
            ScoreModel::Table.into_iden(),
            Forecast::Table.into_iden(),
            Anomaly::Table.into_iden(),
            Rollup::Table.into_iden(),
            Event::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Event {
    Table,
    Id,
    Name,
    Subject,
    Value,
    Ts,
    Attrs,
    Error,
}

#[derive(DeriveIden)]
enum Rollup {
    Table,
    Source,
    Name,
    Bucket,
    BucketStart,
    Count,
    Sum,
    Min,
    Max,
    Mean,
    P50,
    P90,
    P95,
    P99,
    Errors,
    ErrorRate,
    ComputedAt,
}

#[derive(DeriveIden)]
enum Anomaly {
    Table,
    Source,
    Name,
    Bucket,
    BucketStart,
    Metric,
    Value,
    Mean,
    Stddev,
    Z,
    Threshold,
    Window,
    DetectedAt,
}

#[derive(DeriveIden)]
enum Forecast {
    Table,
    Source,
    Name,
    Bucket,
    Metric,
    Points,
    Slope,
    Intercept,
    R2,
    Horizon,
    LastBucket,
    TargetAt,
    Value,
    ComputedAt,
}

#[derive(DeriveIden)]
enum ScoreModel {
    Table,
    Name,
    Weights,
    HalfLifeS,
    Normalization,
    CreatedAt,
    UpdatedAt,
}

// The `score` column of table `score`.
#[allow(clippy::enum_variant_names)]
#[derive(DeriveIden)]
enum Score {
    Table,
    Model,
    Subject,
    Raw,
    Score,
    Components,
    RunId,
    AsOf,
}

#[derive(DeriveIden)]
enum ScoreRun {
    Table,
    Id,
    Model,
    Status,
    AsOf,
    Subjects,
    Chunks,
    StartedAt,
    FinishedAt,
    Error,
}

#[derive(DeriveIden)]
enum ScoreChunk {
    Table,
    RunId,
    Chunk,
    FirstSubject,
    LastSubject,
    Subjects,
    JobId,
    Status,
    WorkerId,
    DoneAt,
}

#[derive(DeriveIden)]
enum WarmUrl {
    Table,
    Warmer,
    Url,
    Status,
    LatencyMs,
    Bytes,
    Error,
    CheckedAt,
}
