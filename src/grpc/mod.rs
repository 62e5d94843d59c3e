//! The gRPC surface: translates requests into domain values and commands, calls the store or
//! the cache, and maps results back. No business rule lives here beyond parsing.

pub mod auth;
pub mod error;
mod keys;

pub use keys::KeyApi;

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use error::ApiError;

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

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}
