//! AuditService over gRPC (ReadEvents, SubscribeEvents, GetLogHead, GetKeysAsOf), its roles, and the `kemon-keys audit` CLI against a live server, export files and the schema-v1 fixture.

use std::collections::HashMap;
use std::time::Duration;

use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::audit_service_client::AuditServiceClient;
use pb::log_event::Payload;
use pb::subscribe_events_response::Message;
use prost::Message as _;
use serde_json::Value;
use sha3::{Digest, Sha3_256};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::helpers::*;
use crate::inspect::Events;
use crate::story::Story;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/schema-v1-workspace-export.ndjson"
);
const FIXTURE_HEAD: &str = "4:827d9448e6181a78ef415a03bbc3c51b95e9ffd88f49e2924b749ef9c54bfd49";
const LEGACY_KEY: &str = "key_01JGFJJZ000000000000000001";

// ----------------------------------------------------------------------------------------------
// Helpers

async fn read_events_as(
    audit: &mut AuditServiceClient<Channel>,
    role: Option<&str>,
    request: pb::ReadEventsRequest,
) -> Result<Vec<pb::LogEvent>, Status> {
    let mut stream = audit
        .read_events(Caller::maybe_role(role).request(request))
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.push(event);
    }
    Ok(events)
}

async fn read_events(
    audit: &mut AuditServiceClient<Channel>,
    request: pb::ReadEventsRequest,
) -> Vec<pb::LogEvent> {
    read_events_as(audit, Some("auditor"), request)
        .await
        .expect("read_events")
}

async fn all_events(audit: &mut AuditServiceClient<Channel>) -> Vec<pb::LogEvent> {
    read_events(audit, pb::ReadEventsRequest::default()).await
}

fn sequences(events: &[pb::LogEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

fn filtered(after: u64, limit: u64, filter: pb::EventFilter) -> pb::ReadEventsRequest {
    pb::ReadEventsRequest {
        after_sequence: after,
        limit,
        filter: Some(filter),
    }
}

async fn keys_as_of(
    audit: &mut AuditServiceClient<Channel>,
    workspace: &str,
    key_id: &str,
    at: u64,
) -> pb::GetKeysAsOfResponse {
    audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: workspace.into(),
            key_id: key_id.into(),
            at_sequence: at,
        }))
        .await
        .expect("get_keys_as_of")
        .into_inner()
}

fn sha3(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha3_256::new();
    for part in parts {
        h.update(part);
    }
    h.finalize().to_vec()
}

/// The canonical bytes of an event, written from the spec in `audit.proto` (not with the
/// service's own code), so the chains are checked against the documentation.
fn spec_canonical(e: &pb::LogEvent) -> Vec<u8> {
    fn lp(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&e.sequence.to_be_bytes());
    lp(&mut out, e.key_id.as_bytes());
    lp(&mut out, e.workspace_id.as_bytes());
    out.extend_from_slice(&e.stream_version.to_be_bytes());
    lp(&mut out, e.event_type.as_bytes());
    out.extend_from_slice(&e.schema_version.to_be_bytes());
    lp(&mut out, &e.stored_payload);
    lp(&mut out, e.actor.as_bytes());
    out.extend_from_slice(&e.recorded_at_ms.to_be_bytes());
    out
}

fn log_genesis() -> Vec<u8> {
    sha3(&[b"kemon-keys/events/genesis/v1"])
}

fn workspace_genesis(workspace: &str) -> Vec<u8> {
    sha3(&[b"kemon-keys/workspace/genesis/v1/", workspace.as_bytes()])
}

/// Recomputes both chains over the whole log from the spec and compares every stored hash.
#[track_caller]
fn assert_chains_match_the_spec(events: &[pb::LogEvent]) {
    let mut log = log_genesis();
    let mut workspaces: HashMap<String, Vec<u8>> = HashMap::new();
    for e in events {
        let canonical = spec_canonical(e);
        log = sha3(&[&log, &canonical]);
        assert_eq!(e.hash, log, "log chain at sequence {}", e.sequence);
        let previous = workspaces
            .get(&e.workspace_id)
            .cloned()
            .unwrap_or_else(|| workspace_genesis(&e.workspace_id));
        let workspace_hash = sha3(&[&previous, &canonical]);
        assert_eq!(
            e.workspace_hash, workspace_hash,
            "workspace chain at sequence {}",
            e.sequence
        );
        workspaces.insert(e.workspace_id.clone(), workspace_hash);
    }
}

/// Whether any `window`-byte run of `secret` occurs in `haystack`.
fn holds_part_of(haystack: &[u8], secret: &str, window: usize) -> bool {
    secret
        .as_bytes()
        .windows(window)
        .any(|part| haystack.windows(window).any(|w| w == part))
}

// ----------------------------------------------------------------------------------------------
// ReadEvents

#[tokio::test]
async fn read_events_returns_every_event_in_order_with_decoded_payloads() {
    let server = TestServer::start().await;
    let s = Story::write(&server).await;
    let mut audit = server.audit().await;
    let events = all_events(&mut audit).await;

    let expected: [(&str, &str, u64, &str, u32, &str); 7] = [
        (
            s.a.key_id.as_str(),
            WORKSPACE,
            1,
            "KeyCreated",
            2,
            "user_alice",
        ),
        (
            s.a.key_id.as_str(),
            WORKSPACE,
            2,
            "KeyRenamed",
            1,
            "user_bob",
        ),
        (
            s.a.key_id.as_str(),
            WORKSPACE,
            3,
            "KeyScopesChanged",
            1,
            "user_bob",
        ),
        (
            s.b.key_id.as_str(),
            OTHER_WORKSPACE,
            1,
            "KeyCreated",
            2,
            "user_alice",
        ),
        (
            s.c.key_id.as_str(),
            WORKSPACE,
            1,
            "KeyCreated",
            2,
            "user_alice",
        ),
        (
            s.a.key_id.as_str(),
            WORKSPACE,
            4,
            "KeyRevoked",
            1,
            "user_carol",
        ),
        (
            s.b.key_id.as_str(),
            OTHER_WORKSPACE,
            2,
            "KeyRenamed",
            1,
            "user_bob",
        ),
    ];
    assert_eq!(events.len(), expected.len(), "{events:#?}");
    for (i, (e, (key_id, workspace, stream_version, event_type, schema, actor))) in
        events.iter().zip(expected).enumerate()
    {
        let sequence = i as u64 + 1;
        assert_eq!(e.sequence, sequence, "{e:?}");
        assert_eq!(e.key_id, key_id, "{e:?}");
        assert_eq!(e.workspace_id, workspace, "{e:?}");
        assert_eq!(e.stream_version, stream_version, "{e:?}");
        assert_eq!(e.event_type, event_type, "{e:?}");
        assert_eq!(e.schema_version, schema, "{e:?}");
        assert_eq!(e.actor, actor, "{e:?}");
        let at_ms = T0_MS + i as i64 * 1000;
        assert_eq!(e.recorded_at_ms, at_ms, "{e:?}");
        assert_eq!(
            e.recorded_at,
            Some(prost_types::Timestamp {
                seconds: at_ms / 1000,
                nanos: 0
            }),
            "{e:?}"
        );
        assert_eq!(e.hash.len(), 32, "{e:?}");
        assert_eq!(e.workspace_hash.len(), 32, "{e:?}");
        assert!(!e.stored_payload.is_empty(), "{e:?}");
    }
    let distinct: std::collections::HashSet<_> = events.iter().map(|e| &e.hash).collect();
    assert_eq!(distinct.len(), events.len(), "every event has its own hash");

    match &events[0].payload {
        Some(Payload::KeyCreated(c)) => {
            assert_eq!(c.schema_version, 2);
            assert_eq!(c.key_id, s.a.key_id);
            assert_eq!(c.workspace_id, WORKSPACE);
            assert_eq!(c.name, "CI deploy");
            assert_eq!(c.r#type, pb::KeyType::Private as i32);
            assert_eq!(c.environment, pb::Environment::Production as i32);
            assert_eq!(c.scopes, ["tickets:read"]);
            assert!(!c.full_access);
            assert_eq!(c.secret_hash.len(), 32);
            assert_eq!(c.masked, s.a.masked);
            assert_eq!(c.public_key, "");
            assert_eq!(c.created_at, s.a.created_at);
            assert_eq!(c.expires_at, s.a.expires_at);
            assert_eq!(
                pb::KeyCreated::decode(&events[0].stored_payload[..]).unwrap(),
                *c
            );
        }
        other => panic!("sequence 1: expected key_created, got {other:?}"),
    }
    let renamed = pb::KeyRenamed {
        schema_version: 1,
        name: "CI deploy (old)".into(),
    };
    assert_eq!(
        events[1].payload,
        Some(Payload::KeyRenamed(renamed.clone()))
    );
    assert_eq!(events[1].stored_payload, renamed.encode_to_vec());
    assert_eq!(
        events[2].payload,
        Some(Payload::KeyScopesChanged(pb::KeyScopesChanged {
            schema_version: 1,
            scopes: s.rescoped.clone(),
        }))
    );
    match &events[3].payload {
        Some(Payload::KeyCreated(c)) => {
            assert_eq!(c.key_id, s.b.key_id);
            assert_eq!(c.workspace_id, OTHER_WORKSPACE);
            assert_eq!(c.name, "Widget");
            assert_eq!(c.r#type, pb::KeyType::Public as i32);
            assert_eq!(c.public_key, s.b_secret, "public keys are not secret");
            assert_eq!(c.allowed_domains, ["app.example.com"]);
        }
        other => panic!("sequence 4: expected key_created, got {other:?}"),
    }
    match &events[4].payload {
        Some(Payload::KeyCreated(c)) => {
            assert_eq!(c.key_id, s.c.key_id);
            assert_eq!(c.name, "Backup");
            assert!(c.full_access);
            assert!(c.scopes.is_empty());
        }
        other => panic!("sequence 5: expected key_created, got {other:?}"),
    }
    assert_eq!(
        events[5].payload,
        Some(Payload::KeyRevoked(pb::KeyRevoked { schema_version: 1 }))
    );
    assert_eq!(
        events[6].payload,
        Some(Payload::KeyRenamed(pb::KeyRenamed {
            schema_version: 1,
            name: "Widget v2".into(),
        }))
    );

    assert_chains_match_the_spec(&events);
}

#[tokio::test]
async fn after_sequence_and_limit_page_through_the_log() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let mut audit = server.audit().await;
    let all = all_events(&mut audit).await;
    assert_eq!(sequences(&all), [1, 2, 3, 4, 5, 6, 7]);

    let page = |after, limit| pb::ReadEventsRequest {
        after_sequence: after,
        limit,
        filter: None,
    };
    assert_eq!(
        read_events(&mut audit, page(2, 2)).await,
        all[2..4].to_vec()
    );
    assert_eq!(sequences(&read_events(&mut audit, page(0, 1)).await), [1]);
    assert_eq!(
        sequences(&read_events(&mut audit, page(3, 0)).await),
        [4, 5, 6, 7],
        "limit 0: to the end"
    );
    assert_eq!(
        sequences(&read_events(&mut audit, page(5, 100)).await),
        [6, 7]
    );
    assert!(read_events(&mut audit, page(7, 0)).await.is_empty());
    assert!(read_events(&mut audit, page(1000, 0)).await.is_empty());

    // Paging with after_sequence = the last one seen gives the whole log exactly once.
    let mut paged = Vec::new();
    loop {
        let after = paged.last().map_or(0, |e: &pb::LogEvent| e.sequence);
        let next = read_events(&mut audit, page(after, 3)).await;
        assert!(next.len() <= 3, "{next:?}");
        if next.is_empty() {
            break;
        }
        paged.extend(next);
    }
    assert_eq!(paged, all);
}

#[tokio::test]
async fn filters_select_by_workspace_key_and_event_type() {
    let server = TestServer::start().await;
    let s = Story::write(&server).await;
    let mut audit = server.audit().await;
    let all = all_events(&mut audit).await;
    let by_workspace = |w: &str| pb::EventFilter {
        workspace_id: w.into(),
        ..Default::default()
    };
    let by_key = |k: &str| pb::EventFilter {
        key_id: k.into(),
        ..Default::default()
    };
    let by_types = |types: &[&str]| pb::EventFilter {
        event_types: types.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };

    let acme = read_events(&mut audit, filtered(0, 0, by_workspace(WORKSPACE))).await;
    assert_eq!(sequences(&acme), [1, 2, 3, 5, 6]);
    assert!(acme.iter().all(|e| e.workspace_id == WORKSPACE));
    assert_eq!(acme[3], all[4], "filtered events are the same events");
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(0, 0, by_workspace(OTHER_WORKSPACE))).await),
        [4, 7]
    );
    assert!(
        read_events(&mut audit, filtered(0, 0, by_workspace("ws_nobody")))
            .await
            .is_empty()
    );

    let a_events = read_events(&mut audit, filtered(0, 0, by_key(&s.a.key_id))).await;
    assert_eq!(sequences(&a_events), [1, 2, 3, 6]);
    assert!(a_events.iter().all(|e| e.key_id == s.a.key_id));
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(0, 0, by_key(&s.c.key_id))).await),
        [5]
    );

    assert_eq!(
        sequences(
            &read_events(
                &mut audit,
                filtered(0, 0, by_types(&["KeyRenamed", "KeyRevoked"]))
            )
            .await
        ),
        [2, 6, 7]
    );
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(0, 0, by_types(&["KeyCreated"]))).await),
        [1, 4, 5]
    );
    assert!(
        read_events(&mut audit, filtered(0, 0, by_types(&["KeyRevealed"])))
            .await
            .is_empty()
    );

    // Filters combine with each other and with after_sequence and limit.
    let combined = pb::EventFilter {
        workspace_id: OTHER_WORKSPACE.into(),
        key_id: String::new(),
        event_types: vec!["KeyRenamed".into()],
    };
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(0, 0, combined)).await),
        [7]
    );
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(1, 0, by_key(&s.a.key_id))).await),
        [2, 3, 6]
    );
    assert_eq!(
        sequences(&read_events(&mut audit, filtered(2, 1, by_key(&s.a.key_id))).await),
        [3],
        "limit counts matching events"
    );

    let unknown = audit
        .read_events(auditor(filtered(
            0,
            0,
            by_types(&["KeyRenamed", "KeyDeleted"]),
        )))
        .await
        .map(|_| ());
    let reasons = assert_invalid(unknown, "filter.event_types");
    assert!(
        reasons.iter().any(|r| r.contains("KeyDeleted")),
        "{reasons:?}"
    );
    let unknown = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: Some(by_types(&["keyrenamed"])),
        }))
        .await
        .map(|_| ());
    assert_invalid(unknown, "filter.event_types");
}

// ----------------------------------------------------------------------------------------------
// RevealKey in the log

#[tokio::test]
async fn a_reveal_is_recorded_with_its_actor_but_no_part_of_the_secret_and_keeps_the_version() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    let mut request = private_key("Revealable", &["tickets:read"]);
    request.reveal_later = true;
    let (key, secret) = keys.create(request).await;
    server.clock.advance(Duration::from_secs(1));

    let revealed = keys.acting("user_dana", "owner").reveal(&key.key_id).await;
    assert_eq!(revealed, secret);

    let events = all_events(&mut audit).await;
    assert_eq!(sequences(&events), [1, 2]);
    let reveal = &events[1];
    assert_eq!(reveal.event_type, "KeyRevealed");
    assert_eq!(reveal.key_id, key.key_id);
    assert_eq!(reveal.workspace_id, WORKSPACE);
    assert_eq!(reveal.stream_version, 2);
    assert_eq!(reveal.actor, "user_dana", "the revealer is the actor");
    assert_eq!(reveal.recorded_at_ms, T0_MS + 1000);
    assert_eq!(
        reveal.payload,
        Some(Payload::KeyRevealed(pb::KeyRevealed { schema_version: 1 }))
    );
    assert_eq!(
        reveal.stored_payload,
        pb::KeyRevealed { schema_version: 1 }.encode_to_vec()
    );
    assert!(
        !holds_part_of(&reveal.stored_payload, &secret, 4),
        "{reveal:?}"
    );
    for event in &events {
        assert!(
            !holds_part_of(&event.stored_payload, &secret, 8),
            "the stored payload of {} holds part of the secret",
            event.sequence
        );
        assert!(
            !holds_part_of(&event.encode_to_vec(), &secret, 8),
            "event {} holds part of the secret",
            event.sequence
        );
    }
    assert_chains_match_the_spec(&events);

    // A reveal is not a change of the key: its version stays, expected_version still works.
    let after_reveal = keys.get_key(&key.key_id).await;
    assert_eq!(after_reveal.version, 1);
    assert_eq!(after_reveal.name, "Revealable");
    let renamed = keys
        .try_rename(&key.key_id, "Revealed once", Some(1))
        .await
        .expect("expected_version 1 still matches after a reveal");
    assert_eq!(renamed.version, 2);
    let events = all_events(&mut audit).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].event_type, "KeyRenamed");
    assert_eq!(
        events[2].stream_version, 3,
        "the reveal took stream version 2"
    );
}

// ----------------------------------------------------------------------------------------------
// GetLogHead and GetKeysAsOf

#[tokio::test]
async fn the_log_head_is_the_last_event_and_the_workspace_head_its_workspace_chain() {
    let server = TestServer::start().await;
    let mut audit = server.audit().await;

    let empty = log_head(&mut audit, WORKSPACE).await;
    assert_eq!(empty.sequence, 0);
    assert_eq!(
        empty.hash,
        log_genesis(),
        "an empty log's head is the genesis"
    );
    assert_eq!(empty.workspace_sequence, 0);
    assert_eq!(empty.workspace_hash, workspace_genesis(WORKSPACE));

    Story::write(&server).await;
    let events = all_events(&mut audit).await;

    let head = log_head(&mut audit, "").await;
    assert_eq!(head.sequence, 7);
    assert_eq!(head.hash, events[6].hash);
    assert_eq!(head.workspace_sequence, 0);
    assert!(
        head.workspace_hash.is_empty(),
        "no workspace asked for: {head:?}"
    );

    let acme = log_head(&mut audit, WORKSPACE).await;
    assert_eq!((acme.sequence, &acme.hash), (7, &events[6].hash));
    assert_eq!(acme.workspace_sequence, 6, "ws_acme's last event is 6");
    assert_eq!(acme.workspace_hash, events[5].workspace_hash);

    let globex = log_head(&mut audit, OTHER_WORKSPACE).await;
    assert_eq!(globex.workspace_sequence, 7);
    assert_eq!(globex.workspace_hash, events[6].workspace_hash);

    let unused = log_head(&mut audit, "ws_unused").await;
    assert_eq!(unused.sequence, 7);
    assert_eq!(unused.workspace_sequence, 0);
    assert_eq!(unused.workspace_hash, workspace_genesis("ws_unused"));

    let bad = audit
        .get_log_head(auditor(pb::GetLogHeadRequest {
            workspace_id: "not a workspace!".into(),
        }))
        .await;
    assert_invalid(bad, "workspace_id");
}

#[tokio::test]
async fn keys_as_of_replays_the_log_up_to_a_sequence() {
    let server = TestServer::start().await;
    let s = Story::write(&server).await;
    let mut keys = server.client().await;
    let mut audit = server.audit().await;

    let at1 = keys_as_of(&mut audit, WORKSPACE, "", 1).await;
    assert_eq!(at1.at_sequence, 1);
    assert_eq!(at1.keys.len(), 1, "{at1:?}");
    let a1 = &at1.keys[0];
    assert_eq!(a1.key_id, s.a.key_id);
    assert_eq!(a1.name, "CI deploy", "the name before the rename");
    assert_eq!(a1.scopes, ["tickets:read"]);
    assert_eq!(a1.version, 1);
    assert_eq!(a1.revoked_at, None);
    assert_eq!(a1.created_by, "user_alice");

    let at2 = keys_as_of(&mut audit, WORKSPACE, "", 2).await;
    assert_eq!(at2.keys.len(), 1);
    assert_eq!(at2.keys[0].name, "CI deploy (old)");
    assert_eq!(at2.keys[0].version, 2);

    let at5 = keys_as_of(&mut audit, WORKSPACE, "", 5).await;
    let ids: Vec<&str> = at5.keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(ids, [&s.a.key_id, &s.c.key_id], "oldest first");
    assert_eq!(at5.keys[0].scopes, s.rescoped);
    assert_eq!(
        at5.keys[0].revoked_at, None,
        "not revoked before the revoke"
    );
    assert_eq!(at5.keys[0].version, 3);

    let at6 = keys_as_of(&mut audit, WORKSPACE, "", 6).await;
    assert_eq!(
        at6.keys[0].revoked_at,
        Some(prost_types::Timestamp {
            seconds: (T0_MS + 5000) / 1000,
            nanos: 0
        })
    );

    // 0: the current head, which is what the projection says now.
    let now = keys_as_of(&mut audit, WORKSPACE, "", 0).await;
    assert_eq!(now.at_sequence, 7);
    assert_eq!(
        now.keys,
        [
            keys.get_key(&s.a.key_id).await,
            keys.get_key(&s.c.key_id).await,
        ]
    );

    // Another workspace's keys are not included; one key can be asked for.
    assert!(
        keys_as_of(&mut audit, OTHER_WORKSPACE, "", 3)
            .await
            .keys
            .is_empty()
    );
    let b_at4 = keys_as_of(&mut audit, OTHER_WORKSPACE, "", 4).await;
    assert_eq!(b_at4.keys.len(), 1);
    assert_eq!(b_at4.keys[0].name, "Widget");
    assert_eq!(
        keys_as_of(&mut audit, OTHER_WORKSPACE, "", 0).await.keys[0],
        s.b
    );
    let only_c = keys_as_of(&mut audit, WORKSPACE, &s.c.key_id, 0).await;
    assert_eq!(only_c.keys.len(), 1);
    assert_eq!(only_c.keys[0].key_id, s.c.key_id);
    assert!(
        keys_as_of(&mut audit, WORKSPACE, &s.c.key_id, 4)
            .await
            .keys
            .is_empty(),
        "c did not exist yet at 4"
    );

    let beyond = audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: WORKSPACE.into(),
            key_id: String::new(),
            at_sequence: 8,
        }))
        .await;
    assert_invalid(beyond, "at_sequence");
}

// ----------------------------------------------------------------------------------------------
// Roles

/// Subscribes from the start and reads up to `caught_up`: the events sent before it, and its
/// sequence.
async fn subscribe_until_caught_up(
    audit: &mut AuditServiceClient<Channel>,
    role: Option<&str>,
) -> Result<(Vec<u64>, u64), Status> {
    let mut stream = audit
        .subscribe_events(
            Caller::maybe_role(role).request(pb::SubscribeEventsRequest {
                after_sequence: 0,
                filter: None,
            }),
        )
        .await?
        .into_inner();
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no subscription message within 10 s")?;
        match next.and_then(|m| m.message).expect("a message") {
            Message::Event(e) => events.push(e.sequence),
            Message::CaughtUp(c) => return Ok((events, c.sequence)),
            other => panic!("before caught_up: {other:?}"),
        }
    }
}

/// Calls every AuditService RPC with `role` and returns each outcome.
async fn every_audit_rpc(
    audit: &mut AuditServiceClient<Channel>,
    role: Option<&str>,
) -> Vec<(&'static str, Result<(), Status>)> {
    let read = read_events_as(audit, role, pb::ReadEventsRequest::default())
        .await
        .map(|events| assert!(!events.is_empty()));
    let subscribe = subscribe_until_caught_up(audit, role)
        .await
        .map(|caught_up| assert_eq!(caught_up, (vec![1], 1)));
    let head = audit
        .get_log_head(Caller::maybe_role(role).request(pb::GetLogHeadRequest::default()))
        .await
        .map(|h| assert_eq!(h.into_inner().sequence, 1));
    let as_of = audit
        .get_keys_as_of(Caller::maybe_role(role).request(pb::GetKeysAsOfRequest {
            workspace_id: WORKSPACE.into(),
            key_id: String::new(),
            at_sequence: 0,
        }))
        .await
        .map(|r| assert_eq!(r.into_inner().keys.len(), 1));
    vec![
        ("ReadEvents", read),
        ("SubscribeEvents", subscribe),
        ("GetLogHead", head),
        ("GetKeysAsOf", as_of),
    ]
}

#[tokio::test]
async fn the_audit_api_is_for_owners_admins_and_auditors_only() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    let (key, _) = keys.create(private_key("Audited", &["tickets:read"])).await;

    for (rpc, outcome) in every_audit_rpc(&mut audit, Some("member")).await {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
        assert_eq!(
            metadata,
            [
                ("role".to_owned(), "member".to_owned()),
                ("permission".to_owned(), "audit".to_owned()),
                ("allowed_roles".to_owned(), "owner,admin,auditor".to_owned()),
            ]
            .into(),
            "{rpc}"
        );
    }
    for (rpc, outcome) in every_audit_rpc(&mut audit, None).await {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::Unauthenticated, "ACTOR_MISSING");
        assert_eq!(metadata["header"], "x-kemon-actor", "{rpc}");
    }
    for role in ["auditor", "admin", "owner"] {
        for (rpc, outcome) in every_audit_rpc(&mut audit, Some(role)).await {
            if let Err(status) = outcome {
                panic!("{role} {rpc}: {status:?}");
            }
        }
    }

    // Auditors read, but change and reveal nothing.
    let mut revealable = private_key("Revealable", &[]);
    revealable.reveal_later = true;
    let mut auditor = keys.as_role("auditor");
    let denied: Vec<(&str, Result<(), Status>)> = vec![
        ("CreateKey", auditor.try_create(revealable).await.map(drop)),
        (
            "RenameKey",
            auditor
                .try_rename(&key.key_id, "Mine now", None)
                .await
                .map(drop),
        ),
        (
            "UpdateKeyScopes",
            auditor
                .try_rescope(&key.key_id, &["tickets:write"], None)
                .await
                .map(drop),
        ),
        (
            "RevokeKey",
            auditor.try_revoke(&key.key_id, None).await.map(drop),
        ),
        ("RevealKey", auditor.try_reveal(&key.key_id).await.map(drop)),
    ];
    for (rpc, outcome) in denied {
        let status = outcome.expect_err(rpc);
        let metadata = assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
        assert_eq!(metadata["role"], "auditor", "{rpc}");
        assert_eq!(metadata["permission"], "manage_keys", "{rpc}");
    }
    assert_eq!(
        sequences(&all_events(&mut audit).await),
        [1],
        "refused calls record nothing"
    );
    assert_eq!(keys.get_key(&key.key_id).await, key);
}

// ----------------------------------------------------------------------------------------------
// Errors: every bad field at once, and a reason for every refusal

#[tokio::test]
async fn audit_requests_name_every_bad_field() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    keys.create(private_key("Audited", &[])).await;

    let status = audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: "ws acme".into(),
            key_id: "key_nope".into(),
            at_sequence: 99,
        }))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["at_sequence", "key_id", "workspace_id"]
    );

    let filter = pb::EventFilter {
        workspace_id: "ws/acme".into(),
        key_id: "nope".into(),
        event_types: vec!["KeyRevoked".into(), "KeyDeleted".into()],
    };
    let read = read_events_as(&mut audit, Some("auditor"), filtered(0, 0, filter.clone()))
        .await
        .map(drop);
    let subscribe = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: Some(filter),
        }))
        .await
        .map(drop);
    for (rpc, outcome) in [("ReadEvents", read), ("SubscribeEvents", subscribe)] {
        let status = outcome.expect_err(rpc);
        assert_eq!(
            bad_fields(&status),
            ["filter.event_types", "filter.key_id", "filter.workspace_id"],
            "{rpc}"
        );
    }
}

#[tokio::test]
async fn subscribing_past_the_end_of_the_log_is_sequence_out_of_range() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    keys.create(private_key("Audited", &[])).await;
    let status = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 5,
            filter: None,
        }))
        .await
        .map(drop)
        .unwrap_err();
    let metadata = assert_reason(&status, Code::OutOfRange, "SEQUENCE_OUT_OF_RANGE");
    assert_eq!(
        metadata,
        [
            ("after_sequence".to_owned(), "5".to_owned()),
            ("head_sequence".to_owned(), "1".to_owned()),
        ]
        .into()
    );
}

#[tokio::test]
async fn a_subscription_ended_by_shutdown_is_shutting_down_naming_where_to_resume() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    keys.create(private_key("Audited", &[])).await;
    let mut stream = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: None,
        }))
        .await
        .expect("subscribe")
        .into_inner();
    loop {
        let message = stream.message().await.expect("message").expect("open");
        if let Some(Message::CaughtUp(c)) = message.message {
            assert_eq!(c.sequence, 1);
            break;
        }
    }
    let stopping = tokio::spawn(server.stop());
    let status = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the subscription ends within 10 s")
        .expect_err("the subscription ends with an error");
    let metadata = assert_reason(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert_eq!(
        metadata,
        [("resume_after_sequence".to_owned(), "1".to_owned())].into()
    );
    let (_data, result) = stopping.await.expect("stop");
    result.expect("clean shutdown");
}

#[tokio::test]
async fn a_log_that_no_longer_replays_is_internal_and_tells_nothing_of_why() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    let (key, _) = keys.create(private_key("Audited", &[])).await;
    for name in ["Second", "Third"] {
        keys.rename(&key.key_id, name).await;
    }
    // Someone with the database deletes the middle event behind the server's back.
    let db = server.db();
    db.drop_append_only_guards().await;
    assert_eq!(db.delete_events(Events::Sequence(2)).await, Ok(1));

    let status = audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: WORKSPACE.into(),
            key_id: String::new(),
            at_sequence: 0,
        }))
        .await
        .unwrap_err();
    let metadata = assert_reason(&status, Code::Internal, "INTERNAL");
    assert!(metadata.is_empty(), "{metadata:?}");
    assert_eq!(status.message(), "internal error");
}

// ----------------------------------------------------------------------------------------------
// SubscribeEvents

/// Forwards every message of a subscription to a channel, so it is read while other tasks
/// write.
fn forward(
    mut stream: tonic::Streaming<pb::SubscribeEventsResponse>,
) -> mpsc::UnboundedReceiver<Result<Message, Status>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(response)) => Ok(response.message.expect("a message")),
                Ok(None) => break,
                Err(status) => Err(status),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                break;
            }
        }
    });
    rx
}

async fn next_message(rx: &mut mpsc::UnboundedReceiver<Result<Message, Status>>) -> Message {
    rx.recv()
        .await
        .expect("the subscription ended")
        .expect("the subscription failed")
}

/// Creates, renames and revokes keys: `operations` writes in all.
async fn writer(mut keys: TestClient, id: usize, operations: usize) {
    let mut current: Option<String> = None;
    for i in 0..operations {
        current = match (i % 3, current) {
            (1, Some(k)) => {
                keys.rename(&k, &format!("w{id} op{i}")).await;
                Some(k)
            }
            (2, Some(k)) => {
                keys.revoke(&k).await;
                None
            }
            _ => {
                let (key, _) = keys
                    .create(private_key(&format!("w{id} op{i}"), &["tickets:read"]))
                    .await;
                Some(key.key_id)
            }
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_sees_every_event_exactly_once_across_catch_up_and_live() {
    const BEFORE: u64 = 10;
    const WRITERS: usize = 4;
    const OPERATIONS: usize = 25;
    let (server, mut keys) = TestServer::with_client().await;
    for i in 0..BEFORE {
        keys.create(private_key(&format!("before {i}"), &[])).await;
    }
    let mut audit = server.audit().await;
    let stream = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: None,
        }))
        .await
        .expect("subscribe")
        .into_inner();
    let mut rx = forward(stream);

    // The writers start while the subscriber is still catching up.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(writer(server.client().await, w, OPERATIONS)));
    }
    for w in writers {
        w.await.expect("writer task");
    }
    let head = log_head(&mut audit, "").await;
    assert_eq!(head.sequence, BEFORE + (WRITERS * OPERATIONS) as u64);

    let (events, caught_up) = tokio::time::timeout(Duration::from_secs(20), async {
        let mut events: Vec<pb::LogEvent> = Vec::new();
        let mut caught_up: Vec<(usize, u64)> = Vec::new();
        while events.last().map_or(0, |e| e.sequence) < head.sequence {
            match next_message(&mut rx).await {
                Message::Event(e) => events.push(e),
                Message::CaughtUp(c) => caught_up.push((events.len(), c.sequence)),
                Message::Checkpoint(_) | Message::FellBehind(_) => {}
            }
        }
        (events, caught_up)
    })
    .await
    .expect("the subscriber did not reach the head within 20 s");

    let expected: Vec<u64> = (1..=head.sequence).collect();
    assert_eq!(
        sequences(&events),
        expected,
        "every event once, in order, no gaps"
    );
    assert!(!caught_up.is_empty(), "no caught_up before the head");
    assert!(caught_up[0].1 >= BEFORE, "{caught_up:?}");
    for (sent_before, sequence) in &caught_up {
        assert_eq!(
            *sent_before as u64, *sequence,
            "caught_up at {sequence} after {sent_before} events"
        );
    }
    assert_eq!(events, all_events(&mut audit).await);
    assert_chains_match_the_spec(&events);
}

#[tokio::test]
async fn a_filtered_subscriber_gets_only_its_key_and_checkpoints_past_the_rest() {
    let (server, mut keys) = TestServer::with_client().await;
    let mut audit = server.audit().await;
    let (a, _) = keys.create(private_key("Followed", &[])).await;
    let (b, _) = keys.create(private_key("Other", &[])).await;

    let stream = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: Some(pb::EventFilter {
                key_id: a.key_id.clone(),
                ..Default::default()
            }),
        }))
        .await
        .expect("subscribe")
        .into_inner();
    let mut rx = forward(stream);
    let mut seen: Vec<pb::LogEvent> = Vec::new();
    let caught_up = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match next_message(&mut rx).await {
                Message::Event(e) => seen.push(e),
                Message::CaughtUp(c) => return c.sequence,
                other => panic!("before caught_up: {other:?}"),
            }
        }
    })
    .await
    .expect("no caught_up within 10 s");
    assert_eq!(sequences(&seen), [1]);
    assert_eq!(caught_up, 2, "caught up to the head, past b's event");

    for (i, (key, name)) in [
        (&b, "b 1"),
        (&b, "b 2"),
        (&b, "b 3"),
        (&a, "a 1"),
        (&b, "b 4"),
        (&b, "b 5"),
    ]
    .into_iter()
    .enumerate()
    {
        keys.try_rename(&key.key_id, name, None)
            .await
            .unwrap_or_else(|e| panic!("rename {i}: {e:?}"));
    }
    let head = log_head(&mut audit, "").await.sequence;
    assert_eq!(head, 8);

    let checkpoint = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match next_message(&mut rx).await {
                Message::Event(e) => seen.push(e),
                Message::Checkpoint(c) => {
                    let last_seen = seen.last().map_or(0, |e| e.sequence);
                    assert!(
                        c.sequence >= last_seen,
                        "checkpoint {} behind event {last_seen}",
                        c.sequence
                    );
                    if c.sequence >= head {
                        return c.sequence;
                    }
                }
                Message::CaughtUp(_) | Message::FellBehind(_) => {}
            }
        }
    })
    .await
    .expect("no checkpoint reaching the head within 10 s");
    assert_eq!(checkpoint, head);
    assert!(seen.iter().all(|e| e.key_id == a.key_id), "{seen:?}");
    assert_eq!(sequences(&seen), [1, 6], "only a's events");
    assert_eq!(
        seen[1].payload,
        Some(Payload::KeyRenamed(pb::KeyRenamed {
            schema_version: 1,
            name: "a 1".into()
        }))
    );
}

// ----------------------------------------------------------------------------------------------
// The CLI against a live server and export files

#[tokio::test]
async fn cli_verify_against_a_live_server_prints_ok_and_the_head() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let mut audit = server.audit().await;
    let head = log_head(&mut audit, "").await;

    let out = Cli::kemon(&["audit", "verify", "--server", &server.endpoint()])
        .run()
        .await;
    let report = out.assert_success();
    assert!(report.starts_with("OK"), "{report}");
    assert!(
        report.contains(&format!("head {}", head_arg(head.sequence, &head.hash))),
        "{report}"
    );

    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--server",
        &server.endpoint(),
        "--expect-head",
        &head_arg(head.sequence, &head.hash),
    ])
    .run()
    .await;
    assert!(out.assert_success().starts_with("OK"));

    // The CLI sends its role: a member is refused.
    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--server",
        &server.endpoint(),
        "--role",
        "member",
    ])
    .run()
    .await;
    let report = out.assert_failure();
    assert!(!report.starts_with("OK"), "{report}");
}

#[tokio::test]
async fn a_workspace_export_of_the_database_verifies_from_the_file() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let mut audit = server.audit().await;
    let acme_head = log_head(&mut audit, WORKSPACE).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.ndjson");

    let out = Cli::kemon(&["audit", "export"])
        .args(server.source_args())
        .args(["--workspace", WORKSPACE, "-o", path_str(&file)])
        .run()
        .await;
    out.assert_success();
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 1 + 5, "a header and ws_acme's five events");
    assert_eq!(lines[0]["workspace_id"], WORKSPACE);
    let exported: Vec<u64> = lines[1..]
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(exported, [1, 2, 3, 5, 6]);

    let out = Cli::kemon(&["audit", "verify", "--file", path_str(&file)])
        .run()
        .await;
    let report = out.assert_success();
    assert!(report.starts_with("OK"), "{report}");
    assert!(report.contains(WORKSPACE), "{report}");
    let workspace_head = head_arg(acme_head.workspace_sequence, &acme_head.workspace_hash);
    assert!(report.contains(&workspace_head), "{report}");

    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--file",
        path_str(&file),
        "--expect-head",
        &workspace_head,
    ])
    .run()
    .await;
    assert!(out.assert_success().starts_with("OK"));
}

#[tokio::test]
async fn a_server_export_verifies_against_the_head_from_get_log_head() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let mut audit = server.audit().await;
    let head = log_head(&mut audit, "").await;
    let events = all_events(&mut audit).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log.ndjson");

    let out = Cli::kemon(&[
        "audit",
        "export",
        "--server",
        &server.endpoint(),
        "-o",
        path_str(&file),
    ])
    .run()
    .await;
    out.assert_success();
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 1 + events.len());

    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--file",
        path_str(&file),
        "--expect-head",
        &head_arg(head.sequence, &head.hash),
    ])
    .run()
    .await;
    let report = out.assert_success();
    assert!(report.starts_with("OK"), "{report}");

    // A head that is not this log's is refused.
    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--file",
        path_str(&file),
        "--expect-head",
        &head_arg(head.sequence, &events[5].hash),
    ])
    .run()
    .await;
    assert!(!out.assert_failure().starts_with("OK"));
    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--file",
        path_str(&file),
        "--expect-head",
        &head_arg(head.sequence + 1, &head.hash),
    ])
    .run()
    .await;
    assert!(
        !out.assert_failure().starts_with("OK"),
        "the export ends before the expected head"
    );
}

#[tokio::test]
async fn an_edited_export_line_fails_verification_at_its_sequence() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log.ndjson");
    let out = Cli::kemon(&[
        "audit",
        "export",
        "--server",
        &server.endpoint(),
        "-o",
        path_str(&file),
    ])
    .run()
    .await;
    out.assert_success();
    assert!(
        Cli::kemon(&["audit", "verify", "--file", path_str(&file)])
            .run()
            .await
            .assert_success()
            .starts_with("OK")
    );

    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut line: Value = serde_json::from_str(&lines[4]).unwrap();
    assert_eq!(line["sequence"], 4);
    assert_eq!(line["actor"], "user_alice");
    line["actor"] = Value::from("user_mallory");
    lines[4] = line.to_string();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let out = Cli::kemon(&["audit", "verify", "--file", path_str(&file)])
        .run()
        .await;
    let report = out.assert_failure();
    assert_eq!(first_bad_sequence(report), Some(4), "{report}");
}

#[tokio::test]
async fn the_schema_v1_fixture_verifies_against_its_recorded_head() {
    let out = Cli::kemon(&[
        "audit",
        "verify",
        "--file",
        FIXTURE,
        "--expect-head",
        FIXTURE_HEAD,
    ])
    .run()
    .await;
    let report = out.assert_success();
    assert!(report.starts_with("OK"), "{report}");
    assert!(report.contains("ws_legacy"), "{report}");
    assert!(report.contains(FIXTURE_HEAD), "{report}");
}

/// `audit keys` on the fixture: one JSON object per key.
async fn fixture_keys(at: Option<&str>) -> Vec<Value> {
    let mut args = vec![
        "audit",
        "keys",
        "--file",
        FIXTURE,
        "--workspace",
        "ws_legacy",
    ];
    if let Some(at) = at {
        args.extend(["--at", at]);
    }
    Cli::kemon(&args).run().await.json_lines()
}

#[tokio::test]
async fn the_schema_v1_fixture_replays_with_upcast_payloads() {
    let keys = fixture_keys(None).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let legacy = keys
        .iter()
        .find(|k| k["key_id"] == LEGACY_KEY)
        .expect("the legacy key");
    assert_eq!(legacy["name"], "Legacy deploy (old)");
    assert_eq!(legacy["workspace_id"], "ws_legacy");
    assert_eq!(
        legacy["created_at_ms"], 1_735_689_600_000_i64,
        "from created_at_ms of KeyCreatedV1"
    );
    assert_eq!(legacy["expires_at_ms"], 1_743_465_600_000_i64);
    assert!(legacy["revoked_at_ms"].is_i64(), "{legacy}");
    assert_eq!(legacy["revoked_at_ms"], 1_735_689_603_000_i64);
    assert_eq!(legacy["created_by"], "user_legacy");
    let widget = keys
        .iter()
        .find(|k| k["key_id"] == "key_01JGFJJZ000000000000000002")
        .expect("the widget key");
    assert_eq!(widget["name"], "Widget");
    assert_eq!(widget["created_at_ms"], 1_735_689_602_000_i64);
    assert!(widget["expires_at_ms"].is_null());

    let at1 = fixture_keys(Some("1")).await;
    assert_eq!(at1.len(), 1, "{at1:?}");
    assert_eq!(at1[0]["key_id"], LEGACY_KEY);
    assert_eq!(at1[0]["name"], "Legacy deploy");
    assert!(at1[0]["revoked_at_ms"].is_null(), "{}", at1[0]);
    assert_eq!(at1[0]["created_at_ms"], 1_735_689_600_000_i64);
}

/// A subscriber whose live buffer overflows is told it fell behind, and the server pages the
/// rest from the database: every event still arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_is_told_and_misses_nothing() {
    use pb::subscribe_events_response::Message;
    // One live slot. Sixteen concurrent writers make group commits of several events, each
    // batch published in one go after its commit: more than the buffer holds.
    let server = TestServer::start_with_live_buffer(1).await;
    let mut audit = server.audit().await;
    let mut stream = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest {
            after_sequence: 0,
            filter: None,
        }))
        .await
        .expect("subscribe")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().message;
    assert!(matches!(first, Some(Message::CaughtUp(_))), "{first:?}");

    let mut writers = Vec::new();
    for t in 0..16 {
        let mut client = server.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..100 {
                client
                    .create(private_key(&format!("lag {t}-{i}"), &[]))
                    .await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }

    let (mut sequences, mut fell_behind) = (Vec::new(), 0);
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while sequences.len() < 1600 {
            match stream.message().await.unwrap().unwrap().message {
                Some(Message::Event(e)) => sequences.push(e.sequence),
                Some(Message::FellBehind(_)) => fell_behind += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("all 1600 events within 30 s");
    assert!(
        fell_behind >= 1,
        "the subscriber was not told it fell behind"
    );
    assert_eq!(sequences, (1..=1600).collect::<Vec<u64>>());
}

#[tokio::test]
async fn cli_at_and_expect_head_mean_what_the_rpcs_mean() {
    let server = TestServer::start().await;
    Story::write(&server).await;
    let mut audit = server.audit().await;
    let head = log_head(&mut audit, "").await;
    let source = server.source_args();
    let cli_keys = |at: Option<String>| {
        let source = source.clone();
        async move {
            Cli::kemon(&["audit", "keys"])
                .args(source)
                .args(["--workspace", WORKSPACE])
                .args(at.iter().flat_map(|at| ["--at", at]))
                .run()
                .await
        }
    };
    let ids = |output: &Ran| -> Vec<String> {
        let mut ids: Vec<String> = output
            .json_lines()
            .iter()
            .map(|line| line["key_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let rpc_ids = |response: pb::GetKeysAsOfResponse| -> Vec<String> {
        let mut ids: Vec<String> = response.keys.into_iter().map(|k| k.key_id).collect();
        ids.sort();
        ids
    };

    // 0 is the end of the log, in both.
    let now = rpc_ids(keys_as_of(&mut audit, WORKSPACE, "", 0).await);
    assert!(!now.is_empty());
    assert_eq!(ids(&cli_keys(Some("0".into())).await), now);
    assert_eq!(ids(&cli_keys(None).await), now);
    // A sequence inside the log: the same keys.
    assert_eq!(
        ids(&cli_keys(Some("2".into())).await),
        rpc_ids(keys_as_of(&mut audit, WORKSPACE, "", 2).await)
    );
    // Past the end: refused by both.
    let past = head.sequence + 1;
    let status = audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: WORKSPACE.into(),
            key_id: String::new(),
            at_sequence: past,
        }))
        .await
        .expect_err("past the end");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let out = cli_keys(Some(past.to_string())).await;
    out.assert_failure();
    assert!(
        out.stderr
            .contains(&format!("the log ends at {}", head.sequence)),
        "{}",
        out.stderr
    );

    // --expect-head takes the hash as GetLogHead's JSON prints it (base64), as well as hex.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&head.hash);
    for expected in [
        format!("{}:{b64}", head.sequence),
        head_arg(head.sequence, &head.hash),
    ] {
        let out = Cli::kemon(&["audit", "verify"])
            .args(&source)
            .args(["--expect-head", &expected])
            .run()
            .await;
        assert!(out.assert_success().starts_with("OK"), "{expected}");
    }
}
