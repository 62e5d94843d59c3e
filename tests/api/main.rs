//! Integration tests: each starts the real server on a random port with a fresh SQLite file
//! and talks to it over gRPC. One test binary, one module per feature, and three shared ones:
//! `helpers` (servers, clients, callers, the CLI runner), `inspect` (every direct look at the
//! database) and `story` (the multi-workspace scenario).

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
mod storage;
mod story;
mod surface;
mod tamper;
mod tls;
mod validation;
mod verify;
