//! End to end with a real Exim 4.96 as the legacy upstream (`scripts/exim.sh`: no TLS,
//! AUTH PLAIN offered and accepted in plaintext, PIPELINING, CHUNKING) and the real
//! `mailmoat` binary, with a recording forwarder on the upstream leg. A missing Exim
//! fails these tests; it never skips them.
//!
//! The attacks are the ones a naive legacy server is open to behind a proxy whose idea
//! of where a chunk, a body or a command ends differs from the server's: a client in
//! plaintext, on an MX listener (`auth_requires_tls`), hides an `AUTH PLAIN` and a whole
//! second message where mailmoat sees message data and Exim sees commands. What must
//! hold, whatever mailmoat answers the client: Exim reads no AUTH as a command and
//! accepts no hidden message, and mailmoat logs a security event for the session.
//!
//! How each is proved: Exim's own debug trace names every line it read as a command
//! (`SMTP<< `), its main log every authentication and every message it accepted, the
//! Maildir every message delivered, and the recording of the upstream leg every byte
//! mailmoat sent Exim and every reply Exim gave (a `235` is a successful AUTH).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use common::exim::{EXIM_PASSWORD, EXIM_USER, Exim, Greeting, assert_delivered_intact};
use common::recorder::{Leg, Recorder};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// mailmoat in front of a private Exim, through a recording forwarder. Fields drop in
/// this order: mailmoat first, Exim last.
struct Rig {
    mailmoat: Mailmoat,
    recorder: Recorder,
    exim: Exim,
}

/// An MX listener (`auth_requires_tls`) and a submission listener (`require_tls`), both
/// with STARTTLS, in front of Exim.
fn rig(greeting: Greeting) -> Rig {
    let exim = Exim::start(greeting);
    let recorder = Recorder::start(exim.smtp);
    let mailmoat = Mailmoat::start(&[
        ("mx", "smtp", "starttls", "auth_requires_tls", recorder.addr),
        (
            "submission",
            "smtp",
            "starttls",
            "require_tls",
            recorder.addr,
        ),
    ]);
    Rig {
        mailmoat,
        recorder,
        exim,
    }
}

fn mailmoat_addr(rig: &Rig, listener: &str) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], rig.mailmoat.port(listener)))
}

/// `AUTH PLAIN`'s initial response for Exim's test user: the secret the attacks smuggle.
fn plain_credentials() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{EXIM_USER}\0{EXIM_PASSWORD}"))
}

// ---- a client that writes raw bytes and keeps a transcript ----

/// A plaintext client that never fails on a closed connection (mailmoat may end an
/// attacker's session at any point) and writes down everything both ways.
struct Attacker {
    stream: TcpStream,
    transcript: String,
}

impl Attacker {
    async fn connect(addr: SocketAddr) -> Attacker {
        Attacker {
            stream: traceable_tcp(addr).await,
            transcript: String::new(),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.transcript
            .push_str(&format!("C: {:?}\n", String::from_utf8_lossy(bytes)));
        let _ = within(self.stream.write_all(bytes)).await;
    }

    /// Reads what arrives until `done` holds for everything read in this call, the peer
    /// closes, or nothing more came for `quiet`; bounded by [`STEP`] in all.
    async fn read_until(&mut self, done: impl Fn(&str) -> bool, quiet: Duration) -> String {
        let deadline = Instant::now() + STEP;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !done(&String::from_utf8_lossy(&got)) && Instant::now() < deadline {
            match tokio::time::timeout(quiet, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        self.transcript.push_str(&format!("S: {text:?}\n"));
        text
    }

    /// At least one complete reply line (or a closed connection).
    async fn reply(&mut self) -> String {
        self.read_until(|text| text.contains("\r\n"), STEP).await
    }

    /// QUIT, then whatever comes until the peer closes or is quiet for 5 s.
    async fn quit(&mut self) {
        self.send(b"QUIT\r\n").await;
        self.read_until(|_| false, Duration::from_secs(5)).await;
    }
}

/// Greeting, EHLO, and an envelope for alice, in plaintext on the MX listener.
async fn plaintext_envelope(attacker: &mut Attacker) {
    attacker.reply().await;
    attacker.send(b"EHLO attacker.example\r\n").await;
    let ehlo = attacker.read_until(|t| t.contains("250 "), STEP).await;
    // Exim offers CHUNKING and AUTH; mailmoat passes neither (BDAT is never forwarded,
    // ARCHITECTURE.md §5; AUTH waits for TLS).
    assert!(
        !ehlo.contains("CHUNKING") && ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    attacker
        .send(b"MAIL FROM:<mallory@attacker.example>\r\n")
        .await;
    attacker.reply().await;
    attacker.send(b"RCPT TO:<alice@example.test>\r\n").await;
    assert!(attacker.reply().await.starts_with("250"));
}

/// mailmoat in front of an ESMTP Exim, and an attacker on the MX listener that has an
/// envelope for alice ([`plaintext_envelope`]).
async fn rig_and_attacker() -> (Rig, Attacker) {
    let rig = rig(Greeting::Esmtp);
    let mut attacker = Attacker::connect(mailmoat_addr(&rig, "mx")).await;
    plaintext_envelope(&mut attacker).await;
    (rig, attacker)
}

// ---- what the session left behind, on every side ----

/// One session as every party saw it.
struct Evidence {
    /// mailmoat's log lines for the session.
    mailmoat: Vec<String>,
    /// The upstream leg, both ways.
    leg: Leg,
    /// What Exim read as commands.
    exim_commands: Vec<String>,
    /// Exim's main log for the session.
    exim_log: Vec<String>,
}

/// Waits (bounded) for the end of the session of the client at `client`, the end of its
/// upstream leg, and Exim's last delivery; returns what each side recorded.
fn evidence(rig: &Rig, client: SocketAddr) -> Evidence {
    let tag = format!("client={client}");
    let lines = poll_for(STEP, || {
        let lines: Vec<String> = rig
            .mailmoat
            .log_text()
            .lines()
            .filter(|line| line.contains(&tag))
            .map(str::to_owned)
            .collect();
        lines
            .iter()
            .any(|l| l.contains("event=\"session_end\""))
            .then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "no session_end for {client} in mailmoat's log:\n{}",
            rig.mailmoat.log_text()
        )
    });
    let upstream_port: u16 = lines
        .iter()
        .find_map(|line| {
            let rest = &line[line.find("upstream_port=")? + "upstream_port=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no upstream_port in the session's lines: {lines:#?}"));
    let leg = rig.recorder.closed_leg(upstream_port);
    rig.exim.wait_idle();
    Evidence {
        mailmoat: lines,
        exim_commands: rig.exim.session_commands(leg.upstream_port),
        exim_log: rig.exim.session_log(leg.upstream_port),
        leg,
    }
}

/// mailmoat's security events of the session: its warnings and errors with an `event`,
/// except those about the upstream misbehaving, which say nothing about the client.
fn security_events(evidence: &Evidence) -> Vec<&String> {
    evidence
        .mailmoat
        .iter()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("event="))
        .filter(|l| !l.contains("event=\"upstream_"))
        .collect()
}

/// Whether the smuggled credentials may reach the upstream as message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    /// They are in bytes that can belong to a message: mailmoat may relay them as data.
    MayCrossAsData,
    /// They are in bytes that belong to no message: mailmoat must not relay them.
    MustNotCrossTheLeg,
}

/// The entries of `lines` that `keep` holds for.
fn those(lines: &[String], keep: impl Fn(&String) -> bool) -> Vec<&String> {
    lines.iter().filter(|line| keep(line)).collect()
}

/// The safe outcome of an attack that hid `AUTH PLAIN` and a message with `hidden` as
/// its subject from `ceo@bank.example`: checked all at once, so that a failure shows
/// every way the attack got through, with the evidence.
fn assert_nothing_smuggled(
    rig: &Rig,
    attacker: &Attacker,
    hidden: &str,
    credentials: Credentials,
) -> Evidence {
    let evidence = evidence(rig, attacker.local_addr());
    let mut got_through = Vec::new();
    if credentials == Credentials::MustNotCrossTheLeg
        && memchr::memmem::find(&evidence.leg.to_upstream, plain_credentials().as_bytes()).is_some()
    {
        got_through.push("the plaintext credentials crossed the upstream leg".to_owned());
    }
    let replies = evidence.leg.replies();
    for (what, found) in [
        (
            "Exim read AUTH as a command",
            those(&evidence.exim_commands, |c| {
                c.to_ascii_uppercase().starts_with("AUTH")
            }),
        ),
        (
            "Exim read the hidden envelope as commands",
            those(&evidence.exim_commands, |c| c.contains("ceo@bank.example")),
        ),
        (
            "Exim accepted an AUTH",
            those(&replies, |r| r.starts_with("235")),
        ),
        (
            "Exim logged authentication",
            those(&evidence.exim_log, |l| {
                l.contains("A=plain") || l.contains("authenticator")
            }),
        ),
        (
            "Exim accepted the hidden message",
            those(&evidence.exim_log, |l| {
                l.contains(" <= ") && l.contains(hidden)
            }),
        ),
    ] {
        if !found.is_empty() {
            got_through.push(format!("{what}: {found:?}"));
        }
    }
    for message in rig.exim.messages_with_subject(hidden) {
        got_through.push(format!(
            "the hidden message was delivered:\n{}",
            String::from_utf8_lossy(&message)
        ));
    }
    if security_events(&evidence).is_empty() {
        got_through.push("mailmoat logged no security event for the session".to_owned());
    }
    assert!(
        got_through.is_empty(),
        "the attack got through:\n- {}\n\nclient transcript:\n{}\nExim read these commands:\n{}\n\
         Exim's log of the session:\n{}\nmailmoat's log of the session:\n{}",
        got_through.join("\n- "),
        attacker.transcript,
        evidence.exim_commands.join("\n"),
        evidence.exim_log.join("\n"),
        evidence.mailmoat.join("\n"),
    );
    evidence
}

/// The second chunk of a smuggling attempt, in two writes: up to the hidden DATA, and
/// (once Exim may have said 354) the hidden message. mailmoat, if it takes the chunk for
/// one, relays each part as it comes; Exim, if it takes the bytes for commands, checks
/// that nothing follows DATA in the same read (its synchronisation check), so the
/// hidden message must come later.
async fn send_second_chunk(attacker: &mut Attacker, commands: &str, hidden: &str) {
    let message =
        format!("Subject: {hidden}\r\nFrom: <ceo@bank.example>\r\n\r\nhidden body\r\n.\r\n");
    let size = commands.len() + message.len();
    attacker
        .send(format!("BDAT {size}\r\n{commands}").as_bytes())
        .await;
    attacker
        .read_until(
            |t| t.contains("\r\n354 ") || t.starts_with("354 "),
            Duration::from_secs(2),
        )
        .await;
    attacker.send(message.as_bytes()).await;
    attacker
        .read_until(|t| t.contains("250 OK id="), Duration::from_secs(2))
        .await;
    attacker.quit().await;
}

const FIRST_CHUNK: &str = "Subject: first, never finished\r\n\r\nfirst chunk\r\n";

/// [`FIRST_CHUNK`] by BDAT, not the last chunk, and the reply.
async fn send_first_chunk(attacker: &mut Attacker) {
    attacker
        .send(format!("BDAT {}\r\n{FIRST_CHUNK}", FIRST_CHUNK.len()).as_bytes())
        .await;
    attacker.reply().await;
}

/// The smuggling attempt as first reported: a chunk that is not the last, RSET, and a
/// second chunk with an end-of-data line, AUTH PLAIN and a hidden message. Exim 4.96
/// answers the second BDAT with 503 (no transaction after RSET) and reads its chunk as
/// data all the same, so Exim itself is not fooled; but the chunk belongs to no message
/// after RSET, and the plaintext credentials in it must not cross the upstream leg.
#[tokio::test]
async fn bdat_rset_bdat_smuggles_no_auth_and_no_message_into_exim() {
    let (rig, mut attacker) = rig_and_attacker().await;
    let hidden = unique("hidden-after-rset");
    send_first_chunk(&mut attacker).await;
    attacker.send(b"RSET\r\n").await;
    attacker.reply().await;
    let commands = format!(
        "more of the first message\r\n.\r\nAUTH PLAIN {}\r\nMAIL FROM:<ceo@bank.example>\r\n\
         RCPT TO:<hidden@example.test>\r\nDATA\r\n",
        plain_credentials()
    );
    send_second_chunk(&mut attacker, &commands, &hidden).await;

    assert_nothing_smuggled(&rig, &attacker, &hidden, Credentials::MustNotCrossTheLeg);
}

/// The same with any command but BDAT after the first chunk (MAIL here, which an MX
/// allows in plaintext): Exim 4.96 refuses it ("503 only BDAT permissible after non-LAST
/// BDAT") and from then on reads every line as a command until an RSET, the next BDAT
/// line and its chunk included. mailmoat relays that chunk by its size, as data; Exim
/// reads the RSET at its start, then AUTH PLAIN (235 without TLS) and a whole message.
#[tokio::test]
async fn a_chunk_exim_reads_as_commands_smuggles_no_auth_and_no_message() {
    let (rig, mut attacker) = rig_and_attacker().await;
    let hidden = unique("hidden-in-chunk");
    send_first_chunk(&mut attacker).await;
    attacker
        .send(b"MAIL FROM:<mallory@attacker.example>\r\n")
        .await;
    attacker.reply().await;
    let commands = format!(
        "RSET\r\nAUTH PLAIN {}\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<hidden@example.test>\r\n\
         DATA\r\n",
        plain_credentials()
    );
    send_second_chunk(&mut attacker, &commands, &hidden).await;

    assert_nothing_smuggled(&rig, &attacker, &hidden, Credentials::MayCrossAsData);
}

/// A body line made of a NUL and a dot, then lines that would be commands: Exim 4.96
/// takes the line for content, a server that drops NULs first would take it for the
/// end of data. Either way mailmoat's and the upstream's ends of data must agree, and a
/// NUL before the dot is an attempt worth an event.
#[tokio::test]
async fn a_nul_dot_line_in_a_data_body_smuggles_no_auth_and_no_message() {
    let (rig, mut attacker) = rig_and_attacker().await;
    let outer = unique("nul-outer");
    let hidden = unique("nul-hidden");
    attacker.send(b"DATA\r\n").await;
    attacker.reply().await;
    let body = format!(
        "Subject: {outer}\r\n\r\nouter body\r\n\0.\r\nAUTH PLAIN {}\r\n\
         MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<hidden@example.test>\r\nDATA\r\n\
         Subject: {hidden}\r\n\r\nhidden body\r\n.\r\n",
        plain_credentials()
    );
    attacker.send(body.as_bytes()).await;
    attacker
        .read_until(|t| t.contains("\r\n"), Duration::from_secs(5))
        .await;
    attacker.quit().await;

    let evidence = assert_nothing_smuggled(&rig, &attacker, &hidden, Credentials::MayCrossAsData);
    let mail = evidence
        .exim_commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("MAIL"))
        .count();
    assert_eq!(mail, 1, "{:#?}", evidence.exim_commands);
}

// ---- ordinary mail must still flow ----

/// A message with lines that look like protocol (content inside a body) and a line with
/// a leading dot, then `lines` 80-byte lines.
fn message(tag: &str, lines: usize) -> Vec<u8> {
    let mut message = format!(
        "From: Bob <bob@remote.example>\r\nTo: Alice <alice@example.test>\r\nSubject: {tag}\r\n\
         Message-ID: <{tag}@client.example>\r\n\r\nSTARTTLS\r\nAUTH PLAIN AGFsaWNl\r\n\
         .leading dot\r\n"
    )
    .into_bytes();
    for index in 0..lines {
        message.extend_from_slice(
            format!(
                "{index:08} abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/\r\n"
            )
            .as_bytes(),
        );
    }
    message
}

/// MAIL FROM bob and RCPT TO alice, each answered 250.
async fn envelope<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>) {
    assert!(
        client
            .cmd("MAIL FROM:<bob@remote.example>")
            .await
            .starts_with("250")
    );
    assert!(
        client
            .cmd("RCPT TO:<alice@example.test>")
            .await
            .starts_with("250")
    );
}

/// One message by BDAT in two chunks (the second LAST), refused, then one by DATA, in
/// one session, their subjects unique and starting with `label`: the DATA message
/// reaches Exim intact, the BDAT one never.
async fn send_bdat_and_data<S: AsyncRead + AsyncWrite + Unpin>(
    rig: &Rig,
    client: &mut Client<S>,
    label: &str,
) {
    let (bdat_tag, data_tag) = (
        unique(&format!("{label}-bdat")),
        unique(&format!("{label}-data")),
    );
    let (bdat, data) = (message(&bdat_tag, 500), message(&data_tag, 500));
    let (first, second) = bdat.split_at(bdat.len() / 3);
    envelope(client).await;
    // A client that uses BDAT although it was not offered: refused by mailmoat, each
    // chunk read and dropped.
    client
        .send(&[format!("BDAT {}\r\n", first.len()).as_bytes(), first].concat())
        .await;
    let reply = client.reply().await;
    assert_eq!(reply, "502 5.5.1 Error: command not implemented\r\n");
    client
        .send(&[format!("BDAT {} LAST\r\n", second.len()).as_bytes(), second].concat())
        .await;
    let reply = client.reply().await;
    assert_eq!(reply, "502 5.5.1 Error: command not implemented\r\n");
    assert!(client.cmd("RSET").await.starts_with("250"));

    envelope(client).await;
    assert!(client.cmd("DATA").await.starts_with("354 "));
    client.send(&dot_stuffed(&data)).await;
    let reply = client.reply().await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    assert_delivered_intact(
        &rig.exim.wait_for_delivery(&data_tag),
        &data,
        "bob@remote.example",
    );
    assert!(rig.exim.messages_with_subject(&bdat_tag).is_empty());
}

#[tokio::test]
async fn data_messages_reach_exim_intact_and_bdat_never_does_in_plaintext_and_after_starttls() {
    let rig = rig(Greeting::Esmtp);

    // The MX in plaintext.
    let mut client = connect(mailmoat_addr(&rig, "mx")).await;
    assert!(client.reply().await.starts_with("220 "));
    let ehlo = client.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("CHUNKING"), "{ehlo}");
    send_bdat_and_data(&rig, &mut client, "mx").await;

    // Submission, after STARTTLS: AUTH is back, CHUNKING still never offered.
    let mut client = connect(mailmoat_addr(&rig, "submission")).await;
    assert!(client.reply().await.starts_with("220 "));
    assert!(
        client
            .cmd("EHLO client.example")
            .await
            .contains("250 STARTTLS\r\n")
    );
    let mut client = client.starttls().await;
    let ehlo = client.cmd("EHLO client.example").await;
    assert!(
        !ehlo.contains("CHUNKING") && ehlo.contains("AUTH PLAIN"),
        "{ehlo}"
    );
    send_bdat_and_data(&rig, &mut client, "tls").await;
}

// ---- a HELO-only legacy server ----

/// Exim refusing EHLO (ARCHITECTURE.md §2, §9): before TLS the client's EHLO gets 250 with
/// STARTTLS; after TLS its new EHLO (RFC 3207 §4.2 requires one) gets 250 too, not
/// Exim's 500, and mail goes through.
#[tokio::test]
async fn a_helo_only_exim_still_answers_ehlo_with_250_before_and_after_starttls() {
    let rig = rig(Greeting::HeloOnly);
    for listener in ["mx", "submission"] {
        let tag = unique(&format!("helo-only-{listener}"));
        let sent = message(&tag, 20);
        let mut client = connect(mailmoat_addr(&rig, listener)).await;
        assert!(client.reply().await.starts_with("220 "));
        let ehlo = client.cmd("EHLO client.example").await;
        assert!(
            ehlo.starts_with("250") && ehlo.ends_with("250 STARTTLS\r\n"),
            "{listener}: {ehlo}"
        );
        let mut client = client.starttls().await;
        let ehlo = client.cmd("EHLO client.example").await;
        assert!(
            ehlo.starts_with("250") && !ehlo.contains("STARTTLS"),
            "{listener}: EHLO after STARTTLS got {ehlo:?}; Exim's log:\n{}",
            rig.exim.mainlog_text()
        );
        let reply = client.cmd("MAIL FROM:<bob@remote.example>").await;
        assert!(reply.starts_with("250"), "{listener}: {reply}");
        let reply = client.cmd("RCPT TO:<alice@example.test>").await;
        assert!(reply.starts_with("250"), "{listener}: {reply}");
        assert!(client.cmd("DATA").await.starts_with("354 "));
        client.send(&dot_stuffed(&sent)).await;
        let reply = client.reply().await;
        assert!(reply.starts_with("250 "), "{listener}: {reply}");
        assert!(client.cmd("QUIT").await.starts_with("221 "));
        assert_delivered_intact(
            &rig.exim.wait_for_delivery(&tag),
            &sent,
            "bob@remote.example",
        );
    }
}
