//! ListKeys paging (AIP-158): how many keys a page holds, and the page token that says where
//! the next page starts.
//!
//! A token holds no server state, so it stays valid across restarts and on any server of a
//! deployment. It carries the last key id sent and a fingerprint of the query it was issued
//! for, so that a token presented with other filters is refused instead of silently resuming
//! a different listing at an unrelated position.
//!
//! Tokens are neither encrypted nor signed: they reveal only a key id the caller was just
//! sent, and a forged one can only choose where the caller's own listing resumes, which shows
//! nothing that listing from its first page would not. Which workspace a listing reads comes
//! from the request and is enforced by the query itself; the fingerprint makes a token used
//! with another workspace or other filters an error rather than a wrong page.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha3::{Digest, Sha3_256};

use crate::domain::{Environment, KeyId, KeyType, WorkspaceId};
use crate::store::ListFilter;

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page served; larger requests get pages of this size.
pub const MAX_PAGE_SIZE: u32 = 200;

/// Keys per page, 1 to [`MAX_PAGE_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(u32);

impl PageSize {
    /// 0 (unset) means [`DEFAULT_PAGE_SIZE`]. More than [`MAX_PAGE_SIZE`] is coerced down
    /// rather than refused (AIP-158): a client asking for "as many as you will give" gets
    /// a full page and a token to go on with.
    pub fn from_request(requested: u32) -> PageSize {
        PageSize(match requested {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        })
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// Bytes of the query digest kept in a token: enough that tokens of two different queries
/// collide by accident with probability 2^-64. It detects mistakes; it is not a secret.
const FINGERPRINT_LEN: usize = 8;

/// A digest of everything that selects which keys a listing returns, and in which order.
/// `page_size` is not part of it: AIP-158 lets a client change it between pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryFingerprint([u8; FINGERPRINT_LEN]);

impl QueryFingerprint {
    /// The one place a listing's query is digested. Outstanding tokens carry its output, so
    /// changing what goes in here (or how) invalidates them: bump [`TOKEN_VERSION`] then.
    pub fn of(workspace_id: &WorkspaceId, filter: &ListFilter) -> QueryFingerprint {
        // Destructured without `..`: a filter added to `ListFilter` does not compile until it
        // is digested here too, so a token can never be reused across values of it.
        let ListFilter {
            key_type,
            environment,
            include_revoked,
            unused_since_ms,
            never_used,
            expires_before_ms,
        } = filter;
        let mut h = Sha3_256::new();
        h.update(b"kemon-keys/list-keys/query/v1");
        // The storage spellings of the enums: stable, unlike their Rust or proto numbering.
        field(&mut h, Some(workspace_id.as_str()));
        field(&mut h, key_type.map(KeyType::as_str));
        field(&mut h, environment.map(Environment::as_str));
        field(&mut h, Some(if *include_revoked { "yes" } else { "no" }));
        // Digested only when one is set, so that every token issued before these filters
        // existed still matches its query.
        if unused_since_ms.is_some() || *never_used || expires_before_ms.is_some() {
            let unused_since = unused_since_ms.map(|ms| ms.to_string());
            let expires_before = expires_before_ms.map(|ms| ms.to_string());
            field(&mut h, unused_since.as_deref());
            field(&mut h, Some(if *never_used { "yes" } else { "no" }));
            field(&mut h, expires_before.as_deref());
        }
        let digest = h.finalize();
        let mut fingerprint = [0; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        QueryFingerprint(fingerprint)
    }
}

/// Writes one optional value so that no two different sequences of values digest alike: a
/// presence byte, then the value's length, then the value.
fn field(h: &mut Sha3_256, value: Option<&str>) {
    match value {
        None => h.update([0]),
        Some(v) => {
            h.update([1]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
    }
}

/// The first byte of every token, so that the layout can change without an old token being
/// misread as a new one (it is refused as malformed instead).
const TOKEN_VERSION: u8 = 1;
/// Version 1: the version byte, the last key id sent (16 bytes, big-endian ULID), the query
/// fingerprint. Sent as URL-safe base64 without padding (34 characters).
const TOKEN_LEN: usize = 1 + 16 + FINGERPRINT_LEN;

/// Where a listing resumes: after key `last`, for the query with fingerprint `query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    last: KeyId,
    query: QueryFingerprint,
}

/// Why a `page_token` was refused; the message is the field violation's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error(
        "is not a page token from this service: send a next_page_token from a ListKeys \
         response unchanged, or none for the first page"
    )]
    Malformed,
    #[error(
        "was issued for a different query: page with the workspace_id, type, environment, \
         include_revoked, unused_since, never_used and expires_before of the first page, or \
         start again without a page_token"
    )]
    OtherQuery,
}

impl PageToken {
    pub fn new(last: KeyId, query: QueryFingerprint) -> PageToken {
        PageToken { last, query }
    }

    pub fn encode(self) -> String {
        let mut bytes = [0; TOKEN_LEN];
        bytes[0] = TOKEN_VERSION;
        bytes[1..17].copy_from_slice(&self.last.to_bytes());
        bytes[17..].copy_from_slice(&self.query.0);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads a token's contents. Only the canonical spelling decodes (no padding, no
    /// standard-alphabet characters, no stray trailing bits), so one token has one string.
    pub fn parse(token: &str) -> Result<PageToken, PageTokenError> {
        let decoded = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| PageTokenError::Malformed)?;
        let bytes = <[u8; TOKEN_LEN]>::try_from(decoded.as_slice())
            .map_err(|_| PageTokenError::Malformed)?;
        if bytes[0] != TOKEN_VERSION {
            return Err(PageTokenError::Malformed);
        }
        let mut last = [0; 16];
        last.copy_from_slice(&bytes[1..17]);
        let mut query = [0; FINGERPRINT_LEN];
        query.copy_from_slice(&bytes[17..]);
        Ok(PageToken {
            last: KeyId::from_bytes(last),
            query: QueryFingerprint(query),
        })
    }

    /// The key id to resume after, if this token was issued for `query`.
    pub fn resume_after(self, query: QueryFingerprint) -> Result<KeyId, PageTokenError> {
        if self.query == query {
            Ok(self.last)
        } else {
            Err(PageTokenError::OtherQuery)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Environment, KeyType};

    fn workspace(s: &str) -> WorkspaceId {
        WorkspaceId::parse(s).unwrap()
    }

    fn fingerprint(filter: &ListFilter) -> QueryFingerprint {
        QueryFingerprint::of(&workspace("ws_acme"), filter)
    }

    #[test]
    fn page_size_defaults_and_is_coerced_down() {
        for (requested, served) in [
            (0, DEFAULT_PAGE_SIZE),
            (1, 1),
            (199, 199),
            (MAX_PAGE_SIZE, MAX_PAGE_SIZE),
            (MAX_PAGE_SIZE + 1, MAX_PAGE_SIZE),
            (1000, MAX_PAGE_SIZE),
            (u32::MAX, MAX_PAGE_SIZE),
        ] {
            assert_eq!(
                PageSize::from_request(requested).get(),
                served,
                "{requested}"
            );
        }
    }

    #[test]
    fn a_token_round_trips_for_its_own_query() {
        let id = KeyId::generate(1_700_000_000_000);
        let query = fingerprint(&ListFilter::default());
        let token = PageToken::new(id, query).encode();
        assert_eq!(token.len(), (TOKEN_LEN * 4).div_ceil(3));
        let parsed = PageToken::parse(&token).unwrap();
        assert_eq!(parsed, PageToken::new(id, query));
        assert_eq!(parsed.resume_after(query), Ok(id));
    }

    #[test]
    fn a_token_is_opaque_and_url_safe() {
        let id = KeyId::generate(1_700_000_000_000);
        let token = PageToken::new(id, fingerprint(&ListFilter::default())).encode();
        let id = id.to_string();
        assert!(!token.contains(&id), "{token} contains {id}");
        assert!(
            !token.contains(&id["key_".len()..]),
            "{token} contains {id}"
        );
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
    }

    #[test]
    fn the_token_format_is_stable() {
        // Clients hold tokens across deployments: a change here (layout, fingerprint input or
        // encoding) must come with a new TOKEN_VERSION, never silently. The expected value was
        // computed independently of this code (Python's hashlib.sha3_256 and base64).
        let id = KeyId::parse("key_01HZX3Q5V7W8Y9Z0ABCDEFGHJK").unwrap();
        let filter = ListFilter {
            key_type: Some(KeyType::Public),
            environment: Some(Environment::Test),
            include_revoked: true,
            ..ListFilter::default()
        };
        let token = PageToken::new(id, fingerprint(&filter)).encode();
        assert_eq!(token, "AQGP-juXZ-I8n4FLY1z4RlMO7bbXzUudtA");
    }

    #[test]
    fn every_filter_changes_the_fingerprint() {
        let base = ListFilter::default();
        let variants = [
            ListFilter {
                key_type: Some(KeyType::Private),
                ..base.clone()
            },
            ListFilter {
                key_type: Some(KeyType::Public),
                ..base.clone()
            },
            ListFilter {
                environment: Some(Environment::Production),
                ..base.clone()
            },
            ListFilter {
                environment: Some(Environment::Test),
                ..base.clone()
            },
            ListFilter {
                include_revoked: true,
                ..base.clone()
            },
            ListFilter {
                unused_since_ms: Some(60_000),
                ..base.clone()
            },
            ListFilter {
                unused_since_ms: Some(120_000),
                ..base.clone()
            },
            ListFilter {
                never_used: true,
                ..base.clone()
            },
            ListFilter {
                expires_before_ms: Some(60_000),
                ..base.clone()
            },
        ];
        let mut seen = vec![fingerprint(&base)];
        for filter in &variants {
            let f = fingerprint(filter);
            assert!(!seen.contains(&f), "{filter:?} collides");
            seen.push(f);
        }
        let other = QueryFingerprint::of(&workspace("ws_other"), &base);
        assert!(!seen.contains(&other), "the workspace is part of the query");
        assert_eq!(fingerprint(&base), fingerprint(&ListFilter::default()));

        let id = KeyId::generate(1_700_000_000_000);
        let token = PageToken::parse(&PageToken::new(id, seen[0]).encode()).unwrap();
        for f in &seen[1..] {
            assert_eq!(token.resume_after(*f), Err(PageTokenError::OtherQuery));
        }
    }

    #[test]
    fn anything_else_is_malformed() {
        let id = KeyId::generate(1_700_000_000_000);
        let query = fingerprint(&ListFilter::default());
        let token = PageToken::new(id, query).encode();
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        let reencode = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let mut other_version = bytes.clone();
        other_version[0] = TOKEN_VERSION + 1;
        let short = reencode(&bytes[..TOKEN_LEN - 1]);
        bytes.push(0);
        let long = reencode(&bytes);
        let standard_alphabet = token.replace('-', "+").replace('_', "/");
        // The last character of 25 bytes carries 2 bits of data and 4 zero bits.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let (head, last) = token.split_at(token.len() - 1);
        let last = ALPHABET
            .iter()
            .position(|&c| c == last.as_bytes()[0])
            .unwrap();
        let stray_bits = format!("{head}{}", char::from(ALPHABET[last + 1]));
        let mut cases = vec![
            String::new(),
            " ".into(),
            "garbage".into(),
            "!!!".into(),
            id.to_string(),
            id.to_string()["key_".len()..].to_owned(),
            format!("{token}="),
            format!(" {token}"),
            reencode(&other_version),
            short,
            long,
            stray_bits,
            "A".repeat(16 * 1024),
        ];
        if standard_alphabet != token {
            cases.push(standard_alphabet);
        }
        for case in cases {
            assert_eq!(
                PageToken::parse(&case),
                Err(PageTokenError::Malformed),
                "{case:?}"
            );
        }
    }
}
