//! Integration tests: each starts the real server on a random port with a fresh database and
//! talks to it over gRPC. The database is a SQLite file, or with `KEMON_TEST_BACKEND=postgres`
//! a schema of its own on the local PostgreSQL; the few tests about SQLite's files alone are
//! listed in `scripts/sqlite-only-tests`. One test binary, one module per feature, and three
//! shared ones: `helpers` (servers, clients, callers, the CLI runner), `inspect` (every direct
//! look at the database, on either backend) and `story` (the multi-workspace scenario).

mod audit;
mod auth;
mod concurrency;
mod envoy;
mod ext_authz;
mod group_commit;
mod helpers;
mod hostile;
mod idempotency;
mod inspect;
mod lifecycle;
mod listing;
mod logs;
mod persistence;
mod pki;
mod policy;
mod readme;
mod replicas;
mod rotation;
mod storage;
mod story;
mod surface;
mod tamper;
mod telemetry;
mod tls;
mod validation;
mod verify;
