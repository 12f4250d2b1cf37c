//! The in-process proxy's log lines, kept in memory at trace level: a session's line
//! by its client address, and the check that no secret was ever logged.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use super::{STEP, wait_for_async};

/// Everything logged by the in-process proxy of this test binary, at trace level.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a trace-level subscriber that keeps every log line in memory.
pub fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// Every log line the in-process proxy wrote so far.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Fails if any of `secrets` appears in any log line captured so far.
pub fn assert_no_secret_logged(secrets: &[&str]) {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        !logs.is_empty(),
        "no log line was captured: is capture_logs() called?"
    );
    let text = String::from_utf8_lossy(&logs);
    for secret in secrets {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect();
        assert!(
            lines.is_empty(),
            "{secret:?} appears in log lines: {lines:#?}"
        );
    }
}

/// Waits (bounded) until the in-process proxy has logged, for the session of the client
/// at `client`, a line containing `needle`; returns it. `client` must be unique to the
/// session: connect with [`traceable_connect`] or [`traceable_tcp`].
pub async fn session_log_line(client: SocketAddr, needle: &str) -> String {
    let tag = format!("client={client}");
    wait_for_async(
        STEP,
        format_args!("a log line with {tag} and {needle:?}"),
        async || {
            captured_logs()
                .lines()
                .find(|line| line.contains(&tag) && line.contains(needle))
                .map(str::to_owned)
        },
    )
    .await
}
