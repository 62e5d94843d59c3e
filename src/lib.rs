//! kemon-keys: the API key service behind Kemon workspaces.
//!
//! A guided tour, in the order data flows:
//!
//! - [`grpc`]: the tonic services. Requests become validated domain values and commands.
//! - [`domain`]: pure rules. Key formats, scopes, and `decide`/`apply` for the key aggregate.
//! - [`log`]: the log's own rules, whatever stores it: records and their hash chains, and
//!   events to and from their stored form.
//! - [`store`]: the append-only event log and the `keys` projection on SQLite, written by one
//!   group-committing writer.
//! - [`cache`]: the in-memory verification state that VerifyKey answers from.
//! - [`usage`]: last uses, from the cache to the database once a minute; rolled keys' end.
//! - [`vault`]: the master key and the encrypted copies of revealable private keys.
//! - [`audit`]: the hash chains over the log, replay, verification and export.
//! - [`clock`]: injectable time.
//! - [`reload`]: settings kept in files (certificates, policy, JWKS), re-read when they change.
//! - [`security`]: TLS, mutual TLS with an access policy, signed role assertions.
//! - [`telemetry`]: traces and metrics over OTLP, Prometheus text on the admin listener.
//! - [`app`] and [`config`]: wiring, settings, start-up and shutdown.

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms)]

pub mod app;
pub mod audit;
pub mod cache;
pub mod clock;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod log;
pub mod reload;
pub mod security;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod vault;

/// Code generated from `proto/`.
pub mod proto {
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("kemon.keys.v1");
    }

    pub mod convert;

    /// The encoded descriptors of every proto file, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kemon_keys_descriptor.bin"));
}
