//! The hot verification cache: every key's verification state in memory, keyed by the
//! SHA3-256 of its string. VerifyKey answers from here alone and never touches the database.
//!
//! Loaded from the projection at start-up, then kept current by the store's writer, which
//! applies each committed change before it answers the caller. Expiry is checked against the
//! clock on every call, so a key stops working at its expiry instant with no lag.
//!
//! The map is split into shards, each behind its own `RwLock` held only for a map operation
//! (never across I/O), so writers never stall readers for long and readers never contend.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

use crate::clock::Clock;
use crate::domain::api_key;
use crate::domain::values::{Origin, Scheme};
use crate::domain::{DomainPattern, Environment, KeyId, KeyState, KeyType, ScopeSet, SecretHash};
use crate::store::CommitListener;

const SHARDS: usize = 64;

/// What Verify needs of a key, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    pub key_id: KeyId,
    pub workspace_id: Arc<str>,
    pub key_type: KeyType,
    pub environment: Environment,
    pub scopes: ScopeSet,
    pub full_access: bool,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
    pub allowed_domains: Box<[DomainPattern]>,
    pub version: u64,
}

impl CachedKey {
    fn from_state(s: &KeyState, workspace_id: Arc<str>) -> CachedKey {
        CachedKey {
            key_id: s.key_id,
            workspace_id,
            key_type: s.key_type,
            environment: s.environment,
            scopes: s.scopes,
            full_access: s.full_access,
            expires_at_ms: s.expires_at_ms,
            revoked: s.is_revoked(),
            allowed_domains: s.allowed_domains.clone().into_boxed_slice(),
            version: s.version,
        }
    }

    /// The scopes this key grants: everything for a full-access key.
    pub fn granted(&self) -> ScopeSet {
        if self.full_access {
            ScopeSet::ALL
        } else {
            self.scopes
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(Arc<CachedKey>),
    Malformed,
    NotFound,
    Expired(Arc<CachedKey>),
    Revoked(Arc<CachedKey>),
    EnvironmentNotAllowed(Arc<CachedKey>),
    OriginNotAllowed(Arc<CachedKey>),
    InsufficientScope {
        key: Arc<CachedKey>,
        missing: ScopeSet,
    },
}

/// Map keys are SHA3-256 outputs, uniformly distributed, so their first eight bytes are
/// already a good hash ([`SecretHash`] hashes as exactly those bytes): no need to hash again.
/// Lookups use attacker-chosen strings, but only their SHA3 reaches the map, so collisions
/// cannot be steered.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached through SecretHash; a plain fold keeps the hasher correct regardless.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

type Shard = RwLock<HashMap<SecretHash, Arc<CachedKey>, BuildHasherDefault<DigestHasher>>>;

pub struct VerifyCache {
    shards: Box<[Shard]>,
    /// One shared copy of each workspace id: most workspaces have several keys. Read-locked
    /// on the common path, so that loading threads do not queue for it.
    workspaces: RwLock<HashSet<Arc<str>>>,
    clock: Arc<dyn Clock>,
}

impl VerifyCache {
    pub fn new(clock: Arc<dyn Clock>) -> VerifyCache {
        VerifyCache {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            workspaces: RwLock::default(),
            clock,
        }
    }

    fn shard(&self, hash: &SecretHash) -> &Shard {
        // Byte 8 onwards is independent of the bytes the in-shard hasher uses.
        &self.shards[usize::from(hash.0[8]) % SHARDS]
    }

    fn intern(&self, workspace_id: &str) -> Arc<str> {
        if let Some(shared) = self
            .workspaces
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(workspace_id)
        {
            return shared.clone();
        }
        let mut workspaces = self.workspaces.write().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = workspaces.get(workspace_id) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(workspace_id);
        workspaces.insert(shared.clone());
        shared
    }

    /// Inserts or replaces a key's entry, unless the cache already holds a newer version.
    /// The entry is built before the shard is locked, so the write lock is held only for
    /// the map operation.
    pub fn upsert(&self, state: &KeyState) {
        let entry = Arc::new(CachedKey::from_state(
            state,
            self.intern(state.workspace_id.as_str()),
        ));
        let mut shard = self
            .shard(&state.secret_hash)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        match shard.get(&state.secret_hash) {
            Some(existing) if existing.version >= state.version => {}
            _ => {
                shard.insert(state.secret_hash, entry);
            }
        }
    }

    /// Sizes the shards for `keys` entries before a bulk load.
    pub fn reserve(&self, keys: usize) {
        for shard in self.shards.iter() {
            shard
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .reserve(keys / SHARDS + 1);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies a presented key string: format and checksum, then hash, lookup, revocation,
    /// expiry, environment, origin and scopes, in that order.
    pub fn verify(&self, key: &str, required: ScopeSet, origin: &str) -> Verdict {
        let Some(format) = api_key::parse(key) else {
            return Verdict::Malformed;
        };
        let hash = SecretHash::of(key);
        let entry = {
            let shard = self.shard(&hash).read().unwrap_or_else(|p| p.into_inner());
            match shard.get(&hash) {
                Some(entry) => entry.clone(),
                None => return Verdict::NotFound,
            }
        };
        // The string's prefix is part of what was hashed, so these always agree; checked
        // anyway so that a corrupt cache can never widen what a key may do.
        if entry.key_type != format.key_type || entry.environment != format.environment {
            return Verdict::NotFound;
        }
        if entry.revoked {
            return Verdict::Revoked(entry);
        }
        if entry
            .expires_at_ms
            .is_some_and(|at| self.clock.now_ms() >= at)
        {
            return Verdict::Expired(entry);
        }
        // An origin that does not parse is refused, never guessed at: a lenient reading can
        // be steered into seeing localhost or an allowed domain in `http://evil.com\@localhost`.
        match entry.environment {
            Environment::Test => {
                // http or https, any port, or a bare host: local development servers run on
                // plain http and on every port.
                if !Origin::parse(origin).is_some_and(|o| o.host().is_localhost()) {
                    return Verdict::EnvironmentNotAllowed(entry);
                }
            }
            Environment::Production if entry.key_type == KeyType::Public => {
                // Allowed domains name hosts only, so any port passes. A production key works
                // on the customer's secured domains, so a page served over plain http is
                // refused; a bare host (a sidecar's Host header) carries no scheme and is
                // judged on its host alone.
                let allowed = Origin::parse(origin).is_some_and(|o| {
                    o.scheme() != Some(Scheme::Http)
                        && entry.allowed_domains.iter().any(|d| d.allows(o.host()))
                });
                if !allowed {
                    return Verdict::OriginNotAllowed(entry);
                }
            }
            Environment::Production => {}
        }
        let missing = required.difference(entry.granted());
        if !missing.is_empty() {
            return Verdict::InsufficientScope {
                key: entry,
                missing,
            };
        }
        Verdict::Valid(entry)
    }
}

impl CommitListener for VerifyCache {
    fn committed(&self, states: &[KeyState]) {
        for state in states {
            self.upsert(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn the_map_hash_is_the_digest_prefix() {
        let build = BuildHasherDefault::<DigestHasher>::default();
        for key in ["sk_a", "sk_b", "pk_c"] {
            let digest = SecretHash::of(key);
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&digest.0[..8]);
            assert_eq!(build.hash_one(digest), u64::from_le_bytes(prefix));
        }
    }
}
