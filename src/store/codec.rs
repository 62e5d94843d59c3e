//! Events to and from their stored form (protobuf payloads), and key states to and from the
//! `keys` projection's rows. Decoding re-validates every value: a row that would not pass the
//! API's own checks is reported as corrupt, not trusted.

use prost::Message;

use crate::domain::{
    DomainPattern, Environment, Event, KeyId, KeyName, KeyState, KeyType, NewKey, ScopeSet,
    SecretHash, WorkspaceId,
};
use crate::proto::v1 as pb;

/// The schema version written for every event type today.
pub const SCHEMA_VERSION: u32 = 1;

/// An event's stored columns.
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub payload: Vec<u8>,
}

pub fn encode_event(event: &Event) -> EncodedEvent {
    let payload = match event {
        Event::KeyCreated(new) => pb::KeyCreated {
            schema_version: SCHEMA_VERSION,
            key_id: new.key_id.to_string(),
            workspace_id: new.workspace_id.to_string(),
            name: new.name.as_str().to_owned(),
            r#type: key_type_to_pb(new.key_type) as i32,
            environment: environment_to_pb(new.environment) as i32,
            scopes: new.scopes.names(),
            full_access: new.full_access,
            secret_hash: new.secret_hash.0.to_vec(),
            masked: new.masked.clone(),
            public_key: new.public_key.clone().unwrap_or_default(),
            allowed_domains: new
                .allowed_domains
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect(),
            created_at_ms: new.created_at_ms,
            expires_at_ms: new.expires_at_ms,
            reveal_later: new.reveal_later,
        }
        .encode_to_vec(),
        Event::KeyRenamed { name } => pb::KeyRenamed {
            schema_version: SCHEMA_VERSION,
            name: name.as_str().to_owned(),
        }
        .encode_to_vec(),
        Event::KeyScopesChanged { scopes } => pb::KeyScopesChanged {
            schema_version: SCHEMA_VERSION,
            scopes: scopes.names(),
        }
        .encode_to_vec(),
        Event::KeyRevoked => pb::KeyRevoked {
            schema_version: SCHEMA_VERSION,
        }
        .encode_to_vec(),
    };
    EncodedEvent {
        event_type: event.type_name(),
        schema_version: SCHEMA_VERSION,
        payload,
    }
}

pub fn decode_event(
    event_type: &str,
    schema_version: u32,
    payload: &[u8],
) -> Result<Event, String> {
    if schema_version != SCHEMA_VERSION {
        return Err(format!(
            "unknown schema version {schema_version} of {event_type}"
        ));
    }
    let bad = |e: prost::DecodeError| format!("undecodable {event_type} payload: {e}");
    Ok(match event_type {
        "KeyCreated" => {
            let e = pb::KeyCreated::decode(payload).map_err(bad)?;
            Event::KeyCreated(Box::new(NewKey {
                key_id: KeyId::parse(&e.key_id)?,
                workspace_id: WorkspaceId::parse(&e.workspace_id)?,
                name: KeyName::parse(&e.name)?,
                key_type: key_type_from_pb(e.r#type).ok_or("KeyCreated without a key type")?,
                environment: environment_from_pb(e.environment)
                    .ok_or("KeyCreated without an environment")?,
                scopes: parse_scopes(&e.scopes)?,
                full_access: e.full_access,
                secret_hash: SecretHash::from_slice(&e.secret_hash)
                    .ok_or("secret_hash is not 32 bytes")?,
                masked: e.masked,
                public_key: (!e.public_key.is_empty()).then_some(e.public_key),
                allowed_domains: e
                    .allowed_domains
                    .iter()
                    .map(|d| DomainPattern::parse(d))
                    .collect::<Result<_, _>>()?,
                created_at_ms: e.created_at_ms,
                expires_at_ms: e.expires_at_ms,
                reveal_later: e.reveal_later,
            }))
        }
        "KeyRenamed" => Event::KeyRenamed {
            name: KeyName::parse(&pb::KeyRenamed::decode(payload).map_err(bad)?.name)?,
        },
        "KeyScopesChanged" => Event::KeyScopesChanged {
            scopes: parse_scopes(&pb::KeyScopesChanged::decode(payload).map_err(bad)?.scopes)?,
        },
        "KeyRevoked" => {
            pb::KeyRevoked::decode(payload).map_err(bad)?;
            Event::KeyRevoked
        }
        other => return Err(format!("unknown event type {other:?}")),
    })
}

fn parse_scopes(names: &[String]) -> Result<ScopeSet, String> {
    ScopeSet::parse(names).map_err(|unknown| format!("unknown scopes {unknown:?}"))
}

pub fn key_type_to_pb(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Private => pb::KeyType::Private,
        KeyType::Public => pb::KeyType::Public,
    }
}

pub fn key_type_from_pb(v: i32) -> Option<KeyType> {
    match pb::KeyType::try_from(v).ok()? {
        pb::KeyType::Private => Some(KeyType::Private),
        pb::KeyType::Public => Some(KeyType::Public),
        pb::KeyType::Unspecified => None,
    }
}

pub fn environment_to_pb(e: Environment) -> pb::Environment {
    match e {
        Environment::Production => pb::Environment::Production,
        Environment::Test => pb::Environment::Test,
    }
}

pub fn environment_from_pb(v: i32) -> Option<Environment> {
    match pb::Environment::try_from(v).ok()? {
        pb::Environment::Production => Some(Environment::Production),
        pb::Environment::Test => Some(Environment::Test),
        pb::Environment::Unspecified => None,
    }
}

pub fn key_type_str(t: KeyType) -> &'static str {
    match t {
        KeyType::Private => "private",
        KeyType::Public => "public",
    }
}

pub fn environment_str(e: Environment) -> &'static str {
    match e {
        Environment::Production => "production",
        Environment::Test => "test",
    }
}

/// A `keys` row as read from SQLite, before validation.
#[derive(sqlx::FromRow)]
pub struct KeyRow {
    pub key_id: String,
    pub workspace_id: String,
    pub name: String,
    pub key_type: String,
    pub environment: String,
    pub scopes: String,
    pub full_access: bool,
    pub secret_hash: Vec<u8>,
    pub masked: String,
    pub public_key: Option<String>,
    pub allowed_domains: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub reveal_later: bool,
    pub version: i64,
    pub created_by: String,
    pub updated_at: i64,
}

impl KeyRow {
    pub fn into_state(self) -> Result<KeyState, String> {
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        Ok(KeyState {
            key_id: KeyId::parse(&self.key_id)?,
            workspace_id: WorkspaceId::parse(&self.workspace_id)?,
            name: KeyName::parse(&self.name)?,
            key_type: match self.key_type.as_str() {
                "private" => KeyType::Private,
                "public" => KeyType::Public,
                other => return Err(format!("unknown key_type {other:?}")),
            },
            environment: match self.environment.as_str() {
                "production" => Environment::Production,
                "test" => Environment::Test,
                other => return Err(format!("unknown environment {other:?}")),
            },
            scopes: parse_scopes(&words(&self.scopes))?,
            full_access: self.full_access,
            secret_hash: SecretHash::from_slice(&self.secret_hash)
                .ok_or("secret_hash is not 32 bytes")?,
            masked: self.masked,
            public_key: self.public_key,
            allowed_domains: words(&self.allowed_domains)
                .iter()
                .map(|d| DomainPattern::parse(d))
                .collect::<Result<_, _>>()?,
            created_at_ms: self.created_at,
            expires_at_ms: self.expires_at,
            revoked_at_ms: self.revoked_at,
            reveal_later: self.reveal_later,
            version: u64::try_from(self.version).map_err(|_| "negative version")?,
            created_by: self.created_by,
            updated_at_ms: self.updated_at,
        })
    }
}

/// The column list of `keys`, in [`KeyRow`]'s order.
pub const KEY_COLUMNS: &str = "key_id, workspace_id, name, key_type, environment, scopes, \
    full_access, secret_hash, masked, public_key, allowed_domains, created_at, expires_at, \
    revoked_at, reveal_later, version, created_by, updated_at";

/// Values of a `keys` row for a state, bound in [`KEY_COLUMNS`] order.
pub fn bind_state<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    s: &KeyState,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let domains: Vec<&str> = s
        .allowed_domains
        .iter()
        .map(DomainPattern::as_str)
        .collect();
    query
        .bind(s.key_id.to_string())
        .bind(s.workspace_id.to_string())
        .bind(s.name.as_str().to_owned())
        .bind(key_type_str(s.key_type))
        .bind(environment_str(s.environment))
        .bind(s.scopes.names().join(" "))
        .bind(s.full_access)
        .bind(s.secret_hash.0.to_vec())
        .bind(s.masked.clone())
        .bind(s.public_key.clone())
        .bind(domains.join(" "))
        .bind(s.created_at_ms)
        .bind(s.expires_at_ms)
        .bind(s.revoked_at_ms)
        .bind(s.reveal_later)
        .bind(i64::try_from(s.version).unwrap_or(i64::MAX))
        .bind(s.created_by.clone())
        .bind(s.updated_at_ms)
}
