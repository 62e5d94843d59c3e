//! How the gRPC port authenticates its callers, from the `serve` flags: TLS
//! ([`crate::grpc::tls`]), mutual TLS with an access policy ([`crate::grpc::policy`]) and
//! signed role assertions ([`crate::grpc::assertion`]), each loaded at start (a bad file
//! refuses the start) and reloaded when its files change.
//!
//! Safe defaults: without TLS the port may listen on loopback addresses only, where the
//! callers are processes of the same host or pod (development, a sidecar); anything else
//! refuses to start unless `--insecure-plaintext` says otherwise, with a loud warning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::clock::Clock;
use crate::config::ServeArgs;
use crate::grpc::assertion::{AssertionVerifier, Jwks};
use crate::grpc::policy::{Access, Policy};
use crate::grpc::tls::{TlsConfig, TlsFiles};
use crate::reload::Watched;

/// The audience an assertion must name unless configured otherwise.
pub const DEFAULT_ASSERTION_AUDIENCE: &str = "kemon-keys";

/// How callers are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecuritySettings {
    /// TLS on the gRPC port; mutual TLS when it names a client CA.
    pub tls: Option<TlsFiles>,
    /// The access policy (with mutual TLS).
    pub policy: Option<PathBuf>,
    /// The JWKS that role assertions are checked with.
    pub assertion_jwks: Option<PathBuf>,
    /// The `aud` an assertion must name.
    pub assertion_audience: String,
    /// The `iss` an assertion must name, when set.
    pub assertion_issuer: Option<String>,
    /// Serve plaintext on a non-loopback address anyway.
    pub insecure_plaintext: bool,
    /// How often the certificate, key, client CA, policy and JWKS files are checked for
    /// changes.
    pub reload_interval: Duration,
}

impl Default for SecuritySettings {
    /// Plaintext, header trust: what development and the tests' loopback servers use.
    fn default() -> SecuritySettings {
        SecuritySettings {
            tls: None,
            policy: None,
            assertion_jwks: None,
            assertion_audience: DEFAULT_ASSERTION_AUDIENCE.to_owned(),
            assertion_issuer: None,
            insecure_plaintext: false,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl SecuritySettings {
    pub fn from_args(args: &ServeArgs) -> SecuritySettings {
        SecuritySettings {
            tls: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: args.client_ca.clone(),
                }),
                _ => None,
            },
            policy: args.policy.clone(),
            assertion_jwks: args.assertion_jwks.clone(),
            assertion_audience: args.assertion_audience.clone(),
            assertion_issuer: args.assertion_issuer.clone(),
            insecure_plaintext: args.insecure_plaintext,
            reload_interval: Duration::from_secs(args.reload_interval_secs),
        }
    }

    /// Refuses plaintext on an address other than loopback, unless told to allow it.
    pub fn check_listen(&self, bound: SocketAddr) -> anyhow::Result<()> {
        if self.tls.is_some() || bound.ip().is_loopback() {
            return Ok(());
        }
        if !self.insecure_plaintext {
            bail!(
                "refusing to serve plaintext gRPC on {bound}, which is not a loopback address: \
                 anyone who reaches it could manage every workspace's keys. Give --tls-cert and \
                 --tls-key (and --client-ca with --policy for mutual TLS), listen on 127.0.0.1, \
                 or pass --insecure-plaintext to accept the risk"
            );
        }
        tracing::warn!(
            %bound,
            "INSECURE: SERVING PLAINTEXT gRPC ON A NON-LOOPBACK ADDRESS (--insecure-plaintext). \
             Callers are not authenticated: anyone who can reach this port can create, reveal \
             and revoke any workspace's keys and read the audit log. Use TLS with a client CA \
             and a policy in production."
        );
        Ok(())
    }

    /// Loads the certificate, policy and JWKS files; any bad file is an error.
    pub fn load(&self, clock: Arc<dyn Clock>) -> anyhow::Result<Security> {
        let mutual = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if mutual != self.policy.is_some() {
            bail!("--client-ca and --policy go together: the policy names the client identities");
        }
        if self.assertion_jwks.is_some() && self.policy.is_none() {
            bail!(
                "--assertion-jwks needs --policy: the policy says which callers must send assertions"
            );
        }
        let tls = self.tls.as_ref().map(TlsFiles::open).transpose()?;
        let assertions = match &self.assertion_jwks {
            None => None,
            Some(path) => {
                let keys =
                    Watched::open("assertion JWKS", vec![path.clone()], |c| Jwks::parse(&c[0]))?;
                let verifier = Arc::new(AssertionVerifier::new(
                    keys.clone(),
                    self.assertion_audience.clone(),
                    self.assertion_issuer.clone(),
                    clock,
                ));
                Some((keys, verifier))
            }
        };
        let access = match &self.policy {
            None => None,
            Some(path) => {
                let with_assertions = assertions.is_some();
                let policy = Watched::open("access policy", vec![path.clone()], move |c| {
                    Policy::parse(std::str::from_utf8(&c[0])?, with_assertions)
                })?;
                Some(Arc::new(Access {
                    policy,
                    assertions: assertions.as_ref().map(|(_, v)| v.clone()),
                }))
            }
        };
        Ok(Security {
            tls,
            access,
            jwks: assertions.map(|(keys, _)| keys),
            reload_interval: self.reload_interval,
        })
    }
}

/// The loaded security settings, reloaded while the server runs.
#[derive(Debug, Clone)]
pub struct Security {
    pub tls: Option<Arc<TlsConfig>>,
    /// The policy and assertion checks, under mutual TLS.
    pub access: Option<Arc<Access>>,
    jwks: Option<Arc<Watched<Jwks>>>,
    reload_interval: Duration,
}

impl Security {
    /// Checks every file for changes until `stop` turns true.
    pub fn watch(&self, stop: &tokio::sync::watch::Sender<bool>) {
        let every = self.reload_interval;
        if let Some(tls) = &self.tls {
            tls.watch(every, stop.subscribe());
        }
        if let Some(access) = &self.access {
            access.policy.watch(every, stop.subscribe());
        }
        if let Some(jwks) = &self.jwks {
            jwks.watch(every, stop.subscribe());
        }
    }
}
