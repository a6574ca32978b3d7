//! The `drover` binary's library half: settings, the composition of the crates into the
//! processes `drover` runs (API, worker, both in `drover dev`) and the worker's probe listener.
//! `main.rs` only parses the CLI.
#![forbid(unsafe_code)]

pub mod app;
/// `drover backup list|verify|restore|run|prune|schedules`.
pub mod backup;
pub mod bench;
pub mod config;
pub mod health;
/// `drover keys create|list|revoke`, and `drover dev`'s first admin key.
pub mod keys;
/// Logs (text or JSON) and optional OTLP trace export.
pub mod telemetry;
