//! TLS on the gRPC port (rustls, no OpenSSL), and who the client is under mutual TLS.
//!
//! tonic's own `ServerTlsConfig` fixes its certificate at start, so the server terminates TLS
//! itself, in front of `serve_with_incoming`: every accepted connection (already holding one
//! of the `max_connections` slots, see [`super::connections`]) is handshaken in a task of its
//! own with the rustls configuration in force at that moment. The configuration is a
//! [`Watched`] value: a rotated certificate, key or client CA is used by the next handshake,
//! while connections already open keep theirs.
//!
//! With a client CA, a client must present a certificate chained to it. Its identity is the
//! certificate's URI SAN (a SPIFFE ID such as `spiffe://kemon.internal/ns/app/sa/web`; a
//! certificate with several URI SANs names none, as SPIFFE requires exactly one), else its
//! first DNS SAN. That identity, not any header, is what the access policy
//! ([`super::policy`]) grants surfaces to.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::Stream;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tonic::transport::server::Connected;

use super::connections::{ConnectionInfo, LimitedConnection};
use crate::reload::Watched;

/// The PEM files TLS is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to: mutual TLS when set.
    pub client_ca: Option<PathBuf>,
}

/// The rustls configuration in force, reloaded when its files change.
pub type TlsConfig = Watched<ServerConfig>;

impl TlsFiles {
    /// Loads the configuration and keeps it for reloading; a bad file is an error.
    pub fn open(&self) -> anyhow::Result<Arc<TlsConfig>> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_ca.clone());
        let mutual = self.client_ca.is_some();
        Watched::open(
            "TLS certificate, key and client CA",
            files,
            move |contents| {
                server_config(&contents[0], &contents[1], mutual.then(|| &contents[2][..]))
            },
        )
    }
}

/// A rustls server configuration from PEM contents.
fn server_config(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate file is not PEM")?;
    if chain.is_empty() {
        bail!("the certificate file holds no certificate");
    }
    // The error says what is wrong with the file, never what it holds.
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| anyhow::anyhow!("the key file holds no usable private key ({e})"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.context("the client CA file is not PEM")?)
                    .context("a client CA certificate")?;
            }
            if roots.is_empty() {
                bail!("the client CA file holds no certificate");
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the certificate and key do not make a pair")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What TLS established about a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer {
    /// The client certificate's URI SAN, else its first DNS SAN; `None` without a client
    /// certificate, or with one that names neither.
    pub identity: Option<String>,
}

/// The identity a client certificate names: its only URI SAN, else its first DNS SAN.
pub fn certificate_identity(cert: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let mut uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => return Some(uri.to_owned()),
        (Some(_), Some(_)) => return None,
        (None, _) => {}
    }
    names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some((*name).to_owned()),
        _ => None,
    })
}

/// An accepted connection, in plain text or TLS.
#[derive(Debug)]
pub enum ServerConnection {
    Plain(LimitedConnection),
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<LimitedConnection>>,
        peer: Arc<TlsPeer>,
    },
}

impl Connected for ServerConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        match self {
            ServerConnection::Plain(connection) => connection.connect_info(),
            ServerConnection::Tls { stream, peer } => {
                stream.get_ref().0.connect_info().with_tls(peer.clone())
            }
        }
    }
}

impl AsyncRead for ServerConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(c) => Pin::new(c).poll_read(cx, buf),
            ServerConnection::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConnection::Plain(c) => Pin::new(c).poll_write(cx, buf),
            ServerConnection::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConnection::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            ServerConnection::Tls { stream, .. } => {
                Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerConnection::Plain(c) => c.is_write_vectored(),
            ServerConnection::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(c) => Pin::new(c).poll_flush(cx),
            ServerConnection::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConnection::Plain(c) => Pin::new(c).poll_shutdown(cx),
            ServerConnection::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections to serve: `accepted` as they are without TLS, else each after its TLS
/// handshake (at most `handshake_timeout`), handshakes running concurrently so that a slow
/// client holds up no other. A failed handshake (no client certificate, one from another CA,
/// an expired one) closes that connection and is logged at DEBUG.
pub fn incoming(
    accepted: impl Stream<Item = io::Result<LimitedConnection>> + Send + 'static,
    tls: Option<Arc<TlsConfig>>,
    handshake_timeout: Duration,
) -> Pin<Box<dyn Stream<Item = io::Result<ServerConnection>> + Send>> {
    use futures::StreamExt;
    match tls {
        None => Box::pin(accepted.map(|c| c.map(ServerConnection::Plain))),
        Some(config) => Box::pin(Handshakes {
            accepted: Box::pin(accepted),
            accepted_done: false,
            handshakes: JoinSet::new(),
            config,
            timeout: handshake_timeout,
        }),
    }
}

/// Accepted connections whose handshakes are under way; yields each once it completes.
struct Handshakes {
    accepted: Pin<Box<dyn Stream<Item = io::Result<LimitedConnection>> + Send>>,
    accepted_done: bool,
    handshakes: JoinSet<Option<ServerConnection>>,
    config: Arc<TlsConfig>,
    timeout: Duration,
}

async fn handshake(
    connection: LimitedConnection,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Option<ServerConnection> {
    let remote = connection.connect_info().remote_addr;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(timeout, acceptor.accept(connection)).await {
        Ok(Ok(stream)) => {
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| certificate_identity(leaf.as_ref()));
            Some(ServerConnection::Tls {
                stream: Box::new(stream),
                peer: Arc::new(TlsPeer { identity }),
            })
        }
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}

impl Stream for Handshakes {
    type Item = io::Result<ServerConnection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.accepted_done {
            match this.accepted.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(connection))) => {
                    let config = this.config.current();
                    this.handshakes
                        .spawn(handshake(connection, config, this.timeout));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.accepted_done = true,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(connection)))) => {
                    return Poll::Ready(Some(Ok(connection)));
                }
                // A failed handshake (or a panicked task): that connection is gone.
                Poll::Ready(Some(Ok(None) | Err(_))) => continue,
                Poll::Ready(None) if this.accepted_done => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
