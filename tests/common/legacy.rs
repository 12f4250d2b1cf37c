//! The real Postfix and Dovecot of `scripts/legacy.sh`: one shared instance per test
//! binary, or a private one with extra settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::{Ran, free_port, poll_for, run_bounded, run_within};

/// Longer than `scripts/legacy.sh` ever takes on its own: it waits 30 s for the banners
/// and at most 25 s for the daemons to stop.
pub const LEGACY_SCRIPT_LIMIT: Duration = Duration::from_secs(120);

/// `bash scripts/legacy.sh ACTION DIR`.
pub fn legacy_command(action: &str, dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/legacy.sh"))
        .arg(action)
        .arg(dir);
    command
}

/// `legacy.sh start DIR` on `[smtp, imap, pop3]` ports, with extra settings, watched by
/// this process: the instance ends when the test binary does.
pub fn legacy_start(
    dir: &Path,
    [smtp, imap, pop3]: [u16; 3],
    postfix_extra: &str,
    master_extra: &str,
    dovecot_extra: &str,
) -> Ran {
    run_bounded(
        legacy_command("start", dir)
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("LEGACY_SMTP_PORT", smtp.to_string())
            .env("LEGACY_IMAP_PORT", imap.to_string())
            .env("LEGACY_POP3_PORT", pop3.to_string())
            .env("LEGACY_POSTFIX_EXTRA", postfix_extra)
            .env("LEGACY_POSTFIX_MASTER_EXTRA", master_extra)
            .env("LEGACY_DOVECOT_EXTRA", dovecot_extra),
        LEGACY_SCRIPT_LIMIT,
    )
}

/// The real Postfix and Dovecot started by `scripts/legacy.sh`, one instance per test
/// binary, stopped by the script's watcher when this process exits.
pub struct Legacy {
    _dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    pub postfix_log: PathBuf,
    pub dovecot_log: PathBuf,
    pub maildir_alice: PathBuf,
}

pub fn legacy() -> &'static Legacy {
    static LEGACY: OnceLock<Legacy> = OnceLock::new();
    LEGACY.get_or_init(|| Legacy::start("", ""))
}

/// An instance made by [`Legacy::start`] (not the shared one, which lives as long as the
/// test binary) is stopped when dropped, before its directory goes.
impl Drop for Legacy {
    fn drop(&mut self) {
        let stopped = run_within(
            &mut legacy_command("stop", self._dir.path()),
            LEGACY_SCRIPT_LIMIT,
        );
        if let Err(timed_out) = stopped {
            eprintln!("{timed_out}");
        }
    }
}

impl Legacy {
    /// A private instance with `postfix_extra` (`name = value` lines) set in main.cf and
    /// `dovecot_extra` appended to dovecot.conf (e.g. an open-relay `mynetworks`, PROXY
    /// protocol, XCLIENT).
    pub fn start(postfix_extra: &str, dovecot_extra: &str) -> Legacy {
        Legacy::start_with(postfix_extra, "", dovecot_extra)
    }

    /// As [`Legacy::start`], with `master_extra` appended to Postfix's master.cf (another
    /// smtpd service on its own port, say).
    pub fn start_with(postfix_extra: &str, master_extra: &str, dovecot_extra: &str) -> Legacy {
        let dir = tempfile::Builder::new()
            .prefix("mailmoat-legacy-")
            .tempdir()
            .unwrap();
        let (smtp, imap, pop3) = (free_port(), free_port(), free_port());
        let started = legacy_start(
            dir.path(),
            [smtp, imap, pop3],
            postfix_extra,
            master_extra,
            dovecot_extra,
        );
        // A missing Postfix or Dovecot is a failure, never a skip: these tests are the
        // proof that real clients and real legacy servers work through the proxy.
        assert_eq!(
            started.code,
            Some(0),
            "scripts/legacy.sh start failed (install the legacy servers with \
             scripts/install-deps.sh):\n{}",
            started.both()
        );
        let env = std::fs::read_to_string(dir.path().join("legacy.env")).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from legacy.env"))
                .trim_matches('"')
                .to_owned()
        };
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Legacy {
            smtp: addr(smtp),
            imap: addr(imap),
            pop3: addr(pop3),
            postfix_log: var("LEGACY_POSTFIX_LOG").into(),
            dovecot_log: var("LEGACY_DOVECOT_LOG").into(),
            maildir_alice: var("LEGACY_MAILDIR_ALICE").into(),
            _dir: dir,
        }
    }
}

impl Legacy {
    /// The instance's directory: `postfix/main.cf`, `log/`, the queue and the sockets.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Waits (bounded) for a delivered message in alice's Maildir containing `tag`.
    pub fn wait_for_delivery(&self, tag: &str) -> Vec<u8> {
        self.wait_for_deliveries(tag, 1).pop().unwrap()
    }

    /// Waits (bounded) for `count` messages containing `tag`.
    pub fn wait_for_deliveries(&self, tag: &str, count: usize) -> Vec<Vec<u8>> {
        let limit = Duration::from_secs(60);
        poll_for(limit, || {
            let found = self.delivered(tag);
            (found.len() >= count).then_some(found)
        })
        .unwrap_or_else(|| {
            let found = self.delivered(tag).len();
            panic!("{found} of {count} messages tagged {tag} delivered")
        })
    }

    /// The messages in alice's Maildir (new/ and cur/) containing `tag`, now.
    fn delivered(&self, tag: &str) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir_alice.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(bytes) = std::fs::read(entry.path()) else {
                    continue;
                };
                if memchr::memmem::find(&bytes, tag.as_bytes()).is_some() {
                    found.push(bytes);
                }
            }
        }
        found
    }

    pub fn logs(&self) -> String {
        let mut all = std::fs::read_to_string(&self.postfix_log).unwrap_or_default();
        all.push_str(&std::fs::read_to_string(&self.dovecot_log).unwrap_or_default());
        all
    }
}
