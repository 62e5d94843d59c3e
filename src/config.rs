//! Command line and environment settings. Every flag is also an environment variable; the
//! doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kemon-keys",
    version,
    about = "API key service for Kemon workspaces"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Rebuild the `keys` projection from the event log alone. For SQLite, run it with the
    /// server stopped; for PostgreSQL, writers wait while it runs.
    Rebuild(RebuildArgs),
    /// Auditors' tools: verify, export and inspect the event log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a log: both hash chains, a replay through the service's own fold, and (for a
    /// database) the stored `keys` table. Prints the first bad sequence and why; exits 1 on
    /// any failure.
    Verify(VerifyArgs),
    /// Write the log as newline-delimited JSON (format in README and src/audit/export.rs).
    Export(ExportArgs),
    /// Show a workspace's keys as they were right after a given sequence.
    Keys(KeysAsOfArgs),
}

/// Where to read a log from: exactly one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct LogSource {
    /// A kemon-keys SQLite database file (opened read-only).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// A kemon-keys PostgreSQL database, e.g. postgres://host/db (read in one snapshot).
    #[arg(long)]
    pub database_url: Option<String>,
    /// A running server, e.g. http://127.0.0.1:50051 (reads through AuditService).
    #[arg(long)]
    pub server: Option<String>,
    /// An export file written by `kemon-keys audit export`.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

/// Who the audit tools act as when reading from a server.
#[derive(Debug, Clone, Args)]
pub struct AuditActor {
    /// Sent as x-kemon-actor.
    #[arg(long, env = "KEMON_AUDIT_ACTOR", default_value = "audit-cli")]
    pub actor: String,
    /// Sent as x-kemon-role.
    #[arg(long, env = "KEMON_AUDIT_ROLE", default_value = "auditor")]
    pub role: String,
    /// With --server over TLS (https://…): the CA certificate (PEM) the server's certificate
    /// chains to; the system's roots are not used.
    #[arg(long, env = "KEMON_AUDIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The client certificate (PEM) for a server with mutual TLS.
    #[arg(long, env = "KEMON_AUDIT_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "KEMON_AUDIT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A signed role assertion, sent as x-kemon-assertion, for a caller whose policy requires
    /// one.
    #[arg(long, env = "KEMON_AUDIT_ASSERTION", hide_env_values = true)]
    pub assertion: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: LogSource,
    /// Check one workspace's chain only (implied by a workspace export).
    #[arg(long)]
    pub workspace: Option<String>,
    /// A head kept elsewhere, `SEQ:HASH` (from GetLogHead, or a previous verify): the log
    /// must reach SEQ with exactly HASH there. Catches a tail rewritten with recomputed
    /// hashes. For a workspace, the workspace chain's head.
    #[arg(long)]
    pub expect_head: Option<String>,
    #[command(flatten)]
    pub fold: FoldArgs,
    #[command(flatten)]
    pub actor: AuditActor,
}

/// How much of a replay of the whole log stays in memory (`rebuild`, `audit verify`).
#[derive(Debug, Clone, Args)]
pub struct FoldArgs {
    /// Key states to hold in memory while replaying the log, about 200 bytes each. A log with
    /// more keys (for `rebuild`, more events) is replayed in 128 parts through temporary
    /// files, each part's keys in memory in turn: memory stays near this bound up to 128 times
    /// as many keys, and grows by a 128th of the keys past that.
    #[arg(long, env = "KEMON_KEYS_IN_MEMORY", default_value_t = crate::log::spill::DEFAULT_KEYS_IN_MEMORY)]
    pub keys_in_memory: usize,
    /// Directory for those temporary files (they are unlinked as soon as made, so nothing is
    /// left behind). Default: the database's directory for `rebuild` on SQLite, the system's
    /// temporary directory (TMPDIR) otherwise. Where that is a memory file system (tmpfs),
    /// name a directory on disk: files in memory would bound nothing.
    #[arg(long, env = "KEMON_TEMP_DIR")]
    pub temp_dir: Option<PathBuf>,
}

impl FoldArgs {
    pub fn limits(&self) -> crate::log::spill::FoldLimits {
        crate::log::spill::FoldLimits {
            keys_in_memory: self.keys_in_memory,
            temp_dir: self.temp_dir.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub source: LogSource,
    /// Export only this workspace's events (verifiable on their own by the workspace chain).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Output file; standard output when absent.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub actor: AuditActor,
}

#[derive(Debug, Clone, Args)]
pub struct KeysAsOfArgs {
    #[command(flatten)]
    pub source: LogSource,
    #[arg(long)]
    pub workspace: String,
    /// The sequence to stop after, as GetKeysAsOf's `at_sequence`: absent or 0 means the end
    /// of the log; a sequence past the end is refused.
    #[arg(long)]
    pub at: Option<u64>,
    #[command(flatten)]
    pub actor: AuditActor,
}

#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Directory holding the SQLite database (and, in development, the generated master key).
    #[arg(long, env = "KEMON_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// A PostgreSQL database instead of SQLite, e.g. `postgres://user@host/db`, for several
    /// replicas sharing one log. The schema is the connection's `search_path` (set it with
    /// `?options[search_path]=kemon`); migrations run at start. The data directory then
    /// holds only a development master key, if any.
    #[arg(long, env = "KEMON_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub fold: FoldArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC, `host:port`: an IP address or a host name such as
    /// `localhost:50051`. Port 0 picks a free port. Without TLS, only loopback addresses (see
    /// --insecure-plaintext).
    #[arg(long, env = "KEMON_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    #[command(flatten)]
    pub data: DataArgs,

    /// The master key that encrypts revealable private keys: 64 hex characters (32 bytes).
    /// Prefer KEMON_MASTER_KEY_FILE in production; without either, a development key is
    /// generated into the data directory.
    #[arg(
        long,
        env = "KEMON_MASTER_KEY",
        hide_env_values = true,
        conflicts_with = "master_key_file"
    )]
    pub master_key: Option<String>,

    /// File holding the master key as 64 hex characters.
    #[arg(long, env = "KEMON_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// Most writes committed together in one transaction (group commit).
    #[arg(long, env = "KEMON_WRITE_BATCH_MAX", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub write_batch_max: u16,

    /// Committed events buffered for live audit subscribers. A subscriber that falls further
    /// behind is told so (`fell_behind`) and catches up by paging from the database.
    #[arg(long, env = "KEMON_AUDIT_LIVE_BUFFER", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_live_buffer: u32,

    /// A quota on the database's size, in MiB: past it writes answer RESOURCE_EXHAUSTED
    /// (STORAGE_FULL) and nothing is written, while VerifyKey and reads go on. Keeps the log
    /// from filling a volume it shares. None by default.
    #[arg(long, env = "KEMON_MAX_DATABASE_MIB", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_database_mib: Option<u32>,

    /// Most client connections open at once; further clients wait in the kernel's accept
    /// queue until one closes.
    #[arg(long, env = "KEMON_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most concurrent calls on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "KEMON_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// Seconds a connection may stay open with no call in flight before it is closed.
    #[arg(long, env = "KEMON_IDLE_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// Seconds a new connection may take to send its first bytes before it is closed.
    #[arg(long, env = "KEMON_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_secs: u64,

    /// Seconds a call may take, receiving its request included, before it is cancelled
    /// (streams the server sends, such as SubscribeEvents, are not cut).
    #[arg(long, env = "KEMON_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,

    /// The header Envoy's ext_authz Check reads an API key from when there is no
    /// `authorization: Bearer` header.
    #[arg(
        long,
        env = "KEMON_EXT_AUTHZ_API_KEY_HEADER",
        default_value = "x-api-key"
    )]
    pub ext_authz_api_key_header: String,

    /// With PostgreSQL: how long a replica may go without confirming it has applied every
    /// committed change before it reports NOT_SERVING and answers VerifyKey and Check with
    /// UNAVAILABLE (`REPLICA_STALE`), so that sidecars move to a healthy replica. A duration
    /// such as `5s` or `500ms`.
    #[arg(long, env = "KEMON_MAX_STALENESS", default_value = "5s", value_parser = parse_duration)]
    pub max_staleness: std::time::Duration,

    /// With PostgreSQL: this replica's name among the live replicas (RevokeKey's
    /// confirmation counts them). Defaults to the host name (the pod name in Kubernetes),
    /// else a random id.
    #[arg(long, env = "KEMON_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Log line format.
    #[arg(long, env = "KEMON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve gRPC over TLS with this certificate chain (PEM, leaf first). Reloaded when the
    /// file changes.
    #[arg(long, env = "KEMON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM). Reloaded when the file changes.
    #[arg(long, env = "KEMON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate chained to these CA certificates (PEM).
    /// Their identity (URI SAN, else DNS SAN) is checked against --policy. Reloaded when the
    /// file changes.
    #[arg(long, env = "KEMON_CLIENT_CA", requires_all = ["tls_cert", "policy"])]
    pub client_ca: Option<PathBuf>,

    /// The access policy (TOML): which client identities may use the verify, manage and audit
    /// surfaces, with which roles, and whether they must send signed role assertions.
    /// Reloaded when the file changes.
    #[arg(long, env = "KEMON_POLICY", requires = "client_ca")]
    pub policy: Option<PathBuf>,

    /// The JWKS (Ed25519 or P-256 keys) that signed role assertions (`x-kemon-assertion`) are
    /// checked with. Reloaded when the file changes.
    #[arg(long, env = "KEMON_ASSERTION_JWKS", requires = "policy")]
    pub assertion_jwks: Option<PathBuf>,

    /// The audience (`aud`) a role assertion must name.
    #[arg(long, env = "KEMON_ASSERTION_AUDIENCE", default_value = "kemon-keys")]
    pub assertion_audience: String,

    /// The issuer (`iss`) a role assertion must name; any when unset.
    #[arg(long, env = "KEMON_ASSERTION_ISSUER")]
    pub assertion_issuer: Option<String>,

    /// Serve plaintext gRPC on a non-loopback --listen address. Without TLS, anyone who can
    /// reach the port can manage every key: for isolated test networks only.
    #[arg(long, env = "KEMON_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,

    /// Seconds between checks of the certificate, key, client CA, policy and JWKS files for
    /// changes.
    #[arg(long, env = "KEMON_RELOAD_INTERVAL_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub reload_interval_secs: u64,

    /// A second, plaintext listener (`host:port`) for probes that cannot present client
    /// certificates (kubelet) and for Prometheus: gRPC health, and the metrics as Prometheus
    /// text on `GET /metrics`. Nothing on it changes or reveals keys.
    #[arg(long, env = "KEMON_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Count every call in the metrics (by method, code and verify code). `false` only to
    /// measure what counting costs: the RPC series then stay empty.
    #[arg(long, env = "KEMON_CALL_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub call_metrics: bool,
}

/// Parses `250ms`, `5s`, `2m`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 5s or 500ms"))?;
    let duration = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    if duration.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_take_a_whole_number_and_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "5", "s", "1.5s", "-1s", "0s", "5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
