//! End-to-end tests: the composed drover against real Redis, RabbitMQ, Postgres and SQLite.
//! Each test owns its database and broker namespace, so they run in parallel.

mod lifecycle;
mod process;
mod support;
