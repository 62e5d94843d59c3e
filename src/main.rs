use std::process::ExitCode;

use clap::Parser;
use kemon_keys::app::{self, Application, Settings};
use kemon_keys::clock::SystemClock;
use kemon_keys::config::{Cli, Commands, LogFormat};
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Commands::Serve(args) => args.log_format,
        Commands::Rebuild(_) => LogFormat::Text,
    };
    app::init_tracing(format);
    let result = match cli.command {
        Commands::Serve(args) => serve(Settings::from_args(&args)).await,
        Commands::Rebuild(args) => app::rebuild(&args.data_dir).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kemon-keys: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings, Arc::new(SystemClock)).await?;
    app.run_until(app::shutdown_signal()).await
}
