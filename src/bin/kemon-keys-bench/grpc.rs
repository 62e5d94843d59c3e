//! Targets measured over gRPC against a real server process: Verify against the health check
//! (1), Verify while writes happen (3), and group commit against one transaction per write (4).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use tonic::Request;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::load::{self, LoadResult};
use crate::report::Report;
use crate::server::ServerProcess;

pub const WORKSPACES: usize = 100;

fn admin<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("x-kemon-actor", "bench".parse().expect("ascii"));
    r.metadata_mut()
        .insert("x-kemon-role", "admin".parse().expect("ascii"));
    r
}

fn create_request(i: u64) -> pb::CreateKeyRequest {
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

async fn health_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(
        channels,
        concurrency,
        warmup,
        duration,
        |channel, _, _| async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
        },
    )
    .await
}

async fn verify_load(
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

pub struct GrpcSettings<'a> {
    pub server_bin: &'a Path,
    pub keys: usize,
    pub seconds: f64,
    pub concurrency: &'a [usize],
    pub connections: usize,
}

/// Targets 1 and 3.
pub async fn verify_targets(s: &GrpcSettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(s.server_bin, dir.path(), &[]).await?;
    let channels = load::connect(&server.endpoint, s.connections).await?;
    let seeded = seed_keys(&channels, s.keys).await?;
    let secrets: Arc<Vec<String>> =
        Arc::new(seeded.into_iter().map(|(secret, _)| secret).collect());
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));

    report.section(&format!(
        "1. VerifyKey against grpc.health.v1.Health/Check, {} keys loaded, {} connections",
        s.keys, s.connections
    ));
    report.line("| Concurrency | RPC | Throughput | p50 | p99 | p99.9 |");
    report.line("|---|---|---|---|---|---|");
    let mut at_16 = None;
    for &c in s.concurrency {
        // Alternate two rounds of each so drift on a shared machine hits both alike.
        let mut health = health_load(&channels, c, warmup, duration).await;
        let mut verify = verify_load(&channels, secrets.clone(), c, warmup, duration).await;
        health.merge(&health_load(&channels, c, warmup, duration).await);
        verify.merge(&verify_load(&channels, secrets.clone(), c, warmup, duration).await);
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
        if c == 16 {
            at_16 = Some(verify.throughput());
        }
    }

    report.section("3. VerifyKey while CreateKey and RevokeKey run, concurrency 16");
    let read_only = match at_16 {
        Some(t) => t,
        None => verify_load(&channels, secrets.clone(), 16, warmup, duration)
            .await
            .throughput(),
    };
    let writers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writer_tasks = Vec::new();
    for w in 0..2u64 {
        let channel = channels[w as usize % channels.len()].clone();
        let done = writers_done.clone();
        let writes = writes.clone();
        writer_tasks.push(tokio::spawn(async move {
            let mut client = KeyServiceClient::new(channel);
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let created = client
                    .create_key(admin(create_request(1_000_000 + w * 1_000_000 + i)))
                    .await?
                    .into_inner()
                    .key
                    .unwrap_or_default();
                client
                    .revoke_key(admin(pb::RevokeKeyRequest {
                        workspace_id: created.workspace_id,
                        key_id: created.key_id,
                        expected_version: None,
                    }))
                    .await?;
                writes.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    let mixed = verify_load(&channels, secrets.clone(), 16, warmup, duration).await;
    writers_done.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in writer_tasks {
        t.await??;
    }
    let total_writes = writes.load(std::sync::atomic::Ordering::Relaxed);
    report.line(format!(
        "Read-only VerifyKey: {read_only:.0}/s. With 2 writers (CreateKey then RevokeKey, \
         {total_writes} writes over the run, ≈{:.0}/s): VerifyKey {}",
        total_writes as f64 / (duration + warmup).as_secs_f64(),
        mixed.summary()
    ));
    report.check(
        "3. Verify throughput with writes / read-only",
        mixed.throughput() / read_only,
        true,
        0.8,
    );
    Ok(())
}

async fn create_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    load::run(
        channels,
        concurrency,
        warmup,
        duration,
        |channel, worker, i| async move {
            KeyServiceClient::new(channel)
                .create_key(admin(create_request(worker as u64 * 1_000_000 + i)))
                .await
                .map(|_| ())
        },
    )
    .await
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
