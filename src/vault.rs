//! The master key and the encrypted copies of private keys kept for RevealKey.
//!
//! A copy is XChaCha20-Poly1305 under the master key, with a random 24-byte nonce (large
//! enough that random nonces never collide) and the key id as associated data, so a copy
//! moved to another key's row fails to decrypt instead of revealing the wrong secret.
//! Stored form: `nonce ‖ ciphertext ‖ tag`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha3::{Digest, Sha3_256};
use std::fmt;
use std::path::Path;

use crate::domain::KeyId;

const NONCE_LEN: usize = 24;

/// The 32-byte key that encrypts revealable secrets. Never printed.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error(
        "the master key must be 64 hexadecimal characters (32 bytes), e.g. from `openssl rand -hex 32`; got {0} characters"
    )]
    Malformed(usize),
    #[error("cannot read the master key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

impl MasterKey {
    /// Parses 64 hex characters; surrounding whitespace (a file's newline) is ignored.
    pub fn parse_hex(s: &str) -> Result<MasterKey, MasterKeyError> {
        let s = s.trim();
        let mut key = [0u8; 32];
        hex::decode_to_slice(s, &mut key).map_err(|_| MasterKeyError::Malformed(s.len()))?;
        Ok(MasterKey(key))
    }

    pub fn from_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| MasterKeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        MasterKey::parse_hex(&text)
    }

    pub fn generate() -> MasterKey {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system's random source failed");
        MasterKey(key)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A public identifier of the key (not of its value): lets the server check at start-up
    /// that it holds the key the database's copies were sealed with.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha3_256::new();
        h.update(b"kemon-keys master key fingerprint v1");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// Encrypts a secret for the key `key_id`. Fails only if the random source does.
    pub fn seal(&self, key_id: KeyId, secret: &str) -> Result<Vec<u8>, getrandom::Error> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)?;
        let aad = key_id.to_bytes();
        let ciphertext = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            // Only a message longer than 256 GiB could fail to encrypt.
            .expect("encryption of a short message cannot fail");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Decrypts a copy sealed for `key_id`. `None` if it was not sealed under this master key
    /// for this key id, or was altered.
    pub fn open(&self, key_id: KeyId, sealed: &[u8]) -> Option<String> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).ok()?;
        let aad = key_id.to_bytes();
        let plain = self
            .cipher()
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_copies_open_only_for_their_key_and_master() {
        let master = MasterKey::generate();
        let id = KeyId::generate(1);
        let sealed = master.seal(id, "sk_secret").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"sk_secret"));
        assert_eq!(master.open(id, &sealed).as_deref(), Some("sk_secret"));
        assert_eq!(master.open(KeyId::generate(2), &sealed), None);
        assert_eq!(MasterKey::generate().open(id, &sealed), None);
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(master.open(id, &tampered), None);
    }

    #[test]
    fn master_keys_must_be_64_hex_characters() {
        let hex = MasterKey::generate().to_hex();
        assert!(MasterKey::parse_hex(&format!("{hex}\n")).is_ok());
        assert!(MasterKey::parse_hex(&hex[..63]).is_err());
        assert!(MasterKey::parse_hex(&format!("{}zz", &hex[..62])).is_err());
        assert!(MasterKey::parse_hex("").is_err());
    }
}
