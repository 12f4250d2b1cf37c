//! The `mailmoat` command: `run` and `check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailmoat::config::{Config, LogFormat};
use mailmoat::listener::Server;
use mailmoat::telemetry;

/// sysexits.h EX_CONFIG... EX_USAGE (64) is what the issue asks for a bad config.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(version, about = "A TLS moat for legacy mail servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every configured listener.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/mailmoat/mailmoat.yaml")]
        config: PathBuf,
        /// Log format (overrides the config file).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate the configuration and load the certificates, then exit.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/mailmoat/mailmoat.yaml")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|err| {
        eprintln!("{err}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One provider for the whole process, chosen explicitly (DESIGN §6).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Check { config } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            // Binding would clash with a running instance; load certificates only.
            let provider = mailmoat::tls::provider();
            match mailmoat::tls::SniResolver::load(&config.tls, &provider) {
                Ok(_) => {
                    println!("configuration ok: {} listener(s)", config.listeners.len());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("tls: {err}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Run { config, log_format } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            telemetry::init(
                log_format.unwrap_or(config.log.format),
                config.log.level.as_deref(),
            );
            runtime.block_on(async {
                let server = match Server::bind(&config).await {
                    Ok(server) => server,
                    Err(err) => {
                        eprintln!("{err}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                if let Some(metrics) = &config.metrics
                    && let Err(err) = mailmoat::metrics::start(metrics.listen).await
                {
                    eprintln!("metrics: cannot listen on {}: {err}", metrics.listen);
                    return ExitCode::from(EXIT_CONFIG);
                }
                mailmoat::metrics::global().set_ready(true);
                let (stop, stopped) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stopping");
                    mailmoat::metrics::global().set_ready(false);
                    let _ = stop.send(true);
                });
                server.run(stopped).await;
                ExitCode::SUCCESS
            })
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
