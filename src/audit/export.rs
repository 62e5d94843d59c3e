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
use crate::proto::convert::{duration_ms, timestamp_ms};
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
    let mut line = Vec::with_capacity(1024);
    write_record(&mut line, r);
    String::from_utf8(line).expect("JSON text is UTF-8")
}

/// Writes records as export lines (each followed by a newline), formatting a long batch on
/// two threads.
pub fn write_lines(records: &[LogRecord], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    const SPLIT_AT: usize = 2048;
    let format = |records: &[LogRecord]| {
        let mut text = Vec::with_capacity(records.len() * 1024);
        for r in records {
            write_record(&mut text, r);
            text.push(b'\n');
        }
        text
    };
    if records.len() < SPLIT_AT {
        return out.write_all(&format(records));
    }
    let (first, second) = records.split_at(records.len() / 2);
    let (first, second) = std::thread::scope(|scope| {
        let later = scope.spawn(|| format(second));
        let first = format(first);
        (first, later.join())
    });
    out.write_all(&first)?;
    out.write_all(&second.map_err(|_| std::io::Error::other("formatting export lines failed"))?)
}

/// One event as an export line, without its newline, appended to `out`: members in the
/// order of their names, as `serde_json` writes an object, written straight from the record
/// rather than through a `serde_json::Value` (the export's lines are the same bytes).
pub fn write_record(out: &mut Vec<u8>, r: &LogRecord) {
    out.extend_from_slice(b"{\"actor\":");
    json_string(out, &r.actor);
    if let Some(identity) = &r.caller_identity {
        out.extend_from_slice(b",\"caller_identity\":");
        json_string(out, identity);
    }
    out.extend_from_slice(b",\"event\":");
    match events::decode_payload(&r.event_type, r.schema_version, &r.payload) {
        Ok(payload) => write_payload(out, &payload),
        Err(e) => {
            out.extend_from_slice(b"{\"undecodable\":");
            json_string(out, &e);
            out.push(b'}');
        }
    }
    out.extend_from_slice(b",\"event_type\":");
    json_string(out, &r.event_type);
    out.extend_from_slice(b",\"hash\":\"");
    hex_into(out, &r.hash);
    out.extend_from_slice(b"\",\"key_id\":");
    json_string(out, &r.key_id);
    out.extend_from_slice(b",\"payload\":\"");
    let start = out.len();
    out.resize(
        start + base64::encoded_len(r.payload.len(), true).unwrap_or(0),
        0,
    );
    let written = BASE64
        .encode_slice(&r.payload, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
    out.extend_from_slice(b"\",\"recorded_at_ms\":");
    json_number(out, r.recorded_at_ms);
    out.extend_from_slice(b",\"schema_version\":");
    json_number(out, r.schema_version);
    out.extend_from_slice(b",\"sequence\":");
    json_number(out, r.sequence);
    out.extend_from_slice(b",\"stream_version\":");
    json_number(out, r.stream_version);
    out.extend_from_slice(b",\"workspace_hash\":\"");
    hex_into(out, &r.workspace_hash);
    out.extend_from_slice(b"\",\"workspace_id\":");
    json_string(out, &r.workspace_id);
    out.push(b'}');
}

/// [`payload_json`], written straight to `out`.
fn write_payload(out: &mut Vec<u8>, payload: &Payload) {
    let strings = |out: &mut Vec<u8>, items: &[String]| {
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_string(out, item);
        }
        out.push(b']');
    };
    let optional = |out: &mut Vec<u8>, value: Option<i64>| match value {
        Some(v) => json_number(out, v),
        None => out.extend_from_slice(b"null"),
    };
    match payload {
        Payload::KeyCreated(e) => {
            out.extend_from_slice(b"{\"allowed_domains\":");
            strings(out, &e.allowed_domains);
            out.extend_from_slice(b",\"created_at_ms\":");
            optional(out, e.created_at.as_ref().map(timestamp_ms));
            out.extend_from_slice(b",\"environment\":");
            json_string(
                out,
                pb::Environment::try_from(e.environment).map_or("?", |v| v.as_str_name()),
            );
            out.extend_from_slice(b",\"expires_at_ms\":");
            optional(out, e.expires_at.as_ref().map(timestamp_ms));
            out.extend_from_slice(b",\"full_access\":");
            out.extend_from_slice(if e.full_access { b"true" } else { b"false" });
            out.extend_from_slice(b",\"key_id\":");
            json_string(out, &e.key_id);
            out.extend_from_slice(b",\"masked\":");
            json_string(out, &e.masked);
            out.extend_from_slice(b",\"name\":");
            json_string(out, &e.name);
            out.extend_from_slice(b",\"reveal_later\":");
            out.extend_from_slice(if e.reveal_later { b"true" } else { b"false" });
            // Only on successors, so that every line written before rolls existed is unchanged.
            if !e.rolled_from_key_id.is_empty() {
                out.extend_from_slice(b",\"rolled_from_key_id\":");
                json_string(out, &e.rolled_from_key_id);
            }
            out.extend_from_slice(b",\"scopes\":");
            strings(out, &e.scopes);
            out.extend_from_slice(b",\"secret_hash\":\"");
            hex_into(out, &e.secret_hash);
            out.extend_from_slice(b"\",\"type\":");
            json_string(
                out,
                pb::KeyType::try_from(e.r#type).map_or("?", |v| v.as_str_name()),
            );
            out.extend_from_slice(b",\"workspace_id\":");
            json_string(out, &e.workspace_id);
            out.push(b'}');
        }
        Payload::KeyRenamed(e) => {
            out.extend_from_slice(b"{\"name\":");
            json_string(out, &e.name);
            out.push(b'}');
        }
        Payload::KeyScopesChanged(e) => {
            out.extend_from_slice(b"{\"scopes\":");
            strings(out, &e.scopes);
            out.push(b'}');
        }
        Payload::KeyRevoked(_) | Payload::KeyRevealed(_) => out.extend_from_slice(b"{}"),
        Payload::KeyRolled(e) => {
            out.extend_from_slice(b"{\"expires_at_ms\":");
            optional(out, e.expires_at.as_ref().map(timestamp_ms));
            out.extend_from_slice(b",\"grace_period_ms\":");
            optional(out, e.grace_period.as_ref().and_then(duration_ms));
            out.extend_from_slice(b",\"successor_key_id\":");
            json_string(out, &e.successor_key_id);
            out.push(b'}');
        }
    }
}

/// A JSON string, escaped exactly as `serde_json` escapes it.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Serializing a `str` into a vector cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn json_number(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{n}");
}

fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
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
        Payload::KeyCreated(e) => {
            let mut created = json!({
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
            });
            if !e.rolled_from_key_id.is_empty() {
                created["rolled_from_key_id"] = json!(e.rolled_from_key_id);
            }
            created
        }
        Payload::KeyRenamed(e) => json!({ "name": e.name }),
        Payload::KeyScopesChanged(e) => json!({ "scopes": e.scopes }),
        Payload::KeyRevoked(_) | Payload::KeyRevealed(_) => json!({}),
        Payload::KeyRolled(e) => json!({
            "successor_key_id": e.successor_key_id,
            "grace_period_ms": e.grace_period.as_ref().and_then(duration_ms),
            "expires_at_ms": e.expires_at.as_ref().map(timestamp_ms),
        }),
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

    /// The line as the export wrote it before lines were written by hand: a
    /// `serde_json::Value`, whose object members serialize in name order.
    fn line_through_a_json_tree(r: &LogRecord) -> String {
        let event = events::decode_payload(&r.event_type, r.schema_version, &r.payload)
            .map(|p| payload_json(&p))
            .unwrap_or_else(|e| json!({ "undecodable": e }));
        json!({
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
        })
        .to_string()
    }

    #[test]
    fn lines_are_the_bytes_a_json_tree_gives() {
        let created = |expires: Option<i64>, domains: Vec<String>| pb::KeyCreated {
            schema_version: 2,
            key_id: "key_01JGFJJZ000000000000000001".into(),
            workspace_id: "ws_\u{e9}t\u{e9}".into(),
            name: "Deploy \"prod\" \\ key \u{1f511}\u{7f}".into(),
            r#type: pb::KeyType::Public as i32,
            environment: pb::Environment::Production as i32,
            scopes: vec!["tickets:read".into(), "teams:read".into()],
            full_access: false,
            secret_hash: vec![0xab; 32],
            masked: "pk_\u{2026}Ab12".into(),
            public_key: "pk_x".into(),
            allowed_domains: domains,
            reveal_later: true,
            created_at: Some(crate::proto::convert::timestamp(1_767_225_600_123)),
            expires_at: expires.map(crate::proto::convert::timestamp),
            rolled_from_key_id: String::new(),
        };
        let record = |event_type: &str, schema_version: u32, payload: Vec<u8>| LogRecord {
            sequence: u64::MAX,
            key_id: "key_\n\u{1}".into(),
            workspace_id: "ws</script>".into(),
            stream_version: 7,
            event_type: event_type.into(),
            schema_version,
            payload,
            actor: "user \t\r\u{8}\u{c}\"".into(),
            recorded_at_ms: i64::MIN,
            hash: std::array::from_fn(|i| i as u8),
            workspace_hash: [0xff; 32],
            caller_identity: None,
        };
        use prost::Message as _;
        let records = [
            record(
                "KeyCreated",
                2,
                created(Some(-1), vec!["app.example.com".into(), "*.b.org".into()]).encode_to_vec(),
            ),
            record("KeyCreated", 2, created(None, vec![]).encode_to_vec()),
            record(
                "KeyCreated",
                1,
                pb::KeyCreatedV1 {
                    key_id: "key_01".into(),
                    created_at_ms: 5,
                    expires_at_ms: Some(6),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            record(
                "KeyRenamed",
                1,
                pb::KeyRenamed {
                    schema_version: 1,
                    name: "\u{0}\u{1f}x".into(),
                }
                .encode_to_vec(),
            ),
            record(
                "KeyScopesChanged",
                1,
                pb::KeyScopesChanged {
                    schema_version: 1,
                    scopes: vec!["members:read".into()],
                }
                .encode_to_vec(),
            ),
            record("KeyScopesChanged", 1, vec![]),
            record("KeyRevoked", 1, vec![8, 1]),
            record("KeyRevealed", 1, vec![]),
            record(
                "KeyCreated",
                2,
                pb::KeyCreated {
                    rolled_from_key_id: "key_01JGFJJZ000000000000000002".into(),
                    ..created(Some(7), vec![])
                }
                .encode_to_vec(),
            ),
            record(
                "KeyRolled",
                1,
                pb::KeyRolled {
                    schema_version: 1,
                    successor_key_id: "key_01JGFJJZ000000000000000003".into(),
                    grace_period: Some(crate::proto::convert::duration(3_600_000)),
                    expires_at: Some(crate::proto::convert::timestamp(1_767_229_200_000)),
                }
                .encode_to_vec(),
            ),
            record("KeyRolled", 1, vec![]),
            record("KeyRenamed", 1, vec![0xff, 0xff, 0xff]),
            record("KeyDeleted", 1, vec![1, 2, 3]),
            record("KeyRevoked", 9, vec![]),
        ];
        for r in &records {
            assert_eq!(record_line(r), line_through_a_json_tree(r), "{r:?}");
            assert_eq!(parse_record(&record_line(r)).as_ref(), Ok(r));
        }
        let mut written = Vec::new();
        let many: Vec<LogRecord> = records.iter().cycle().take(5000).cloned().collect();
        write_lines(&many, &mut written).unwrap();
        let expected: String = many
            .iter()
            .map(|r| line_through_a_json_tree(r) + "\n")
            .collect();
        assert_eq!(String::from_utf8(written).unwrap(), expected);
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
