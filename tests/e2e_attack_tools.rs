//! Two published attack suites against the real `mailmoat` binary in front of the real
//! legacy Postfix and Dovecot (`scripts/legacy.sh`):
//!
//! - **command-injection-tester** 0.0.2 (PyPI; the STARTTLS command injection tester of
//!   the NO STARTTLS paper, by its authors). It sends a command in the same write as
//!   STARTTLS/STLS and reports whether the server executes it inside TLS. Run against
//!   every STARTTLS listener (SMTP with both policies, IMAP, POP3), and, so a pass means
//!   something, against a deliberately injectable server
//!   (`tests/clients/starttls_injectable_server.py`), which it must flag, and that
//!   server's fixed variant.
//! - **testssl.sh** 3.0.8 (Debian), through `scripts/testssl.sh`: one STARTTLS and one
//!   implicit-TLS listener must offer only TLS 1.2/1.3 with forward-secret AEAD suites
//!   and refuse renegotiation; its `--control` mode must flag a deliberately weak
//!   `openssl s_server`.
//!
//! A missing tool, Postfix or Dovecot fails these tests; it never skips. Install them
//! with `scripts/install-deps.sh`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------- running programs

/// Runs a program to completion in a directory of its own, bounded by `limit` (see
/// [`common::run_bounded`]). Returns (exit code, stdout, stderr).
fn run_tool(program: &str, args: &[&str], limit: Duration) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let ran = common::run_bounded(
        Command::new(program).args(args).current_dir(dir.path()),
        limit,
    );
    (ran.code.unwrap_or(-1), ran.stdout, ran.stderr)
}

// ---------------------------------------------------------------- command-injection-tester

const CIT: &str = "command-injection-tester";

/// What the tool does for one protocol (its source, `test_*_server`), and what the server
/// under test answers.
struct Protocol {
    /// `--smtp`, `--imap`, `--pop3`.
    flag: &'static str,
    /// The port option for that protocol.
    port_flag: &'static str,
    /// How the tool names the protocol in its log lines.
    name: &'static str,
    /// The STARTTLS command as the tool logs it.
    starttls: &'static str,
    /// The server's go-ahead (mailmoat's, and the injectable server's, word for word).
    go_ahead: &'static str,
}

const SMTP: Protocol = Protocol {
    flag: "--smtp",
    port_flag: "--smtp-port",
    name: "SMTP",
    starttls: "STARTTLS",
    go_ahead: "220 2.0.0 Ready to start TLS",
};
const IMAP: Protocol = Protocol {
    flag: "--imap",
    port_flag: "--imap-port",
    name: "IMAP",
    starttls: "A STARTTLS",
    go_ahead: "A OK Begin TLS negotiation now",
};
const POP3: Protocol = Protocol {
    flag: "--pop3",
    port_flag: "--pop3-port",
    name: "POP3",
    starttls: "STLS",
    go_ahead: "+OK Begin TLS negotiation",
};

/// The tool's log markers and verdicts, word for word (`_sanity_test`, `_injection_test`).
const SANITY_START: &str = "Sanity test...";
const SANITY_DONE: &str = "Sanity test done";
const INJECTION_START: &str = "Testing for command injection...";
const HANDSHAKE: &str = "<----- TLS Handshake ----->";
const NO_EARLY_RESPONSE: &str = "No response in encrypted context, trying real command now ...";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// "Command injection here!": the first thing inside TLS answered the injected command.
    Injected,
    /// "Probable command injection. Response looks different than expected."
    Probable,
    /// "Possible command injection here."
    Possible,
    /// "Server unresponsive: Possible command injection here!"
    Unresponsive,
    /// "Probably no command injection here!": nothing arrived unasked inside TLS, and a
    /// real command was answered normally.
    NoInjection,
    /// "TLS handshake failed - Server probably closed the connection!": the server did not
    /// complete a TLS handshake after the injected bytes.
    HandshakeRefused,
}

fn verdict(level: &str, message: &str) -> Option<Verdict> {
    Some(match (level, message) {
        ("WARNING", "Command injection here!") => Verdict::Injected,
        ("WARNING", "Probable command injection. Response looks different than expected.") => {
            Verdict::Probable
        }
        ("WARNING", "Possible command injection here.") => Verdict::Possible,
        ("WARNING", m) if m.starts_with("Server unresponsive: Possible command injection") => {
            Verdict::Unresponsive
        }
        ("INFO", "Probably no command injection here!") => Verdict::NoInjection,
        ("INFO", "TLS handshake failed - Server probably closed the connection!") => {
            Verdict::HandshakeRefused
        }
        _ => return None,
    })
}

#[derive(Debug)]
struct Record {
    level: String,
    message: String,
}

/// One run of the tool against one protocol, its log lines parsed.
struct Report {
    records: Vec<Record>,
    stdout: String,
}

impl Report {
    /// Lines look like `SMTP: 2026-11-24 19:44:00 - TRACE - S: 221 2.0.0 Bye`; a message
    /// with a newline continues on unprefixed lines.
    fn parse(protocol: &Protocol, stdout: String) -> Report {
        let prefix = format!("{}: ", protocol.name);
        let mut records: Vec<Record> = Vec::new();
        for line in stdout.lines() {
            let parsed = line.strip_prefix(&prefix).and_then(|rest| {
                let (_time, rest) = rest.split_once(" - ")?;
                let (level, message) = rest.split_once(" - ")?;
                Some(Record {
                    level: level.to_owned(),
                    message: message.to_owned(),
                })
            });
            match (parsed, records.last_mut()) {
                (Some(record), _) => records.push(record),
                (None, Some(last)) if !line.is_empty() => {
                    last.message.push('\n');
                    last.message.push_str(line);
                }
                _ => {}
            }
        }
        Report { records, stdout }
    }

    fn position(&self, level: &str, message: &str) -> usize {
        self.records
            .iter()
            .position(|r| r.level == level && r.message == message)
            .unwrap_or_else(|| {
                panic!(
                    "no {level} {message:?} in the tool's output:\n{}",
                    self.stdout
                )
            })
    }

    /// From "Sanity test..." to "Sanity test done".
    fn sanity(&self) -> &[Record] {
        &self.records[self.position("INFO", SANITY_START)..=self.position("INFO", SANITY_DONE)]
    }

    /// From "Testing for command injection..." to the end.
    fn injection(&self) -> &[Record] {
        &self.records[self.position("INFO", INJECTION_START)..]
    }

    fn verdicts(&self) -> Vec<Verdict> {
        self.records
            .iter()
            .filter_map(|r| verdict(&r.level, &r.message))
            .collect()
    }
}

/// The `C:` and `S:` lines of a phase.
fn traces(records: &[Record]) -> Vec<&str> {
    records
        .iter()
        .filter(|r| r.level == "TRACE")
        .map(|r| r.message.as_str())
        .collect()
}

/// The trace lines after the handshake marker of a phase.
fn after_handshake(records: &[Record]) -> Vec<&str> {
    let at = records
        .iter()
        .position(|r| r.level == "DEBUG" && r.message == HANDSHAKE)
        .expect("no TLS handshake in this phase");
    traces(&records[at..])
}

/// Runs the tool against 127.0.0.1:`port` and checks that it really ran: a sanity test
/// that reached STARTTLS, the go-ahead, a working TLS session (`after_tls` are the
/// trace lines of the sanity test inside TLS), then an injection test ending in exactly
/// one verdict, with no errors.
fn command_injection_tester(protocol: &Protocol, port: u16, after_tls: &[&str]) -> Report {
    let logdir = tempfile::tempdir().unwrap();
    let port = port.to_string();
    let (code, stdout, stderr) = run_tool(
        CIT,
        &[
            "--nocolor",
            "--logdir",
            logdir.path().to_str().unwrap(),
            protocol.flag,
            protocol.port_flag,
            &port,
            "127.0.0.1",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{CIT} failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("Traceback"), "{CIT} crashed:\n{stderr}");
    let report = Report::parse(protocol, stdout);
    let first = &report.records[0];
    assert_eq!(
        (first.level.as_str(), first.message.as_str()),
        (
            "INFO",
            format!("Testing {} server at 127.0.0.1:{port}", protocol.name).as_str()
        ),
        "{}",
        report.stdout
    );
    for record in &report.records {
        assert_ne!(record.level, "ERROR", "{}", report.stdout);
    }

    // The sanity test: STARTTLS, the go-ahead, a real TLS session.
    let sanity = report.sanity();
    let sanity_traces = traces(sanity);
    let at = sanity_traces
        .iter()
        .position(|t| *t == format!("C: {}", protocol.starttls))
        .unwrap_or_else(|| panic!("the sanity test sent no STARTTLS:\n{}", report.stdout));
    assert_eq!(
        sanity_traces[at + 1],
        format!("S: {}", protocol.go_ahead),
        "{}",
        report.stdout
    );
    assert_eq!(after_handshake(sanity), after_tls, "{}", report.stdout);

    assert_eq!(report.verdicts().len(), 1, "{}", report.stdout);
    report
}

/// The injection test's own lines: `C: STARTTLS` and the injected command in the same
/// write, then the go-ahead. Returns the injected command and the traces after the
/// go-ahead.
fn injection_exchange<'a>(report: &'a Report, protocol: &Protocol) -> (String, Vec<&'a str>) {
    let all = traces(report.injection());
    let at = all
        .iter()
        .position(|t| *t == format!("C: {}", protocol.starttls))
        .unwrap_or_else(|| panic!("the injection test sent no STARTTLS:\n{}", report.stdout));
    let injected = all
        .get(at + 1)
        .and_then(|t| t.strip_prefix("C: "))
        .unwrap_or_else(|| panic!("nothing injected behind STARTTLS:\n{}", report.stdout))
        .to_owned();
    // What the tool injects (`test_*_server`): a second EHLO, a NOOP under a random
    // five-letter tag, a CAPA.
    let expected_shape = match protocol.name {
        "SMTP" => injected == "EHLO commandinjectiontester",
        "IMAP" => {
            injected.len() == 10
                && injected.ends_with(" NOOP")
                && injected[..5].bytes().all(|b| b.is_ascii_uppercase())
        }
        _ => injected == "CAPA",
    };
    assert!(expected_shape, "unexpected injection {injected:?}");
    assert_eq!(
        all.get(at + 2).copied(),
        Some(format!("S: {}", protocol.go_ahead).as_str()),
        "{}",
        report.stdout
    );
    (injected, all[at + 3..].to_vec())
}

/// What the tool must report for a mailmoat listener: the injected bytes were answered by
/// nothing but a TLS alert in the clear, no handshake completed, and the verdict is the
/// tool's "TLS handshake failed" (not vulnerable); mailmoat logged the injection, and
/// the session ended without TLS and without the injected command counted.
fn assert_injection_refused(
    report: &Report,
    protocol: &Protocol,
    mailmoat: &Mailmoat,
    listener: &str,
    commands: &str,
) {
    let (injected, after) = injection_exchange(report, protocol);
    // A TLS alert record (content type 21, version 3.x) is all that comes back: mailmoat
    // handed the injected bytes to the TLS engine as the start of a ClientHello.
    for trace in &after {
        assert!(
            trace.starts_with("S: \u{15}\u{3}"),
            "{listener}: an answer to the injected {injected:?}: {trace:?}\n{}",
            report.stdout
        );
    }
    let injection = report.injection();
    assert!(
        !injection
            .iter()
            .any(|r| r.message == HANDSHAKE || r.message == NO_EARLY_RESPONSE),
        "{listener}: a TLS session came up after the injection:\n{}",
        report.stdout
    );
    assert_eq!(
        report.verdicts(),
        [Verdict::HandshakeRefused],
        "{}",
        report.stdout
    );
    assert!(
        report.records.iter().all(|r| r.level != "WARNING"),
        "{}",
        report.stdout
    );

    // mailmoat's side: the injected bytes (the command and its CRLF) were seen as
    // bytes behind STARTTLS, the handshake failed, nothing was executed.
    let marker = format!(" listener={listener} ");
    let bytes = format!("event=\"starttls_injection\" bytes={}", injected.len() + 2);
    let (injection_line, end_line) = wait_for(Duration::from_secs(20), "mailmoat's events", || {
        let log = mailmoat.log_text();
        let line = log
            .lines()
            .find(|l| l.contains(&marker) && l.contains(&bytes))?
            .to_owned();
        let id = line
            .split("id=")
            .nth(1)?
            .split([' ', '}'])
            .next()?
            .to_owned();
        let session = |event: &str| {
            log.lines()
                .find(|l| l.contains(&format!("id={id} ")) && l.contains(event))
                .map(str::to_owned)
        };
        session("event=\"tls_handshake_failed\"")?;
        Some((line, session("event=\"session_end\"")?))
    });
    assert!(
        end_line.contains(&format!(" commands={commands} ")) && end_line.contains(" tls=none"),
        "{injection_line}\n{end_line}"
    );
    // And the sanity test's session did get TLS from the same listener.
    assert!(
        mailmoat
            .log_text()
            .lines()
            .any(|l| l.contains(&marker) && l.contains("event=\"tls_established\"")),
        "{}",
        mailmoat.log_text()
    );
}

fn mailmoat() -> Mailmoat {
    let legacy = legacy();
    Mailmoat::start(&[
        ("submission", "smtp", "starttls", "require_tls", legacy.smtp),
        ("mx", "smtp", "starttls", "auth_requires_tls", legacy.smtp),
        ("imap", "imap", "starttls", "require_tls", legacy.imap),
        ("pop3", "pop3", "starttls", "require_tls", legacy.pop3),
    ])
}

/// Postfix's `disconnect from` summaries (`ehlo=1 rset=1 commands=2`) logged after `from`
/// bytes of its log, once there are `count` of them. Sessions without a command
/// (`commands=0/0`: the port probes of the legacy and mailmoat start-ups) are left out.
fn postfix_disconnects(from: usize, count: usize) -> Vec<String> {
    wait_for(
        Duration::from_secs(20),
        "Postfix's disconnect lines",
        || {
            let log = std::fs::read(&legacy().postfix_log).ok()?;
            let new = String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned();
            let found: Vec<String> = new
                .lines()
                .filter_map(|l| l.split_once("disconnect from unknown[127.0.0.1] "))
                .map(|(_, summary)| summary.to_owned())
                .filter(|summary| summary != "commands=0/0")
                .collect();
            (found.len() >= count).then_some(found)
        },
    )
}

#[test]
fn command_injection_tester_finds_no_injection_in_smtp_with_either_policy() {
    let mailmoat = mailmoat();
    for listener in ["submission", "mx"] {
        let before = std::fs::metadata(&legacy().postfix_log).unwrap().len() as usize;
        let report = command_injection_tester(
            &SMTP,
            mailmoat.port(listener),
            &["C: QUIT", "S: 221 2.0.0 Bye"],
        );
        assert_injection_refused(&report, &SMTP, &mailmoat, listener, "ehlo=1 starttls=1/1");
        // Postfix itself saw the sanity session (EHLO, NOOP, mailmoat's RSET, QUIT; Postfix
        // lists them in its own order) and the injection session (EHLO, mailmoat's RSET):
        // the injected EHLO never arrived.
        let mut sessions = postfix_disconnects(before, 2);
        sessions.sort();
        assert_eq!(
            sessions,
            [
                "ehlo=1 rset=1 commands=2",
                "ehlo=1 rset=1 noop=1 quit=1 commands=4"
            ],
            "{listener}"
        );
    }
}

#[test]
fn command_injection_tester_finds_no_injection_in_imap() {
    let mailmoat = mailmoat();
    let report = command_injection_tester(
        &IMAP,
        mailmoat.port("imap"),
        &[
            "C: B LOGOUT",
            "S: * BYE Logging out",
            "S: B OK Logout completed.",
        ],
    );
    assert_injection_refused(&report, &IMAP, &mailmoat, "imap", "starttls=1/1");
}

#[test]
fn command_injection_tester_finds_no_injection_in_pop3() {
    let mailmoat = mailmoat();
    let report = command_injection_tester(
        &POP3,
        mailmoat.port("pop3"),
        &["C: QUIT", "S: +OK Logging out"],
    );
    assert_injection_refused(&report, &POP3, &mailmoat, "pop3", "stls=1/1");
}

/// `tests/clients/starttls_injectable_server.py` on a free port, killed on drop (and
/// gone by itself when its standard input closes).
struct InjectableServer {
    child: std::process::Child,
    port: u16,
}

impl InjectableServer {
    fn start(protocol: &str, mode: &str) -> InjectableServer {
        let port = free_port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/starttls_injectable_server.py"
        );
        let certs = certs();
        let child = Command::new("python3")
            .arg(script)
            .args(["--protocol", protocol, "--mode", mode, "--port"])
            .arg(port.to_string())
            .arg("--cert")
            .arg(&certs.default.0)
            .arg("--key")
            .arg(&certs.default.1)
            .stdin(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let server = InjectableServer { child, port };
        wait_for(Duration::from_secs(20), "the injectable server", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        server
    }
}

impl Drop for InjectableServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn command_injection_tester_flags_a_server_that_executes_injected_commands() {
    // (protocol, sanity trace inside TLS, the injected command's answer inside TLS; {tag}
    // is the injected IMAP command's tag)
    let cases: [(&Protocol, &str, &[&str], &str); 3] = [
        (
            &SMTP,
            "smtp",
            &["C: QUIT", "S: 221 2.0.0 Bye"],
            "S: 250-injectable.test",
        ),
        (
            &IMAP,
            "imap",
            &[
                "C: B LOGOUT",
                "S: * BYE Logging out",
                "S: B OK Logout completed",
            ],
            "S: {tag} OK NOOP completed",
        ),
        (&POP3, "pop3", &["C: QUIT", "S: +OK Logging out"], "S: +OK"),
    ];
    for (protocol, name, after_tls, answer) in cases {
        let server = InjectableServer::start(name, "vulnerable");
        let report = command_injection_tester(protocol, server.port, after_tls);
        let (injected, _) = injection_exchange(&report, protocol);
        // The handshake completed and the first thing inside TLS answered the command
        // that was sent in the clear.
        let inside = after_handshake(report.injection());
        assert_eq!(
            inside.first().copied(),
            Some(
                answer
                    .replace("{tag}", injected.split(' ').next().unwrap())
                    .as_str()
            ),
            "{}",
            report.stdout
        );
        assert_eq!(report.verdicts(), [Verdict::Injected], "{}", report.stdout);
    }
}

#[test]
fn command_injection_tester_passes_the_fixed_server() {
    // (protocol, sanity trace inside TLS, the tool's real command and its answer)
    let cases: [(&Protocol, &str, &[&str], [&str; 2]); 3] = [
        (
            &SMTP,
            "smtp",
            &["C: QUIT", "S: 221 2.0.0 Bye"],
            [
                "C: FAKE commandinjectiontester",
                "S: 502 5.5.2 Error: command not recognized",
            ],
        ),
        (
            &IMAP,
            "imap",
            &[
                "C: B LOGOUT",
                "S: * BYE Logging out",
                "S: B OK Logout completed",
            ],
            ["C: C NOOP", "S: C OK NOOP completed"],
        ),
        (
            &POP3,
            "pop3",
            &["C: QUIT", "S: +OK Logging out"],
            ["C: USER user", "S: +OK"],
        ),
    ];
    for (protocol, name, after_tls, real_command) in cases {
        let server = InjectableServer::start(name, "fixed");
        let report = command_injection_tester(protocol, server.port, after_tls);
        injection_exchange(&report, protocol);
        assert_eq!(
            after_handshake(report.injection()),
            real_command,
            "{}",
            report.stdout
        );
        assert!(
            report
                .injection()
                .iter()
                .any(|r| r.message == NO_EARLY_RESPONSE)
        );
        assert_eq!(
            report.verdicts(),
            [Verdict::NoInjection],
            "{}",
            report.stdout
        );
    }
}

// ---------------------------------------------------------------- testssl.sh

fn testssl_script(args: &[&str]) -> (i32, String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testssl.sh");
    let mut all = vec![script];
    all.extend_from_slice(args);
    // Two scans of at most 300 s each, plus setup.
    run_tool("bash", &all, Duration::from_secs(900))
}

/// The summary block of one target in the script's output.
fn block<'a>(stdout: &'a str, name: &str) -> &'a str {
    let start = stdout
        .find(&format!("== {name}: "))
        .unwrap_or_else(|| panic!("no summary for {name}:\n{stdout}"));
    let end = stdout[start..]
        .find(&format!("RESULT {name}: "))
        .unwrap_or_else(|| panic!("no result for {name}:\n{stdout}"));
    let line_end = stdout[start + end..]
        .find('\n')
        .unwrap_or(stdout.len() - start - end);
    &stdout[start..start + end + line_end]
}

#[test]
fn testssl_finds_only_tls12_and_tls13_forward_secret_aead_and_no_renegotiation() {
    let (code, stdout, stderr) = testssl_script(&[
        "--mailmoat",
        env!("CARGO_BIN_EXE_mailmoat"),
        "smtp",
        "imaps",
    ]);
    assert_eq!(code, 0, "scripts/testssl.sh failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("testssl: 2 listeners, 2 passed, 0 failed"),
        "{stdout}"
    );
    for name in ["smtp", "imaps"] {
        let summary = block(&stdout, name);
        let line = |label: &str| {
            summary
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("{name}: no {label} line:\n{summary}"))
                .trim()
                .to_owned()
        };
        assert_eq!(
            line("protocols"),
            "protocols       offered: TLSv1.2 TLSv1.3 | not offered: SSLv2 SSLv3 TLSv1.0 TLSv1.1   ok",
            "{summary}"
        );
        // Every suite the listener accepted, per protocol, all ECDHE (or TLS 1.3) + AEAD.
        for proto in ["TLS 1.2 ciphers", "TLS 1.3 ciphers"] {
            let suites = line(proto);
            assert!(suites.ends_with("   ok"), "{summary}");
            assert!(suites.split_whitespace().count() >= 5, "{summary}");
        }
        assert!(
            line("TLS 1.2 ciphers")
                .split_whitespace()
                .skip(3)
                .take_while(|s| *s != "ok")
                .all(|s| s.starts_with("ECDHE-") && (s.contains("GCM") || s.contains("CHACHA20"))),
            "{summary}"
        );
        assert!(!summary.contains("TLS 1 ciphers") && !summary.contains("TLS 1.1 ciphers"));
        assert!(
            line("cipher classes")
                .starts_with("cipher classes  NULL aNULL EXPORT LOW 3DES/IDEA CBC: not offered"),
            "{summary}"
        );
        let renegotiation = line("renegotiation");
        assert!(
            renegotiation.ends_with("   ok") && !renegotiation.contains("VULNERABLE"),
            "{summary}"
        );
        let rehandshake = line("rehandshake");
        assert!(
            rehandshake.ends_with("   ok") && !rehandshake.contains("PERFORMED"),
            "{summary}"
        );
        assert!(line("vulnerabilities").ends_with(": not vulnerable   ok"));
        // The old-protocol and weak-suite probes really reached mailmoat, which refused
        // them in the handshake.
        let refused: usize = line("mailmoat")
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{summary}"));
        assert!(refused >= 10, "{summary}");
        assert!(!summary.contains(" FAIL"), "{summary}");
        assert!(
            summary.ends_with(&format!("RESULT {name}: PASS")),
            "{summary}"
        );
    }
}

#[test]
fn testssl_control_flags_every_weakness_planted_in_a_weak_server() {
    let (code, stdout, stderr) = testssl_script(&["--control"]);
    assert_eq!(
        code, 0,
        "scripts/testssl.sh --control failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("control: every planted weakness was reported"),
        "{stdout}"
    );
    let summary = block(&stdout, "weak");
    for expected in [
        "FAIL protocols: offered: TLSv1.0 TLSv1.1 TLSv1.2 TLSv1.3 (must be exactly TLSv1.2 TLSv1.3)",
        "FAIL ciphers: TLS 1.2 AES128-GCM-SHA256: no forward secrecy (key exchange RSA)",
        "FAIL ciphers: TLS 1.2 ECDHE-RSA-AES128-SHA: not AEAD (AES 128)",
        "FAIL cipher classes: CBC: offered",
        "FAIL renegotiation: client-initiated renegotiation: VULNERABLE",
        "FAIL rehandshake: gnutls-cli completed a second handshake on the same connection",
    ] {
        assert!(summary.contains(expected), "{expected} missing:\n{summary}");
    }
    assert!(summary.contains("RESULT weak: FAIL ("), "{summary}");
}
