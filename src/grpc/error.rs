//! The one place where failures become gRPC statuses. Field errors carry
//! `google.rpc.BadRequest` details; version conflicts carry `google.rpc.ErrorInfo`;
//! internal errors are logged with their cause and reach the client only as "internal error".

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::domain::{DomainError, Violation};
use crate::store::StoreError;

/// The error domain named in `google.rpc.ErrorInfo`.
const ERROR_DOMAIN: &str = "keys.kemon.dev";

#[derive(Debug)]
pub enum ApiError {
    Invalid(Vec<Violation>),
    Unauthenticated(String),
    PermissionDenied(String),
    NotFound,
    FailedPrecondition(String),
    VersionConflict {
        expected: u64,
        actual: u64,
    },
    OutOfRange(String),
    Unavailable(&'static str),
    /// The storage failed; nothing was written (or, for `STORAGE_OUTCOME_UNKNOWN`, maybe).
    Storage(StorageFailure),
    Internal(String),
}

/// How the storage failed, as told to a client: a code to retry on and a stable reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    Full,
    Unavailable,
    OutcomeUnknown,
}

impl StorageFailure {
    fn status(self) -> (Code, &'static str, &'static str) {
        match self {
            StorageFailure::Full => (
                Code::ResourceExhausted,
                "STORAGE_FULL",
                "the storage is full: nothing was written. Keys still verify; retry once \
                 space is freed",
            ),
            StorageFailure::Unavailable => (
                Code::Unavailable,
                "STORAGE_UNAVAILABLE",
                "the storage failed: nothing was written. Keys still verify; retry with backoff",
            ),
            StorageFailure::OutcomeUnknown => (
                Code::Unavailable,
                "STORAGE_OUTCOME_UNKNOWN",
                "the storage failed while committing and could not be read back: the change \
                 may or may not have been recorded. Read the key before retrying",
            ),
        }
    }
}

impl ApiError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
        ApiError::Invalid(vec![Violation::new(field, reason)])
    }
}

/// A caller's value quoted in an error, so they see which entry was refused. Error messages
/// are logged, so a value shaped like an API key (a secret pasted into the wrong field) is
/// not repeated, and long values are cut.
pub fn quote(value: &str) -> String {
    const MAX: usize = 64;
    if value.contains("sk_") || value.contains("pk_") {
        return "(a value that looks like an API key; not repeated)".to_owned();
    }
    let cut: String = value.chars().take(MAX).collect();
    let more = if value.chars().count() > MAX {
        "…"
    } else {
        ""
    };
    format!("`{}`{more}", cut.escape_debug())
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> ApiError {
        match e {
            DomainError::Invalid(v) => ApiError::Invalid(v),
            DomainError::NotFound => ApiError::NotFound,
            DomainError::AlreadyExists => {
                ApiError::Internal("generated key id already exists".into())
            }
            DomainError::VersionConflict { expected, actual } => {
                ApiError::VersionConflict { expected, actual }
            }
            e @ (DomainError::Revoked
            | DomainError::PublicScopesImmutable
            | DomainError::NotRevealable(_)) => ApiError::FailedPrecondition(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Domain(d) => d.into(),
            StoreError::Full(ref m)
            | StoreError::Unavailable(ref m)
            | StoreError::OutcomeUnknown(ref m) => {
                // The cause (a path, an errno) is for operators, not callers.
                tracing::warn!(cause = %m, "storage failure");
                ApiError::Storage(match e {
                    StoreError::Full(_) => StorageFailure::Full,
                    StoreError::Unavailable(_) => StorageFailure::Unavailable,
                    _ => StorageFailure::OutcomeUnknown,
                })
            }
            StoreError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Invalid(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.reason))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::NotFound => Status::not_found("key not found in this workspace"),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::VersionConflict { expected, actual } => {
                let details = ErrorDetails::with_error_info(
                    "VERSION_CONFLICT",
                    ERROR_DOMAIN,
                    [
                        ("expected_version".to_owned(), expected.to_string()),
                        ("actual_version".to_owned(), actual.to_string()),
                    ],
                );
                Status::with_error_details(
                    Code::Aborted,
                    format!(
                        "the key is at version {actual}, not the expected {expected}; read it again and retry"
                    ),
                    details,
                )
            }
            ApiError::OutOfRange(m) => Status::out_of_range(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Storage(failure) => {
                let (code, reason, message) = failure.status();
                let details = ErrorDetails::with_error_info(
                    reason,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                Status::with_error_details(code, message, details)
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quotes_never_repeat_key_shaped_values() {
        assert_eq!(quote("tickets:reed"), "`tickets:reed`");
        assert!(!quote("x sk_live_abc").contains("abc"));
        assert!(!quote("pk_test_abc").contains("abc"));
        assert_eq!(quote(&"a".repeat(100)).chars().count(), 64 + 3);
        assert_eq!(quote("a\nb"), "`a\\nb`");
    }
}
