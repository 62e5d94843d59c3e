//! CreateKey with a request id (AIP-155): a retry gets the first call's answer, never a
//! second key.

use std::time::Duration;

use kemon_keys::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

fn with_id(request_id: &str, mut request: pb::CreateKeyRequest) -> pb::CreateKeyRequest {
    request.request_id = request_id.into();
    request
}

async fn key_count(client: &TestClient, workspace: &str) -> usize {
    client.in_workspace(workspace).list_all().await.len()
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_returns_the_first_key_and_secret() {
    let (server, mut client) = TestServer::with_client().await;
    let request = with_id(
        "9b2f6c1e-0d4a-4c55-9f43-2d7e0b1a6c10",
        private_key("retried", &["tickets:read"]),
    );
    let first = client.try_create(request.clone()).await.unwrap();
    assert!(!first.replayed);
    let again = client.try_create(request.clone()).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.key, first.key);
    assert_eq!(again.secret, first.secret);
    assert_eq!(key_count(&client, WORKSPACE).await, 1);

    // The same id with another request is refused, and creates nothing.
    let mut other = request.clone();
    other.name = "another".into();
    let status = client.try_create(other).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason).as_deref(),
        Some("REQUEST_ID_REUSED")
    );
    assert_eq!(key_count(&client, WORKSPACE).await, 1);

    // Another workspace has its own request ids.
    let mut elsewhere = request.clone();
    elsewhere.workspace_id = "ws_other".into();
    let other_ws = client.try_create(elsewhere).await.unwrap();
    assert!(!other_ws.replayed);
    assert_ne!(
        other_ws.key.as_ref().unwrap().key_id,
        first.key.as_ref().unwrap().key_id
    );

    // Remembered across a restart.
    drop(client);
    let server = server.restart().await;
    let mut client = server.client().await;
    let after_restart = client.try_create(request.clone()).await.unwrap();
    assert!(after_restart.replayed);
    assert_eq!(after_restart.secret, first.secret);

    // Once the key is revoked, a retry returns it revoked, without its secret.
    let key_id = first.key.as_ref().unwrap().key_id.clone();
    client.revoke(&key_id).await;
    let after_revoke = client.try_create(request.clone()).await.unwrap();
    assert!(after_revoke.replayed);
    assert!(after_revoke.secret.is_empty());
    assert!(after_revoke.key.as_ref().unwrap().revoked_at.is_some());
    assert_eq!(after_revoke.key.as_ref().unwrap().key_id, key_id);

    // After the 24-hour window the id is forgotten: a new key.
    server.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let later = client.try_create(request).await.unwrap();
    assert!(!later.replayed);
    assert_ne!(later.key.unwrap().key_id, key_id);
    assert_eq!(key_count(&client, WORKSPACE).await, 2);
}

#[tokio::test]
async fn concurrent_retries_make_one_key() {
    let server = TestServer::start().await;
    let request = with_id("retry-storm", private_key("storm", &[]));
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut client = server.client().await;
        let request = request.clone();
        calls.push(tokio::spawn(
            async move { client.try_create(request).await },
        ));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().expect("create"));
    }
    let first = &answers[0];
    assert!(
        answers
            .iter()
            .all(|a| a.key == first.key && a.secret == first.secret)
    );
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let client = server.client().await;
    assert_eq!(key_count(&client, WORKSPACE).await, 1);
}

#[tokio::test]
async fn request_ids_are_checked() {
    let (_server, mut client) = TestServer::with_client().await;
    for bad in ["has space", "sl/ash", &"a".repeat(65)] {
        let result = client.try_create(with_id(bad, private_key("x", &[]))).await;
        assert_invalid(result, "request_id");
    }
    assert_eq!(key_count(&client, WORKSPACE).await, 0);
}
