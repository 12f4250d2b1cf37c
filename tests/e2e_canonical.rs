//! DESIGN §3's canonical rule against the real legacy Dovecot of `scripts/legacy.sh`:
//! through mailmoat's STARTTLS listeners, before TLS, a client sends an allow-listed
//! command whose line ends in a literal the grammar does not allow there, with a real
//! `LOGIN` hidden in the literal's octets (`a NOOP ~{31+}` CRLF `b LOGIN bob ...`): an
//! upstream that skips the rest of a line it cannot parse reads the octets as its next
//! command. POP3 gets the same treatment with its allowed verbs and junk arguments.
//!
//! Between mailmoat and Dovecot runs a small TCP forwarder of the test's own that records
//! every byte of the upstream leg. For each variant the test collects what it saw and
//! asserts, for all variants together (so one run names every variant that gets through):
//!
//! - the client got no tagged OK for the hidden tag and no `Logged in`;
//! - Dovecot's log (`auth_verbose`, each line carrying the upstream leg's port, `rport`)
//!   shows no login of the hidden user (bob) for that connection;
//! - the upstream leg before TLS holds only canonical commands (the strict reader of
//!   `tests/fuzz/src/canonical.rs`), no `LOGIN`, `USER` or `PASS`;
//! - mailmoat logged `plaintext_command_refused` for the session;
//! - afterwards, in the same connection, STARTTLS and a real login as alice work, and
//!   Dovecot logs alice's login for that connection.
//!
//! The hidden user is bob, the real one alice (both from legacy.sh), so the one login
//! Dovecot must log per connection is alice's, after TLS: waiting for it (bounded) also
//! makes sure the log holds everything before it.

mod common;

#[allow(dead_code)]
#[path = "fuzz/src/canonical.rs"]
mod canonical;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use canonical::{Canonical, Dialect, show};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HIDDEN_USER: &str = "bob@example.test";
const HIDDEN_PASSWORD: &str = "bob-secret-pw";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "alice-secret-pw";

/// A legacy instance of this binary's own whose Dovecot names the remote port of each
/// connection in its login lines, so that a line can be tied to one upstream leg.
fn legacy() -> &'static Legacy {
    static LEGACY: OnceLock<Legacy> = OnceLock::new();
    LEGACY.get_or_init(|| {
        Legacy::start(
            "",
            "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} lip=%l \
             mpid=%e %c session=<%{session}>",
        )
    })
}

/// Dovecot's log lines about the connection from `port` (the forwarder's end).
fn dovecot_lines(port: u16) -> Vec<String> {
    let log = std::fs::read_to_string(&legacy().dovecot_log).unwrap_or_default();
    let needle = format!("rport={port},");
    log.lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) for Dovecot to log the login of `user` on the connection from `port`;
/// returns every line of that connection, or an error naming them.
async fn wait_for_dovecot_login(port: u16, user: &str) -> Result<Vec<String>, String> {
    let login = format!("Login: user=<{user}>");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = dovecot_lines(port);
        if lines.iter().any(|l| l.contains(&login)) {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "Dovecot logged no {login:?} for rport={port}; its lines for it: {lines:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- the recording forwarder

/// One upstream leg: mailmoat's port towards the forwarder (the session's
/// `upstream_port` in mailmoat's log), the forwarder's port towards Dovecot (Dovecot's
/// `rport`), and every byte mailmoat sent on it.
struct Leg {
    from: u16,
    port: u16,
    sent: Vec<u8>,
}

/// A TCP forwarder between mailmoat and Dovecot that records the mailmoat->Dovecot bytes
/// of each connection.
struct Forwarder {
    addr: SocketAddr,
    legs: Arc<Mutex<Vec<Leg>>>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let legs: Arc<Mutex<Vec<Leg>>> = Arc::default();
        let shared = Arc::clone(&legs);
        tokio::spawn(async move {
            while let Ok((from_mailmoat, mailmoat_addr)) = listener.accept().await {
                let Ok(to_dovecot) = TcpStream::connect(to).await else {
                    continue;
                };
                let index = {
                    let mut legs = shared.lock().unwrap();
                    legs.push(Leg {
                        from: mailmoat_addr.port(),
                        port: to_dovecot.local_addr().unwrap().port(),
                        sent: Vec::new(),
                    });
                    legs.len() - 1
                };
                let (mut mailmoat_read, mut mailmoat_write) = from_mailmoat.into_split();
                let (mut dovecot_read, mut dovecot_write) = to_dovecot.into_split();
                let record = Arc::clone(&shared);
                tokio::spawn(async move {
                    let mut buf = vec![0; 16 * 1024];
                    loop {
                        match mailmoat_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                record.lock().unwrap()[index]
                                    .sent
                                    .extend_from_slice(&buf[..n]);
                                if dovecot_write.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = dovecot_write.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut dovecot_read, &mut mailmoat_write).await;
                    let _ = mailmoat_write.shutdown().await;
                });
            }
        });
        Forwarder { addr, legs }
    }

    /// Every leg so far: (mailmoat's port, Dovecot's rport, the bytes so far).
    fn snapshot(&self) -> Vec<(u16, u16, Vec<u8>)> {
        self.legs
            .lock()
            .unwrap()
            .iter()
            .map(|leg| (leg.from, leg.port, leg.sent.clone()))
            .collect()
    }
}

/// The leg of `snapshot` that mailmoat opened from its port `from`: (Dovecot's rport,
/// the bytes it had carried then).
fn leg_of(snapshot: &[(u16, u16, Vec<u8>)], from: u16) -> (u16, Vec<u8>) {
    snapshot
        .iter()
        .find(|(f, _, _)| *f == from)
        .map(|(_, port, sent)| (*port, sent.clone()))
        .unwrap_or_else(|| panic!("no upstream leg from port {from}"))
}

/// The port of mailmoat's upstream connection for the session of the client at `client`:
/// the `upstream_port` field of its log lines (DESIGN §7), bounded wait. A session logs
/// it from its first event on (`tls_established`, `session_end`, a refusal).
async fn upstream_port(mailmoat: &Mailmoat, client: SocketAddr) -> u16 {
    let tag = format!("client={client}");
    within(async {
        loop {
            let found = mailmoat.log_text().lines().find_map(|line| {
                if !line.contains(&tag) {
                    return None;
                }
                let at = line.find("upstream_port=")? + "upstream_port=".len();
                let digits: String = line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            });
            match found {
                Some(port) => break port,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
}

/// mailmoat with STARTTLS listeners for IMAP and POP3, each through its own forwarder to
/// the legacy Dovecot.
async fn setup() -> (Mailmoat, Forwarder, Forwarder) {
    let legacy = legacy();
    let imap = Forwarder::start(legacy.imap).await;
    let pop3 = Forwarder::start(legacy.pop3).await;
    let mailmoat = Mailmoat::start(&[
        ("imap", "imap", "starttls", "require_tls", imap.addr),
        ("pop3", "pop3", "starttls", "require_tls", pop3.addr),
    ]);
    (mailmoat, imap, pop3)
}

// ---------------------------------------------------------------- a line client

/// Lines over any stream, each read bounded.
struct Lines<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    fn new(stream: S) -> Self {
        Lines {
            stream: BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let stream = self.stream.get_mut();
        tokio::time::timeout(STEP, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| "write timed out".to_owned())?
        .map_err(|e| format!("write: {e}"))
    }

    /// The next line, CRLF included; an error at the end of the stream.
    async fn line(&mut self) -> Result<String, String> {
        let mut line = Vec::new();
        let n = tokio::time::timeout(STEP, self.stream.read_until(b'\n', &mut line))
            .await
            .map_err(|_| "no line within the step deadline".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the connection closed".to_owned());
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Lines up to and including the first that `last` accepts (at most 200), or up to
    /// the end of the stream.
    async fn until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        while lines.len() < 200 {
            match self.line().await {
                Ok(line) => {
                    let done = last(&line);
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    lines.push(format!("<{e}>"));
                    break;
                }
            }
        }
        lines
    }
}

/// What one variant did, on every side.
#[derive(Debug)]
struct Seen {
    variant: String,
    /// Everything the client got before STARTTLS.
    replies: Vec<String>,
    /// The upstream leg before STARTTLS, as the strict reader judged it.
    upstream_verdict: Result<(), String>,
    upstream_before_tls: String,
    /// Dovecot's lines for this connection that log the hidden user's login.
    hidden_logins: Vec<String>,
    /// mailmoat logged `plaintext_command_refused` for this session.
    refusal_logged: bool,
    /// STARTTLS then the real login in the same connection.
    after_tls: Result<(), String>,
}

impl Seen {
    fn new(variant: String) -> Seen {
        Seen {
            variant,
            replies: Vec::new(),
            upstream_verdict: Err("not judged".into()),
            upstream_before_tls: String::new(),
            hidden_logins: Vec::new(),
            refusal_logged: false,
            after_tls: Err("not tried".into()),
        }
    }

    /// The session is over on the client's side: joins it with its upstream leg (by the
    /// `upstream_port` of mailmoat's log) and reads that leg, Dovecot's log and
    /// mailmoat's log.
    async fn settle(
        &mut self,
        mailmoat: &Mailmoat,
        dialect: Dialect,
        client: SocketAddr,
        before_tls: &[(u16, u16, Vec<u8>)],
        after_tls: Result<(), String>,
    ) {
        let (rport, bytes) = leg_of(before_tls, upstream_port(mailmoat, client).await);
        self.upstream_before_tls = show(&bytes);
        self.upstream_verdict = judge(dialect, &bytes);
        // The real login is the one Dovecot must log for this connection; once it is
        // there, so is anything logged before it.
        self.after_tls = match after_tls {
            Ok(()) => wait_for_dovecot_login(rport, USER).await.map(|_| ()),
            Err(e) => Err(e),
        };
        self.hidden_logins = dovecot_lines(rport)
            .into_iter()
            .filter(|l| l.contains(&format!("Login: user=<{HIDDEN_USER}>")))
            .collect();
        self.refusal_logged = mailmoat_logged(mailmoat, client, "plaintext_command_refused").await;
    }

    fn problems(&self, hidden_tag: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        let logged_in: Vec<&String> = self
            .replies
            .iter()
            .filter(|l| {
                l.contains("Logged in")
                    || hidden_tag.is_some_and(|tag| l.starts_with(&format!("{tag} OK")))
            })
            .collect();
        if !logged_in.is_empty() {
            out.push(format!(
                "the client was told it is logged in: {logged_in:?}"
            ));
        }
        if !self.hidden_logins.is_empty() {
            out.push(format!(
                "Dovecot logged the hidden login: {:?}",
                self.hidden_logins
            ));
        }
        if let Err(e) = &self.upstream_verdict {
            out.push(format!("upstream leg before TLS: {e}"));
        }
        for word in ["LOGIN", "USER ", "PASS "] {
            if self.upstream_before_tls.contains(word) {
                out.push(format!(
                    "{word:?} crossed the upstream leg before TLS: {}",
                    self.upstream_before_tls
                ));
            }
        }
        if !self.refusal_logged {
            out.push("mailmoat logged no plaintext_command_refused for the session".into());
        }
        if let Err(e) = &self.after_tls {
            out.push(format!("STARTTLS and the real login afterwards: {e}"));
        }
        out
    }
}

/// Whether mailmoat's log holds `event` for the session of the client at `client`.
async fn mailmoat_logged(mailmoat: &Mailmoat, client: SocketAddr, event: &str) -> bool {
    let tag = format!("client={client}");
    let event = format!("event=\"{event}\"");
    // The refusal is logged as the command is read, before the replies the client waited
    // for; a short bounded wait covers the log file's write.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = mailmoat
            .log_text()
            .lines()
            .any(|l| l.contains(&tag) && l.contains(&event));
        if found || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Judges the upstream leg's bytes before TLS with the strict reader.
fn judge(dialect: Dialect, bytes: &[u8]) -> Result<(), String> {
    let mut reader = Canonical::new(dialect);
    reader.forwarded(bytes)?;
    reader.finish()
}

#[track_caller]
fn assert_all_clean(protocol: &str, seen: &[(Seen, Option<&str>)]) {
    let mut report = String::new();
    let mut failed = 0;
    for (seen, hidden_tag) in seen {
        let problems = seen.problems(*hidden_tag);
        if problems.is_empty() {
            continue;
        }
        failed += 1;
        report.push_str(&format!(
            "\n== {}\n   client got: {:?}\n   upstream leg before TLS: {}\n",
            seen.variant, seen.replies, seen.upstream_before_tls
        ));
        for problem in problems {
            report.push_str(&format!("   - {problem}\n"));
        }
    }
    assert!(
        failed == 0,
        "{protocol}: {failed} of {} variants broke the canonical rule:{report}",
        seen.len()
    );
}

// ---------------------------------------------------------------- IMAP

/// The IMAP variants: a line that ends in a literal (`#` is its length) where the
/// grammar allows none, and whether the client waits for `+` before the octets.
const IMAP_VARIANTS: &[(&str, bool)] = &[
    ("a NOOP ~{#+}", false),
    ("a CAPABILITY {#+}", false),
    ("a NOOP {#}", true),
    ("a LOGOUT x {#+}", false),
    ("a NOOP x {#+}", false),
    ("a CAPABILITY ~{#+}", false),
];

async fn imap_variant(
    mailmoat: &Mailmoat,
    forwarder: &Forwarder,
    head: &str,
    synchronising: bool,
) -> Seen {
    let hidden = format!("b LOGIN {HIDDEN_USER} {HIDDEN_PASSWORD}\r\n");
    let head = head.replace('#', &hidden.len().to_string());
    let mut seen = Seen::new(format!("{head:?} + {hidden:?}"));
    let tcp = traceable_tcp(([127, 0, 0, 1], mailmoat.port("imap")).into()).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("* OK "), "{greeting:?}");

    // The attack: the literal's octets are a LOGIN line of their own.
    client.send(format!("{head}\r\n").as_bytes()).await.unwrap();
    if synchronising {
        // A client waits for `+`; a refusal comes instead, and the octets follow anyway
        // (then they are a LOGIN line, which mailmoat refuses before TLS).
        let first = client.line().await.unwrap_or_else(|e| format!("<{e}>"));
        seen.replies.push(first);
    }
    let _ = client.send(hidden.as_bytes()).await;
    // An empty line ends whatever command mailmoat may think still goes on; then a NOOP
    // of a tag of its own, whose tagged reply closes what the client reads.
    let _ = client.send(b"\r\nc NOOP\r\n").await;
    seen.replies
        .extend(client.until(|l| l.starts_with("c ")).await);
    let before_tls = forwarder.snapshot();

    // STARTTLS and the real login, in the same connection.
    let after_tls = async {
        client.send(b"s STARTTLS\r\n").await?;
        let go = client.until(|l| l.starts_with("s ")).await;
        if !go.last().is_some_and(|l| l.starts_with("s OK")) {
            return Err(format!("STARTTLS: {go:?}"));
        }
        let tcp = client.stream.into_inner();
        let tls = tls_connect(tcp, "mail.example.test", &[])
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let mut tls = Lines::new(tls);
        tls.send(format!("l LOGIN {USER} {PASSWORD}\r\n").as_bytes())
            .await?;
        let login = tls.until(|l| l.starts_with("l ")).await;
        if !login.last().is_some_and(|l| l.starts_with("l OK")) {
            return Err(format!("LOGIN as {USER} after TLS: {login:?}"));
        }
        tls.send(b"z LOGOUT\r\n").await?;
        tls.until(|l| l.starts_with("z ")).await;
        Ok(())
    }
    .await;
    seen.settle(mailmoat, Dialect::Imap, client_addr, &before_tls, after_tls)
        .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_a_login_hidden_in_a_literal_of_an_allowed_command_never_reaches_dovecot() {
    let (mailmoat, imap, _pop3) = setup().await;
    let mut seen = Vec::new();
    for (head, synchronising) in IMAP_VARIANTS {
        seen.push((
            imap_variant(&mailmoat, &imap, head, *synchronising).await,
            Some("b"),
        ));
    }
    assert_all_clean("IMAP", &seen);
}

// ---------------------------------------------------------------- POP3

/// The POP3 variants: allowed verbs with junk, credentials in the junk.
const POP3_VARIANTS: &[&str] = &[
    "CAPA x\r\n",
    "NOOP USER bob@example.test\r\nNOOP PASS bob-secret-pw\r\n",
    "capa USER bob@example.test\r\nnoop PASS bob-secret-pw\r\n",
    "CAPA\tUSER bob@example.test\r\nCAPA\tPASS bob-secret-pw\r\n",
];

async fn pop3_variant(mailmoat: &Mailmoat, forwarder: &Forwarder, attack: &str) -> Seen {
    let mut seen = Seen::new(format!("{attack:?}"));
    let tcp = traceable_tcp(([127, 0, 0, 1], mailmoat.port("pop3")).into()).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("+OK"), "{greeting:?}");

    let _ = client.send(attack.as_bytes()).await;
    // STLS closes what the client reads before TLS: mailmoat answers it once every
    // earlier command is answered (POP3 goes one command at a time).
    let _ = client.send(b"STLS\r\n").await;
    seen.replies
        .extend(client.until(|l| l.starts_with("+OK Begin TLS")).await);
    let before_tls = forwarder.snapshot();

    let go_ahead = seen
        .replies
        .last()
        .is_some_and(|l| l.starts_with("+OK Begin TLS"));
    let after_tls = async {
        if !go_ahead {
            return Err("no go-ahead for STLS".to_owned());
        }
        let tcp = client.stream.into_inner();
        let tls = tls_connect(tcp, "mail.example.test", &[])
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let mut tls = Lines::new(tls);
        tls.send(format!("USER {USER}\r\n").as_bytes()).await?;
        let user = tls.line().await?;
        tls.send(format!("PASS {PASSWORD}\r\n").as_bytes()).await?;
        let pass = tls.line().await?;
        if !user.starts_with("+OK") || !pass.starts_with("+OK") {
            return Err(format!("USER/PASS as {USER} after TLS: {user:?} {pass:?}"));
        }
        tls.send(b"QUIT\r\n").await?;
        let _ = tls.line().await;
        Ok(())
    }
    .await;
    seen.settle(mailmoat, Dialect::Pop3, client_addr, &before_tls, after_tls)
        .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_credentials_in_the_arguments_of_allowed_commands_never_reach_dovecot() {
    let (mailmoat, _imap, pop3) = setup().await;
    let mut seen = Vec::new();
    for attack in POP3_VARIANTS {
        seen.push((pop3_variant(&mailmoat, &pop3, attack).await, None));
    }
    assert_all_clean("POP3", &seen);
}

/// The harness itself: a canonical dialogue through the same forwarder passes every
/// check above (it must not fail for reasons of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_passes_a_well_behaved_imap_and_pop3_client() {
    let (mailmoat, imap, pop3) = setup().await;

    let tcp = traceable_tcp(([127, 0, 0, 1], mailmoat.port("imap")).into()).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    assert!(client.line().await.unwrap().starts_with("* OK "));
    client.send(b"a CAPABILITY\r\nb NOOP\r\n").await.unwrap();
    let replies = client.until(|l| l.starts_with("b ")).await;
    assert!(replies.last().unwrap().starts_with("b OK"), "{replies:?}");
    let before_tls = imap.snapshot();
    client.send(b"s STARTTLS\r\n").await.unwrap();
    assert!(client.line().await.unwrap().starts_with("s OK"));
    let tls = tls_connect(client.stream.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut tls = Lines::new(tls);
    tls.send(format!("l LOGIN {USER} {PASSWORD}\r\n").as_bytes())
        .await
        .unwrap();
    let login = tls.until(|l| l.starts_with("l ")).await;
    assert!(login.last().unwrap().starts_with("l OK"), "{login:?}");
    let (rport, bytes) = leg_of(&before_tls, upstream_port(&mailmoat, client_addr).await);
    assert_eq!(show(&bytes), show(b"a CAPABILITY\r\nb NOOP\r\n"));
    judge(Dialect::Imap, &bytes).unwrap();
    let lines = wait_for_dovecot_login(rport, USER).await.unwrap();
    assert!(!lines.iter().any(|l| l.contains(HIDDEN_USER)), "{lines:#?}");

    let tcp = traceable_tcp(([127, 0, 0, 1], mailmoat.port("pop3")).into()).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    assert!(client.line().await.unwrap().starts_with("+OK"));
    client.send(b"CAPA\r\n").await.unwrap();
    let capa = client.until(|l| l == ".\r\n").await;
    assert!(capa.iter().any(|l| l == "STLS\r\n"), "{capa:?}");
    let before_tls = pop3.snapshot();
    client.send(b"STLS\r\n").await.unwrap();
    assert!(client.line().await.unwrap().starts_with("+OK"));
    let tls = tls_connect(client.stream.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut tls = Lines::new(tls);
    tls.send(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes())
        .await
        .unwrap();
    assert!(tls.line().await.unwrap().starts_with("+OK"));
    assert!(tls.line().await.unwrap().starts_with("+OK"));
    let (rport, bytes) = leg_of(&before_tls, upstream_port(&mailmoat, client_addr).await);
    assert_eq!(show(&bytes), show(b"CAPA\r\n"));
    wait_for_dovecot_login(rport, USER).await.unwrap();
}
