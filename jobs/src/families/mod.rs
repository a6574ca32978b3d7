//! The job families' kinds: one module per family with its payload types, queue, retry policy
//! and timeout. [`crate::catalog`] gathers them.

/// `analytics.rollup`, `analytics.anomalies`, `analytics.forecast` on queue `analytics`.
pub mod analytics;
/// `backup.run`, `backup.verify`, `backup.prune` on queue `backups`.
pub mod backup;
/// `cache.warm` on queue `cache-warm`.
pub mod cache_warm;
/// `scoring.recompute`, `scoring.chunk` on queue `scoring`.
pub mod scoring;
