use std::process::ExitCode;

use clap::Parser;
use kemon_keys::app::{self, Application, Settings};
use kemon_keys::audit;
use kemon_keys::clock::SystemClock;
use kemon_keys::config::{AuditCommand, Cli, Commands, LogFormat};
use std::sync::Arc;

/// mimalloc instead of glibc's allocator: a rebuild of 1M events spent 30% of its time in
/// glibc's malloc (bin consolidation under many small frees); see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Commands::Serve(args) => args.log_format,
        Commands::Rebuild(_) | Commands::Audit(_) => LogFormat::Text,
    };
    let serving = matches!(cli.command, Commands::Serve(_));
    let tracing = match app::init_tracing(format, serving) {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("kemon-keys: starting telemetry: {}", describe(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Commands::Serve(args) => serve(Settings::from_args(&args)).await,
        Commands::Rebuild(args) => app::rebuild(&args).await,
        Commands::Audit(AuditCommand::Verify(args)) => match audit::cli::verify(&args).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Commands::Audit(AuditCommand::Export(args)) => audit::cli::export(&args).await,
        Commands::Audit(AuditCommand::Keys(args)) => audit::cli::keys_as_of(&args).await,
    };
    // Spans still buffered go out before the process does.
    if let Some(tracing) = tracing {
        tracing.shutdown().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: a server's failure as a log line (JSON where logs are JSON), a command's
            // as one line for the person who ran it.
            let error = describe(&e);
            if serving {
                tracing::error!(error, "kemon-keys failed");
            } else {
                eprintln!("kemon-keys: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each once: some errors (tonic's transport errors among them)
/// repeat their source in their own message, and `{:#}` would print it twice.
fn describe(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings, Arc::new(SystemClock)).await?;
    app.run_until(app::shutdown_signal()).await
}
