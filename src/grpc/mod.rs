//! The gRPC surface: translates requests into domain values and commands, calls the store or
//! the cache, and maps results back. No business rule lives here beyond parsing.

pub mod audit;
pub mod auth;
pub mod error;
pub mod keys;

pub use audit::AuditApi;
pub use keys::KeyApi;

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use error::ApiError;

pub(crate) use crate::store::codec::timestamp;

/// Runs one call inside a span and logs one structured line for it: method, gRPC code,
/// latency and, where the handler recorded one, the key id. Secrets are never recorded.
async fn observe<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method, key_id = tracing::field::Empty);
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _entered = span.enter();
    match result {
        Ok(value) => {
            tracing::info!(code = "OK", latency_us, "call");
            Ok(Response::new(value))
        }
        Err(e) => {
            let status = Status::from(e);
            tracing::info!(code = ?status.code(), latency_us, reason = status.message(), "call");
            Err(status)
        }
    }
}

/// Records the key id on the current call's log line.
fn record_key_id(key_id: impl std::fmt::Display) {
    tracing::Span::current().record("key_id", tracing::field::display(key_id));
}
