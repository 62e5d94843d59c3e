//! Integration tests: each starts the real server on a random port with a fresh SQLite file
//! and talks to it over gRPC. One test binary, one module per feature.

mod audit;
mod auth;
mod concurrency;
mod group_commit;
mod helpers;
mod hostile;
mod idempotency;
mod lifecycle;
mod listing;
mod logs;
mod persistence;
mod readme;
mod storage;
mod surface;
mod tamper;
mod validation;
mod verify;
