//! The `mailmoat` command: `run`, `check` and `explain`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailmoat::config::{Config, LogFormat};
use mailmoat::inbound::listener::Server;
use mailmoat::telemetry;

/// The exit status for a configuration that cannot be used (invalid, a certificate that
/// does not load, a port that cannot be bound): 64, sysexits.h's EX_USAGE, as STYLE.md
/// asks. (sysexits.h's EX_CONFIG is 78.) `mailmoat check` exits with the same code.
const EX_USAGE: u8 = 64;
const _: () = assert!(EX_USAGE == mailmoat::operator::check::EXIT_CONFIG);

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
    /// Show the dialogue clients see before and after TLS, per listener; or, with
    /// `--domain`, what the outbound relay would do with mail for that domain.
    ///
    /// Runs the real protocol session against the real upstream with a scripted client
    /// (greeting, EHLO / CAPABILITY / CAPA, STARTTLS / STLS, the same again after TLS)
    /// and prints what the upstream said and what the client sees. The TLS handshake
    /// itself is skipped. Binds nothing. Exit 0, 1 when an upstream could not be reached
    /// or answered unexpectedly, 64 when the configuration file is invalid.
    ///
    /// With `--domain D`, like Postfix's posttls-finger: D's MX set and its DNSSEC
    /// status, the TLSA records, the MTA-STS record and policy (the cache is only read),
    /// the policy the relay applies to each MX host, and a STARTTLS probe of the first
    /// MX addresses with the relay's own TLS client, without sending mail. Exit 0 when an
    /// MX would take the mail, 1 when none would, 64 when the configuration has no
    /// `outbound` section or is invalid.
    Explain {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/mailmoat/mailmoat.yaml")]
        config: PathBuf,
        /// A recipient domain: explain the outbound relay's delivery to it instead.
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|err| {
        eprintln!("{err}");
        ExitCode::from(EX_USAGE)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One provider for the whole process, chosen explicitly (ARCHITECTURE.md §6).
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
            let options = mailmoat::operator::check::Options { offline };
            ExitCode::from(runtime.block_on(mailmoat::operator::check::run(&config, options)))
        }
        Command::Explain { config, domain } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            ExitCode::from(runtime.block_on(async {
                match domain {
                    Some(domain) => mailmoat::operator::explain_domain::run(&config, &domain).await,
                    None => mailmoat::operator::explain::run(&config).await,
                }
            }))
        }
        Command::Run { config, log_format } => {
            let config_path = config;
            let config = match load(&config_path) {
                Ok(config) => config,
                Err(code) => return code,
            };
            telemetry::init(
                log_format.unwrap_or(config.log.format),
                config.log.level.as_deref(),
            );
            warn_exposed_keys(&config);
            runtime.block_on(serve(config_path, config))
        }
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP (ARCHITECTURE.md §8).
async fn serve(path: PathBuf, config: Config) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut hangup, mut terminate, mut interrupt) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(hangup), Ok(terminate), Ok(interrupt)) => (hangup, terminate, interrupt),
        _ => {
            eprintln!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut server = match Server::bind(&config).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let outbound = match &config.outbound {
        None => None,
        Some(section) => match mailmoat::outbound::listener::Outbound::bind(section, &config).await
        {
            Ok(outbound) => Some(outbound),
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    if let Some(metrics) = &config.metrics
        && let Err(err) = mailmoat::metrics::start(metrics.listen).await
    {
        eprintln!("metrics: cannot listen on {}: {err}", metrics.listen);
        return ExitCode::from(EX_USAGE);
    }
    mailmoat::metrics::global().set_ready(true);
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&path, &mut server).await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping");
    mailmoat::metrics::global().set_ready(false);
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // A second signal ends the grace period at once.
    let grace = config.timeouts.shutdown_grace;
    let outbound_done = async {
        if let Some(outbound) = outbound {
            outbound.shut_down(grace).await;
        }
    };
    tokio::select! {
        ((), ()) = async { tokio::join!(server.shut_down(), outbound_done) } => {}
        _ = terminate.recv() => tracing::warn!("second signal: exiting without waiting"),
        _ = interrupt.recv() => tracing::warn!("second signal: exiting without waiting"),
    }
    ExitCode::SUCCESS
}

/// SIGHUP: a config that does not load, validate or bind leaves the running one whole.
async fn reload(path: &std::path::Path, server: &mut Server) {
    // systemd's notify-reload protocol: RELOADING=1 with the time, then READY=1.
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    notify_systemd(&reloading);
    let result = match Config::from_file(path) {
        Ok(config) => {
            warn_exposed_keys(&config);
            server.reload(&config).await.map_err(|err| err.to_string())
        }
        Err(err) => Err(err.to_string()),
    };
    match result {
        Ok(reloaded) => tracing::info!(
            event = "config_reloaded",
            added = ?reloaded.added,
            removed = ?reloaded.removed,
            updated = ?reloaded.updated,
            "configuration reloaded"
        ),
        Err(err) => tracing::error!(
            event = "config_reload_failed",
            error = %err,
            "configuration not reloaded; the running one stays"
        ),
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
}

/// A private key that others can read is served all the same (refusing it would take the
/// mail service down over a file mode), but said at every start and reload.
fn warn_exposed_keys(config: &Config) {
    for pair in &config.tls.certificates {
        if let Some(exposure) = mailmoat::operator::check::certificates::key_exposure(&pair.key) {
            tracing::warn!(
                key = %pair.key.display(),
                mode = %format!("{:04o}", exposure.mode),
                readers = %exposure.readers,
                advice = mailmoat::operator::check::certificates::KEY_ADVICE,
                "private key readable by others than mailmoat"
            );
        }
    }
}

/// Tells systemd (Type=notify) about readiness; a no-op outside systemd.
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!(%err, "sd_notify failed");
    }
}
