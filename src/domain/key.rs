//! The key aggregate: `decide` turns a command and the current state into events, `apply`
//! folds an event into the state. Both are pure; the store, the projection, the cache and
//! any replay use this one `apply`, so they cannot disagree.

use super::{
    DomainPattern, Environment, Expiration, KeyId, KeyName, KeyType, ScopeSet, SecretHash,
    WorkspaceId,
};

/// The current state of one key: the fold of its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub key_id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: KeyName,
    pub key_type: KeyType,
    pub environment: Environment,
    /// Empty when `full_access`.
    pub scopes: ScopeSet,
    pub full_access: bool,
    pub secret_hash: SecretHash,
    pub masked: String,
    /// The key string of a public key; `None` for private keys.
    pub public_key: Option<String>,
    pub allowed_domains: Vec<DomainPattern>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    /// An encrypted copy was stored at creation.
    pub reveal_later: bool,
    /// The key's version: 1 at creation, +1 for every change (rename, scope change,
    /// revocation). What `expected_version` is compared with. Reveals do not change it.
    pub version: u64,
    /// The stream version of the last event folded (every event counts, reveals too).
    pub stream_version: u64,
    /// When the secret was last revealed, if ever.
    pub last_revealed_at_ms: Option<i64>,
    pub created_by: String,
    pub updated_at_ms: i64,
    /// The key this one replaced (it was created by a roll).
    pub rolled_from: Option<KeyId>,
    /// The successor this key was rolled to; its `expires_at_ms` is then the grace period's end.
    pub rolled_to: Option<KeyId>,
}

impl KeyState {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Whether RevealKey may return the secret now.
    pub fn revealable(&self) -> bool {
        !self.is_revoked() && (self.key_type == KeyType::Public || self.reveal_later)
    }

    /// What verification needs of this state.
    pub fn verify_state(&self) -> VerifyState<'_> {
        VerifyState {
            key_id: self.key_id,
            workspace_id: self.workspace_id.as_str(),
            key_type: self.key_type,
            environment: self.environment,
            scopes: self.scopes,
            full_access: self.full_access,
            secret_hash: self.secret_hash,
            expires_at_ms: self.expires_at_ms,
            revoked: self.is_revoked(),
            allowed_domains: self.allowed_domains.clone().into_boxed_slice(),
            version: self.version,
            rolled_to: self.rolled_to,
        }
    }
}

/// What verification needs of a key's state, and the hash its string is found by: what the
/// verification cache holds of it. The workspace id is borrowed, so that loading the cache
/// builds these straight from the rows it reads, without a whole [`KeyState`] each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyState<'a> {
    pub key_id: KeyId,
    /// Validated as a [`WorkspaceId`].
    pub workspace_id: &'a str,
    pub key_type: KeyType,
    pub environment: Environment,
    pub scopes: ScopeSet,
    pub full_access: bool,
    pub secret_hash: SecretHash,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
    pub allowed_domains: Box<[DomainPattern]>,
    pub version: u64,
    /// The successor it was rolled to: its `expires_at_ms` is then the grace period's end.
    pub rolled_to: Option<KeyId>,
}

/// Everything KeyCreated records. Built only by [`NewKey::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub key_id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: KeyName,
    pub key_type: KeyType,
    pub environment: Environment,
    pub scopes: ScopeSet,
    pub full_access: bool,
    pub secret_hash: SecretHash,
    pub masked: String,
    pub public_key: Option<String>,
    pub allowed_domains: Vec<DomainPattern>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub reveal_later: bool,
    /// Set when the key is the successor of a roll: the key it replaces.
    pub rolled_from: Option<KeyId>,
}

/// What a caller asks for when creating a key, already parsed field by field.
pub struct NewKeyRequest {
    pub key_id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: KeyName,
    pub key_type: KeyType,
    pub environment: Environment,
    pub expiration: Expiration,
    pub scopes: ScopeSet,
    pub reveal_later: bool,
    pub allowed_domains: Vec<DomainPattern>,
    pub secret_hash: SecretHash,
    pub masked: String,
    /// The key string, kept only for public keys.
    pub public_key: Option<String>,
}

/// A bad field: its name as in the API, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub reason: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Violation {
        Violation {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The parts of a new key that the rules tying fields together look at. A part the request
/// got wrong is `None`: the rules about it are skipped, so that a bad field is reported once,
/// for what is wrong with it, and not again as, say, a missing scope.
#[derive(Debug, Clone, Copy)]
pub struct KeyShape<'a> {
    pub key_type: KeyType,
    pub environment: Option<Environment>,
    pub scopes: Option<ScopeSet>,
    pub reveal_later: bool,
    pub allowed_domains: Option<&'a [DomainPattern]>,
}

impl KeyShape<'_> {
    /// What public, private and test keys may hold: every rule this shape breaks.
    pub fn violations(&self) -> Vec<Violation> {
        let mut violations = Vec::new();
        match self.key_type {
            KeyType::Public => {
                if let Some(scopes) = self.scopes {
                    if scopes.is_empty() {
                        violations.push(Violation::new(
                            "scopes",
                            "public keys need at least one read scope",
                        ));
                    }
                    for scope in scopes.writes() {
                        violations.push(Violation::new(
                            "scopes",
                            format!(
                                "public keys may hold read scopes only; `{scope}` is a write scope"
                            ),
                        ));
                    }
                }
                if self.reveal_later {
                    violations.push(Violation::new(
                        "reveal_later",
                        "public keys are not secret and can always be shown; \
                         reveal_later is for private keys",
                    ));
                }
                match (self.environment, self.allowed_domains) {
                    (Some(Environment::Production), Some([])) => {
                        violations.push(Violation::new(
                            "allowed_domains",
                            "production public keys need at least one allowed domain",
                        ));
                    }
                    (Some(Environment::Test), Some([_, ..])) => {
                        violations.push(Violation::new(
                            "allowed_domains",
                            "test keys work only from localhost and take no allowed domains",
                        ));
                    }
                    _ => {}
                }
            }
            KeyType::Private => {
                if let Some([_, ..]) = self.allowed_domains {
                    violations.push(Violation::new(
                        "allowed_domains",
                        "only public keys are restricted to domains",
                    ));
                }
            }
        }
        violations
    }
}

impl NewKeyRequest {
    /// Checks the rules that tie fields together (see [`KeyShape`]) and builds the key.
    pub fn validate(self, now_ms: i64) -> Result<NewKey, DomainError> {
        let violations = KeyShape {
            key_type: self.key_type,
            environment: Some(self.environment),
            scopes: Some(self.scopes),
            reveal_later: self.reveal_later,
            allowed_domains: Some(&self.allowed_domains),
        }
        .violations();
        if !violations.is_empty() {
            return Err(DomainError::Invalid(violations));
        }
        let full_access = self.key_type == KeyType::Private && self.scopes.is_empty();
        Ok(NewKey {
            key_id: self.key_id,
            workspace_id: self.workspace_id,
            name: self.name,
            key_type: self.key_type,
            environment: self.environment,
            scopes: self.scopes,
            full_access,
            secret_hash: self.secret_hash,
            masked: self.masked,
            public_key: self.public_key,
            allowed_domains: self.allowed_domains,
            created_at_ms: now_ms,
            expires_at_ms: self.expiration.expires_at(now_ms),
            reveal_later: self.reveal_later,
            rolled_from: None,
        })
    }
}

/// How long a rolled key keeps working beside its successor: 0 (it stops at once) to
/// [`GracePeriod::MAX_MS`]. Built only by [`GracePeriod::from_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracePeriod(i64);

impl GracePeriod {
    /// Seven days: long enough to redeploy every integration, short enough that a leaked key
    /// being rotated away does not linger.
    pub const MAX_MS: i64 = 7 * 86_400_000;

    pub fn from_ms(ms: i64) -> Result<GracePeriod, String> {
        if (0..=GracePeriod::MAX_MS).contains(&ms) {
            Ok(GracePeriod(ms))
        } else {
            Err("must be from 0 (the old key stops at once) to 7 days".into())
        }
    }

    pub fn as_ms(self) -> i64 {
        self.0
    }
}

/// A roll: the successor's generated parts, and how long the old key keeps working. The
/// rest of the successor is copied from the old key by [`Roll::successor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roll {
    pub successor_key_id: KeyId,
    pub secret_hash: SecretHash,
    pub masked: String,
    /// The successor's key string, for public keys only.
    pub public_key: Option<String>,
    pub grace: GracePeriod,
    /// The roll's time: the successor's creation and the start of the grace period.
    pub now_ms: i64,
    pub expected_version: Option<u64>,
}

impl Roll {
    /// The successor of `old`: the same name, type, environment, grants, allowed domains,
    /// reveal_later and lifetime (`expires_at - created_at`, or never), created now.
    pub fn successor(&self, old: &KeyState) -> NewKey {
        NewKey {
            key_id: self.successor_key_id,
            workspace_id: old.workspace_id.clone(),
            name: old.name.clone(),
            key_type: old.key_type,
            environment: old.environment,
            scopes: old.scopes,
            full_access: old.full_access,
            secret_hash: self.secret_hash,
            masked: self.masked.clone(),
            public_key: self.public_key.clone(),
            allowed_domains: old.allowed_domains.clone(),
            created_at_ms: self.now_ms,
            expires_at_ms: old.expires_at_ms.map(|at| {
                self.now_ms
                    .saturating_add(at.saturating_sub(old.created_at_ms))
            }),
            reveal_later: old.reveal_later,
            rolled_from: Some(old.key_id),
        }
    }

    /// When the old key stops: the end of the grace period, or its own earlier expiry.
    pub fn old_key_expires_at(&self, old: &KeyState) -> i64 {
        let end = self.now_ms.saturating_add(self.grace.as_ms());
        old.expires_at_ms.map_or(end, |at| at.min(end))
    }
}

/// A change asked of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create(Box<NewKey>),
    Rename {
        name: KeyName,
        expected_version: Option<u64>,
    },
    UpdateScopes {
        scopes: ScopeSet,
        expected_version: Option<u64>,
    },
    Revoke {
        expected_version: Option<u64>,
    },
    /// Record that the secret is being revealed to the actor. Decided like a change so that
    /// the audit event is durable before the secret leaves the service.
    Reveal,
    /// Replace the key with a successor; the key keeps working for the grace period. Decided
    /// on the old key's stream (KeyRolled); the store also records the successor's
    /// KeyCreated, built by [`Roll::successor`], in the same commit.
    Roll(Box<Roll>),
}

/// What happened to a key. Stored, never changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    KeyCreated(Box<NewKey>),
    KeyRenamed {
        name: KeyName,
    },
    KeyScopesChanged {
        scopes: ScopeSet,
    },
    KeyRevoked,
    /// The secret was revealed (to the event's actor). Changes nothing but the record.
    KeyRevealed,
    /// The key was replaced by `successor`; it stops working at `expires_at_ms`.
    KeyRolled {
        successor: KeyId,
        grace: GracePeriod,
        expires_at_ms: i64,
    },
}

impl Event {
    /// Every event type name, as stored in `event_type`.
    pub const TYPE_NAMES: [&'static str; 6] = [
        "KeyCreated",
        "KeyRenamed",
        "KeyScopesChanged",
        "KeyRevoked",
        "KeyRevealed",
        "KeyRolled",
    ];

    /// The name stored in the log's `event_type` column.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::KeyCreated(_) => "KeyCreated",
            Event::KeyRenamed { .. } => "KeyRenamed",
            Event::KeyScopesChanged { .. } => "KeyScopesChanged",
            Event::KeyRevoked => "KeyRevoked",
            Event::KeyRevealed => "KeyRevealed",
            Event::KeyRolled { .. } => "KeyRolled",
        }
    }
}

/// An event as the log holds it: who recorded it, when, at which stream version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub event: Event,
    pub actor: String,
    pub recorded_at_ms: i64,
    pub stream_version: u64,
}

/// Why a command was refused. Each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("invalid request")]
    Invalid(Vec<Violation>),
    #[error("key not found")]
    NotFound,
    #[error("key already exists")]
    AlreadyExists,
    #[error("the key is revoked; revoked keys cannot be changed or revealed")]
    Revoked,
    #[error("the key is at version {actual}, not the expected {expected}")]
    VersionConflict { expected: u64, actual: u64 },
    #[error("the scopes of public keys cannot be edited; create a new key instead")]
    PublicScopesImmutable,
    #[error(
        "the key was created without reveal_later, so no copy of it is kept; revoke it and \
         create a new one if it is lost"
    )]
    NotRevealable,
    #[error("the key was rolled to {successor} already; a key can be rolled once")]
    AlreadyRolled { successor: KeyId },
    #[error("the key has expired; create a new key instead")]
    Expired,
}

/// Decides what a command does to a key. `state` is `None` for a key with no events yet.
/// An empty result means the command changes nothing (a repeated revoke, a rename to the
/// current name): nothing is appended.
pub fn decide(state: Option<&KeyState>, command: &Command) -> Result<Vec<Event>, DomainError> {
    let state = match (state, command) {
        (None, Command::Create(new)) => return Ok(vec![Event::KeyCreated(new.clone())]),
        (Some(_), Command::Create(_)) => return Err(DomainError::AlreadyExists),
        (None, _) => return Err(DomainError::NotFound),
        (Some(state), _) => state,
    };
    // A repeated revoke is answered before the version check, so that a retry carrying the
    // version it saw before its first attempt still succeeds.
    if let (Command::Revoke { .. }, true) = (command, state.is_revoked()) {
        return Ok(vec![]);
    }
    if state.is_revoked() {
        return Err(DomainError::Revoked);
    }
    // Said before the version check: a retry of a roll that landed (without a request id)
    // learns that the key was rolled, not merely that its version moved.
    if let Command::Roll(roll) = command {
        if let Some(successor) = state.rolled_to {
            return Err(DomainError::AlreadyRolled { successor });
        }
        if state.is_expired(roll.now_ms) {
            return Err(DomainError::Expired);
        }
    }
    let expected = match command {
        Command::Rename {
            expected_version, ..
        }
        | Command::UpdateScopes {
            expected_version, ..
        }
        | Command::Revoke { expected_version } => *expected_version,
        Command::Roll(roll) => roll.expected_version,
        Command::Create(_) | Command::Reveal => None,
    };
    if let Some(expected) = expected.filter(|&e| e != state.version) {
        return Err(DomainError::VersionConflict {
            expected,
            actual: state.version,
        });
    }
    match command {
        Command::Create(_) => unreachable!("handled above"),
        Command::Rename { name, .. } if *name == state.name => Ok(vec![]),
        Command::Rename { name, .. } => Ok(vec![Event::KeyRenamed { name: name.clone() }]),
        Command::UpdateScopes { .. } if state.key_type == KeyType::Public => {
            Err(DomainError::PublicScopesImmutable)
        }
        Command::UpdateScopes { scopes, .. } if scopes.is_empty() => Err(DomainError::Invalid(
            vec![Violation::new("scopes", "at least one scope is required")],
        )),
        Command::UpdateScopes { scopes, .. } if *scopes == state.scopes && !state.full_access => {
            Ok(vec![])
        }
        Command::UpdateScopes { scopes, .. } => {
            Ok(vec![Event::KeyScopesChanged { scopes: *scopes }])
        }
        Command::Revoke { .. } => Ok(vec![Event::KeyRevoked]),
        Command::Reveal if state.key_type == KeyType::Private && !state.reveal_later => {
            Err(DomainError::NotRevealable)
        }
        Command::Reveal => Ok(vec![Event::KeyRevealed]),
        Command::Roll(roll) => Ok(vec![Event::KeyRolled {
            successor: roll.successor_key_id,
            grace: roll.grace,
            expires_at_ms: roll.old_key_expires_at(state),
        }]),
    }
}

/// Folds one recorded event into a key's state. Events come from the log in stream order;
/// an event that cannot follow the state (a second KeyCreated, a change before creation) is
/// a corrupt log, reported as an error rather than guessed around.
pub fn apply(state: Option<KeyState>, recorded: &Recorded) -> Result<KeyState, String> {
    let at = recorded.recorded_at_ms;
    let expected_version = state.as_ref().map_or(1, |s| s.stream_version + 1);
    if recorded.stream_version != expected_version {
        return Err(format!(
            "stream version {} where {expected_version} was expected",
            recorded.stream_version
        ));
    }
    let mut state = match (state, &recorded.event) {
        (None, Event::KeyCreated(new)) => {
            let new = new.as_ref().clone();
            return Ok(KeyState {
                key_id: new.key_id,
                workspace_id: new.workspace_id,
                name: new.name,
                key_type: new.key_type,
                environment: new.environment,
                scopes: new.scopes,
                full_access: new.full_access,
                secret_hash: new.secret_hash,
                masked: new.masked,
                public_key: new.public_key,
                allowed_domains: new.allowed_domains,
                created_at_ms: new.created_at_ms,
                expires_at_ms: new.expires_at_ms,
                revoked_at_ms: None,
                reveal_later: new.reveal_later,
                version: 1,
                stream_version: 1,
                last_revealed_at_ms: None,
                created_by: recorded.actor.clone(),
                // The creation instant the key's expiry was computed from.
                updated_at_ms: new.created_at_ms,
                rolled_from: new.rolled_from,
                rolled_to: None,
            });
        }
        (Some(_), Event::KeyCreated(_)) => return Err("KeyCreated on an existing key".into()),
        (None, event) => return Err(format!("{} before KeyCreated", event.type_name())),
        (Some(state), _) if state.is_revoked() => {
            return Err(format!("{} after KeyRevoked", recorded.event.type_name()));
        }
        (Some(state), Event::KeyRolled { .. }) if state.rolled_to.is_some() => {
            return Err("KeyRolled on a key rolled before".into());
        }
        (Some(state), _) => state,
    };
    match &recorded.event {
        Event::KeyCreated(_) => unreachable!("handled above"),
        Event::KeyRenamed { name } => state.name = name.clone(),
        Event::KeyScopesChanged { scopes } => {
            state.scopes = *scopes;
            state.full_access = false;
        }
        Event::KeyRevoked => state.revoked_at_ms = Some(at),
        Event::KeyRolled {
            successor,
            expires_at_ms,
            ..
        } => {
            state.rolled_to = Some(*successor);
            state.expires_at_ms = Some(*expires_at_ms);
        }
        Event::KeyRevealed => {
            state.stream_version += 1;
            state.last_revealed_at_ms = Some(at);
            return Ok(state);
        }
    }
    state.version += 1;
    state.stream_version += 1;
    state.updated_at_ms = at;
    Ok(state)
}

#[cfg(test)]
mod tests {
    //! Given these events, when this command, then these events or this error.
    use super::*;
    use crate::domain::api_key::ApiKey;

    fn request(key_type: KeyType, environment: Environment) -> NewKeyRequest {
        let key = ApiKey::generate(key_type, environment);
        NewKeyRequest {
            key_id: KeyId::generate(1_000),
            workspace_id: WorkspaceId::parse("ws_1").unwrap(),
            name: KeyName::parse("CI").unwrap(),
            key_type,
            environment,
            expiration: Expiration::default(),
            scopes: ScopeSet::EMPTY,
            reveal_later: false,
            allowed_domains: vec![],
            secret_hash: key.hash(),
            masked: key.masked(),
            public_key: (key_type == KeyType::Public).then(|| key.expose().to_owned()),
        }
    }

    fn given(events: &[Event]) -> Option<KeyState> {
        events.iter().enumerate().fold(None, |state, (i, event)| {
            let recorded = Recorded {
                event: event.clone(),
                actor: "user_1".into(),
                recorded_at_ms: 1_000 + i as i64,
                stream_version: i as u64 + 1,
            };
            Some(apply(state, &recorded).expect("valid history"))
        })
    }

    fn created() -> Event {
        Event::KeyCreated(Box::new(
            request(KeyType::Private, Environment::Production)
                .validate(1_000)
                .unwrap(),
        ))
    }

    fn scopes(names: &[&str]) -> ScopeSet {
        ScopeSet::parse(names).unwrap()
    }

    #[test]
    fn private_key_without_scopes_has_full_access_and_default_expiry() {
        let new = request(KeyType::Private, Environment::Production)
            .validate(1_000)
            .unwrap();
        assert!(new.full_access);
        assert_eq!(new.expires_at_ms, Some(1_000 + 90 * 86_400_000));
    }

    #[test]
    fn public_keys_need_read_scopes_and_domains_in_production() {
        let mut req = request(KeyType::Public, Environment::Production);
        req.scopes = scopes(&["tickets:write"]);
        req.reveal_later = true;
        let DomainError::Invalid(v) = req.validate(0).unwrap_err() else {
            panic!("expected Invalid")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["scopes", "reveal_later", "allowed_domains"]);

        let mut req = request(KeyType::Public, Environment::Production);
        req.allowed_domains = vec![DomainPattern::parse("app.example.com").unwrap()];
        let DomainError::Invalid(v) = req.validate(0).unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(v[0].reason, "public keys need at least one read scope");

        let mut req = request(KeyType::Public, Environment::Test);
        req.scopes = scopes(&["tickets:read"]);
        let new = req.validate(0).unwrap();
        assert!(!new.full_access);
    }

    #[test]
    fn a_shape_with_unparsed_parts_breaks_only_the_rules_it_can_be_judged_by() {
        let shape = KeyShape {
            key_type: KeyType::Public,
            environment: None,
            scopes: None,
            reveal_later: true,
            allowed_domains: None,
        };
        let fields: Vec<_> = shape.violations().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["reveal_later"]);

        let shape = KeyShape {
            environment: Some(Environment::Production),
            scopes: Some(scopes(&["tickets:write"])),
            reveal_later: false,
            allowed_domains: Some(&[]),
            ..shape
        };
        let fields: Vec<_> = shape.violations().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["scopes", "allowed_domains"]);

        let private = KeyShape {
            key_type: KeyType::Private,
            environment: None,
            scopes: None,
            reveal_later: true,
            allowed_domains: None,
        };
        assert_eq!(private.violations(), []);
    }

    #[test]
    fn create_on_an_existing_key_is_refused() {
        let state = given(&[created()]);
        let new = request(KeyType::Private, Environment::Test)
            .validate(0)
            .unwrap();
        assert_eq!(
            decide(state.as_ref(), &Command::Create(Box::new(new))),
            Err(DomainError::AlreadyExists)
        );
    }

    #[test]
    fn rename_records_the_new_name_and_same_name_records_nothing() {
        let state = given(&[created()]);
        let name = KeyName::parse("Deploy").unwrap();
        let rename = Command::Rename {
            name: name.clone(),
            expected_version: Some(1),
        };
        assert_eq!(
            decide(state.as_ref(), &rename),
            Ok(vec![Event::KeyRenamed { name: name.clone() }])
        );
        let state = given(&[created(), Event::KeyRenamed { name: name.clone() }]);
        assert_eq!(state.as_ref().unwrap().version, 2);
        let again = Command::Rename {
            name,
            expected_version: None,
        };
        assert_eq!(decide(state.as_ref(), &again), Ok(vec![]));
    }

    #[test]
    fn a_stale_expected_version_is_a_conflict() {
        let state = given(&[
            created(),
            Event::KeyRenamed {
                name: KeyName::parse("x").unwrap(),
            },
        ]);
        let cmd = Command::Revoke {
            expected_version: Some(1),
        };
        assert_eq!(
            decide(state.as_ref(), &cmd),
            Err(DomainError::VersionConflict {
                expected: 1,
                actual: 2
            })
        );
    }

    #[test]
    fn revoked_keys_refuse_changes_but_a_repeated_revoke_is_a_no_op() {
        let state = given(&[created(), Event::KeyRevoked]);
        assert!(state.as_ref().unwrap().is_revoked());
        let rename = Command::Rename {
            name: KeyName::parse("y").unwrap(),
            expected_version: None,
        };
        assert_eq!(decide(state.as_ref(), &rename), Err(DomainError::Revoked));
        let scopes_cmd = Command::UpdateScopes {
            scopes: scopes(&["tickets:read"]),
            expected_version: None,
        };
        assert_eq!(
            decide(state.as_ref(), &scopes_cmd),
            Err(DomainError::Revoked)
        );
        let revoke = Command::Revoke {
            expected_version: Some(1),
        };
        assert_eq!(decide(state.as_ref(), &revoke), Ok(vec![]));
    }

    #[test]
    fn scope_updates_need_a_scope_end_full_access_and_skip_public_keys() {
        let state = given(&[created()]);
        let empty = Command::UpdateScopes {
            scopes: ScopeSet::EMPTY,
            expected_version: None,
        };
        assert!(matches!(
            decide(state.as_ref(), &empty),
            Err(DomainError::Invalid(_))
        ));
        let set = scopes(&["tickets:read"]);
        let update = Command::UpdateScopes {
            scopes: set,
            expected_version: None,
        };
        let events = decide(state.as_ref(), &update).unwrap();
        assert_eq!(events, vec![Event::KeyScopesChanged { scopes: set }]);
        let state = given(&[created(), events[0].clone()]).unwrap();
        assert!(!state.full_access);
        assert_eq!(state.scopes, set);

        let mut public = request(KeyType::Public, Environment::Test);
        public.scopes = scopes(&["tickets:read"]);
        let state = given(&[Event::KeyCreated(Box::new(public.validate(0).unwrap()))]);
        assert_eq!(
            decide(state.as_ref(), &update),
            Err(DomainError::PublicScopesImmutable)
        );
    }

    #[test]
    fn commands_on_a_missing_key_are_not_found() {
        let cmd = Command::Revoke {
            expected_version: None,
        };
        assert_eq!(decide(None, &cmd), Err(DomainError::NotFound));
    }

    #[test]
    fn apply_refuses_histories_that_cannot_happen() {
        let revoked = given(&[created(), Event::KeyRevoked]);
        let after = Recorded {
            event: Event::KeyRenamed {
                name: KeyName::parse("z").unwrap(),
            },
            actor: "a".into(),
            recorded_at_ms: 9,
            stream_version: 3,
        };
        assert!(apply(revoked, &after).is_err());
        let skipped = Recorded {
            stream_version: 3,
            ..after.clone()
        };
        assert!(apply(given(&[created()]), &skipped).is_err());
        assert!(
            apply(
                None,
                &Recorded {
                    stream_version: 1,
                    ..after
                }
            )
            .is_err()
        );
    }

    #[test]
    fn reveals_are_recorded_without_changing_the_version() {
        let mut new = request(KeyType::Private, Environment::Production);
        new.reveal_later = true;
        let created = Event::KeyCreated(Box::new(new.validate(0).unwrap()));
        let state = given(std::slice::from_ref(&created));
        assert_eq!(
            decide(state.as_ref(), &Command::Reveal),
            Ok(vec![Event::KeyRevealed])
        );
        let state = given(&[created.clone(), Event::KeyRevealed]).unwrap();
        assert_eq!((state.version, state.stream_version), (1, 2));
        assert_eq!(state.last_revealed_at_ms, Some(1_001));
        let rename = Command::Rename {
            name: KeyName::parse("n").unwrap(),
            expected_version: Some(1),
        };
        assert!(
            decide(Some(&state), &rename).is_ok(),
            "a reveal is not a conflicting change"
        );

        let no_copy = given(&[self::created()]);
        assert!(matches!(
            decide(no_copy.as_ref(), &Command::Reveal),
            Err(DomainError::NotRevealable)
        ));
        let revoked = given(&[created, Event::KeyRevoked]);
        assert_eq!(
            decide(revoked.as_ref(), &Command::Reveal),
            Err(DomainError::Revoked)
        );
    }

    #[test]
    fn type_names_list_every_event() {
        let name = KeyName::parse("n").unwrap();
        let events = [
            created(),
            Event::KeyRenamed { name },
            Event::KeyScopesChanged {
                scopes: ScopeSet::EMPTY,
            },
            Event::KeyRevoked,
            Event::KeyRevealed,
            Event::KeyRolled {
                successor: KeyId::generate(2_000),
                grace: GracePeriod::from_ms(0).unwrap(),
                expires_at_ms: 2_000,
            },
        ];
        let names: Vec<_> = events.iter().map(Event::type_name).collect();
        assert_eq!(names, Event::TYPE_NAMES);
    }

    fn roll(now_ms: i64, grace_ms: i64) -> Roll {
        let key = ApiKey::generate(KeyType::Private, Environment::Production);
        Roll {
            successor_key_id: KeyId::generate(now_ms),
            secret_hash: key.hash(),
            masked: key.masked(),
            public_key: None,
            grace: GracePeriod::from_ms(grace_ms).unwrap(),
            now_ms,
            expected_version: None,
        }
    }

    #[test]
    fn a_roll_ends_the_old_key_after_the_grace_period_and_copies_it_to_the_successor() {
        let state = given(&[created()]).unwrap();
        let roll = roll(5_000, 60_000);
        let events = decide(Some(&state), &Command::Roll(Box::new(roll.clone()))).unwrap();
        assert_eq!(
            events,
            vec![Event::KeyRolled {
                successor: roll.successor_key_id,
                grace: roll.grace,
                expires_at_ms: 65_000,
            }]
        );
        let successor = roll.successor(&state);
        assert_eq!(successor.name, state.name);
        assert_eq!(successor.rolled_from, Some(state.key_id));
        assert_eq!(successor.full_access, state.full_access);
        assert_eq!(
            successor.expires_at_ms,
            Some(5_000 + state.expires_at_ms.unwrap() - state.created_at_ms)
        );
        let rolled = given(&[created(), events[0].clone()]).unwrap();
        assert_eq!(rolled.rolled_to, Some(roll.successor_key_id));
        assert_eq!(rolled.expires_at_ms, Some(65_000));
        assert_eq!(rolled.version, 2);
    }

    #[test]
    fn rolled_revoked_and_expired_keys_cannot_be_rolled() {
        let first = roll(5_000, 0);
        let rolled = given(&[
            created(),
            Event::KeyRolled {
                successor: first.successor_key_id,
                grace: first.grace,
                expires_at_ms: 5_000,
            },
        ]);
        assert_eq!(
            decide(rolled.as_ref(), &Command::Roll(Box::new(roll(6_000, 0)))),
            Err(DomainError::AlreadyRolled {
                successor: first.successor_key_id
            })
        );
        let revoked = given(&[created(), Event::KeyRevoked]);
        assert_eq!(
            decide(revoked.as_ref(), &Command::Roll(Box::new(roll(6_000, 0)))),
            Err(DomainError::Revoked)
        );
        let live = given(&[created()]).unwrap();
        let after_expiry = live.expires_at_ms.unwrap();
        assert_eq!(
            decide(Some(&live), &Command::Roll(Box::new(roll(after_expiry, 0)))),
            Err(DomainError::Expired)
        );
        // The grace period never extends a key past its own expiry.
        let late = roll(after_expiry - 10, 60_000);
        assert_eq!(late.old_key_expires_at(&live), after_expiry);
        assert!(GracePeriod::from_ms(-1).is_err());
        assert!(GracePeriod::from_ms(GracePeriod::MAX_MS + 1).is_err());
    }

    #[test]
    fn revealable_follows_type_copy_and_revocation() {
        let mut state = given(&[created()]).unwrap();
        assert!(!state.revealable());
        state.reveal_later = true;
        assert!(state.revealable());
        state.revoked_at_ms = Some(5);
        assert!(!state.revealable());
    }
}
