//! Traces over OTLP/gRPC: `tracing` spans exported through `tracing-opentelemetry` and
//! `opentelemetry-otlp`, configured by the standard `OTEL_*` variables and off when none
//! asks for them ([`TraceSettings::from_env`]).
//!
//! Only spans with the target [`TRACED`] are exported: each call's server span (opened by
//! [`crate::grpc::calls`] once the call is sampled), the writer's batch commit and the
//! start-up cache load. Every other span and event stays in the logs.
//!
//! Sampling is decided at the door, before any span exists ([`Sampling::sample`]): from the
//! caller's `traceparent` (W3C trace context) and `OTEL_TRACES_SAMPLER`. A call that is not
//! sampled, and every call while tracing is off, gets no exported span at all, so a VerifyKey
//! pays one header lookup for tracing and nothing else. The SDK's own sampler then only
//! follows that decision (`parentbased_always_on`, or `always_on` for a sampler that ignores
//! the parent).

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::subscriber::Interest;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans that are exported.
pub const TRACED: &str = "kemon_keys::traced";

/// The log filter directive that keeps exported spans whatever `RUST_LOG` says.
pub const TRACED_DIRECTIVE: &str = "kemon_keys::traced=trace";

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` gives one.
pub const DEFAULT_SERVICE_NAME: &str = "kemon-keys";

/// Whether and how traces are exported, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    pub sampling: Sampling,
}

impl TraceSettings {
    /// `Some` when traces are to be exported: `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or `OTEL_TRACES_EXPORTER=otlp` (to the
    /// default `http://localhost:4317`); never with `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`.
    pub fn from_env() -> Option<TraceSettings> {
        TraceSettings::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<TraceSettings> {
        if signal_enabled(
            &var,
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ) {
            Some(TraceSettings {
                sampling: Sampling::from_vars(&var),
            })
        } else {
            None
        }
    }
}

/// Whether a signal is exported over OTLP, by the standard variables: `exporter_var`
/// (`OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`) and the generic or the signal's endpoint.
pub(super) fn signal_enabled(
    var: &impl Fn(&str) -> Option<String>,
    exporter_var: &str,
    endpoint_var: &str,
) -> bool {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match var(exporter_var).map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "none" => false,
        Some(v) if v.split(',').any(|e| e.trim() == "otlp") => true,
        _ => var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || var(endpoint_var).is_some(),
    }
}

/// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, applied by the call layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// A caller's sampled flag decides for a call that continues its trace.
    pub parent_based: bool,
    /// The share of calls sampled that start a trace (or all, when not parent-based).
    pub ratio: f64,
}

impl Sampling {
    fn from_vars(var: &impl Fn(&str) -> Option<String>) -> Sampling {
        let ratio_arg = || {
            var("OTEL_TRACES_SAMPLER_ARG")
                .and_then(|a| a.trim().parse::<f64>().ok())
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(1.0)
        };
        let sampler = var("OTEL_TRACES_SAMPLER").map(|s| s.to_ascii_lowercase());
        let (parent_based, ratio) = match sampler.as_deref() {
            None | Some("parentbased_always_on") => (true, 1.0),
            Some("always_on") => (false, 1.0),
            Some("always_off") => (false, 0.0),
            Some("traceidratio") => (false, ratio_arg()),
            Some("parentbased_always_off") => (true, 0.0),
            Some("parentbased_traceidratio") => (true, ratio_arg()),
            Some(other) => {
                eprintln!(
                    "kemon-keys: OTEL_TRACES_SAMPLER={other} is not supported; using parentbased_always_on"
                );
                (true, 1.0)
            }
        };
        Sampling {
            parent_based,
            ratio,
        }
    }

    /// Whether a call with `parent` (its `traceparent`, if any) is sampled.
    pub fn sample(&self, parent: Option<&TraceParent>) -> bool {
        match parent {
            Some(parent) if self.parent_based => parent.sampled,
            Some(parent) => ratio_holds(self.ratio, parent.trace_id as u64),
            None => ratio_holds(self.ratio, random()),
        }
    }
}

fn ratio_holds(ratio: f64, draw: u64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    // As the SDK's TraceIdRatioBased: the low 64 bits against ratio × 2^64.
    (draw >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// A fast per-thread pseudo-random number (xorshift), seeded from the std hasher's keys.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// A W3C `traceparent` header: `00-<trace id>-<parent id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses the header, or `None` for one the W3C rules say to ignore.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        // Version 00 is exactly 55 bytes; a later version may append fields after a dash.
        if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let version = hex(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        let trace_id = hex(&value[3..35])?;
        let span_id = u64::try_from(hex(&value[36..52])?).ok()?;
        let flags = hex(&value[53..55])?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context a server span continues.
    pub fn context(&self, tracestate: Option<&str>) -> opentelemetry::Context {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            flags,
            true,
            state,
        ))
    }
}

/// Lowercase hex digits as a number (at most 32 of them).
fn hex(digits: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(v);
    }
    Some(n)
}

/// A trace id as its 32 lowercase hex digits, written without allocating.
#[derive(Debug, Clone, Copy)]
pub struct TraceIdHex(pub u128);

impl std::fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The trace id of an exported span.
pub fn trace_id_of(span: &tracing::Span) -> Option<u128> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| u128::from_be_bytes(span_context.trace_id().to_bytes()))
}

static SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// The sampling of calls, while traces are exported.
pub fn sampling() -> Option<&'static Sampling> {
    SAMPLING.get()
}

/// Whether `span` is exported (and so may be the parent of an exported span).
pub fn is_traced(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.metadata().is_some_and(|m| m.target() == TRACED)
}

/// The exporter of traces, to be shut down (flushing what is buffered) when the process ends.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Flushes and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The batch processor's thread exports through tonic on this runtime: wait for it
        // off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        })
        .await;
    }
}

/// The OpenTelemetry resource: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, and
/// `service.name` [`DEFAULT_SERVICE_NAME`] when neither names the service.
pub fn resource() -> opentelemetry_sdk::Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|n| !n.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let builder = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// The layer that exports [`TRACED`] spans, and the exporter behind it; `None` when traces
/// are off. Must run inside the Tokio runtime (the OTLP client is tonic's).
pub fn layer<S>(
    settings: &TraceSettings,
) -> anyhow::Result<(impl Layer<S> + Send + Sync + use<S>, Tracing)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    use opentelemetry_otlp::WithExportConfig as _;
    let _ = SAMPLING.set(settings.sampling);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()?;
    let sampler = if settings.sampling.parent_based {
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
    } else {
        Sampler::AlwaysOn
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("kemon-keys");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(
            DynFilterFn::new(|metadata, _| metadata.target() == TRACED).with_callsite_filter(
                |metadata| {
                    // `sometimes`, not `always`: tracing-subscriber hands a per-layer filter's
                    // decision to the layer through a thread-local that any earlier `enabled`
                    // check (`tracing::enabled!`, sqlx's query logger) leaves stale, and a callsite
                    // that is `always` enabled skips the check that would refresh it (the span is
                    // then silently not exported; tokio-rs/tracing#2704). Asking every time costs
                    // only for the few exported spans.
                    if metadata.target() == TRACED {
                        Interest::sometimes()
                    } else {
                        Interest::never()
                    }
                },
            ),
        );
    Ok((layer, Tracing { provider }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_is_read_or_ignored_as_the_w3c_rules_say() {
        assert_eq!(
            TraceParent::parse(HEADER),
            Some(TraceParent {
                trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                span_id: 0x00f0_67aa_0ba9_02b7,
                sampled: true,
            })
        );
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!TraceParent::parse(unsampled).unwrap().sampled);
        let future = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later";
        assert!(TraceParent::parse(future).is_some());
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            TraceIdHex(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    fn settings(vars: &[(&str, &str)]) -> Option<TraceSettings> {
        TraceSettings::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn traces_are_on_only_when_the_otel_variables_ask_for_them() {
        assert_eq!(settings(&[]), None);
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert!(settings(&[endpoint]).is_some());
        assert!(settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")]).is_some());
        assert!(settings(&[("OTEL_TRACES_EXPORTER", "otlp")]).is_some());
        assert_eq!(
            settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            None
        );
        assert_eq!(settings(&[endpoint, ("OTEL_SDK_DISABLED", "true")]), None);
    }

    #[test]
    fn the_sampler_follows_the_caller_or_the_ratio() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let sampled = TraceParent::parse(HEADER).unwrap();
        let unsampled = TraceParent {
            sampled: false,
            ..sampled
        };
        let default = settings(&[endpoint]).unwrap().sampling;
        assert!(default.sample(Some(&sampled)) && !default.sample(Some(&unsampled)));
        assert!(default.sample(None));

        let off = settings(&[endpoint, ("OTEL_TRACES_SAMPLER", "always_off")])
            .unwrap()
            .sampling;
        assert!(!off.sample(Some(&sampled)) && !off.sample(None));

        let parent_or_none = settings(&[
            endpoint,
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ])
        .unwrap()
        .sampling;
        assert!(parent_or_none.sample(Some(&sampled)) && !parent_or_none.sample(None));

        let half = Sampling {
            parent_based: false,
            ratio: 0.5,
        };
        let taken = (0..10_000).filter(|_| half.sample(None)).count();
        assert!((4_000..6_000).contains(&taken), "{taken}");
    }
}
