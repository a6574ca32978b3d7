//! The schema crate against real databases: every test runs once on a fresh SQLite file and once
//! on a fresh Postgres database.

mod connection;
mod history;
mod migrations;
mod queries;
mod schedules;
mod support;
mod writer;
