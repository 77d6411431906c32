//! `shoal-agent`: command line, logging, and the process lifecycle.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_agent::agent::Agent;
use shoal_agent::config::{LogFormat, RunArgs};
use shoal_agent::containerd_config::{self, ContainerdConfigArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "shoal-agent",
    version,
    about = "Shoal node agent: a peer-to-peer registry mirror for containerd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (registry mirror, cache, metrics).
    Run(Box<RunArgs>),
    /// Write (or with --restore, remove) containerd hosts.toml files that use this agent.
    ContainerdConfig(ContainerdConfigArgs),
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("shoal-agent: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result: anyhow::Result<()> = runtime.block_on(async move {
                let config = args.into_config()?;
                let agent = Agent::start(config).await?;
                agent.run(shutdown_signal()).await?;
                Ok(())
            });
            // `run` waited for every task within the grace period; what is left (a client
            // connection that would not close) is cut here instead of holding the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Each error's message already names its cause.
                    eprintln!("shoal-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ContainerdConfig(args) => {
            init_logging(LogFormat::Text);
            match containerd_config::run(&args) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("shoal-agent containerd-config: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
