//! Keys as the service would hold them, built through the domain's own decide/apply path.
//! Shared by the harness and the criterion benches (`benches/verify.rs` includes this file).

use std::sync::Arc;

use kemon_keys::cache::VerifyCache;
use kemon_keys::clock::SystemClock;
use kemon_keys::domain::key::NewKeyRequest;
use kemon_keys::domain::{
    ApiKey, Environment, Event, Expiration, KeyId, KeyName, KeyState, KeyType, Recorded, ScopeSet,
    WorkspaceId, apply,
};

/// A production private key with `tickets:read`, as the service would hold it.
pub fn sample_state(key: &ApiKey, i: usize, now_ms: i64) -> KeyState {
    let new = NewKeyRequest {
        key_id: KeyId::generate(now_ms),
        workspace_id: WorkspaceId::parse(&format!("ws_{}", i % 1000)).expect("valid"),
        name: KeyName::parse("bench").expect("valid"),
        key_type: KeyType::Private,
        environment: Environment::Production,
        expiration: Expiration::Never,
        scopes: ScopeSet::parse(&["tickets:read"]).expect("valid"),
        reveal_later: false,
        allowed_domains: vec![],
        secret_hash: key.hash(),
        masked: key.masked(),
        public_key: None,
    }
    .validate(now_ms)
    .expect("valid key");
    let recorded = Recorded {
        event: Event::KeyCreated(Box::new(new)),
        actor: "bench".into(),
        recorded_at_ms: now_ms,
        stream_version: 1,
    };
    apply(None, &recorded).expect("creation applies")
}

/// A cache holding `n` keys, and the key strings.
pub fn loaded_cache(n: usize) -> (VerifyCache, Vec<String>) {
    let cache = VerifyCache::new(Arc::new(SystemClock));
    let mut secrets = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    for i in 0..n {
        let key = ApiKey::generate(KeyType::Private, Environment::Production);
        states.push(sample_state(&key, i, 1_767_225_600_000));
        secrets.push(key.expose().to_owned());
    }
    cache.upsert_all(states.iter().map(KeyState::verify_state).collect());
    (cache, secrets)
}
