//! Key hygiene over gRPC: RollKey (overlap, the exact cut-over, the old hash leaving the
//! cache, refusals, retries), last used (after Verify, written every minute and at a stop),
//! and expiring soon (the ListKeys filter and WatchExpiring); the audit tools on rolls.

use std::time::Duration;

use kemon_keys::proto::v1 as pb;
use prost_types::Timestamp;
use tonic::{Code, Status};

use crate::helpers::*;

const HOUR_MS: i64 = 3_600_000;
const MINUTE_MS: i64 = 60_000;

fn grace(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn at(ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn ms(t: &Option<Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

fn roll_request(key_id: &str, grace_ms: Option<i64>, request_id: &str) -> pb::RollKeyRequest {
    pb::RollKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: key_id.into(),
        grace_period: grace_ms.and_then(grace),
        expected_version: None,
        request_id: request_id.into(),
    }
}

async fn try_roll(
    client: &mut TestClient,
    request: pb::RollKeyRequest,
) -> Result<pb::RollKeyResponse, Status> {
    let request = client.request(request);
    client
        .raw()
        .roll_key(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn roll(client: &mut TestClient, key_id: &str, grace_ms: i64) -> pb::RollKeyResponse {
    try_roll(client, roll_request(key_id, Some(grace_ms), ""))
        .await
        .expect("roll_key")
}

/// Verifies `secret` until its code is `want` (the cache's upkeep runs every quarter second).
async fn verify_until(client: &mut TestClient, secret: &str, want: pb::VerifyCode) {
    for _ in 0..200 {
        if code(&client.verify(secret, &[], "").await) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("VerifyKey never answered {want:?}");
}

#[tokio::test]
async fn a_rolled_key_overlaps_its_successor_then_stops_at_the_exact_instant() {
    let (server, mut client) = TestServer::with_client().await;
    let (old, old_secret) = client
        .create(private_key("CI deploy", &["tickets:read", "projects:read"]))
        .await;

    let rolled = roll(&mut client, &old.key_id, HOUR_MS).await;
    let new = rolled.key.expect("the successor");
    let previous = rolled.previous.expect("the old key");
    assert!(!rolled.replayed);
    assert_ne!(new.key_id, old.key_id);
    assert!(rolled.secret.starts_with("sk_") && rolled.secret != old_secret);
    assert_eq!(
        new.masked,
        format!("sk_…{}", &rolled.secret[rolled.secret.len() - 4..])
    );
    assert_eq!(
        (
            &new.name,
            new.r#type,
            new.environment,
            &new.scopes,
            new.full_access
        ),
        (
            &old.name,
            old.r#type,
            old.environment,
            &old.scopes,
            old.full_access
        )
    );
    assert_eq!(new.rolled_from_key_id, old.key_id);
    assert_eq!(new.version, 1);
    assert_eq!(
        ms(&new.expires_at),
        Some(T0_MS + 90 * DAY_MS),
        "the same lifetime, from now"
    );
    assert_eq!(previous.key_id, old.key_id);
    assert_eq!(previous.rolled_to_key_id, new.key_id);
    assert_eq!(previous.version, 2);
    assert_eq!(ms(&previous.expires_at), Some(T0_MS + HOUR_MS));
    assert_eq!(
        client.get_key(&old.key_id).await.rolled_to_key_id,
        new.key_id
    );

    // Both verify during the grace period.
    for secret in [&old_secret, &rolled.secret] {
        let answer = client.verify(secret, &["tickets:read"], "").await;
        assert_eq!(code(&answer), pb::VerifyCode::Valid);
    }
    server.clock.set_ms(T0_MS + HOUR_MS - 1);
    assert_eq!(
        code(&client.verify(&old_secret, &[], "").await),
        pb::VerifyCode::Valid
    );

    // The old one stops at the exact instant, then its hash leaves the cache.
    server.clock.set_ms(T0_MS + HOUR_MS);
    let at_end = client.verify(&old_secret, &[], "").await;
    assert!(!at_end.valid);
    assert!(
        matches!(
            code(&at_end),
            pb::VerifyCode::Expired | pb::VerifyCode::NotFound
        ),
        "{at_end:?}"
    );
    verify_until(&mut client, &old_secret, pb::VerifyCode::NotFound).await;
    assert_eq!(
        code(&client.verify(&rolled.secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    let old_now = client.get_key(&old.key_id).await;
    assert!(old_now.expired);

    // A restart does not bring the ended key's hash back.
    let mut server = server.restart().await;
    let mut client = server.client().await;
    assert_eq!(
        code(&client.verify(&old_secret, &[], "").await),
        pb::VerifyCode::NotFound
    );
    assert_eq!(
        code(&client.verify(&rolled.secret, &[], "").await),
        pb::VerifyCode::Valid
    );

    // The log, its export, the replay and the rebuild all know the roll.
    let events = server.db().events(Some(&old.key_id)).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["KeyCreated", "KeyRolled"]);
    let mut audit = server.audit().await;
    let as_of = audit
        .get_keys_as_of(auditor(pb::GetKeysAsOfRequest {
            workspace_id: WORKSPACE.into(),
            key_id: old.key_id.clone(),
            at_sequence: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_of.keys[0].rolled_to_key_id, new.key_id);
    let rolled_event = read_events_of(&mut audit, &old.key_id).await.pop().unwrap();
    let Some(pb::log_event::Payload::KeyRolled(payload)) = rolled_event.payload else {
        panic!("a decoded KeyRolled: {rolled_event:?}");
    };
    assert_eq!(payload.successor_key_id, new.key_id);
    assert_eq!(ms(&payload.expires_at), Some(T0_MS + HOUR_MS));
    let created = read_events_of(&mut audit, &new.key_id).await.remove(0);
    let Some(pb::log_event::Payload::KeyCreated(payload)) = created.payload else {
        panic!("a decoded KeyCreated: {created:?}");
    };
    assert_eq!(payload.rolled_from_key_id, old.key_id);
    assert!(
        created.sequence < rolled_event.sequence,
        "the successor first"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log.ndjson");
    Cli::kemon(&["audit", "export"])
        .args(server.source_args())
        .args(["-o", path_str(&file)])
        .run()
        .await
        .assert_success();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"event_type\":\"KeyRolled\""), "{text}");
    assert!(text.contains(&format!("\"rolled_from_key_id\":\"{}\"", old.key_id)));
    Cli::kemon(&["audit", "verify", "--file", path_str(&file)])
        .run()
        .await
        .assert_verified();
    Cli::kemon(&["audit", "verify"])
        .args(server.source_args())
        .run()
        .await
        .assert_verified();

    let db = server.db();
    drop(client);
    drop(audit);
    let data_dir = server.data_dir.clone();
    let (clock, key) = (server.clock.clone(), server.master_key_hex.clone());
    let tmp = server.shut_down().await;
    let original = db.projection().await;
    db.delete_key_rows(None).await;
    db.rebuild().await.expect("rebuild");
    assert_eq!(db.projection().await, original);
    server = TestServer::start_in(&data_dir, clock, kemon_keys::app::MasterKeySource::Hex(key))
        .await
        .expect("restart after the rebuild");
    let mut client = server.client().await;
    assert_eq!(
        client.get_key(&new.key_id).await.rolled_from_key_id,
        old.key_id
    );
    drop(tmp);
}

async fn read_events_of(
    audit: &mut kemon_keys::proto::v1::audit_service_client::AuditServiceClient<
        tonic::transport::Channel,
    >,
    key_id: &str,
) -> Vec<pb::LogEvent> {
    let mut stream = audit
        .read_events(auditor(pb::ReadEventsRequest {
            after_sequence: 0,
            limit: 0,
            filter: Some(pb::EventFilter {
                key_id: key_id.into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn a_roll_without_grace_ends_the_old_key_at_once_and_keeps_public_keys_shape() {
    let (_server, mut client) = TestServer::with_client().await;
    let (old, old_secret) = client
        .create(public_key(
            "Widget",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    let rolled = roll(&mut client, &old.key_id, 0).await;
    let new = rolled.key.unwrap();
    assert!(rolled.secret.starts_with("pk_"));
    assert_eq!(new.allowed_domains, ["app.example.com"]);
    assert!(new.revealable);
    assert_eq!(client.reveal(&new.key_id).await, rolled.secret);
    let origin = "https://app.example.com";
    assert_eq!(
        code(&client.verify(&old_secret, &[], origin).await),
        pb::VerifyCode::NotFound
    );
    assert_eq!(
        code(&client.verify(&rolled.secret, &[], origin).await),
        pb::VerifyCode::Valid
    );

    // A private key kept for RevealKey rolls to a successor kept for RevealKey.
    let (kept, _) = client.create(revealable(private_key("Kept", &[]))).await;
    let rolled = roll(&mut client, &kept.key_id, HOUR_MS).await;
    let successor = rolled.key.unwrap();
    assert!(successor.revealable && successor.full_access);
    assert_eq!(client.reveal(&successor.key_id).await, rolled.secret);
    // One that is not kept rolls to one that is not kept either.
    let (plain, _) = client.create(private_key("Plain", &[])).await;
    let successor = roll(&mut client, &plain.key_id, HOUR_MS).await.key.unwrap();
    assert!(!successor.revealable);
}

#[tokio::test]
async fn revoked_expired_and_rolled_keys_cannot_be_rolled_and_bad_input_writes_nothing() {
    let (server, mut client) = TestServer::with_client().await;
    let db = server.db();

    let (revoked, _) = client.create(private_key("Revoked", &[])).await;
    client.revoke(&revoked.key_id).await;
    let status = try_roll(&mut client, roll_request(&revoked.key_id, Some(0), ""))
        .await
        .unwrap_err();
    assert_reason(&status, Code::FailedPrecondition, "KEY_REVOKED");

    let (rolled, _) = client.create(private_key("Rolled", &[])).await;
    let successor = roll(&mut client, &rolled.key_id, HOUR_MS)
        .await
        .key
        .unwrap();
    let status = try_roll(&mut client, roll_request(&rolled.key_id, Some(0), ""))
        .await
        .unwrap_err();
    let metadata = assert_reason(&status, Code::FailedPrecondition, "KEY_ROLLED");
    assert_eq!(metadata["successor_key_id"], successor.key_id);
    assert_eq!(metadata["key_id"], rolled.key_id);

    let mut request = roll_request(&successor.key_id, Some(0), "");
    request.expected_version = Some(7);
    let status = try_roll(&mut client, request).await.unwrap_err();
    assert_reason(&status, Code::Aborted, "VERSION_CONFLICT");

    let (short, _) = client
        .create(pb::CreateKeyRequest {
            expiration: pb::Expiration::Expiration30Days as i32,
            ..private_key("Short", &[])
        })
        .await;
    let events = db.event_count(None).await;
    server.clock.set_ms(T0_MS + 30 * DAY_MS);
    let status = try_roll(&mut client, roll_request(&short.key_id, Some(0), ""))
        .await
        .unwrap_err();
    assert_reason(&status, Code::FailedPrecondition, "KEY_EXPIRED");

    for (grace_ms, why) in [
        (None, "required"),
        (Some(-1), "negative"),
        (Some(7 * DAY_MS + 1), "over 7 days"),
    ] {
        let reasons = assert_invalid(
            try_roll(&mut client, roll_request(&successor.key_id, grace_ms, "")).await,
            "grace_period",
        );
        assert!(!reasons.is_empty(), "{why}");
    }
    let mut sub_milli = roll_request(&successor.key_id, Some(0), "");
    sub_milli.grace_period = Some(prost_types::Duration {
        seconds: 1,
        nanos: 1,
    });
    assert_invalid(try_roll(&mut client, sub_milli).await, "grace_period");
    let status = try_roll(&mut client, roll_request("key_nope", None, "bad id!"))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["grace_period", "key_id", "request_id"]
    );
    let status = try_roll(
        &mut client,
        roll_request("key_01JGFJJZ000000000000000000", Some(0), ""),
    )
    .await
    .unwrap_err();
    assert_reason(&status, Code::NotFound, "KEY_NOT_FOUND");
    // Another workspace's key does not exist for this one.
    let status = try_roll(
        &mut client,
        pb::RollKeyRequest {
            workspace_id: OTHER_WORKSPACE.into(),
            ..roll_request(&successor.key_id, Some(0), "")
        },
    )
    .await
    .unwrap_err();
    assert_reason(&status, Code::NotFound, "KEY_NOT_FOUND");
    assert_eq!(db.event_count(None).await, events, "nothing written");

    // Auditors may not roll.
    let status = try_roll(
        &mut client.as_role("auditor"),
        roll_request(&successor.key_id, Some(0), ""),
    )
    .await
    .unwrap_err();
    assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
}

#[tokio::test]
async fn a_retried_roll_gets_the_first_answer() {
    let (_server, mut client) = TestServer::with_client().await;
    let (old, _) = client.create(private_key("Retried", &["teams:read"])).await;
    let first = try_roll(
        &mut client,
        roll_request(&old.key_id, Some(HOUR_MS), "roll-1"),
    )
    .await
    .unwrap();
    let again = try_roll(
        &mut client,
        roll_request(&old.key_id, Some(HOUR_MS), "roll-1"),
    )
    .await
    .unwrap();
    assert!(again.replayed);
    assert_eq!(again.secret, first.secret);
    assert_eq!(
        again.key.as_ref().unwrap().key_id,
        first.key.as_ref().unwrap().key_id
    );
    assert_eq!(
        again.previous.unwrap().rolled_to_key_id,
        first.key.unwrap().key_id
    );
    assert_eq!(client.list_all().await.len(), 2, "one successor");

    // The same request id with another request, or for a CreateKey, is refused.
    let status = try_roll(&mut client, roll_request(&old.key_id, Some(0), "roll-1"))
        .await
        .unwrap_err();
    assert_reason(&status, Code::AlreadyExists, "REQUEST_ID_REUSED");
    let status = client
        .try_create(pb::CreateKeyRequest {
            request_id: "roll-1".into(),
            ..private_key("Retried", &["teams:read"])
        })
        .await
        .unwrap_err();
    assert_reason(&status, Code::AlreadyExists, "REQUEST_ID_REUSED");
}

#[tokio::test]
async fn last_used_follows_verify_and_is_written_every_minute_and_at_a_stop() {
    let (server, mut client) = TestServer::with_client().await;
    let (used, secret) = client.create(private_key("Used", &[])).await;
    let (unused, unused_secret) = client.create(private_key("Unused", &["teams:read"])).await;
    let (local, local_secret) = client.create(test_env(private_key("Local", &[]))).await;
    assert_eq!(client.get_key(&used.key_id).await.last_used_at, None);

    // Within the minute the server started in: nothing is due to be written yet.
    server.clock.set_ms(T0_MS + 30_000);
    assert!(
        client
            .verify(&secret, &[], "https://app.example.com")
            .await
            .valid
    );
    assert!(
        client
            .verify(&local_secret, &[], "http://localhost:3000")
            .await
            .valid
    );
    // A refusal is not a use.
    let refused = client.verify(&unused_secret, &["tickets:read"], "").await;
    assert_eq!(code(&refused), pb::VerifyCode::InsufficientScope);
    let key = client.get_key(&used.key_id).await;
    assert_eq!(ms(&key.last_used_at), Some(T0_MS), "to the minute");
    assert_eq!(key.last_used_origin, pb::OriginClass::Browser as i32);
    let key = client.get_key(&local.key_id).await;
    assert_eq!(key.last_used_origin, pb::OriginClass::Localhost as i32);
    let key = client.get_key(&unused.key_id).await;
    assert_eq!((key.last_used_at, key.last_used_origin), (None, 0));

    let list = |filter: pb::ListKeysRequest| {
        let mut client = client.clone();
        async move {
            let keys = client.try_list(filter).await.expect("list_keys").keys;
            // Keys created in the same millisecond list in no particular order.
            let mut names = keys.into_iter().map(|k| k.name).collect::<Vec<_>>();
            names.sort();
            names
        }
    };
    let base = pb::ListKeysRequest {
        workspace_id: WORKSPACE.into(),
        ..Default::default()
    };
    let never = pb::ListKeysRequest {
        never_used: true,
        ..base.clone()
    };
    assert_eq!(list(never.clone()).await, ["Unused"], "before any write");
    let since_use = pb::ListKeysRequest {
        unused_since: at(T0_MS + 30_000),
        ..base.clone()
    };
    assert_eq!(list(since_use.clone()).await, ["Unused"]);

    // Nothing is written within the minute; the next minute writes it.
    assert_eq!(server.db().last_used_at(&used.key_id).await, 0);
    server.clock.set_ms(T0_MS + MINUTE_MS);
    let db = server.db();
    let mut written = 0;
    for _ in 0..200 {
        written = db.last_used_at(&used.key_id).await;
        if written != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(written, T0_MS);
    assert_eq!(list(never).await, ["Unused"], "after the write");
    assert_eq!(list(since_use).await, ["Unused"]);
    let later = pb::ListKeysRequest {
        unused_since: at(T0_MS + HOUR_MS),
        ..base.clone()
    };
    assert_eq!(list(later.clone()).await, ["Local", "Unused", "Used"]);

    // A use not written yet is written at a clean stop and read back after the restart.
    server.clock.set_ms(T0_MS + HOUR_MS + 5_000);
    assert!(client.verify(&secret, &[], "").await.valid);
    let server = server.restart().await;
    let mut client = server.client().await;
    let key = client.get_key(&used.key_id).await;
    assert_eq!(ms(&key.last_used_at), Some(T0_MS + HOUR_MS));
    assert_eq!(key.last_used_origin, pb::OriginClass::None as i32);
    assert_eq!(
        server.db().last_used_at(&used.key_id).await,
        T0_MS + HOUR_MS
    );
    let mut names: Vec<String> = client
        .try_list(later)
        .await
        .unwrap()
        .keys
        .into_iter()
        .map(|k| k.name)
        .collect();
    names.sort();
    assert_eq!(names, ["Local", "Unused"]);
    assert_invalid(
        client
            .try_list(pb::ListKeysRequest {
                unused_since: Some(Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..base
            })
            .await,
        "unused_since",
    );
}

async fn watch(
    client: &TestClient,
    workspace: &str,
    within_ms: i64,
) -> Result<tonic::Response<tonic::Streaming<pb::WatchExpiringResponse>>, Status> {
    let mut client = client.clone();
    let request = client.request(pb::WatchExpiringRequest {
        workspace_id: workspace.into(),
        within: grace(within_ms),
    });
    client.raw().watch_expiring(request).await
}

async fn next(
    stream: &mut tonic::Streaming<pb::WatchExpiringResponse>,
) -> pb::watch_expiring_response::Event {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a message within 5 s")
        .expect("the stream")
        .expect("open")
        .event
        .expect("an event")
}

#[tokio::test]
async fn expiring_soon_is_a_filter_and_a_stream() {
    let (server, mut client) = TestServer::with_client().await;
    let days = |expiration: pb::Expiration, name: &str| pb::CreateKeyRequest {
        expiration: expiration as i32,
        ..private_key(name, &[])
    };
    let (soon, _) = client
        .create(days(pb::Expiration::Expiration30Days, "Soon"))
        .await;
    let (later, _) = client
        .create(days(pb::Expiration::Expiration90Days, "Later"))
        .await;
    client.create(days(pb::Expiration::Never, "Never")).await;
    let (revoked, _) = client
        .create(days(pb::Expiration::Expiration30Days, "Gone"))
        .await;
    client.revoke(&revoked.key_id).await;
    let (other, _) = client
        .create(in_workspace(
            OTHER_WORKSPACE,
            days(pb::Expiration::Expiration30Days, "Other"),
        ))
        .await;

    let listed = client
        .try_list(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            expires_before: at(T0_MS + 31 * DAY_MS),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<&str> = listed.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["Soon"]);

    let watcher = client.clone();
    let watch = |workspace: &'static str, within_ms: i64| watch(&watcher, workspace, within_ms);
    let mut stream = watch(WORKSPACE, 45 * DAY_MS).await.unwrap().into_inner();
    let mut all = watch("", 45 * DAY_MS).await.unwrap().into_inner();
    let expiring = |event: pb::watch_expiring_response::Event| match event {
        pb::watch_expiring_response::Event::Expiring(key) => key.key_id,
        other => panic!("expected a key, got {other:?}"),
    };
    assert_eq!(expiring(next(&mut stream).await), soon.key_id);
    assert!(matches!(
        next(&mut stream).await,
        pb::watch_expiring_response::Event::CaughtUp(_)
    ));
    let mut everywhere = vec![
        expiring(next(&mut all).await),
        expiring(next(&mut all).await),
    ];
    everywhere.sort();
    let mut expected = vec![soon.key_id.clone(), other.key_id.clone()];
    expected.sort();
    assert_eq!(everywhere, expected, "every workspace");

    // A new key expiring inside the window is sent at once.
    let (fresh, _) = client
        .create(days(pb::Expiration::Expiration30Days, "Fresh"))
        .await;
    assert_eq!(expiring(next(&mut stream).await), fresh.key_id);
    // Time brings the 90-day key into the window.
    server.clock.set_ms(T0_MS + 50 * DAY_MS);
    assert_eq!(expiring(next(&mut stream).await), later.key_id);

    let invalid = watch(WORKSPACE, 0).await;
    assert_invalid(invalid.map(|_| ()), "within");
    let invalid = watch("bad workspace", DAY_MS).await;
    assert_invalid(invalid.map(|_| ()), "workspace_id");
    let denied = client
        .as_role("member")
        .raw()
        .watch_expiring(Caller::role("member").request(pb::WatchExpiringRequest {
            workspace_id: WORKSPACE.into(),
            within: grace(DAY_MS),
        }))
        .await
        .unwrap_err();
    assert_reason(&denied, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
    // Auditors may watch.
    let mut auditor_client = client.as_role("auditor");
    let request = auditor_client.request(pb::WatchExpiringRequest {
        workspace_id: WORKSPACE.into(),
        within: grace(DAY_MS),
    });
    auditor_client.raw().watch_expiring(request).await.unwrap();
    // The stream ends when the server stops.
    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends with the server");
    assert!(end.is_err() || end.unwrap().is_none());
}
