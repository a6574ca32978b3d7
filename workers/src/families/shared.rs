//! What the analytics, scoring and cache-warming handlers share in a process.

use std::sync::Arc;

use jobs::{Catalog, Producer, cache::ReadCache};
use sea_orm::DatabaseConnection;

use super::config::{AnalyticsConfig, CacheConfig, ScoringConfig};

/// The three families' state: database, broker (chunk jobs), read-model cache, HTTP client.
pub struct Families {
    pub db: DatabaseConnection,
    pub broker: Arc<dyn Producer>,
    pub catalog: Arc<Catalog>,
    /// `None` without a cache URL: internal warmers then have nothing to warm, and finished
    /// scoring runs write no leaderboard (the API reads the database).
    pub cache: Option<ReadCache>,
    pub http: reqwest::Client,
    pub analytics: AnalyticsConfig,
    pub scoring: ScoringConfig,
    pub cache_config: CacheConfig,
    /// Recorded on the chunks this process finished (`pid-N` by default).
    pub worker_id: String,
}

impl Families {
    pub fn new(
        db: DatabaseConnection,
        broker: Arc<dyn Producer>,
        catalog: Arc<Catalog>,
        cache: Option<ReadCache>,
        analytics: AnalyticsConfig,
        scoring: ScoringConfig,
        cache_config: CacheConfig,
    ) -> Self {
        Self {
            db,
            broker,
            catalog,
            cache,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("a default HTTP client builds"),
            analytics,
            scoring,
            cache_config,
            worker_id: format!("pid-{}", std::process::id()),
        }
    }
}

pub(crate) fn families(deps: &crate::Deps) -> Result<&Families, crate::JobError> {
    deps.families
        .as_deref()
        .ok_or_else(|| crate::JobError::permanent("this worker has no analytics/scoring/cache configuration"))
}

pub(crate) fn db_error(e: schema::DbError) -> crate::JobError {
    crate::JobError::retryable(format!("database: {e}"))
}
