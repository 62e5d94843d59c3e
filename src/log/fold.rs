//! Many keys' states folded from a whole log, held compactly: what a rebuild and a verification
//! of a million-key log keep in memory between one event of a key and the next.
//!
//! A [`KeyState`] is about 280 bytes inline plus its strings, and a hash map of them sizes its
//! buckets for the largest value; [`FoldedKeys`] keeps each state as one ~100-byte encoding
//! instead (the key's strings inline, optional values only when present), decoded when the key
//! has another event and once at the end. The encoding is private to this process (never
//! stored, never sent) and exact: decoding gives back an equal state, and two states are
//! equal exactly when their encodings are, so a stored projection row can be compared with
//! the fold by encoding it.
//!
//! Decoding re-validates every value through the domain's own `parse` functions.

use std::collections::HashMap;

use crate::domain::{
    DomainPattern, Environment, KeyId, KeyName, KeyState, KeyType, ScopeSet, SecretHash,
    WorkspaceId,
};

/// Key states by key id, each kept as its encoding.
#[derive(Debug, Default)]
pub struct FoldedKeys {
    /// foldhash rather than SipHash: a replay hashes a key id per event, and these maps are
    /// private to one process, filled from a log, not from callers.
    states: HashMap<KeyId, Box<[u8]>, foldhash::fast::RandomState>,
}

impl FoldedKeys {
    /// Room for `keys` states without rehashing.
    pub fn with_capacity(keys: usize) -> FoldedKeys {
        FoldedKeys {
            states: HashMap::with_capacity_and_hasher(keys, Default::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Takes a key's state out (to fold its next event into it).
    pub fn take(&mut self, key_id: &KeyId) -> Result<Option<KeyState>, String> {
        self.states
            .remove(key_id)
            .map(|encoded| decode(&encoded))
            .transpose()
    }

    /// Takes a key's encoded state out to compare it with something, leaving a mark in its
    /// place: the key still counts in [`FoldedKeys::len`], and taking it again says
    /// [`Compared::Again`].
    pub fn take_to_compare(&mut self, key_id: &KeyId) -> Compared {
        match self.states.get_mut(key_id) {
            None => Compared::Absent,
            // Encodings are never empty: an empty one is the mark.
            Some(slot) if slot.is_empty() => Compared::Again,
            Some(slot) => Compared::Encoded(std::mem::take(slot)),
        }
    }

    /// The keys whose state was never taken by [`FoldedKeys::take_to_compare`].
    pub fn not_compared(&self) -> impl Iterator<Item = &KeyId> {
        self.states
            .iter()
            .filter(|(_, encoded)| !encoded.is_empty())
            .map(|(key_id, _)| key_id)
    }

    /// Keeps `state` as its key's state.
    pub fn put(&mut self, state: &KeyState) {
        self.states.insert(state.key_id, encode(state));
    }

    /// Keeps an encoding made by [`encode`] as `key_id`'s state.
    pub fn put_encoded(&mut self, key_id: KeyId, encoded: Box<[u8]>) {
        self.states.insert(key_id, encoded);
    }

    /// Every state, as its encoding, taken out.
    pub fn drain(&mut self) -> impl Iterator<Item = (KeyId, Box<[u8]>)> + '_ {
        self.states.drain()
    }

    /// Moves every state of `other` in (the two hold different keys).
    pub fn absorb(&mut self, other: FoldedKeys) {
        self.states.reserve(other.states.len());
        self.states.extend(other.states);
    }

    /// The key ids held, in any order.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.states.keys()
    }

    /// Every encoded state, ordered as the SQLite projection is clustered: see
    /// [`sorted_by_workspace`].
    pub fn into_sorted_by_workspace(self) -> Vec<Box<[u8]>> {
        sorted_by_workspace(vec![self.into_part()]).collect()
    }
}

/// One [`FoldedKeys`]'s encodings, each with its sort entry, ready to be put in order with
/// other parts by [`sorted_by_workspace`]. Made by [`FoldedKeys::into_part`], on the thread
/// that folded them, so that parts are made in parallel.
#[derive(Debug, Default)]
pub struct SortablePart {
    keys: FoldedKeys,
    /// Entries whose `rank` is the index of their workspace in `workspaces`.
    entries: Vec<Entry>,
    workspaces: Vec<Box<[u8]>>,
}

/// One encoding's place in the order: compared by (workspace rank, key id).
#[derive(Debug, Clone, Copy)]
struct Entry {
    rank: u32,
    /// The part holding the encoding.
    part: u32,
    /// The key id, big-endian: compared as the bytes are.
    key: [u64; 2],
}

impl FoldedKeys {
    /// The encodings with their sort entries; see [`SortablePart`].
    pub fn into_part(self) -> SortablePart {
        // Workspaces are numbered as first met; [`sorted_by_workspace`] ranks them.
        let mut numbers: HashMap<&[u8], u32> = HashMap::new();
        let entries = self
            .states
            .values()
            .map(|e| {
                let (workspace, key) = sort_key(e);
                let next = u32::try_from(numbers.len()).unwrap_or(u32::MAX);
                let half =
                    |at: usize| u64::from_be_bytes(key[at..at + 8].try_into().unwrap_or([0; 8]));
                Entry {
                    rank: *numbers.entry(workspace).or_insert(next),
                    part: 0,
                    key: [half(0), half(8)],
                }
            })
            .collect();
        let mut workspaces = vec![Box::default(); numbers.len()];
        for (workspace, number) in numbers {
            workspaces[number as usize] = workspace.into();
        }
        SortablePart {
            keys: self,
            entries,
            workspaces,
        }
    }
}

/// Every encoded state of `parts` (which hold different keys), ordered by workspace id, then
/// key id (the byte order of their strings, as SQLite compares them). Decode each with
/// [`decode`].
///
/// Comparing the encodings themselves would follow two pointers per comparison, each likely a
/// cache miss at a million keys. Instead each workspace id gets its rank among the distinct
/// ones, and 24-byte entries (rank, part, key id) are sorted; the encodings are then taken
/// from their parts in that order, each freed by whoever consumes it.
pub fn sorted_by_workspace(parts: Vec<SortablePart>) -> Sorted {
    let mut all: Vec<Box<[u8]>> = parts
        .iter()
        .flat_map(|p| p.workspaces.iter().cloned())
        .collect();
    all.sort_unstable();
    all.dedup();
    let mut order = Vec::with_capacity(parts.iter().map(|p| p.entries.len()).sum());
    let mut keys = Vec::with_capacity(parts.len());
    // Each part's entries are freed once copied into the order.
    for (number, part) in parts.into_iter().enumerate() {
        let ranks: Vec<u32> = part
            .workspaces
            .iter()
            .map(|w| {
                let rank = all.binary_search(w).unwrap_or(usize::MAX);
                u32::try_from(rank).unwrap_or(u32::MAX)
            })
            .collect();
        let number = u32::try_from(number).unwrap_or(u32::MAX);
        order.extend(part.entries.iter().map(|e| Entry {
            rank: ranks[e.rank as usize],
            part: number,
            key: e.key,
        }));
        keys.push(part.keys);
    }
    order.sort_unstable_by_key(|e| (e.rank, e.key));
    Sorted {
        parts: keys,
        order: order.into_iter(),
    }
}

/// Encodings in the projection's order (see [`sorted_by_workspace`]), each handed out once
/// and so freed by its taker.
#[derive(Debug)]
pub struct Sorted {
    parts: Vec<FoldedKeys>,
    order: std::vec::IntoIter<Entry>,
}

impl Iterator for Sorted {
    type Item = Box<[u8]>;

    fn next(&mut self) -> Option<Box<[u8]>> {
        let entry = self.order.next()?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&entry.key[0].to_be_bytes());
        key[8..].copy_from_slice(&entry.key[1].to_be_bytes());
        // Every entry was made from an encoding of its part; were one missing, the empty
        // encoding given instead is refused by decoding.
        Some(
            self.parts
                .get_mut(entry.part as usize)
                .and_then(|part| part.states.remove(&KeyId::from_bytes(key)))
                .unwrap_or_default(),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.order.size_hint()
    }
}

impl ExactSizeIterator for Sorted {}

/// What [`FoldedKeys::take_to_compare`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Compared {
    /// No state for that key.
    Absent,
    /// Its state was taken before.
    Again,
    Encoded(Box<[u8]>),
}

// Layout, in order (integers little-endian, `len` a LEB128 varint):
//   workspace id: u8 length, bytes          (first: the projection's sort key)
//   key id: 16 bytes (ULID, big-endian, so byte order is key id order)
//   flags: u8, scopes: u8, secret hash: 32 bytes
//   created_at, updated_at: i64
//   expires_at, revoked_at, last_revealed_at: i64 each, only when present (flags)
//   version, stream_version: varint
//   name, masked, created_by: len, bytes
//   public key: len, bytes, only when present (flags)
//   allowed domains: count, then len, bytes each
//   links: u8 (bit 0: rolled from, bit 1: rolled to), then 16 bytes per key id present
const PUBLIC: u8 = 1;
const TEST: u8 = 1 << 1;
const FULL_ACCESS: u8 = 1 << 2;
const REVEAL_LATER: u8 = 1 << 3;
const EXPIRES: u8 = 1 << 4;
const REVOKED: u8 = 1 << 5;
const REVEALED: u8 = 1 << 6;
const PUBLIC_KEY: u8 = 1 << 7;

/// The sort key of an encoding: (workspace id bytes, key id bytes). An encoding too short to
/// hold them (never made by [`encode`]; decoding refuses it) sorts by what it has.
fn sort_key(encoded: &[u8]) -> (&[u8], &[u8]) {
    let len = encoded.first().map_or(0, |&l| usize::from(l));
    let part = |from: usize, to: usize| encoded.get(from.min(encoded.len())..to.min(encoded.len()));
    (
        part(1, 1 + len).unwrap_or_default(),
        part(1 + len, 17 + len).unwrap_or_default(),
    )
}

/// The order of the SQLite projection's rows (workspace id, then key id, as bytes), between
/// two encodings.
pub fn projection_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    sort_key(a).cmp(&sort_key(b))
}

/// The key id of an encoding.
pub fn encoded_key_id(encoded: &[u8]) -> KeyId {
    let (_, key) = sort_key(encoded);
    KeyId::from_bytes(key.try_into().unwrap_or([0; 16]))
}

/// A state's encoding. Equal states have equal encodings and unequal ones unequal encodings.
pub fn encode(s: &KeyState) -> Box<[u8]> {
    let mut out = Vec::with_capacity(
        96 + s.workspace_id.as_str().len()
            + s.name.as_str().len()
            + s.masked.len()
            + s.created_by.len(),
    );
    let workspace = s.workspace_id.as_str().as_bytes();
    // Workspace ids are at most 64 characters of [A-Za-z0-9_-].
    out.push(u8::try_from(workspace.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(workspace);
    out.extend_from_slice(&s.key_id.to_bytes());
    let mut flags = 0;
    for (set, flag) in [
        (s.key_type == KeyType::Public, PUBLIC),
        (s.environment == Environment::Test, TEST),
        (s.full_access, FULL_ACCESS),
        (s.reveal_later, REVEAL_LATER),
        (s.expires_at_ms.is_some(), EXPIRES),
        (s.revoked_at_ms.is_some(), REVOKED),
        (s.last_revealed_at_ms.is_some(), REVEALED),
        (s.public_key.is_some(), PUBLIC_KEY),
    ] {
        if set {
            flags |= flag;
        }
    }
    out.push(flags);
    out.push(s.scopes.bits());
    out.extend_from_slice(&s.secret_hash.0);
    out.extend_from_slice(&s.created_at_ms.to_le_bytes());
    out.extend_from_slice(&s.updated_at_ms.to_le_bytes());
    for at in [s.expires_at_ms, s.revoked_at_ms, s.last_revealed_at_ms]
        .into_iter()
        .flatten()
    {
        out.extend_from_slice(&at.to_le_bytes());
    }
    varint(&mut out, s.version);
    varint(&mut out, s.stream_version);
    for text in [s.name.as_str(), &s.masked, &s.created_by] {
        bytes(&mut out, text.as_bytes());
    }
    if let Some(public_key) = &s.public_key {
        bytes(&mut out, public_key.as_bytes());
    }
    varint(&mut out, s.allowed_domains.len() as u64);
    for domain in &s.allowed_domains {
        bytes(&mut out, domain.as_str().as_bytes());
    }
    out.push(u8::from(s.rolled_from.is_some()) | (u8::from(s.rolled_to.is_some()) << 1));
    for link in [s.rolled_from, s.rolled_to].into_iter().flatten() {
        out.extend_from_slice(&link.to_bytes());
    }
    out.into_boxed_slice()
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn bytes(out: &mut Vec<u8>, value: &[u8]) {
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// Reads an encoding back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated key state".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, String> {
        let mut le = [0u8; 8];
        le.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(le))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("bad varint in key state".into())
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "bad length")?;
        std::str::from_utf8(self.take(len)?).map_err(|e| e.to_string())
    }
}

/// The state an encoding was made from.
pub fn decode(encoded: &[u8]) -> Result<KeyState, String> {
    let mut r = Reader(encoded);
    let workspace_len = usize::from(r.byte()?);
    let workspace = std::str::from_utf8(r.take(workspace_len)?).map_err(|e| e.to_string())?;
    let key_id = KeyId::from_bytes(r.take(16)?.try_into().map_err(|_| "key id")?);
    let flags = r.byte()?;
    let scopes = ScopeSet::from_bits(r.byte()?);
    let secret_hash = SecretHash::from_slice(r.take(32)?).ok_or("secret hash")?;
    let created_at_ms = r.i64()?;
    let updated_at_ms = r.i64()?;
    let mut optional = |flag: u8| -> Result<Option<i64>, String> {
        if flags & flag != 0 {
            r.i64().map(Some)
        } else {
            Ok(None)
        }
    };
    let expires_at_ms = optional(EXPIRES)?;
    let revoked_at_ms = optional(REVOKED)?;
    let last_revealed_at_ms = optional(REVEALED)?;
    let version = r.varint()?;
    let stream_version = r.varint()?;
    let name = KeyName::parse(r.str()?)?;
    let masked = r.str()?.to_owned();
    let created_by = r.str()?.to_owned();
    let public_key = if flags & PUBLIC_KEY != 0 {
        Some(r.str()?.to_owned())
    } else {
        None
    };
    let domains = usize::try_from(r.varint()?).map_err(|_| "bad count")?;
    let mut allowed_domains = Vec::with_capacity(domains.min(DomainPattern::MAX_PER_KEY));
    for _ in 0..domains {
        allowed_domains.push(DomainPattern::parse(r.str()?)?);
    }
    let links = r.byte()?;
    let mut link = |bit: u8| -> Result<Option<KeyId>, String> {
        if links & bit == 0 {
            return Ok(None);
        }
        let bytes: [u8; 16] = r.take(16)?.try_into().map_err(|_| "key id")?;
        Ok(Some(KeyId::from_bytes(bytes)))
    };
    let rolled_from = link(1)?;
    let rolled_to = link(2)?;
    if !r.0.is_empty() {
        return Err("trailing bytes after a key state".into());
    }
    Ok(KeyState {
        key_id,
        workspace_id: WorkspaceId::parse(workspace)?,
        name,
        key_type: if flags & PUBLIC != 0 {
            KeyType::Public
        } else {
            KeyType::Private
        },
        environment: if flags & TEST != 0 {
            Environment::Test
        } else {
            Environment::Production
        },
        scopes,
        full_access: flags & FULL_ACCESS != 0,
        secret_hash,
        masked,
        public_key,
        allowed_domains,
        created_at_ms,
        expires_at_ms,
        revoked_at_ms,
        reveal_later: flags & REVEAL_LATER != 0,
        version,
        stream_version,
        last_revealed_at_ms,
        created_by,
        updated_at_ms,
        rolled_from,
        rolled_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(i: u8) -> KeyState {
        KeyState {
            key_id: KeyId::from_bytes([i; 16]),
            workspace_id: WorkspaceId::parse(&format!("ws_{i}")).unwrap(),
            name: KeyName::parse("A name, with ünïcode").unwrap(),
            key_type: KeyType::Private,
            environment: Environment::Production,
            scopes: ScopeSet::parse(&["tickets:read", "teams:read"]).unwrap(),
            full_access: false,
            secret_hash: SecretHash([i; 32]),
            masked: "sk_…Ab12".into(),
            public_key: None,
            allowed_domains: vec![],
            created_at_ms: 1_767_225_600_000,
            expires_at_ms: None,
            revoked_at_ms: None,
            reveal_later: false,
            version: 1,
            stream_version: 1,
            last_revealed_at_ms: None,
            created_by: "user_1".into(),
            updated_at_ms: 1_767_225_600_000,
            rolled_from: None,
            rolled_to: None,
        }
    }

    /// Every field set to something other than the plain state's.
    fn full(i: u8) -> KeyState {
        KeyState {
            key_type: KeyType::Public,
            environment: Environment::Test,
            full_access: true,
            scopes: ScopeSet::EMPTY,
            public_key: Some("pk_test_0123456789".into()),
            allowed_domains: vec![
                DomainPattern::parse("app.example.com").unwrap(),
                DomainPattern::parse("*.example.org").unwrap(),
            ],
            expires_at_ms: Some(-5),
            revoked_at_ms: Some(i64::MAX),
            reveal_later: true,
            version: 300,
            stream_version: u64::MAX,
            last_revealed_at_ms: Some(0),
            rolled_from: Some(KeyId::from_bytes([i.wrapping_add(1); 16])),
            rolled_to: Some(KeyId::from_bytes([i.wrapping_add(2); 16])),
            ..state(i)
        }
    }

    #[test]
    fn states_round_trip() {
        for s in [state(1), full(2)] {
            let encoded = encode(&s);
            assert_eq!(decode(&encoded), Ok(s.clone()));
            assert_eq!(encoded_key_id(&encoded), s.key_id);
        }
        assert!(
            encode(&state(1)).len() <= 120,
            "{}",
            encode(&state(1)).len()
        );
    }

    #[test]
    fn a_change_to_any_field_changes_the_encoding() {
        let base = full(3);
        let changes: Vec<fn(&mut KeyState)> = vec![
            |s| s.key_id = KeyId::from_bytes([9; 16]),
            |s| s.workspace_id = WorkspaceId::parse("ws_x").unwrap(),
            |s| s.name = KeyName::parse("other").unwrap(),
            |s| s.key_type = KeyType::Private,
            |s| s.environment = Environment::Production,
            |s| s.scopes = ScopeSet::ALL,
            |s| s.full_access = false,
            |s| s.secret_hash = SecretHash([0; 32]),
            |s| s.masked.push('x'),
            |s| s.public_key = None,
            |s| s.public_key = Some(String::new()),
            |s| s.allowed_domains.reverse(),
            |s| s.allowed_domains.pop().map(drop).unwrap_or(()),
            |s| s.created_at_ms += 1,
            |s| s.expires_at_ms = None,
            |s| s.revoked_at_ms = Some(1),
            |s| s.reveal_later = false,
            |s| s.version -= 1,
            |s| s.stream_version -= 1,
            |s| s.last_revealed_at_ms = None,
            |s| s.created_by.push('x'),
            |s| s.updated_at_ms -= 1,
            |s| s.rolled_from = None,
            |s| s.rolled_to = None,
            |s| s.rolled_to = Some(KeyId::from_bytes([7; 16])),
        ];
        for change in changes {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(changed, base);
            assert_ne!(encode(&changed), encode(&base), "{changed:?}");
            assert_eq!(decode(&encode(&changed)), Ok(changed));
        }
    }

    #[test]
    fn sorted_by_workspace_then_key() {
        let mut folded = FoldedKeys::default();
        let mut states = vec![state(3), state(1), full(2)];
        states[0].workspace_id = WorkspaceId::parse("ws_a").unwrap();
        states[1].workspace_id = WorkspaceId::parse("ws_b").unwrap();
        states[2].workspace_id = WorkspaceId::parse("ws_a").unwrap();
        for s in &states {
            folded.put(s);
        }
        let order: Vec<KeyId> = folded
            .into_sorted_by_workspace()
            .iter()
            .map(|e| encoded_key_id(e))
            .collect();
        assert_eq!(order, [full(2).key_id, state(3).key_id, state(1).key_id]);
    }

    #[test]
    fn sorting_by_rank_gives_the_byte_order_of_workspace_then_key() {
        // Prefixes of one another, and characters on both sides of `_` and `-`.
        let workspaces = ["ws_a", "ws_ab", "ws_a-", "ws_B", "ws_a_b", "ws_zz", "ws_0"];
        let mut parts = vec![FoldedKeys::default(), FoldedKeys::default()];
        for i in 0..3000u32 {
            let mut s = state(0);
            let mut id = [0u8; 16];
            // Spread over both halves of the key id, high bytes included.
            id[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            id[12..].copy_from_slice(&(i % 7).to_be_bytes());
            s.key_id = KeyId::from_bytes(id);
            s.workspace_id = WorkspaceId::parse(workspaces[i as usize % 7]).unwrap();
            parts[(i % 2) as usize].put(&s);
        }
        let mut expected: Vec<Box<[u8]>> = parts
            .iter()
            .flat_map(|p| p.states.values().cloned())
            .collect();
        expected.sort_unstable_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        let sorted: Vec<Box<[u8]>> =
            sorted_by_workspace(parts.into_iter().map(FoldedKeys::into_part).collect()).collect();
        assert_eq!(sorted.len(), 3000);
        assert_eq!(sorted, expected);
    }

    #[test]
    fn encodings_too_short_for_a_sort_key_still_compare() {
        let whole = encode(&full(4));
        for short in [&[][..], &[9], &[3, b'w', b's'], &whole[..10]] {
            assert_eq!(projection_order(short, short), std::cmp::Ordering::Equal);
            assert_ne!(projection_order(short, &whole), std::cmp::Ordering::Equal);
        }
    }

    #[test]
    fn truncated_or_padded_encodings_are_refused() {
        let encoded = encode(&full(4));
        assert!(decode(&encoded[..encoded.len() - 1]).is_err());
        let mut padded = encoded.to_vec();
        padded.push(0);
        assert!(decode(&padded).is_err());
    }
}
