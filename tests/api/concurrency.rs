//! Concurrent callers: no lost updates, optimistic concurrency, and revocation visible at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kemon_keys::proto::v1 as pb;
use tokio::sync::Barrier;
use tonic::Code;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconditional_concurrent_renames_are_all_recorded() {
    let (server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("contended", &[])).await;
    let pool = server.clients(4).await;

    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = pool[i % pool.len()].clone();
        let id = key.key_id.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("name {i:02}");
            let key = c.try_rename(&id, &name, None).await;
            (name, key)
        }));
    }
    let mut versions = Vec::new();
    let mut names_by_version = std::collections::HashMap::new();
    for task in tasks {
        let (name, result) = task.await.unwrap();
        let renamed = result.unwrap_or_else(|s| panic!("rename {name} failed: {s:?}"));
        assert_eq!(renamed.name, name, "each reply shows its own rename");
        names_by_version.insert(renamed.version, name);
        versions.push(renamed.version);
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=21).collect::<Vec<u64>>(),
        "versions are distinct"
    );

    let last = client.get_key(&key.key_id).await;
    assert_eq!(last.version, 21);
    assert_eq!(last.name, names_by_version[&21], "the last rename wins");
    assert_eq!(
        server.db().stream_versions(&key.key_id).await,
        (1..=21).collect::<Vec<i64>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_concurrent_renames_admit_exactly_one() {
    let (server, mut client) = TestServer::with_client().await;
    let (key, _) = client.create(private_key("contended", &[])).await;
    let pool = server.clients(4).await;

    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut c = pool[i % pool.len()].clone();
        let id = key.key_id.clone();
        tasks.push(tokio::spawn(async move {
            c.try_rename(&id, &format!("winner {i}"), Some(1)).await
        }));
    }
    let mut winners = Vec::new();
    let mut aborted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(key) => winners.push(key),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                aborted += 1;
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one conditional rename succeeds");
    assert_eq!(aborted, 9);
    assert_eq!(winners[0].version, 2);

    let last = client.get_key(&key.key_id).await;
    assert_eq!(last.version, 2);
    assert_eq!(last.name, winners[0].name);
    assert_eq!(server.db().stream_versions(&key.key_id).await, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_creates_all_succeed() {
    let server = TestServer::start().await;
    let pool = server.clients(4).await;

    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = pool[i % pool.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut request = private_key(&format!("bulk {i}"), &["tickets:read"]);
            request.reveal_later = i % 3 == 0;
            c.create(request).await
        }));
    }
    let mut created = Vec::new();
    for task in tasks {
        created.push(task.await.expect("create task"));
    }
    let ids: HashSet<&str> = created.iter().map(|(k, _)| k.key_id.as_str()).collect();
    let secrets: HashSet<&str> = created.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(ids.len(), 200, "key ids are distinct");
    assert_eq!(secrets.len(), 200, "secrets are distinct");
    assert!(created.iter().all(|(k, _)| k.version == 1));

    let mut client = server.client().await;
    for (key, secret) in &created {
        let answer = client.verify(secret, &["tickets:read"], "").await;
        assert_eq!(code(&answer), pb::VerifyCode::Valid, "{}", key.key_id);
        assert_eq!(answer.key_id, key.key_id);
    }
    let listed = client
        .try_list(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            page_size: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.keys.len(), 200);
    let listed_ids: HashSet<&str> = listed.keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(listed_ids, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_as_soon_as_revoke_returns() {
    let (server, mut client) = TestServer::with_client().await;
    let mut verifier = server.client().await;
    for i in 0..20 {
        let (key, secret) = client.create(private_key(&format!("key {i}"), &[])).await;
        assert_eq!(
            code(&verifier.verify(&secret, &[], "").await),
            pb::VerifyCode::Valid
        );
        let revoked = client.revoke(&key.key_id).await;
        assert!(revoked.revoked_at.is_some());
        // On another connection, right after the reply.
        assert_eq!(
            code(&verifier.verify(&secret, &[], "").await),
            pb::VerifyCode::Revoked,
            "key {i} verified after RevokeKey returned"
        );
        assert_eq!(
            code(&client.verify(&secret, &[], "").await),
            pb::VerifyCode::Revoked
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_never_accept_a_key_after_its_revocation() {
    const VERIFIERS: usize = 4;
    const CALLS_AFTER_REVOKE: usize = 25;

    let (server, mut client) = TestServer::with_client().await;
    let (key, secret) = client.create(private_key("hot", &[])).await;
    assert_eq!(
        code(&client.verify(&secret, &[], "").await),
        pb::VerifyCode::Valid
    );
    let pool = server.clients(VERIFIERS).await;
    let revoked = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(VERIFIERS + 1));

    let mut tasks = Vec::new();
    for mut c in pool {
        let secret = secret.clone();
        let revoked = revoked.clone();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            // Nothing before the barrier can fail, so the revoking side never waits forever.
            started.wait().await;
            let mut seen_revoked = false;
            let mut after = 0;
            let mut violations = Vec::new();
            while after < CALLS_AFTER_REVOKE {
                // Read before sending: if the revoke had returned, the answer must say so.
                let revoke_returned = revoked.load(Ordering::SeqCst);
                let answer = code(&c.verify(&secret, &[], "").await);
                match answer {
                    pb::VerifyCode::Valid if revoke_returned => {
                        violations.push("VALID after RevokeKey returned")
                    }
                    pb::VerifyCode::Valid if seen_revoked => {
                        violations.push("VALID after a REVOKED answer")
                    }
                    pb::VerifyCode::Valid => {}
                    pb::VerifyCode::Revoked => seen_revoked = true,
                    _ => violations.push("neither VALID nor REVOKED"),
                }
                if revoke_returned {
                    after += 1;
                }
                tokio::task::yield_now().await;
            }
            (violations, seen_revoked)
        }));
    }
    started.wait().await;
    let result = client.revoke(&key.key_id).await;
    revoked.store(true, Ordering::SeqCst);
    assert!(result.revoked_at.is_some());

    for task in tasks {
        let (violations, seen_revoked) = task.await.expect("verifier task");
        assert!(violations.is_empty(), "{violations:?}");
        assert!(seen_revoked);
    }
    assert_eq!(
        code(&client.verify(&secret, &[], "").await),
        pb::VerifyCode::Revoked
    );
}
