//! Events to and from their stored form: an event type name, a schema version and a protobuf
//! payload (`proto/kemon/keys/v1/events.proto`). Every backend stores exactly these bytes.
//! Decoding re-validates every value: a payload that would not pass the API's own checks is
//! reported as corrupt, not trusted.

use prost::Message;

use crate::domain::{
    DomainPattern, Event, GracePeriod, KeyId, KeyName, NewKey, ScopeSet, SecretHash, WorkspaceId,
};
use crate::proto::convert::{
    duration, duration_ms, environment_from_pb, environment_to_pb, key_type_from_pb,
    key_type_to_pb, timestamp, timestamp_ms,
};
use crate::proto::v1 as pb;

/// Reads one schema version of an event's payload into the current message.
type Reader = fn(&[u8]) -> Result<Payload, prost::DecodeError>;

/// One kind of event, as the log knows it: its stored name, the schema version written
/// today and how to read it, and the older versions still read (each upcast on read, never
/// rewritten). Adding an event is one `Event` variant, its `events.proto` message, and one
/// row here; the compiler checks the rest (`to_payload`, `payload_bytes`,
/// `event_from_payload` match on every variant).
struct EventKind {
    name: &'static str,
    schema_version: u32,
    read: Reader,
    older: &'static [(u32, Reader)],
}

const KINDS: &[EventKind] = &[
    EventKind {
        name: "KeyCreated",
        schema_version: 2,
        read: |b| pb::KeyCreated::decode(b).map(Payload::KeyCreated),
        older: &[(1, |b| {
            pb::KeyCreatedV1::decode(b).map(|v1| Payload::KeyCreated(upcast_key_created_v1(v1)))
        })],
    },
    EventKind {
        name: "KeyRenamed",
        schema_version: 1,
        read: |b| pb::KeyRenamed::decode(b).map(Payload::KeyRenamed),
        older: &[],
    },
    EventKind {
        name: "KeyScopesChanged",
        schema_version: 1,
        read: |b| pb::KeyScopesChanged::decode(b).map(Payload::KeyScopesChanged),
        older: &[],
    },
    EventKind {
        name: "KeyRevoked",
        schema_version: 1,
        read: |b| pb::KeyRevoked::decode(b).map(Payload::KeyRevoked),
        older: &[],
    },
    EventKind {
        name: "KeyRevealed",
        schema_version: 1,
        read: |b| pb::KeyRevealed::decode(b).map(Payload::KeyRevealed),
        older: &[],
    },
    EventKind {
        name: "KeyRolled",
        schema_version: 1,
        read: |b| pb::KeyRolled::decode(b).map(Payload::KeyRolled),
        older: &[],
    },
];

fn kind(event_type: &str) -> Option<&'static EventKind> {
    KINDS.iter().find(|k| k.name == event_type)
}

/// Every event type name, as stored in `event_type`, in the table's order.
pub fn type_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|k| k.name)
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
    // Every Event variant has its row: `events_and_kinds_agree` checks it.
    let schema_version = kind(event_type).map_or(1, |k| k.schema_version);
    EncodedEvent {
        event_type,
        schema_version,
        payload: payload_bytes(&to_payload(event, schema_version)),
    }
}

/// The stored bytes of a payload: the event's own message, not the oneof around it.
fn payload_bytes(payload: &Payload) -> Vec<u8> {
    match payload {
        Payload::KeyCreated(m) => m.encode_to_vec(),
        Payload::KeyRenamed(m) => m.encode_to_vec(),
        Payload::KeyScopesChanged(m) => m.encode_to_vec(),
        Payload::KeyRevoked(m) => m.encode_to_vec(),
        Payload::KeyRevealed(m) => m.encode_to_vec(),
        Payload::KeyRolled(m) => m.encode_to_vec(),
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
            rolled_from_key_id: new.rolled_from.map(|k| k.to_string()).unwrap_or_default(),
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
        Event::KeyRolled {
            successor,
            grace,
            expires_at_ms,
        } => Payload::KeyRolled(pb::KeyRolled {
            schema_version,
            successor_key_id: successor.to_string(),
            grace_period: Some(duration(grace.as_ms())),
            expires_at: Some(timestamp(*expires_at_ms)),
        }),
    }
}

/// Decodes a stored payload into the current schema version, upcasting older versions.
pub fn decode_payload(
    event_type: &str,
    schema_version: u32,
    payload: &[u8],
) -> Result<Payload, String> {
    let kind = kind(event_type).ok_or_else(|| format!("unknown event type {event_type:?}"))?;
    let read = if schema_version == kind.schema_version {
        kind.read
    } else {
        kind.older
            .iter()
            .find(|(version, _)| *version == schema_version)
            .map(|(_, read)| *read)
            .ok_or_else(|| format!("unknown schema version {schema_version} of {event_type}"))?
    };
    read(payload).map_err(|e| format!("undecodable {event_type} payload: {e}"))
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
        rolled_from_key_id: String::new(),
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
            rolled_from: match e.rolled_from_key_id.as_str() {
                "" => None,
                id => Some(KeyId::parse(id)?),
            },
        })),
        Payload::KeyRenamed(e) => Event::KeyRenamed {
            name: KeyName::parse(&e.name)?,
        },
        Payload::KeyScopesChanged(e) => Event::KeyScopesChanged {
            scopes: parse_scopes(&e.scopes)?,
        },
        Payload::KeyRevoked(_) => Event::KeyRevoked,
        Payload::KeyRevealed(_) => Event::KeyRevealed,
        Payload::KeyRolled(e) => Event::KeyRolled {
            successor: KeyId::parse(&e.successor_key_id)?,
            grace: GracePeriod::from_ms(
                e.grace_period
                    .as_ref()
                    .and_then(duration_ms)
                    .ok_or("KeyRolled without a grace period in milliseconds")?,
            )?,
            expires_at_ms: e
                .expires_at
                .as_ref()
                .map(timestamp_ms)
                .ok_or("KeyRolled without expires_at")?,
        },
    })
}

fn parse_scopes(names: &[String]) -> Result<ScopeSet, String> {
    ScopeSet::parse(names).map_err(|unknown| format!("unknown scopes {unknown:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_kinds_agree() {
        assert_eq!(type_names().collect::<Vec<_>>(), Event::TYPE_NAMES);
        for name in Event::TYPE_NAMES {
            let kind = kind(name).expect("a row per event");
            assert!(kind.older.iter().all(|(v, _)| *v < kind.schema_version));
        }
        assert!(decode_payload("KeyDeleted", 1, &[]).is_err());
        assert!(decode_payload("KeyRevoked", 7, &[]).is_err());
        assert!(decode_payload("KeyRevoked", 1, &[]).is_ok());
    }

    #[test]
    fn a_roll_round_trips_through_its_stored_form() {
        let rolled = Event::KeyRolled {
            successor: KeyId::generate(1_000),
            grace: GracePeriod::from_ms(3_600_000).unwrap(),
            expires_at_ms: 3_601_000,
        };
        let encoded = encode_event(&rolled);
        assert_eq!(
            (encoded.event_type, encoded.schema_version),
            ("KeyRolled", 1)
        );
        assert_eq!(
            decode_event("KeyRolled", 1, &encoded.payload).unwrap(),
            rolled
        );
        // A grace period outside the API's bounds is a corrupt payload, not trusted.
        let forged = pb::KeyRolled {
            schema_version: 1,
            successor_key_id: KeyId::generate(1_000).to_string(),
            grace_period: Some(duration(8 * 86_400_000)),
            expires_at: Some(timestamp(0)),
        };
        assert!(decode_event("KeyRolled", 1, &forged.encode_to_vec()).is_err());
    }
}
