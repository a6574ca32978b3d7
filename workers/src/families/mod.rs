//! The handlers of each job family. Later families (backups, cache warming, analytics,
//! scoring) live in their own modules here.

pub mod builtin;
