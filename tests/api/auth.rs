//! Who may call what: actor and role metadata, role permissions, recorded actors, workspace isolation.

use std::collections::HashMap;

use kemon_keys::proto::v1 as pb;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Status};

use crate::helpers::*;

/// The RPCs that act for a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    Create,
    Get,
    List,
    Rename,
    UpdateScopes,
    Revoke,
    Reveal,
}

const MANAGEMENT: [Rpc; 7] = [
    Rpc::Create,
    Rpc::Get,
    Rpc::List,
    Rpc::Rename,
    Rpc::UpdateScopes,
    Rpc::Revoke,
    Rpc::Reveal,
];

/// Calls `rpc` as `caller` with an otherwise valid request about `key_id` in `workspace_id`.
async fn call(
    client: &TestClient,
    caller: &Caller,
    rpc: Rpc,
    workspace_id: &str,
    key_id: &str,
) -> Result<(), Status> {
    let mut client = client
        .with_caller(caller.clone())
        .in_workspace(workspace_id);
    match rpc {
        Rpc::Create => client
            .try_create(in_workspace(
                workspace_id,
                private_key("made by caller", &["tickets:read"]),
            ))
            .await
            .map(drop),
        Rpc::Get => client.try_get_key(key_id).await.map(drop),
        Rpc::List => client
            .try_list(pb::ListKeysRequest {
                workspace_id: workspace_id.into(),
                include_revoked: true,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Rename => client
            .try_rename(key_id, "renamed by caller", None)
            .await
            .map(drop),
        Rpc::UpdateScopes => client
            .try_rescope(key_id, &["labels:read"], None)
            .await
            .map(drop),
        Rpc::Revoke => client.try_revoke(key_id, None).await.map(drop),
        Rpc::Reveal => client.try_reveal(key_id).await.map(drop),
    }
}

async fn list(client: &TestClient, workspace_id: &str) -> Vec<pb::Key> {
    client.in_workspace(workspace_id).list_all().await
}

/// A server with one revealable private key in [`WORKSPACE`].
async fn server_with_key() -> (TestServer, TestClient, pb::Key, String) {
    let (server, mut client) = TestServer::with_client().await;
    let (key, secret) = client
        .create(revealable(private_key("target", &["tickets:read"])))
        .await;
    (server, client, key, secret)
}

/// The permission an RPC needs, as PERMISSION_DENIED names it.
fn permission(rpc: Rpc) -> &'static str {
    match rpc {
        Rpc::Get | Rpc::List => "read_keys",
        _ => "manage_keys",
    }
}

/// Asserts every management RPC is refused with `expected` and ErrorInfo `reason` for `caller`,
/// and that nothing changed: the key is as it was and no key was added. Returns the ErrorInfo
/// metadata of each refusal.
async fn assert_all_refused(
    caller: &Caller,
    expected: Code,
    reason: &str,
) -> Vec<(Rpc, HashMap<String, String>)> {
    let (_server, mut client, key, secret) = server_with_key().await;
    let mut refusals = Vec::new();
    for rpc in MANAGEMENT {
        let status = call(&client, caller, rpc, WORKSPACE, &key.key_id)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), expected, "{rpc:?} as {caller:?}: {status:?}");
        refusals.push((rpc, assert_reason(&status, expected, reason)));
    }
    assert_eq!(client.get_key(&key.key_id).await, key, "{caller:?}");
    assert_eq!(list(&client, WORKSPACE).await, [key], "{caller:?}");
    let verified = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid, "{caller:?}");
    refusals
}

/// Asserts every management RPC is UNAUTHENTICATED with `reason` for `caller`, naming the
/// metadata header at fault.
async fn assert_unauthenticated(caller: Caller, reason: &str, header: &str) {
    for (rpc, metadata) in assert_all_refused(&caller, Code::Unauthenticated, reason).await {
        assert_eq!(
            metadata,
            [("header".to_owned(), header.to_owned())].into(),
            "{rpc:?} as {caller:?}"
        );
    }
}

#[tokio::test]
async fn missing_actor_is_unauthenticated() {
    assert_unauthenticated(
        Caller::new(None, Some("admin")),
        "ACTOR_MISSING",
        "x-kemon-actor",
    )
    .await;
}

#[tokio::test]
async fn missing_role_is_unauthenticated() {
    assert_unauthenticated(
        Caller::new(Some("user_bob"), None),
        "ROLE_MISSING",
        "x-kemon-role",
    )
    .await;
}

#[tokio::test]
async fn no_metadata_is_unauthenticated() {
    // The actor is looked at first.
    assert_unauthenticated(Caller::new(None, None), "ACTOR_MISSING", "x-kemon-actor").await;
}

#[tokio::test]
async fn empty_actor_or_role_is_unauthenticated() {
    assert_unauthenticated(
        Caller::new(Some(""), Some("owner")),
        "ACTOR_MISSING",
        "x-kemon-actor",
    )
    .await;
    assert_unauthenticated(
        Caller::new(Some("user_bob"), Some("")),
        "ROLE_MISSING",
        "x-kemon-role",
    )
    .await;
}

#[tokio::test]
async fn unknown_role_is_unauthenticated() {
    for role in ["superuser", "root", "viewer"] {
        assert_unauthenticated(Caller::role(role), "ROLE_UNKNOWN", "x-kemon-role").await;
    }
}

#[tokio::test]
async fn actor_longer_than_128_characters_is_unauthenticated() {
    let long = "u".repeat(129);
    assert_unauthenticated(
        Caller::new(Some(&long), Some("owner")),
        "ACTOR_INVALID",
        "x-kemon-actor",
    )
    .await;

    let (_server, mut client, _, _) = server_with_key().await;
    let longest = "u".repeat(128);
    let created = client
        .create_key(Caller::new(Some(&longest), Some("owner")).request(private_key("x", &[])))
        .await
        .expect("a 128-character actor is fine")
        .into_inner()
        .key
        .unwrap();
    assert_eq!(created.created_by, longest);
}

#[tokio::test]
async fn metadata_that_is_not_printable_ascii_is_unauthenticated_and_not_repeated() {
    let (_server, mut client, key, _) = server_with_key().await;
    for (header, value, reason) in [
        ("x-kemon-actor", "josé", "ACTOR_INVALID"),
        ("x-kemon-role", "ädmin", "ROLE_UNKNOWN"),
    ] {
        let mut request = Caller::acting("user_bob", "admin").request(pb::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
        });
        let bytes = AsciiMetadataValue::try_from(value.as_bytes()).expect("obs-text is allowed");
        request.metadata_mut().insert(header, bytes);
        let status = client.raw().get_key(request).await.unwrap_err();
        let metadata = assert_reason(&status, Code::Unauthenticated, reason);
        assert_eq!(metadata["header"], header);
        assert!(!status.message().contains(value), "{status:?}");
    }
}

#[tokio::test]
async fn members_may_do_nothing() {
    for (rpc, metadata) in assert_all_refused(
        &Caller::role("member"),
        Code::PermissionDenied,
        "ROLE_NOT_PERMITTED",
    )
    .await
    {
        let allowed = match permission(rpc) {
            "read_keys" => "owner,admin,auditor",
            _ => "owner,admin",
        };
        assert_eq!(
            metadata,
            [
                ("role".to_owned(), "member".to_owned()),
                ("permission".to_owned(), permission(rpc).to_owned()),
                ("allowed_roles".to_owned(), allowed.to_owned()),
            ]
            .into(),
            "{rpc:?}"
        );
    }
}

#[tokio::test]
async fn auditors_may_read_but_not_change_or_reveal() {
    let (_server, mut client, key, secret) = server_with_key().await;
    let auditor = Caller::role("auditor");
    for rpc in MANAGEMENT {
        let result = call(&client, &auditor, rpc, WORKSPACE, &key.key_id).await;
        match rpc {
            Rpc::Get | Rpc::List => {
                result.unwrap_or_else(|s| panic!("{rpc:?} as auditor: {s:?}"));
            }
            _ => {
                let status = result.expect_err("refused");
                let metadata = assert_reason(&status, Code::PermissionDenied, "ROLE_NOT_PERMITTED");
                assert_eq!(metadata["role"], "auditor", "{rpc:?}");
                assert_eq!(metadata["permission"], "manage_keys", "{rpc:?}");
                assert_eq!(metadata["allowed_roles"], "owner,admin", "{rpc:?}");
            }
        }
    }

    let seen = client.as_role("auditor").get_key(&key.key_id).await;
    assert_eq!(seen, key);
    let listed = client
        .as_role("auditor")
        .try_list(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.keys, std::slice::from_ref(&key));

    assert_eq!(client.get_key(&key.key_id).await, key, "unchanged");
    let verified = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid, "not revoked");
}

#[tokio::test]
async fn owners_and_admins_may_do_everything() {
    for role in ["owner", "admin"] {
        let (_server, mut client, key, secret) = server_with_key().await;
        let caller = Caller::role(role);
        // Revoke last: after it, the others would be refused for a revoked key.
        for rpc in [
            Rpc::Create,
            Rpc::Get,
            Rpc::List,
            Rpc::Rename,
            Rpc::UpdateScopes,
            Rpc::Reveal,
            Rpc::Revoke,
        ] {
            call(&client, &caller, rpc, WORKSPACE, &key.key_id)
                .await
                .unwrap_or_else(|s| panic!("{rpc:?} as {role}: {s:?}"));
        }
        let after = client.get_key(&key.key_id).await;
        assert_eq!(after.name, "renamed by caller", "{role}");
        assert_eq!(after.scopes, ["labels:read"], "{role}");
        assert!(after.revoked_at.is_some(), "{role}");
        assert_eq!(after.version, 4, "{role}");
        assert_eq!(list(&client, WORKSPACE).await.len(), 2, "{role}");
        let verified = client.verify(&secret, &[], "").await;
        assert_eq!(code(&verified), pb::VerifyCode::Revoked, "{role}");
    }
}

#[tokio::test]
async fn created_by_is_the_creating_actor() {
    let (_server, mut client) = TestServer::with_client().await;
    for (actor, role) in [("user_bob", "owner"), ("user_carol", "admin")] {
        let key = client
            .create_key(Caller::new(Some(actor), Some(role)).request(private_key("mine", &[])))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(key.created_by, actor);
        // Later changes by someone else do not change the creator.
        let renamed = client.rename(&key.key_id, "renamed").await;
        assert_eq!(renamed.created_by, actor);
        assert_eq!(client.get_key(&key.key_id).await.created_by, actor);
    }
}

#[tokio::test]
async fn verify_and_list_scopes_need_no_metadata() {
    let (_server, mut client, key, secret) = server_with_key().await;
    // `verify` sends no metadata at all.
    let verified = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid);
    assert_eq!(verified.key_id, key.key_id);

    let scopes = client
        .list_scopes(pb::ListScopesRequest {})
        .await
        .expect("list_scopes with no metadata")
        .into_inner()
        .scopes;
    assert_eq!(scopes.len(), 8);

    // A member's metadata does not get in the way either.
    let member = Caller::role("member");
    let verified = client
        .verify_key(member.request(pb::VerifyKeyRequest {
            key: secret.clone(),
            required_scopes: vec![],
            origin: String::new(),
        }))
        .await
        .expect("verify_key as member")
        .into_inner();
    assert_eq!(code(&verified), pb::VerifyCode::Valid);
    let scopes = client
        .list_scopes(member.request(pb::ListScopesRequest {}))
        .await
        .expect("list_scopes as member")
        .into_inner()
        .scopes;
    assert_eq!(scopes.len(), 8);
}

#[tokio::test]
async fn another_workspace_cannot_see_or_touch_a_key() {
    let (_server, mut client, key, secret) = server_with_key().await;
    let other = "ws_other";
    let (theirs, _) = client
        .create(in_workspace(other, private_key("theirs", &[])))
        .await;

    for role in ["owner", "admin"] {
        for rpc in [
            Rpc::Get,
            Rpc::Rename,
            Rpc::UpdateScopes,
            Rpc::Revoke,
            Rpc::Reveal,
        ] {
            let status = call(&client, &Caller::role(role), rpc, other, &key.key_id)
                .await
                .expect_err("refused");
            let metadata = assert_reason(&status, Code::NotFound, "KEY_NOT_FOUND");
            assert_eq!(metadata["key_id"], key.key_id, "{rpc:?} as {role}");
        }
    }
    // The auditor's read is scoped the same way.
    let status = call(
        &client,
        &Caller::role("auditor"),
        Rpc::Get,
        other,
        &key.key_id,
    )
    .await
    .expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);

    assert_eq!(client.get_key(&key.key_id).await, key, "unchanged");
    let verified = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&verified), pb::VerifyCode::Valid);
    assert_eq!(verified.workspace_id, WORKSPACE);

    assert_eq!(list(&client, other).await, std::slice::from_ref(&theirs));
    // The Verify above is the key's last use; nothing else about it changed.
    let used = client.get_key(&key.key_id).await;
    assert!(used.last_used_at.is_some());
    assert_eq!(
        pb::Key {
            last_used_at: None,
            last_used_origin: 0,
            ..used.clone()
        },
        key
    );
    assert_eq!(list(&client, WORKSPACE).await, std::slice::from_ref(&used));

    // And the other way round.
    let status = call(
        &client,
        &Caller::role("admin"),
        Rpc::Get,
        WORKSPACE,
        &theirs.key_id,
    )
    .await
    .expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);
}
