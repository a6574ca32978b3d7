//! The `drover` binary's library half: settings and the composition of the crates into the
//! processes `drover` runs (API, worker, both in `drover dev`). `main.rs` only parses the CLI.
#![forbid(unsafe_code)]

pub mod app;
pub mod bench;
pub mod config;
