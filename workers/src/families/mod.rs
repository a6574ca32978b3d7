//! The handlers of each job family. Later families (backups, cache warming, analytics,
//! scoring) live in their own modules here.

/// `analytics.rollup`, `analytics.anomalies`, `analytics.forecast`.
pub mod analytics;
/// `backup.run`, `backup.verify`, `backup.prune`: streamed, encrypted, verified backups.
pub mod backup;
pub mod builtin;
/// `cache.warm`: internal read-model warmers and HTTP warmers.
pub mod cache_warm;
/// The `[analytics]`, `[scoring]` and `[cache]` configuration tables.
pub mod config;
/// `scoring.recompute`, `scoring.chunk`: fanned-out recompute runs.
pub mod scoring;
mod shared;

pub use shared::Families;
