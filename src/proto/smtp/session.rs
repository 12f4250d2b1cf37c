//! The SMTP session: policy before TLS, STARTTLS owned by the proxy, EHLO rewritten,
//! replies kept in order, bodies framed so that proxy and upstream agree where a message
//! ends (DESIGN §2-§5, §9).
//!
//! Ordering: every client command gets exactly one reply, in order. Commands answered by
//! the proxy queue a ready reply behind those still owed by the upstream. A command
//! whose reply changes how the following bytes must be read (EHLO, DATA, AUTH, QUIT,
//! STARTTLS's RSET), and every command when the upstream did not offer PIPELINING, is a
//! barrier: nothing after it is read until its reply arrives (DESIGN §10).
//!
//! XCLIENT (listener option `xclient`): after the upstream's greeting, before the client
//! reads anything, the proxy sends its own EHLO, then (if the reply announces XCLIENT)
//! one XCLIENT with the client's identity, each after the previous reply (DESIGN §10).
//! The upstream answers XCLIENT with a new greeting, which is the one the client sees;
//! the client's own EHLO then starts its dialogue as usual. Postfix keeps the XCLIENT
//! attributes for the whole connection, so the proxy's RSET at STARTTLS does not undo
//! them (XCLIENT_README: they last until the end of the session or the next XCLIENT).
//! An upstream that does not announce XCLIENT, or refuses it, gets no session: the
//! client is answered 421 rather than reaching it as the proxy's trusted address.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::body::{Body, Progress};
use super::canonical;
use super::parse::{self, Verb};
use super::xclient;
use crate::policy::{
    BareNewlines, Policy, UserHasher, is_channel_binding_mechanism, is_mangled_upgrade_verb,
};
use crate::proto::line::{Framer, Line};
use crate::proto::{
    Action, Event, Phase, ReplyBudget, Tally, release_if_empty, release_queue_if_empty,
};

/// Replies the proxy gives itself (DESIGN §3, §4, §9).
mod reply {
    pub const MUST_STARTTLS: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
    pub const READY_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
    pub const TLS_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
    pub const NO_PARAMS: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
    pub const HELO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
    pub const TLS_UNAVAILABLE: &[u8] = b"454 4.7.0 TLS not available due to temporary reason\r\n";
    pub const BAD_SYNTAX: &[u8] = b"500 5.5.2 Error: bad syntax\r\n";
    pub const UNRECOGNIZED: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
    pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
    pub const NOT_AUTHORIZED: &[u8] = b"550 5.7.0 Error: insufficient authorization\r\n";
    pub const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n";
    pub const BDAT_UNAVAILABLE: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
    pub const CHUNK_TOO_LARGE: &[u8] = b"552 5.3.4 Error: chunk too large, closing connection\r\n";
    pub const BARE_NEWLINE: &[u8] = b"521 5.5.2 Error: bare CR or LF received\r\n";
    pub const UPSTREAM_UNAVAILABLE: &[u8] =
        b"421 4.3.0 Service temporarily unavailable, closing connection\r\n";
    pub const UPSTREAM_BROKEN: &[u8] = b"421 4.3.0 Upstream protocol error, closing connection\r\n";
    pub const IDLE_TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
    /// RFC 5321 §3.8: a server shutting down answers 421 and closes.
    pub const SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down, closing connection\r\n";
    pub const TOO_MANY_PLAINTEXT: &[u8] =
        b"421 4.7.0 Too many commands before STARTTLS, closing connection\r\n";
    pub const TOO_MANY_ERRORS: &[u8] = b"421 4.7.0 Too many errors, closing connection\r\n";
    pub const CONTROL_LINE: &[u8] =
        b"554 5.6.0 Error: message line of control characters only, closing connection\r\n";
    /// `xclient: true` and the upstream cannot take it (DESIGN §7).
    pub const IDENTITY_UNAVAILABLE: &[u8] =
        b"421 4.3.0 Service temporarily unavailable, closing connection\r\n";
}

/// An upstream reply may have at most this many lines (an EHLO reply has a dozen).
const MAX_REPLY_LINES: usize = 256;
/// Longest upstream reply line accepted.
const MAX_UPSTREAM_LINE_LEN: usize = 8192;
/// Largest BDAT chunk: what a 32-bit size field (Exim's) can express.
const MAX_CHUNK_LEN: u64 = u32::MAX as u64;
/// Most replies owed to the client at once; past this, nothing more is read until some
/// arrive (a flood of refused lines behind a slow upstream reply would grow the queue).
const MAX_QUEUED_REPLIES: usize = 64;

/// How a session is set up, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listener's plaintext policy.
    pub policy: Policy,
    /// What to do with bare CR / LF in bodies.
    pub bare_newlines: BareNewlines,
    /// Longest client command line, CRLF included.
    pub max_line_len: usize,
    /// Most client bytes held unprocessed (pipelined behind a barrier) before the driver
    /// stops reading.
    pub max_held_bytes: usize,
    /// Commands accepted before TLS under `require_tls` before the connection closes.
    pub max_plaintext_commands: u32,
    /// Error replies the proxy gives itself before it closes the connection.
    pub max_errors: u32,
    /// Hashes user names for `credentials_exposed`.
    pub user_hasher: UserHasher,
}

/// What the reading of client bytes is doing.
#[derive(Debug)]
enum Mode {
    /// Waiting for the upstream's greeting; nothing from the client is read (DESIGN §10).
    Greeting,
    /// Reading command lines.
    Command,
    /// Inside a DATA body, after the upstream's 354.
    Data(Body),
    /// Inside the chunk of a refused BDAT: `remaining` bytes are data (RFC 3030 §2),
    /// read and dropped, never commands.
    SkipChunk { remaining: u64 },
    /// After a 334: the next client line is a SASL response, not a command.
    SaslResponse,
    /// STARTTLS accepted: the upstream gets RSET once all earlier replies are in, and
    /// every client byte is held for the TLS engine.
    TlsPending { rset_sent: bool },
    /// The driver runs the handshake.
    Handshake,
    /// A fatal error reply is queued; nothing more is read from the client.
    Closing,
    /// The session is over.
    Closed,
}

/// What a queued reply slot waits for.
#[derive(Debug)]
enum Awaiting {
    Greeting,
    /// The proxy's own EHLO, to learn whether the upstream offers XCLIENT; the
    /// upstream's first greeting is not relayed.
    XclientEhlo,
    /// The proxy's XCLIENT; its positive reply is a new greeting, for the client.
    Xclient,
    Ehlo {
        /// The client's name, if it can be written into the HELO of a fallback.
        domain: Option<Bytes>,
    },
    /// The upstream refused EHLO; HELO was sent in its place (DESIGN §2).
    HeloFallback,
    Helo,
    Data,
    EndOfData,
    Auth,
    /// The proxy's own RSET before the STARTTLS go-ahead.
    TlsRset,
    Quit,
    Reply,
}

impl Awaiting {
    /// Nothing after this command may be read before its reply (DESIGN §10).
    fn is_barrier(&self) -> bool {
        !matches!(self, Awaiting::Reply | Awaiting::EndOfData)
    }
}

/// One reply owed to the client, in order.
#[derive(Debug)]
enum Slot {
    /// The upstream will answer.
    Upstream { verb: Verb, awaiting: Awaiting },
    /// The proxy answers with these bytes once the slots before are done.
    Local {
        verb: Verb,
        reply: &'static [u8],
        close: bool,
    },
}

/// Summary order, as in Postfix's `disconnect` line.
const TALLY_ORDER: &[&str] = &[
    "ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy",
    "etrn", "quit", "xclient", "unknown",
];

fn tally_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Ehlo => "ehlo",
        Verb::Helo => "helo",
        Verb::StartTls => "starttls",
        Verb::Auth => "auth",
        Verb::Mail => "mail",
        Verb::Rcpt => "rcpt",
        Verb::Data => "data",
        Verb::Bdat => "bdat",
        Verb::Rset => "rset",
        Verb::Noop => "noop",
        Verb::Vrfy => "vrfy",
        Verb::Etrn => "etrn",
        Verb::Quit => "quit",
        Verb::XClient => "xclient",
        Verb::Expn | Verb::Help | Verb::XForward | Verb::Other => "unknown",
    }
}

/// The sans-I/O SMTP session.
#[derive(Debug)]
pub struct Session {
    config: Config,
    tls_active: bool,
    mode: Mode,
    client_in: BytesMut,
    client_lines: Framer,
    upstream_in: BytesMut,
    upstream_lines: Framer,
    /// Lines of the upstream reply being collected.
    reply_lines: Vec<Line>,
    slots: VecDeque<Slot>,
    /// From the upstream's last EHLO reply.
    upstream_pipelining: bool,
    /// A successful EHLO or HELO since TLS started (RFC 3207 §4.2).
    greeted_since_tls: bool,
    /// The client was shown STARTTLS in an EHLO reply.
    starttls_offered: bool,
    /// Commands read before TLS.
    plaintext_commands: u32,
    /// Error replies given by the proxy itself.
    errors: u32,
    /// Reply bytes not yet written by the driver.
    replies: ReplyBudget,
    /// The client closed its sending side; the session ends once the replies still
    /// owed have been sent.
    client_done: bool,
    actions: VecDeque<Action>,
    counters: Tally,
    /// The client to announce with XCLIENT after the greeting (listener option).
    xclient: Option<xclient::Identity>,
}

impl Session {
    /// A session for a new connection; `tls_active` is true on implicit-TLS listeners.
    pub fn new(config: Config, tls_active: bool) -> Self {
        let client_lines = Framer::new(config.max_line_len);
        Session {
            config,
            tls_active,
            mode: Mode::Greeting,
            client_in: BytesMut::new(),
            client_lines,
            upstream_in: BytesMut::new(),
            upstream_lines: Framer::new(MAX_UPSTREAM_LINE_LEN),
            reply_lines: Vec::new(),
            slots: VecDeque::from([Slot::Upstream {
                verb: Verb::Other,
                awaiting: Awaiting::Greeting,
            }]),
            upstream_pipelining: false,
            greeted_since_tls: false,
            starttls_offered: false,
            plaintext_commands: 0,
            errors: 0,
            replies: ReplyBudget::default(),
            client_done: false,
            actions: VecDeque::new(),
            counters: Tally::new(TALLY_ORDER, &["starttls", "auth"]),
            xclient: None,
        }
    }

    /// Announces `identity` to the upstream with XCLIENT before the client's dialogue
    /// (see the module documentation).
    pub fn with_xclient(mut self, identity: xclient::Identity) -> Self {
        self.xclient = Some(identity);
        self
    }

    fn send_client(&mut self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        self.replies.queued(bytes.len());
        self.actions.push_back(Action::ToClient(bytes));
    }

    fn send_upstream(&mut self, bytes: impl Into<Bytes>) {
        self.actions.push_back(Action::ToUpstream(bytes.into()));
    }

    fn event(&mut self, event: Event) {
        self.replies.event();
        self.actions.push_back(Action::Event(event));
    }

    fn close(&mut self) {
        if !matches!(self.mode, Mode::Closed) {
            self.mode = Mode::Closed;
            self.actions.push_back(Action::Close);
        }
    }

    /// Something the client cannot recover from: reply, then close.
    fn close_with(&mut self, reply: &'static [u8]) {
        if !matches!(self.mode, Mode::Closed | Mode::Handshake) {
            self.send_client(reply);
        }
        self.close();
    }

    /// True while a reply that changes how to read the client is outstanding.
    fn blocked(&self) -> bool {
        self.slots.len() >= MAX_QUEUED_REPLIES
            || self.slots.iter().any(|slot| match slot {
                Slot::Upstream { awaiting, .. } => {
                    awaiting.is_barrier() || !self.upstream_pipelining
                }
                Slot::Local { .. } => false,
            })
    }

    /// Sends every proxy-made reply that is now at the head of the queue.
    fn flush_local_replies(&mut self) {
        while let Some(Slot::Local { .. }) = self.slots.front() {
            let Some(Slot::Local { verb, reply, close }) = self.slots.pop_front() else {
                unreachable!("front is Local")
            };
            let positive = reply[0] < b'4';
            self.counters.record(tally_name(verb), positive);
            if close {
                self.close_with(reply);
                return;
            }
            self.send_client(reply);
            if !positive {
                // A client that only draws errors is probing: Postfix's
                // smtpd_hard_error_limit, for the replies the proxy gives itself.
                self.errors += 1;
                if self.errors > self.config.max_errors {
                    self.event(Event::LimitExceeded { limit: "errors" });
                    self.slots.clear();
                    self.close_with(reply::TOO_MANY_ERRORS);
                    return;
                }
            }
        }
    }

    /// Queues a reply of the proxy's own, in order behind outstanding upstream replies.
    fn reply_local(&mut self, verb: Verb, reply: &'static [u8]) {
        self.slots.push_back(Slot::Local {
            verb,
            reply,
            close: false,
        });
        self.flush_local_replies();
    }

    fn forward(&mut self, verb: Verb, line: &[u8], awaiting: Awaiting) {
        // The verb at column 0 and CRLF at the end, whatever the client sent: Exim, for
        // one, reads a command only at column 0, and the two must classify it alike.
        let line = line.trim_ascii_start();
        let mut out = BytesMut::with_capacity(line.len() + 2);
        out.put_slice(line);
        out.put_slice(b"\r\n");
        self.forward_written(verb, out.freeze(), awaiting);
    }

    /// Sends a command line the proxy wrote itself and waits for its reply.
    fn forward_written(&mut self, verb: Verb, line: Bytes, awaiting: Awaiting) {
        self.send_upstream(line);
        self.slots.push_back(Slot::Upstream { verb, awaiting });
    }

    // ---- client side ----

    fn process_client(&mut self) {
        loop {
            if self.replies.is_full() && matches!(self.mode, Mode::Command) {
                // The client has not taken what it was sent: no more commands are read
                // until the driver has written it (`on_output_written`).
                return;
            }
            match &mut self.mode {
                Mode::Greeting | Mode::Handshake | Mode::Closing | Mode::Closed => return,
                Mode::TlsPending { rset_sent } => {
                    // RFC 3207 §4.2: the upstream must forget the plaintext dialogue. The
                    // RSET goes alone, once every earlier reply is in (DESIGN §10).
                    if !*rset_sent && self.slots.is_empty() {
                        *rset_sent = true;
                        self.send_upstream(&b"RSET\r\n"[..]);
                        self.slots.push_back(Slot::Upstream {
                            verb: Verb::StartTls,
                            awaiting: Awaiting::TlsRset,
                        });
                    }
                    return;
                }
                Mode::Data(body) => {
                    if self.client_in.is_empty() {
                        return;
                    }
                    let mut out = BytesMut::new();
                    let progress = body.feed(&self.client_in, &mut out);
                    let bare = body.bare_newlines();
                    if bare > 0 && self.config.bare_newlines == BareNewlines::Reject {
                        // Nothing more reaches the upstream, which never sees an
                        // end-of-data: the partial message is discarded there.
                        self.event(Event::BareNewlineNormalized { count: bare });
                        self.close_with(reply::BARE_NEWLINE);
                        return;
                    }
                    let neutralized = body.neutralized();
                    if progress == Progress::Refused {
                        // The upstream never sees an end-of-data: the partial message
                        // is discarded there.
                        self.event(Event::LimitExceeded {
                            limit: "control_line",
                        });
                        self.close_with(reply::CONTROL_LINE);
                        return;
                    }
                    if !out.is_empty() {
                        self.send_upstream(out.freeze());
                    }
                    match progress {
                        Progress::More | Progress::Refused => {
                            self.client_in.clear();
                            return;
                        }
                        Progress::End { consumed } => {
                            self.client_in.advance(consumed);
                            if bare > 0 {
                                self.event(Event::BareNewlineNormalized { count: bare });
                            }
                            if neutralized > 0 {
                                self.event(Event::SmugglingNeutralized { count: neutralized });
                            }
                            self.mode = Mode::Command;
                            self.slots.push_back(Slot::Upstream {
                                verb: Verb::Data,
                                awaiting: Awaiting::EndOfData,
                            });
                        }
                    }
                }
                Mode::SkipChunk { remaining } => {
                    if self.client_in.is_empty() {
                        return;
                    }
                    let n = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.client_in.len());
                    *remaining -= n as u64;
                    let done = *remaining == 0;
                    self.client_in.advance(n);
                    if done {
                        self.mode = Mode::Command;
                    }
                }
                Mode::SaslResponse => match self.next_client_line() {
                    Some(line) => {
                        self.mode = Mode::Command;
                        // A SASL response is data (RFC 4954 §4): base64 or a cancel, never
                        // bytes an upstream could read as a second line.
                        let response = crate::proto::sasl::response_line(&line.text);
                        self.send_upstream(Bytes::from([response, b"\r\n"].concat()));
                        self.slots.push_back(Slot::Upstream {
                            verb: Verb::Auth,
                            awaiting: Awaiting::Auth,
                        });
                    }
                    None => return,
                },
                Mode::Command => {
                    if self.blocked() {
                        return;
                    }
                    match self.next_client_line() {
                        Some(line) => self.on_command(line),
                        None => return,
                    }
                }
            }
        }
    }

    fn next_client_line(&mut self) -> Option<Line> {
        match self.client_lines.next_line(&mut self.client_in) {
            Ok(line) => line,
            Err(_) => {
                // No resynchronisation is possible inside an endless line: refuse, close.
                self.client_in.clear();
                self.event(Event::LimitExceeded {
                    limit: "line_length",
                });
                self.slots.push_back(Slot::Local {
                    verb: Verb::Other,
                    reply: reply::LINE_TOO_LONG,
                    close: true,
                });
                if !matches!(self.mode, Mode::Closed) {
                    self.mode = Mode::Closing;
                }
                self.flush_local_replies();
                None
            }
        }
    }

    fn on_command(&mut self, line: Line) {
        if !self.tls_active && self.config.policy == Policy::RequireTls {
            self.plaintext_commands += 1;
            if self.plaintext_commands > self.config.max_plaintext_commands {
                // Only the upgrade dialogue belongs here; a client that keeps talking is
                // probing (DESIGN §8, pre-TLS command budget).
                self.event(Event::LimitExceeded {
                    limit: "plaintext_commands",
                });
                self.slots.push_back(Slot::Local {
                    verb: Verb::Other,
                    reply: reply::TOO_MANY_PLAINTEXT,
                    close: true,
                });
                self.mode = Mode::Closing;
                return self.flush_local_replies();
            }
        }
        let command = match parse::command(&line.text) {
            Ok(command) => command,
            Err(_) => return self.reply_local(Verb::Other, reply::BAD_SYNTAX),
        };
        let verb = command.verb;

        if verb == Verb::StartTls {
            return self.on_starttls(command.args.is_empty());
        }
        if matches!(verb, Verb::XClient | Verb::XForward) {
            // The local link is trusted by the upstream; only the proxy speaks for it.
            self.event(Event::ForbiddenCommand {
                verb: verb_label(verb),
            });
            return self.refuse(&command, reply::NOT_AUTHORIZED);
        }

        if !self.tls_active {
            if let Some(refusal) = self.plaintext_refusal(&command) {
                self.event(Event::PlaintextCommandRefused {
                    verb: verb_label(verb),
                });
                return self.refuse(&command, refusal);
            }
        } else if !self.greeted_since_tls
            && !matches!(
                verb,
                Verb::Ehlo | Verb::Helo | Verb::Noop | Verb::Quit | Verb::Rset
            )
        {
            // RFC 3207 §4.2: after TLS the client must start over with EHLO.
            return self.refuse(&command, reply::HELO_FIRST);
        }

        if verb == Verb::Bdat {
            return self.on_bdat(&command);
        }
        let awaiting = match verb {
            Verb::Ehlo => Awaiting::Ehlo {
                domain: canonical::domain_or_literal(command.args)
                    .map(|domain| line.text.slice_ref(domain)),
            },
            Verb::Helo => Awaiting::Helo,
            Verb::Data => Awaiting::Data,
            Verb::Auth => Awaiting::Auth,
            Verb::Quit => Awaiting::Quit,
            _ => Awaiting::Reply,
        };
        if self.tls_active {
            return self.forward(verb, &line.text, awaiting);
        }
        // DESIGN §3, canonical forwarding: before TLS the upstream reads only lines the
        // proxy wrote from its own parse; what it cannot read whole stays here.
        match canonical::line(&command) {
            Ok(written) => self.forward_written(verb, written, awaiting),
            Err(canonical::Refusal(reply)) => {
                self.event(Event::PlaintextCommandRefused {
                    verb: verb_label(verb),
                });
                self.reply_local(verb, reply)
            }
        }
    }

    /// Answers a command locally. A refused BDAT's chunk follows it all the same: its
    /// octets are read and dropped, never taken for commands.
    fn refuse(&mut self, command: &parse::Command<'_>, reply: &'static [u8]) {
        if command.verb == Verb::Bdat
            && let Ok((size, _)) = parse::bdat_args(command.args)
        {
            self.skip_chunk(size);
        }
        self.reply_local(command.verb, reply);
    }

    /// Why a command may not be forwarded before TLS, if it may not (DESIGN §3).
    fn plaintext_refusal(&mut self, command: &parse::Command<'_>) -> Option<&'static [u8]> {
        let verb = command.verb;
        if verb == Verb::Auth {
            self.note_plaintext_credentials(command.args);
            return Some(reply::MUST_STARTTLS);
        }
        if verb == Verb::Other && is_mangled_upgrade_verb(command.verb_text, b"STARTTLS") {
            self.event(Event::StarttlsStrippingSuspected {
                reason: "mangled_verb",
            });
        }
        let allowed = match self.config.policy {
            Policy::RequireTls => matches!(
                verb,
                Verb::Ehlo | Verb::Helo | Verb::Noop | Verb::Rset | Verb::Quit
            ),
            Policy::AuthRequiresTls => verb != Verb::Other,
        };
        match (allowed, self.config.policy) {
            (true, _) => None,
            (false, Policy::RequireTls) => Some(reply::MUST_STARTTLS),
            // On an MX, unknown verbs stay local: a client that ignores the refusal of its
            // AUTH would otherwise send its base64 credentials upstream as commands.
            (false, Policy::AuthRequiresTls) => Some(reply::UNRECOGNIZED),
        }
    }

    /// An AUTH before TLS: if it carries an initial response, a secret crossed the wire.
    fn note_plaintext_credentials(&mut self, args: &[u8]) {
        if self.starttls_offered {
            self.event(Event::StarttlsStrippingSuspected {
                reason: "auth_after_starttls_offered",
            });
        }
        let Ok((mechanism, Some(initial_response))) = parse::auth_args(args) else {
            return;
        };
        let user = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            crate::proto::sasl::plain_authcid(initial_response)
        } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            crate::proto::sasl::login_username(initial_response)
        } else {
            None
        };
        let mechanism = crate::proto::sasl::mechanism_label(mechanism);
        self.event(Event::CredentialsExposed {
            mechanism,
            user_hash: user.map(|user| self.config.user_hasher.hash(&user)),
        });
    }

    fn on_starttls(&mut self, no_parameters: bool) {
        if self.tls_active {
            return self.reply_local(Verb::StartTls, reply::TLS_ACTIVE);
        }
        if !no_parameters {
            // RFC 3207 §4: STARTTLS takes no parameters; the session stays usable.
            return self.reply_local(Verb::StartTls, reply::NO_PARAMS);
        }
        self.mode = Mode::TlsPending { rset_sent: false };
    }

    /// BDAT is never forwarded and CHUNKING never offered (DESIGN §5): its framing is
    /// a byte count the upstream's chunk state decides how to read (Exim answers RSET
    /// inside a chunked transaction with 250 and reads on, dot-terminated), where DATA's
    /// end is one the proxy writes itself. The chunk that follows is read and dropped,
    /// never taken for commands.
    fn on_bdat(&mut self, command: &parse::Command<'_>) {
        let Ok((size, _)) = parse::bdat_args(command.args) else {
            // Without a size nobody can know where the chunk ends: its bytes are read
            // as commands by the proxy, and the upstream hears none of them.
            return self.reply_local(Verb::Bdat, reply::BDAT_SYNTAX);
        };
        if size > MAX_CHUNK_LEN {
            // Skipping gigabytes is no service: say so and close.
            self.event(Event::LimitExceeded {
                limit: "chunk_size",
            });
            self.slots.push_back(Slot::Local {
                verb: Verb::Bdat,
                reply: reply::CHUNK_TOO_LARGE,
                close: true,
            });
            self.mode = Mode::Closing;
            return self.flush_local_replies();
        }
        self.event(Event::ForbiddenCommand { verb: "BDAT" });
        self.refuse(command, reply::BDAT_UNAVAILABLE);
    }

    /// The bytes of a refused BDAT chunk are data all the same: read and drop them.
    fn skip_chunk(&mut self, size: u64) {
        if size > 0 {
            self.mode = Mode::SkipChunk { remaining: size };
        }
    }

    // ---- upstream side ----

    fn process_upstream(&mut self) {
        // During the handshake upstream bytes wait; `on_tls_established` refuses them.
        while !matches!(self.mode, Mode::Closed | Mode::Handshake) {
            let line = match self.upstream_lines.next_line(&mut self.upstream_in) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(_) => return self.upstream_broken("reply line too long"),
            };
            let (code, last) = match parse::reply_line(&line.text) {
                Ok(reply) => (reply.code, reply.last),
                Err(_) => return self.upstream_broken("malformed reply line"),
            };
            if let Some(first) = self.reply_lines.first()
                && parse::reply_line(&first.text).map(|r| r.code) != Ok(code)
            {
                return self.upstream_broken("reply code changed inside a reply");
            }
            if self.reply_lines.len() == MAX_REPLY_LINES {
                return self.upstream_broken("reply has too many lines");
            }
            self.reply_lines.push(line);
            if last {
                let lines = std::mem::take(&mut self.reply_lines);
                self.on_reply(code, lines);
                self.flush_local_replies();
            }
        }
    }

    fn upstream_broken(&mut self, detail: &'static str) {
        self.event(Event::UpstreamProtocolError { detail });
        self.close_with(reply::UPSTREAM_BROKEN);
    }

    fn on_reply(&mut self, code: u16, lines: Vec<Line>) {
        let Some(Slot::Upstream { verb, awaiting }) = self.slots.pop_front() else {
            // Unsolicited (a 421 before the upstream hangs up): relay as is.
            return self.relay(&lines);
        };
        let positive = code < 400;
        match awaiting {
            Awaiting::Greeting => {
                if code == 220 && self.xclient.is_some() {
                    // Our own command, sent alone after the banner (DESIGN §10).
                    self.send_upstream(&b"EHLO localhost\r\n"[..]);
                    self.slots.push_front(Slot::Upstream {
                        verb,
                        awaiting: Awaiting::XclientEhlo,
                    });
                    return;
                }
                self.mode = Mode::Command;
                return self.relay(&lines);
            }
            Awaiting::XclientEhlo => return self.on_xclient_ehlo_reply(verb, code, &lines),
            Awaiting::Xclient => {
                self.mode = Mode::Command;
                // 220: the new session's greeting. 421: the upstream refuses this
                // client and hangs up; the client sees it as the greeting.
                if code == 220 || code == 421 {
                    return self.relay(&lines);
                }
                return self.xclient_unavailable("refused");
            }
            Awaiting::Ehlo { domain } => {
                if positive {
                    self.on_ehlo_reply(&lines);
                } else if let Some(domain) = domain.filter(|_| code >= 500) {
                    // A HELO-only upstream: EHLO still gets a 250 (DESIGN §2), before TLS
                    // with STARTTLS in it, after TLS as the client's new greeting.
                    let mut helo = BytesMut::from(&b"HELO "[..]);
                    helo.put_slice(&domain);
                    helo.put_slice(b"\r\n");
                    self.send_upstream(helo.freeze());
                    self.slots.push_front(Slot::Upstream {
                        verb,
                        awaiting: Awaiting::HeloFallback,
                    });
                    return;
                } else {
                    self.relay(&lines);
                }
            }
            Awaiting::HeloFallback => {
                if positive {
                    let text = parse::reply_line(&lines[0].text).map_or(&b""[..], |r| r.text);
                    let mut out = BytesMut::new();
                    if self.tls_active {
                        out.put_slice(b"250 ");
                        out.put_slice(text);
                        out.put_slice(b"\r\n");
                    } else {
                        out.put_slice(b"250-");
                        out.put_slice(text);
                        out.put_slice(b"\r\n250 STARTTLS\r\n");
                        self.starttls_offered = true;
                    }
                    self.send_client(out.freeze());
                    self.upstream_pipelining = false;
                } else {
                    self.relay(&lines);
                }
            }
            Awaiting::Helo => {
                if positive {
                    self.upstream_pipelining = false;
                }
                self.relay(&lines);
            }
            Awaiting::Data => {
                self.relay(&lines);
                if code == 354 {
                    // Counted once, with the reply to the end of data.
                    self.mode = Mode::Data(Body::default());
                    return;
                }
            }
            Awaiting::Auth => {
                self.relay(&lines);
                if code == 334 {
                    // Counted once, with the final reply of the exchange.
                    self.mode = Mode::SaslResponse;
                    return;
                }
            }
            Awaiting::TlsRset => return self.on_tls_rset_reply(positive),
            Awaiting::Quit => {
                self.counters.record(tally_name(verb), positive);
                self.relay(&lines);
                return self.close();
            }
            Awaiting::EndOfData | Awaiting::Reply => self.relay(&lines),
        }
        if matches!(verb, Verb::Ehlo | Verb::Helo) && positive && self.tls_active {
            self.greeted_since_tls = true;
        }
        self.counters.record(tally_name(verb), positive);
    }

    /// The reply to the proxy's own EHLO: send XCLIENT with what the upstream announced;
    /// a refusal (4xx) is relayed and ends the session; no XCLIENT offered refuses it.
    fn on_xclient_ehlo_reply(&mut self, verb: Verb, code: u16, lines: &[Line]) {
        let identity = self.xclient.take();
        let positive = code < 400;
        if (400..500).contains(&code) {
            // The upstream turns sessions away (421: too many connections): say so.
            self.mode = Mode::Command;
            self.relay(lines);
            return self.close();
        }
        let command = lines
            .iter()
            .skip(1)
            .filter(|_| positive)
            .filter_map(|line| {
                let text = parse::reply_line(&line.text).map_or(&b""[..], |r| r.text);
                xclient::announced(text)
            })
            .next()
            .zip(identity)
            .and_then(|(names, identity)| xclient::command(&identity, &names));
        match command {
            Some(command) => {
                self.send_upstream(command);
                self.slots.push_front(Slot::Upstream {
                    verb,
                    awaiting: Awaiting::Xclient,
                });
            }
            None => self.xclient_unavailable("not_announced"),
        }
    }

    /// The listener asks for XCLIENT and the upstream cannot take it: the session is
    /// refused rather than reaching the upstream as mailmoat's own, trusted address
    /// (the open-relay trap of DESIGN §7).
    fn xclient_unavailable(&mut self, reason: &'static str) {
        self.event(Event::XclientUnavailable { reason });
        self.mode = Mode::Command;
        self.close_with(reply::IDENTITY_UNAVAILABLE);
    }

    fn relay(&mut self, lines: &[Line]) {
        let mut out = BytesMut::with_capacity(lines.iter().map(|l| l.raw.len()).sum());
        for line in lines {
            out.put_slice(&line.raw);
        }
        self.send_client(out.freeze());
    }

    /// The upstream's EHLO reply, rewritten per DESIGN §2: the upstream's own keywords in
    /// its order, minus what must not cross the proxy, plus STARTTLS before TLS.
    fn on_ehlo_reply(&mut self, lines: &[Line]) {
        let offer_starttls = !self.tls_active;
        self.upstream_pipelining = false;
        let mut kept: Vec<Bytes> = Vec::with_capacity(lines.len() + 1);
        for (index, line) in lines.iter().enumerate() {
            let text = parse::reply_line(&line.text).map_or(&b""[..], |r| r.text);
            let text = line.text.slice_ref(text);
            if index == 0 {
                kept.push(text); // the domain and greeting
                continue;
            }
            let keyword = parse::ehlo_keyword(&text);
            let is = |name: &[u8]| keyword.eq_ignore_ascii_case(name);
            if is(b"PIPELINING") {
                self.upstream_pipelining = true;
            }
            // CHUNKING (and BINARYMIME, which needs it) never cross: see `on_bdat`.
            if is(b"STARTTLS")
                || is(b"XCLIENT")
                || is(b"XFORWARD")
                || is(b"PIPECONNECT")
                || is(b"CHUNKING")
                || is(b"BINARYMIME")
            {
                continue;
            }
            if is(b"AUTH") {
                if self.tls_active
                    && let Some(auth) = auth_without_channel_binding(&text)
                {
                    kept.push(auth);
                }
                continue;
            }
            kept.push(text);
        }
        if offer_starttls {
            kept.push(Bytes::from_static(b"STARTTLS"));
            self.starttls_offered = true;
        }
        let mut out = BytesMut::new();
        for (index, text) in kept.iter().enumerate() {
            out.put_slice(if index + 1 == kept.len() {
                b"250 "
            } else {
                b"250-"
            });
            out.put_slice(text);
            out.put_slice(b"\r\n");
        }
        self.send_client(out.freeze());
    }

    fn on_tls_rset_reply(&mut self, positive: bool) {
        let early = self.client_in.split().freeze();
        self.client_lines.reset();
        if !early.is_empty() && early[0] != 0x16 {
            // DESIGN §4: whatever the client queued behind STARTTLS is handed to the TLS
            // engine (it fails there), never read as a command.
            self.event(Event::StarttlsInjection { bytes: early.len() });
        }
        if !self.upstream_in.is_empty() || !self.reply_lines.is_empty() {
            // More than the RSET's reply: replies out of step (DESIGN §9: nothing
            // before TLS may survive into it).
            return self.upstream_broken("data after the reply to RSET");
        }
        if !positive {
            self.counters.record(tally_name(Verb::StartTls), false);
            self.mode = Mode::Command;
            self.send_client(reply::TLS_UNAVAILABLE);
            return;
        }
        if self.client_done {
            // The client closed its side behind STARTTLS: no handshake can complete,
            // and nothing may be queued behind the upgrade.
            self.counters.record(tally_name(Verb::StartTls), false);
            return self.close();
        }
        self.counters.record(tally_name(Verb::StartTls), true);
        self.send_client(reply::READY_TLS);
        self.mode = Mode::Handshake;
        self.actions.push_back(Action::StartTls { early });
    }
}

/// `AUTH` keyword line minus channel-binding mechanisms; `None` when nothing remains.
fn auth_without_channel_binding(text: &Bytes) -> Option<Bytes> {
    let keyword_len = parse::ehlo_keyword(text).len();
    let mechanisms = text[keyword_len..]
        .split(|&b| b == b' ' || b == b'\t' || b == b'=')
        .filter(|m| !m.is_empty());
    if !mechanisms.clone().any(is_channel_binding_mechanism) {
        return Some(text.clone());
    }
    let kept: Vec<&[u8]> = mechanisms
        .filter(|m| !is_channel_binding_mechanism(m))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let mut out = BytesMut::from(&text[..keyword_len]);
    for mechanism in kept {
        out.put_u8(b' ');
        out.put_slice(mechanism);
    }
    Some(out.freeze())
}

fn verb_label(verb: Verb) -> &'static str {
    match verb {
        Verb::Ehlo => "EHLO",
        Verb::Helo => "HELO",
        Verb::StartTls => "STARTTLS",
        Verb::Auth => "AUTH",
        Verb::Mail => "MAIL",
        Verb::Rcpt => "RCPT",
        Verb::Data => "DATA",
        Verb::Bdat => "BDAT",
        Verb::Rset => "RSET",
        Verb::Noop => "NOOP",
        Verb::Quit => "QUIT",
        Verb::Vrfy => "VRFY",
        Verb::Expn => "EXPN",
        Verb::Help => "HELP",
        Verb::Etrn => "ETRN",
        Verb::XClient => "XCLIENT",
        Verb::XForward => "XFORWARD",
        Verb::Other => "unknown",
    }
}

impl crate::proto::Session for Session {
    fn on_client_data(&mut self, data: &[u8]) {
        if matches!(self.mode, Mode::Closed) {
            return;
        }
        self.client_in.extend_from_slice(data);
        self.process_client();
    }

    fn on_upstream_data(&mut self, data: &[u8]) {
        if matches!(self.mode, Mode::Closed) {
            return;
        }
        self.upstream_in.extend_from_slice(data);
        self.process_upstream();
        self.process_client();
        // A client that half-closed is done once every command it sent has been read
        // and answered: the commands held behind the reply just in go first.
        if self.client_done && self.slots.is_empty() {
            self.close();
        }
    }

    fn on_client_eof(&mut self) {
        self.client_done = true;
        let owed = self
            .slots
            .iter()
            .any(|slot| matches!(slot, Slot::Upstream { .. }));
        match self.mode {
            // Mid-DATA this drops the upstream without an end-of-data: no partial
            // message is ever delivered (DESIGN §9).
            Mode::Data(_) | Mode::SkipChunk { .. } | Mode::SaslResponse => self.close(),
            // A client that pipelined its commands and half-closed still gets its
            // replies (and its last message is not lost).
            Mode::Command | Mode::Greeting if owed => {}
            _ => self.close(),
        }
    }

    fn on_upstream_eof(&mut self) {
        if matches!(self.mode, Mode::Command) && self.slots.is_empty() {
            // Between commands (after the upstream's own 421, say): nothing is owed.
            self.close();
        } else {
            self.close_with(reply::UPSTREAM_UNAVAILABLE);
        }
    }

    fn on_tls_established(&mut self) {
        self.tls_active = true;
        self.greeted_since_tls = false;
        self.upstream_pipelining = false;
        // On an implicit-TLS listener this comes before the greeting, which is still
        // awaited: the mode stays.
        if matches!(self.mode, Mode::Handshake) {
            self.mode = Mode::Command;
            if !self.upstream_in.is_empty() {
                return self.upstream_broken("upstream spoke during the TLS handshake");
            }
        }
        self.process_client();
    }

    fn on_timeout(&mut self) {
        match self.mode {
            Mode::Greeting => self.close_with(reply::UPSTREAM_UNAVAILABLE),
            _ => self.close_with(reply::IDLE_TIMEOUT),
        }
    }

    fn phase(&self) -> Phase {
        match self.mode {
            Mode::Greeting => Phase::Greeting,
            Mode::Data(_) | Mode::SkipChunk { .. } => Phase::Data,
            Mode::Handshake => Phase::Handshake,
            _ => Phase::Command,
        }
    }

    fn wants_client_data(&self) -> bool {
        !self.client_done
            && !matches!(self.mode, Mode::Closed | Mode::Closing | Mode::Handshake)
            && self.client_in.len() < self.config.max_held_bytes
    }

    fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn release_idle_memory(&mut self) {
        release_if_empty(&mut self.client_in);
        release_if_empty(&mut self.upstream_in);
        release_queue_if_empty(&mut self.actions);
        release_queue_if_empty(&mut self.slots);
        if self.reply_lines.is_empty() {
            self.reply_lines = Vec::new();
        }
    }

    fn on_output_written(&mut self) -> bool {
        let was_full = self.replies.is_full();
        self.replies.written();
        if was_full {
            self.process_client();
        }
        !self.actions.is_empty()
    }

    fn close_if_idle(&mut self) -> bool {
        match self.mode {
            // The 421 takes the place of the greeting (RFC 5321 §3.1).
            Mode::Greeting => {}
            Mode::Command if self.slots.is_empty() && self.client_in.is_empty() => {
                // Nothing is in flight upstream: end its side cleanly too.
                self.send_upstream(&b"QUIT\r\n"[..]);
            }
            _ => return false,
        }
        self.close_with(reply::SHUTTING_DOWN);
        true
    }

    fn summary(&self) -> String {
        self.counters.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Session as _;

    const GREETING: &[u8] = b"220 legacy.example.test ESMTP legacy\r\n";
    const EHLO_REPLY: &[u8] = b"250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-starttls\r\n250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-AUTH=PLAIN LOGIN\r\n\
250-XCLIENT NAME ADDR PROTO HELO\r\n250-XFORWARD NAME ADDR\r\n250-PIPECONNECT\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 CHUNKING\r\n";
    // "\0alice@example.test\0alice-secret-pw"
    const PLAIN_IR: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=";

    /// What one step produced, split by kind.
    #[derive(Debug, Default, PartialEq)]
    struct Out {
        client: String,
        upstream: String,
        events: Vec<Event>,
        starttls: Option<Vec<u8>>,
        closed: bool,
    }

    fn drain(session: &mut Session) -> Out {
        let mut out = Out::default();
        while let Some(action) = session.next_action() {
            match action {
                Action::ToClient(b) => out.client.push_str(&String::from_utf8_lossy(&b)),
                Action::ToUpstream(b) => out.upstream.push_str(&String::from_utf8_lossy(&b)),
                Action::Event(e) => out.events.push(e),
                Action::StartTls { early } => out.starttls = Some(early.to_vec()),
                Action::Close => out.closed = true,
                Action::Relay => panic!("SMTP never goes blind (DESIGN §1.7)"),
            }
        }
        out
    }

    fn config(policy: Policy) -> Config {
        Config {
            policy,
            bare_newlines: BareNewlines::Normalize,
            max_line_len: 512,
            max_held_bytes: 64 * 1024,
            max_plaintext_commands: 20,
            max_errors: 20,
            user_hasher: UserHasher::new(b"test key"),
        }
    }

    #[test]
    fn a_half_closed_client_gets_every_command_held_behind_a_barrier_processed() {
        let mut s = greeted(Policy::AuthRequiresTls);
        // HELO is a barrier: what follows is held until its reply.
        let out = client(
            &mut s,
            "HELO c.example\r\nMAIL FROM:<a@example.test>\r\nQUIT\r\n",
        );
        assert_eq!(out.upstream, "HELO c.example\r\n");
        s.on_client_eof();
        let out = upstream(&mut s, "250 legacy.example.test\r\n");
        assert_eq!(out.client, "250 legacy.example.test\r\n");
        // No PIPELINING announced: one command at a time (DESIGN §10).
        assert_eq!(out.upstream, "MAIL FROM:<a@example.test>\r\n");
        assert!(!out.closed);
        let out = upstream(&mut s, "250 2.1.0 Ok\r\n");
        assert_eq!(
            (out.client.as_str(), out.upstream.as_str()),
            ("250 2.1.0 Ok\r\n", "QUIT\r\n")
        );
        assert!(!out.closed);
        let out = upstream(&mut s, "221 2.0.0 Bye\r\n");
        assert_eq!(out.client, "221 2.0.0 Bye\r\n");
        assert!(out.closed);
    }

    #[test]
    fn shutdown_waits_for_the_command_boundary_then_says_421() {
        // Before the greeting the 421 takes its place; nothing goes upstream.
        let mut s = Session::new(config(Policy::RequireTls), false);
        assert!(s.close_if_idle());
        let out = drain(&mut s);
        assert_eq!(
            out.client,
            "421 4.3.2 Service shutting down, closing connection\r\n"
        );
        assert_eq!((out.upstream.as_str(), out.closed), ("", true));

        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "MAIL FROM:<a@example.test>\r\n");
        assert!(!s.close_if_idle(), "a reply is owed");
        upstream(&mut s, "250 2.1.0 Ok\r\n");
        client(&mut s, "RCPT TO:<b@example.test>\r\nDATA\r\n");
        upstream(
            &mut s,
            "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        );
        client(&mut s, "Subject: x\r\n\r\nbody\r\n");
        assert!(!s.close_if_idle(), "mid-DATA");
        client(&mut s, ".\r\nNO");
        upstream(&mut s, "250 2.0.0 Ok: queued\r\n");
        assert!(!s.close_if_idle(), "half a command line is held");
        client(&mut s, "OP\r\n");
        upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert!(s.close_if_idle());
        let out = drain(&mut s);
        assert_eq!(
            out.client,
            "421 4.3.2 Service shutting down, closing connection\r\n"
        );
        assert_eq!((out.upstream.as_str(), out.closed), ("QUIT\r\n", true));
    }

    #[test]
    fn the_plaintext_command_budget_closes_a_chatty_client() {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, &"NOOP\r\n".repeat(20));
        assert_eq!(out.upstream, "NOOP\r\n");
        for _ in 0..20 {
            upstream(&mut s, "250 2.0.0 Ok\r\n");
        }
        let out = client(&mut s, "NOOP\r\n");
        assert_eq!(
            out.client,
            "421 4.7.0 Too many commands before STARTTLS, closing connection\r\n"
        );
        assert!(out.closed);
        assert_eq!(names(&out.events), vec!["limit_exceeded"]);
        // The MX policy lets mail flow in plaintext: no budget there.
        let mut s = greeted(Policy::AuthRequiresTls);
        let out = client(&mut s, &"RSET\r\n".repeat(30));
        assert!(!out.closed);
    }

    /// A session past the greeting.
    fn greeted(policy: Policy) -> Session {
        let mut session = Session::new(config(policy), false);
        session.on_upstream_data(GREETING);
        assert_eq!(
            drain(&mut session).client,
            String::from_utf8_lossy(GREETING)
        );
        session
    }

    fn client(session: &mut Session, bytes: &str) -> Out {
        session.on_client_data(bytes.as_bytes());
        drain(session)
    }

    fn upstream(session: &mut Session, bytes: &str) -> Out {
        session.on_upstream_data(bytes.as_bytes());
        drain(session)
    }

    fn names(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(Event::name).collect()
    }

    /// A session after STARTTLS, the handshake, and a fresh EHLO.
    fn after_tls(policy: Policy) -> Session {
        let mut s = greeted(policy);
        assert_eq!(client(&mut s, "STARTTLS\r\n").upstream, "RSET\r\n");
        let go = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(go.client, "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(go.starttls, Some(vec![]));
        s.on_tls_established();
        assert_eq!(
            client(&mut s, "EHLO c.example\r\n").upstream,
            "EHLO c.example\r\n"
        );
        upstream(
            &mut s,
            "250-legacy.example.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n",
        );
        s
    }

    #[test]
    fn nothing_from_the_client_is_read_before_the_greeting() {
        let mut s = Session::new(config(Policy::RequireTls), false);
        assert_eq!(client(&mut s, "EHLO early\r\n"), Out::default());
        let out = upstream(&mut s, "220 legacy ESMTP\r\n");
        assert_eq!(out.client, "220 legacy ESMTP\r\n");
        assert_eq!(out.upstream, "EHLO early\r\n");
    }

    #[test]
    fn ehlo_before_tls_gets_the_upstream_list_with_starttls_and_without_auth() {
        let mut s = greeted(Policy::RequireTls);
        assert_eq!(
            client(&mut s, "EHLO c.example\r\n").upstream,
            "EHLO c.example\r\n"
        );
        let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
        assert_eq!(
            out.client,
            "250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn a_client_that_closes_behind_starttls_gets_no_handshake() {
        // Found by the smtp_session fuzz target: the Close queued behind StartTls.
        // STARTTLS waits behind the EHLO, and the client half-closes meanwhile.
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "EHLO c\r\nSTARTTLS\r\n");
        s.on_client_eof();
        let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
        assert_eq!(out.upstream, "RSET\r\n");
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(out.client, "");
        assert_eq!(out.starttls, None);
        assert!(out.closed);
        assert_eq!(s.summary(), "ehlo=1 starttls=0/1");
    }

    #[test]
    fn an_idle_session_gives_its_buffers_back() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "EHLO c.example\r\nNOOP\r\n");
        upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
        upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert!(s.actions.is_empty() && s.slots.is_empty());
        s.release_idle_memory();
        assert_eq!(
            (
                s.client_in.capacity(),
                s.upstream_in.capacity(),
                s.actions.capacity(),
                s.slots.capacity(),
                s.reply_lines.capacity()
            ),
            (0, 0, 0, 0, 0)
        );
        // And the session goes on.
        assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
    }

    #[test]
    fn ehlo_after_tls_gets_auth_back_without_channel_binding_and_no_starttls() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        upstream(&mut s, "250 2.0.0 Ok\r\n");
        s.on_tls_established();
        client(&mut s, "EHLO c.example\r\n");
        let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
        assert_eq!(
            out.client,
            "250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n\
250 8BITMIME\r\n"
        );
    }

    #[test]
    fn a_single_line_ehlo_reply_becomes_multi_line() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "EHLO c\r\n");
        assert_eq!(
            upstream(&mut s, "250 legacy\r\n").client,
            "250-legacy\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn a_helo_only_upstream_still_offers_starttls() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "EHLO c.example\r\n");
        let out = upstream(&mut s, "502 5.5.2 Error: command not recognized\r\n");
        assert_eq!(out.upstream, "HELO c.example\r\n");
        assert_eq!(out.client, "");
        let out = upstream(&mut s, "250 legacy.example.test\r\n");
        assert_eq!(out.client, "250-legacy.example.test\r\n250 STARTTLS\r\n");
        assert_eq!(s.summary(), "ehlo=1");
    }

    #[test]
    fn a_helo_only_upstream_answers_ehlo_with_250_after_tls_too() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        upstream(&mut s, "250 2.0.0 Ok\r\n");
        s.on_tls_established();
        let out = client(&mut s, "EHLO c.example\r\n");
        assert_eq!(out.upstream, "EHLO c.example\r\n");
        let out = upstream(&mut s, "500 5.5.1 Unknown command\r\n");
        assert_eq!(out.upstream, "HELO c.example\r\n");
        let out = upstream(&mut s, "250 legacy.example.test Hello\r\n");
        assert_eq!(out.client, "250 legacy.example.test Hello\r\n");
        // The new greeting counts: mail may flow.
        assert_eq!(
            client(&mut s, "MAIL FROM:<a@b>\r\n").upstream,
            "MAIL FROM:<a@b>\r\n"
        );
    }

    #[test]
    fn auth_before_tls_is_refused_locally_in_any_case_and_spacing() {
        for line in [
            format!("AUTH PLAIN {PLAIN_IR}\r\n"),
            format!("auth plain {PLAIN_IR}\r\n"),
            format!("  AuTh\tPlain   {PLAIN_IR}\r\n"),
            format!("AUTH PLAIN {PLAIN_IR}\n"),
            "AUTH LOGIN\r\n".to_owned(),
            "AUTH\r\n".to_owned(),
        ] {
            for policy in [Policy::RequireTls, Policy::AuthRequiresTls] {
                let mut s = greeted(policy);
                let out = client(&mut s, &line);
                assert_eq!(
                    out.client, "530 5.7.0 Must issue a STARTTLS command first\r\n",
                    "{line:?}"
                );
                assert_eq!(out.upstream, "", "{line:?}");
                assert!(names(&out.events).contains(&"plaintext_command_refused"));
            }
        }
    }

    #[test]
    fn exposed_credentials_are_logged_with_a_hashed_user_and_never_the_secret() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250 legacy\r\n");
        let out = client(&mut s, &format!("AUTH PLAIN {PLAIN_IR}\r\n"));
        let expected_hash = UserHasher::new(b"test key").hash("alice@example.test");
        assert_eq!(
            out.events,
            vec![
                Event::StarttlsStrippingSuspected {
                    reason: "auth_after_starttls_offered"
                },
                Event::CredentialsExposed {
                    mechanism: "PLAIN".into(),
                    user_hash: Some(expected_hash)
                },
                Event::PlaintextCommandRefused { verb: "AUTH" },
            ]
        );
        let debug = format!("{:?}", out.events);
        assert!(!debug.contains("alice") && !debug.contains("secret") && !debug.contains(PLAIN_IR));
    }

    #[test]
    fn require_tls_allows_only_the_upgrade_dialogue() {
        let mut s = greeted(Policy::RequireTls);
        for command in [
            "MAIL FROM:<a@b>",
            "RCPT TO:<a@b>",
            "DATA",
            "VRFY a",
            "HELP",
            "FOO",
        ] {
            let out = client(&mut s, &format!("{command}\r\n"));
            assert_eq!(
                out.client,
                "530 5.7.0 Must issue a STARTTLS command first\r\n"
            );
            assert_eq!(out.upstream, "");
        }
        for command in ["EHLO c", "HELO c", "NOOP", "RSET"] {
            let out = client(&mut s, &format!("{command}\r\n"));
            assert_eq!(out.upstream, format!("{command}\r\n"));
            upstream(&mut s, "250 ok\r\n");
        }
        assert_eq!(
            s.summary(),
            "ehlo=1 helo=1 mail=0/1 rcpt=0/1 data=0/1 rset=1 noop=1 vrfy=0/1 unknown=0/2"
        );
    }

    #[test]
    fn auth_requires_tls_lets_mail_flow_but_keeps_unknown_verbs_local() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        let out = client(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        // A client ignoring its AUTH refusal sends base64 lines: never forwarded.
        let out = client(&mut s, "dXNlcg==\r\n");
        assert_eq!(out.upstream, "");
        let out = upstream(&mut s, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
        assert_eq!(
            out.client,
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n500 5.5.2 Error: command not recognized\r\n"
        );
    }

    #[test]
    fn xclient_and_xforward_are_refused_always() {
        for mut s in [
            greeted(Policy::AuthRequiresTls),
            after_tls(Policy::RequireTls),
        ] {
            for line in ["XCLIENT ADDR=192.0.2.1\r\n", "xforward NAME=spoof\r\n"] {
                let out = client(&mut s, line);
                assert_eq!(
                    out.client,
                    "550 5.7.0 Error: insufficient authorization\r\n"
                );
                assert_eq!(out.upstream, "");
                assert_eq!(names(&out.events), vec!["forbidden_command"]);
            }
        }
    }

    #[test]
    fn starttls_is_answered_locally_after_an_rset_upstream() {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, "STARTTLS\r\n");
        assert_eq!(out.upstream, "RSET\r\n");
        assert_eq!(out.client, "");
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(out.starttls, Some(vec![]));
        assert!(out.events.is_empty());
    }

    #[test]
    fn bytes_behind_starttls_go_to_the_tls_engine_and_are_never_commands() {
        for payload in [
            "STARTTLS\r\nEHLO x\r\n",
            "STARTTLS\r\nRSET\r\n",
            &format!("STARTTLS\r\nAUTH PLAIN {PLAIN_IR}\r\nMAIL FROM:<attacker@example.org>\r\n"),
        ] {
            let mut s = greeted(Policy::AuthRequiresTls);
            let out = client(&mut s, payload);
            assert_eq!(out.upstream, "RSET\r\n", "{payload:?}");
            assert_eq!(out.client, "");
            let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
            assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
            assert_eq!(out.upstream, "");
            let injected = &payload.as_bytes()["STARTTLS\r\n".len()..];
            assert_eq!(out.starttls.as_deref(), Some(injected));
            assert_eq!(
                out.events,
                vec![Event::StarttlsInjection {
                    bytes: injected.len()
                }]
            );
        }
    }

    #[test]
    fn bytes_sent_while_the_rset_is_outstanding_are_held_for_tls_too() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        assert_eq!(client(&mut s, "EHLO x\r\n"), Out::default());
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(out.starttls.as_deref(), Some(&b"EHLO x\r\n"[..]));
    }

    #[test]
    fn a_client_hello_behind_starttls_is_no_injection() {
        let mut s = greeted(Policy::RequireTls);
        s.on_client_data(b"STARTTLS\r\n\x16\x03\x01\x00\x05hello");
        drain(&mut s);
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert!(out.events.is_empty());
        assert_eq!(
            out.starttls.as_deref(),
            Some(&b"\x16\x03\x01\x00\x05hello"[..])
        );
    }

    #[test]
    fn starttls_waits_for_outstanding_replies_before_its_rset() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        let out = client(&mut s, "MAIL FROM:<a@b>\r\nSTARTTLS\r\n");
        assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
        let out = upstream(&mut s, "250 2.1.0 Ok\r\n");
        assert_eq!(out.client, "250 2.1.0 Ok\r\n");
        assert_eq!(out.upstream, "RSET\r\n");
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
    }

    #[test]
    fn starttls_with_parameters_is_a_syntax_error_and_the_session_goes_on() {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, "STARTTLS now\r\n");
        assert_eq!(
            out.client,
            "501 5.5.4 Syntax error (no parameters allowed)\r\n"
        );
        assert_eq!(out.upstream, "");
        assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
    }

    #[test]
    fn starttls_after_helo_is_accepted() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "HELO c\r\n");
        assert_eq!(upstream(&mut s, "250 legacy\r\n").client, "250 legacy\r\n");
        client(&mut s, "STARTTLS\r\n");
        assert_eq!(
            upstream(&mut s, "250 Ok\r\n").client,
            "220 2.0.0 Ready to start TLS\r\n"
        );
    }

    #[test]
    fn a_failed_rset_refuses_tls_and_drops_queued_bytes() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\nNOOP\r\n");
        let out = upstream(&mut s, "451 4.3.0 busy\r\n");
        assert_eq!(
            out.client,
            "454 4.7.0 TLS not available due to temporary reason\r\n"
        );
        assert_eq!(out.upstream, "");
        assert_eq!(out.starttls, None);
    }

    #[test]
    fn after_tls_a_new_ehlo_is_required() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        upstream(&mut s, "250 Ok\r\n");
        s.on_tls_established();
        for command in ["MAIL FROM:<a@b>", "AUTH PLAIN", "RCPT TO:<a@b>", "DATA"] {
            let out = client(&mut s, &format!("{command}\r\n"));
            assert_eq!(out.client, "503 5.5.1 Error: send HELO/EHLO first\r\n");
            assert_eq!(out.upstream, "");
        }
        let out = client(&mut s, "STARTTLS\r\n");
        assert_eq!(out.client, "503 5.5.1 TLS already active\r\n");
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250 legacy\r\n");
        assert_eq!(
            client(&mut s, "MAIL FROM:<a@b>\r\n").upstream,
            "MAIL FROM:<a@b>\r\n"
        );
    }

    #[test]
    fn auth_after_tls_is_relayed_with_its_sasl_exchange() {
        let mut s = after_tls(Policy::RequireTls);
        let out = client(&mut s, "AUTH LOGIN\r\nMAIL FROM:<early@b>\r\n");
        assert_eq!(out.upstream, "AUTH LOGIN\r\n");
        let out = upstream(&mut s, "334 VXNlcm5hbWU6\r\n");
        assert_eq!(out.client, "334 VXNlcm5hbWU6\r\n");
        // The line queued behind AUTH is the SASL response, not a command; not being
        // base64, it cancels the exchange (RFC 4954 §4) rather than cross as a line.
        assert_eq!(out.upstream, "*\r\n");
        let out = upstream(&mut s, "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(out.upstream, "");
        assert_eq!(client(&mut s, "cHc=\r\n").upstream, "cHc=\r\n");
        assert_eq!(
            upstream(&mut s, "235 2.7.0 Authentication successful\r\n").client,
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(s.summary(), "ehlo=1 starttls=1/1 auth=1/1");
    }

    #[test]
    fn pipelined_replies_come_back_in_order_with_local_ones_in_place() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        let out = client(
            &mut s,
            "MAIL FROM:<a@b>\r\nXCLIENT ADDR=1.2.3.4\r\nRCPT TO:<c@d>\r\nAUTH PLAIN\r\nRCPT TO:<e@f>\r\n",
        );
        assert_eq!(
            out.upstream,
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n"
        );
        assert_eq!(out.client, "");
        let out = upstream(&mut s, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
        assert_eq!(
            out.client,
            "250 2.1.0 Ok\r\n550 5.7.0 Error: insufficient authorization\r\n250 2.1.5 Ok\r\n\
530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert_eq!(
            upstream(&mut s, "250 2.1.5 Ok\r\n").client,
            "250 2.1.5 Ok\r\n"
        );
    }

    #[test]
    fn without_upstream_pipelining_commands_go_one_at_a_time() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250 legacy\r\n");
        let out = client(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
        assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "RCPT TO:<c@d>\r\n");
        assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "DATA\r\n");
    }

    #[test]
    fn a_group_with_ehlo_in_the_middle_is_processed_in_order() {
        let mut s = greeted(Policy::AuthRequiresTls);
        let out = client(&mut s, "RSET\r\nEHLO c\r\nNOOP\r\n");
        assert_eq!(out.upstream, "RSET\r\n");
        assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "EHLO c\r\n");
        let out = upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        assert_eq!(out.upstream, "NOOP\r\n");
        assert_eq!(
            out.client,
            "250-legacy\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        );
    }

    #[test]
    fn the_body_waits_for_354_and_ends_only_at_crlf_dot_crlf() {
        let mut s = after_tls(Policy::RequireTls);
        client(&mut s, "MAIL FROM:<a@b>\r\n");
        upstream(&mut s, "250 Ok\r\n");
        client(&mut s, "RCPT TO:<c@d>\r\n");
        upstream(&mut s, "250 Ok\r\n");
        let out = client(&mut s, "DATA\r\nSubject: x\r\n");
        assert_eq!(out.upstream, "DATA\r\n");
        let out = upstream(&mut s, "354 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(out.client, "354 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(out.upstream, "Subject: x\r\n");
        let out = client(
            &mut s,
            "\r\nSTARTTLS\r\nAUTH x\r\nbare\nMAIL FROM:<evil>\n.\n",
        );
        assert_eq!(
            out.upstream,
            "\r\nSTARTTLS\r\nAUTH x\r\nbare\r\nMAIL FROM:<evil>\r\n..\r\n"
        );
        // With PIPELINING, QUIT may follow the end of data in the same write.
        let out = client(&mut s, "end\r\n.\r\nQUIT\r\n");
        assert_eq!(out.upstream, "end\r\n.\r\nQUIT\r\n");
        assert_eq!(out.events, vec![Event::BareNewlineNormalized { count: 3 }]);
        let out = upstream(&mut s, "250 2.0.0 Ok: queued\r\n");
        assert_eq!(out.client, "250 2.0.0 Ok: queued\r\n");
        let out = upstream(&mut s, "221 2.0.0 Bye\r\n");
        assert_eq!(out.client, "221 2.0.0 Bye\r\n");
        assert!(out.closed);
        assert_eq!(
            s.summary(),
            "ehlo=1 starttls=1/1 mail=1 rcpt=1 data=1 quit=1"
        );
    }

    #[test]
    fn a_refused_data_leaves_the_following_lines_as_commands() {
        let mut s = after_tls(Policy::RequireTls);
        client(&mut s, "DATA\r\nNOOP\r\n");
        let out = upstream(&mut s, "554 5.5.1 Error: no valid recipients\r\n");
        assert_eq!(out.upstream, "NOOP\r\n");
    }

    #[test]
    fn bare_newlines_reject_mode_drops_the_transaction() {
        let mut s = after_tls(Policy::RequireTls);
        s.config.bare_newlines = BareNewlines::Reject;
        client(&mut s, "DATA\r\n");
        upstream(&mut s, "354 go\r\n");
        let out = client(&mut s, "a\nb\r\n.\r\n");
        assert_eq!(out.upstream, "");
        assert_eq!(out.client, "521 5.5.2 Error: bare CR or LF received\r\n");
        assert!(out.closed);
    }

    #[test]
    fn bdat_is_never_forwarded_and_its_chunk_is_never_commands() {
        for line in ["BDAT 13", "BDAT\t13 LAST", "  bdat 13   last"] {
            let mut s = after_tls(Policy::RequireTls);
            let out = client(
                &mut s,
                &format!("{line}\r\nab\r\n.\r\nQUIT\r\nBDAT 0 LAST\r\n"),
            );
            assert_eq!(out.upstream, "", "{line:?}");
            assert_eq!(
                out.client,
                "502 5.5.1 Error: command not implemented\r\n".repeat(2)
            );
            assert_eq!(names(&out.events), vec!["forbidden_command"; 2]);
        }
    }

    /// Exim 4.96 answers RSET inside a chunked transaction with 250 and reads on, dot-
    /// terminated: a `.` line in the next chunk ended the message there and the rest ran
    /// as commands, AUTH before TLS included. The upstream now hears no chunk at all.
    #[test]
    fn the_exim_rset_inside_bdat_exploit_reaches_the_upstream_as_canonical_lines_only() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO attacker.example\r\n");
        upstream(
            &mut s,
            "250-exim.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n",
        );
        let hidden = "x\r\n.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\nMAIL FROM:<a@b>\r\n\
RCPT TO:<v@exim.example>\r\nDATA\r\nhidden\r\n.\r\n";
        let dialogue = format!(
            "MAIL FROM:<a@attacker.example>\r\nRCPT TO:<v@exim.example>\r\nBDAT 5\r\nhello\r\n\
RSET\r\nBDAT {}\r\n{hidden}QUIT\r\n",
            hidden.len()
        );
        let mut to_upstream = client(&mut s, &dialogue).upstream;
        to_upstream += &upstream(&mut s, "250 OK\r\n250 Accepted\r\n").upstream;
        to_upstream += &upstream(&mut s, "250 Reset OK\r\n").upstream;
        to_upstream += &upstream(&mut s, "221 bye\r\n").upstream;
        assert_eq!(
            to_upstream,
            "MAIL FROM:<a@attacker.example>\r\nRCPT TO:<v@exim.example>\r\nRSET\r\nQUIT\r\n"
        );
    }

    #[test]
    fn before_tls_commands_reach_the_upstream_in_the_proxys_own_words() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "ehlo c.example\r\n");
        upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        let out = client(
            &mut s,
            "mail from: <a@b.example> size=10\r\nrcpt to:c@d.example\r\nnoop AUTH PLAIN x\r\n\
vrfy  bob\r\n",
        );
        assert_eq!(
            out.upstream,
            "MAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<c@d.example>\r\nNOOP\r\nVRFY bob\r\n"
        );
        // What cannot be read whole is answered here, and never forwarded.
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, "EHLO two words\r\nRSET now\r\nEHLO a{5+}\r\n");
        assert_eq!(out.upstream, "");
        assert_eq!(
            out.client,
            "501 5.5.4 Syntax: EHLO/HELO hostname\r\n\
501 5.5.4 Syntax error (no parameters allowed)\r\n\
501 5.5.4 Syntax: EHLO/HELO hostname\r\n"
        );
        assert_eq!(names(&out.events), vec!["plaintext_command_refused"; 3]);
        // After TLS the client's line goes as it came (from column 0).
        let mut s = after_tls(Policy::RequireTls);
        assert_eq!(
            client(&mut s, "mail from: <a@b.example> size=10\r\n").upstream,
            "mail from: <a@b.example> size=10\r\n"
        );
    }

    #[test]
    fn a_nul_dot_line_is_content_for_an_upstream_that_drops_nul() {
        let mut s = greeted(Policy::AuthRequiresTls);
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250 legacy\r\n");
        client(&mut s, "DATA\r\n");
        upstream(&mut s, "354 go\r\n");
        let out = client(
            &mut s,
            "hi\r\n\0.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n.\0\r\nQUIT\r\n.\r\n",
        );
        assert_eq!(
            out.upstream,
            "hi\r\n.\0.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n\0\r\nQUIT\r\n.\r\n"
        );
        assert_eq!(out.events, vec![Event::SmugglingNeutralized { count: 2 }]);
    }

    #[test]
    fn a_session_that_only_draws_errors_is_closed() {
        let mut s = greeted(Policy::AuthRequiresTls);
        let out = client(&mut s, &"XYZZY\r\n".repeat(20));
        assert_eq!(out.client.matches("500 5.5.2").count(), 20);
        assert!(!out.closed);
        let out = client(&mut s, "XYZZY\r\nNOOP\r\n");
        assert_eq!(
            out.client,
            "500 5.5.2 Error: command not recognized\r\n\
421 4.7.0 Too many errors, closing connection\r\n"
        );
        assert_eq!(out.upstream, "");
        assert!(out.closed);
        assert!(
            out.events
                .contains(&Event::LimitExceeded { limit: "errors" })
        );
    }

    #[test]
    fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
        use crate::proto::MAX_UNWRITTEN_REPLY_BYTES;
        let mut s = greeted(Policy::AuthRequiresTls);
        s.config.max_errors = u32::MAX;
        // The driver wrote the greeting.
        assert!(!s.on_output_written());
        let flood = "\n".repeat(64 * 1024);
        let out = client(&mut s, &flood);
        let reply_len = "500 5.5.2 Error: bad syntax\r\n".len();
        let replies = out.client.len() / reply_len;
        // Each reply costs its bytes and its action's slot in the queue.
        let batch = MAX_UNWRITTEN_REPLY_BYTES.div_ceil(reply_len + crate::proto::ACTION_COST);
        assert_eq!(out.client.len(), batch * reply_len);
        assert_eq!(s.client_in.len(), flood.len() - replies);
        // The driver wrote it all: the next batch, no larger.
        assert!(s.on_output_written());
        let out = drain(&mut s);
        assert_eq!(out.client.len(), replies * reply_len);
        // Nothing is lost: every line gets its reply once the client reads.
        let mut total = 2 * replies;
        while s.on_output_written() {
            total += drain(&mut s).client.len() / reply_len;
        }
        assert_eq!(total, flood.len());
        assert!(s.client_in.is_empty());
    }

    #[test]
    fn a_chunk_size_beyond_32_bits_closes_the_connection() {
        let mut s = after_tls(Policy::RequireTls);
        let out = client(&mut s, "BDAT 4294967306 LAST\r\n0123456789AUTH PLAIN x\r\n");
        assert_eq!(
            out.client,
            "552 5.3.4 Error: chunk too large, closing connection\r\n"
        );
        assert_eq!(out.upstream, "");
        assert!(out.closed);
    }

    #[test]
    fn a_bdat_refused_for_want_of_ehlo_after_tls_skips_its_chunk() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        upstream(&mut s, "250 Ok\r\n");
        s.on_tls_established();
        let out = client(
            &mut s,
            "BDAT 30 LAST\r\nMAIL FROM:<ceo@bank.example>\r\nNOOP\r\n",
        );
        assert_eq!(out.client, "503 5.5.1 Error: send HELO/EHLO first\r\n");
        assert_eq!(out.upstream, "NOOP\r\n");
    }

    #[test]
    fn commands_reach_the_upstream_at_column_zero() {
        let mut s = greeted(Policy::AuthRequiresTls);
        assert_eq!(client(&mut s, " \tNOOP\r\n").upstream, "NOOP\r\n");
    }

    #[test]
    fn upstream_bytes_after_the_rset_reply_never_cross_into_tls() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n250 smuggled\r\n");
        assert_eq!(
            out.client,
            "421 4.3.0 Upstream protocol error, closing connection\r\n"
        );
        assert_eq!(out.starttls, None);
        assert!(out.closed);
        // And bytes arriving during the handshake are refused once it completes.
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "STARTTLS\r\n");
        upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(upstream(&mut s, "250 late\r\n"), Out::default());
        s.on_tls_established();
        let out = drain(&mut s);
        assert!(out.closed);
        assert!(!out.client.contains("250 late"));
    }

    #[test]
    fn replies_owed_to_the_client_are_bounded() {
        let mut s = greeted(Policy::AuthRequiresTls);
        s.config.max_errors = 1000;
        client(&mut s, "EHLO c\r\n");
        upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        let out = client(
            &mut s,
            &format!("MAIL FROM:<a@b>\r\n{}", "X\r\n".repeat(200)),
        );
        assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
        assert!(s.slots.len() <= MAX_QUEUED_REPLIES);
        let mut replies = upstream(&mut s, "250 2.1.0 Ok\r\n").client;
        assert!(replies.starts_with("250 2.1.0 Ok\r\n500 5.5.2"));
        // As the driver does once it has written them (the reply bound, `ReplyBudget`).
        while s.on_output_written() {
            replies += &drain(&mut s).client;
        }
        assert_eq!(
            replies
                .matches("500 5.5.2 Error: command not recognized")
                .count(),
            200
        );
    }

    #[test]
    fn refused_bdat_chunks_are_swallowed_not_read_as_commands() {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, "BDAT 8\r\nNOOP\r\n\r\nRSET\r\n");
        assert_eq!(
            out.client,
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert_eq!(out.upstream, "RSET\r\n");
    }

    #[test]
    fn an_over_long_line_gets_an_error_and_closes() {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, &"A".repeat(600));
        assert_eq!(out.client, "500 5.5.2 Error: line too long\r\n");
        assert!(out.closed);
        assert_eq!(out.upstream, "");
        assert_eq!(names(&out.events), vec!["limit_exceeded"]);
    }

    #[test]
    fn mangled_starttls_is_suspected_stripping() {
        for verb in ["XXXXXXXX", "STARTTLX", "xxxxxxxx", "STARXTLS"] {
            let mut s = greeted(Policy::RequireTls);
            let out = client(&mut s, &format!("{verb}\r\n"));
            assert_eq!(
                names(&out.events),
                vec!["starttls_stripping_suspected", "plaintext_command_refused"]
            );
        }
    }

    #[test]
    fn control_characters_in_commands_are_refused_locally() {
        let mut s = greeted(Policy::AuthRequiresTls);
        let out = client(&mut s, "NOOP\rAUTH PLAIN x\r\n");
        assert_eq!(out.client, "500 5.5.2 Error: bad syntax\r\n");
        assert_eq!(out.upstream, "");
    }

    #[test]
    fn the_upstream_going_away_gets_the_client_a_421() {
        let mut s = Session::new(config(Policy::RequireTls), false);
        s.on_upstream_eof();
        let out = drain(&mut s);
        assert_eq!(
            out.client,
            "421 4.3.0 Service temporarily unavailable, closing connection\r\n"
        );
        assert!(out.closed);
        let mut s = greeted(Policy::RequireTls);
        let out = upstream(&mut s, "garbage\r\n");
        assert_eq!(
            out.client,
            "421 4.3.0 Upstream protocol error, closing connection\r\n"
        );
        assert!(out.closed);
    }

    #[test]
    fn upstream_lines_ending_in_bare_lf_are_relayed_unchanged() {
        let mut s = greeted(Policy::RequireTls);
        client(&mut s, "NOOP\r\n");
        assert_eq!(upstream(&mut s, "250 2.0.0 Ok\n").client, "250 2.0.0 Ok\n");
    }

    #[test]
    fn implicit_tls_sessions_start_with_tls_active() {
        let mut s = Session::new(config(Policy::RequireTls), false);
        s.on_tls_established();
        // Still nothing is read before the upstream's greeting.
        assert_eq!(client(&mut s, "EHLO early\r\n").upstream, "");
        assert_eq!(
            upstream(&mut s, "220 legacy\r\n").upstream,
            "EHLO early\r\n"
        );
        upstream(&mut s, "250 legacy\r\n");
        client(&mut s, "EHLO c\r\n");
        let out = upstream(&mut s, "250-legacy\r\n250 AUTH PLAIN\r\n");
        assert_eq!(out.client, "250-legacy\r\n250 AUTH PLAIN\r\n");
    }

    #[test]
    fn a_half_closed_client_still_gets_the_replies_it_is_owed() {
        let mut s = after_tls(Policy::RequireTls);
        s.on_client_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        s.on_client_eof();
        let out = drain(&mut s);
        assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        assert!(!out.closed);
        assert!(!s.wants_client_data());
        let out = upstream(&mut s, "250 Ok\r\n250 Ok\r\n");
        assert!(!out.closed);
        // DATA's 354 starts a body that can never arrive: the upstream is dropped.
        let out = upstream(&mut s, "354 go\r\n");
        assert!(out.closed);
    }

    #[test]
    fn a_client_gone_mid_body_closes_at_once() {
        let mut s = after_tls(Policy::RequireTls);
        client(&mut s, "DATA\r\n");
        upstream(&mut s, "354 go\r\n");
        client(&mut s, "Subject: half\r\n");
        s.on_client_eof();
        let out = drain(&mut s);
        assert!(out.closed);
        assert_eq!(out.upstream, "");
    }

    /// Runs a whole dialogue with the client's bytes cut at `cuts`. A legacy upstream
    /// without PIPELINING answers each line the proxy forwards, as soon as it is whole.
    fn run_chunked(client_stream: &[u8], cuts: &[usize]) -> Out {
        let mut s = greeted(Policy::AuthRequiresTls);
        let mut total = Out::default();
        let mut forwarded = String::new();
        let mut answered = 0;
        let mut in_body = false;
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&client_stream.len())) {
            s.on_client_data(&client_stream[start..cut]);
            start = cut;
            loop {
                let out = drain(&mut s);
                forwarded.push_str(&out.upstream);
                total.client.push_str(&out.client);
                total.upstream.push_str(&out.upstream);
                total.events.extend(out.events);
                total.starttls = total.starttls.take().or(out.starttls);
                total.closed |= out.closed;
                let Some(end) = forwarded[answered..].find("\r\n") else {
                    break;
                };
                let line = forwarded[answered..answered + end].to_owned();
                answered += end + 2;
                let reply = if in_body {
                    if line != "." {
                        continue;
                    }
                    in_body = false;
                    "250 2.0.0 Ok: queued\r\n"
                } else if line.starts_with("EHLO") {
                    "250-legacy\r\n250 SIZE 1000\r\n"
                } else if line == "DATA" {
                    in_body = true;
                    "354 go ahead\r\n"
                } else {
                    "250 2.0.0 Ok\r\n"
                };
                s.on_upstream_data(reply.as_bytes());
            }
        }
        total
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_gives_the_same_bytes_and_events(
            cuts in proptest::collection::vec(0usize..170, 0..10),
        ) {
            let stream: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\
    Subject: x\r\n\r\nline\nbare\r\n.\nMAIL FROM:<evil@x>\r\n.\r\nAUTH PLAIN eHl6\r\nXCLIENT ADDR=1.2.3.4\r\n\
    NOOP\r\nSTARTTLS\r\n";
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            let expected = run_chunked(stream, &[]);
            proptest::prop_assert!(expected.upstream.ends_with("NOOP\r\nRSET\r\n"));
            proptest::prop_assert!(expected.upstream.contains("\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n"));
            proptest::prop_assert_eq!(
                names(&expected.events),
                vec![
                    "bare_newline_normalized",
                    "starttls_stripping_suspected",
                    "credentials_exposed",
                    "plaintext_command_refused",
                    "forbidden_command",
                ]
            );
            proptest::prop_assert_eq!(run_chunked(stream, &cuts), expected);
        }
    }

    #[test]
    fn a_silent_client_gets_a_timeout_goodbye() {
        let mut s = greeted(Policy::RequireTls);
        s.on_timeout();
        let out = drain(&mut s);
        assert_eq!(
            out.client,
            "421 4.4.2 Timeout exceeded, closing connection\r\n"
        );
        assert!(out.closed);
    }

    fn xclient_session() -> Session {
        Session::new(config(Policy::RequireTls), false).with_xclient(xclient::Identity {
            client: "203.0.113.7:51234".parse().unwrap(),
            destination: "192.0.2.1:587".parse().unwrap(),
        })
    }

    /// An XCLIENT session whose upstream has greeted: the proxy's own EHLO is out.
    fn greeted_xclient_session() -> Session {
        let mut s = xclient_session();
        s.on_upstream_data(GREETING);
        drain(&mut s);
        s
    }

    #[test]
    fn xclient_is_sent_alone_after_the_proxys_own_ehlo_and_the_new_greeting_is_relayed() {
        let mut s = xclient_session();
        // Client bytes sent early wait: nothing is read before the greeting.
        assert_eq!(client(&mut s, "EHLO client.example\r\n"), Out::default());
        let out = upstream(&mut s, "220 legacy ESMTP\r\n");
        assert_eq!(out.client, "", "the greeting waits for XCLIENT");
        assert_eq!(out.upstream, "EHLO localhost\r\n");
        let out = upstream(
            &mut s,
            "250-legacy\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 8BITMIME\r\n",
        );
        assert_eq!(
            out.upstream,
            "XCLIENT ADDR=203.0.113.7 PORT=51234 NAME=[UNAVAILABLE]\r\n"
        );
        assert_eq!(out.client, "");
        // The new session's greeting is the client's; then its own EHLO goes through.
        let out = upstream(&mut s, "220 legacy ESMTP again\r\n");
        assert_eq!(out.client, "220 legacy ESMTP again\r\n");
        assert_eq!(out.upstream, "EHLO client.example\r\n");
        s.on_upstream_data(EHLO_REPLY);
        let out = drain(&mut s);
        assert!(out.client.ends_with("250 STARTTLS\r\n"), "{}", out.client);
        assert!(!out.client.contains("XCLIENT"));
        assert_eq!(s.summary(), "ehlo=1");
    }

    const IDENTITY_UNAVAILABLE: &str =
        "421 4.3.0 Service temporarily unavailable, closing connection\r\n";

    #[test]
    fn without_xclient_in_the_ehlo_reply_the_session_is_refused_not_run_as_the_proxy() {
        let mut s = greeted_xclient_session();
        let out = upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
        assert_eq!(names(&out.events), ["xclient_unavailable"]);
        assert_eq!(out.client, IDENTITY_UNAVAILABLE);
        assert_eq!((out.upstream.as_str(), out.closed), ("", true));
        // A HELO-only upstream refuses the proxy's EHLO: the same.
        let mut s = greeted_xclient_session();
        let out = upstream(&mut s, "502 5.5.2 Error: command not recognized\r\n");
        assert_eq!(
            out.events,
            [Event::XclientUnavailable {
                reason: "not_announced"
            }]
        );
        assert_eq!(
            (out.client.as_str(), out.closed),
            (IDENTITY_UNAVAILABLE, true)
        );
        // An upstream that turns sessions away answers the proxy's EHLO with 421: the
        // client gets that 421, not the stale first greeting.
        let mut s = greeted_xclient_session();
        let out = upstream(&mut s, "421 4.7.0 Too many connections\r\n");
        assert!(out.events.is_empty());
        assert_eq!(
            (out.client.as_str(), out.closed),
            ("421 4.7.0 Too many connections\r\n", true)
        );
    }

    #[test]
    fn a_refused_xclient_refuses_the_session_and_a_421_ends_it() {
        let mut s = greeted_xclient_session();
        upstream(&mut s, "250-legacy\r\n250 XCLIENT ADDR\r\n");
        let out = upstream(&mut s, "550 5.7.0 Error: insufficient authorization\r\n");
        assert_eq!(
            out.events,
            [Event::XclientUnavailable { reason: "refused" }]
        );
        assert_eq!(
            (out.client.as_str(), out.closed),
            (IDENTITY_UNAVAILABLE, true)
        );

        let mut s = greeted_xclient_session();
        upstream(&mut s, "250-legacy\r\n250 XCLIENT ADDR\r\n");
        let out = upstream(&mut s, "421 4.7.0 go away\r\n");
        assert_eq!(out.client, "421 4.7.0 go away\r\n");
        assert!(out.events.is_empty());
    }

    #[test]
    fn an_upstream_banner_refusal_is_relayed_without_xclient() {
        let mut s = xclient_session();
        let out = upstream(&mut s, "554 5.3.2 not now\r\n");
        assert_eq!(out.client, "554 5.3.2 not now\r\n");
        assert_eq!(out.upstream, "");
    }
}
