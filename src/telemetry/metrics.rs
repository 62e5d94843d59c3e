//! The service's metrics: plain atomic counters and fixed-bucket histograms in one
//! process-wide [`Metrics`], the one source of truth that both the Prometheus text of
//! `GET /metrics` ([`super::prometheus`]) and the OTLP push ([`super::otlp`]) are rendered
//! from, through one [`Snapshot`].
//!
//! Recording is a few relaxed atomic additions into this core's copy of cells fixed at start
//! (see [`shard`]): the methods are
//! read once from the services' descriptors, codes are indexes, label values are `&'static`
//! strings. Nothing is allocated, hashed into a new map entry or locked per call, so VerifyKey
//! pays a few nanoseconds. Labels are bounded by construction: method, gRPC code and verify
//! code only, never a workspace or a key id; a path that names no method of this server is
//! counted as `_OTHER`.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use prost::Message;

/// Upper bounds (µs) of the latency buckets: from 100 µs (a VerifyKey) to 10 s (a slow disk).
pub const LATENCY_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Upper bounds of the writer's batch-size buckets (commands per transaction).
pub const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// gRPC status codes 0 to 16, as label values (`rpc.grpc.status_code` is numeric).
pub const CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The methods whose answers carry a verify code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier {
    VerifyKey = 0,
    /// Envoy's ext_authz Check.
    Check = 1,
}

const VERIFIERS: [&str; 2] = ["VerifyKey", "Check"];

/// Verify codes 0 to 8 (`kemon.keys.v1.VerifyCode`); a larger one is counted as 0.
const VERIFY_CODES: usize = 9;

/// How many copies of each counter there are, and which one this thread adds to.
///
/// Every call adds to the same few counters (its method's histogram, its verify code). Were
/// they one set of atomics, every core would write the same cache lines and each addition
/// would first fetch the line from the core that wrote it last: with two cores under load,
/// that cost VerifyKey several percent of its throughput. So each counter has one copy per
/// core (at most [`MAX_SHARDS`]), each thread adds to the copy it was given when it first
/// counted, and a read sums the copies. Threads beyond the number of copies share them:
/// still exact, as the additions stay atomic.
mod shard {
    use std::cell::Cell;
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    pub const MAX_SHARDS: usize = 16;

    /// One copy per core the process may run on, at most [`MAX_SHARDS`].
    pub static SHARDS: LazyLock<usize> = LazyLock::new(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_SHARDS))
    });

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }

    /// This thread's copy, in `0..*SHARDS`.
    #[inline]
    pub fn mine() -> usize {
        MINE.with(|mine| {
            let shard = mine.get();
            if shard != usize::MAX {
                return shard;
            }
            let shard = NEXT.fetch_add(1, Relaxed) % *SHARDS;
            mine.set(shard);
            shard
        })
    }
}

/// Counters, one row of `width` per shard, each row starting on its own cache line (rows are
/// a whole number of lines, and the array starts on a line).
#[derive(Debug)]
struct Sharded {
    lines: Box<[Line]>,
    width: usize,
    /// Lines per row.
    row_lines: usize,
}

/// One cache line of counters.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line([AtomicU64; 8]);

impl Sharded {
    fn new(width: usize) -> Sharded {
        let row_lines = width.div_ceil(8).max(1);
        Sharded {
            lines: (0..row_lines * *shard::SHARDS)
                .map(|_| Line::default())
                .collect(),
            width,
            row_lines,
        }
    }

    /// This thread's copy of counter `i`.
    #[inline]
    fn mine(&self, i: usize) -> &AtomicU64 {
        let line = shard::mine() * self.row_lines + i / 8;
        &self.lines[line].0[i % 8]
    }

    fn add(&self, i: usize, value: u64) {
        if i < self.width {
            self.mine(i).fetch_add(value, Relaxed);
        }
    }

    /// Counter `i`, summed over the copies.
    fn sum(&self, i: usize) -> u64 {
        (0..self.lines.len() / self.row_lines)
            .map(|row| self.lines[row * self.row_lines + i / 8].0[i % 8].load(Relaxed))
            .fold(0u64, u64::wrapping_add)
    }
}

/// A histogram with fixed bounds: per-bucket (not cumulative) counts and a sum, each sharded
/// (see [`shard`]).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// The sum, then one count per bound, then the count above every bound.
    cells: Sharded,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            cells: Sharded::new(bounds.len() + 2),
        }
    }

    pub fn record(&self, value: u64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.cells.add(1 + bucket, 1);
        self.cells.add(0, value);
    }

    fn read(&self) -> HistogramValue {
        let buckets: Vec<u64> = (0..=self.bounds.len())
            .map(|b| self.cells.sum(1 + b))
            .collect();
        HistogramValue {
            count: buckets.iter().sum(),
            sum: self.cells.sum(0),
            bounds: self.bounds,
            buckets,
        }
    }
}

/// The methods this server answers, read once from the services' descriptors.
#[derive(Debug)]
struct Methods {
    /// (service, method); the last is `("_OTHER", "_OTHER")`.
    names: Vec<(&'static str, &'static str)>,
    /// `/service/method` to its index in `names`. Its keys are fixed at start, so a fast hash
    /// that an attacker could collide costs nothing: a path they send is only looked up.
    by_path: HashMap<String, usize, foldhash::fast::RandomState>,
}

/// Services not described in this crate's descriptor set.
const OTHER_METHODS: &[(&str, &str)] = &[
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
    ("envoy.service.auth.v3.Authorization", "Check"),
];

/// The `rpc.method` (and `rpc.service`) of a call to no method this server has.
pub const OTHER: &str = "_OTHER";

impl Methods {
    fn load() -> Methods {
        let mut names: Vec<(&'static str, &'static str)> = Vec::new();
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        // The descriptor set is compiled in: it decodes, or the build is broken.
        if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for service in &file.service {
                    let full = leak(format!("{}.{}", file.package(), service.name()));
                    for method in &service.method {
                        names.push((full, leak(method.name().to_owned())));
                    }
                }
            }
        }
        names.extend_from_slice(OTHER_METHODS);
        names.push((OTHER, OTHER));
        let by_path = names
            .iter()
            .enumerate()
            .map(|(i, (service, method))| (format!("/{service}/{method}"), i))
            .collect();
        Methods { names, by_path }
    }

    fn other(&self) -> usize {
        self.names.len() - 1
    }
}

/// Every metric of the process; see the module documentation.
#[derive(Debug)]
pub struct Metrics {
    methods: Methods,
    /// `rpc.server.call.duration` (µs), by method and code: `method * 17 + code`.
    calls: Box<[Histogram]>,
    /// Verify outcomes by verifier and verify code: `verifier * VERIFY_CODES + code`.
    verify: Sharded,
    pub writer_batch_size: Histogram,
    /// Time (µs) to decide, write and commit one batch.
    pub writer_commit: Histogram,
    /// Commits that failed because of the storage (full, I/O error, read-only).
    pub storage_failures: AtomicU64,
    /// The last sequence in the log this process has written or read back.
    pub log_head: AtomicU64,
    /// Live audit subscribers told they fell behind.
    pub audit_fell_behind: AtomicU64,
    /// Keys loaded into the cache at start, and how long it took (µs).
    pub cache_loaded_keys: AtomicU64,
    pub cache_load_us: AtomicU64,
    /// When this process started counting: the start of every cumulative series.
    pub started: SystemTime,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// A method of this server, as [`Metrics::method`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodIndex(usize);

impl MethodIndex {
    /// A call counted as `_OTHER`.
    pub const OTHER: MethodIndex = MethodIndex(usize::MAX);
}

impl Metrics {
    fn new() -> Metrics {
        let methods = Methods::load();
        let calls = (0..methods.names.len() * CODES.len())
            .map(|_| Histogram::new(LATENCY_BOUNDS_US))
            .collect();
        Metrics {
            methods,
            calls,
            verify: Sharded::new(VERIFIERS.len() * VERIFY_CODES),
            writer_batch_size: Histogram::new(BATCH_BOUNDS),
            writer_commit: Histogram::new(LATENCY_BOUNDS_US),
            storage_failures: AtomicU64::new(0),
            log_head: AtomicU64::new(0),
            audit_fell_behind: AtomicU64::new(0),
            cache_loaded_keys: AtomicU64::new(0),
            cache_load_us: AtomicU64::new(0),
            started: SystemTime::now(),
        }
    }

    /// The method a request path names (`/kemon.keys.v1.KeyService/VerifyKey`), or `_OTHER`.
    pub fn method(&self, path: &str) -> MethodIndex {
        MethodIndex(
            self.methods
                .by_path
                .get(path)
                .copied()
                .unwrap_or_else(|| self.methods.other()),
        )
    }

    /// One call ended with `code` after `latency`.
    pub fn call(&self, method: MethodIndex, code: tonic::Code, latency: Duration) {
        let code = (code as usize).min(CODES.len() - 1);
        let method = method.0.min(self.methods.other());
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.calls[method * CODES.len() + code].record(micros);
    }

    /// A VerifyKey or Check answered with verify code `code`.
    pub fn verified(&self, verifier: Verifier, code: i32) {
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < VERIFY_CODES)
            .unwrap_or(0);
        self.verify.add(verifier as usize * VERIFY_CODES + code, 1);
    }

    /// One batch of `size` commands decided, written and committed (or failed) in `elapsed`.
    pub fn batch(&self, size: usize, elapsed: Duration) {
        self.writer_batch_size.record(size as u64);
        self.writer_commit
            .record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// What the counters hold now, with the gauges read from the running server.
    pub fn snapshot(&self, gauges: &Gauges) -> Snapshot {
        let mut calls = Vec::new();
        for (m, (service, method)) in self.methods.names.iter().enumerate() {
            for (c, code) in CODES.iter().enumerate() {
                let value = self.calls[m * CODES.len() + c].read();
                if value.count > 0 {
                    calls.push((
                        vec![
                            ("rpc.system", "grpc"),
                            ("rpc.service", *service),
                            ("rpc.method", *method),
                            ("rpc.grpc.status_code", *code),
                        ],
                        value,
                    ));
                }
            }
        }
        let mut verify = Vec::new();
        for (v, verifier) in VERIFIERS.iter().enumerate() {
            for c in 0..VERIFY_CODES {
                let count = self.verify.sum(v * VERIFY_CODES + c);
                if count > 0 {
                    verify.push((
                        vec![
                            ("rpc.method", *verifier),
                            ("verify_code", verify_code_name(c)),
                        ],
                        count,
                    ));
                }
            }
        }
        let mut families = vec![
            Family::gauge(
                "kemon.build.info",
                "kemon_build_info",
                "1",
                "The running build: always 1, its version as a label.",
                vec![(vec![("version", env!("CARGO_PKG_VERSION"))], 1.0)],
            ),
            Family {
                name: "rpc.server.call.duration",
                prometheus: "rpc_server_call_duration_seconds",
                unit: "s",
                help: "Duration of calls to this server, by method and gRPC status code; its count is the number of calls.",
                data: Data::Histogram {
                    scale: 1e-6,
                    points: calls,
                },
            },
            Family::counter(
                "kemon.verify.outcomes",
                "kemon_verify_outcomes_total",
                "{outcome}",
                "VerifyKey and Check answers by verify code.",
                verify,
            ),
            Family::gauge(
                "kemon.cache.keys",
                "kemon_cache_keys",
                "{key}",
                "Keys in the verification cache.",
                vec![(vec![], gauges.cache_keys as f64)],
            ),
            Family::gauge(
                "kemon.cache.load.duration",
                "kemon_cache_load_duration_seconds",
                "s",
                "How long loading the verification cache took at start.",
                vec![(vec![], self.cache_load_us.load(Relaxed) as f64 * 1e-6)],
            ),
            Family::gauge(
                "kemon.writer.queue.depth",
                "kemon_writer_queue_depth",
                "{write}",
                "Writes waiting for the writer.",
                vec![(vec![], gauges.writer_queue as f64)],
            ),
            Family {
                name: "kemon.writer.batch.size",
                prometheus: "kemon_writer_batch_size",
                unit: "{write}",
                help: "Writes committed together in one transaction (group commit).",
                data: Data::Histogram {
                    scale: 1.0,
                    points: vec![(vec![], self.writer_batch_size.read())],
                },
            },
            Family {
                name: "kemon.writer.commit.duration",
                prometheus: "kemon_writer_commit_duration_seconds",
                unit: "s",
                help: "Time to decide, write and commit one batch, failed ones included.",
                data: Data::Histogram {
                    scale: 1e-6,
                    points: vec![(vec![], self.writer_commit.read())],
                },
            },
            Family::counter(
                "kemon.storage.failures",
                "kemon_storage_failures_total",
                "{commit}",
                "Commits that failed because of the storage (full, I/O error, read-only).",
                vec![(vec![], self.storage_failures.load(Relaxed))],
            ),
            Family::gauge(
                "kemon.log.head.sequence",
                "kemon_log_head_sequence",
                "{record}",
                "The last sequence of the log this server has written or read back.",
                vec![(vec![], self.log_head.load(Relaxed) as f64)],
            ),
            Family::gauge(
                "kemon.audit.subscribers",
                "kemon_audit_subscribers",
                "{subscriber}",
                "Live SubscribeEvents streams.",
                vec![(vec![], gauges.audit_subscribers as f64)],
            ),
            Family::counter(
                "kemon.audit.fell_behind",
                "kemon_audit_fell_behind_total",
                "{event}",
                "Times a live audit subscriber fell behind the live buffer and was told to page.",
                vec![(vec![], self.audit_fell_behind.load(Relaxed))],
            ),
        ];
        if let Some(replica) = &gauges.replica {
            families.push(Family::gauge(
                "kemon.replica.applied.sequence",
                "kemon_replica_applied_sequence",
                "{record}",
                "The last sequence of the shared log this replica has applied.",
                vec![(vec![], replica.applied_sequence as f64)],
            ));
            families.push(Family::gauge(
                "kemon.replica.fresh",
                "kemon_replica_fresh",
                "1",
                "1 while this replica has confirmed within --max-staleness that it is caught up; 0 while it refuses VerifyKey and Check (REPLICA_STALE).",
                vec![(vec![], if replica.fresh { 1.0 } else { 0.0 })],
            ));
        }
        Snapshot {
            families,
            started: self.started,
            taken: SystemTime::now(),
        }
    }
}

/// A verify code's label: its proto name, and `VERIFY_CODE_MISSING` for 0 (a Check without a
/// key), as Envoy's access log says.
fn verify_code_name(code: usize) -> &'static str {
    if code == 0 {
        return "VERIFY_CODE_MISSING";
    }
    i32::try_from(code)
        .ok()
        .and_then(|c| crate::proto::v1::VerifyCode::try_from(c).ok())
        .map_or("VERIFY_CODE_MISSING", |c| c.as_str_name())
}

/// What only the running server knows, read when metrics are taken.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub cache_keys: usize,
    pub writer_queue: usize,
    pub audit_subscribers: usize,
    /// For a replica of a shared log.
    pub replica: Option<Replica>,
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub applied_sequence: u64,
    pub fresh: bool,
}

/// Reads the [`Gauges`] of the running server.
pub type GaugeReader = std::sync::Arc<dyn Fn() -> Gauges + Send + Sync>;

/// Labels: OpenTelemetry attribute names and `'static` values.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Every metric at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub families: Vec<Family>,
    pub started: SystemTime,
    pub taken: SystemTime,
}

/// One metric: its OpenTelemetry name and unit, its Prometheus name, and its series.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub prometheus: &'static str,
    pub unit: &'static str,
    pub help: &'static str,
    pub data: Data,
}

#[derive(Debug)]
pub enum Data {
    /// Monotonic, cumulative since the process started.
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
    /// Cumulative; recorded values times `scale` are in the family's unit.
    Histogram {
        scale: f64,
        points: Vec<(Labels, HistogramValue)>,
    },
}

#[derive(Debug, Clone)]
pub struct HistogramValue {
    pub count: u64,
    /// Of recorded values (unscaled).
    pub sum: u64,
    pub bounds: &'static [u64],
    /// Per bucket, the last above every bound.
    pub buckets: Vec<u64>,
}

impl Family {
    fn counter(
        name: &'static str,
        prometheus: &'static str,
        unit: &'static str,
        help: &'static str,
        points: Vec<(Labels, u64)>,
    ) -> Family {
        Family {
            name,
            prometheus,
            unit,
            help,
            data: Data::Counter(points),
        }
    }

    fn gauge(
        name: &'static str,
        prometheus: &'static str,
        unit: &'static str,
        help: &'static str,
        points: Vec<(Labels, f64)>,
    ) -> Family {
        Family {
            name,
            prometheus,
            unit,
            help,
            data: Data::Gauge(points),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::new(&[10, 20]);
        for v in [0, 10, 11, 20, 21, 1000] {
            h.record(v);
        }
        let read = h.read();
        assert_eq!(read.buckets, [2, 2, 2]);
        assert_eq!((read.count, read.sum), (6, 1062));
    }

    #[test]
    fn counts_from_more_threads_than_copies_add_up_exactly() {
        let h = Histogram::new(&[10, 20]);
        let threads = 2 * shard::MAX_SHARDS + 3;
        std::thread::scope(|scope| {
            for t in 0..threads as u64 {
                let h = &h;
                scope.spawn(move || {
                    for i in 0..1000u64 {
                        h.record((t + i) % 30);
                    }
                });
            }
        });
        let read = h.read();
        assert_eq!(read.count, threads as u64 * 1000);
        assert_eq!(
            read.buckets.iter().sum::<u64>(),
            threads as u64 * 1000,
            "{read:?}"
        );
        let sum: u64 = (0..threads as u64)
            .map(|t| (0..1000u64).map(|i| (t + i) % 30).sum::<u64>())
            .sum();
        assert_eq!(read.sum, sum);
        let expected_low: u64 = (0..threads as u64)
            .map(|t| (0..1000u64).filter(|i| (t + i) % 30 <= 10).count() as u64)
            .sum();
        assert_eq!(read.buckets[0], expected_low);
    }

    #[test]
    fn every_method_of_the_services_is_known_and_strays_are_other() {
        let m = metrics();
        let verify = m.method("/kemon.keys.v1.KeyService/VerifyKey");
        assert_eq!(
            m.methods.names[verify.0],
            ("kemon.keys.v1.KeyService", "VerifyKey")
        );
        let check = m.method("/envoy.service.auth.v3.Authorization/Check");
        assert_eq!(m.methods.names[check.0].1, "Check");
        assert_eq!(
            m.method("/kemon.keys.v1.KeyService/Nope").0,
            m.methods.other()
        );
        assert_eq!(m.method("/").0, m.methods.other());
    }
}
