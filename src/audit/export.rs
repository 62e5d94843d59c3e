//! The export format: newline-delimited JSON, stable, readable without this service.
//!
//! Line 1 is a header:
//! ```json
//! {"format":"kemon-keys/events","version":1,"workspace_id":null}
//! ```
//! (`workspace_id` names the workspace of a workspace export, `null` for the whole log).
//! Every further line is one event, in log order:
//! ```json
//! {"sequence":1,"key_id":"key_…","workspace_id":"ws_acme","stream_version":1,
//!  "event_type":"KeyCreated","schema_version":2,"payload":"<base64 of the stored bytes>",
//!  "actor":"user_123","recorded_at_ms":1767225600000,"hash":"<64 hex>",
//!  "workspace_hash":"<64 hex>","event":{…}}
//! ```
//! An event recorded with an authenticated calling service (mutual TLS) also has
//! `"caller_identity":"spiffe://…"`; events without one have no such key, so older exports
//! and their readers are unchanged.
//! `payload`, `hash` and `workspace_hash` are what the chains are computed over and checked
//! against (see `audit.proto` for the canonical bytes). `event` is the decoded payload, for
//! people; verification ignores it and decodes `payload` itself.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::log::chain::{Hash, LogRecord};
use crate::log::events::{self, Payload};
use crate::proto::convert::timestamp_ms;
use crate::proto::v1 as pb;

pub const FORMAT: &str = "kemon-keys/events";
pub const FORMAT_VERSION: u64 = 1;

/// The first line of an export.
pub fn header_line(workspace_id: Option<&str>) -> String {
    json!({"format": FORMAT, "version": FORMAT_VERSION, "workspace_id": workspace_id}).to_string()
}

/// Reads the header: `Ok(Some(workspace))` for a workspace export, `Ok(None)` for the log.
pub fn parse_header(line: &str) -> Result<Option<String>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("header: {e}"))?;
    if v["format"] != FORMAT || v["version"] != FORMAT_VERSION {
        return Err(format!(
            "not a {FORMAT} version {FORMAT_VERSION} export (header {line})"
        ));
    }
    match &v["workspace_id"] {
        Value::Null => Ok(None),
        Value::String(w) => Ok(Some(w.clone())),
        other => Err(format!("header: workspace_id {other} is not a string")),
    }
}

/// One event as an export line.
pub fn record_line(r: &LogRecord) -> String {
    let event = events::decode_payload(&r.event_type, r.schema_version, &r.payload)
        .map(|p| payload_json(&p))
        .unwrap_or_else(|e| json!({ "undecodable": e }));
    let mut line = json!({
        "sequence": r.sequence,
        "key_id": r.key_id,
        "workspace_id": r.workspace_id,
        "stream_version": r.stream_version,
        "event_type": r.event_type,
        "schema_version": r.schema_version,
        "payload": BASE64.encode(&r.payload),
        "actor": r.actor,
        "recorded_at_ms": r.recorded_at_ms,
        "hash": hex::encode(r.hash),
        "workspace_hash": hex::encode(r.workspace_hash),
        "event": event,
    });
    if let Some(identity) = &r.caller_identity {
        line["caller_identity"] = json!(identity);
    }
    line.to_string()
}

/// Parses an event line back into the record it came from.
pub fn parse_record(line: &str) -> Result<LogRecord, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let u64_field = |name: &str| {
        v[name]
            .as_u64()
            .ok_or_else(|| format!("`{name}` is not a whole number"))
    };
    let str_field = |name: &str| {
        v[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{name}` is not a string"))
    };
    let hash_field = |name: &str| -> Result<Hash, String> {
        let mut h = [0u8; 32];
        hex::decode_to_slice(str_field(name)?, &mut h)
            .map_err(|_| format!("`{name}` is not 64 hex characters"))?;
        Ok(h)
    };
    Ok(LogRecord {
        sequence: u64_field("sequence")?,
        key_id: str_field("key_id")?,
        workspace_id: str_field("workspace_id")?,
        stream_version: u64_field("stream_version")?,
        event_type: str_field("event_type")?,
        schema_version: u32::try_from(u64_field("schema_version")?)
            .map_err(|_| "`schema_version` is too large".to_owned())?,
        payload: BASE64
            .decode(str_field("payload")?)
            .map_err(|_| "`payload` is not base64".to_owned())?,
        actor: str_field("actor")?,
        recorded_at_ms: v["recorded_at_ms"]
            .as_i64()
            .ok_or("`recorded_at_ms` is not a whole number")?,
        caller_identity: match &v["caller_identity"] {
            Value::Null => None,
            Value::String(identity) => Some(identity.clone()),
            _ => return Err("`caller_identity` is not a string".to_owned()),
        },
        hash: hash_field("hash")?,
        workspace_hash: hash_field("workspace_hash")?,
    })
}

/// A decoded payload as JSON, for people reading an export.
pub fn payload_json(payload: &Payload) -> Value {
    let key_type = |v: i32| pb::KeyType::try_from(v).map_or("?", |t| t.as_str_name());
    let environment = |v: i32| pb::Environment::try_from(v).map_or("?", |e| e.as_str_name());
    match payload {
        Payload::KeyCreated(e) => json!({
            "key_id": e.key_id,
            "workspace_id": e.workspace_id,
            "name": e.name,
            "type": key_type(e.r#type),
            "environment": environment(e.environment),
            "scopes": e.scopes,
            "full_access": e.full_access,
            "secret_hash": hex::encode(&e.secret_hash),
            "masked": e.masked,
            "allowed_domains": e.allowed_domains,
            "reveal_later": e.reveal_later,
            "created_at_ms": e.created_at.as_ref().map(timestamp_ms),
            "expires_at_ms": e.expires_at.as_ref().map(timestamp_ms),
        }),
        Payload::KeyRenamed(e) => json!({ "name": e.name }),
        Payload::KeyScopesChanged(e) => json!({ "scopes": e.scopes }),
        Payload::KeyRevoked(_) | Payload::KeyRevealed(_) => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lines_round_trip() {
        let record = LogRecord {
            sequence: 3,
            key_id: "key_01".into(),
            workspace_id: "ws".into(),
            stream_version: 2,
            event_type: "KeyRenamed".into(),
            schema_version: 1,
            payload: prost::Message::encode_to_vec(&pb::KeyRenamed {
                schema_version: 1,
                name: "n".into(),
            }),
            actor: "u\"1".into(),
            recorded_at_ms: -5,
            caller_identity: None,
            hash: [7; 32],
            workspace_hash: [9; 32],
        };
        let line = record_line(&record);
        assert!(!line.contains('\n'));
        assert!(!line.contains("caller_identity"), "{line}");
        assert_eq!(parse_record(&line), Ok(record.clone()));
        assert!(line.contains(r#""event":{"name":"n"}"#), "{line}");

        let record = LogRecord {
            caller_identity: Some("spiffe://kemon.internal/ns/app/sa/web".into()),
            ..record
        };
        let line = record_line(&record);
        assert!(
            line.contains(r#""caller_identity":"spiffe://kemon.internal/ns/app/sa/web""#),
            "{line}"
        );
        assert_eq!(parse_record(&line), Ok(record));
    }

    #[test]
    fn headers_name_their_scope() {
        assert_eq!(parse_header(&header_line(None)), Ok(None));
        assert_eq!(
            parse_header(&header_line(Some("ws"))),
            Ok(Some("ws".into()))
        );
        assert!(parse_header(r#"{"format":"other","version":1}"#).is_err());
    }
}
