//! What every protocol session holds and does the same way (ARCHITECTURE.md §4): the
//! two byte buffers and their framers, the queue of actions with the client's output
//! collected into one write per step, the budgets (plaintext commands, local errors,
//! unwritten replies), the TLS state, the STARTTLS hand-off, the switch to the blind
//! relay, and the credential events. A protocol session contains one [`Conn`] and keeps
//! only its grammar, its capability rewriting and the framing of its replies.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::line::{Framer, Line};
use super::{Action, Event, Tally};
use crate::policy::{UserHasher, is_mangled_upgrade_verb};

/// The bounds every protocol session is set up with, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest client command line, CRLF included.
    pub max_line_len: usize,
    /// Most client bytes held unprocessed (pipelined behind an outstanding reply) before
    /// the driver stops reading.
    pub max_held_bytes: usize,
    /// Commands accepted before TLS before the connection closes.
    pub max_plaintext_commands: u32,
    /// Error replies the proxy gives itself before it closes the connection.
    pub max_errors: u32,
}

/// Most memory a session's queued output may take before the driver has written it:
/// reply bytes, plus the size of an [`Action`] for each reply and each event. Past this a
/// session processes no more client input until [`Session::on_output_written`]: a client
/// that floods lines the proxy answers itself and never reads its replies holds this
/// much, not one reply per line it sent (a 64 KiB read of bare newlines would otherwise
/// queue 65,000 replies).
///
/// [`Session::on_output_written`]: super::Session::on_output_written
pub const MAX_UNWRITTEN_REPLY_BYTES: usize = 16 * 1024;

/// What one queued action costs besides its bytes: the queue's slot.
pub(crate) const ACTION_COST: usize = std::mem::size_of::<Action>();

/// Where the connection stands, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The session reads and answers; its protocol's own mode says how.
    Open,
    /// The driver runs the TLS handshake; bytes from either side wait.
    Handshake,
    /// Logged in: the driver copies bytes blindly (ARCHITECTURE.md §1.7).
    Relay,
    /// A close is queued; nothing more is read.
    Closed,
}

/// The over-long client line was dropped and counted; the session must say goodbye.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

/// The state shared by the three protocol sessions. See the module documentation.
#[derive(Debug)]
pub struct Conn {
    pub(crate) limits: Limits,
    user_hasher: UserHasher,
    pub(crate) stage: Stage,
    /// TLS is up with the client (implicit listener, or after STARTTLS).
    pub(crate) tls_active: bool,
    /// The client was shown STARTTLS (STLS) in a capability list since TLS went down.
    pub(crate) starttls_offered: bool,
    /// Client bytes not processed yet.
    pub(crate) client_in: BytesMut,
    client_lines: Framer,
    /// Upstream bytes not processed yet.
    pub(crate) upstream_in: BytesMut,
    pub(crate) upstream_lines: Framer,
    /// Bytes for the client not yet handed out: one `ToClient` per step, not per reply.
    client_out: BytesMut,
    pub(crate) actions: VecDeque<Action>,
    /// Reply bytes and actions queued since the driver last wrote everything.
    unwritten: usize,
    plaintext_commands: u32,
    errors: u32,
    /// The per-command counts of the session summary.
    pub(crate) tally: Tally,
}

impl Conn {
    /// The state of a new connection; `max_upstream_line_len` bounds the protocol's
    /// reply lines.
    pub fn new(
        limits: Limits,
        user_hasher: UserHasher,
        max_upstream_line_len: usize,
        tally: Tally,
    ) -> Self {
        Conn {
            client_lines: Framer::new(limits.max_line_len),
            limits,
            user_hasher,
            stage: Stage::Open,
            tls_active: false,
            starttls_offered: false,
            client_in: BytesMut::new(),
            upstream_in: BytesMut::new(),
            upstream_lines: Framer::new(max_upstream_line_len),
            client_out: BytesMut::new(),
            actions: VecDeque::new(),
            unwritten: 0,
            plaintext_commands: 0,
            errors: 0,
            tally,
        }
    }

    /// The session reads and answers (no handshake, relay or close under way).
    pub fn is_open(&self) -> bool {
        self.stage == Stage::Open
    }

    // ---- output ----

    /// Bytes for the client, collected until the next action of another kind.
    pub fn send_client(&mut self, bytes: &[u8]) {
        self.unwritten = self.unwritten.saturating_add(bytes.len() + ACTION_COST);
        self.client_out.put_slice(bytes);
    }

    /// The upstream's bytes streamed through to the client (a POP3 message body): not
    /// replies the proxy makes, so not held against the unwritten-reply budget.
    pub fn stream_to_client(&mut self, bytes: &[u8]) {
        self.client_out.put_slice(bytes);
    }

    /// Bytes for the upstream.
    pub fn send_upstream(&mut self, bytes: impl Into<Bytes>) {
        self.push(Action::ToUpstream(bytes.into()));
    }

    /// One line for the upstream: `parts` joined, then CRLF. Every line the proxy writes
    /// upstream ends in CRLF, whatever the client's line ended in.
    pub fn send_upstream_line(&mut self, parts: &[&[u8]]) {
        let len = parts.iter().map(|part| part.len()).sum::<usize>() + 2;
        let mut out = BytesMut::with_capacity(len);
        for part in parts {
            out.put_slice(part);
        }
        out.put_slice(b"\r\n");
        self.send_upstream(out.freeze());
    }

    /// Records a security event, in order with the bytes around it.
    pub fn event(&mut self, event: Event) {
        self.unwritten = self.unwritten.saturating_add(ACTION_COST);
        self.push(Action::Event(event));
    }

    /// Queues an action behind the client bytes collected so far.
    pub fn push(&mut self, action: Action) {
        self.flush_client();
        self.actions.push_back(action);
    }

    fn flush_client(&mut self) {
        if !self.client_out.is_empty() {
            let bytes = self.client_out.split().freeze();
            self.actions.push_back(Action::ToClient(bytes));
        }
    }

    /// Actions or client bytes are queued.
    pub fn has_output(&self) -> bool {
        !self.actions.is_empty() || !self.client_out.is_empty()
    }

    /// The next action for the driver.
    pub fn next_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.flush_client();
        }
        self.actions.pop_front()
    }

    /// Queues the close, once. A relayed session is the driver's alone: nothing to do.
    pub fn close(&mut self) {
        if matches!(self.stage, Stage::Open | Stage::Handshake) {
            self.stage = Stage::Closed;
            self.push(Action::Close);
        }
    }

    /// Something the client cannot recover from: the reply (unless no reply can reach
    /// the client now: mid-handshake, relayed, closed), then the close.
    pub fn close_with(&mut self, reply: &[u8]) {
        if self.is_open() {
            self.send_client(reply);
        }
        self.close();
    }

    // ---- budgets ----

    /// No more client input may be processed until the driver has written what the
    /// session queued ([`MAX_UNWRITTEN_REPLY_BYTES`]).
    pub fn output_full(&self) -> bool {
        self.unwritten >= MAX_UNWRITTEN_REPLY_BYTES
    }

    /// The driver wrote everything. Returns whether input was held back for it.
    pub fn output_written(&mut self) -> bool {
        let was_full = self.output_full();
        self.unwritten = 0;
        was_full
    }

    /// Counts a command read before TLS; true (and the event) once there are more than
    /// `max_plaintext_commands`: only the upgrade dialogue belongs before TLS, and a
    /// client that keeps talking is probing (ARCHITECTURE.md §8).
    pub fn plaintext_budget_spent(&mut self) -> bool {
        if self.tls_active {
            return false;
        }
        self.plaintext_commands += 1;
        let spent = self.plaintext_commands > self.limits.max_plaintext_commands;
        if spent {
            self.event(Event::LimitExceeded {
                limit: "plaintext_commands",
            });
        }
        spent
    }

    /// Counts an error reply of the proxy's own; true (and the event) once there are
    /// more than `max_errors`: a client that only draws errors is probing, as Postfix's
    /// `smtpd_hard_error_limit` has it.
    pub fn error_budget_spent(&mut self) -> bool {
        self.errors += 1;
        let spent = self.errors > self.limits.max_errors;
        if spent {
            self.event(Event::LimitExceeded { limit: "errors" });
        }
        spent
    }

    // ---- input ----

    /// Client bytes arrived.
    pub fn receive_client(&mut self, data: &[u8]) {
        self.client_in.extend_from_slice(data);
    }

    /// Upstream bytes arrived.
    pub fn receive_upstream(&mut self, data: &[u8]) {
        self.upstream_in.extend_from_slice(data);
    }

    /// The next complete client line. An over-long one cannot be resynchronised: its
    /// bytes are dropped and counted, and the caller says goodbye.
    pub fn next_client_line(&mut self) -> Result<Option<Line>, LineTooLong> {
        self.client_lines
            .next_line(&mut self.client_in)
            .map_err(|_| {
                self.client_in.clear();
                self.event(Event::LimitExceeded {
                    limit: "line_length",
                });
                LineTooLong
            })
    }

    /// The next complete upstream line (`Err` for one over the protocol's bound).
    pub fn next_upstream_line(&mut self) -> Result<Option<Line>, super::line::Error> {
        self.upstream_lines.next_line(&mut self.upstream_in)
    }

    /// False while the session holds as many unprocessed client bytes as it may; never
    /// less than a line, which could otherwise never complete.
    pub fn wants_client_data(&self) -> bool {
        let limit = self.limits.max_held_bytes.max(self.limits.max_line_len);
        self.is_open() && self.client_in.len() < limit
    }

    // ---- TLS ----

    /// The client's bytes behind its STARTTLS (ARCHITECTURE.md §4): they belong to the
    /// TLS engine, never to the command reader (RFC 9051 §6.2.1 option 1). Bytes that do
    /// not start a TLS record are the command injection of the NO STARTTLS paper, or a
    /// broken client: the event says so.
    pub fn take_early_bytes(&mut self) -> Bytes {
        let early = self.client_in.split().freeze();
        self.client_lines.reset();
        if !early.is_empty() && early[0] != TLS_HANDSHAKE_RECORD {
            self.event(Event::StarttlsInjection { bytes: early.len() });
        }
        early
    }

    /// Asks the driver for the handshake, after the go-ahead reply, with the bytes of
    /// [`Conn::take_early_bytes`].
    pub fn start_tls(&mut self, early: Bytes) {
        self.stage = Stage::Handshake;
        self.push(Action::StartTls { early });
    }

    /// TLS is up. Returns false when the upstream spoke during the handshake: half a
    /// plaintext reply would be read inside TLS (ARCHITECTURE.md §9).
    pub fn tls_established(&mut self) -> bool {
        self.tls_active = true;
        self.starttls_offered = false;
        // On an implicit-TLS listener this comes before the greeting: no handshake was
        // asked for, and the session stays as it is.
        if self.stage != Stage::Handshake {
            return true;
        }
        self.stage = Stage::Open;
        self.upstream_in.is_empty()
    }

    /// The upstream accepted the login: everything the session holds is handed out
    /// (client output, the upstream's bytes after the reply, the client's bytes held
    /// behind the login), then the driver relays blindly (ARCHITECTURE.md §1.7, §10).
    pub fn go_blind(&mut self) {
        self.flush_client();
        if !self.upstream_in.is_empty() {
            let rest = self.upstream_in.split().freeze();
            self.actions.push_back(Action::ToClient(rest));
        }
        if !self.client_in.is_empty() {
            let held = self.client_in.split().freeze();
            self.actions.push_back(Action::ToUpstream(held));
        }
        self.stage = Stage::Relay;
        self.actions.push_back(Action::Relay);
    }

    // ---- security events ----

    /// A login command before TLS after STARTTLS was offered: something in the path may
    /// hide the offer from the client.
    pub fn note_login_before_tls(&mut self) {
        if self.starttls_offered {
            self.event(Event::StarttlsStrippingSuspected {
                reason: "auth_after_starttls_offered",
            });
        }
    }

    /// An unknown verb that looks like `upgrade` with letters replaced: a middlebox that
    /// overwrites STARTTLS in both directions.
    pub fn note_mangled_upgrade(&mut self, verb: &[u8], upgrade: &[u8]) {
        if is_mangled_upgrade_verb(verb, upgrade) {
            self.event(Event::StarttlsStrippingSuspected {
                reason: "mangled_verb",
            });
        }
    }

    /// A secret crossed the wire in plaintext (it was not forwarded): the event, with a
    /// keyed hash of the user name when it could be read, never the name or the secret.
    pub fn credentials_exposed(&mut self, mechanism: String, user: Option<&[u8]>) {
        let user_hash = user.map(|user| self.user_hash(user));
        self.event(Event::CredentialsExposed {
            mechanism,
            user_hash,
        });
    }

    /// A keyed hash of a user name, for an event that comes later.
    pub fn user_hash(&self, user: &[u8]) -> String {
        self.user_hasher.hash(&String::from_utf8_lossy(user))
    }

    /// An AUTH (AUTHENTICATE) with an initial response before TLS (RFC 4954 §4, RFC
    /// 4959, RFC 5034 §4): the response is exposed; PLAIN and LOGIN name the user.
    /// `prefix` goes before the mechanism's name in the event (`AUTH ` for POP3).
    pub fn sasl_exposed(&mut self, prefix: &str, mechanism: &[u8], response: &[u8]) {
        let user = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            super::sasl::plain_authcid(response)
        } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            super::sasl::login_username(response)
        } else {
            None
        };
        let mechanism = format!("{prefix}{}", super::sasl::mechanism_label(mechanism));
        self.credentials_exposed(mechanism, user.as_deref().map(str::as_bytes));
    }

    // ---- memory ----

    /// The driver is about to wait: empty buffers and queues give their memory back.
    pub fn release_idle_memory(&mut self) {
        release_if_empty(&mut self.client_in);
        release_if_empty(&mut self.upstream_in);
        release_if_empty(&mut self.client_out);
        release_queue_if_empty(&mut self.actions);
    }
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1, `ContentType handshake`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Drops the allocation of an empty buffer; the next bytes allocate what they need.
fn release_if_empty(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = BytesMut::new();
    }
}

/// Drops the allocation of an empty queue.
pub(crate) fn release_queue_if_empty<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}
