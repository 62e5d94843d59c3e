//! The writer's failure path: a batch the database refuses is retried one command at a time.

use std::sync::Arc;

use kemon_keys::cache::VerifyCache;
use kemon_keys::clock::ManualClock;
use kemon_keys::domain::key::NewKeyRequest;
use kemon_keys::domain::{
    ApiKey, Command, Environment, Expiration, KeyId, KeyName, KeyType, ScopeSet, WorkspaceId,
};
use kemon_keys::store::{SealedSecret, StoreError, StoreOptions, Write};

use crate::helpers::{T0_MS, open_store};

fn create(key_id: KeyId, reveal_later: bool) -> Write {
    let key = ApiKey::generate(KeyType::Private, Environment::Production);
    let new = NewKeyRequest {
        key_id,
        workspace_id: WorkspaceId::parse("ws_batch").unwrap(),
        name: KeyName::parse("batch").unwrap(),
        key_type: KeyType::Private,
        environment: Environment::Production,
        expiration: Expiration::default(),
        scopes: ScopeSet::EMPTY,
        reveal_later,
        allowed_domains: vec![],
        secret_hash: key.hash(),
        masked: key.masked(),
        public_key: None,
    }
    .validate(T0_MS)
    .unwrap();
    Write {
        workspace_id: new.workspace_id.clone(),
        key_id,
        command: Command::Create(Box::new(new)),
        actor: "user_batch".into(),
        caller_identity: None,
        sealed_secret: reveal_later.then(|| SealedSecret {
            sealed: vec![1, 2, 3],
            master_key_id: "test".into(),
        }),
        create_request: None,
    }
}

/// Two creates land in one batch (a current-thread runtime queues both before the writer
/// runs). One reuses an existing key id, which the log's unique (key_id, stream_version)
/// refuses, failing the batch's transaction. The retry must commit the other one whole,
/// encrypted copy included.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_command_fails_alone_and_the_rest_of_its_batch_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_MS));
    let cache = Arc::new(VerifyCache::new(clock.clone()));
    let store = open_store(dir.path(), clock, cache.clone(), StoreOptions::default()).await;

    let taken = KeyId::generate(T0_MS);
    store.write(create(taken, false)).await.unwrap();
    let fresh = KeyId::generate(T0_MS);
    let (duplicate, good) = tokio::join!(
        store.write(create(taken, false)),
        store.write(create(fresh, true))
    );

    assert!(
        matches!(duplicate, Err(StoreError::Database(_))),
        "{duplicate:?}"
    );
    let good = good.expect("the other command of the batch commits");
    assert_eq!(good.key_id, fresh);
    assert!(good.reveal_later);
    assert_eq!(
        store.sealed_secret(fresh).await.unwrap(),
        Some(vec![1, 2, 3]),
        "the encrypted copy survives the retry"
    );
    assert_eq!(cache.len(), 2, "the cache holds exactly the committed keys");
    let (head, _) = store.head(None).await.unwrap();
    assert_eq!(
        head.sequence, 2,
        "nothing of the refused command was appended"
    );
    store.close().await;
}
