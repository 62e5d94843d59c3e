//! Targets measured over gRPC against a real server process: Verify against the health check
//! (1), Verify while writes happen (3), and group commit against one transaction per write (4).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use prost::bytes::Bytes;
use tonic::Request;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::check;
use crate::load::{self, LoadResult};
use crate::report::Report;
use crate::server::ServerProcess;

pub const WORKSPACES: usize = 100;

pub fn admin<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("x-kemon-actor", "bench".parse().expect("ascii"));
    r.metadata_mut()
        .insert("x-kemon-role", "admin".parse().expect("ascii"));
    r
}

pub fn create_request(i: u64) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        workspace_id: format!("ws_{}", i as usize % WORKSPACES),
        name: format!("bench {i}"),
        r#type: pb::KeyType::Private as i32,
        environment: pb::Environment::Production as i32,
        scopes: vec!["tickets:read".into(), "tickets:write".into()],
        ..Default::default()
    }
}

/// Creates `n` keys at concurrency 64 and returns their secrets and ids.
pub async fn seed_keys(channels: &[Channel], n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let per_task = n.div_ceil(64);
    let mut tasks = Vec::new();
    for t in 0..64 {
        let channel = channels[t % channels.len()].clone();
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            let mut client = KeyServiceClient::new(channel);
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let r = client
                    .create_key(admin(create_request((t * per_task + i) as u64)))
                    .await?
                    .into_inner();
                out.push((r.secret, r.key.map(|k| k.key_id).unwrap_or_default()));
            }
            Ok::<_, tonic::Status>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Health/Check as fast as `concurrency` callers can go.
pub async fn health_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(channels, concurrency, warmup, duration, |channel, _, _| {
        health_call(channel)
    })
    .await
}

/// One Health/Check.
pub async fn health_call(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

pub async fn verify_load(
    channels: &[Channel],
    secrets: Arc<Vec<String>>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(
        channels,
        concurrency,
        warmup,
        duration,
        move |channel, worker, i| {
            let secrets = secrets.clone();
            async move {
                let key = secrets[(worker * 7919 + i as usize * 31) % secrets.len()].clone();
                let response = KeyServiceClient::new(channel)
                    .verify_key(pb::VerifyKeyRequest {
                        key,
                        required_scopes: vec!["tickets:read".into()],
                        origin: String::new(),
                    })
                    .await?
                    .into_inner();
                if response.valid {
                    Ok(())
                } else {
                    Err(tonic::Status::internal(format!(
                        "unexpected verdict {}",
                        response.code
                    )))
                }
            }
        },
    )
    .await
}

/// Envoy's ext_authz Check for requests carrying one of the keys as `x-api-key`, on a route
/// requiring `tickets:read`: what an Envoy sidecar sends per request, pre-encoded (see
/// [`check`](crate::check)).
async fn check_load(
    channels: &[Channel],
    requests: Arc<Vec<Bytes>>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(
        channels,
        concurrency,
        warmup,
        duration,
        move |channel, worker, i| {
            let request = requests[(worker * 7919 + i as usize * 31) % requests.len()].clone();
            check::call(channel, request)
        },
    )
    .await
}

pub struct GrpcSettings<'a> {
    pub server_bin: &'a Path,
    pub keys: usize,
    pub seconds: f64,
    pub concurrency: &'a [usize],
    pub connections: usize,
    /// Writes per second alongside Verify for target 3.
    pub write_rate: f64,
}

/// A server with `s.keys` keys, connections to it, and the keys' secrets.
async fn seeded_server(
    s: &GrpcSettings<'_>,
) -> anyhow::Result<(
    tempfile::TempDir,
    ServerProcess,
    Vec<Channel>,
    Arc<Vec<String>>,
)> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(s.server_bin, dir.path(), &[]).await?;
    let channels = load::connect(&server.endpoint, s.connections).await?;
    let seeded = seed_keys(&channels, s.keys).await?;
    let secrets = Arc::new(seeded.into_iter().map(|(secret, _)| secret).collect());
    Ok((dir, server, channels, secrets))
}

/// Targets 1, 7 and 3.
pub async fn verify_targets(s: &GrpcSettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let (_dir, _server, channels, secrets) = seeded_server(s).await?;
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));

    report.section(&format!(
        "1. VerifyKey against grpc.health.v1.Health/Check, {} keys loaded, {} connections",
        s.keys, s.connections
    ));
    report.line("| Concurrency | RPC | Throughput | p50 | p99 | p99.9 |");
    report.line("|---|---|---|---|---|---|");
    for &c in s.concurrency {
        // Alternate six short rounds of each, so that drift on a shared machine (other
        // processes, CPU frequency, the page cache) hits both alike.
        let round = duration / 2;
        let mut health = health_load(&channels, c, warmup, round).await;
        let mut verify = verify_load(&channels, secrets.clone(), c, warmup, round).await;
        for _ in 1..6 {
            health.merge(&health_load(&channels, c, warmup, round).await);
            verify.merge(&verify_load(&channels, secrets.clone(), c, warmup, round).await);
        }
        for (name, r) in [("Health/Check", &health), ("VerifyKey", &verify)] {
            report.line(format!(
                "| {c} | {name} | {:.0}/s | {} µs | {} µs | {} µs |",
                r.throughput(),
                r.p(0.5),
                r.p(0.99),
                r.p(0.999)
            ));
        }
        if verify.errors > 0 {
            anyhow::bail!("{} VerifyKey calls failed", verify.errors);
        }
        report.check(
            &format!("1. Verify/Health throughput, concurrency {c}"),
            verify.throughput() / health.throughput(),
            true,
            0.9,
        );
        report.check(
            &format!("1. Verify/Health p99 latency, concurrency {c}"),
            verify.p(0.99) as f64 / health.p(0.99).max(1) as f64,
            false,
            1.2,
        );
    }

    check_against_health(s, &channels, &secrets, report).await?;

    report.section("3. VerifyKey at concurrency 16 while CreateKey and RevokeKey run");
    let mut read_only = verify_load(&channels, secrets.clone(), 16, warmup, duration).await;
    let (paced, paced_rate) =
        verify_under_writes(&channels, &secrets, Some(s.write_rate), warmup, duration).await?;
    let (flat_out, flat_out_rate) =
        verify_under_writes(&channels, &secrets, None, warmup, duration).await?;
    read_only.merge(&verify_load(&channels, secrets.clone(), 16, warmup, duration).await);
    report.line(
        "| Writes alongside | Write rate achieved | VerifyKey throughput | p50 | p99 | p99.9 |",
    );
    report.line("|---|---|---|---|---|---|");
    for (label, rate, r) in [
        (
            "none (read-only, two runs around the others)".to_owned(),
            0.0,
            &read_only,
        ),
        (
            format!("paced at {:.0} writes/s", s.write_rate),
            paced_rate,
            &paced,
        ),
        (
            "2 writers flat out (closed loop)".to_owned(),
            flat_out_rate,
            &flat_out,
        ),
    ] {
        report.line(format!(
            "| {label} | {rate:.0}/s | {:.0}/s | {} µs | {} µs | {} µs |",
            r.throughput(),
            r.p(0.5),
            r.p(0.99),
            r.p(0.999)
        ));
    }
    report.check(
        &format!(
            "3. Verify throughput with {:.0} writes/s / read-only",
            s.write_rate
        ),
        paced.throughput() / read_only.throughput(),
        true,
        0.8,
    );
    report.line(format!(
        "\nFlat out, VerifyKey keeps {:.2} of its read-only throughput (reported, not a target \
         check: see BENCHMARKS.md on CPU sharing).",
        flat_out.throughput() / read_only.throughput()
    ));
    Ok(())
}

/// Target 7 alone, on a server of its own.
pub async fn check_targets(s: &GrpcSettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let (_dir, _server, channels, secrets) = seeded_server(s).await?;
    check_against_health(s, &channels, &secrets, report).await
}

/// Target 7: Envoy's Check against Health/Check over the same connections, in alternating
/// rounds, with VerifyKey's bounds.
async fn check_against_health(
    s: &GrpcSettings<'_>,
    channels: &[Channel],
    secrets: &[String],
    report: &mut Report,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));
    report.section(&format!(
        "7. Envoy ext_authz Check against grpc.health.v1.Health/Check, {} keys loaded, {} connections",
        s.keys, s.connections
    ));
    report.line("| Concurrency | RPC | Throughput | p50 | p99 | p99.9 |");
    report.line("|---|---|---|---|---|---|");
    let requests: Arc<Vec<Bytes>> =
        Arc::new(secrets.iter().map(|k| check::encoded_request(k)).collect());
    for &c in s.concurrency {
        let round = duration / 2;
        let mut health = health_load(channels, c, warmup, round).await;
        let mut check = check_load(channels, requests.clone(), c, warmup, round).await;
        for _ in 1..6 {
            health.merge(&health_load(channels, c, warmup, round).await);
            check.merge(&check_load(channels, requests.clone(), c, warmup, round).await);
        }
        for (name, r) in [("Health/Check", &health), ("ext_authz Check", &check)] {
            report.line(format!(
                "| {c} | {name} | {:.0}/s | {} µs | {} µs | {} µs |",
                r.throughput(),
                r.p(0.5),
                r.p(0.99),
                r.p(0.999)
            ));
        }
        if check.errors > 0 {
            anyhow::bail!("{} Check calls failed", check.errors);
        }
        report.check(
            &format!("7. Check/Health throughput, concurrency {c}"),
            check.throughput() / health.throughput(),
            true,
            0.9,
        );
        report.check(
            &format!("7. Check/Health p99 latency, concurrency {c}"),
            check.p(0.99) as f64 / health.p(0.99).max(1) as f64,
            false,
            1.2,
        );
    }
    Ok(())
}

/// VerifyKey load while two tasks each create a key and revoke it, over and over: paced to
/// `rate` writes per second in total, or as fast as they are answered. Returns the Verify
/// result and the write rate achieved.
async fn verify_under_writes(
    channels: &[Channel],
    secrets: &Arc<Vec<String>>,
    rate: Option<f64>,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(LoadResult, f64)> {
    let writers = Writers::start(
        [0, 1].map(|w| channels[w % channels.len()].clone()),
        rate,
        10_000_000,
    );
    let verify = verify_load(channels, secrets.clone(), 16, warmup, duration).await;
    let rate = writers.stop().await?;
    Ok((verify, rate))
}

/// Two tasks, one per channel, each creating a key and revoking it over and over until
/// stopped: paced to `rate` writes per second in total, or flat out without one.
pub struct Writers {
    done: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>>,
    started: Instant,
}

impl Writers {
    /// Starts the tasks; task `w` names its keys from `first_index * (w + 1)` on.
    pub fn start(channels: [Channel; 2], rate: Option<f64>, first_index: u64) -> Writers {
        let done = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (w, channel) in (0u64..).zip(channels) {
            let (done, writes) = (done.clone(), writes.clone());
            // Each task makes two writes per tick.
            let mut ticker = rate.map(|r| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(4.0 / r.max(0.001)));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            tasks.push(tokio::spawn(async move {
                let mut client = KeyServiceClient::new(channel);
                let mut i = 0u64;
                while !done.load(Ordering::Relaxed) {
                    if let Some(t) = ticker.as_mut() {
                        t.tick().await;
                    }
                    let created = client
                        .create_key(admin(create_request(first_index * (w + 1) + i)))
                        .await?
                        .into_inner()
                        .key
                        .unwrap_or_default();
                    client
                        .revoke_key(admin(pb::RevokeKeyRequest {
                            workspace_id: created.workspace_id,
                            key_id: created.key_id,
                            expected_version: None,
                            wait_for_replicas: false,
                        }))
                        .await?;
                    writes.fetch_add(2, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }));
        }
        Writers {
            done,
            writes,
            tasks,
            started: Instant::now(),
        }
    }

    /// Stops the tasks; the writes per second they achieved, or the first one's error.
    pub async fn stop(self) -> anyhow::Result<f64> {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.done.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        Ok(self.writes.load(Ordering::Relaxed) as f64 / elapsed)
    }
}

/// CreateKey as fast as `concurrency` callers can go.
pub async fn create_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(channels, concurrency, warmup, duration, create_call).await
}

/// One CreateKey, the `i`th of caller `worker`.
pub async fn create_call(channel: Channel, worker: usize, i: u64) -> Result<(), tonic::Status> {
    KeyServiceClient::new(channel)
        .create_key(admin(create_request(worker as u64 * 1_000_000 + i)))
        .await
        .map(|_| ())
}

/// Target 4: CreateKey at concurrency 64 with group commit, and with one transaction per
/// write (`--write-batch-max 1`), each on its own fresh server.
pub async fn write_targets(s: &GrpcSettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));
    let mut results = Vec::new();
    for (label, flags) in [
        (
            "one transaction per write (--write-batch-max 1)",
            vec!["--write-batch-max", "1"],
        ),
        ("group commit (--write-batch-max 256, the default)", vec![]),
    ] {
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(s.server_bin, dir.path(), &flags).await?;
        let channels = load::connect(&server.endpoint, s.connections).await?;
        let r = create_load(&channels, 64, warmup, duration).await;
        if r.errors > 0 {
            anyhow::bail!("{} CreateKey calls failed", r.errors);
        }
        results.push((label, r));
    }
    report.section("4. Durable CreateKey at concurrency 64 (synchronous=FULL)");
    report.line("| Writer | Throughput | p50 | p99 | p99.9 |");
    report.line("|---|---|---|---|---|");
    for (label, r) in &results {
        report.line(format!(
            "| {label} | {:.0}/s | {} µs | {} µs | {} µs |",
            r.throughput(),
            r.p(0.5),
            r.p(0.99),
            r.p(0.999)
        ));
    }
    report.check(
        "4. Group commit / one transaction per write, CreateKey throughput",
        results[1].1.throughput() / results[0].1.throughput(),
        true,
        5.0,
    );
    Ok(())
}
