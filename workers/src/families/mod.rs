//! The handlers of each job family. Later families (backups, cache warming, analytics,
//! scoring) live in their own modules here.

/// `backup.run`, `backup.verify`, `backup.prune`: streamed, encrypted, verified backups.
pub mod backup;
pub mod builtin;
