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
    /// A CreateKey request id came back with a different request.
    RequestIdReused,
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

/// A caller's value quoted in an error, so they see which entry was refused (`tickets:reed`).
///
/// Error messages are logged (the `reason` of the call's line, see `grpc::observe_in`), so a
/// secret pasted into the wrong field must not be repeated. A key is `sk_`/`pk_` [+ `test_`]
/// then 38 base62 characters with nothing between them, pasted whole, cut, or without its
/// prefix. So a value containing `sk_` or `pk_`, or a run of more than
/// [`MAX_QUOTED_ALNUM_RUN`] ASCII letters and digits, is not repeated at all. Other values are
/// cut at 64 characters.
pub fn quote(value: &str) -> String {
    const MAX: usize = 64;
    if value.contains("sk_")
        || value.contains("pk_")
        || longest_alnum_run(value) > MAX_QUOTED_ALNUM_RUN
    {
        return NOT_REPEATED.to_owned();
    }
    let cut: String = value.chars().take(MAX).collect();
    let more = if value.chars().count() > MAX {
        "…"
    } else {
        ""
    };
    format!("`{}`{more}", cut.escape_debug())
}

/// What [`quote`] says instead of a value it does not repeat.
const NOT_REPEATED: &str = "(a value that could hold part of an API key; not repeated)";

/// The longest run of ASCII letters and digits [`quote`] repeats: 11 base62 characters are
/// under 66 of a key's 190 random bits. Scope names are words of at most 8 letters; a longer
/// word (`KeyScopesChanged`, a long host label) is not repeated, but its reason still says what
/// is accepted (the known event types, the host name rules).
const MAX_QUOTED_ALNUM_RUN: usize = 11;

fn longest_alnum_run(value: &str) -> usize {
    value
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Most violations an INVALID_ARGUMENT lists for one field; the rest are counted in one more
/// violation. Field names come from the code and every reason is short (values go through
/// [`quote`]), so with this bound no message or BadRequest detail grows with the request.
const MAX_VIOLATIONS_PER_FIELD: usize = 3;

/// `violations` with at most [`MAX_VIOLATIONS_PER_FIELD`] per field, in their order, and one
/// "and N more" per field that had more.
fn bounded(violations: Vec<Violation>) -> Vec<Violation> {
    let mut kept: Vec<Violation> = Vec::new();
    let mut unlisted: Vec<(String, usize)> = Vec::new();
    for v in violations {
        if kept.iter().filter(|k| k.field == v.field).count() < MAX_VIOLATIONS_PER_FIELD {
            kept.push(v);
        } else if let Some((_, n)) = unlisted.iter_mut().find(|(f, _)| *f == v.field) {
            *n += 1;
        } else {
            unlisted.push((v.field, 1));
        }
    }
    kept.extend(
        unlisted
            .into_iter()
            .map(|(field, n)| Violation::new(field, format!("and {n} more, not listed"))),
    );
    kept
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
            StoreError::RequestIdReused => ApiError::RequestIdReused,
            StoreError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Invalid(violations) => {
                let violations = bounded(violations);
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
            ApiError::RequestIdReused => Status::with_error_details(
                Code::AlreadyExists,
                "request_id was used for a different CreateKey request in this workspace; \
                 use a new request_id for a new key",
                ErrorDetails::with_error_info(
                    "REQUEST_ID_REUSED",
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            ),
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
    use super::*;
    use crate::domain::{ApiKey, Environment, KeyType};

    /// A fresh key string and its body (random part and checksum, without the prefix).
    fn key(key_type: KeyType, environment: Environment) -> (String, String) {
        let secret = ApiKey::generate(key_type, environment).expose().to_owned();
        let body = secret.rsplit('_').next().unwrap().to_owned();
        (secret, body)
    }

    #[test]
    fn ordinary_values_and_typos_are_quoted() {
        assert_eq!(quote("tickets:reed"), "`tickets:reed`");
        assert_eq!(quote("tickets:writee"), "`tickets:writee`");
        assert_eq!(quote("KeyDeleted"), "`KeyDeleted`");
        assert_eq!(quote("https://a.example.com"), "`https://a.example.com`");
        assert_eq!(quote(""), "``");
        assert_eq!(quote("a\nb"), "`a\\nb`");
        // A run of 11 letters and digits is still shown; 12 is not.
        assert_eq!(quote("x:abcdefghijk"), "`x:abcdefghijk`");
        assert_eq!(quote("x:abcdefghijkl"), NOT_REPEATED);
        // Only ASCII letters and digits count toward a run: keys have no others.
        assert_eq!(quote("équipe-équipe"), "`équipe-équipe`");
    }

    #[test]
    fn long_values_are_cut() {
        let long = "ab-".repeat(40);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().count(), 64 + 3);
        assert!(quoted.ends_with("`…"), "{quoted}");
    }

    #[test]
    fn no_part_of_a_key_is_ever_repeated() {
        for (key_type, environment) in [
            (KeyType::Private, Environment::Production),
            (KeyType::Private, Environment::Test),
            (KeyType::Public, Environment::Production),
        ] {
            let (secret, body) = key(key_type, environment);
            let random = &body[..32];
            for value in [
                secret.clone(),
                format!("x {secret}"),
                body.clone(),
                random.to_owned(),
                format!("{random}:read"),
                format!("tickets:{random}"),
                format!("  {body}\n"),
                body[..12].to_owned(),
                body[20..].to_owned(),
            ] {
                assert_eq!(quote(&value), NOT_REPEATED, "{value}");
            }
        }
        assert_eq!(quote("x sk_live_abc"), NOT_REPEATED);
        assert_eq!(quote("pk_test_abc"), NOT_REPEATED);
    }

    fn violations(fields: &[(&str, usize)]) -> Vec<Violation> {
        fields
            .iter()
            .flat_map(|&(field, n)| (0..n).map(move |i| Violation::new(field, format!("bad {i}"))))
            .collect()
    }

    #[test]
    fn each_field_lists_a_few_violations_and_counts_the_rest() {
        let got = bounded(violations(&[
            ("scopes", 10),
            ("name", 1),
            ("allowed_domains", 4),
        ]));
        let got: Vec<(&str, &str)> = got
            .iter()
            .map(|v| (v.field.as_str(), v.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("scopes", "bad 0"),
                ("scopes", "bad 1"),
                ("scopes", "bad 2"),
                ("name", "bad 0"),
                ("allowed_domains", "bad 0"),
                ("allowed_domains", "bad 1"),
                ("allowed_domains", "bad 2"),
                ("scopes", "and 7 more, not listed"),
                ("allowed_domains", "and 1 more, not listed"),
            ]
        );
        let few = violations(&[("scopes", 3), ("name", 1)]);
        assert_eq!(bounded(few.clone()), few);
    }

    #[test]
    fn an_invalid_argument_stays_small_whatever_the_number_of_violations() {
        let status = Status::from(ApiError::Invalid(violations(&[("scopes", 100_000)])));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() < 200, "{}", status.message());
        assert!(status.details().len() < 512, "{}", status.details().len());
        let listed = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(listed.len(), MAX_VIOLATIONS_PER_FIELD + 1);
    }
}
