//! The pure core: key formats, scopes, validated values, and the key aggregate's decisions
//! and fold. No I/O, no clock, no randomness except in the explicit `generate` constructors.
//! Nothing here knows about gRPC or SQL.

pub mod api_key;
pub mod key;
pub mod scope;
pub mod values;

pub use api_key::{ApiKey, SecretHash};
pub use key::{
    Command, DomainError, Event, GracePeriod, KeyState, NewKey, Recorded, Roll, VerifyState,
    Violation, apply, decide,
};
pub use scope::{Scope, ScopeSet};
pub use values::{DomainPattern, Expiration, KeyId, KeyName, WorkspaceId};

/// Where a key was presented from, as Verify's origin tells it: the only thing kept about
/// where a key is used (never the origin itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OriginClass {
    /// No origin: a server-side call.
    None,
    /// localhost, 127.0.0.0/8 or ::1.
    Localhost,
    /// Any other origin or host (a web page, a site), parsable or not.
    Browser,
}

impl OriginClass {
    /// The class of a Verify request's `origin`.
    pub fn of(origin: &str) -> OriginClass {
        if origin.is_empty() {
            return OriginClass::None;
        }
        match values::Origin::parse(origin) {
            Some(o) if o.host().is_localhost() => OriginClass::Localhost,
            _ => OriginClass::Browser,
        }
    }

    /// The name used wherever it is written as text (the `key_usage` table).
    pub fn as_str(self) -> &'static str {
        match self {
            OriginClass::None => "none",
            OriginClass::Localhost => "localhost",
            OriginClass::Browser => "browser",
        }
    }

    pub fn parse(s: &str) -> Option<OriginClass> {
        [
            OriginClass::None,
            OriginClass::Localhost,
            OriginClass::Browser,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Private (`sk_`) or public (`pk_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    Private,
    Public,
}

/// Production or test (`…_test_…`, localhost only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Production,
    Test,
}

impl KeyType {
    /// The name used wherever a key type is written as text (the projection, exports).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Private => "private",
            KeyType::Public => "public",
        }
    }

    pub fn parse(s: &str) -> Option<KeyType> {
        [KeyType::Private, KeyType::Public]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

impl Environment {
    /// The name used wherever an environment is written as text.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Environment> {
        [Environment::Production, Environment::Test]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}
