//! The outbound relay's lab, `scripts/outbound-lab.sh`: knot and a validating unbound
//! for the test zones, Postfix MXes with the lab CA's certificates, an nginx MTA-STS
//! policy host and a plaintext legacy sender, each on its own 127.NET.x.y. One shared lab
//! per test binary, or a private one; both end with this process (the script's watcher)
//! and a private one when it is dropped.
//!
//! In CI (`CI=true`) a missing package fails the test; elsewhere the lab's tests skip,
//! saying so, when the script finds a program missing (`scripts/install-deps.sh`
//! installs them all).

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{free_port, poll_for, run_bounded, run_within};

/// Longer than `scripts/outbound-lab.sh` ever takes: 20 s for each thing it waits for
/// to come up, and about 25 s to stop.
pub const LAB_SCRIPT_LIMIT: Duration = Duration::from_secs(180);

/// The script's exit code when a program it needs is missing.
const MISSING_PROGRAM: i32 = 69;
/// The script's exit code when a lab address is taken (another lab on that NET).
const ADDRESS_IN_USE: i32 = 75;
/// NETs tried before giving up.
const NET_ATTEMPTS: u32 = 8;

/// `bash scripts/outbound-lab.sh ACTION DIR`.
pub fn lab_command(action: &str, dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/outbound-lab.sh"))
        .arg(action)
        .arg(dir);
    command
}

/// A NET (the second octet of the lab's addresses) for the next lab of this process:
/// 10..=249, apart from other test processes' by the pid, and from this one's other labs.
fn next_net() -> u32 {
    static STARTED: AtomicU32 = AtomicU32::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    10 + (std::process::id() * 7 + n) % 240
}

/// The programs the lab's tests run themselves.
const TEST_CLIENTS: [&str; 4] = ["swaks", "openssl", "curl", "sendmail"];

/// Whether `program` is in a directory of `$PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A package is missing (`why`): in CI the test fails here; elsewhere this says that
/// the tests skip, and they do.
fn skip_or_fail(why: &str) {
    let advice = "scripts/install-deps.sh, as root, installs what they need";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the outbound lab cannot run ({advice}): {why}");
    }
    // Straight to stderr: the test harness would hide an eprintln! of a test that passes.
    let _ = writeln!(
        std::io::stderr(),
        "skipping the outbound lab's tests ({advice}; in CI this fails): {why}"
    );
}

/// A running lab: its directory and what its `lab.env` says.
pub struct Lab {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
    /// The validating resolver (unbound).
    pub resolver: SocketAddr,
    /// The lab CA every certificate chains to.
    pub ca: PathBuf,
    /// Where mailmoat's outbound listener would be: the sender's relayhost port on
    /// 127.0.0.1, on which nothing listens.
    pub relay_port: u16,
}

/// The legacy sender's queue timings in the lab.
const SENDER_RETRY: &str =
    "queue_run_delay = 1s\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s";

impl Lab {
    /// The lab of this test binary, started on first use; `None` when the tests are to
    /// skip (outside CI, a package missing: the reason is printed).
    pub fn shared() -> Option<&'static Lab> {
        static LAB: OnceLock<Option<Lab>> = OnceLock::new();
        LAB.get_or_init(Lab::start).as_ref()
    }

    /// A lab of its own for one test, stopped when dropped.
    pub fn private() -> Option<Lab> {
        Lab::start()
    }

    fn start() -> Option<Lab> {
        // The clients the tests drive the lab with; the script checks its own programs.
        let missing: Vec<&str> = TEST_CLIENTS
            .into_iter()
            .filter(|client| !on_path(client))
            .collect();
        if !missing.is_empty() {
            skip_or_fail(&format!("missing: {}", missing.join(" ")));
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("mailmoat-lab-")
            .tempdir()
            .unwrap();
        let relay_port = free_port();
        let mut attempts = Vec::new();
        for _ in 0..NET_ATTEMPTS {
            let started = run_bounded(
                lab_command("start", dir.path())
                    .arg("--watch")
                    .arg(std::process::id().to_string())
                    .env("OUTBOUND_LAB_NET", next_net().to_string())
                    .env("OUTBOUND_LAB_RELAY_PORT", relay_port.to_string())
                    // Deferred mail (a 4xx from the relay, the 452 4.5.3 of a second
                    // recipient domain) is tried again within seconds, not Postfix's
                    // five minutes.
                    .env("OUTBOUND_LAB_SENDER_EXTRA", SENDER_RETRY),
                LAB_SCRIPT_LIMIT,
            );
            match started.code {
                Some(0) => {
                    return Some(Lab::read(dir, relay_port));
                }
                Some(MISSING_PROGRAM) => {
                    skip_or_fail(started.stderr.trim());
                    return None;
                }
                Some(ADDRESS_IN_USE) => attempts.push(started.both()),
                _ => panic!(
                    "scripts/outbound-lab.sh start failed (scripts/install-deps.sh installs \
                     what it needs):\n{}",
                    started.both()
                ),
            }
        }
        panic!(
            "no free NET for the outbound lab in {NET_ATTEMPTS} attempts:\n{}",
            attempts.join("\n")
        )
    }

    fn read(dir: tempfile::TempDir, relay_port: u16) -> Lab {
        let text = std::fs::read_to_string(dir.path().join("lab.env")).unwrap();
        let env: HashMap<String, String> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.trim_matches('"').to_owned()))
            .collect();
        let get = |name: &str| {
            env.get(name)
                .unwrap_or_else(|| panic!("{name} missing from lab.env:\n{text}"))
                .clone()
        };
        Lab {
            resolver: get("LAB_RESOLVER").parse().unwrap(),
            ca: get("LAB_CA").into(),
            relay_port,
            env,
            dir,
        }
    }

    /// A value from `lab.env`.
    pub fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from lab.env"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The lab's address `LAB_<name>` (`MX1`, `MX_NOTLS`...).
    pub fn ip(&self, name: &str) -> IpAddr {
        self.var(&format!("LAB_{name}")).parse().unwrap()
    }

    /// The MX `LAB_<name>` (`MX1`, `MX_NOTLS`...) on port 25.
    pub fn mx(&self, name: &str) -> SocketAddr {
        SocketAddr::new(self.ip(name), 25)
    }

    /// The Maildir the MX `name` delivers every message to.
    pub fn maildir(&self, name: &str) -> PathBuf {
        self.var(&format!("LAB_MAILDIR_{name}")).into()
    }

    /// Waits (bounded) for a message containing `tag` in the Maildir of MX `name`.
    pub fn wait_for_delivery(&self, name: &str, tag: &str) -> String {
        let maildir = self.maildir(name);
        let found = || {
            ["new", "cur"].iter().find_map(|sub| {
                std::fs::read_dir(maildir.join(sub))
                    .ok()?
                    .flatten()
                    .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
                    .find(|message| message.contains(tag))
            })
        };
        poll_for(Duration::from_secs(60), found).unwrap_or_else(|| {
            let log = std::fs::read_to_string(self.var("LAB_MX_LOG")).unwrap_or_default();
            panic!(
                "no message tagged {tag} in {}; the MX log:\n{log}",
                maildir.display()
            )
        })
    }

    /// Submits `message` to the legacy sender with its own `sendmail`: `args` are
    /// sendmail's (`-f` sender, recipients, `-B 8BITMIME`...).
    pub fn sendmail(&self, args: &[&str], message: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("sendmail")
            .arg("-C")
            .arg(self.var("LAB_SENDER_POSTFIX"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(message.as_bytes())
            .unwrap();
        let status = crate::common::wait_exit(&mut child, Duration::from_secs(60));
        assert!(status.success(), "sendmail {args:?}: {status}");
    }

    /// The legacy sender's queue, `postqueue -j`: one JSON object per message.
    pub fn sender_queue(&self) -> Vec<serde_json::Value> {
        let ran = run_bounded(
            std::process::Command::new("postqueue")
                .arg("-c")
                .arg(self.var("LAB_SENDER_POSTFIX"))
                .arg("-j"),
            Duration::from_secs(60),
        );
        assert_eq!(ran.code, Some(0), "{}", ran.both());
        ran.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// A private lab is stopped when dropped, before its directory goes; the shared one,
/// never dropped, by the script's watcher once this process exits.
impl Drop for Lab {
    fn drop(&mut self) {
        let stopped = run_within(&mut lab_command("stop", self.dir.path()), LAB_SCRIPT_LIMIT);
        if let Err(timed_out) = stopped {
            eprintln!("{timed_out}");
        }
    }
}
