//! Events to and from their stored form (protobuf payloads), and key states to and from the
//! `keys` projection's rows. Decoding re-validates every value: a row that would not pass the
//! API's own checks is reported as corrupt, not trusted.

use prost::Message;

use crate::domain::{
    DomainPattern, Environment, Event, KeyId, KeyName, KeyState, KeyType, NewKey, ScopeSet,
    SecretHash, WorkspaceId,
};
use crate::proto::v1 as pb;

/// The schema version written today for each event type. Older versions are upcast on read.
pub fn schema_version(event_type: &str) -> u32 {
    match event_type {
        "KeyCreated" => 2,
        _ => 1,
    }
}

/// An event's stored columns.
#[derive(Debug)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub payload: Vec<u8>,
}

/// The typed payload of an event, in the current schema version.
pub type Payload = pb::log_event::Payload;

pub fn encode_event(event: &Event) -> EncodedEvent {
    let event_type = event.type_name();
    let schema_version = schema_version(event_type);
    let payload = match to_payload(event, schema_version) {
        Payload::KeyCreated(m) => m.encode_to_vec(),
        Payload::KeyRenamed(m) => m.encode_to_vec(),
        Payload::KeyScopesChanged(m) => m.encode_to_vec(),
        Payload::KeyRevoked(m) => m.encode_to_vec(),
        Payload::KeyRevealed(m) => m.encode_to_vec(),
    };
    EncodedEvent {
        event_type,
        schema_version,
        payload,
    }
}

fn to_payload(event: &Event, schema_version: u32) -> Payload {
    match event {
        Event::KeyCreated(new) => Payload::KeyCreated(pb::KeyCreated {
            schema_version,
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
            reveal_later: new.reveal_later,
            created_at: Some(timestamp(new.created_at_ms)),
            expires_at: new.expires_at_ms.map(timestamp),
        }),
        Event::KeyRenamed { name } => Payload::KeyRenamed(pb::KeyRenamed {
            schema_version,
            name: name.as_str().to_owned(),
        }),
        Event::KeyScopesChanged { scopes } => Payload::KeyScopesChanged(pb::KeyScopesChanged {
            schema_version,
            scopes: scopes.names(),
        }),
        Event::KeyRevoked => Payload::KeyRevoked(pb::KeyRevoked { schema_version }),
        Event::KeyRevealed => Payload::KeyRevealed(pb::KeyRevealed { schema_version }),
    }
}

/// Decodes a stored payload into the current schema version, upcasting older versions.
pub fn decode_payload(
    event_type: &str,
    schema_version: u32,
    payload: &[u8],
) -> Result<Payload, String> {
    let bad = |e: prost::DecodeError| format!("undecodable {event_type} payload: {e}");
    let current = self::schema_version(event_type);
    let unknown = || format!("unknown schema version {schema_version} of {event_type}");
    Ok(match (event_type, schema_version) {
        ("KeyCreated", 1) => Payload::KeyCreated(upcast_key_created_v1(
            pb::KeyCreatedV1::decode(payload).map_err(bad)?,
        )),
        (_, v) if v != current => return Err(unknown()),
        ("KeyCreated", _) => Payload::KeyCreated(pb::KeyCreated::decode(payload).map_err(bad)?),
        ("KeyRenamed", _) => Payload::KeyRenamed(pb::KeyRenamed::decode(payload).map_err(bad)?),
        ("KeyScopesChanged", _) => {
            Payload::KeyScopesChanged(pb::KeyScopesChanged::decode(payload).map_err(bad)?)
        }
        ("KeyRevoked", _) => Payload::KeyRevoked(pb::KeyRevoked::decode(payload).map_err(bad)?),
        ("KeyRevealed", _) => Payload::KeyRevealed(pb::KeyRevealed::decode(payload).map_err(bad)?),
        (other, _) => return Err(format!("unknown event type {other:?}")),
    })
}

/// KeyCreated version 1 kept times as Unix milliseconds; version 2 as Timestamps.
fn upcast_key_created_v1(v1: pb::KeyCreatedV1) -> pb::KeyCreated {
    pb::KeyCreated {
        schema_version: 2,
        key_id: v1.key_id,
        workspace_id: v1.workspace_id,
        name: v1.name,
        r#type: v1.r#type,
        environment: v1.environment,
        scopes: v1.scopes,
        full_access: v1.full_access,
        secret_hash: v1.secret_hash,
        masked: v1.masked,
        public_key: v1.public_key,
        allowed_domains: v1.allowed_domains,
        reveal_later: v1.reveal_later,
        created_at: Some(timestamp(v1.created_at_ms)),
        expires_at: v1.expires_at_ms.map(timestamp),
    }
}

pub fn decode_event(
    event_type: &str,
    schema_version: u32,
    payload: &[u8],
) -> Result<Event, String> {
    event_from_payload(decode_payload(event_type, schema_version, payload)?)
}

/// The domain event of a decoded payload, re-validating every value.
pub fn event_from_payload(payload: Payload) -> Result<Event, String> {
    Ok(match payload {
        Payload::KeyCreated(e) => Event::KeyCreated(Box::new(NewKey {
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
            created_at_ms: e
                .created_at
                .as_ref()
                .map(timestamp_ms)
                .ok_or("KeyCreated without created_at")?,
            expires_at_ms: e.expires_at.as_ref().map(timestamp_ms),
            reveal_later: e.reveal_later,
        })),
        Payload::KeyRenamed(e) => Event::KeyRenamed {
            name: KeyName::parse(&e.name)?,
        },
        Payload::KeyScopesChanged(e) => Event::KeyScopesChanged {
            scopes: parse_scopes(&e.scopes)?,
        },
        Payload::KeyRevoked(_) => Event::KeyRevoked,
        Payload::KeyRevealed(_) => Event::KeyRevealed,
    })
}

/// Unix milliseconds as a protobuf Timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf Timestamp as Unix milliseconds (sub-millisecond precision dropped).
pub fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos.div_euclid(1_000_000)))
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
    pub stream_version: i64,
    pub created_by: String,
    pub updated_at: i64,
    pub last_revealed_at: Option<i64>,
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
            stream_version: u64::try_from(self.stream_version)
                .map_err(|_| "negative stream_version")?,
            last_revealed_at_ms: self.last_revealed_at,
            created_by: self.created_by,
            updated_at_ms: self.updated_at,
        })
    }
}

/// The column list of `keys`, in [`KeyRow`]'s order.
pub const KEY_COLUMNS: &str = "key_id, workspace_id, name, key_type, environment, scopes, \
    full_access, secret_hash, masked, public_key, allowed_domains, created_at, expires_at, \
    revoked_at, reveal_later, version, stream_version, created_by, updated_at, last_revealed_at";

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
        .bind(i64::try_from(s.stream_version).unwrap_or(i64::MAX))
        .bind(s.created_by.clone())
        .bind(s.updated_at_ms)
        .bind(s.last_revealed_at_ms)
}
