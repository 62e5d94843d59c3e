//! The one place where failures become gRPC statuses. Every status carries a
//! `google.rpc.ErrorInfo` in [`ERROR_DOMAIN`] whose reason (AIP-193: UPPER_SNAKE, stable, one per
//! cause) tells a client what happened without reading the message; field errors also carry
//! `google.rpc.BadRequest` details. Internal errors are logged with their cause and reach the
//! client only as "internal error".
//!
//! Nothing a caller sent is put into a reason or metadata: only values the service parsed into
//! its own types (key ids, roles, sequences, versions), and the client identity a verified
//! certificate names. Caller text reaches a message only through [`quote`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::assertion::{ASSERTION_HEADER, AssertionError};
use super::auth::{CallerError, Permission, Role};
use super::policy::Surface;
use crate::domain::{DomainError, KeyId, Violation};
use crate::store::StoreError;

/// The error domain named in `google.rpc.ErrorInfo`.
pub const ERROR_DOMAIN: &str = "keys.kemon.dev";

#[derive(Debug)]
pub enum ApiError {
    /// Bad request fields, every one the request got wrong; nothing was done.
    Invalid(Vec<Violation>),
    /// The call's metadata names no usable caller.
    Unauthenticated(CallerError),
    /// The caller's role may not do what the call needs.
    PermissionDenied {
        role: Role,
        permission: Permission,
    },
    /// Under mutual TLS: the client certificate names no identity (no URI or DNS SAN).
    IdentityMissing,
    /// Under mutual TLS: the client's identity is not in the policy.
    IdentityUnknown {
        identity: String,
    },
    /// Under mutual TLS: the policy does not grant the identity the call's surface.
    SurfaceNotGranted {
        identity: String,
        surface: Surface,
    },
    /// Under mutual TLS: the policy does not let the identity act with this role.
    RoleNotGranted {
        identity: String,
        role: Role,
    },
    /// A signed role assertion was required and is missing, invalid, expired or for another
    /// workspace.
    Assertion(AssertionError),
    /// A command about one key was refused, or the key is not there. `key_id` names the key
    /// once the handler has said which one it was about (see [`ApiError::about`]).
    Key {
        refusal: KeyRefusal,
        key_id: Option<KeyId>,
    },
    /// A subscription asked to start past the end of the log.
    SequenceOutOfRange {
        after_sequence: u64,
        head_sequence: u64,
    },
    /// The key cache is still loading.
    NotReady,
    /// A replica of a shared log has not confirmed it is caught up within its bound.
    ReplicaStale {
        max_staleness_ms: u64,
    },
    /// The server is shutting down; a subscription resumes after `resume_after`.
    ShuttingDown {
        resume_after: u64,
    },
    /// The server is shutting down; a stream with no position (WatchExpiring) ends.
    Stopping,
    /// A CreateKey request id came back with a different request.
    RequestIdReused,
    /// The storage failed; nothing was written (or, for `STORAGE_OUTCOME_UNKNOWN`, maybe).
    Storage(StorageFailure),
    Internal(String),
}

/// Why a command about an existing (or missing) key was refused: the domain's refusals, typed,
/// so that each has its own reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    NotFound,
    Revoked,
    NotRevealable,
    PublicScopesImmutable,
    VersionConflict {
        expected: u64,
        actual: u64,
    },
    /// RollKey on a key rolled before.
    Rolled {
        successor: KeyId,
    },
    /// RollKey on an expired key.
    Expired,
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

    /// A refusal about the key `key_id`.
    pub fn key(refusal: KeyRefusal, key_id: KeyId) -> ApiError {
        ApiError::Key {
            refusal,
            key_id: Some(key_id),
        }
    }

    /// Names the key a refusal was about, for its metadata; other errors are unchanged.
    pub fn about(self, key: KeyId) -> ApiError {
        match self {
            ApiError::Key { refusal, .. } => ApiError::Key {
                refusal,
                key_id: Some(key),
            },
            other => other,
        }
    }
}

/// A caller's value quoted in an error, so they see which entry was refused (`tickets:reed`).
///
/// Error messages are logged (the `reason` of the call's line, see [`super::calls`]), so a
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
        let refusal = match e {
            DomainError::Invalid(v) => return ApiError::Invalid(v),
            DomainError::AlreadyExists => {
                return ApiError::Internal("generated key id already exists".into());
            }
            DomainError::NotFound => KeyRefusal::NotFound,
            DomainError::Revoked => KeyRefusal::Revoked,
            DomainError::NotRevealable => KeyRefusal::NotRevealable,
            DomainError::PublicScopesImmutable => KeyRefusal::PublicScopesImmutable,
            DomainError::VersionConflict { expected, actual } => {
                KeyRefusal::VersionConflict { expected, actual }
            }
            DomainError::AlreadyRolled { successor } => KeyRefusal::Rolled { successor },
            DomainError::Expired => KeyRefusal::Expired,
        };
        ApiError::Key {
            refusal,
            key_id: None,
        }
    }
}

/// An error and its sources, for the log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Domain(d) => d.into(),
            StoreError::Full(ref cause)
            | StoreError::Unavailable(ref cause)
            | StoreError::OutcomeUnknown(ref cause) => {
                // The cause (a path, an errno) is for operators, not callers.
                tracing::warn!(cause = %cause, "storage failure");
                ApiError::Storage(match e {
                    StoreError::Full(_) => StorageFailure::Full,
                    StoreError::Unavailable(_) => StorageFailure::Unavailable,
                    _ => StorageFailure::OutcomeUnknown,
                })
            }
            StoreError::RequestIdReused => ApiError::RequestIdReused,
            e @ (StoreError::Database(_)
            | StoreError::Corrupt(_)
            | StoreError::Invariant(_)
            | StoreError::Refused(_)) => ApiError::Internal(error_chain(&e)),
        }
    }
}

/// What a status says: its code, the ErrorInfo reason and metadata, and the message.
struct Described {
    code: Code,
    reason: &'static str,
    message: String,
    metadata: Vec<(&'static str, String)>,
}

impl Described {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Described {
        Described {
            code,
            reason,
            message: message.into(),
            metadata: Vec::new(),
        }
    }

    fn with(mut self, key: &'static str, value: impl ToString) -> Described {
        self.metadata.push((key, value.to_string()));
        self
    }
}

impl CallerError {
    fn describe(self) -> Described {
        use super::auth::{ACTOR_HEADER, MAX_ACTOR_LEN, ROLE_HEADER};
        let (reason, header, message) = match self {
            CallerError::ActorMissing => (
                "ACTOR_MISSING",
                ACTOR_HEADER,
                format!("metadata `{ACTOR_HEADER}` is required"),
            ),
            CallerError::ActorInvalid => (
                "ACTOR_INVALID",
                ACTOR_HEADER,
                format!(
                    "metadata `{ACTOR_HEADER}` must be at most {MAX_ACTOR_LEN} printable characters"
                ),
            ),
            CallerError::RoleMissing => (
                "ROLE_MISSING",
                ROLE_HEADER,
                format!("metadata `{ROLE_HEADER}` is required"),
            ),
            CallerError::RoleUnknown => (
                "ROLE_UNKNOWN",
                ROLE_HEADER,
                format!("metadata `{ROLE_HEADER}` must be owner, admin, auditor or member"),
            ),
        };
        Described::new(Code::Unauthenticated, reason, message).with("header", header)
    }
}

impl AssertionError {
    fn describe(self) -> Described {
        match self {
            AssertionError::Missing => Described::new(
                Code::Unauthenticated,
                "ASSERTION_MISSING",
                format!("this caller must send a signed role assertion in `{ASSERTION_HEADER}`"),
            )
            .with("header", ASSERTION_HEADER),
            AssertionError::Invalid(problem) => Described::new(
                Code::Unauthenticated,
                "ASSERTION_INVALID",
                format!("the role assertion is not valid ({problem})"),
            )
            .with("header", ASSERTION_HEADER)
            .with("problem", problem),
            AssertionError::Expired => Described::new(
                Code::Unauthenticated,
                "ASSERTION_EXPIRED",
                "the role assertion has expired; get a new one",
            )
            .with("header", ASSERTION_HEADER),
            AssertionError::WorkspaceMismatch => Described::new(
                Code::PermissionDenied,
                "ASSERTION_WORKSPACE_MISMATCH",
                "the role assertion is for another workspace than the request's",
            )
            .with("header", ASSERTION_HEADER),
        }
    }
}

impl KeyRefusal {
    fn describe(self) -> Described {
        match self {
            KeyRefusal::NotFound => Described::new(
                Code::NotFound,
                "KEY_NOT_FOUND",
                "key not found in this workspace",
            ),
            KeyRefusal::Revoked => Described::new(
                Code::FailedPrecondition,
                "KEY_REVOKED",
                DomainError::Revoked.to_string(),
            ),
            KeyRefusal::NotRevealable => Described::new(
                Code::FailedPrecondition,
                "KEY_NOT_REVEALABLE",
                DomainError::NotRevealable.to_string(),
            ),
            KeyRefusal::PublicScopesImmutable => Described::new(
                Code::FailedPrecondition,
                "PUBLIC_KEY_SCOPES_IMMUTABLE",
                DomainError::PublicScopesImmutable.to_string(),
            ),
            KeyRefusal::VersionConflict { expected, actual } => Described::new(
                Code::Aborted,
                "VERSION_CONFLICT",
                format!(
                    "the key is at version {actual}, not the expected {expected}; read it again \
                     and retry"
                ),
            )
            .with("expected_version", expected)
            .with("actual_version", actual),
            KeyRefusal::Rolled { successor } => Described::new(
                Code::FailedPrecondition,
                "KEY_ROLLED",
                format!(
                    "the key was rolled to {successor} already; a key can be rolled once: roll \
                     the successor instead"
                ),
            )
            .with("successor_key_id", successor),
            KeyRefusal::Expired => Described::new(
                Code::FailedPrecondition,
                "KEY_EXPIRED",
                DomainError::Expired.to_string(),
            ),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let mut details = ErrorDetails::new();
        let described = match e {
            ApiError::Invalid(violations) => {
                let violations = bounded(violations);
                let message = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                details.set_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.reason))
                        .collect::<Vec<_>>(),
                );
                Described::new(Code::InvalidArgument, "INVALID_REQUEST", message)
            }
            ApiError::Unauthenticated(e) => e.describe(),
            ApiError::PermissionDenied { role, permission } => {
                let message = match (role, permission) {
                    (Role::Auditor, _) => "auditors may read keys but not change or reveal them",
                    (_, Permission::Audit) => {
                        "the audit log needs the owner, admin or auditor role"
                    }
                    (_, Permission::ReadKeys) => {
                        "reading API keys needs the owner, admin or auditor role"
                    }
                    (_, Permission::ManageKeys) => {
                        "managing API keys needs the admin or owner role"
                    }
                };
                let allowed: Vec<&str> = permission.roles().iter().map(|r| r.as_str()).collect();
                Described::new(Code::PermissionDenied, "ROLE_NOT_PERMITTED", message)
                    .with("role", role.as_str())
                    .with("permission", permission.as_str())
                    .with("allowed_roles", allowed.join(","))
            }
            ApiError::IdentityMissing => Described::new(
                Code::Unauthenticated,
                "CLIENT_IDENTITY_MISSING",
                "the client certificate names no identity: it needs a URI SAN (a SPIFFE ID) \
                 or a DNS SAN",
            ),
            ApiError::IdentityUnknown { identity } => Described::new(
                Code::PermissionDenied,
                "IDENTITY_UNKNOWN",
                format!("the access policy does not know the client identity {identity}"),
            )
            .with("identity", identity),
            ApiError::SurfaceNotGranted { identity, surface } => Described::new(
                Code::PermissionDenied,
                "SURFACE_NOT_GRANTED",
                format!(
                    "the access policy does not grant {identity} the `{}` surface",
                    surface.as_str()
                ),
            )
            .with("identity", identity)
            .with("surface", surface.as_str()),
            ApiError::RoleNotGranted { identity, role } => Described::new(
                Code::PermissionDenied,
                "ROLE_NOT_GRANTED",
                format!(
                    "the access policy does not let {identity} act with the role `{}`",
                    role.as_str()
                ),
            )
            .with("identity", identity)
            .with("role", role.as_str()),
            ApiError::Assertion(e) => e.describe(),
            ApiError::RequestIdReused => Described::new(
                Code::AlreadyExists,
                "REQUEST_ID_REUSED",
                "request_id was used for a different CreateKey or RollKey request in this \
                 workspace; use a new request_id for a new key",
            ),
            ApiError::Key { refusal, key_id } => {
                let described = refusal.describe();
                match key_id {
                    Some(key_id) => described.with("key_id", key_id),
                    None => described,
                }
            }
            ApiError::SequenceOutOfRange {
                after_sequence,
                head_sequence,
            } => Described::new(
                Code::OutOfRange,
                "SEQUENCE_OUT_OF_RANGE",
                format!(
                    "after_sequence {after_sequence} is past the end of the log ({head_sequence})"
                ),
            )
            .with("after_sequence", after_sequence)
            .with("head_sequence", head_sequence),
            ApiError::NotReady => Described::new(
                Code::Unavailable,
                "NOT_READY",
                "starting: the key cache is still loading",
            ),
            ApiError::ReplicaStale { max_staleness_ms } => Described::new(
                Code::Unavailable,
                "REPLICA_STALE",
                format!(
                    "this replica has not confirmed within {max_staleness_ms} ms that it has \
                     applied every change to the keys; ask another replica"
                ),
            )
            .with("max_staleness_ms", max_staleness_ms),
            ApiError::ShuttingDown { resume_after } => Described::new(
                Code::Unavailable,
                "SHUTTING_DOWN",
                format!("the server is shutting down; resume after sequence {resume_after}"),
            )
            .with("resume_after_sequence", resume_after),
            ApiError::Stopping => Described::new(
                Code::Unavailable,
                "SHUTTING_DOWN",
                "the server is shutting down; call again",
            ),
            ApiError::Storage(failure) => {
                let (code, reason, message) = failure.status();
                Described::new(code, reason, message)
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Described::new(Code::Internal, "INTERNAL", "internal error")
            }
        };
        let metadata: HashMap<String, String> = described
            .metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        details.set_error_info(described.reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(described.code, described.message, details)
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

    /// One error of every kind, with the code and reason each must give.
    fn every_error() -> Vec<(ApiError, Code, &'static str)> {
        let key_id = KeyId::generate(1_000);
        let key = |refusal| ApiError::key(refusal, key_id);
        vec![
            (
                ApiError::invalid("name", "is required"),
                Code::InvalidArgument,
                "INVALID_REQUEST",
            ),
            (
                ApiError::Unauthenticated(CallerError::ActorMissing),
                Code::Unauthenticated,
                "ACTOR_MISSING",
            ),
            (
                ApiError::Unauthenticated(CallerError::ActorInvalid),
                Code::Unauthenticated,
                "ACTOR_INVALID",
            ),
            (
                ApiError::Unauthenticated(CallerError::RoleMissing),
                Code::Unauthenticated,
                "ROLE_MISSING",
            ),
            (
                ApiError::Unauthenticated(CallerError::RoleUnknown),
                Code::Unauthenticated,
                "ROLE_UNKNOWN",
            ),
            (
                ApiError::PermissionDenied {
                    role: Role::Member,
                    permission: Permission::ReadKeys,
                },
                Code::PermissionDenied,
                "ROLE_NOT_PERMITTED",
            ),
            (
                ApiError::IdentityMissing,
                Code::Unauthenticated,
                "CLIENT_IDENTITY_MISSING",
            ),
            (
                ApiError::IdentityUnknown {
                    identity: "spiffe://k/x".into(),
                },
                Code::PermissionDenied,
                "IDENTITY_UNKNOWN",
            ),
            (
                ApiError::SurfaceNotGranted {
                    identity: "spiffe://k/x".into(),
                    surface: Surface::Manage,
                },
                Code::PermissionDenied,
                "SURFACE_NOT_GRANTED",
            ),
            (
                ApiError::RoleNotGranted {
                    identity: "spiffe://k/x".into(),
                    role: Role::Owner,
                },
                Code::PermissionDenied,
                "ROLE_NOT_GRANTED",
            ),
            (
                ApiError::Assertion(AssertionError::Missing),
                Code::Unauthenticated,
                "ASSERTION_MISSING",
            ),
            (
                ApiError::Assertion(AssertionError::Invalid("signature")),
                Code::Unauthenticated,
                "ASSERTION_INVALID",
            ),
            (
                ApiError::Assertion(AssertionError::Expired),
                Code::Unauthenticated,
                "ASSERTION_EXPIRED",
            ),
            (
                ApiError::Assertion(AssertionError::WorkspaceMismatch),
                Code::PermissionDenied,
                "ASSERTION_WORKSPACE_MISMATCH",
            ),
            (key(KeyRefusal::NotFound), Code::NotFound, "KEY_NOT_FOUND"),
            (
                key(KeyRefusal::Revoked),
                Code::FailedPrecondition,
                "KEY_REVOKED",
            ),
            (
                key(KeyRefusal::NotRevealable),
                Code::FailedPrecondition,
                "KEY_NOT_REVEALABLE",
            ),
            (
                key(KeyRefusal::PublicScopesImmutable),
                Code::FailedPrecondition,
                "PUBLIC_KEY_SCOPES_IMMUTABLE",
            ),
            (
                key(KeyRefusal::VersionConflict {
                    expected: 1,
                    actual: 2,
                }),
                Code::Aborted,
                "VERSION_CONFLICT",
            ),
            (
                ApiError::SequenceOutOfRange {
                    after_sequence: 9,
                    head_sequence: 3,
                },
                Code::OutOfRange,
                "SEQUENCE_OUT_OF_RANGE",
            ),
            (ApiError::NotReady, Code::Unavailable, "NOT_READY"),
            (
                ApiError::ReplicaStale {
                    max_staleness_ms: 5000,
                },
                Code::Unavailable,
                "REPLICA_STALE",
            ),
            (
                ApiError::ShuttingDown { resume_after: 3 },
                Code::Unavailable,
                "SHUTTING_DOWN",
            ),
            (
                ApiError::Storage(StorageFailure::Full),
                Code::ResourceExhausted,
                "STORAGE_FULL",
            ),
            (
                ApiError::Storage(StorageFailure::Unavailable),
                Code::Unavailable,
                "STORAGE_UNAVAILABLE",
            ),
            (
                ApiError::Storage(StorageFailure::OutcomeUnknown),
                Code::Unavailable,
                "STORAGE_OUTCOME_UNKNOWN",
            ),
            (
                ApiError::Internal("the disk said no".into()),
                Code::Internal,
                "INTERNAL",
            ),
        ]
    }

    #[test]
    fn every_error_carries_a_stable_reason_of_its_own() {
        let mut seen = Vec::new();
        for (error, code, reason) in every_error() {
            let shown = format!("{error:?}");
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{shown}");
            let info = status
                .get_details_error_info()
                .unwrap_or_else(|| panic!("no ErrorInfo: {shown}"));
            assert_eq!(info.reason, reason, "{shown}");
            assert_eq!(info.domain, ERROR_DOMAIN, "{shown}");
            // AIP-193: UPPER_SNAKE, at most 63 characters.
            assert!(reason.len() <= 63, "{reason}");
            assert!(
                reason.starts_with(|c: char| c.is_ascii_uppercase()),
                "{reason}"
            );
            assert!(!reason.ends_with('_'), "{reason}");
            assert!(
                reason
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{reason}"
            );
            // Metadata keys as google.rpc.ErrorInfo requires them.
            for key in info.metadata.keys() {
                assert!(key.len() <= 64, "{key}");
                assert!(key.starts_with(|c: char| c.is_ascii_lowercase()), "{key}");
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{key}"
                );
            }
            assert!(!seen.contains(&reason), "{reason} twice");
            seen.push(reason);
        }
    }

    #[test]
    fn refusals_about_a_key_name_it() {
        let key_id = KeyId::generate(1_000);
        let status = Status::from(
            ApiError::from(DomainError::VersionConflict {
                expected: 2,
                actual: 5,
            })
            .about(key_id),
        );
        let metadata = status.get_details_error_info().unwrap().metadata;
        assert_eq!(metadata["key_id"], key_id.to_string());
        assert_eq!(metadata["expected_version"], "2");
        assert_eq!(metadata["actual_version"], "5");

        // `about` leaves errors that are not about a key alone.
        let status = Status::from(ApiError::NotReady.about(key_id));
        assert!(status.get_details_error_info().unwrap().metadata.is_empty());
    }

    #[test]
    fn an_internal_error_tells_the_client_nothing_of_its_cause() {
        let status = Status::from(ApiError::Internal("/var/lib/kemon: EIO".into()));
        assert_eq!(status.message(), "internal error");
        assert!(status.get_details_error_info().unwrap().metadata.is_empty());
        let details = String::from_utf8_lossy(status.details()).into_owned();
        assert!(!details.contains("EIO"), "{details}");
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
