//! What the service tells operators besides its answers: traces over OTLP ([`traces`]),
//! metrics as Prometheus text on the admin listener ([`prometheus`]) and over OTLP ([`otlp`]),
//! both from one set of counters ([`metrics`]). What each call contributes (its server span,
//! its line, its counts) is recorded by one layer, [`crate::grpc::calls`]; the writer records
//! its batches, the start-up its cache load.
//!
//! A leaf: it knows nothing of the store, the cache or the services; the server hands it
//! what only it can read ([`metrics::Gauges`]) when metrics are taken. Never a secret, a
//! workspace id or a key id in a metric label; key and workspace ids only in span attributes.

pub mod metrics;
pub mod otlp;
pub mod prometheus;
pub mod traces;

pub use metrics::{GaugeReader, Gauges, metrics};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Answers `GET /metrics` with the Prometheus text of the process's metrics, and passes every
/// other request on: a layer on the admin listener's server.
#[derive(Clone)]
pub struct MetricsEndpointLayer {
    gauges: GaugeReader,
}

impl MetricsEndpointLayer {
    pub fn new(gauges: GaugeReader) -> MetricsEndpointLayer {
        MetricsEndpointLayer { gauges }
    }
}

impl<S> tower_layer::Layer<S> for MetricsEndpointLayer {
    type Service = MetricsEndpoint<S>;

    fn layer(&self, inner: S) -> MetricsEndpoint<S> {
        MetricsEndpoint {
            inner,
            gauges: self.gauges.clone(),
        }
    }
}

/// A service behind [`MetricsEndpointLayer`].
#[derive(Clone)]
pub struct MetricsEndpoint<S> {
    inner: S,
    gauges: GaugeReader,
}

/// The path Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for MetricsEndpoint<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if request.uri().path() != METRICS_PATH {
            let answer = self.inner.call(request);
            return Box::pin(async move { Ok(answer.await?.map(tonic::body::Body::new)) });
        }
        let response =
            if request.method() == http::Method::GET || request.method() == http::Method::HEAD {
                let text = prometheus::render(&metrics().snapshot(&(self.gauges)()));
                http::Response::builder()
                    .header(http::header::CONTENT_TYPE, prometheus::CONTENT_TYPE)
                    .body(tonic::body::Body::new(text))
            } else {
                http::Response::builder()
                    .status(http::StatusCode::METHOD_NOT_ALLOWED)
                    .header(http::header::ALLOW, "GET, HEAD")
                    .body(tonic::body::Body::empty())
            };
        let response = response.unwrap_or_else(|_| {
            let mut failed = http::Response::new(tonic::body::Body::empty());
            *failed.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            failed
        });
        Box::pin(std::future::ready(
            Ok::<_, Infallible>(response).map_err(|never: Infallible| match never {}),
        ))
    }
}
