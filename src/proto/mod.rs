//! Protocol sessions, free of I/O.
//!
//! A session is fed what arrived (client bytes, upstream bytes, end of stream, TLS up,
//! a deadline) and answers with [`Action`]s for the driver to carry out, in order. It
//! never touches a socket, a clock or a logger, so every transcript can be replayed in a
//! unit test, and every chunking of the same bytes must give the same actions.

pub mod exempt;
pub mod imap;
pub mod line;
pub mod pop3;
pub mod sasl;
pub mod smtp;

use bytes::Bytes;

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
    /// login, DESIGN §1.7). Every byte the session held was handed out before this.
    Relay,
    /// Close both connections once everything before this action is written.
    Close,
}

/// The stable security events of DESIGN §8 that a session can observe.
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
    /// as the end of the message were rewritten so that none can (DESIGN §5).
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
    /// credentials, so nothing can be enforced (DESIGN §1.4).
    UpstreamPreauth,
    /// A client from the listener's `exempt_networks`: relayed in plaintext, unchanged.
    ExemptPlaintextSession,
    /// The listener asks for XCLIENT but the upstream could not take it: the session is
    /// closed with `421`, so the client never reaches the upstream as mailmoat's own,
    /// trusted address (DESIGN §7).
    XclientUnavailable {
        /// `not_announced` (no XCLIENT with ADDR in the EHLO reply) or `refused`.
        reason: &'static str,
    },
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
        }
    }
}

/// Which deadline applies right now (DESIGN §8, per-phase timeouts).
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

/// The interface the driver runs every protocol through.
pub trait Session {
    /// Bytes arrived from the client.
    fn on_client_data(&mut self, data: &[u8]);
    /// Bytes arrived from the upstream.
    fn on_upstream_data(&mut self, data: &[u8]);
    /// The client closed its side (or its TLS ended).
    fn on_client_eof(&mut self);
    /// The upstream closed its side.
    fn on_upstream_eof(&mut self);
    /// The TLS handshake asked for by [`Action::StartTls`] completed.
    fn on_tls_established(&mut self);
    /// The deadline of the current [`Phase`] expired.
    fn on_timeout(&mut self);
    /// Which deadline applies now.
    fn phase(&self) -> Phase;
    /// False while the session holds as many unprocessed client bytes as it may: the
    /// driver stops reading the client until this turns true again.
    fn wants_client_data(&self) -> bool;
    /// The next action, if any.
    fn next_action(&mut self) -> Option<Action>;
    /// The Postfix-style summary of the session's commands (`ehlo=1 starttls=1/1 ...`).
    fn summary(&self) -> String;
    /// The server is shutting down (DESIGN §8). At a command boundary (nothing owed by
    /// either side, no command or message half read) the session queues the protocol's
    /// goodbye and a close, and returns true; otherwise it returns false and the driver
    /// asks again after the next step. A blindly relayed session is never at a boundary
    /// the proxy can see: it runs until the grace period ends.
    fn close_if_idle(&mut self) -> bool;
    /// The driver is about to wait for bytes, maybe for a long time (an idle client):
    /// buffers and queues that are empty give their memory back.
    fn release_idle_memory(&mut self);
    /// The driver has written every action handed out so far: the client took the
    /// replies. A session that held client input back because too many of its replies
    /// were unwritten ([`MAX_UNWRITTEN_REPLY_BYTES`]) goes on with it now. Returns true
    /// when that queued new actions.
    fn on_output_written(&mut self) -> bool;
}

/// Most memory a session's queued output may take before the driver has written it:
/// reply bytes, plus the size of an [`Action`] for each reply and each event. Past this a
/// session processes no more client input until [`Session::on_output_written`]: a client
/// that floods lines the proxy answers itself and never reads its replies holds this
/// much, not one reply per line it sent (a 64 KiB read of bare newlines would otherwise
/// queue 65,000 replies).
pub const MAX_UNWRITTEN_REPLY_BYTES: usize = 16 * 1024;

/// What one queued action costs besides its bytes: the queue's slot.
pub(crate) const ACTION_COST: usize = std::mem::size_of::<Action>();

/// Counts what a session queued for the driver since it last wrote its output.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReplyBudget {
    unwritten: usize,
}

impl ReplyBudget {
    /// A reply of `len` bytes was queued.
    pub(crate) fn queued(&mut self, len: usize) {
        self.unwritten = self.unwritten.saturating_add(len + ACTION_COST);
    }

    /// An event was queued.
    pub(crate) fn event(&mut self) {
        self.unwritten = self.unwritten.saturating_add(ACTION_COST);
    }

    /// The driver wrote everything.
    pub(crate) fn written(&mut self) {
        self.unwritten = 0;
    }

    /// No more client input may be processed until the driver writes.
    pub(crate) fn is_full(&self) -> bool {
        self.unwritten >= MAX_UNWRITTEN_REPLY_BYTES
    }
}

/// Drops the allocation of an empty buffer; the next bytes allocate what they need.
pub(crate) fn release_if_empty(buffer: &mut bytes::BytesMut) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = bytes::BytesMut::new();
    }
}

/// Drops the allocation of an empty queue.
pub(crate) fn release_queue_if_empty<T>(queue: &mut std::collections::VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = std::collections::VecDeque::new();
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
