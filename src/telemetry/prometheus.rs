//! The Prometheus text exposition format (version 0.0.4) of a metrics [`Snapshot`], served
//! as `GET /metrics` on the admin listener. Label names are the OpenTelemetry attribute
//! names with dots as underscores (`rpc.method` → `rpc_method`), as Prometheus's own OTLP
//! translation spells them.

use std::fmt::Write;

use super::metrics::{Data, Labels, Snapshot};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The snapshot as Prometheus text.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for family in &snapshot.families {
        let name = family.prometheus;
        let kind = match family.data {
            Data::Counter(_) => "counter",
            Data::Gauge(_) => "gauge",
            Data::Histogram { .. } => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        match &family.data {
            Data::Counter(points) => {
                for (labels, value) in points {
                    series(&mut out, name, labels, None);
                    let _ = writeln!(out, " {value}");
                }
            }
            Data::Gauge(points) => {
                for (labels, value) in points {
                    series(&mut out, name, labels, None);
                    let _ = writeln!(out, " {}", number(*value));
                }
            }
            Data::Histogram { scale, points } => {
                for (labels, value) in points {
                    let mut cumulative = 0;
                    for (i, count) in value.buckets.iter().enumerate() {
                        cumulative += count;
                        let le = match value.bounds.get(i) {
                            Some(bound) => number(*bound as f64 * scale),
                            None => "+Inf".to_owned(),
                        };
                        series(&mut out, &format!("{name}_bucket"), labels, Some(&le));
                        let _ = writeln!(out, " {cumulative}");
                    }
                    series(&mut out, &format!("{name}_sum"), labels, None);
                    let _ = writeln!(out, " {}", number(value.sum as f64 * scale));
                    series(&mut out, &format!("{name}_count"), labels, None);
                    let _ = writeln!(out, " {}", value.count);
                }
            }
        }
    }
    out
}

/// `name{label="value",…}`, with `le` last for a bucket.
fn series(out: &mut String, name: &str, labels: &Labels, le: Option<&str>) {
    out.push_str(name);
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (key, value) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        for c in key.chars() {
            out.push(if c.is_ascii_alphanumeric() { c } else { '_' });
        }
        out.push_str("=\"");
        escape(out, value);
        out.push('"');
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

/// A label value as the format wants it: backslash, quote and newline escaped.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as Prometheus reads it, without noise such as `0.00025000000000000006`.
fn number(value: f64) -> String {
    let rounded = (value * 1e9).round() / 1e9;
    format!("{rounded}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::{Family, HistogramValue};

    #[test]
    fn histograms_are_cumulative_with_a_last_inf_bucket_and_labels_are_escaped() {
        let snapshot = Snapshot {
            families: vec![Family {
                name: "x.duration",
                prometheus: "x_duration_seconds",
                unit: "s",
                help: "Durations.",
                data: Data::Histogram {
                    scale: 1e-6,
                    points: vec![(
                        vec![("rpc.method", "A\"b")],
                        HistogramValue {
                            count: 3,
                            sum: 1_250,
                            bounds: &[100, 1000],
                            buckets: vec![1, 1, 1],
                        },
                    )],
                },
            }],
            started: std::time::SystemTime::UNIX_EPOCH,
            taken: std::time::SystemTime::UNIX_EPOCH,
        };
        assert_eq!(
            render(&snapshot),
            "# HELP x_duration_seconds Durations.\n\
             # TYPE x_duration_seconds histogram\n\
             x_duration_seconds_bucket{rpc_method=\"A\\\"b\",le=\"0.0001\"} 1\n\
             x_duration_seconds_bucket{rpc_method=\"A\\\"b\",le=\"0.001\"} 2\n\
             x_duration_seconds_bucket{rpc_method=\"A\\\"b\",le=\"+Inf\"} 3\n\
             x_duration_seconds_sum{rpc_method=\"A\\\"b\"} 0.00125\n\
             x_duration_seconds_count{rpc_method=\"A\\\"b\"} 3\n"
        );
    }
}
