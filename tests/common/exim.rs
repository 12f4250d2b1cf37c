//! A real Exim 4.96 as the legacy upstream, started by `scripts/exim.sh`: plaintext
//! only, AUTH PLAIN offered and accepted without TLS (alice@example.test /
//! alice-secret-pw), PIPELINING and CHUNKING, mail for example.test into one Maildir.
//! One private instance per [`Exim`], stopped when it is dropped (and by the script's
//! watcher when the test binary exits). A missing Exim fails the test, never skips it:
//! `scripts/install-deps.sh` unpacks it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Ran, free_port, poll_for, processes, run_bounded, run_within};

/// Longer than `scripts/exim.sh` ever takes: 20 s for the banner, 6 s to stop.
pub const EXIM_SCRIPT_LIMIT: Duration = Duration::from_secs(60);

/// The user and password Exim's plaintext authenticator accepts.
pub const EXIM_USER: &str = "alice@example.test";
pub const EXIM_PASSWORD: &str = "alice-secret-pw";

/// `bash scripts/exim.sh ACTION DIR`.
pub fn exim_command(action: &str, dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/exim.sh"))
        .arg(action)
        .arg(dir);
    command
}

/// How the instance greets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// EHLO with PIPELINING, AUTH PLAIN, CHUNKING.
    Esmtp,
    /// EHLO refused with `500 5.5.1`; HELO only (`exim.sh --helo-only`).
    HeloOnly,
}

pub struct Exim {
    dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    /// Exim's main log (`log_selector = +all`).
    pub mainlog: PathBuf,
    /// Exim's debug output for receiving: a `PID SMTP<< LINE` for each command it read.
    pub command_log: PathBuf,
    pub maildir: PathBuf,
    config: PathBuf,
}

impl Exim {
    /// A private instance on a free loopback port, watched by this process.
    pub fn start(greeting: Greeting) -> Exim {
        let dir = tempfile::Builder::new()
            .prefix("mailmoat-exim-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut command = exim_command("start", dir.path());
        if greeting == Greeting::HeloOnly {
            command.arg("--helo-only");
        }
        command
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("EXIM_SMTP_PORT", port.to_string());
        let started: Ran = run_bounded(&mut command, EXIM_SCRIPT_LIMIT);
        assert_eq!(
            started.code,
            Some(0),
            "scripts/exim.sh start failed (scripts/install-deps.sh unpacks Exim 4.96):\n{}",
            started.both()
        );
        let env = std::fs::read_to_string(dir.path().join("exim.env")).unwrap();
        let var = |name: &str| -> PathBuf {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from exim.env"))
                .into()
        };
        Exim {
            smtp: SocketAddr::from(([127, 0, 0, 1], port)),
            mainlog: var("EXIM_MAINLOG"),
            command_log: var("EXIM_COMMAND_LOG"),
            maildir: var("EXIM_MAILDIR"),
            config: dir.path().join("exim.conf"),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn mainlog_text(&self) -> String {
        std::fs::read_to_string(&self.mainlog).unwrap_or_default()
    }

    /// The process id of Exim's child for the connection from loopback `port` (the port
    /// of the connection's client end, as Exim logs it), from the main log.
    pub fn session_pid(&self, port: u16) -> String {
        let peer = format!("[127.0.0.1]:{port} ");
        let log = self.mainlog_text();
        // The daemon logs the connection ("... (TCP/IP connection count = N)"); every
        // other line about it comes from the child that handles it.
        log.lines()
            .filter(|line| line.contains(&peer) && !line.contains("connection count"))
            .find_map(|line| {
                let start = line.find(" [")? + 2;
                let end = start + line[start..].find(']')?;
                Some(line[start..end].to_owned())
            })
            .unwrap_or_else(|| panic!("no session from port {port} in Exim's log:\n{log}"))
    }

    /// Every line Exim read as an SMTP command in the session from `port`, in order.
    pub fn session_commands(&self, port: u16) -> Vec<String> {
        let prefix = format!("{} SMTP<< ", self.session_pid(port));
        std::fs::read(&self.command_log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim_start().strip_prefix(&prefix))
            .map(str::to_owned)
            .collect()
    }

    /// The main log's lines about the session from `port`.
    pub fn session_log(&self, port: u16) -> Vec<String> {
        let pid = format!(" [{}] ", self.session_pid(port));
        self.mainlog_text()
            .lines()
            .filter(|line| line.contains(&pid))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until the instance is idle: no session and no delivery running,
    /// only the daemon (every Exim process of the instance names its config file).
    pub fn wait_idle(&self) {
        let config = self.config.display().to_string();
        let running = || -> Vec<String> {
            processes()
                .into_iter()
                .filter(|p| p.state() != "Z" && p.cmdline().contains(&config))
                .map(|p| format!("{} {}", p.pid, p.cmdline()))
                .collect()
        };
        if poll_for(Duration::from_secs(20), || {
            (running().len() <= 1).then_some(())
        })
        .is_none()
        {
            panic!("Exim still busy after 20 s: {:#?}", running());
        }
    }

    /// Every message delivered so far (the Maildir's new/ and cur/).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    found.push(bytes);
                }
            }
        }
        found
    }

    /// The delivered messages whose header section has `Subject: <subject>`.
    pub fn messages_with_subject(&self, subject: &str) -> Vec<Vec<u8>> {
        let wanted = format!("\nSubject: {subject}\n");
        self.messages()
            .into_iter()
            .filter(|message| {
                let end = memchr::memmem::find(message, b"\n\n").unwrap_or(message.len());
                memchr::memmem::find(&message[..end + 1], wanted.as_bytes()).is_some()
            })
            .collect()
    }

    /// Waits (bounded) for the one delivered message with `Subject: <subject>`.
    pub fn wait_for_delivery(&self, subject: &str) -> Vec<u8> {
        poll_for(Duration::from_secs(30), || {
            let mut found = self.messages_with_subject(subject);
            assert!(found.len() < 2, "{} messages {subject}", found.len());
            found.pop()
        })
        .unwrap_or_else(|| {
            panic!(
                "no message {subject} delivered; Exim's log:\n{}",
                self.mainlog_text()
            )
        })
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        if let Err(timed_out) = run_within(&mut exim_command("stop", self.dir()), EXIM_SCRIPT_LIMIT)
        {
            eprintln!("{timed_out}");
        }
    }
}

/// What Exim stores of a message sent as `sent` (CRLF lines): its own trace headers
/// (Return-path, Envelope-to, Received), then the message with LF line ends.
pub fn assert_delivered_intact(delivered: &[u8], sent: &[u8], sender: &str) {
    let sent_lf: Vec<u8> = String::from_utf8_lossy(sent)
        .replace("\r\n", "\n")
        .into_bytes();
    assert!(
        delivered.ends_with(&sent_lf),
        "delivered message differs from the one sent ({} vs {} bytes):\n{}",
        delivered.len(),
        sent_lf.len(),
        String::from_utf8_lossy(delivered)
    );
    let return_path = format!("Return-path: <{sender}>\n");
    assert!(
        delivered.starts_with(return_path.as_bytes()),
        "{}",
        String::from_utf8_lossy(delivered)
    );
}
