//! Protocol sessions, free of I/O.
//!
//! A session is fed what arrived (client bytes, upstream bytes, end of stream, TLS up,
//! a deadline) and answers with [`Action`]s for the driver to carry out, in order. It
//! never touches a socket, a clock or a logger, so every transcript can be replayed in a
//! unit test, and every chunking of the same bytes must give the same actions.

pub mod command;
pub mod conn;
pub mod exempt;
pub mod imap;
pub mod line;
pub mod outbound;
pub mod pop3;
pub mod sasl;
pub mod smtp;
#[cfg(test)]
pub(crate) mod testing;

use bytes::Bytes;

pub use conn::{Conn, Limits, LineTooLong, MAX_UNWRITTEN_REPLY_BYTES, Stage};
use line::Line;

/// What the driver must do next, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    ToClient(Bytes),
    /// Write these bytes to the upstream.
    ToUpstream(Bytes),
    /// Run the TLS handshake with the client now. `early` are bytes the client sent
    /// after its STARTTLS line: they are the start of the handshake (RFC 9051 §6.2.1,
    /// option 1), never commands.
    StartTls {
        /// Bytes to feed the TLS engine before reading the socket again.
        early: Bytes,
    },
    /// Record a security event.
    Event(Event),
    /// From now on copy bytes blindly both ways (IMAP and POP3 after a successful
    /// login, ARCHITECTURE.md §1.7). Every byte the session held was handed out before this.
    Relay,
    /// Close both connections once everything before this action is written.
    Close,
}

/// The stable security events of ARCHITECTURE.md §8 that a session can observe.
///
/// Fields carry nothing the client could use to smuggle a secret into a log line: verbs
/// are logged only when the proxy recognises them, user names only as a keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A command was refused because TLS is not up yet.
    PlaintextCommandRefused {
        /// The recognised verb, or `unknown`.
        verb: &'static str,
    },
    /// A credential crossed the wire in plaintext (it was not forwarded).
    CredentialsExposed {
        /// The SASL mechanism or login command.
        mechanism: String,
        /// Keyed hash of the user name, when it could be read.
        user_hash: Option<String>,
    },
    /// Bytes followed the STARTTLS line that are not a TLS record: the injection of the
    /// NO STARTTLS paper (or a broken client).
    StarttlsInjection {
        /// How many bytes were queued behind STARTTLS.
        bytes: usize,
    },
    /// A sign that something in the path hides STARTTLS from the client.
    StarttlsStrippingSuspected {
        /// What was seen: `mangled_verb` or `auth_after_starttls_offered`.
        reason: &'static str,
    },
    /// A command no client may send through the proxy (XCLIENT, XFORWARD).
    ForbiddenCommand {
        /// The verb.
        verb: &'static str,
    },
    /// Bare CR or LF in a message body were rewritten to CRLF (or refused).
    BareNewlineNormalized {
        /// How many in this message.
        count: u64,
    },
    /// Body lines that an upstream dropping NUL or other control bytes could have read
    /// as the end of the message were rewritten so that none can (ARCHITECTURE.md §5).
    SmugglingNeutralized {
        /// How many in this message.
        count: u64,
    },
    /// A configured bound was hit.
    LimitExceeded {
        /// Which one.
        limit: &'static str,
    },
    /// The upstream sent something that is not its protocol.
    UpstreamProtocolError {
        /// What was wrong.
        detail: &'static str,
    },
    /// An IMAP upstream greeted with `* PREAUTH`: the client would be logged in without
    /// credentials, so nothing can be enforced (ARCHITECTURE.md §1.4).
    UpstreamPreauth,
    /// A client from the listener's `exempt_networks`: relayed in plaintext, unchanged.
    ExemptPlaintextSession,
    /// The listener asks for XCLIENT but the upstream could not take it: the session is
    /// closed with `421`, so the client never reaches the upstream as mailmoat's own,
    /// trusted address (ARCHITECTURE.md §7).
    XclientUnavailable {
        /// `not_announced` (no XCLIENT with ADDR in the EHLO reply) or `refused`.
        reason: &'static str,
    },
    /// Outbound relay (ARCHITECTURE.md §11): what became of one message handed to an MX,
    /// once its end of data was sent. Boxed, as are the other outbound events: every
    /// session's actions are as big as the biggest event.
    OutboundDelivery(Box<outbound::session::Delivery>),
    /// Outbound relay: a transaction goes to an MX without TLS, a downgrade
    /// (ARCHITECTURE.md §11), logged right before its `MAIL` line is sent.
    OutboundPlaintext(Box<outbound::session::Plaintext>),
    /// Outbound relay: an MX was given up, either before it accepted anything (the
    /// session asks for the next one) or within a transaction (the waiting command got a
    /// `4xx`).
    OutboundMxFailed(Box<outbound::session::MxGivenUp>),
}

impl Event {
    /// The stable event name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Event::PlaintextCommandRefused { .. } => "plaintext_command_refused",
            Event::CredentialsExposed { .. } => "credentials_exposed",
            Event::StarttlsInjection { .. } => "starttls_injection",
            Event::StarttlsStrippingSuspected { .. } => "starttls_stripping_suspected",
            Event::ForbiddenCommand { .. } => "forbidden_command",
            Event::BareNewlineNormalized { .. } => "bare_newline_normalized",
            Event::SmugglingNeutralized { .. } => "smuggling_neutralized",
            Event::LimitExceeded { .. } => "limit_exceeded",
            Event::UpstreamProtocolError { .. } => "upstream_protocol_error",
            Event::UpstreamPreauth => "upstream_preauth",
            Event::ExemptPlaintextSession => "exempt_plaintext_session",
            Event::XclientUnavailable { .. } => "xclient_unavailable",
            Event::OutboundDelivery(_) => "outbound_delivery",
            Event::OutboundPlaintext(_) => "outbound_plaintext",
            Event::OutboundMxFailed(_) => "outbound_mx_failed",
        }
    }
}

/// Which deadline applies right now (ARCHITECTURE.md §8, per-phase timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the upstream's greeting.
    Greeting,
    /// Waiting for the client's next command (or an upstream reply).
    Command,
    /// Inside a message body.
    Data,
    /// The driver runs a TLS handshake.
    Handshake,
}

impl Phase {
    /// The `limit` of the `limit_exceeded` event when this phase's deadline expires.
    pub fn timeout_limit(self) -> &'static str {
        match self {
            Phase::Greeting => "greeting_timeout",
            Phase::Command => "idle_timeout",
            Phase::Data => "data_timeout",
            Phase::Handshake => "handshake_timeout",
        }
    }
}

/// Why the proxy itself ends a session. Each protocol maps every condition to its
/// goodbye in one table, [`Goodbyes`] (STYLE.md #8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    /// A client line longer than `max_line_len`: nothing can be resynchronised.
    LineTooLong,
    /// More commands before TLS than `max_plaintext_commands`.
    TooManyPlaintext,
    /// More error replies of the proxy's own than `max_errors`.
    TooManyErrors,
    /// The upstream went away, or never greeted.
    UpstreamUnavailable,
    /// The upstream broke its protocol.
    UpstreamBroken,
    /// The client was silent past its deadline.
    IdleTimeout,
    /// The server is shutting down (ARCHITECTURE.md §8).
    ShuttingDown,
}

/// A protocol's reply for each [`Goodbye`]: one table per protocol (STYLE.md #8).
#[derive(Debug)]
pub struct Goodbyes {
    /// [`Goodbye::LineTooLong`].
    pub line_too_long: &'static [u8],
    /// [`Goodbye::TooManyPlaintext`].
    pub too_many_plaintext: &'static [u8],
    /// [`Goodbye::TooManyErrors`].
    pub too_many_errors: &'static [u8],
    /// [`Goodbye::UpstreamUnavailable`].
    pub upstream_unavailable: &'static [u8],
    /// [`Goodbye::UpstreamBroken`].
    pub upstream_broken: &'static [u8],
    /// [`Goodbye::IdleTimeout`].
    pub idle_timeout: &'static [u8],
    /// [`Goodbye::ShuttingDown`].
    pub shutting_down: &'static [u8],
}

impl Goodbyes {
    /// The reply for `why`.
    pub fn reply(&self, why: Goodbye) -> &'static [u8] {
        match why {
            Goodbye::LineTooLong => self.line_too_long,
            Goodbye::TooManyPlaintext => self.too_many_plaintext,
            Goodbye::TooManyErrors => self.too_many_errors,
            Goodbye::UpstreamUnavailable => self.upstream_unavailable,
            Goodbye::UpstreamBroken => self.upstream_broken,
            Goodbye::IdleTimeout => self.idle_timeout,
            Goodbye::ShuttingDown => self.shutting_down,
        }
    }
}

/// The interface the driver runs every protocol through. A protocol provides its
/// [`Conn`], its grammar (`process_client`, `process_upstream`), its goodbyes and its
/// phases; what every protocol does alike is the default methods, written once.
pub trait Session {
    /// The state every protocol shares.
    fn conn(&self) -> &Conn;
    /// The state every protocol shares, to change.
    fn conn_mut(&mut self) -> &mut Conn;
    /// Reads the next piece of the client's bytes the protocol can act on (a command
    /// line, a literal, body bytes); false when nothing more can be read now.
    fn client_step(&mut self) -> bool;
    /// Reads the next piece of the upstream's bytes; false when nothing more can be
    /// read now.
    fn upstream_step(&mut self) -> bool;
    /// The protocol's replies for the conditions that end a session.
    fn goodbyes(&self) -> &'static Goodbyes;
    /// The upstream closed its side.
    fn on_upstream_eof(&mut self);
    /// The session waits for the upstream's greeting; nothing from the client is read.
    fn awaiting_greeting(&self) -> bool;
    /// At a command boundary: no reply owed by either side, no command half read.
    fn at_command_boundary(&self) -> bool;

    /// The deadline of the current [`Phase`] expired.
    fn on_timeout(&mut self) {
        if self.awaiting_greeting() {
            self.end(Goodbye::UpstreamUnavailable);
        } else {
            self.end(Goodbye::IdleTimeout);
        }
    }

    /// Which deadline applies now.
    fn phase(&self) -> Phase {
        if self.conn().stage == Stage::Handshake {
            Phase::Handshake
        } else if self.awaiting_greeting() {
            Phase::Greeting
        } else {
            Phase::Command
        }
    }

    /// The server is shutting down (ARCHITECTURE.md §8). At a command boundary (nothing
    /// owed by either side, no command or message half read), or before the greeting,
    /// the session queues the protocol's goodbye and a close, and returns true;
    /// otherwise it returns false and the driver asks again after the next step. A
    /// blindly relayed session is never at a boundary the proxy can see: it runs until
    /// the grace period ends.
    fn close_if_idle(&mut self) -> bool {
        let idle =
            self.conn().is_open() && (self.awaiting_greeting() || self.at_command_boundary());
        if idle {
            self.end(Goodbye::ShuttingDown);
        }
        idle
    }

    /// Reads what it can of the client's bytes. Past the unwritten-reply budget the
    /// client has not taken what it was sent: nothing more is read until the driver has
    /// written it ([`Session::on_output_written`]).
    fn process_client(&mut self) {
        while self.conn().is_open() && !self.conn().output_full() && self.client_step() {}
    }

    /// Reads what it can of the upstream's bytes.
    fn process_upstream(&mut self) {
        while self.conn().is_open() && self.upstream_step() {}
    }

    /// Bytes arrived from the client.
    fn on_client_data(&mut self, data: &[u8]) {
        if self.conn().is_open() {
            self.conn_mut().receive_client(data);
            self.process_client();
        }
    }

    /// While the session streams a body (SMTP DATA), the buffer the driver reads client
    /// bytes straight into, saving the copy through [`Session::on_client_data`]; `None`
    /// otherwise. After such a read the driver calls [`Session::on_client_stream_data`].
    fn client_stream_buffer(&mut self) -> Option<&mut bytes::BytesMut> {
        None
    }

    /// The driver appended client bytes to [`Session::client_stream_buffer`].
    fn on_client_stream_data(&mut self) {
        if self.conn().is_open() {
            self.process_client();
        }
    }

    /// Bytes arrived from the upstream. During the handshake they wait;
    /// `on_tls_established` refuses them.
    fn on_upstream_data(&mut self, data: &[u8]) {
        if matches!(self.conn().stage, Stage::Open | Stage::Handshake) {
            self.conn_mut().receive_upstream(data);
            self.process_upstream();
            self.process_client();
        }
    }

    /// The client closed its side (or its TLS ended).
    fn on_client_eof(&mut self) {
        self.conn_mut().close();
    }

    /// The TLS handshake asked for by [`Action::StartTls`] completed (or, on an
    /// implicit-TLS listener, the one before the session started).
    fn on_tls_established(&mut self) {
        if !self.conn_mut().tls_established() {
            return self.upstream_broken("upstream spoke during the TLS handshake");
        }
        self.process_client();
    }

    /// False while the session holds as many unprocessed client bytes as it may: the
    /// driver stops reading the client until this turns true again.
    fn wants_client_data(&self) -> bool {
        self.conn().wants_client_data()
    }

    /// The next action, if any.
    fn next_action(&mut self) -> Option<Action> {
        self.conn_mut().next_action()
    }

    /// The Postfix-style summary of the session's commands (`ehlo=1 starttls=1/1 ...`).
    fn summary(&self) -> String {
        self.conn().tally.summary()
    }

    /// The driver is about to wait for bytes, maybe for a long time (an idle client):
    /// buffers and queues that are empty give their memory back.
    fn release_idle_memory(&mut self) {
        self.conn_mut().release_idle_memory();
    }

    /// The driver has written every action handed out so far: the client took the
    /// replies. A session that held client input back because too many of its replies
    /// were unwritten ([`MAX_UNWRITTEN_REPLY_BYTES`]) goes on with it now. Returns true
    /// when that queued new actions.
    fn on_output_written(&mut self) -> bool {
        if self.conn_mut().output_written() && self.conn().is_open() {
            self.process_client();
        }
        self.conn().has_output()
    }

    /// Ends the session with the protocol's goodbye.
    fn end(&mut self, why: Goodbye) {
        let reply = self.goodbyes().reply(why);
        self.conn_mut().close_with(reply);
    }

    /// The upstream broke its protocol: the event, then the goodbye.
    fn upstream_broken(&mut self, detail: &'static str) {
        self.conn_mut()
            .event(Event::UpstreamProtocolError { detail });
        self.end(Goodbye::UpstreamBroken);
    }

    /// The next complete client line; an over-long one ends the session.
    fn next_client_line(&mut self) -> Option<Line> {
        match self.conn_mut().next_client_line() {
            Ok(line) => line,
            Err(LineTooLong) => {
                self.end(Goodbye::LineTooLong);
                None
            }
        }
    }

    /// Counts a command read before TLS; true when that spent the budget and ended the
    /// session.
    fn plaintext_budget_spent(&mut self) -> bool {
        let spent = self.conn_mut().plaintext_budget_spent();
        if spent {
            self.end(Goodbye::TooManyPlaintext);
        }
        spent
    }

    /// Counts an error reply of the proxy's own; past the budget the session ends.
    fn count_error(&mut self) {
        if self.conn_mut().error_budget_spent() {
            self.end(Goodbye::TooManyErrors);
        }
    }
}

/// Per-command counts for the session summary, in the spirit of Postfix's `disconnect`
/// line: `ehlo=1 starttls=1/1 auth=0/1 mail=1`.
#[derive(Debug, Clone)]
pub struct Tally {
    /// (name, accepted, total) of the names seen so far, in the order first seen: an
    /// idle session holds two or three, not the whole list.
    counts: Vec<(&'static str, u32, u32)>,
    /// The order of the summary: these names first, others as seen.
    order: &'static [&'static str],
    /// Names always shown as `ok/total`, because a refusal matters (`auth=0/1`).
    ratios: &'static [&'static str],
}

impl Tally {
    /// A tally that lists `order` first, and shows `ratios` always as `ok/total`.
    pub fn new(order: &'static [&'static str], ratios: &'static [&'static str]) -> Self {
        Tally {
            counts: Vec::new(),
            order,
            ratios,
        }
    }

    /// One command, accepted or not.
    pub fn record(&mut self, name: &'static str, accepted: bool) {
        let index = match self.counts.iter().position(|(n, _, _)| *n == name) {
            Some(index) => index,
            None => {
                self.counts.push((name, 0, 0));
                self.counts.len() - 1
            }
        };
        let (_, ok, total) = &mut self.counts[index];
        *ok += u32::from(accepted);
        *total += 1;
    }

    /// `name=n` when all were accepted, `name=ok/total` otherwise; unused names omitted.
    pub fn summary(&self) -> String {
        let mut seen: Vec<_> = self.counts.iter().collect();
        // Stable: names outside `order` keep the order they were first seen in.
        seen.sort_by_key(|(name, _, _)| {
            self.order
                .iter()
                .position(|known| known == name)
                .unwrap_or(usize::MAX)
        });
        let mut out = String::new();
        for &&(name, ok, total) in &seen {
            if !out.is_empty() {
                out.push(' ');
            }
            if ok == total && !self.ratios.contains(&name) {
                out.push_str(&format!("{name}={total}"));
            } else {
                out.push_str(&format!("{name}={ok}/{total}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_lists_known_names_in_order_and_refusals_as_ratios() {
        let mut tally = Tally::new(&["ehlo", "starttls", "auth", "mail"], &["starttls", "auth"]);
        tally.record("mail", true);
        tally.record("ehlo", true);
        tally.record("auth", false);
        tally.record("starttls", true);
        tally.record("xyz", false);
        tally.record("mail", false);
        assert_eq!(
            tally.summary(),
            "ehlo=1 starttls=1/1 auth=0/1 mail=1/2 xyz=0/1"
        );
    }
}
