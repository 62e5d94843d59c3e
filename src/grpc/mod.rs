//! The gRPC surface: translates requests into domain values and commands, calls the store or
//! the cache, and maps results back. No business rule lives here beyond parsing. What every
//! call goes through, whatever its handler (its span and log line, readiness), is one layer on
//! the server: [`calls`].

pub mod assertion;
pub mod audit;
pub mod auth;
pub mod calls;
pub mod connections;
pub mod error;
pub mod ext_authz;
pub mod keys;
pub mod paging;
pub mod policy;
pub mod tls;

pub use audit::AuditApi;
pub use keys::KeyApi;

use crate::domain::Violation;

pub(crate) use crate::proto::convert::timestamp;

/// Records the key id on the current call's span, and so on its line and, when the call is
/// traced, as `kemon.key_id` (see [`calls`]).
fn record_key_id(key_id: impl std::fmt::Display) {
    let span = tracing::Span::current();
    span.record("key_id", tracing::field::display(&key_id));
    span.record("kemon.key_id", tracing::field::display(&key_id));
}

/// Records the workspace id (once parsed: never a value as sent) on the current call's span,
/// as [`record_key_id`] does.
fn record_workspace_id(workspace_id: impl std::fmt::Display) {
    let span = tracing::Span::current();
    span.record("workspace_id", tracing::field::display(&workspace_id));
    span.record("kemon.workspace_id", tracing::field::display(&workspace_id));
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
