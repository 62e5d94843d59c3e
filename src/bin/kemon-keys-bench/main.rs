//! `kemon-keys-bench`: the benchmark harness and load generator. Every target is a ratio
//! against a baseline measured in the same run by the same client; see BENCHMARKS.md.

mod check;
mod envoy;
mod fixtures;
mod grpc;
mod inproc;
mod load;
mod replay;
mod replicas;
mod report;
mod server;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

use report::Report;

#[derive(Debug, Parser)]
#[command(
    name = "kemon-keys-bench",
    about = "Benchmarks and load generator for kemon-keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the targets and print the figures as Markdown.
    Targets(TargetArgs),
    /// Load a running server: throughput and latency percentiles of one RPC.
    Load(LoadArgs),
    /// What Envoy's ext_authz adds to an HTTP request: wrk through Envoy with the shipped
    /// sidecar config, against the same Envoy without the filter and the upstream alone
    /// (needs Envoy and wrk: scripts/bench-envoy installs and finds them).
    Envoy(EnvoyArgs),
    /// Write a database of N KeyCreated events (no projection: run `kemon-keys rebuild`),
    /// for measurements of your own.
    Seed {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Data directory to create the database in (must not hold one yet).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    /// 1, 7 and 3: VerifyKey and Envoy's Check over gRPC against Health/Check, and
    /// VerifyKey under writes.
    Verify,
    /// 7 alone: Envoy's ext_authz Check against Health/Check.
    Check,
    /// 2: Verify in process against SHA3-256.
    Inproc,
    /// 4: group commit against one transaction per write.
    Writes,
    /// 5 and 6: the cold paths (start-up, rebuild, audit verify and export against the
    /// sqlite3 floor) and memory per key.
    #[value(alias = "cold")]
    Replay,
    /// 8: several replicas on PostgreSQL (needs --database-url): revocation reaching every
    /// replica, Verify on a replica, group commit and start-up on PostgreSQL.
    Replicas,
}

#[derive(Debug, clap::Args)]
struct TargetArgs {
    /// Which targets to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    only: Which,
    /// Exit non-zero when a target is missed.
    #[arg(long)]
    check: bool,
    /// Seconds per measured load run (after a warm-up of a fifth of it, at most 1 s).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Keys loaded for the Verify targets.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Events (and keys) for the cold-path and memory targets.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Runs of each cold path (start-up, rebuild, verify); the median is checked.
    #[arg(long, default_value_t = 3)]
    cold_runs: usize,
    /// HTTP/2 connections the client spreads its calls over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Writes per second (CreateKey and RevokeKey in turn) alongside Verify for target 3.
    #[arg(long, default_value_t = 100.0)]
    write_rate: f64,
    /// Concurrency levels for target 1.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Pin the servers this harness starts to these CPUs (`taskset -c` syntax, e.g. `1`),
    /// and run the harness itself elsewhere (`taskset -c 0 kemon-keys-bench …`), so client
    /// and server do not preempt each other. Needs `taskset` (util-linux).
    #[arg(long)]
    server_cpus: Option<String>,
    /// The server binary; by default the `kemon-keys` next to this program.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// A PostgreSQL database for target 8 (which runs only with it), e.g.
    /// `postgres://postgres@127.0.0.1:5432/test`; the bench makes and drops `kkbench_*`
    /// schemas in it.
    #[arg(long, env = "KEMON_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Revocations timed across the replicas in target 8.
    #[arg(long, default_value_t = 400)]
    revocations: usize,
}

#[derive(Debug, clap::Args)]
struct EnvoyArgs {
    /// The Envoy binary.
    #[arg(long, env = "KEMON_ENVOY")]
    envoy: PathBuf,
    /// The wrk binary (HTTP/1.1 load generator).
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// The sidecar config measured; its ports are swapped for free loopback ones.
    #[arg(long, default_value = "deploy/envoy/envoy.yaml")]
    config: PathBuf,
    /// Connections wrk keeps busy (one request in flight on each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per wrk run (whole seconds).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds per setup and concurrency, the setups taking turns.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Worker threads of each Envoy (its --concurrency; Istio's sidecars run 2).
    #[arg(long, default_value_t = 2)]
    envoy_workers: usize,
    /// The server binary; by default the `kemon-keys` next to this program.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rpc {
    /// grpc.health.v1.Health/Check
    Health,
    /// VerifyKey with --key
    Verify,
    /// CreateKey (private production keys with tickets:read and tickets:write, across 100
    /// workspaces)
    Create,
    /// ListScopes: a handler that touches no key, with a response larger than Verify's
    Scopes,
    /// Envoy's ext_authz Check (`envoy.service.auth.v3.Authorization/Check`) of a request
    /// carrying --key as `x-api-key`, on a route requiring `tickets:read`
    Check,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, value_enum)]
    rpc: Rpc,
    /// The key string to verify (for --rpc verify and check); without it, one production
    /// private key with `tickets:read` is created first (as an admin), printed on stderr, and
    /// verified.
    #[arg(long)]
    key: Option<String>,
    /// Origin sent with VerifyKey.
    #[arg(long, default_value = "")]
    origin: String,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Make exactly this many calls (spread over the callers, no warm-up) instead of running
    /// for --seconds: for instruction-count profiles of the server (callgrind).
    #[arg(long, conflicts_with = "seconds")]
    calls: Option<u64>,
}

/// The same allocator as the `kemon-keys` binary, so in-process measurements (rebuild,
/// cache load, Verify) run as they do in the server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kemon-keys-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Targets(args) => targets(args).await,
        Command::Load(args) => load(args).await.map(|()| true),
        Command::Envoy(args) => envoy(args).await.map(|()| true),
        Command::Seed { events, data_dir } => {
            let path = data_dir.join(kemon_keys::store::DATABASE_FILE);
            anyhow::ensure!(!path.exists(), "{} exists already", path.display());
            std::fs::create_dir_all(&data_dir)?;
            replay::seed_events(&path, events).await?;
            println!("seeded {events} events into {}", path.display());
            Ok(true)
        }
    }
}

async fn targets(args: TargetArgs) -> anyhow::Result<bool> {
    let server_bin = args
        .server_bin
        .clone()
        .unwrap_or_else(server::default_server_bin);
    if let Some(cpus) = &args.server_cpus {
        let _ = server::SERVER_CPUS.set(cpus.clone());
    }
    let mut report = Report::default();
    report.line(format!(
        "Run on {} logical CPUs, {}, {}, load average {} at the start{}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        machine(),
        date(),
        replay::load(),
        args.server_cpus
            .as_ref()
            .map_or_else(String::new, |c| format!("; servers pinned to CPU {c}"))
    ));
    let settings = grpc::GrpcSettings {
        server_bin: &server_bin,
        keys: args.keys,
        seconds: args.seconds,
        concurrency: &args.concurrency,
        connections: args.connections,
        write_rate: args.write_rate,
    };
    let all = args.only == Which::All;
    if all || args.only == Which::Inproc {
        inproc::run(args.keys, 1_000_000, &mut report);
    }
    if all || args.only == Which::Verify {
        grpc::verify_targets(&settings, &mut report).await?;
    }
    if args.only == Which::Check {
        grpc::check_targets(&settings, &mut report).await?;
    }
    if all || args.only == Which::Writes {
        grpc::write_targets(&settings, &mut report).await?;
    }
    if all || args.only == Which::Replay {
        replay::run(args.events, args.cold_runs, &server_bin, &mut report).await?;
    }
    if all || args.only == Which::Replicas {
        match &args.database_url {
            Some(database_url) => {
                let settings = replicas::PgSettings {
                    server_bin: &server_bin,
                    database_url,
                    keys: args.keys,
                    events: args.events,
                    cold_runs: args.cold_runs,
                    seconds: args.seconds,
                    concurrency: &args.concurrency,
                    connections: args.connections,
                    write_rate: args.write_rate,
                    revocations: args.revocations,
                };
                replicas::run(&settings, &mut report).await?;
            }
            None if args.only == Which::Replicas => {
                anyhow::bail!("target 8 needs --database-url (a PostgreSQL database)")
            }
            None => report.line(
                "
Target 8 (PostgreSQL replicas) not run: no --database-url.",
            ),
        }
    }
    let summary = report.summary();
    report.line(summary);
    if let Some(path) = &args.output {
        std::fs::write(path, &report.markdown)?;
    }
    Ok(!args.check || report.all_passed())
}

async fn envoy(args: EnvoyArgs) -> anyhow::Result<()> {
    let server_bin = args
        .server_bin
        .clone()
        .unwrap_or_else(server::default_server_bin);
    let mut report = Report::default();
    report.line(format!(
        "Run on {} logical CPUs, {}, {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        machine(),
        date()
    ));
    let settings = envoy::EnvoySettings {
        server_bin: &server_bin,
        envoy_bin: &args.envoy,
        wrk_bin: &args.wrk,
        config: &args.config,
        concurrency: &args.concurrency,
        seconds: args.seconds,
        rounds: args.rounds.max(1),
        envoy_workers: args.envoy_workers,
    };
    envoy::run(&settings, &mut report).await?;
    if let Some(path) = &args.output {
        std::fs::write(path, &report.markdown)?;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB RAM", kb as f64 / 1048576.0)
        });
    format!("{cpu}{mem}")
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown date".into(), |s| s.trim().to_owned())
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let channels = load::connect(&args.addr, args.connections).await?;
    let result = match args.rpc {
        Rpc::Health => drive(&args, &channels, |channel, _, _| grpc::health_call(channel)).await,
        Rpc::Verify => {
            let key: Arc<str> = Arc::from(key_to_verify(&args, &channels).await?);
            let origin: Arc<str> = Arc::from(args.origin.as_str());
            drive(&args, &channels, move |channel, _, _| {
                let (key, origin) = (key.clone(), origin.clone());
                async move {
                    KeyServiceClient::new(channel)
                        .verify_key(pb::VerifyKeyRequest {
                            key: key.to_string(),
                            required_scopes: vec![],
                            origin: origin.to_string(),
                        })
                        .await
                        .and_then(|r| {
                            // A MALFORMED or NOT_FOUND answer is fast and measures
                            // nothing: count it as a failure, not a success.
                            let r = r.into_inner();
                            r.valid.then_some(()).ok_or_else(|| {
                                tonic::Status::failed_precondition(format!(
                                    "verdict {} is not VALID",
                                    r.code
                                ))
                            })
                        })
                }
            })
            .await
        }
        Rpc::Check => {
            let request = check::encoded_request(&key_to_verify(&args, &channels).await?);
            drive(&args, &channels, move |channel, _, _| {
                check::call(channel, request.clone())
            })
            .await
        }
        Rpc::Scopes => {
            drive(&args, &channels, |channel, _, _| async move {
                KeyServiceClient::new(channel)
                    .list_scopes(pb::ListScopesRequest {})
                    .await
                    .map(|_| ())
            })
            .await
        }
        Rpc::Create => drive(&args, &channels, grpc::create_call).await,
    };
    let length = match args.calls {
        Some(calls) => format!("{calls} calls in {:.1} s", result.elapsed.as_secs_f64()),
        None => format!("{:.1} s", args.seconds),
    };
    println!(
        "{:?} at concurrency {} over {} connections for {length}: {}",
        args.rpc,
        args.concurrency,
        args.connections,
        result.summary()
    );
    // A run whose calls failed (the server died, or Verify did not say VALID) measured
    // something else than it claims: fail it.
    anyhow::ensure!(
        result.errors == 0 && result.calls > 0,
        "{} of {} calls failed",
        result.errors,
        result.calls + result.errors
    );
    Ok(())
}

/// Runs `call` for `--seconds` after a warm-up, or exactly `--calls` times.
async fn drive<F, Fut>(args: &LoadArgs, channels: &[Channel], call: F) -> load::LoadResult
where
    F: Fn(Channel, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    match args.calls {
        Some(calls) => load::run_count(channels, args.concurrency, calls, call).await,
        None => {
            let duration = Duration::from_secs_f64(args.seconds);
            let warmup = Duration::from_secs_f64((args.seconds / 5.0).min(1.0));
            load::run(channels, args.concurrency, warmup, duration, call).await
        }
    }
}

/// `--key`, or else a production private key with `tickets:read` created (as an admin) for
/// this run. A created key is printed on stderr, so that further runs (and other load tools)
/// can use it: it only ever exists on a benchmark's server.
async fn key_to_verify(args: &LoadArgs, channels: &[Channel]) -> anyhow::Result<String> {
    if let Some(key) = &args.key {
        return Ok(key.clone());
    }
    let seeded = grpc::seed_keys(&channels[..1], 1).await?;
    let (secret, key_id) = seeded.into_iter().next().unwrap_or_default();
    eprintln!("created {key_id} for this run: --key {secret}");
    Ok(secret)
}
