//! Target 8, several replicas on PostgreSQL (issue 10): how long a revocation answered by one
//! replica takes to be refused by every other one while writes go on, VerifyKey against the
//! health check on a PostgreSQL replica, group commit against one transaction per write on
//! the same PostgreSQL server, and start-up (the cache load) at N keys from PostgreSQL beside
//! the same log in SQLite.
//!
//! Each part runs on a schema of its own (`kkbench_*`, dropped at the end and before a run),
//! so the database named by `--database-url` only needs to allow creating schemas.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use kemon_keys::store::{self, Backend};
use tonic::transport::Channel;

use crate::grpc::{self, Writers, admin, create_request};
use crate::load;
use crate::replay::{self, Runs};
use crate::report::Report;
use crate::server::ServerProcess;

pub struct PgSettings<'a> {
    pub server_bin: &'a Path,
    /// The PostgreSQL database the schemas are made in.
    pub database_url: &'a str,
    /// Keys created for the Verify comparison.
    pub keys: usize,
    /// Keys (one KeyCreated event each) for the start-up comparison.
    pub events: usize,
    pub cold_runs: usize,
    pub seconds: f64,
    pub concurrency: &'a [usize],
    pub connections: usize,
    /// Writes per second (CreateKey and RevokeKey in turn) while revocations are timed.
    pub write_rate: f64,
    /// Revocations timed.
    pub revocations: usize,
}

/// The schemas of a run, dropped when it ends (also on an error). Their names are the
/// bench's own (`kkbench_` and a fixed word), so the DDL built from them is safe.
struct Schemas {
    pool: sqlx::PgPool,
    base: String,
    made: Vec<String>,
}

impl Schemas {
    async fn connect(base: &str) -> anyhow::Result<Schemas> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(base)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {base}: {e}"))?;
        // Left over by an interrupted run.
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'kkbench\\_%'",
        )
        .fetch_all(&pool)
        .await?;
        for schema in stale {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(&pool)
            .await?;
        }
        Ok(Schemas {
            pool,
            base: base.to_owned(),
            made: Vec::new(),
        })
    }

    /// A new empty schema, as a database URL whose `search_path` is it.
    async fn fresh(&mut self, name: &str) -> anyhow::Result<String> {
        let schema = format!("kkbench_{name}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&self.pool)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&self.pool)
            .await?;
        self.made.push(schema.clone());
        let separator = if self.base.contains('?') { '&' } else { '?' };
        Ok(format!(
            "{}{separator}options[search_path]={schema}",
            self.base
        ))
    }

    async fn drop_all(&mut self) {
        for schema in self.made.drain(..) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(&self.pool)
            .await;
        }
    }
}

/// A replica of the schema at `url`, named `id`.
async fn replica(
    s: &PgSettings<'_>,
    url: &str,
    id: &str,
    extra: &[&str],
) -> anyhow::Result<(tempfile::TempDir, ServerProcess)> {
    let dir = tempfile::tempdir()?;
    let mut args = vec!["--database-url", url, "--replica-id", id];
    args.extend_from_slice(extra);
    let server = ServerProcess::start(s.server_bin, dir.path(), &args).await?;
    Ok((dir, server))
}

pub async fn run(s: &PgSettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let mut schemas = Schemas::connect(s.database_url).await?;
    let result = run_parts(s, &mut schemas, report).await;
    schemas.drop_all().await;
    result
}

async fn run_parts(
    s: &PgSettings<'_>,
    schemas: &mut Schemas,
    report: &mut Report,
) -> anyhow::Result<()> {
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&schemas.pool)
        .await?;
    report.line(format!(
        "\nPostgreSQL {version} at the address given by --database-url, on the same machine."
    ));
    three_replicas(s, schemas, report).await?;
    group_commit(s, schemas, report).await?;
    startup(s, schemas, report).await?;
    Ok(())
}

/// A key made for the revocation timings.
struct Victim {
    secret: String,
    key_id: String,
    workspace_id: String,
}

async fn make_victims(channel: Channel, n: usize) -> anyhow::Result<Vec<Victim>> {
    let mut client = KeyServiceClient::new(channel);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = client
            .create_key(admin(create_request(50_000_000 + i as u64)))
            .await?
            .into_inner();
        let key = r.key.unwrap_or_default();
        out.push(Victim {
            secret: r.secret,
            key_id: key.key_id,
            workspace_id: key.workspace_id,
        });
    }
    Ok(out)
}

async fn verify_code(client: &mut KeyServiceClient<Channel>, secret: &str) -> anyhow::Result<i32> {
    Ok(client
        .verify_key(pb::VerifyKeyRequest {
            key: secret.to_owned(),
            required_scopes: vec![],
            origin: String::new(),
        })
        .await?
        .into_inner()
        .code)
}

/// Asks VerifyKey on `channel` until it answers REVOKED for `secret`; the time from `since`.
async fn until_revoked(
    channel: Channel,
    secret: String,
    since: Instant,
) -> anyhow::Result<Duration> {
    let mut client = KeyServiceClient::new(channel);
    loop {
        let code = verify_code(&mut client, &secret).await?;
        if code == pb::VerifyCode::Revoked as i32 {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(10),
            "a revocation was not seen within 10 s (VerifyKey still answers {code})"
        );
    }
}

fn millis(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Three replicas on one schema: revocation propagation under writes, RevokeKey's wait for
/// every replica, and VerifyKey against Health/Check on one replica.
async fn three_replicas(
    s: &PgSettings<'_>,
    schemas: &mut Schemas,
    report: &mut Report,
) -> anyhow::Result<()> {
    let url = schemas.fresh("replicas").await?;
    let mut replicas = Vec::new();
    for id in ["bench-a", "bench-b", "bench-c"] {
        replicas.push(replica(s, &url, id, &[]).await?);
    }
    let mut channels = Vec::new();
    for (_, server) in &replicas {
        channels.push(load::connect(&server.endpoint, s.connections).await?);
    }

    // The keys to revoke, made on the first replica, and seen VALID on every replica first.
    let timed = s.revocations.max(1);
    let waited = (timed / 4).max(1);
    let victims = make_victims(channels[0][0].clone(), timed + waited).await?;
    for chans in &channels {
        let mut client = KeyServiceClient::new(chans[0].clone());
        for v in &victims {
            let started = Instant::now();
            while verify_code(&mut client, &v.secret).await? != pb::VerifyCode::Valid as i32 {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "a new key did not reach every replica within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    // Writes going on: two tasks on the second and third replicas, each creating a key and
    // revoking it, paced to `write_rate` in total.
    let writers = Writers::start(
        [channels[1][0].clone(), channels[2][0].clone()],
        Some(s.write_rate),
        60_000_000,
    );

    // Each revocation is sent to the replicas in turn; the time is from its answer to
    // VerifyKey answering REVOKED on the slower of the two others, each asked in a loop.
    let mut everywhere = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut each = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for (r, victim) in victims[..timed].iter().enumerate() {
        let origin = r % 3;
        KeyServiceClient::new(channels[origin][0].clone())
            .revoke_key(admin(pb::RevokeKeyRequest {
                workspace_id: victim.workspace_id.clone(),
                key_id: victim.key_id.clone(),
                expected_version: None,
                wait_for_replicas: false,
            }))
            .await?;
        let answered = Instant::now();
        let mut polls = Vec::new();
        for (other, chans) in channels.iter().enumerate() {
            if other != origin {
                polls.push(tokio::spawn(until_revoked(
                    chans[1 % chans.len()].clone(),
                    victim.secret.clone(),
                    answered,
                )));
            }
        }
        let mut slowest = Duration::ZERO;
        for poll in polls {
            let took = poll.await??;
            each.record(took.as_micros().max(1) as u64)?;
            slowest = slowest.max(took);
        }
        everywhere.record(slowest.as_micros().max(1) as u64)?;
        // Spread the revocations over the writers' commits.
        tokio::time::sleep(Duration::from_millis(7 + (r as u64 * 13) % 23)).await;
    }

    // RevokeKey with wait_for_replicas: its latency, the confirmations it reports, and
    // whether any other replica still answered VALID right after it (never expected).
    let mut waited_latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut confirmed_all = 0usize;
    let mut valid_after = 0usize;
    for (r, victim) in victims[timed..].iter().enumerate() {
        let origin = r % 3;
        let sent = Instant::now();
        let answer = KeyServiceClient::new(channels[origin][0].clone())
            .revoke_key(admin(pb::RevokeKeyRequest {
                workspace_id: victim.workspace_id.clone(),
                key_id: victim.key_id.clone(),
                expected_version: None,
                wait_for_replicas: true,
            }))
            .await?;
        waited_latency.record(sent.elapsed().as_micros().max(1) as u64)?;
        let header = |name: &str| {
            answer
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        };
        if header("x-kemon-replicas-confirmed") == Some(3)
            && header("x-kemon-replicas-live") == Some(3)
        {
            confirmed_all += 1;
        }
        for (other, chans) in channels.iter().enumerate() {
            if other != origin {
                let mut client = KeyServiceClient::new(chans[1 % chans.len()].clone());
                if verify_code(&mut client, &victim.secret).await? != pb::VerifyCode::Revoked as i32
                {
                    valid_after += 1;
                }
            }
        }
    }
    let write_rate = writers.stop().await?;

    report.section(&format!(
        "8. Revocation on one of 3 PostgreSQL replicas until VerifyKey answers REVOKED on the \
         two others, {timed} revocations, {write_rate:.0} writes/s alongside"
    ));
    report.line("| Measured | p50 | p90 | p99 | max |");
    report.line("|---|---|---|---|---|");
    for (label, h) in [
        (
            "RevokeKey answered → REVOKED on both other replicas",
            &everywhere,
        ),
        ("RevokeKey answered → REVOKED on one other replica", &each),
    ] {
        report.line(format!(
            "| {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            millis(h, 0.5),
            millis(h, 0.9),
            millis(h, 0.99),
            h.max() as f64 / 1000.0
        ));
    }
    report.line(format!(
        "| RevokeKey with wait_for_replicas, sent → answered ({waited} calls) | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        millis(&waited_latency, 0.5),
        millis(&waited_latency, 0.9),
        millis(&waited_latency, 0.99),
        waited_latency.max() as f64 / 1000.0
    ));
    report.line(format!(
        "\nWith wait_for_replicas, {confirmed_all} of {waited} answers reported 3 of 3 \
         replicas confirmed, and VerifyKey on another replica right after the answer said \
         something other than REVOKED {valid_after} times."
    ));
    report.check(
        "8. Revocation seen on every other replica, p99 (ms)",
        millis(&everywhere, 0.99),
        false,
        50.0,
    );
    report.check(
        "8. Revocation seen on every other replica, max (ms)",
        everywhere.max() as f64 / 1000.0,
        false,
        1000.0,
    );
    anyhow::ensure!(
        valid_after == 0,
        "a replica answered other than REVOKED after RevokeKey waited for every replica"
    );

    // VerifyKey against Health/Check on one replica, as target 1 measures it on SQLite.
    let secrets: Arc<Vec<String>> = Arc::new(
        grpc::seed_keys(&channels[0], s.keys)
            .await?
            .into_iter()
            .map(|(secret, _)| secret)
            .collect(),
    );
    // The others must have them too before the load reads them anywhere; this replica
    // made them, so its cache has them already.
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));
    report.section(&format!(
        "8. VerifyKey against Health/Check on one of 3 PostgreSQL replicas, {} keys, {} connections",
        s.keys, s.connections
    ));
    report.line("| Concurrency | RPC | Throughput | p50 | p99 | p99.9 |");
    report.line("|---|---|---|---|---|---|");
    for &c in s.concurrency {
        let round = duration / 2;
        let chans = &channels[0];
        let mut health = grpc::health_load(chans, c, warmup, round).await;
        let mut verify = grpc::verify_load(chans, secrets.clone(), c, warmup, round).await;
        for _ in 1..6 {
            health.merge(&grpc::health_load(chans, c, warmup, round).await);
            verify.merge(&grpc::verify_load(chans, secrets.clone(), c, warmup, round).await);
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
        anyhow::ensure!(
            verify.errors == 0,
            "{} VerifyKey calls failed",
            verify.errors
        );
        report.check(
            &format!("8. Verify/Health throughput on a PostgreSQL replica, concurrency {c}"),
            verify.throughput() / health.throughput(),
            true,
            0.9,
        );
    }
    drop(replicas);
    Ok(())
}

/// CreateKey at concurrency 64 on one replica, with group commit and with one transaction
/// per write, each on a fresh schema of the same server.
async fn group_commit(
    s: &PgSettings<'_>,
    schemas: &mut Schemas,
    report: &mut Report,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(s.seconds);
    let warmup = Duration::from_secs_f64((s.seconds / 5.0).min(1.0));
    let mut results = Vec::new();
    for (name, label, flags) in [
        (
            "single",
            "one transaction per write (--write-batch-max 1)",
            vec!["--write-batch-max", "1"],
        ),
        (
            "group",
            "group commit (--write-batch-max 256, the default)",
            vec![],
        ),
    ] {
        let url = schemas.fresh(name).await?;
        let (_dir, server) = replica(s, &url, "bench-writer", &flags).await?;
        let channels = load::connect(&server.endpoint, s.connections).await?;
        let r = grpc::create_load(&channels, 64, warmup, duration).await;
        anyhow::ensure!(r.errors == 0, "{} CreateKey calls failed", r.errors);
        results.push((label, r));
    }
    report.section("8. Durable CreateKey at concurrency 64 on PostgreSQL");
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
        "8. Group commit / one transaction per write on PostgreSQL, CreateKey throughput",
        results[1].1.throughput() / results[0].1.throughput(),
        true,
        5.0,
    );
    Ok(())
}

/// Start-up to SERVING (the cache load) at `s.events` keys from PostgreSQL, beside the same
/// log in SQLite; and `kemon-keys rebuild` on each.
async fn startup(
    s: &PgSettings<'_>,
    schemas: &mut Schemas,
    report: &mut Report,
) -> anyhow::Result<()> {
    let runs = s.cold_runs.max(1);
    let url = schemas.fresh("startup").await?;
    let seeding = Instant::now();
    {
        let backend = store::PgBackend::open(&url).await?;
        let session = replay::write_seed(&backend, s.events).await?;
        session.close().await;
        backend.release().await;
    }
    println!(
        "seeded {} events into PostgreSQL in {:.1} s",
        s.events,
        seeding.elapsed().as_secs_f64()
    );
    let pg_rebuild = Runs(vec![replay::run_child(
        s.server_bin,
        &["rebuild", "--database-url", &url],
    )?]);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join(store::DATABASE_FILE);
    replay::seed_events(&path, s.events).await?;
    let data_dir = dir.path().to_str().unwrap_or_default().to_owned();
    let sqlite_rebuild = Runs(vec![replay::run_child(
        s.server_bin,
        &["rebuild", "--data-dir", &data_dir],
    )?]);

    let mut pg_start = Vec::new();
    let mut sqlite_start = Vec::new();
    for _ in 0..runs {
        for (on_pg, into) in [(true, &mut pg_start), (false, &mut sqlite_start)] {
            let load = replay::load();
            let (seconds, peak) = if on_pg {
                let (_dir, server) = replica(s, &url, "bench-start", &[]).await?;
                (server.startup.as_secs_f64(), server.peak_rss_bytes()?)
            } else {
                let server = ServerProcess::start(s.server_bin, dir.path(), &[]).await?;
                (server.startup.as_secs_f64(), server.peak_rss_bytes()?)
            };
            into.push(replay::Run {
                seconds,
                peak_bytes: peak,
                load,
            });
        }
    }
    let (pg_start, sqlite_start) = (Runs(pg_start), Runs(sqlite_start));
    report.section(&format!(
        "8. Start-up and rebuild at {} keys: PostgreSQL beside SQLite",
        s.events
    ));
    report.line(
        "| Path | PostgreSQL, s (runs; load) | peak RSS | SQLite, s (runs; load) | peak RSS |",
    );
    report.line("|---|---|---|---|---|");
    for (label, pg, sqlite) in [
        ("start-up to SERVING (cache load)", &pg_start, &sqlite_start),
        ("`kemon-keys rebuild`", &pg_rebuild, &sqlite_rebuild),
    ] {
        report.line(format!(
            "| {label} | {} | {:.0} MiB | {} | {:.0} MiB |",
            pg.cell(),
            pg.max_peak_mib(),
            sqlite.cell(),
            sqlite.max_peak_mib()
        ));
    }
    Ok(())
}
