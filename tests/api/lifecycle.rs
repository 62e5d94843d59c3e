//! The whole lifecycle of a key over gRPC.

use kemon_keys::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn create_verify_rename_rescope_reveal_revoke() {
    let (_server, mut client) = TestServer::with_client().await;

    let (key, secret) = client
        .create(revealable(private_key("CI deploy", &["tickets:read"])))
        .await;
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

    let ok = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&ok), pb::VerifyCode::Valid);
    assert!(ok.valid);
    assert_eq!(ok.key_id, key.key_id);
    assert_eq!(ok.workspace_id, WORKSPACE);

    let renamed = client
        .try_rename(&key.key_id, "CI deploy (old)", Some(1))
        .await
        .unwrap();
    assert_eq!(renamed.name, "CI deploy (old)");
    assert_eq!(renamed.version, 2);

    let rescoped = client
        .rescope(&key.key_id, &["tickets:write", "labels:read"])
        .await;
    assert_eq!(rescoped.scopes, ["tickets:write", "labels:read"]);
    assert_eq!(rescoped.version, 3);
    let lacking = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&lacking), pb::VerifyCode::InsufficientScope);
    assert_eq!(lacking.missing_scopes, ["tickets:read"]);

    let revealed = client.reveal(&key.key_id).await;
    assert_eq!(revealed, secret);

    let revoked = client.try_revoke(&key.key_id, Some(3)).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert!(!revoked.revealable);
    assert_eq!(revoked.version, 4);
    assert_eq!(
        code(&client.verify(&secret, &[], "").await),
        pb::VerifyCode::Revoked
    );
    let reveal_after = client.try_reveal(&key.key_id).await.unwrap_err();
    assert_eq!(reveal_after.code(), Code::FailedPrecondition);
}
