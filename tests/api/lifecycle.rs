//! The whole lifecycle of a key over gRPC.

use kemon_keys::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn create_verify_rename_rescope_reveal_revoke() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let mut request = private_key("CI deploy", &["tickets:read"]);
    request.reveal_later = true;
    let (key, secret) = create(&mut client, request).await;
    assert!(secret.starts_with("sk_"), "{secret}");
    assert!(key.key_id.starts_with("key_"));
    assert_eq!(key.version, 1);
    assert_eq!(key.created_by, "user_alice");
    assert_eq!(key.scopes, ["tickets:read"]);
    assert!(!key.full_access);
    assert!(key.revealable);
    assert_eq!(key.masked, format!("sk_…{}", &secret[secret.len() - 4..]));
    assert_eq!(
        key.expires_at.unwrap().seconds * 1000,
        T0_MS + 90 * DAY_MS,
        "default expiry is 90 days"
    );

    let ok = verify(&mut client, &secret, &["tickets:read"], "").await;
    assert_eq!(code(&ok), pb::VerifyCode::Valid);
    assert!(ok.valid);
    assert_eq!(ok.key_id, key.key_id);
    assert_eq!(ok.workspace_id, WORKSPACE);

    let renamed = client
        .rename_key(admin(pb::RenameKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
            name: "CI deploy (old)".into(),
            expected_version: Some(1),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "CI deploy (old)");
    assert_eq!(renamed.version, 2);

    let rescoped = client
        .update_key_scopes(admin(pb::UpdateKeyScopesRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
            scopes: vec!["tickets:write".into(), "labels:read".into()],
            expected_version: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rescoped.scopes, ["tickets:write", "labels:read"]);
    assert_eq!(rescoped.version, 3);
    let lacking = verify(&mut client, &secret, &["tickets:read"], "").await;
    assert_eq!(code(&lacking), pb::VerifyCode::InsufficientScope);
    assert_eq!(lacking.missing_scopes, ["tickets:read"]);

    let revealed = client
        .reveal_key(admin(pb::RevealKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.secret, secret);

    let revoked = client
        .revoke_key(admin(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
            expected_version: Some(3),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    assert!(!revoked.revealable);
    assert_eq!(revoked.version, 4);
    assert_eq!(
        code(&verify(&mut client, &secret, &[], "").await),
        pb::VerifyCode::Revoked
    );
    let reveal_after = client
        .reveal_key(admin(pb::RevealKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key.key_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(reveal_after.code(), Code::FailedPrecondition);
}
