//! The `mailmoat` command: `run`, `check` and `explain`.

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
    /// Check the configuration, certificates and upstreams, like `nginx -t`.
    ///
    /// Checks the configuration, the certificates (key matches, validity, expiry within
    /// 30 days, names) and each listener's upstream (reachable, speaking the listener's
    /// protocol, and for SMTP not an open relay for the address mailmoat connects from).
    /// Binds nothing. Prints every problem as `error:` / `warning:` with its YAML line,
    /// then a summary. Exit 0 when there is no error (warnings allowed), 1 when a
    /// certificate or upstream check failed, 64 when the configuration file is invalid.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/mailmoat/mailmoat.yaml")]
        config: PathBuf,
        /// Do not connect to the upstreams: check the configuration and certificates only.
        #[arg(long)]
        offline: bool,
    },
    /// Show the dialogue clients see before and after TLS, per listener.
    ///
    /// Runs the real protocol session against the real upstream with a scripted client
    /// (greeting, EHLO / CAPABILITY / CAPA, STARTTLS / STLS, the same again after TLS)
    /// and prints what the upstream said and what the client sees. The TLS handshake
    /// itself is skipped. Binds nothing. Exit 0, 1 when an upstream could not be reached
    /// or answered unexpectedly, 64 when the configuration file is invalid.
    Explain {
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
        Command::Check { config, offline } => {
            // Binding would clash with a running instance: nothing is bound.
            let options = mailmoat::check::Options { offline };
            ExitCode::from(runtime.block_on(mailmoat::check::run(&config, options)))
        }
        Command::Explain { config } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            ExitCode::from(runtime.block_on(mailmoat::explain::run(&config)))
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
                let (stop, stopped) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stopping");
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
