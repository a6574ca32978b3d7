//! The job families' kinds: one module per family with its payload types, queue, retry policy
//! and timeout. [`crate::catalog`] gathers them.

/// `backup.run`, `backup.verify`, `backup.prune` on queue `backups`.
pub mod backup;
