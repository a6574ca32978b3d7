//! The API against a real Redis broker (127.0.0.1:6379, a unique key prefix per test) and a
//! temporary SQLite history database, through `poem::test::TestClient`.

mod support;

mod auth;
mod dashboard;
mod dead;
mod families;
mod health;
mod jobs;
mod queues;
mod schedules;
