//! Signed role assertions: instead of trusting `x-kemon-actor` and `x-kemon-role`, a caller
//! whose policy entry says `require_assertion = true` sends a short-lived JWT in
//! `x-kemon-assertion`, signed by the product's identity service, naming the user, the
//! workspace and the role. A compromised internal service can then not mint an owner role for
//! a workspace its user does not belong to: it holds no signing key.
//!
//! An assertion is accepted when:
//! - its header names `alg` `EdDSA` (Ed25519) or `ES256` (P-256) and a `kid` of a key in the
//!   JWKS file with that algorithm, and the signature verifies with that key;
//! - `aud` is (or contains) the configured audience, and `iss` is the configured issuer when
//!   one is configured;
//! - `exp` and `iat` are present, `exp - iat` is at most [`MAX_LIFETIME_SECS`], `iat` and
//!   `nbf` are not in the future and `exp` is not past (with [`LEEWAY_SECS`] for clock skew),
//!   by the service's clock;
//! - `sub` is an actor (as `x-kemon-actor` would be), `role` one of the four roles, and
//!   `workspace_id` exactly the workspace the request is about.
//!
//! The token is never logged or repeated in an error.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::auth::{MAX_ACTOR_LEN, Role};
use crate::clock::Clock;
use crate::reload::Watched;

/// The metadata an assertion comes in.
pub const ASSERTION_HEADER: &str = "x-kemon-assertion";
/// Longest accepted lifetime, `exp - iat`: assertions are minted per user request.
pub const MAX_LIFETIME_SECS: i64 = 300;
/// Clock skew tolerated on `exp`, `iat` and `nbf`.
pub const LEEWAY_SECS: i64 = 30;

/// Why an assertion was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionError {
    /// The caller must send `x-kemon-assertion` and did not.
    Missing,
    /// Not a valid assertion; the problem is one of a few fixed words (`format`, `key`,
    /// `signature`, `audience`, `issuer`, `claims`, `lifetime`, `not_yet_valid`).
    Invalid(&'static str),
    /// Past its `exp`.
    Expired,
    /// Valid, but for another workspace than the request's.
    WorkspaceMismatch,
}

/// What a valid assertion says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asserted {
    pub actor: String,
    pub role: Role,
}

/// The public keys assertions are checked with, by key id.
pub struct Jwks {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Jwks").field("kids", &kids).finish()
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Ed25519 (`OKP`) and P-256 (`EC`) keys with a
    /// `kid` are kept; other keys (RSA ones an identity provider also publishes) are skipped.
    /// A file with no usable key, or with a `kid` twice, is refused.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Jwks> {
        let set: JwkSet = serde_json::from_slice(bytes).context("not a JWKS document")?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => continue,
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                bail!("a JWKS key without a `kid`");
            };
            let key = DecodingKey::from_jwk(jwk).with_context(|| format!("JWKS key {kid:?}"))?;
            if keys.insert(kid.clone(), (algorithm, key)).is_some() {
                bail!("JWKS key id {kid:?} appears twice");
            }
        }
        if keys.is_empty() {
            bail!("the JWKS holds no Ed25519 or P-256 key with a `kid`");
        }
        Ok(Jwks { keys })
    }
}

/// The claims an assertion carries.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    workspace_id: String,
    exp: i64,
    iat: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

/// Checks assertions against the JWKS in force.
pub struct AssertionVerifier {
    keys: Arc<Watched<Jwks>>,
    audience: String,
    issuer: Option<String>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AssertionVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionVerifier")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl AssertionVerifier {
    pub fn new(
        keys: Arc<Watched<Jwks>>,
        audience: String,
        issuer: Option<String>,
        clock: Arc<dyn Clock>,
    ) -> AssertionVerifier {
        AssertionVerifier {
            keys,
            audience,
            issuer,
            clock,
        }
    }

    /// The actor and role `token` asserts for `workspace` (the request's, as sent).
    pub fn verify(&self, token: &str, workspace: &str) -> Result<Asserted, AssertionError> {
        use jsonwebtoken::errors::ErrorKind;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AssertionError::Invalid("format"))?;
        let keys = self.keys.current();
        let (algorithm, key) = header
            .kid
            .as_deref()
            .and_then(|kid| keys.keys.get(kid))
            .ok_or(AssertionError::Invalid("key"))?;
        if header.alg != *algorithm {
            return Err(AssertionError::Invalid("key"));
        }
        let mut validation = Validation::new(*algorithm);
        // Time is judged below by the service's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp", "aud"].map(str::to_owned).into();
        validation.set_audience(&[&self.audience]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| {
                AssertionError::Invalid(match e.kind() {
                    ErrorKind::InvalidSignature => "signature",
                    ErrorKind::InvalidAudience => "audience",
                    ErrorKind::InvalidIssuer => "issuer",
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => "claims",
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey => "key",
                    _ => "format",
                })
            })?
            .claims;
        let now = self.clock.now_ms().div_euclid(1000);
        if claims.exp - claims.iat > MAX_LIFETIME_SECS || claims.exp <= claims.iat {
            return Err(AssertionError::Invalid("lifetime"));
        }
        if claims.iat > now + LEEWAY_SECS || claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
            return Err(AssertionError::Invalid("not_yet_valid"));
        }
        if now >= claims.exp + LEEWAY_SECS {
            return Err(AssertionError::Expired);
        }
        let actor = claims.sub.trim();
        if actor.is_empty()
            || actor.chars().count() > MAX_ACTOR_LEN
            || !actor.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        {
            return Err(AssertionError::Invalid("claims"));
        }
        let role = Role::parse(&claims.role).ok_or(AssertionError::Invalid("claims"))?;
        if claims.workspace_id != workspace {
            return Err(AssertionError::WorkspaceMismatch);
        }
        Ok(Asserted {
            actor: actor.to_owned(),
            role,
        })
    }
}
