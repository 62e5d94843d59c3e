//! Command line and environment settings. Every flag is also an environment variable; the
//! doc comments are the `--help` text.

use std::net::SocketAddr;
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
    /// Rebuild the `keys` projection from the event log alone. Run it with the server stopped.
    Rebuild(DataArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Directory holding the SQLite database (and, in development, the generated master key).
    #[arg(long, env = "KEMON_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC (plaintext HTTP/2). Port 0 picks a free port.
    #[arg(long, env = "KEMON_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

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

    /// Log line format.
    #[arg(long, env = "KEMON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
