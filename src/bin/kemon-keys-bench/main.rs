//! `kemon-keys-bench`: the benchmark harness and load generator. Every target is a ratio
//! against a baseline measured in the same run by the same client; see BENCHMARKS.md.

mod fixtures;
mod grpc;
mod inproc;
mod load;
mod replay;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::key_service_client::KeyServiceClient;

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
    /// 1 and 3: VerifyKey over gRPC against Health/Check, and under writes.
    Verify,
    /// 2: Verify in process against SHA3-256.
    Inproc,
    /// 4: group commit against one transaction per write.
    Writes,
    /// 5 and 6: the cold paths (start-up, rebuild, audit verify and export against the
    /// sqlite3 floor) and memory per key.
    #[value(alias = "cold")]
    Replay,
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
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, value_enum)]
    rpc: Rpc,
    /// The key string to verify (for --rpc verify); without it, one production private key
    /// with `tickets:read` is created first (as an admin) and verified.
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
    if all || args.only == Which::Writes {
        grpc::write_targets(&settings, &mut report).await?;
    }
    if all || args.only == Which::Replay {
        replay::run(args.events, args.cold_runs, &server_bin, &mut report).await?;
    }
    let summary = report.summary();
    report.line(summary);
    if let Some(path) = &args.output {
        std::fs::write(path, &report.markdown)?;
    }
    Ok(!args.check || report.all_passed())
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
    let duration = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs_f64((args.seconds / 5.0).min(1.0));
    let result = match args.rpc {
        Rpc::Health => grpc::health_load(&channels, args.concurrency, warmup, duration).await,
        Rpc::Verify => {
            let key = match args.key.clone() {
                Some(key) => key,
                None => {
                    let seeded = grpc::seed_keys(&channels[..1], 1).await?;
                    seeded
                        .into_iter()
                        .next()
                        .map(|(secret, _)| secret)
                        .unwrap_or_default()
                }
            };
            let key: Arc<str> = Arc::from(key);
            let origin: Arc<str> = Arc::from(args.origin.as_str());
            load::run(
                &channels,
                args.concurrency,
                warmup,
                duration,
                move |channel, _, _| {
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
                },
            )
            .await
        }
        Rpc::Scopes => {
            load::run(
                &channels,
                args.concurrency,
                warmup,
                duration,
                |channel, _, _| async move {
                    KeyServiceClient::new(channel)
                        .list_scopes(pb::ListScopesRequest {})
                        .await
                        .map(|_| ())
                },
            )
            .await
        }
        Rpc::Create => grpc::create_load(&channels, args.concurrency, warmup, duration).await,
    };
    println!(
        "{:?} at concurrency {} over {} connections for {:.1} s: {}",
        args.rpc,
        args.concurrency,
        args.connections,
        args.seconds,
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
