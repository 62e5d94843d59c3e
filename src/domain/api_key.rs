//! The key string format, and the hash under which a key is stored.
//!
//! ```text
//! sk_[test_]<32 random base62><6 checksum base62>
//! pk_[test_]<32 random base62><6 checksum base62>
//! ```
//!
//! The random part carries 32 × log2(62) ≈ 190 bits. The checksum is the CRC32 (IEEE) of
//! everything before it, prefix included, written as 6 base62 digits, most significant first,
//! padded with `0`. It lets Verify reject a mistyped or invented string without a lookup, and
//! lets secret scanners recognise our keys with few false positives (the scheme GitHub's
//! tokens use).
//!
//! Keys are stored as SHA3-256 of the whole string. No salt or slow KDF is needed: unlike a
//! password, the input already has far more entropy than any brute force can cover, and the
//! hash must be fast because Verify runs on every request.

use sha3::{Digest, Sha3_256};
use std::fmt;

use super::{Environment, KeyType};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const BODY_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;
/// The longest key string: `sk_test_` and the body. Anything longer is malformed at once.
pub const MAX_KEY_LEN: usize = 8 + BODY_LEN;

/// A freshly generated key string. Deliberately not `Debug` or `Display`: the only ways out
/// are [`ApiKey::expose`], [`ApiKey::hash`] and [`ApiKey::masked`].
pub struct ApiKey(String);

impl ApiKey {
    /// A new key from the operating system's random source. Panics if that fails; request
    /// paths use [`ApiKey::try_generate`].
    pub fn generate(key_type: KeyType, environment: Environment) -> ApiKey {
        ApiKey::try_generate(key_type, environment)
            .expect("the operating system's random source failed")
    }

    /// A new key from the operating system's random source.
    pub fn try_generate(
        key_type: KeyType,
        environment: Environment,
    ) -> Result<ApiKey, getrandom::Error> {
        let mut s = String::with_capacity(MAX_KEY_LEN);
        s.push_str(prefix(key_type, environment));
        let mut pool = [0u8; 64];
        let mut filled = 0;
        while filled < RANDOM_LEN {
            getrandom::fill(&mut pool)?;
            // Rejection sampling: 248 = 4 × 62, so `b % 62` is uniform for b < 248.
            for &b in pool.iter().filter(|&&b| b < 248) {
                if filled == RANDOM_LEN {
                    break;
                }
                s.push(BASE62[(b % 62) as usize] as char);
                filled += 1;
            }
        }
        let crc = crc32fast::hash(s.as_bytes());
        push_checksum(&mut s, crc);
        Ok(ApiKey(s))
    }

    /// The key string. Call only to hand it to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    pub fn masked(&self) -> String {
        masked(&self.0)
    }
}

/// What a well-formed key string says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFormat {
    pub key_type: KeyType,
    pub environment: Environment,
}

/// Checks a presented key string: prefix, length, alphabet and checksum. Cheap, allocation
/// free, and done before hashing, so garbage never costs a hash.
pub fn parse(key: &str) -> Option<KeyFormat> {
    let bytes = key.as_bytes();
    if bytes.len() > MAX_KEY_LEN {
        return None;
    }
    let (key_type, rest) = if let Some(rest) = bytes.strip_prefix(b"sk_") {
        (KeyType::Private, rest)
    } else if let Some(rest) = bytes.strip_prefix(b"pk_") {
        (KeyType::Public, rest)
    } else {
        return None;
    };
    let (environment, body) = match rest.strip_prefix(b"test_") {
        Some(body) => (Environment::Test, body),
        None => (Environment::Production, rest),
    };
    if body.len() != BODY_LEN || !body.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let split = bytes.len() - CHECKSUM_LEN;
    let expected = decode_checksum(&bytes[split..])?;
    (crc32fast::hash(&bytes[..split]) == expected).then_some(KeyFormat {
        key_type,
        environment,
    })
}

/// The key's visible prefix and last four characters, e.g. `sk_test_…a1b2`.
pub fn masked(key: &str) -> String {
    let cut = if key.starts_with("sk_test_") || key.starts_with("pk_test_") {
        8
    } else {
        3
    };
    let tail = key.len().saturating_sub(4).max(cut);
    format!("{}…{}", &key[..cut], &key[tail..])
}

pub fn prefix(key_type: KeyType, environment: Environment) -> &'static str {
    match (key_type, environment) {
        (KeyType::Private, Environment::Production) => "sk_",
        (KeyType::Private, Environment::Test) => "sk_test_",
        (KeyType::Public, Environment::Production) => "pk_",
        (KeyType::Public, Environment::Test) => "pk_test_",
    }
}

fn push_checksum(s: &mut String, mut crc: u32) {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    s.extend(digits.iter().map(|&d| d as char));
}

fn decode_checksum(digits: &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'A'..=b'Z' => d - b'A' + 10,
            b'a'..=b'z' => d - b'a' + 36,
            _ => return None,
        };
        value = value * 62 + u64::from(v);
    }
    u32::try_from(value).ok()
}

/// SHA3-256 of a key string: the only form in which a private key is stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl std::hash::Hash for SecretHash {
    /// The first eight bytes of the digest, as one `u64`: the digest is already uniformly
    /// distributed, and the verification cache's hasher uses this value as it is.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl SecretHash {
    pub fn of(key: &str) -> SecretHash {
        SecretHash(Sha3_256::digest(key.as_bytes()).into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<SecretHash> {
        bytes.try_into().ok().map(SecretHash)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({})", hex::encode(&self.0[..6]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_with_their_type_and_environment() {
        for key_type in [KeyType::Private, KeyType::Public] {
            for environment in [Environment::Production, Environment::Test] {
                let key = ApiKey::generate(key_type, environment);
                let s = key.expose();
                assert!(s.starts_with(prefix(key_type, environment)));
                assert_eq!(s.len(), prefix(key_type, environment).len() + BODY_LEN);
                assert_eq!(
                    parse(s),
                    Some(KeyFormat {
                        key_type,
                        environment
                    }),
                    "{s}"
                );
            }
        }
    }

    #[test]
    fn every_single_character_change_is_rejected() {
        let key = ApiKey::generate(KeyType::Private, Environment::Test);
        let s = key.expose();
        for i in 0..s.len() {
            for replacement in [b'0', b'Z', b'z', b'_'] {
                let mut bytes = s.as_bytes().to_vec();
                if bytes[i] == replacement {
                    continue;
                }
                bytes[i] = replacement;
                let changed = String::from_utf8(bytes).unwrap();
                assert_eq!(parse(&changed), None, "{changed} accepted");
            }
        }
    }

    #[test]
    fn wrong_prefixes_lengths_and_alphabets_are_malformed() {
        let s = ApiKey::generate(KeyType::Private, Environment::Production)
            .expose()
            .to_owned();
        assert_eq!(parse(""), None);
        assert_eq!(parse("sk_"), None);
        assert_eq!(parse(&s[..s.len() - 1]), None);
        assert_eq!(parse(&format!("{s}0")), None);
        assert_eq!(parse(&s.replacen("sk_", "xk_", 1)), None);
        assert_eq!(
            parse(&s.replacen("sk_", "sk_test_", 1)),
            None,
            "prefix is checksummed"
        );
        assert_eq!(parse(&format!("{}é", &s[..s.len() - 2])), None);
    }

    #[test]
    fn masked_shows_prefix_and_last_four() {
        let key = ApiKey::generate(KeyType::Private, Environment::Test);
        let s = key.expose();
        let m = key.masked();
        assert!(m.starts_with("sk_test_…"));
        assert!(m.ends_with(&s[s.len() - 4..]));
        assert_eq!(m.chars().count(), "sk_test_".len() + 1 + 4);
        assert_eq!(masked("pk_abcdefgh"), "pk_…efgh");
    }

    #[test]
    fn hash_is_sha3_256_of_the_string() {
        // Known answer for SHA3-256("abc") from FIPS 202 examples.
        assert_eq!(
            hex::encode(SecretHash::of("abc").0),
            "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
        );
    }

    #[test]
    fn checksum_digits_round_trip() {
        for crc in [0u32, 1, 61, 62, u32::MAX] {
            let mut s = String::new();
            push_checksum(&mut s, crc);
            assert_eq!(decode_checksum(s.as_bytes()), Some(crc));
        }
        assert_eq!(decode_checksum(b"zzzzzz"), None, "beyond u32");
    }
}
