//! The gRPC surface: translates requests into domain values and commands, calls the store or
//! the cache, and maps results back. No business rule lives here beyond parsing.

pub mod audit;
pub mod auth;
pub mod connections;
pub mod error;
pub mod keys;
pub mod paging;

pub use audit::AuditApi;
pub use keys::KeyApi;

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::domain::Violation;
use error::ApiError;

pub(crate) use crate::proto::convert::timestamp;

/// Runs one call inside a span and logs one structured line for it: method, gRPC code,
/// latency and, where the handler recorded one, the key id. Secrets are never recorded.
async fn observe<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method, key_id = tracing::field::Empty);
    observe_in(span, false, call).await
}

/// [`observe`] for VerifyKey, which every request of every user's service goes through: its
/// span and line are at DEBUG, so that the default `info` filter does not write (and pay for)
/// a line per verified request. `RUST_LOG=info,kemon_keys=debug` shows them.
async fn observe_hot<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::debug_span!(
        "rpc",
        method,
        key_id = tracing::field::Empty,
        verify_code = tracing::field::Empty
    );
    observe_in(span, true, call).await
}

/// The call's line names its outcome; for a refused call, `reason` is the status message. That
/// message is built from violations whose values went through [`error::quote`], so a secret
/// pasted into a request field reaches neither the caller's error nor this log.
async fn observe_in<T>(
    span: tracing::Span,
    hot: bool,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _entered = span.enter();
    let (code, reason, result) = match result {
        Ok(value) => (tonic::Code::Ok, String::new(), Ok(Response::new(value))),
        Err(e) => {
            let status = Status::from(e);
            (status.code(), status.message().to_owned(), Err(status))
        }
    };
    if hot {
        tracing::debug!(code = ?code, latency_us, reason, "call");
    } else {
        tracing::info!(code = ?code, latency_us, reason, "call");
    }
    result
}

/// Records the key id on the current call's log line.
fn record_key_id(key_id: impl std::fmt::Display) {
    tracing::Span::current().record("key_id", tracing::field::display(key_id));
}

/// Whether a repeated request field is within its cap; if not, records a violation naming the
/// cap. Checked before any entry is looked at, so neither the work done for a request nor the
/// error it gets grows with the number of entries sent.
fn within_cap<T>(field: &str, entries: &[T], cap: usize, violations: &mut Vec<Violation>) -> bool {
    if entries.len() <= cap {
        return true;
    }
    violations.push(Violation::new(
        field,
        format!("at most {cap} entries (got {})", entries.len()),
    ));
    false
}
