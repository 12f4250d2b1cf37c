//! Logging set-up and the security events (DESIGN §8).
//!
//! Every event is one `tracing` record with a stable `event` field, inside the session's
//! span (session id, listener, client address). Nothing the client typed reaches a log
//! line except through [`crate::proto::Event`]'s vetted fields.

use tracing::warn;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::proto::Event;

/// Installs the global subscriber: `format`, and `level` unless `RUST_LOG` is set.
pub fn init(format: LogFormat, level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// Logs one security event.
pub fn record(event: &Event) {
    let name = event.name();
    match event {
        Event::PlaintextCommandRefused { verb } => {
            warn!(event = name, verb, "command refused before tls")
        }
        Event::CredentialsExposed {
            mechanism,
            user_hash,
        } => warn!(
            event = name,
            mechanism = %mechanism,
            user_hash = user_hash.as_deref().unwrap_or("unknown"),
            "credentials sent in plaintext (not forwarded)"
        ),
        Event::StarttlsInjection { bytes } => {
            warn!(event = name, bytes, "bytes queued behind starttls")
        }
        Event::StarttlsStrippingSuspected { reason } => {
            warn!(event = name, reason, "starttls stripping suspected")
        }
        Event::ForbiddenCommand { verb } => warn!(event = name, verb, "forbidden command refused"),
        Event::BareNewlineNormalized { count } => {
            warn!(event = name, count, "bare cr or lf in message body")
        }
        Event::LimitExceeded { limit } => warn!(event = name, limit, "limit exceeded"),
        Event::UpstreamProtocolError { detail } => {
            warn!(event = name, detail, "upstream protocol error")
        }
        Event::XclientUnavailable { reason } => warn!(
            event = name,
            reason, "xclient unavailable: the upstream sees mailmoat's address"
        ),
        Event::UpstreamPreauth => {
            tracing::error!(
                event = name,
                "upstream greeted with PREAUTH: login cannot be enforced"
            )
        }
    }
}
