//! The hot verification cache: every key's verification state in memory, keyed by the
//! SHA3-256 of its string. VerifyKey answers from here alone and never touches the database.
//!
//! Loaded from the projection at start-up, then kept current by the store's writer, which
//! applies each committed change before it answers the caller. Expiry is checked against the
//! clock on every call, so a key stops working at its expiry instant with no lag.
//!
//! The map is split into shards, each behind its own `RwLock`, write-locked only for map
//! operations (one key's, or a batch's keys that fall in that shard) and never across I/O, so
//! writers never stall readers for long and readers never contend.
//!
//! Last used. Each entry carries the minute it was last accepted in and the class of origin it
//! came from, packed in one `AtomicU64` ([`Usage`]): a Verify that accepts a key loads it and
//! writes it only when the minute has changed, so the hot path takes no lock shared by callers
//! and allocates nothing, and a busy key's cache line is written once a minute.
//! [`VerifyCache::dirty_usage`] hands the entries whose usage moved since it was last written
//! to the flusher (`crate::usage`), which writes them to the database in one batch.
//!
//! Rolled keys. A key rolled to a successor stops at the end of its grace period (its
//! `expires_at`); from that instant Verify answers EXPIRED, and [`VerifyCache::evict_ended`]
//! (run every quarter second by the flusher's task) then removes its hash from the cache, after
//! which it answers NOT_FOUND. A rolled key already past its end is never inserted (a roll with
//! no grace period, a restart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::clock::Clock;
use crate::domain::api_key;
use crate::domain::values::{Origin, Scheme};
use crate::domain::{
    DomainPattern, Environment, KeyId, KeyState, KeyType, OriginClass, ScopeSet, SecretHash,
    VerifyState,
};
use crate::store::CommitListener;

const SHARDS: usize = 64;

/// The resolution of last-used tracking.
pub const USAGE_MINUTE_MS: i64 = 60_000;

/// When a key was last accepted, to the minute, and where from: `minute << 2 | class`, 0 for
/// never; and the value last written to the database.
#[derive(Debug, Default)]
pub struct Usage {
    last: AtomicU64,
    flushed: AtomicU64,
}

/// A use, unpacked: the start of its minute (Unix milliseconds) and its origin class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastUsed {
    pub at_ms: i64,
    pub origin: OriginClass,
}

impl LastUsed {
    fn pack(self) -> u64 {
        let minute = u64::try_from(self.at_ms.div_euclid(USAGE_MINUTE_MS)).unwrap_or(0);
        let class = match self.origin {
            OriginClass::None => 1,
            OriginClass::Localhost => 2,
            OriginClass::Browser => 3,
        };
        minute << 2 | class
    }

    fn unpack(packed: u64) -> Option<LastUsed> {
        let origin = match packed & 3 {
            1 => OriginClass::None,
            2 => OriginClass::Localhost,
            3 => OriginClass::Browser,
            _ => return None,
        };
        Some(LastUsed {
            at_ms: i64::try_from(packed >> 2)
                .ok()?
                .checked_mul(USAGE_MINUTE_MS)?,
            origin,
        })
    }
}

impl Usage {
    fn with(last: u64, flushed: u64) -> Usage {
        Usage {
            last: AtomicU64::new(last),
            flushed: AtomicU64::new(flushed),
        }
    }

    /// Records an accepted use at `now_ms` from `origin`. One relaxed load on the common path;
    /// the origin is classified and the value written only in a minute not yet recorded.
    #[inline]
    fn touch(&self, now_ms: i64, origin: &str) {
        let minute = u64::try_from(now_ms.div_euclid(USAGE_MINUTE_MS)).unwrap_or(0);
        let current = self.last.load(Ordering::Relaxed);
        if current >> 2 >= minute {
            return;
        }
        let packed = LastUsed {
            at_ms: now_ms,
            origin: OriginClass::of(origin),
        }
        .pack();
        // Several callers may race into a new minute: the highest value stays.
        self.last.fetch_max(packed, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> Option<LastUsed> {
        LastUsed::unpack(self.last.load(Ordering::Relaxed))
    }
}

impl Clone for Usage {
    fn clone(&self) -> Usage {
        Usage::with(
            self.last.load(Ordering::Relaxed),
            self.flushed.load(Ordering::Relaxed),
        )
    }
}

impl PartialEq for Usage {
    fn eq(&self, other: &Usage) -> bool {
        self.last.load(Ordering::Relaxed) == other.last.load(Ordering::Relaxed)
    }
}

impl Eq for Usage {}

/// A use not yet written to the database, as [`VerifyCache::dirty_usage`] hands it out.
#[derive(Debug, Clone)]
pub struct DirtyUsage {
    pub key_id: KeyId,
    pub last_used: LastUsed,
    packed: u64,
    entry: Arc<CachedKey>,
}

impl DirtyUsage {
    /// Marks the use as written, unless a later one came meanwhile.
    pub fn written(&self) {
        self.entry
            .usage
            .flushed
            .fetch_max(self.packed, Ordering::Relaxed);
    }
}

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
    /// Rolled to a successor: its hash leaves the cache once `expires_at_ms` has passed.
    pub rolled: bool,
    pub usage: Usage,
}

impl CachedKey {
    fn new(s: VerifyState<'_>, workspace_id: Arc<str>) -> CachedKey {
        CachedKey {
            key_id: s.key_id,
            workspace_id,
            key_type: s.key_type,
            environment: s.environment,
            scopes: s.scopes,
            full_access: s.full_access,
            expires_at_ms: s.expires_at_ms,
            revoked: s.revoked,
            allowed_domains: s.allowed_domains,
            version: s.version,
            rolled: s.rolled_to.is_some(),
            usage: Usage::default(),
        }
    }

    /// A rolled key whose grace period is over: its hash no longer belongs in the cache.
    fn ended(&self, now_ms: i64) -> bool {
        self.rolled && !self.revoked && self.expires_at_ms.is_some_and(|at| now_ms >= at)
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

type Map = HashMap<SecretHash, Arc<CachedKey>, BuildHasherDefault<DigestHasher>>;
type Shard = RwLock<Map>;

pub struct VerifyCache {
    shards: Box<[Shard]>,
    /// One shared copy of each workspace id: most workspaces have several keys. Read-locked
    /// on the common path, so that loading threads do not queue for it.
    workspaces: RwLock<HashSet<Arc<str>>>,
    clock: Arc<dyn Clock>,
    /// Rolled keys still in their grace period, by the instant they end. Rolls are rare, so
    /// one lock is fine; Verify never takes it.
    ending: Mutex<BTreeMap<i64, Vec<SecretHash>>>,
}

impl VerifyCache {
    pub fn new(clock: Arc<dyn Clock>) -> VerifyCache {
        VerifyCache {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            workspaces: RwLock::default(),
            clock,
            ending: Mutex::default(),
        }
    }

    /// The clock the cache judges expiry and uses by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn shard(&self, hash: &SecretHash) -> &Shard {
        &self.shards[shard_index(hash)]
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

    /// Inserts or replaces each key's entry, unless the cache already holds a newer version.
    /// The last use is carried over from the entry replaced. A rolled key already past its
    /// end is removed instead (see the module documentation).
    ///
    /// The entries are built before any lock is taken, then each shard is write-locked once
    /// for all the states that fall in it, and the shared workspace ids are looked up once per
    /// workspace. At start-up, a batch of thousands of keys thus takes each lock once rather
    /// than once a key: the locked instructions, which wait for every earlier write to the
    /// (cache-missing) tables, were two fifths of the load's insert time at 5M keys.
    pub fn upsert_all(&self, states: Vec<VerifyState<'_>>) {
        let now = self.clock.now_ms();
        let mut workspaces: HashMap<&str, Arc<str>, foldhash::fast::RandomState> =
            HashMap::default();
        let mut entries: Vec<Option<(SecretHash, CachedKey, bool)>> =
            Vec::with_capacity(states.len());
        let mut per_shard = [0u32; SHARDS];
        let mut ending = Vec::new();
        for state in states {
            let shared = match workspaces.get(state.workspace_id) {
                Some(shared) => shared.clone(),
                None => {
                    let shared = self.intern(state.workspace_id);
                    workspaces.insert(state.workspace_id, shared.clone());
                    shared
                }
            };
            let hash = state.secret_hash;
            let entry = CachedKey::new(state, shared);
            let ended = entry.ended(now);
            if entry.rolled
                && !entry.revoked
                && !ended
                && let Some(at) = entry.expires_at_ms
            {
                ending.push((at, hash));
            }
            per_shard[shard_index(&hash)] += 1;
            entries.push(Some((hash, entry, ended)));
        }
        if !ending.is_empty() {
            let mut by_end = self.ending.lock().unwrap_or_else(|p| p.into_inner());
            for (at, hash) in ending {
                by_end.entry(at).or_default().push(hash);
            }
        }
        // The entries' indices grouped by shard, in the order given within each (two states
        // of one key are applied in order): a counting sort, so each entry moves once.
        let mut start = [0usize; SHARDS];
        for i in 1..SHARDS {
            start[i] = start[i - 1] + per_shard[i - 1] as usize;
        }
        let mut order = vec![0usize; entries.len()];
        for (i, entry) in entries.iter().enumerate() {
            if let Some((hash, _, _)) = entry {
                let at = &mut start[shard_index(hash)];
                order[*at] = i;
                *at += 1;
            }
        }
        let mut taken = order
            .into_iter()
            .filter_map(|i| entries[i].take())
            .peekable();
        while let Some(first) = taken.next() {
            let index = shard_index(&first.0);
            let mut shard = self.shards[index]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let mut next = Some(first);
            while let Some((hash, entry, ended)) = next {
                put(&mut shard, hash, entry, ended);
                next = taken.next_if(|(hash, _, _)| shard_index(hash) == index);
            }
        }
    }

    /// Removes the hashes of rolled keys whose grace period has ended; returns their uses not
    /// yet written, for the flusher.
    pub fn evict_ended(&self) -> Vec<DirtyUsage> {
        let now = self.clock.now_ms();
        let due: Vec<SecretHash> = {
            let mut ending = self.ending.lock().unwrap_or_else(|p| p.into_inner());
            let later = ending.split_off(&(now + 1));
            std::mem::replace(&mut *ending, later)
                .into_values()
                .flatten()
                .collect()
        };
        let mut unwritten = Vec::new();
        for hash in due {
            let mut shard = self.shard(&hash).write().unwrap_or_else(|p| p.into_inner());
            if shard.get(&hash).is_some_and(|e| e.ended(now))
                && let Some(entry) = shard.remove(&hash)
            {
                unwritten.extend(dirty(&entry));
            }
        }
        unwritten
    }

    /// Every entry whose last use has not been written to the database yet.
    pub fn dirty_usage(&self) -> Vec<DirtyUsage> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            found.extend(shard.values().filter_map(dirty));
        }
        found
    }

    /// The last use this process has seen of the key with `hash`, written or not.
    pub fn last_used(&self, hash: &SecretHash) -> Option<LastUsed> {
        let shard = self.shard(hash).read().unwrap_or_else(|p| p.into_inner());
        shard.get(hash).and_then(|e| e.usage.last_used())
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
        // Read once: every key that verifies records its use at this instant.
        let now = self.clock.now_ms();
        if entry.expires_at_ms.is_some_and(|at| now >= at) {
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
        // Only accepted uses count: a leaked public key tried from another site, or a key
        // refused for its scopes, does not make a key look in use.
        entry.usage.touch(now, origin);
        Verdict::Valid(entry)
    }
}

/// The shard a hash's entry lives in. Byte 8 onwards is independent of the bytes the in-shard
/// hasher uses.
fn shard_index(hash: &SecretHash) -> usize {
    usize::from(hash.0[8]) % SHARDS
}

/// Puts `entry` in its shard, unless the shard holds a newer version; carries the last use
/// over from the entry it replaces; removes the hash of a rolled key past its end instead.
fn put(shard: &mut Map, hash: SecretHash, mut entry: CachedKey, ended: bool) {
    match shard.get(&hash) {
        Some(existing) if existing.version >= entry.version => {}
        Some(_) if ended => {
            shard.remove(&hash);
        }
        Some(existing) => {
            entry.usage = existing.usage.clone();
            shard.insert(hash, Arc::new(entry));
        }
        None if ended => {}
        None => {
            shard.insert(hash, Arc::new(entry));
        }
    }
}

/// The entry's use, when it has one not yet written.
fn dirty(entry: &Arc<CachedKey>) -> Option<DirtyUsage> {
    let packed = entry.usage.last.load(Ordering::Relaxed);
    if packed <= entry.usage.flushed.load(Ordering::Relaxed) {
        return None;
    }
    Some(DirtyUsage {
        key_id: entry.key_id,
        last_used: LastUsed::unpack(packed)?,
        packed,
        entry: entry.clone(),
    })
}

impl CommitListener for VerifyCache {
    fn committed(&self, states: &[KeyState]) {
        self.upsert_all(states.iter().map(KeyState::verify_state).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn usage_keeps_the_latest_minute_and_its_origin_class() {
        let usage = Usage::default();
        assert_eq!(usage.last_used(), None);
        usage.touch(125_000, "");
        assert_eq!(
            usage.last_used(),
            Some(LastUsed {
                at_ms: 120_000,
                origin: OriginClass::None
            })
        );
        // The same minute from elsewhere writes nothing.
        usage.touch(170_000, "https://app.example.com");
        assert_eq!(usage.last_used().unwrap().origin, OriginClass::None);
        usage.touch(180_000, "http://localhost:3000");
        assert_eq!(
            usage.last_used(),
            Some(LastUsed {
                at_ms: 180_000,
                origin: OriginClass::Localhost
            })
        );
        // An earlier minute never goes back.
        usage.touch(0, "https://app.example.com");
        assert_eq!(usage.last_used().unwrap().at_ms, 180_000);
        assert_eq!(
            OriginClass::of("https://app.example.com"),
            OriginClass::Browser
        );
    }

    const NOW: i64 = 1_767_225_600_000;

    /// What verification needs of a production private key with no scopes.
    fn state(key: &api_key::ApiKey, key_id: KeyId, version: u64) -> VerifyState<'static> {
        VerifyState {
            key_id,
            workspace_id: "ws_1",
            key_type: KeyType::Private,
            environment: Environment::Production,
            scopes: ScopeSet::EMPTY,
            full_access: false,
            secret_hash: key.hash(),
            expires_at_ms: None,
            revoked: false,
            allowed_domains: Box::new([]),
            version,
            rolled_to: None,
        }
    }

    #[test]
    fn a_batch_keeps_each_keys_order_versions_uses_and_rolls() {
        let clock = crate::clock::ManualClock::new(NOW);
        let cache = VerifyCache::new(Arc::new(clock.clone()));
        // Enough keys to fall in every shard.
        let keys: Vec<(api_key::ApiKey, KeyId)> = (0..300)
            .map(|_| {
                let key = api_key::ApiKey::generate(KeyType::Private, Environment::Production);
                (key, KeyId::generate(NOW))
            })
            .collect();
        cache.upsert_all(keys.iter().map(|(k, id)| state(k, *id, 1)).collect());
        assert_eq!(cache.len(), 300);
        let verify = |i: usize| cache.verify(keys[i].0.expose(), ScopeSet::EMPTY, "");
        assert!(matches!(verify(0), Verdict::Valid(_)));
        let used = cache.last_used(&keys[0].0.hash());
        assert!(used.is_some());

        let at = |i: usize, version: u64| state(&keys[i].0, keys[i].1, version);
        let revoked = |mut s: VerifyState<'static>| {
            s.revoked = true;
            s
        };
        let rolled = |mut s: VerifyState<'static>, end: i64| {
            s.rolled_to = Some(KeyId::generate(NOW));
            s.expires_at_ms = Some(end);
            s
        };
        cache.upsert_all(vec![
            // Key 0: version 3 then an older 2, which changes nothing.
            revoked(at(0, 3)),
            at(0, 2),
            // Key 1: both apply, in the order given.
            revoked(at(1, 2)),
            at(1, 3),
            // Key 2: the same version again changes nothing.
            revoked(at(2, 1)),
            // Key 3 rolled, in its grace period; key 4 rolled, past its end.
            rolled(at(3, 2), NOW + 1_000),
            rolled(at(4, 2), NOW - 1),
        ]);
        assert!(matches!(verify(0), Verdict::Revoked(_)));
        assert_eq!(
            cache.last_used(&keys[0].0.hash()),
            used,
            "the use is carried over"
        );
        assert!(matches!(verify(1), Verdict::Valid(_)));
        assert!(matches!(verify(2), Verdict::Valid(_)));
        assert!(matches!(verify(3), Verdict::Valid(_)));
        assert_eq!(verify(4), Verdict::NotFound);
        assert_eq!(cache.len(), 299);
        clock.set_ms(NOW + 1_000);
        cache.evict_ended();
        assert_eq!(verify(3), Verdict::NotFound);
        assert!(matches!(verify(5), Verdict::Valid(_)));
    }

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
