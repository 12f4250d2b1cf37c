//! `mailmoat explain`: for each listener, the exact dialogue a client sees before TLS and
//! after TLS, next to what the upstream itself said.
//!
//! The dialogue is not simulated: the listener's real protocol [`Session`] (the code
//! `mailmoat run` runs) is driven against a real upstream connection by a scripted
//! client (greeting; EHLO / `a CAPABILITY` / CAPA; STARTTLS / STLS; the same command
//! again after TLS; QUIT / LOGOUT). Only the TLS handshake itself is skipped: where the
//! session asks for it, the script tells the session that TLS is up, as the driver does
//! after a real handshake. So the output cannot drift from what the daemon does.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, ListenerConfig, TlsMode};
use crate::inbound::identity::Origin;
use crate::inbound::listener::{SessionConfig, session_config};
use crate::inbound::upstream::{self, Route};
use crate::operator::probe::{self, Assembler, Expect, MAX_LINE_LEN, MAX_TOTAL_BYTES, Reply};
use crate::policy::{Policy, UserHasher};
use crate::proto::line::Framer;
use crate::proto::{Action, Session, imap, pop3, smtp};

/// The name the scripted client gives in EHLO.
pub const EXPLAIN_HELO_NAME: &str = "explain.invalid";

/// Why a dialogue stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream could not be reached, or a reply was malformed or late.
    #[error("{0}")]
    Probe(#[from] probe::Error),
    /// The session closed the client connection.
    #[error("mailmoat closed the client connection")]
    SessionClosed,
    /// The session switched to a blind relay, which the script never asks for.
    #[error("mailmoat switched to a blind relay unexpectedly")]
    UnexpectedRelay,
}

/// The dialogues of one listener, each line prefixed `C: ` or `S: `.
#[derive(Debug, Clone, Default)]
pub struct Explanation {
    /// Between mailmoat (`C:`) and the upstream (`S:`).
    pub upstream: Vec<String>,
    /// Between the client (`C:`) and mailmoat (`S:`) before TLS; empty for implicit TLS.
    pub before_tls: Vec<String>,
    /// The same after TLS.
    pub after_tls: Vec<String>,
    /// Security events the session recorded.
    pub events: Vec<String>,
    /// Why the dialogue stopped early, if it did.
    pub error: Option<String>,
}

/// Explains every listener of `config`; prints the result and returns the exit code
/// (0, or 1 when a dialogue could not be completed).
pub async fn run(config: &Config) -> u8 {
    let mut failed = false;
    for (index, listener) in config.listeners.iter().enumerate() {
        if index > 0 {
            println!();
        }
        let explanation = explain(config, listener).await;
        failed |= explanation.error.is_some();
        print!("{}", render(listener, &explanation));
    }
    u8::from(failed)
}

/// Runs the scripted dialogue for one listener.
pub async fn explain(config: &Config, listener: &ListenerConfig) -> Explanation {
    let mut explanation = Explanation::default();
    // Presents itself as a client from outside would be presented (ARCHITECTURE.md §7).
    let origin = Origin::outside(listener.listen);
    let connected = tokio::time::timeout(
        config.timeouts.upstream_connect,
        upstream::connect(&Route::for_listener(listener, &origin)),
    )
    .await;
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            explanation.error = Some(
                probe::Error::Connect {
                    addr: listener.upstream.clone(),
                    source,
                }
                .to_string(),
            );
            return explanation;
        }
        Err(_) => {
            explanation.error = Some(format!(
                "cannot connect to {}: timed out after {:?}",
                listener.upstream, config.timeouts.upstream_connect
            ));
            return explanation;
        }
    };
    let reply_timeout = config.timeouts.greeting;
    let result = match session_config(config, listener, &UserHasher::random()) {
        SessionConfig::Smtp(config) => {
            let mut session = smtp::Session::new(config, false);
            if listener.xclient {
                session = session.with_xclient(smtp::xclient::Identity {
                    client: origin.client,
                    destination: origin.destination,
                });
            }
            let ehlo = format!("EHLO {EXPLAIN_HELO_NAME}");
            let script = Script {
                greeting: Expect::Smtp,
                ask: [(ehlo.as_str(), Expect::Smtp)],
                upgrade: ("STARTTLS", Expect::Smtp),
                ask_again: [(ehlo.as_str(), Expect::Smtp)],
                leave: ("QUIT", Expect::Smtp),
            };
            let mut dialogue = Dialogue::new(session, stream, reply_timeout);
            let result = dialogue.run(&script, listener.tls).await;
            dialogue.finish(&mut explanation);
            result
        }
        SessionConfig::Imap(config) => {
            let session = imap::Session::new(config);
            let script = Script {
                greeting: Expect::ImapGreeting,
                ask: [("a CAPABILITY", Expect::ImapTagged("a".into()))],
                upgrade: ("b STARTTLS", Expect::ImapTagged("b".into())),
                ask_again: [("c CAPABILITY", Expect::ImapTagged("c".into()))],
                leave: ("d LOGOUT", Expect::ImapTagged("d".into())),
            };
            let mut dialogue = Dialogue::new(session, stream, reply_timeout);
            let result = dialogue.run(&script, listener.tls).await;
            dialogue.finish(&mut explanation);
            result
        }
        SessionConfig::Pop3(config) => {
            let session = pop3::Session::new(config);
            let script = Script {
                greeting: Expect::Pop3Status,
                ask: [("CAPA", Expect::Pop3Multiline)],
                upgrade: ("STLS", Expect::Pop3Status),
                ask_again: [("CAPA", Expect::Pop3Multiline)],
                leave: ("QUIT", Expect::Pop3Status),
            };
            let mut dialogue = Dialogue::new(session, stream, reply_timeout);
            let result = dialogue.run(&script, listener.tls).await;
            dialogue.finish(&mut explanation);
            result
        }
    };
    if let Err(err) = result {
        explanation.error = Some(err.to_string());
    }
    explanation
}

/// What the scripted client says, in order.
struct Script<'a> {
    greeting: Expect,
    ask: [(&'a str, Expect); 1],
    upgrade: (&'a str, Expect),
    ask_again: [(&'a str, Expect); 1],
    leave: (&'a str, Expect),
}

/// A session between the scripted client and the real upstream.
struct Dialogue<P> {
    session: P,
    upstream: upstream::Stream,
    reply_timeout: Duration,
    /// Bytes the session sent to the client, not yet read by the script.
    client_in: BytesMut,
    client_lines: Framer,
    /// Upstream bytes, kept only to show them line by line.
    upstream_in: BytesMut,
    upstream_lines: Framer,
    upstream_total: usize,
    upstream_eof: bool,
    /// The session asked for the TLS handshake.
    tls_requested: bool,
    closed: bool,
    /// Which client view lines go to: false before TLS.
    tls_active: bool,
    view: Explanation,
}

impl<P: Session> Dialogue<P> {
    fn new(session: P, upstream: upstream::Stream, reply_timeout: Duration) -> Self {
        Dialogue {
            session,
            upstream,
            reply_timeout,
            client_in: BytesMut::new(),
            client_lines: Framer::new(MAX_LINE_LEN),
            upstream_in: BytesMut::new(),
            upstream_lines: Framer::new(MAX_LINE_LEN),
            upstream_total: 0,
            upstream_eof: false,
            tls_requested: false,
            closed: false,
            tls_active: false,
            view: Explanation::default(),
        }
    }

    async fn run(&mut self, script: &Script<'_>, mode: TlsMode) -> Result<(), Error> {
        if mode == TlsMode::Implicit {
            // As the driver does: the handshake comes first, then the session starts.
            self.tls_active = true;
            self.session.on_tls_established();
        }
        self.client_reply(script.greeting.clone()).await?;
        for (line, expect) in &script.ask {
            self.command(line, expect.clone()).await?;
        }
        if mode == TlsMode::Starttls {
            let (line, expect) = &script.upgrade;
            self.command(line, expect.clone()).await?;
            if !self.tls_requested {
                return Ok(());
            }
            self.tls_active = true;
            self.view
                .upstream
                .push("-- TLS handshake between the client and mailmoat --".into());
            self.session.on_tls_established();
            for (line, expect) in &script.ask_again {
                self.command(line, expect.clone()).await?;
            }
        }
        let (line, expect) = &script.leave;
        self.command(line, expect.clone()).await?;
        Ok(())
    }

    /// Moves the recorded views into `explanation`.
    fn finish(&mut self, explanation: &mut Explanation) {
        *explanation = std::mem::take(&mut self.view);
    }

    fn client_view(&mut self) -> &mut Vec<String> {
        if self.tls_active {
            &mut self.view.after_tls
        } else {
            &mut self.view.before_tls
        }
    }

    /// The client sends `line` and reads the whole reply.
    async fn command(&mut self, line: &str, expect: Expect) -> Result<Reply, Error> {
        self.client_view().push(format!("C: {line}"));
        self.session
            .on_client_data(format!("{line}\r\n").as_bytes());
        self.client_reply(expect).await
    }

    /// Carries out the session's actions, reading the upstream, until the client has a
    /// complete reply.
    async fn client_reply(&mut self, expect: Expect) -> Result<Reply, Error> {
        let mut assembler = Assembler::new(expect);
        let deadline = tokio::time::Instant::now() + self.reply_timeout;
        loop {
            self.carry_out().await?;
            while let Some(line) = self
                .client_lines
                .next_line(&mut self.client_in)
                .map_err(|_| probe::Error::TooLarge("a line longer than 8192 bytes"))?
            {
                let text = String::from_utf8_lossy(&line.text).into_owned();
                self.client_view().push(format!("S: {text}"));
                if let Some(reply) = assembler.push(&line.text)? {
                    return Ok(reply);
                }
            }
            if self.closed {
                return Err(Error::SessionClosed);
            }
            if self.upstream_eof {
                return Err(probe::Error::Closed("a reply").into());
            }
            self.read_upstream(deadline).await?;
        }
    }

    async fn read_upstream(&mut self, deadline: tokio::time::Instant) -> Result<(), Error> {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, self.upstream.read(&mut chunk))
            .await
            .map_err(|_| probe::Error::Timeout {
                waiting_for: "a reply",
                after: self.reply_timeout,
            })?;
        match read {
            Ok(0) | Err(_) => {
                self.upstream_eof = true;
                self.session.on_upstream_eof();
            }
            Ok(n) => {
                self.upstream_total += n;
                if self.upstream_total > MAX_TOTAL_BYTES {
                    return Err(probe::Error::TooLarge("more than 256 KiB").into());
                }
                self.upstream_in.extend_from_slice(&chunk[..n]);
                while let Ok(Some(line)) = self.upstream_lines.next_line(&mut self.upstream_in) {
                    self.view
                        .upstream
                        .push(format!("S: {}", String::from_utf8_lossy(&line.text)));
                }
                self.session.on_upstream_data(&chunk[..n]);
            }
        }
        Ok(())
    }

    /// Does what the session asks, as the driver would, but records instead of
    /// handshaking.
    async fn carry_out(&mut self) -> Result<(), Error> {
        loop {
            self.carry_out_queued().await?;
            // Everything asked so far is done: a session that held input back for its
            // replies (`MAX_UNWRITTEN_REPLY_BYTES`) goes on, as under the driver.
            if !self.session.on_output_written() {
                return Ok(());
            }
        }
    }

    /// The actions queued now.
    async fn carry_out_queued(&mut self) -> Result<(), Error> {
        while let Some(action) = self.session.next_action() {
            match action {
                Action::ToClient(bytes) => self.client_in.extend_from_slice(&bytes),
                Action::ToUpstream(bytes) => {
                    for line in String::from_utf8_lossy(&bytes).split_inclusive('\n') {
                        let line = line.trim_end_matches(['\r', '\n']);
                        self.view.upstream.push(format!("C: {line}"));
                    }
                    let write = async {
                        self.upstream.write_all(&bytes).await?;
                        self.upstream.flush().await
                    };
                    tokio::time::timeout(self.reply_timeout, write)
                        .await
                        .map_err(|_| probe::Error::Timeout {
                            waiting_for: "the upstream to read a command",
                            after: self.reply_timeout,
                        })?
                        .map_err(|source| probe::Error::Io {
                            waiting_for: "the upstream to read a command",
                            source,
                        })?;
                }
                Action::StartTls { .. } => self.tls_requested = true,
                Action::Event(event) => self.view.events.push(event.name().to_owned()),
                Action::Relay => return Err(Error::UnexpectedRelay),
                Action::Close => self.closed = true,
            }
        }
        Ok(())
    }
}

/// The explanation as text: a header, then one indented section per view.
pub fn render(listener: &ListenerConfig, explanation: &Explanation) -> String {
    let mut out = String::new();
    let mode = match listener.tls {
        TlsMode::Starttls => "starttls",
        TlsMode::Implicit => "implicit",
    };
    let policy = match listener.policy {
        Policy::RequireTls => "require_tls",
        Policy::AuthRequiresTls => "auth_requires_tls",
    };
    let _ = writeln!(
        out,
        "listener {} ({}, {}, tls: {mode}, policy: {policy}) -> upstream {}",
        listener.name,
        probe::protocol_name(listener.protocol),
        listener.listen,
        listener.upstream
    );
    let mut section = |title: &str, lines: &[String]| {
        let _ = writeln!(out, "  {title}:");
        for line in lines {
            let _ = writeln!(out, "    {}", printable(line));
        }
    };
    section(
        "upstream said (C: mailmoat, S: upstream)",
        &explanation.upstream,
    );
    if listener.tls == TlsMode::Starttls {
        section(
            "client sees before TLS (C: client, S: mailmoat)",
            &explanation.before_tls,
        );
    }
    section(
        "client sees after TLS (C: client, S: mailmoat)",
        &explanation.after_tls,
    );
    if !explanation.events.is_empty() {
        let _ = writeln!(out, "  events: {}", explanation.events.join(" "));
    }
    if let Some(error) = &explanation.error {
        let _ = writeln!(out, "  error: {}", printable(error));
    }
    out
}

/// Escapes control characters an upstream might send, so output lines stay lines.
pub(crate) fn printable(line: &str) -> String {
    line.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("250 ok\u{1b}[2J\r"), "250 ok\\u{1b}[2J\\r");
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
    }
}
