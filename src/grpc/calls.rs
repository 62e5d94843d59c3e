//! What every call goes through, whatever its service: its span, its log line, its metrics,
//! and whether the server is ready for it. One tower layer on the server ([`CallLayer`]), so
//! that handlers only translate requests; they never open a span, log their own call, count
//! it or check readiness.
//!
//! For each request the layer names the call from its path, decides whether it is traced
//! (the caller's W3C `traceparent` and `OTEL_TRACES_SAMPLER`, see
//! [`crate::telemetry::traces`]), opens its span (an exported OpenTelemetry server span
//! continuing the caller's trace when traced, else a span for the logs alone), refuses it
//! before any handler runs if it needs the verification cache and the cache is still loading
//! (UNAVAILABLE, reason `NOT_READY`), runs the inner service inside the span, and ends the
//! call (its metrics, its span's status, its one line) when the call ends:
//!
//! - when the response head carries the status (a trailers-only response: every error a unary
//!   handler returns, every refusal), since such a body may never be polled;
//! - else when the body's trailers go out, which for a stream is when the stream ends, long
//!   after its head;
//! - else when the response is dropped unfinished (the client went away, the request timeout
//!   passed): CANCELLED.
//!
//! The line says how the call ended (`ended`: `head`, `trailers`, `dropped`, `error`), its
//! code, latency and reason, and its span's fields: the method, the caller's trace id, the
//! key and workspace ids, the verify code, the mutual-TLS caller identity and the actor.
//! Handlers fill the key and workspace ids ([`super::record_key_id`],
//! [`super::record_workspace_id`]) and the verify code ([`record_verify_code`]); the access
//! check ([`super::policy`]) the caller, the actor check ([`super::auth`]) the actor. Secrets
//! are never recorded.
//!
//! Cost. A VerifyKey that is neither traced nor logged (the default) reads one header, takes
//! the time twice and adds to three atomic counters: its span is disabled, nothing is
//! allocated.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::error::ApiError;
use crate::proto::v1::key_service_server::SERVICE_NAME as KEY_SERVICE;
use crate::telemetry::metrics::{MethodIndex, Metrics, Verifier};
use crate::telemetry::traces::{self, TRACED, TraceIdHex, TraceParent};

/// The target of call spans and lines: the one they had when each handler logged its own call,
/// so that filters and log consumers see the same lines.
const TARGET: &str = "kemon_keys::grpc";

/// This API's services: their calls are named by method alone, as the proto spells it.
const API_PACKAGE: &str = "kemon.keys.v1.";

/// The gRPC health service.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Envoy's ext_authz service.
const EXT_AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

// Header names are looked up as `HeaderName`s made once: looking one up by `&str` parses and
// validates the name on every call (a few hundred instructions for each VerifyKey).

/// The status header of a gRPC response, in its head (trailers-only) or its trailers.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The W3C trace context headers.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

tokio::task_local! {
    /// The verify code a VerifyKey or Check handler decided, while the layer polls it: how the
    /// code reaches the metrics without a span to carry it (the span is disabled when neither
    /// traced nor logged). -1 until set.
    static VERIFY_CODE: Cell<i32>;
}

/// Records on the current call's span the trace id of the HTTP request an Envoy Check is
/// about (its `traceparent`): the request's own trace, whether or not Envoy traces its Check
/// calls.
pub(crate) fn record_request_trace(traceparent: &str) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    if let Some(parent) = TraceParent::parse(traceparent.as_bytes()) {
        span.record(
            "request_trace_id",
            tracing::field::display(TraceIdHex(parent.trace_id)),
        );
    }
}

/// Records the verify code of the current call: on its span and line, and in its metrics.
pub fn record_verify_code(code: i32, name: &'static str) {
    let span = Span::current();
    span.record("verify_code", name);
    span.record("kemon.verify_code", name);
    let _ = VERIFY_CODE.try_with(|slot| slot.set(code));
}

/// Opens each call's span, refuses calls that need the verification cache until `ready`, and
/// writes one line per call; see the module documentation.
#[derive(Debug, Clone)]
pub struct CallLayer {
    ready: Arc<AtomicBool>,
    fresh: Arc<AtomicBool>,
    max_staleness: std::time::Duration,
    metrics: Option<&'static Metrics>,
}

impl CallLayer {
    /// `ready` turns true once the verification cache is loaded. Calls are counted in the
    /// process's metrics unless [`CallLayer::without_metrics`].
    pub fn new(ready: Arc<AtomicBool>) -> CallLayer {
        CallLayer {
            ready,
            fresh: Arc::new(AtomicBool::new(true)),
            max_staleness: std::time::Duration::ZERO,
            metrics: Some(crate::telemetry::metrics()),
        }
    }

    /// Counts no call (for measuring what counting costs).
    pub fn without_metrics(mut self) -> CallLayer {
        self.metrics = None;
        self
    }

    /// Also refuses the calls answered from the cache alone (VerifyKey, Envoy's Check) while
    /// `fresh` is false: a replica of a shared log that has not confirmed it is caught up
    /// within `max_staleness`.
    pub fn refusing_stale(
        mut self,
        fresh: Arc<AtomicBool>,
        max_staleness: std::time::Duration,
    ) -> CallLayer {
        self.fresh = fresh;
        self.max_staleness = max_staleness;
        self
    }
}

impl<S> tower_layer::Layer<S> for CallLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Calls<S> {
        Calls {
            inner,
            ready: self.ready.clone(),
            fresh: self.fresh.clone(),
            max_staleness: self.max_staleness,
            metrics: self.metrics,
        }
    }
}

/// A service behind [`CallLayer`].
#[derive(Debug, Clone)]
pub struct Calls<S> {
    inner: S,
    ready: Arc<AtomicBool>,
    fresh: Arc<AtomicBool>,
    max_staleness: std::time::Duration,
    metrics: Option<&'static Metrics>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Calls<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> CallFuture<S::Future> {
        let name = CallName::parse(request.uri().path());
        let log = CallLog::open(name, request.uri().path(), request.headers(), self.metrics);
        if name.needs_cache() && !self.ready.load(Ordering::Acquire) {
            return CallFuture::Refused {
                status: Some(Status::from(ApiError::NotReady)),
                log: Some(log),
            };
        }
        if name.answers_from_cache() && !self.fresh.load(Ordering::Acquire) {
            return CallFuture::Refused {
                status: Some(Status::from(ApiError::ReplicaStale {
                    max_staleness_ms: self.max_staleness.as_millis() as u64,
                })),
                log: Some(log),
            };
        }
        let inner = {
            let _entered = log.span.enter();
            self.inner.call(request)
        };
        CallFuture::Called {
            inner,
            log: Some(log),
        }
    }
}

/// A call as its path names it: `/kemon.keys.v1.KeyService/VerifyKey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CallName<'a> {
    /// `kemon.keys.v1.KeyService/VerifyKey`.
    full: &'a str,
    service: &'a str,
    method: &'a str,
}

impl<'a> CallName<'a> {
    fn parse(path: &'a str) -> CallName<'a> {
        let full = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = full.split_once('/').unwrap_or(("", full));
        CallName {
            full,
            service,
            method,
        }
    }

    fn is_api(&self) -> bool {
        self.service.starts_with(API_PACKAGE)
    }

    /// The `method` of the span and line: `VerifyKey` for this API's calls, as the lines have
    /// always said; service and method for others (`grpc.health.v1.Health/Check`).
    fn logged_as(&self) -> &'a str {
        if self.is_api() {
            self.method
        } else {
            self.full
        }
    }

    /// VerifyKey runs on every request of every user's service, and health checks on every
    /// probe of every load balancer: their lines are at DEBUG so that the default `info`
    /// filter does not write (and pay for) one each. Every other call is at INFO.
    fn at_debug(&self) -> bool {
        !self.is_api() || (self.service == KEY_SERVICE && self.method == "VerifyKey")
    }

    /// Whether the call answers from (or updates) the verification cache, and so must wait
    /// for it to load. ListScopes answers from the static catalog; AuditService, health and
    /// reflection read no cache.
    fn needs_cache(&self) -> bool {
        self.service == KEY_SERVICE && self.method != "ListScopes"
    }

    /// A gRPC health check.
    fn is_health(&self) -> bool {
        self.service == HEALTH_SERVICE
    }

    /// The verifier whose verify codes this call's answer carries.
    fn verifier(&self) -> Option<Verifier> {
        if self.service == KEY_SERVICE && self.method == "VerifyKey" {
            Some(Verifier::VerifyKey)
        } else if self.service == EXT_AUTHZ_SERVICE && self.method == "Check" {
            Some(Verifier::Check)
        } else {
            None
        }
    }

    /// Whether the call's answer comes from the verification cache alone, so that a stale
    /// cache could answer VALID for a key revoked elsewhere.
    fn answers_from_cache(&self) -> bool {
        (self.service == KEY_SERVICE && self.method == "VerifyKey")
            || (self.service == EXT_AUTHZ_SERVICE && self.method == "Check")
    }
}

/// One call's span, its metrics and its line, until the call ends.
#[derive(Debug)]
pub struct CallLog {
    span: Span,
    at_debug: bool,
    /// Whether the line is written (its level is enabled).
    line: bool,
    /// When the call began, while it has not ended. `None` from the start when nothing needs
    /// its end (no line, no metrics, no exported span), so that such a call reads no clock and
    /// parses no status.
    started: Option<Instant>,
    metrics: Option<&'static Metrics>,
    method: MethodIndex,
    verifier: Option<Verifier>,
    /// What the handler decided, for a verifier; -1 before.
    verify_code: i32,
    /// Whether the span is exported.
    traced: bool,
}

/// The call's span for the logs alone, at `$level`.
macro_rules! log_span {
    ($level:ident, $method:expr) => {
        tracing::$level!(
            target: TARGET,
            "rpc",
            method = $method,
            trace_id = tracing::field::Empty,
            request_trace_id = tracing::field::Empty,
            workspace_id = tracing::field::Empty,
            key_id = tracing::field::Empty,
            verify_code = tracing::field::Empty,
            caller = tracing::field::Empty,
            actor = tracing::field::Empty
        )
    };
}

impl CallLog {
    fn open(
        name: CallName<'_>,
        path: &str,
        headers: &HeaderMap,
        metrics: Option<&'static Metrics>,
    ) -> CallLog {
        let method = name.logged_as();
        let at_debug = name.at_debug();
        let line = if at_debug {
            tracing::enabled!(target: TARGET, Level::DEBUG)
        } else {
            tracing::enabled!(target: TARGET, Level::INFO)
        };
        let sampling = traces::sampling();
        let parent = if line || sampling.is_some() {
            headers
                .get(&TRACEPARENT)
                .and_then(|v| TraceParent::parse(v.as_bytes()))
        } else {
            None
        };
        // Probes would otherwise start a trace every few seconds per prober: a health check
        // is traced only when it continues a caller's trace.
        let traced = sampling
            .is_some_and(|s| (parent.is_some() || !name.is_health()) && s.sample(parent.as_ref()));
        let span = if traced {
            let span = tracing::info_span!(
                target: TRACED,
                "rpc",
                otel.name = name.full,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = name.service,
                rpc.method = name.method,
                rpc.grpc.status_code = tracing::field::Empty,
                kemon.workspace_id = tracing::field::Empty,
                kemon.key_id = tracing::field::Empty,
                kemon.verify_code = tracing::field::Empty,
                method,
                trace_id = tracing::field::Empty,
                request_trace_id = tracing::field::Empty,
                workspace_id = tracing::field::Empty,
                key_id = tracing::field::Empty,
                verify_code = tracing::field::Empty,
                caller = tracing::field::Empty,
                actor = tracing::field::Empty
            );
            if let Some(parent) = &parent {
                let state = headers.get(&TRACESTATE).and_then(|v| v.to_str().ok());
                let _ = span.set_parent(parent.context(state));
            }
            span
        } else if at_debug {
            log_span!(debug_span, method)
        } else {
            log_span!(info_span, method)
        };
        if line || traced {
            let trace_id = parent
                .map(|p| p.trace_id)
                .or_else(|| traced.then(|| traces::trace_id_of(&span)).flatten());
            if let Some(trace_id) = trace_id {
                span.record("trace_id", tracing::field::display(TraceIdHex(trace_id)));
            }
        }
        CallLog {
            span,
            at_debug,
            line,
            started: (line || traced || metrics.is_some()).then(Instant::now),
            metrics,
            method: metrics.map_or(MethodIndex::OTHER, |m| m.method(path)),
            verifier: name.verifier(),
            verify_code: -1,
            traced,
        }
    }

    fn pending(&self) -> bool {
        self.started.is_some()
    }

    /// Ends the call with the status in `headers` (a trailers-only head, or trailers).
    fn end_with(&mut self, headers: &HeaderMap, ended: &'static str) {
        if !self.pending() {
            return;
        }
        match headers
            .get(&GRPC_STATUS)
            .map(|v| Code::from_bytes(v.as_bytes()))
        {
            Some(Code::Ok) => self.end(Code::Ok, "", ended),
            Some(code) if self.line => {
                let status = Status::from_header_map(headers);
                self.end(code, status.as_ref().map_or("", Status::message), ended);
            }
            Some(code) => self.end(code, "", ended),
            None => self.end(Code::Unknown, "no grpc-status in the response", ended),
        }
    }

    /// Ends the call, once: its metrics, its span's status and its line. For a refused call,
    /// `reason` is the status message. That message is built from violations whose values
    /// went through [`quote`](super::error::quote), so a secret pasted into a request field
    /// reaches neither the caller's error nor this log.
    fn end(&mut self, code: Code, reason: &str, ended: &'static str) {
        let Some(started) = self.started.take() else {
            return;
        };
        let latency = started.elapsed();
        if let Some(metrics) = self.metrics {
            metrics.call(self.method, code, latency);
            if let Some(verifier) = self.verifier
                && self.verify_code >= 0
            {
                metrics.verified(verifier, self.verify_code);
            }
        }
        if self.traced {
            self.span.record("rpc.grpc.status_code", code as i64);
            if is_server_error(code) {
                self.span.record("otel.status_code", "error");
            }
        }
        if !self.line {
            return;
        }
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let _entered = self.span.enter();
        if self.at_debug {
            tracing::debug!(target: TARGET, code = ?code, latency_us, reason, ended, "call");
        } else {
            tracing::info!(target: TARGET, code = ?code, latency_us, reason, ended, "call");
        }
    }
}

/// The codes the OpenTelemetry RPC conventions count as a server span's error.
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

impl Drop for CallLog {
    fn drop(&mut self) {
        self.end(
            Code::Cancelled,
            "the call ended before its response did: the client went away or the request timed out",
            "dropped",
        );
    }
}

pin_project! {
    /// The response of one call, not yet known.
    #[project = CallFutureProj]
    pub enum CallFuture<F> {
        /// The inner service answers.
        Called {
            #[pin]
            inner: F,
            log: Option<CallLog>,
        },
        /// Refused before any handler ran.
        Refused {
            status: Option<Status>,
            log: Option<CallLog>,
        },
    }
}

impl<F, B, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Body,
{
    type Output = Result<http::Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const DONE: &str = "call future polled after it completed";
        match self.project() {
            CallFutureProj::Called { inner, log } => {
                let open = log.as_mut().expect(DONE);
                let polled = {
                    let _entered = open.span.enter();
                    if open.verifier.is_some() {
                        let (polled, code) = VERIFY_CODE
                            .sync_scope(Cell::new(open.verify_code), || {
                                (inner.poll(cx), VERIFY_CODE.with(Cell::get))
                            });
                        open.verify_code = code;
                        polled
                    } else {
                        inner.poll(cx)
                    }
                };
                let result = ready!(polled);
                let mut log = log.take().expect(DONE);
                Poll::Ready(match result {
                    Ok(response) => {
                        // A trailers-only response ends with its head: its body may never be
                        // polled.
                        if log.pending() && response.headers().contains_key(&GRPC_STATUS) {
                            log.end_with(response.headers(), "head");
                        }
                        Ok(response.map(|inner| CallBody {
                            inner: Some(inner),
                            log,
                        }))
                    }
                    Err(e) => {
                        log.end(Code::Unknown, "the service failed", "error");
                        Err(e)
                    }
                })
            }
            CallFutureProj::Refused { status, log } => {
                let mut log = log.take().expect(DONE);
                let response = status.take().expect(DONE).into_http::<()>();
                log.end_with(response.headers(), "head");
                Poll::Ready(Ok(response.map(|()| CallBody { inner: None, log })))
            }
        }
    }
}

pin_project! {
    /// A response body that polls its inner body inside the call's span and writes the call's
    /// line when its trailers go out.
    #[derive(Debug)]
    pub struct CallBody<B> {
        // `None` for a refused call: its status is all in the head.
        #[pin]
        inner: Option<B>,
        log: CallLog,
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = {
            let _entered = this.log.span.enter();
            ready!(inner.poll_frame(cx))
        };
        if this.log.pending() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        this.log.end_with(trailers, "trailers");
                    }
                }
                Some(Err(_)) => this
                    .log
                    .end(Code::Unknown, "the response body failed", "error"),
                None => this
                    .log
                    .end(Code::Unknown, "no grpc-status in the response", "trailers"),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use tonic_types::StatusExt;
    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;

    /// Stands for the services behind the layer; counts the calls that reach it.
    #[derive(Debug, Clone, Default)]
    struct Handlers {
        reached: Arc<AtomicUsize>,
    }

    impl Service<http::Request<()>> for Handlers {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<String>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            self.reached.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(http::Response::new("answer".to_owned())))
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn calls_that_need_the_cache_are_refused_before_any_handler_until_it_is_loaded() {
        let ready = Arc::new(AtomicBool::new(false));
        let handlers = Handlers::default();
        let mut calls = CallLayer::new(ready.clone()).layer(handlers.clone());

        for path in [
            "/kemon.keys.v1.KeyService/VerifyKey",
            "/kemon.keys.v1.KeyService/CreateKey",
        ] {
            let refused = calls.call(request(path)).await.unwrap();
            assert!(refused.body().is_end_stream(), "{path}");
            let status = Status::from_header_map(refused.headers()).expect("a status in the head");
            assert_eq!(status.code(), Code::Unavailable, "{path}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "NOT_READY", "{path}");
        }
        assert_eq!(handlers.reached.load(Ordering::SeqCst), 0);

        for path in [
            "/kemon.keys.v1.KeyService/ListScopes",
            "/kemon.keys.v1.AuditService/GetLogHead",
            "/grpc.health.v1.Health/Check",
        ] {
            let answered = calls.call(request(path)).await.unwrap();
            assert!(!answered.headers().contains_key(&GRPC_STATUS), "{path}");
        }
        assert_eq!(handlers.reached.load(Ordering::SeqCst), 3);

        ready.store(true, Ordering::Release);
        calls
            .call(request("/kemon.keys.v1.KeyService/VerifyKey"))
            .await
            .unwrap();
        assert_eq!(handlers.reached.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn calls_are_named_from_their_path() {
        let verify = CallName::parse("/kemon.keys.v1.KeyService/VerifyKey");
        assert_eq!(verify.service, "kemon.keys.v1.KeyService");
        assert_eq!(verify.method, "VerifyKey");
        assert_eq!(verify.logged_as(), "VerifyKey");
        assert!(verify.at_debug() && verify.needs_cache());

        let create = CallName::parse("/kemon.keys.v1.KeyService/CreateKey");
        assert!(!create.at_debug() && create.needs_cache());

        let scopes = CallName::parse("/kemon.keys.v1.KeyService/ListScopes");
        assert!(!scopes.at_debug() && !scopes.needs_cache());

        let audit = CallName::parse("/kemon.keys.v1.AuditService/SubscribeEvents");
        assert_eq!(audit.logged_as(), "SubscribeEvents");
        assert!(!audit.at_debug() && !audit.needs_cache());

        let health = CallName::parse("/grpc.health.v1.Health/Check");
        assert_eq!(health.logged_as(), "grpc.health.v1.Health/Check");
        assert!(health.at_debug() && !health.needs_cache());

        let stray = CallName::parse("/nothing");
        assert_eq!((stray.service, stray.logged_as()), ("", "nothing"));
        assert!(stray.at_debug() && !stray.needs_cache());
    }
}
