//! The metrics pushed over OTLP/gRPC: every `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default),
//! the same [`Snapshot`] that `GET /metrics` renders, as cumulative sums, gauges and explicit
//! bucket histograms, to `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), with `OTEL_EXPORTER_OTLP_HEADERS` and the resource of
//! [`super::traces::resource`]. Off unless those variables ask for it, as traces are.
//!
//! The metrics are pushed from the process's own counters rather than through the
//! OpenTelemetry metrics SDK, so that one set of counters feeds both outputs and VerifyKey
//! records into plain atomics; see [`super::metrics`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1 as otlp;
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::metrics::{Data, GaugeReader, Labels, Snapshot, metrics};
use super::traces::signal_enabled;

/// Where and how often metrics are pushed.
#[derive(Debug, Clone)]
pub struct MetricsPush {
    endpoint: String,
    headers: Vec<(String, String)>,
    interval: Duration,
    timeout: Duration,
}

impl MetricsPush {
    /// `Some` when metrics are to be pushed: by the same rules as traces, with
    /// `OTEL_METRICS_EXPORTER` and `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`.
    pub fn from_env() -> Option<MetricsPush> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if !signal_enabled(
            &var,
            "OTEL_METRICS_EXPORTER",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ) {
            return None;
        }
        let endpoint = var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| "http://localhost:4317".to_owned());
        let headers = var("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
            .or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|h| parse_headers(&h))
            .unwrap_or_default();
        let millis = |name: &str, default: u64| {
            Duration::from_millis(
                var(name)
                    .and_then(|v| v.parse().ok())
                    .filter(|ms| *ms > 0)
                    .unwrap_or(default),
            )
        };
        Some(MetricsPush {
            endpoint,
            headers,
            interval: millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000),
            timeout: millis("OTEL_METRIC_EXPORT_TIMEOUT", 30_000),
        })
    }

    /// Pushes every interval until `stop` turns true, and once more then.
    pub async fn run(self, gauges: GaugeReader, mut stop: tokio::sync::watch::Receiver<bool>) {
        let resource = Resource {
            attributes:
                opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema::from(
                    &super::traces::resource(),
                )
                .attributes
                .0,
            ..Default::default()
        };
        let mut client = match self.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(endpoint = %self.endpoint, error = %e, "OTLP metrics: bad endpoint; metrics are not pushed");
                return;
            }
        };
        let mut ticker = tokio::time::interval(self.interval);
        ticker.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = ticker.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            let request = export_request(&metrics().snapshot(&gauges()), resource.clone());
            let mut request = tonic::Request::new(request);
            request.set_timeout(self.timeout);
            for (name, value) in &self.headers {
                if let (Ok(name), Ok(value)) = (
                    name.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                    value.parse(),
                ) {
                    request.metadata_mut().insert(name, value);
                }
            }
            if let Err(status) = client.export(request).await {
                tracing::warn!(endpoint = %self.endpoint, code = ?status.code(), error = status.message(), "OTLP metrics export failed");
            }
            if stopping {
                return;
            }
        }
    }

    fn client(&self) -> anyhow::Result<MetricsServiceClient<tonic::transport::Channel>> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.endpoint.clone())?
            .connect_timeout(self.timeout);
        if self.endpoint.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())?;
        }
        Ok(MetricsServiceClient::new(endpoint.connect_lazy()))
    }
}

/// `key1=value1,key2=value2`, values percent-decoded.
fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), percent_decode(v.trim())))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attributes(labels: &Labels) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(key, value)| KeyValue {
            key: (*key).to_owned(),
            value: Some(AnyValue {
                value: Some(if *key == "rpc.grpc.status_code" {
                    any_value::Value::IntValue(value.parse().unwrap_or(2))
                } else {
                    any_value::Value::StringValue((*value).to_owned())
                }),
            }),
            ..Default::default()
        })
        .collect()
}

/// The snapshot as one OTLP export request.
pub fn export_request(snapshot: &Snapshot, resource: Resource) -> ExportMetricsServiceRequest {
    let start = nanos(snapshot.started);
    let time = nanos(snapshot.taken);
    let cumulative = otlp::AggregationTemporality::Cumulative as i32;
    let number = |labels: &Labels, value: otlp::number_data_point::Value| otlp::NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: time,
        value: Some(value),
        ..Default::default()
    };
    let metrics = snapshot
        .families
        .iter()
        .map(|family| {
            let data = match &family.data {
                Data::Counter(points) => otlp::metric::Data::Sum(otlp::Sum {
                    data_points: points
                        .iter()
                        .map(|(labels, value)| {
                            number(
                                labels,
                                otlp::number_data_point::Value::AsInt(
                                    i64::try_from(*value).unwrap_or(i64::MAX),
                                ),
                            )
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Data::Gauge(points) => otlp::metric::Data::Gauge(otlp::Gauge {
                    data_points: points
                        .iter()
                        .map(|(labels, value)| {
                            number(labels, otlp::number_data_point::Value::AsDouble(*value))
                        })
                        .collect(),
                }),
                Data::Histogram { scale, points } => {
                    otlp::metric::Data::Histogram(otlp::Histogram {
                        data_points: points
                            .iter()
                            .map(|(labels, value)| otlp::HistogramDataPoint {
                                attributes: attributes(labels),
                                start_time_unix_nano: start,
                                time_unix_nano: time,
                                count: value.count,
                                sum: Some(value.sum as f64 * scale),
                                bucket_counts: value.buckets.clone(),
                                explicit_bounds: value
                                    .bounds
                                    .iter()
                                    .map(|b| *b as f64 * scale)
                                    .collect(),
                                ..Default::default()
                            })
                            .collect(),
                        aggregation_temporality: cumulative,
                    })
                }
            };
            otlp::Metric {
                name: family.name.to_owned(),
                description: family.help.to_owned(),
                unit: family.unit.to_owned(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![otlp::ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![otlp::ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "kemon-keys".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pairs_with_percent_decoded_values() {
        assert_eq!(
            parse_headers("Authorization=Bearer%20abc, x-tenant=a%3Db"),
            [
                ("authorization".to_owned(), "Bearer abc".to_owned()),
                ("x-tenant".to_owned(), "a=b".to_owned())
            ]
        );
    }
}
