//! Logging set-up and the security events (ARCHITECTURE.md §8).
//!
//! Every event is one `tracing` record with a stable `event` field, inside the session's
//! span (session id, listener, client address). Nothing the client typed reaches a log
//! line except through [`crate::proto::Event`]'s vetted fields.
//!
//! Every event is also counted in [`crate::metrics`], by the same call that logs it, so
//! logs and metrics cannot disagree: [`record`] for session events, `security_event!`
//! for those the driver sees, [`connection_refused`] for the listener's limits.

use tracing::warn;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::metrics::ListenerMetrics;
use crate::proto::Event;

/// Logs a security event at `level` with an `event` field and counts it:
/// `security_event!(metrics, warn, "upstream_unavailable", %err, "upstream unavailable")`.
macro_rules! security_event {
    ($metrics:expr, $level:ident, $name:literal, $($fields:tt)+) => {{
        $metrics.event($name);
        tracing::$level!(event = $name, $($fields)+);
    }};
}
pub(crate) use security_event;

/// A new connection refused because `limit` (a connection cap) is reached: logged and
/// counted as `limit_exceeded`.
pub fn connection_refused(
    metrics: &ListenerMetrics,
    limit: &'static str,
    client: std::net::SocketAddr,
) {
    metrics.limit_exceeded(limit);
    security_event!(metrics, warn, "limit_exceeded", limit, %client, listener = metrics.listener(), "connection refused");
}

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

/// Logs and counts one security event of a session.
pub fn record(event: &Event, metrics: &ListenerMetrics) {
    let name = event.name();
    metrics.event(name);
    if let Event::LimitExceeded { limit } = event {
        metrics.limit_exceeded(limit);
    }
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
        Event::SmugglingNeutralized { count } => warn!(
            event = name,
            count, "body lines rewritten so that no upstream reads them as the end of data"
        ),
        Event::LimitExceeded { limit } => warn!(event = name, limit, "limit exceeded"),
        Event::UpstreamProtocolError { detail } => {
            warn!(event = name, detail, "upstream protocol error")
        }
        Event::XclientUnavailable { reason } => warn!(
            event = name,
            reason, "xclient unavailable: session refused with 421"
        ),
        Event::ExemptPlaintextSession => warn!(
            event = name,
            "plaintext session from an exempt network: relayed unchanged"
        ),
        Event::OutboundDelivery(delivery) => {
            crate::metrics::global().outbound_delivery(
                delivery.policy,
                delivery.result,
                delivery.tls,
            );
            let code = delivery
                .code
                .map_or_else(|| "none".to_owned(), |code| code.to_string());
            let detail = delivery.tls_detail.as_ref();
            tracing::info!(
                event = name,
                domain = %delivery.domain,
                mx = %delivery.mx,
                policy = delivery.policy,
                tls = delivery.tls,
                tls_version = detail.map_or("none", |d| d.version.as_str()),
                tls_cipher = detail.map_or("none", |d| d.cipher.as_str()),
                verified = detail.is_some_and(|d| d.verified),
                tls_failure = detail.and_then(|d| d.failure).unwrap_or("none"),
                result = delivery.result,
                code = %code,
                "outbound delivery"
            )
        }
        Event::OutboundPlaintext(plaintext) => warn!(
            event = name,
            domain = %plaintext.domain,
            mx = %plaintext.mx,
            policy = plaintext.policy,
            reason = plaintext.reason,
            "outbound delivery without tls"
        ),
        Event::OutboundMxFailed(given_up) => warn!(
            event = name,
            domain = %given_up.domain,
            mx = %given_up.mx,
            reason = given_up.failure.reason(),
            result_type = given_up.failure.rfc8460_result_type().unwrap_or("none"),
            detail = %given_up.failure.detail(),
            "mx given up"
        ),
        Event::UpstreamPreauth => {
            tracing::error!(
                event = name,
                "upstream greeted with PREAUTH: login cannot be enforced"
            )
        }
    }
}
