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
mod tests;
