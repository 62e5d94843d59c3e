//! Certificates, keys, policies and signed role assertions made in the test: a CA per test
//! ([`Ca`]), server and client certificates ([`Issued`]), the files a secured server reads
//! ([`SecureFiles`]), TLS channels to it, and JWTs signed with keys of a JWKS ([`Signer`]).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use kemon_keys::app::Settings;
use kemon_keys::grpc::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::T0_MS;

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, sans: Vec<SanType>, configure: impl FnOnce(&mut CertificateParams)) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(DnType::CommonName, "kemon test");
        configure(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        self.issue(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            |_| {},
        )
    }

    /// A client certificate whose URI SAN is `uri` (a SPIFFE ID).
    pub fn client(&self, uri: &str) -> Issued {
        self.issue(vec![SanType::URI(uri.try_into().unwrap())], |_| {})
    }

    /// A client certificate naming only the DNS name `name`.
    pub fn client_dns(&self, name: &str) -> Issued {
        self.issue(vec![SanType::DnsName(name.try_into().unwrap())], |_| {})
    }

    /// A client certificate with no SAN at all.
    pub fn client_without_names(&self) -> Issued {
        self.issue(vec![], |_| {})
    }

    /// A client certificate for `uri` that expired in 2020.
    pub fn expired_client(&self, uri: &str) -> Issued {
        self.issue(vec![SanType::URI(uri.try_into().unwrap())], |p| {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        })
    }
}

/// The files a secured test server reads, in a directory of their own.
pub struct SecureFiles {
    pub dir: tempfile::TempDir,
}

impl SecureFiles {
    pub fn new() -> SecureFiles {
        SecureFiles {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file as a rotation would: whole, by a rename, so the server never reads half.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// The server's certificate and key.
    pub fn server_cert(&self, issued: &Issued) {
        self.write("server.pem", &issued.cert);
        self.write("server.key", &issued.key);
    }

    /// Settings for TLS with these files (`server.pem`, `server.key`), mutual when `client_ca`
    /// is written, with a policy when `policy.toml` is, and assertions when `jwks.json` is;
    /// files checked every 20 ms.
    pub fn apply(&self, settings: &mut Settings) {
        let exists = |name: &str| self.path(name).exists().then(|| self.path(name));
        settings.security.tls = Some(TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: exists("client-ca.pem"),
        });
        settings.security.policy = exists("policy.toml");
        settings.security.assertion_jwks = exists("jwks.json");
        settings.security.reload_interval = Duration::from_millis(20);
    }
}

/// A TLS endpoint to a test server, trusting `ca_pem`, presenting `client` if given.
pub fn endpoint(addr: SocketAddr, ca_pem: &str, client: Option<&Issued>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert, &client.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

/// A TLS channel to a test server; panics if it cannot connect.
pub async fn tls_channel(addr: SocketAddr, ca_pem: &str, client: Option<&Issued>) -> Channel {
    endpoint(addr, ca_pem, client)
        .connect()
        .await
        .expect("TLS connect")
}

/// Whether a new connection with these credentials gets a health answer. Under TLS 1.3 a
/// client finishes its handshake before the server has judged its certificate, so a refused
/// certificate shows as a failed first call rather than a failed connect.
pub async fn health_over(addr: SocketAddr, ca_pem: &str, client: Option<&Issued>) -> bool {
    let Ok(channel) = endpoint(addr, ca_pem, client).connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok()
}

/// Polls `condition` every 10 ms until it holds; fails the test after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A policy file's text from `(identity, body)` entries.
pub fn policy(entries: &[(&str, &str)]) -> String {
    entries
        .iter()
        .map(|(identity, body)| format!("[identities.\"{identity}\"]\n{body}\n"))
        .collect()
}

/// An assertion signing key and its JWKS entry.
pub struct Signer {
    pub kid: String,
    algorithm: jsonwebtoken::Algorithm,
    key: KeyPair,
}

/// What an assertion says; [`Claims::new`] gives a valid one for the test clock.
#[derive(serde::Serialize, Clone)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub workspace_id: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    /// `actor` as `role` in `workspace`, issued at the test clock's start for 120 s.
    pub fn new(actor: &str, role: &str, workspace: &str) -> Claims {
        Claims {
            sub: actor.into(),
            role: role.into(),
            workspace_id: workspace.into(),
            aud: "kemon-keys".into(),
            iat: T0_MS / 1000,
            exp: T0_MS / 1000 + 120,
        }
    }
}

impl Signer {
    pub fn ed25519(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            algorithm: jsonwebtoken::Algorithm::EdDSA,
            key: KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        }
    }

    pub fn es256(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            algorithm: jsonwebtoken::Algorithm::ES256,
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    /// This key's public JWK.
    pub fn jwk(&self) -> serde_json::Value {
        let raw = self.key.public_key_raw();
        match self.algorithm {
            jsonwebtoken::Algorithm::EdDSA => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": self.kid, "x": B64URL.encode(raw),
            }),
            _ => serde_json::json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                "kid": self.kid, "x": B64URL.encode(&raw[1..33]), "y": B64URL.encode(&raw[33..65]),
            }),
        }
    }

    /// A signed assertion of `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = jsonwebtoken::Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        let der = self.key.serialize_der();
        let key = match self.algorithm {
            jsonwebtoken::Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_der(&der),
            _ => jsonwebtoken::EncodingKey::from_ec_der(&der),
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

/// A JWKS document of `signers`' public keys.
pub fn jwks(signers: &[&Signer]) -> String {
    serde_json::json!({ "keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>() }).to_string()
}

/// Writes `contents` to a fresh file of its own directory (for start-up refusals).
pub fn file_in(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}
