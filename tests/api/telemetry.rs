//! Telemetry of the real binary: the server span of a call made with a known `traceparent`
//! as an OTLP collector inside the test receives it (parent, attributes, no secret), the
//! metrics it pushes over OTLP, the trace id on the call lines, and `GET /metrics` on the
//! admin listener after a known sequence of calls, checked by `promtool check metrics`.
//! promtool is found through `KEMON_PROMTOOL` or `PATH` (`scripts/lint-deploy` installs it);
//! a missing promtool fails the test: it never skips.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kemon_keys::proto::v1 as pb;
use kemon_keys::vault::MasterKey;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

use crate::helpers::*;

/// What an OTLP collector was sent.
#[derive(Debug, Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The OpenTelemetry collector's OTLP/gRPC trace and metrics services on a random port.
struct Collector {
    addr: SocketAddr,
    received: Received,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .add_service(MetricsServiceServer::new(received.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Collector {
            addr,
            received,
            _stop: stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let traces = self.received.traces.lock().unwrap();
        let mut spans = Vec::new();
        for request in traces.iter() {
            for resource_spans in &request.resource_spans {
                let service = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|r| string_attribute(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// The span of trace `trace_id` named `name`, waiting up to 20 s for it.
    async fn span(&self, trace_id: &str, name: &str) -> (String, Span) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self
                .spans()
                .into_iter()
                .find(|(_, s)| hex::encode(&s.trace_id) == trace_id && s.name == name)
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no span {name} of trace {trace_id} within 20 s; received {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The names of the metrics pushed so far, and the `rpc.method`s of the data points
    /// of `rpc.server.call.duration`.
    fn pushed_metrics(&self) -> (Vec<String>, Vec<String>) {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        let mut names = Vec::new();
        let mut methods = Vec::new();
        for request in self.received.metrics.lock().unwrap().iter() {
            for resource in &request.resource_metrics {
                for scope in &resource.scope_metrics {
                    for metric in &scope.metrics {
                        names.push(metric.name.clone());
                        if let Some(Data::Histogram(h)) = &metric.data
                            && metric.name == "rpc.server.call.duration"
                        {
                            for point in &h.data_points {
                                methods.extend(string_attribute(&point.attributes, "rpc.method"));
                            }
                        }
                    }
                }
            }
        }
        (names, methods)
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

#[track_caller]
fn assert_string(span: &Span, key: &str, want: &str) {
    assert_eq!(
        string_attribute(&span.attributes, key).as_deref(),
        Some(want),
        "{key} of {span:#?}"
    );
}

/// `message` with a W3C `traceparent` of `trace_id` and parent `span_id`.
fn traced<T>(mut request: Request<T>, trace_id: &str, span_id: &str, sampled: bool) -> Request<T> {
    let flags = if sampled { "01" } else { "00" };
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{span_id}-{flags}").parse().unwrap(),
    );
    request
}

const CREATE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CREATE_PARENT: &str = "b7ad6b7169203331";
const VERIFY_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const VERIFY_PARENT: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

#[tokio::test]
async fn a_call_with_a_traceparent_is_exported_as_a_server_span_of_the_callers_trace() {
    let collector = Collector::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let endpoint = collector.endpoint();
    let mut server = ServerProcess::start_env(
        tmp.path(),
        &master_key,
        &["--listen", "127.0.0.1:0"],
        "info,kemon_keys=debug",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "kemon-keys-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
        ],
    )
    .await;
    let mut client = server.client().await;

    let create = traced(
        client.request(private_key("traced", &["tickets:read"])),
        CREATE_TRACE,
        CREATE_PARENT,
        true,
    );
    let created = client
        .raw()
        .create_key(create)
        .await
        .expect("create_key")
        .into_inner();
    let (key, secret) = (created.key.expect("key"), created.secret);
    let verify = |trace_id: &str, span_id: &str, sampled: bool| {
        traced(
            Request::new(pb::VerifyKeyRequest {
                key: secret.clone(),
                required_scopes: vec!["tickets:read".into()],
                origin: String::new(),
            }),
            trace_id,
            span_id,
            sampled,
        )
    };
    let verified = client
        .raw()
        .verify_key(verify(VERIFY_TRACE, VERIFY_PARENT, true))
        .await
        .expect("verify_key")
        .into_inner();
    assert!(verified.valid);
    let unsampled = client
        .raw()
        .verify_key(verify(UNSAMPLED_TRACE, VERIFY_PARENT, false))
        .await
        .expect("verify_key")
        .into_inner();
    assert!(unsampled.valid);

    // VerifyKey: a server span continuing the caller's trace, named and attributed by the
    // RPC conventions, with the key, workspace and verify code.
    let (service, span) = collector
        .span(VERIFY_TRACE, "kemon.keys.v1.KeyService/VerifyKey")
        .await;
    assert_eq!(service, "kemon-keys-under-test");
    assert_eq!(hex::encode(&span.parent_span_id), VERIFY_PARENT);
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_string(&span, "rpc.system", "grpc");
    assert_string(&span, "rpc.service", "kemon.keys.v1.KeyService");
    assert_string(&span, "rpc.method", "VerifyKey");
    assert_eq!(
        attribute(&span.attributes, "rpc.grpc.status_code"),
        Some(&any_value::Value::IntValue(0)),
        "{span:#?}"
    );
    assert_string(&span, "kemon.key_id", &key.key_id);
    assert_string(&span, "kemon.workspace_id", WORKSPACE);
    assert_string(&span, "kemon.verify_code", "VERIFY_CODE_VALID");

    // CreateKey, and the writer's commit of its batch as its child.
    let (_, create) = collector
        .span(CREATE_TRACE, "kemon.keys.v1.KeyService/CreateKey")
        .await;
    assert_eq!(hex::encode(&create.parent_span_id), CREATE_PARENT);
    assert_string(&create, "rpc.method", "CreateKey");
    assert_string(&create, "kemon.key_id", &key.key_id);
    assert_string(&create, "actor", ACTOR);
    let (_, commit) = collector.span(CREATE_TRACE, "kemon.writer.commit").await;
    assert_eq!(commit.parent_span_id, create.span_id, "{commit:#?}");
    assert_eq!(commit.kind, SpanKind::Internal as i32);

    // The metrics pushed over OTLP count the calls.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (names, methods) = collector.pushed_metrics();
        if methods.iter().any(|m| m == "VerifyKey") {
            for name in [
                "kemon.verify.outcomes",
                "kemon.writer.commit.duration",
                "kemon.cache.keys",
                "kemon.build.info",
            ] {
                assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no VerifyKey in the pushed metrics: {methods:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    server.stop().await;

    // The caller's trace id is on the call lines, sampled or not; only the sampled trace
    // went out; no secret went out at all.
    let verify_lines: Vec<Value> = log
        .iter()
        .map(|line| serde_json::from_str::<Value>(&line).expect("one JSON object per line"))
        .filter(|v| v["message"] == "call" && v["span"]["method"] == "VerifyKey")
        .collect();
    for trace_id in [VERIFY_TRACE, UNSAMPLED_TRACE] {
        let line = verify_lines
            .iter()
            .find(|v| v["span"]["trace_id"] == trace_id)
            .unwrap_or_else(|| {
                panic!("no VerifyKey line with trace id {trace_id}: {verify_lines:?}")
            });
        assert_eq!(line["span"]["verify_code"], "VERIFY_CODE_VALID", "{line}");
        assert_eq!(line["ended"], "trailers", "{line}");
    }
    let spans = collector.spans();
    assert!(
        spans
            .iter()
            .all(|(_, s)| hex::encode(&s.trace_id) != UNSAMPLED_TRACE),
        "a span of the unsampled trace was exported"
    );
    let everything = format!(
        "{:?}{:?}",
        collector.received.traces.lock().unwrap(),
        collector.received.metrics.lock().unwrap()
    );
    let secret_body = secret.rsplit('_').next().unwrap_or(&secret);
    assert!(
        !everything.contains(secret_body),
        "the secret went out in telemetry"
    );
}

/// `method path` on `addr` over HTTP/1.0 (as a scraper may send it): the status line, the
/// headers and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// The value of `series` (a name and its labels, exactly as exposed).
#[track_caller]
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

fn calls(method: &str, code: u8) -> String {
    format!(
        "rpc_server_call_duration_seconds_count{{rpc_system=\"grpc\",rpc_service=\"kemon.keys.v1.KeyService\",rpc_method=\"{method}\",rpc_grpc_status_code=\"{code}\"}}"
    )
}

fn outcomes(code: &str) -> String {
    format!("kemon_verify_outcomes_total{{rpc_method=\"VerifyKey\",verify_code=\"{code}\"}}")
}

/// The promtool binary: `KEMON_PROMTOOL`, else `promtool` on PATH.
fn promtool() -> PathBuf {
    if let Some(path) = std::env::var_os("KEMON_PROMTOOL") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("promtool not found: set KEMON_PROMTOOL or run scripts/lint-deploy, which installs it")
        })
}

#[tokio::test]
async fn the_admin_listener_serves_metrics_that_count_a_known_sequence_of_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let server = ServerProcess::start_args(
        tmp.path(),
        &master_key,
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
    )
    .await;
    let admin = server.admin_addr.expect("the admin listener's address");
    let mut client = server.client().await;

    let (key, secret) = client
        .create(private_key("counted", &["tickets:read"]))
        .await;
    for _ in 0..3 {
        assert_eq!(
            code(&client.verify(&secret, &["tickets:read"], "").await),
            pb::VerifyCode::Valid
        );
    }
    for _ in 0..2 {
        assert_eq!(
            code(&client.verify("sk_live_nonsense", &[], "").await),
            pb::VerifyCode::Malformed
        );
    }
    assert_eq!(
        code(&client.verify(&secret, &["tickets:write"], "").await),
        pb::VerifyCode::InsufficientScope
    );
    let missing = kemon_keys::domain::KeyId::generate(T0_MS).to_string();
    let not_found = client.try_get_key(&missing).await.expect_err("missing");
    assert_eq!(not_found.code(), tonic::Code::NotFound);
    client.revoke(&key.key_id).await;
    assert_eq!(
        code(&client.verify(&secret, &[], "").await),
        pb::VerifyCode::Revoked
    );
    let mut audit = server_audit(&server).await;
    let head = log_head(&mut audit, "").await;
    // A live subscriber, caught up, open while the metrics are read.
    let mut subscription = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest::default()))
        .await
        .expect("subscribe_events")
        .into_inner();
    while let Some(message) = subscription.message().await.expect("a message") {
        if matches!(
            message.message,
            Some(pb::subscribe_events_response::Message::CaughtUp(_))
        ) {
            break;
        }
    }

    let (status, headers, text) = http(admin, "GET", "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );

    assert_eq!(value(&text, &calls("CreateKey", 0)), 1.0);
    assert_eq!(value(&text, &calls("VerifyKey", 0)), 7.0);
    assert_eq!(value(&text, &calls("GetKey", 5)), 1.0);
    assert_eq!(value(&text, &calls("RevokeKey", 0)), 1.0);
    assert_eq!(value(&text, &outcomes("VERIFY_CODE_VALID")), 3.0);
    assert_eq!(value(&text, &outcomes("VERIFY_CODE_MALFORMED")), 2.0);
    assert_eq!(
        value(&text, &outcomes("VERIFY_CODE_INSUFFICIENT_SCOPE")),
        1.0
    );
    assert_eq!(value(&text, &outcomes("VERIFY_CODE_REVOKED")), 1.0);
    assert!(!text.contains("VERIFY_CODE_NOT_FOUND"), "{text}");
    assert_eq!(value(&text, "kemon_cache_keys"), 1.0);
    assert_eq!(value(&text, "kemon_writer_batch_size_count"), 2.0);
    assert_eq!(
        value(&text, "kemon_writer_commit_duration_seconds_count"),
        2.0
    );
    assert_eq!(value(&text, "kemon_storage_failures_total"), 0.0);
    assert_eq!(value(&text, "kemon_writer_queue_depth"), 0.0);
    assert_eq!(
        value(&text, "kemon_log_head_sequence"),
        head.sequence as f64
    );
    assert_eq!(value(&text, "kemon_audit_subscribers"), 1.0);
    assert_eq!(value(&text, "kemon_audit_fell_behind_total"), 0.0);
    assert_eq!(
        value(
            &text,
            &format!(
                "kemon_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // Bounded labels: no key, workspace or secret in any series.
    for never in [
        key.key_id.as_str(),
        WORKSPACE,
        secret.as_str(),
        missing.as_str(),
    ] {
        assert!(!text.contains(never), "{never} in the metrics");
    }

    // The exposition format, as Prometheus's own tool reads it.
    let checked = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        child.wait_with_output().expect("promtool")
    })
    .await
    .unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    drop(subscription);

    // Anything but GET or HEAD on /metrics is refused.
    let (status, headers, _) = http(admin, "POST", "/metrics").await;
    assert!(status.contains(" 405 "), "{status}");
    assert!(headers.contains("allow: get, head"), "{headers}");
    server.stop().await;
}

async fn server_audit(
    server: &ServerProcess,
) -> kemon_keys::proto::v1::audit_service_client::AuditServiceClient<tonic::transport::Channel> {
    kemon_keys::proto::v1::audit_service_client::AuditServiceClient::new(server.channel().await)
}
