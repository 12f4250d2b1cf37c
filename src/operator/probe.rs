//! Probes one upstream the way mailmoat would meet it: connect, read the greeting, ask
//! for its capabilities, and for SMTP try to relay to a foreign domain (the open-relay
//! trap of ARCHITECTURE.md §7). Used by `mailmoat check`; `mailmoat explain` reuses the reply
//! assembly to read what its scripted client is shown, and `explain --domain` the
//! [`Conversation`] to probe an MX before and after STARTTLS.
//!
//! Reply assembly ([`Assembler`]) is sans-I/O and unit-tested; [`Conversation`] adds the
//! stream with a bounded line length, a bounded total and a deadline per reply.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{ListenerConfig, Protocol, Timeouts, UpstreamAddr};
use crate::inbound::identity::Origin;
use crate::inbound::upstream::{self, Route};
use crate::proto::line::Framer;
use crate::proto::smtp::xclient;

/// Longest line read from an upstream, CRLF included.
pub const MAX_LINE_LEN: usize = 8192;
/// Most lines in one reply (an EHLO reply has a dozen, a CAPA list about as many).
pub const MAX_REPLY_LINES: usize = 256;
/// Most bytes read from one upstream in one probe.
pub const MAX_TOTAL_BYTES: usize = 256 * 1024;

/// The name mailmoat gives in EHLO/HELO while probing.
pub const PROBE_HELO_NAME: &str = "check.mailmoat.invalid";
/// The sender of the relay probe.
pub const RELAY_PROBE_SENDER: &str = "mailmoat-check@example.org";
/// The foreign recipient of the relay probe. `.invalid` can never be one of the
/// upstream's own domains (RFC 2606 §2), so only an open relay accepts it; Postfix's
/// `reject_unauth_destination` refuses it before any DNS lookup.
pub const RELAY_PROBE_RECIPIENT: &str = "relay-probe@relay-test.mailmoat.invalid";

/// Why a probe could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TCP connect or unix socket connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The upstream.
        addr: UpstreamAddr,
        /// Why.
        source: io::Error,
    },
    /// A deadline expired.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What mailmoat waited for.
        waiting_for: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// Reading or writing failed.
    #[error("i/o error while waiting for {waiting_for}: {source}")]
    Io {
        /// What mailmoat waited for.
        waiting_for: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The upstream closed the connection.
    #[error("the upstream closed the connection while mailmoat waited for {0}")]
    Closed(&'static str),
    /// A line or a reply beyond the bounds.
    #[error("the upstream sent {0}")]
    TooLarge(&'static str),
    /// Something that is not the expected protocol.
    #[error("{0}")]
    Protocol(String),
}

/// A complete reply, one entry per line, without line ends (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// The lines in order.
    pub lines: Vec<String>,
}

impl Reply {
    /// The SMTP reply code of the first line (RFC 5321 §4.2), if it has one.
    pub fn smtp_code(&self) -> Option<u16> {
        self.lines.first().and_then(|line| smtp_code(line))
    }

    /// The last line: the tagged status (IMAP), the final code line (SMTP).
    pub fn last(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }

    /// The reply on one line, for messages: lines joined by ` / `.
    pub fn one_line(&self) -> String {
        self.lines.join(" / ")
    }
}

/// What ends the reply being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// An SMTP reply: `DDD-text` lines, ended by `DDD text` (RFC 5321 §4.2.1).
    Smtp,
    /// An IMAP greeting: one untagged line (RFC 9051 §7.1).
    ImapGreeting,
    /// IMAP untagged lines ended by the line tagged so (RFC 9051 §2.2.2).
    ImapTagged(String),
    /// One POP3 status line, `+OK` or `-ERR` (RFC 1939 §3).
    Pop3Status,
    /// A POP3 status line and, after `+OK`, lines up to a lone `.` (RFC 1939 §3).
    Pop3Multiline,
}

/// Which mail protocol a greeting line looks like.
pub fn greeting_protocol(line: &str) -> Option<Protocol> {
    if smtp_code(line).is_some() {
        Some(Protocol::Smtp)
    } else if line.starts_with("* ") {
        Some(Protocol::Imap)
    } else if line.starts_with("+OK") || line.starts_with("-ERR") {
        Some(Protocol::Pop3)
    } else {
        None
    }
}

/// `reply-code = %x32-35 %x30-35 %x30-39` (RFC 5321 §4.2), followed by SP, `-` or the
/// end of the line.
fn smtp_code(line: &str) -> Option<u16> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 3 && !matches!(bytes[3], b' ' | b'-') {
        return None;
    }
    line[..3].parse().ok()
}

/// Collects lines into one reply of the expected kind.
#[derive(Debug)]
pub struct Assembler {
    expect: Expect,
    lines: Vec<String>,
}

impl Assembler {
    /// Starts a reply of the kind `expect`.
    pub fn new(expect: Expect) -> Self {
        Assembler {
            expect,
            lines: Vec::new(),
        }
    }

    /// Adds one line (without its line end). Returns the reply once it is complete,
    /// a protocol error when the line cannot belong to such a reply.
    pub fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, Error> {
        let text = String::from_utf8_lossy(line).into_owned();
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(Error::TooLarge("a reply with too many lines"));
        }
        let first = self.lines.is_empty();
        let done = match &self.expect {
            Expect::Smtp => {
                let Some(code) = smtp_code(&text) else {
                    return Err(Error::Protocol(format!(
                        "expected an SMTP reply line (three digits), got {}",
                        quoted(&text)
                    )));
                };
                if let Some(previous) = self.lines.first().and_then(|l| smtp_code(l))
                    && previous != code
                {
                    return Err(Error::Protocol(format!(
                        "SMTP reply lines with different codes: {previous} then {code}"
                    )));
                }
                text.as_bytes().get(3) != Some(&b'-')
            }
            Expect::ImapGreeting => {
                if !text.starts_with("* ") {
                    return Err(Error::Protocol(format!(
                        "expected an untagged IMAP greeting, got {}",
                        quoted(&text)
                    )));
                }
                true
            }
            Expect::ImapTagged(tag) => {
                let tagged = text
                    .strip_prefix(tag.as_str())
                    .is_some_and(|rest| rest.starts_with(' '));
                if !tagged && !text.starts_with("* ") {
                    return Err(Error::Protocol(format!(
                        "expected untagged IMAP lines or `{tag} OK`, got {}",
                        quoted(&text)
                    )));
                }
                tagged
            }
            Expect::Pop3Status => {
                pop3_status(&text)?;
                true
            }
            Expect::Pop3Multiline => {
                if first {
                    // After -ERR no list follows.
                    !pop3_status(&text)?
                } else {
                    text == "."
                }
            }
        };
        self.lines.push(text);
        if done {
            Ok(Some(Reply {
                lines: std::mem::take(&mut self.lines),
            }))
        } else {
            Ok(None)
        }
    }
}

/// True for `+OK`, false for `-ERR`, an error otherwise.
fn pop3_status(line: &str) -> Result<bool, Error> {
    let word = line.split(' ').next().unwrap_or("");
    match word {
        "+OK" => Ok(true),
        "-ERR" => Ok(false),
        _ => Err(Error::Protocol(format!(
            "expected a POP3 status line (+OK or -ERR), got {}",
            quoted(line)
        ))),
    }
}

/// A line from the upstream in a message: debug-quoted so that it cannot forge output
/// lines, and cut at 200 characters.
pub fn quoted(line: &str) -> String {
    let cut: String = line.chars().take(200).collect();
    format!("{cut:?}")
}

/// One probe connection: bounded line reads, a deadline per reply, and the transcript.
/// On an upstream, or (`explain --domain`) on an MX, before and after STARTTLS.
pub struct Conversation<S = upstream::Stream> {
    stream: S,
    buffer: BytesMut,
    framer: Framer,
    total: usize,
    reply_timeout: Duration,
    /// `C: ` and `S: ` lines, mailmoat being the client.
    pub transcript: Vec<String>,
}

impl Conversation {
    /// Connects within `timeouts.upstream_connect`; replies are awaited for at most
    /// `timeouts.greeting` each.
    pub async fn open(route: &Route, timeouts: &Timeouts) -> Result<Self, Error> {
        // Connects exactly as a client session does, so from the same source address.
        let stream = tokio::time::timeout(timeouts.upstream_connect, upstream::connect(route))
            .await
            .map_err(|_| Error::Timeout {
                waiting_for: "connection",
                after: timeouts.upstream_connect,
            })?
            .map_err(|source| Error::Connect {
                addr: route.addr.clone(),
                source,
            })?;
        Ok(Self::new(stream, timeouts.greeting))
    }

    /// The local address of a TCP connection.
    pub fn source(&self) -> Option<std::net::IpAddr> {
        match &self.stream {
            upstream::Stream::Tcp(tcp) => tcp.local_addr().ok().map(|addr| addr.ip()),
            upstream::Stream::Unix(_) => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conversation<S> {
    /// A conversation on a connected stream.
    pub fn new(stream: S, reply_timeout: Duration) -> Self {
        Conversation {
            stream,
            buffer: BytesMut::new(),
            framer: Framer::new(MAX_LINE_LEN),
            total: 0,
            reply_timeout,
            transcript: Vec::new(),
        }
    }

    /// Ends the conversation on this stream, for a switch to TLS after `220` to
    /// STARTTLS: the stream and the transcript so far. Bytes read past the last reply
    /// are an error, never carried into TLS: nothing may follow the `220` (RFC 3207
    /// §4.2, §6).
    pub fn into_parts(self) -> Result<(S, Vec<String>), Error> {
        if !self.buffer.is_empty() {
            return Err(Error::Protocol(format!(
                "{} bytes followed the reply to STARTTLS",
                self.buffer.len()
            )));
        }
        Ok((self.stream, self.transcript))
    }

    /// Sends one command line (CRLF appended).
    pub async fn send(&mut self, line: &str) -> Result<(), Error> {
        self.transcript.push(format!("C: {line}"));
        let write = async {
            self.stream
                .write_all(format!("{line}\r\n").as_bytes())
                .await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.reply_timeout, write)
            .await
            .map_err(|_| Error::Timeout {
                waiting_for: "the upstream to read a command",
                after: self.reply_timeout,
            })?
            .map_err(|source| Error::Io {
                waiting_for: "the upstream to read a command",
                source,
            })
    }

    /// Reads one complete reply of the kind `expect`.
    pub async fn reply(
        &mut self,
        expect: Expect,
        waiting_for: &'static str,
    ) -> Result<Reply, Error> {
        let mut assembler = Assembler::new(expect);
        let deadline = tokio::time::Instant::now() + self.reply_timeout;
        loop {
            while let Some(line) = self
                .framer
                .next_line(&mut self.buffer)
                .map_err(|_| Error::TooLarge("a line longer than 8192 bytes"))?
            {
                self.transcript
                    .push(format!("S: {}", String::from_utf8_lossy(&line.text)));
                if let Some(reply) = assembler.push(&line.text)? {
                    return Ok(reply);
                }
            }
            if self.total >= MAX_TOTAL_BYTES {
                return Err(Error::TooLarge("more than 256 KiB"));
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| Error::Timeout {
                    waiting_for,
                    after: self.reply_timeout,
                })?
                .map_err(|source| Error::Io {
                    waiting_for,
                    source,
                })?;
            if read == 0 {
                return Err(Error::Closed(waiting_for));
            }
            self.total += read;
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Sends a command and reads its reply.
    pub async fn command(
        &mut self,
        line: &str,
        expect: Expect,
        waiting_for: &'static str,
    ) -> Result<Reply, Error> {
        self.send(line).await?;
        self.reply(expect, waiting_for).await
    }
}

/// What the relay probe found out (SMTP upstreams only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayVerdict {
    /// RCPT to the foreign domain was refused as relaying (5xx with `5.7.x` or naming
    /// relaying): no open relay.
    Refused(Reply),
    /// RCPT was refused for good, but for another reason (say the domain does not
    /// exist): the upstream may still relay to domains that do.
    RecipientRefused(Reply),
    /// RCPT to the foreign domain was accepted (2xx): the upstream would relay.
    WouldRelay(Reply),
    /// A temporary refusal (4xx) or an odd reply: it cannot be told.
    Inconclusive(Reply),
    /// The sender was refused, so no recipient could be tried.
    SenderRefused(Reply),
}

/// What a probe learnt about an upstream that speaks the listener's protocol.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// The greeting.
    pub greeting: Reply,
    /// The EHLO (or HELO), CAPABILITY or CAPA reply.
    pub capabilities: Reply,
    /// SMTP: the upstream refused EHLO and answered HELO (ARCHITECTURE.md §2).
    pub helo_only: bool,
    /// SMTP: the relay probe's result.
    pub relay: Option<RelayVerdict>,
    /// The address the probe connected from (TCP upstreams): the one the upstream sees.
    pub source: Option<std::net::IpAddr>,
    /// Things worth a warning (`warning:` lines in `check`).
    pub warnings: Vec<String>,
    /// The whole dialogue, `C:` being mailmoat.
    pub transcript: Vec<String>,
}

/// Probes the upstream of `listener`.
pub async fn probe(listener: &ListenerConfig, timeouts: &Timeouts) -> Result<Findings, Error> {
    // Connects as a session of this listener would, for a client from outside: from
    // its source_address, with its PROXY header (ARCHITECTURE.md §7).
    let origin = Origin::outside(listener.listen);
    let route = Route::for_listener(listener, &origin);
    let mut conversation = Conversation::open(&route, timeouts).await?;
    let mut findings = Findings {
        source: conversation.source(),
        ..Findings::default()
    };
    let result = match listener.protocol {
        Protocol::Smtp => {
            let xclient = listener.xclient.then_some(&origin);
            probe_smtp(&mut conversation, &mut findings, xclient).await
        }
        Protocol::Imap => probe_imap(&mut conversation, &mut findings).await,
        Protocol::Pop3 => probe_pop3(&mut conversation, &mut findings).await,
    };
    findings.transcript = std::mem::take(&mut conversation.transcript);
    result.map(|()| findings)
}

/// Reads the greeting; a greeting of another protocol is named as such.
async fn greeting(
    conversation: &mut Conversation,
    expected: Protocol,
    expect: Expect,
) -> Result<Reply, Error> {
    let result = conversation.reply(expect, "the greeting").await;
    if let Err(Error::Protocol(_)) = &result {
        let first = conversation
            .transcript
            .last()
            .and_then(|line| line.strip_prefix("S: "))
            .unwrap_or("");
        if let Some(actual) = greeting_protocol(first).filter(|p| *p != expected) {
            return Err(Error::Protocol(format!(
                "the upstream speaks {}, not {}: it greeted with {} (is this the right port?)",
                protocol_name(actual),
                protocol_name(expected),
                quoted(first)
            )));
        }
    }
    result
}

/// The protocol's name as people write it.
pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Smtp => "SMTP",
        Protocol::Imap => "IMAP",
        Protocol::Pop3 => "POP3",
    }
}

async fn probe_smtp(
    conversation: &mut Conversation,
    findings: &mut Findings,
    xclient: Option<&Origin>,
) -> Result<(), Error> {
    let greeting = greeting(conversation, Protocol::Smtp, Expect::Smtp).await?;
    // RFC 5321 §3.1: 220 is the only greeting that opens a session; 554 refuses it.
    if greeting.smtp_code() != Some(220) {
        return Err(Error::Protocol(format!(
            "the upstream refused the session: {}",
            quoted(&greeting.one_line())
        )));
    }
    findings.greeting = greeting;
    let ehlo = conversation
        .command(
            &format!("EHLO {PROBE_HELO_NAME}"),
            Expect::Smtp,
            "the EHLO reply",
        )
        .await?;
    findings.capabilities = if ehlo.smtp_code() == Some(250) {
        ehlo
    } else {
        // A HELO-only legacy server (RFC 5321 §3.2: fall back to HELO).
        let helo = conversation
            .command(
                &format!("HELO {PROBE_HELO_NAME}"),
                Expect::Smtp,
                "the HELO reply",
            )
            .await?;
        if helo.smtp_code() != Some(250) {
            return Err(Error::Protocol(format!(
                "the upstream refused both EHLO and HELO: {}",
                quoted(&helo.one_line())
            )));
        }
        findings.helo_only = true;
        findings.warnings.push(format!(
            "the upstream refused EHLO ({}); mailmoat answers EHLO with its HELO greeting plus \
             STARTTLS, and clients get no SMTP extensions",
            quoted(&ehlo.one_line())
        ));
        helo
    };
    if let Some(origin) = xclient {
        present_outside_client(conversation, findings, origin).await?;
    }
    findings.relay = Some(relay_probe(conversation).await?);
    // Leave cleanly; a failure here changes nothing that was learnt.
    let _ = conversation
        .command("QUIT", Expect::Smtp, "the QUIT reply")
        .await;
    Ok(())
}

/// A listener with `xclient: true` tells the upstream who each client is; the probe
/// sends the very XCLIENT a session sends (Postfix XCLIENT_README) for a client from
/// outside, so that the relay trap tests what a stranger would be allowed. Sessions fail
/// closed without XCLIENT, so an upstream that does not take it is an error.
async fn present_outside_client(
    conversation: &mut Conversation,
    findings: &mut Findings,
    origin: &Origin,
) -> Result<(), Error> {
    let announced = findings
        .capabilities
        .lines
        .iter()
        .find_map(|line| xclient::announced(line.get(4..)?.as_bytes()));
    let Some(announced) = announced else {
        return Err(Error::Protocol(
            "xclient is configured but the upstream does not announce XCLIENT: every \
             session would be refused with 421 (add mailmoat's address to \
             smtpd_authorized_xclient_hosts)"
                .into(),
        ));
    };
    let identity = xclient::Identity {
        client: origin.client,
        destination: origin.destination,
    };
    let Some(command) = xclient::command(&identity, &announced) else {
        return Err(Error::Protocol(
            "the upstream's XCLIENT does not take ADDR: every session would be refused \
             with 421"
                .into(),
        ));
    };
    let command = String::from_utf8_lossy(&command);
    let reply = conversation
        .command(
            command.trim_end_matches("\r\n"),
            Expect::Smtp,
            "the XCLIENT reply",
        )
        .await?;
    // A 220 is a new greeting; the session starts over with EHLO.
    if reply.smtp_code() != Some(220) {
        return Err(Error::Protocol(format!(
            "the upstream refused XCLIENT ({}): every session would be refused with 421",
            quoted(&reply.one_line())
        )));
    }
    conversation
        .command(
            &format!("EHLO {PROBE_HELO_NAME}"),
            Expect::Smtp,
            "the EHLO reply after XCLIENT",
        )
        .await?;
    Ok(())
}

/// The open-relay trap (ARCHITECTURE.md §7): an unauthenticated envelope to a foreign domain,
/// then RSET. DATA is never sent, so nothing can be delivered.
async fn relay_probe(conversation: &mut Conversation) -> Result<RelayVerdict, Error> {
    let mail = conversation
        .command(
            &format!("MAIL FROM:<{RELAY_PROBE_SENDER}>"),
            Expect::Smtp,
            "the MAIL FROM reply",
        )
        .await?;
    if mail.smtp_code().is_none_or(|code| code / 100 != 2) {
        let _ = conversation
            .command("RSET", Expect::Smtp, "the RSET reply")
            .await;
        return Ok(RelayVerdict::SenderRefused(mail));
    }
    let rcpt = conversation
        .command(
            &format!("RCPT TO:<{RELAY_PROBE_RECIPIENT}>"),
            Expect::Smtp,
            "the RCPT TO reply",
        )
        .await?;
    conversation
        .command("RSET", Expect::Smtp, "the RSET reply")
        .await?;
    Ok(match rcpt.smtp_code().map(|code| code / 100) {
        Some(2) => RelayVerdict::WouldRelay(rcpt),
        Some(5) if is_relay_denial(&rcpt) => RelayVerdict::Refused(rcpt),
        Some(5) => RelayVerdict::RecipientRefused(rcpt),
        _ => RelayVerdict::Inconclusive(rcpt),
    })
}

/// A refusal that names relaying: enhanced status `5.7.x` (security or policy, RFC 3463
/// §3.8, e.g. Postfix `554 5.7.1 Relay access denied`) or the word "relay" (servers
/// without enhanced status codes, e.g. `550 relaying denied`).
pub fn is_relay_denial(reply: &Reply) -> bool {
    reply.lines.iter().any(|line| {
        let text = line.get(4..).unwrap_or("");
        text.starts_with("5.7.") || text.to_ascii_lowercase().contains("relay")
    })
}

async fn probe_imap(conversation: &mut Conversation, findings: &mut Findings) -> Result<(), Error> {
    let greeting = greeting(conversation, Protocol::Imap, Expect::ImapGreeting).await?;
    let status = greeting.last().split(' ').nth(1).unwrap_or("");
    if status.eq_ignore_ascii_case("PREAUTH") {
        // ARCHITECTURE.md §1.4: a client would be logged in without credentials.
        return Err(Error::Protocol(format!(
            "the upstream greets with PREAUTH ({}): clients would be logged in without \
             credentials, mailmoat closes such sessions",
            quoted(greeting.last())
        )));
    }
    if !status.eq_ignore_ascii_case("OK") {
        return Err(Error::Protocol(format!(
            "the upstream refused the session: {}",
            quoted(greeting.last())
        )));
    }
    findings.greeting = greeting;
    let capability = conversation
        .command(
            "a CAPABILITY",
            Expect::ImapTagged("a".into()),
            "the CAPABILITY reply",
        )
        .await?;
    let revision = capability.lines.iter().any(|line| {
        let upper = line.to_ascii_uppercase();
        upper.starts_with("* CAPABILITY ")
            && upper
                .split(' ')
                .any(|word| word == "IMAP4REV1" || word == "IMAP4REV2")
    });
    if !capability
        .last()
        .get(2..)
        .is_some_and(|rest| rest.to_ascii_uppercase().starts_with("OK"))
    {
        return Err(Error::Protocol(format!(
            "the upstream refused CAPABILITY: {}",
            quoted(capability.last())
        )));
    }
    if !revision {
        findings.warnings.push(
            "the CAPABILITY reply names neither IMAP4rev1 nor IMAP4rev2 (RFC 9051 §7.2.2)".into(),
        );
    }
    findings.capabilities = capability;
    let _ = conversation
        .command(
            "b LOGOUT",
            Expect::ImapTagged("b".into()),
            "the LOGOUT reply",
        )
        .await;
    Ok(())
}

async fn probe_pop3(conversation: &mut Conversation, findings: &mut Findings) -> Result<(), Error> {
    let greeting = greeting(conversation, Protocol::Pop3, Expect::Pop3Status).await?;
    if !greeting.last().starts_with("+OK") {
        return Err(Error::Protocol(format!(
            "the upstream refused the session: {}",
            quoted(greeting.last())
        )));
    }
    findings.greeting = greeting;
    let capa = conversation
        .command("CAPA", Expect::Pop3Multiline, "the CAPA reply")
        .await?;
    if !capa.lines[0].starts_with("+OK") {
        // CAPA is optional (RFC 2449 §5); without it the client sees only STLS.
        findings.warnings.push(format!(
            "the upstream does not support CAPA ({}); clients see mailmoat's STLS only",
            quoted(&capa.lines[0])
        ));
    }
    findings.capabilities = capa;
    let _ = conversation
        .command("QUIT", Expect::Pop3Status, "the QUIT reply")
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(expect: Expect, lines: &[&str]) -> Result<Option<Reply>, Error> {
        let mut assembler = Assembler::new(expect);
        let mut last = None;
        for line in lines {
            last = assembler.push(line.as_bytes())?;
        }
        Ok(last)
    }

    #[test]
    fn smtp_replies_end_at_the_line_without_a_hyphen() {
        let reply = assemble(
            Expect::Smtp,
            &["250-a.example", "250-PIPELINING", "250 SIZE"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(reply.lines.len(), 3);
        assert_eq!(reply.smtp_code(), Some(250));
        assert!(
            assemble(Expect::Smtp, &["250-a.example", "250-PIPELINING"])
                .unwrap()
                .is_none()
        );
        // RFC 5321 §4.2: a code alone is a whole reply line.
        assert_eq!(
            assemble(Expect::Smtp, &["250"])
                .unwrap()
                .unwrap()
                .smtp_code(),
            Some(250)
        );
    }

    #[test]
    fn smtp_replies_refuse_what_is_not_smtp() {
        for bad in [
            "* OK IMAP4rev1 ready",
            "+OK POP3 ready",
            "25",
            "2500 x",
            "abc def",
        ] {
            assert!(
                matches!(assemble(Expect::Smtp, &[bad]), Err(Error::Protocol(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            assemble(Expect::Smtp, &["250-a", "550 b"]),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn imap_tagged_replies_end_at_their_tag() {
        let lines = ["* CAPABILITY IMAP4rev1 STARTTLS", "a OK done"];
        let reply = assemble(Expect::ImapTagged("a".into()), &lines)
            .unwrap()
            .unwrap();
        assert_eq!(reply.last(), "a OK done");
        // Another tag, or a tag that only starts alike, is not the end.
        assert!(matches!(
            assemble(Expect::ImapTagged("a".into()), &["ab OK"]),
            Err(Error::Protocol(_))
        ));
        assert!(
            assemble(Expect::ImapTagged("a".into()), &["* OK still"])
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            assemble(Expect::ImapGreeting, &["220 smtp ready"]),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn pop3_multiline_replies_end_at_the_dot_or_at_an_error() {
        let reply = assemble(Expect::Pop3Multiline, &["+OK", "TOP", "USER", "."])
            .unwrap()
            .unwrap();
        assert_eq!(reply.lines, ["+OK", "TOP", "USER", "."]);
        let refused = assemble(Expect::Pop3Multiline, &["-ERR unknown command"])
            .unwrap()
            .unwrap();
        assert_eq!(refused.lines.len(), 1);
        assert!(matches!(
            assemble(Expect::Pop3Status, &["* OK"]),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            assemble(Expect::Pop3Status, &["+OKAY"]),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn replies_are_bounded_in_lines() {
        let mut assembler = Assembler::new(Expect::Smtp);
        for _ in 0..MAX_REPLY_LINES {
            assert!(assembler.push(b"250-x").unwrap().is_none());
        }
        assert!(matches!(assembler.push(b"250-x"), Err(Error::TooLarge(_))));
    }

    #[test]
    fn relay_denials_are_told_from_other_refusals() {
        let reply = |line: &str| Reply {
            lines: vec![line.to_owned()],
        };
        assert!(is_relay_denial(&reply(
            "554 5.7.1 <x@y.invalid>: Relay access denied"
        )));
        assert!(is_relay_denial(&reply("550 relaying denied")));
        assert!(!is_relay_denial(&reply(
            "550 5.1.1 <x@y.invalid>: Recipient address rejected: domain not found"
        )));
        assert!(!is_relay_denial(&reply("550 no such user")));
    }

    /// A one-connection upstream: sends `greeting`, then answers each line it reads with
    /// the next of `replies` (matched by order, not content), then closes.
    async fn canned_upstream(greeting: &'static [u8], replies: Vec<&'static [u8]>) -> UpstreamAddr {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = tokio::io::BufReader::new(read);
            let _ = write.write_all(greeting).await;
            for reply in replies {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = write.write_all(reply).await;
            }
        });
        UpstreamAddr::Tcp(addr)
    }

    fn listener(protocol: Protocol, upstream: UpstreamAddr) -> ListenerConfig {
        ListenerConfig {
            name: "test".into(),
            protocol,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: crate::config::TlsMode::Starttls,
            policy: crate::policy::Policy::RequireTls,
            upstream,
            bare_newlines: None,
            proxy_protocol_from: Vec::new(),
            upstream_proxy_protocol: None,
            xclient: false,
            source_address: None,
            exempt_networks: Vec::new(),
            reuse_port: false,
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            greeting: Duration::from_secs(5),
            ..Timeouts::default()
        }
    }

    #[tokio::test]
    async fn an_imap_preauth_greeting_is_refused() {
        let upstream =
            canned_upstream(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in\r\n", vec![]).await;
        let err = probe(&listener(Protocol::Imap, upstream), &timeouts())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("PREAUTH"), "{err}");
    }

    #[tokio::test]
    async fn a_helo_only_upstream_is_probed_with_helo_and_warned_about() {
        let upstream = canned_upstream(
            b"220 old ready\r\n",
            vec![
                b"502 5.5.2 Error: command not recognized\r\n",
                b"250 old\r\n",
                b"250 ok\r\n",
                b"550 relaying denied\r\n",
                b"250 reset\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let found = probe(&listener(Protocol::Smtp, upstream), &timeouts())
            .await
            .unwrap();
        assert!(found.helo_only);
        assert_eq!(found.warnings.len(), 1, "{:?}", found.warnings);
        assert!(matches!(found.relay, Some(RelayVerdict::Refused(_))));
        assert_eq!(
            found.transcript[..4],
            [
                "S: 220 old ready",
                "C: EHLO check.mailmoat.invalid",
                "S: 502 5.5.2 Error: command not recognized",
                "C: HELO check.mailmoat.invalid"
            ]
        );
        assert!(!found.transcript.iter().any(|l| l.starts_with("C: DATA")));
    }

    #[tokio::test]
    async fn a_refused_sender_or_a_temporary_refusal_is_inconclusive() {
        let upstream = canned_upstream(
            b"220 mx\r\n",
            vec![
                b"250 mx\r\n",
                b"553 5.7.1 sender rejected\r\n",
                b"250 ok\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let found = probe(&listener(Protocol::Smtp, upstream), &timeouts())
            .await
            .unwrap();
        assert!(matches!(found.relay, Some(RelayVerdict::SenderRefused(_))));
        let upstream = canned_upstream(
            b"220 mx\r\n",
            vec![
                b"250 mx\r\n",
                b"250 ok\r\n",
                b"450 4.7.1 try later\r\n",
                b"250 ok\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let found = probe(&listener(Protocol::Smtp, upstream), &timeouts())
            .await
            .unwrap();
        assert!(matches!(found.relay, Some(RelayVerdict::Inconclusive(_))));
    }

    #[tokio::test]
    async fn with_xclient_the_probe_presents_an_outside_client_as_a_session_would() {
        let upstream = canned_upstream(
            b"220 mx\r\n",
            vec![
                b"250-mx\r\n250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n",
                b"220 mx again\r\n",
                b"250 mx\r\n",
                b"250 ok\r\n",
                b"554 5.7.1 Relay access denied\r\n",
                b"250 reset\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let mut xclient = listener(Protocol::Smtp, upstream);
        xclient.xclient = true;
        let found = probe(&xclient, &timeouts()).await.unwrap();
        assert!(matches!(found.relay, Some(RelayVerdict::Refused(_))));
        // The session's own XCLIENT (src/proto/smtp/xclient.rs), for 192.0.2.1.
        assert_eq!(
            found.transcript[4],
            "C: XCLIENT ADDR=192.0.2.1 PORT=40000 NAME=[UNAVAILABLE] \
             DESTADDR=127.0.0.1 DESTPORT=0"
        );
        assert_eq!(found.transcript[6], "C: EHLO check.mailmoat.invalid");
    }

    #[tokio::test]
    async fn with_xclient_an_upstream_without_it_or_refusing_it_fails_the_check() {
        for (ehlo, xclient_reply, expected) in [
            (&b"250 mx\r\n"[..], &b""[..], "does not announce XCLIENT"),
            (b"250-mx\r\n250 XCLIENT NAME\r\n", b"", "does not take ADDR"),
            (
                b"250-mx\r\n250 XCLIENT ADDR\r\n",
                b"550 5.7.0 Error: insufficient authorization\r\n",
                "refused XCLIENT (\"550 5.7.0 Error: insufficient authorization\")",
            ),
        ] {
            let upstream = canned_upstream(b"220 mx\r\n", vec![ehlo, xclient_reply]).await;
            let mut xclient = listener(Protocol::Smtp, upstream);
            xclient.xclient = true;
            let err = probe(&xclient, &timeouts()).await.unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(
                err.contains("every session would be refused with 421"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn an_endless_line_and_an_endless_reply_are_bounded() {
        let endless_line: &'static [u8] =
            Box::leak(vec![b'2'; MAX_LINE_LEN + 10].into_boxed_slice());
        let upstream = canned_upstream(endless_line, vec![]).await;
        let err = probe(&listener(Protocol::Smtp, upstream), &timeouts())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err}");
        let endless_reply: &'static [u8] = Box::leak(
            b"220-hello\r\n"
                .repeat(MAX_REPLY_LINES + 1)
                .into_boxed_slice(),
        );
        let upstream = canned_upstream(endless_reply, vec![]).await;
        let err = probe(&listener(Protocol::Smtp, upstream), &timeouts())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{err}");
    }

    #[test]
    fn greetings_name_their_protocol() {
        assert_eq!(greeting_protocol("220 mx ESMTP"), Some(Protocol::Smtp));
        assert_eq!(greeting_protocol("* OK ready"), Some(Protocol::Imap));
        assert_eq!(
            greeting_protocol("+OK Dovecot ready."),
            Some(Protocol::Pop3)
        );
        assert_eq!(greeting_protocol("SSH-2.0-OpenSSH_9.6"), None);
    }

    #[test]
    fn quoted_lines_cannot_forge_output_lines() {
        assert_eq!(quoted("a\nerror: b"), "\"a\\nerror: b\"");
        assert_eq!(quoted(&"x".repeat(500)).len(), 202);
    }
}
