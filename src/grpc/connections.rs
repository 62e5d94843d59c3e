//! What one client may hold of the server: connections, streams, bytes and time.
//!
//! The port is open to every service that can reach it and VerifyKey needs no credentials, so
//! a client must not be able to make the server hold memory it never sends, or connections
//! it never uses. Limits here, with the HTTP/2 settings the server advertises
//! ([`ConnectionLimits::apply`]):
//!
//! - at most `max_connections` open connections: the accept loop waits for a free slot;
//! - per connection at most `max_streams` concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS),
//!   16 KiB of headers per stream, a 64 KiB window per stream and 256 KiB per connection, so
//!   a client can never have more than that in flight unread;
//! - a request message of at most [`MAX_REQUEST_BYTES`]: tonic reserves the length a message
//!   announces, so the bound is checked on the announcement, before any buffer is sized;
//! - a connection that sends nothing within `handshake_timeout` of being accepted, or has no
//!   call in flight for `idle_timeout`, is closed; a call (a unary request still being
//!   received, say) that takes longer than `request_timeout` is cancelled. Streams the server
//!   sends (SubscribeEvents) count as calls in flight for as long as they are open, so an
//!   audit subscriber's connection is never idle.
//!
//! Worst case per connection, all bounded above: `max_streams` × (16 KiB of headers + one
//! message of [`MAX_REQUEST_BYTES`] + h2's per-stream state) + the 256 KiB connection window.
//! With the defaults (100 streams, 16 KiB messages) that is about 3.5 MiB, and
//! `max_connections` times that in all; the README states the measured figure.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// The largest request message any RPC of this API accepts. The largest real request, a
/// CreateKey with 20 allowed domains of 253 characters, 16 scopes and a 100-character name,
/// is under 6 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Largest header list (metadata) of one request.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Unread request bytes a client may have in flight on one stream, and on one connection.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;
/// After a failed accept (out of file descriptors), wait before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Limits on what clients may hold; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_streams: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// Interval of HTTP/2 PINGs that find dead peers; one unanswered for 20 s closes the
    /// connection.
    pub keepalive_interval: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 1024,
            max_streams: 100,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(60),
        }
    }
}

impl ConnectionLimits {
    /// The server's HTTP/2 settings and per-call timeout.
    pub fn apply<L>(&self, server: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        server
            .max_concurrent_streams(self.max_streams)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_adaptive_window(Some(false))
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .http2_max_pending_accept_reset_streams(Some(64))
            .timeout(self.request_timeout)
            .accept_http1(false)
    }

    /// Accepted connections, at most `max_connections` open at once, each closed when it
    /// stays silent or idle too long.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<LimitedConnection>> + Send + 'static {
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        futures::stream::unfold(
            (listener, slots, false),
            move |(listener, slots, backoff)| async move {
                if backoff {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return None;
                };
                let accepted = listener.accept().await;
                let failed = accepted.is_err();
                let item = accepted.and_then(|(stream, remote)| {
                    // Without TCP_NODELAY small responses wait on Nagle's algorithm and the
                    // peer's delayed ACK (tens of milliseconds at the tail).
                    stream.set_nodelay(true)?;
                    Ok(LimitedConnection::new(stream, slot, remote, self))
                });
                Some((item, (listener, slots, failed)))
            },
        )
    }
}

/// Shared by a connection and the calls on it.
#[derive(Debug)]
struct ConnectionState {
    in_flight: AtomicUsize,
    accepted: Instant,
    /// When the last call ended (or the connection began), in milliseconds since `accepted`:
    /// an atomic, not a lock, since every call (VerifyKey included) ends by setting it.
    last_active_ms: AtomicU64,
}

impl ConnectionState {
    fn touch(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Release);
    }

    fn last_active(&self) -> Instant {
        self.accepted + Duration::from_millis(self.last_active_ms.load(Ordering::Acquire))
    }
}

/// The connection info tonic puts in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: SocketAddr,
    /// What TLS established about the client; `None` on a plaintext connection.
    pub tls: Option<Arc<super::tls::TlsPeer>>,
    state: Arc<ConnectionState>,
}

impl ConnectionInfo {
    /// This connection, after a TLS handshake that established `peer`.
    pub fn with_tls(self, peer: Arc<super::tls::TlsPeer>) -> ConnectionInfo {
        ConnectionInfo {
            tls: Some(peer),
            ..self
        }
    }

    /// The client's identity under mutual TLS.
    pub fn identity(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|peer| peer.identity.as_deref())
    }
}

/// An accepted TCP connection holding one of the `max_connections` slots.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    info: ConnectionInfo,
    limits: ConnectionLimits,
    heard_from: bool,
    deadline: Pin<Box<Sleep>>,
}

impl LimitedConnection {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        remote_addr: SocketAddr,
        limits: ConnectionLimits,
    ) -> LimitedConnection {
        LimitedConnection {
            stream,
            _slot: slot,
            info: ConnectionInfo {
                remote_addr,
                tls: None,
                state: Arc::new(ConnectionState {
                    in_flight: AtomicUsize::new(0),
                    accepted: Instant::now(),
                    last_active_ms: AtomicU64::new(0),
                }),
            },
            limits,
            heard_from: false,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
        }
    }

    /// When the connection is next due to be looked at, or `None` when it is to be closed.
    fn next_deadline(&self) -> Option<Instant> {
        if !self.heard_from {
            return None;
        }
        let now = Instant::now();
        if self.info.state.in_flight.load(Ordering::Acquire) > 0 {
            return Some(now + self.limits.idle_timeout);
        }
        let due = self.info.state.last_active() + self.limits.idle_timeout;
        (due > now).then_some(due)
    }
}

impl Connected for LimitedConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The server always has a read pending on a connection, so the timer is polled (and
        // its waker registered) here.
        while this.deadline.as_mut().poll(cx).is_ready() {
            match this.next_deadline() {
                Some(at) => this.deadline.as_mut().reset(at),
                None => {
                    let why = if this.heard_from {
                        "no call for the idle timeout"
                    } else {
                        "nothing received within the handshake timeout"
                    };
                    tracing::debug!(remote = %this.info.remote_addr, why, "closing connection");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
                }
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if !this.heard_from && matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before
        {
            this.heard_from = true;
            this.info.state.touch();
            let due = Instant::now() + this.limits.idle_timeout;
            this.deadline.as_mut().reset(due);
        }
        result
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts a call as in flight on its connection from its request until its response body
/// is done, so that a connection with an open call is never closed as idle.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower_layer::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
}

/// One call in flight; ends it when dropped.
#[derive(Debug)]
struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn begin(state: &Arc<ConnectionState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for TrackCalls<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| InFlight::begin(&info.state));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody { inner, _call: call }))
        })
    }
}

/// A response body that keeps its call in flight until it is done.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _call: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
