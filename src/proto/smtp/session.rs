//! The SMTP session: policy before TLS, STARTTLS owned by the proxy, EHLO rewritten,
//! replies kept in order, bodies framed so that proxy and upstream agree where a message
//! ends (ARCHITECTURE.md §2-§5, §9).
//!
//! Ordering: every client command gets exactly one reply, in order. Commands answered by
//! the proxy queue a ready reply behind those still owed by the upstream. A command
//! whose reply changes how the following bytes must be read (EHLO, DATA, AUTH, QUIT,
//! STARTTLS's RSET), and every command when the upstream did not offer PIPELINING, is a
//! barrier: nothing after it is read until its reply arrives (ARCHITECTURE.md §10).
//!
//! XCLIENT (listener option `xclient`): after the upstream's greeting, before the client
//! reads anything, the proxy sends its own EHLO, then (if the reply announces XCLIENT)
//! one XCLIENT with the client's identity, each after the previous reply (ARCHITECTURE.md §10).
//! The upstream answers XCLIENT with a new greeting, which is the one the client sees;
//! the client's own EHLO then starts its dialogue as usual. Postfix keeps the XCLIENT
//! attributes for the whole connection, so the proxy's RSET at STARTTLS does not undo
//! them (XCLIENT_README: they last until the end of the session or the next XCLIENT).
//! An upstream that does not announce XCLIENT, or refuses it, gets no session: the
//! client is answered 421 rather than reaching it as the proxy's trusted address.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

use super::body::{Body, Forward, Progress};
use super::canonical;
use super::ehlo;
use super::parse::{self, Verb};
use super::xclient;
use crate::policy::{BareNewlines, Policy, UserHasher};
use crate::proto::conn::release_queue_if_empty;
use crate::proto::line::Line;
use crate::proto::{Conn, Event, Goodbye, Goodbyes, Limits, Phase, Session as _, Stage, Tally};

/// Replies the proxy gives itself (ARCHITECTURE.md §3, §4, §9).
mod reply {
    pub const MUST_STARTTLS: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
    pub const READY_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
    pub const TLS_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
    pub const NO_PARAMS: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
    pub const HELO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
    pub const TLS_UNAVAILABLE: &[u8] = b"454 4.7.0 TLS not available due to temporary reason\r\n";
    pub const BAD_SYNTAX: &[u8] = b"500 5.5.2 Error: bad syntax\r\n";
    pub const UNRECOGNIZED: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
    pub const NOT_AUTHORIZED: &[u8] = b"550 5.7.0 Error: insufficient authorization\r\n";
    pub const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n";
    pub const BDAT_UNAVAILABLE: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
    pub const CHUNK_TOO_LARGE: &[u8] = b"552 5.3.4 Error: chunk too large, closing connection\r\n";
    pub const BARE_NEWLINE: &[u8] = b"521 5.5.2 Error: bare CR or LF received\r\n";
    pub const CONTROL_LINE: &[u8] =
        b"554 5.6.0 Error: message line of control characters only, closing connection\r\n";
    /// `xclient: true` and the upstream cannot take it (ARCHITECTURE.md §7).
    pub const IDENTITY_UNAVAILABLE: &[u8] =
        b"421 4.3.0 Service temporarily unavailable, closing connection\r\n";
}

/// The replies that end a session, one for each `proto::Goodbye`.
const GOODBYES: Goodbyes = Goodbyes {
    line_too_long: b"500 5.5.2 Error: line too long\r\n",
    too_many_plaintext: b"421 4.7.0 Too many commands before STARTTLS, closing connection\r\n",
    too_many_errors: b"421 4.7.0 Too many errors, closing connection\r\n",
    upstream_unavailable: b"421 4.3.0 Service temporarily unavailable, closing connection\r\n",
    upstream_broken: b"421 4.3.0 Upstream protocol error, closing connection\r\n",
    idle_timeout: b"421 4.4.2 Timeout exceeded, closing connection\r\n",
    // RFC 5321 §3.8: a server shutting down answers 421 and closes.
    shutting_down: b"421 4.3.2 Service shutting down, closing connection\r\n",
};

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
    /// The bounds every protocol shares.
    pub limits: Limits,
    /// Hashes user names for `credentials_exposed`.
    pub user_hasher: UserHasher,
}

/// What the reading of client bytes is doing (the handshake, the close: [`Stage`]).
#[derive(Debug)]
enum Mode {
    /// Waiting for the upstream's greeting; nothing from the client is read
    /// (ARCHITECTURE.md §10).
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
    /// A fatal error reply is queued behind replies still owed; nothing more is read
    /// from the client.
    Closing,
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
    /// The upstream refused EHLO; HELO was sent in its place (ARCHITECTURE.md §2).
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
    /// Nothing after this command may be read before its reply (ARCHITECTURE.md §10).
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
    conn: Conn,
    policy: Policy,
    bare_newlines: BareNewlines,
    mode: Mode,
    /// Lines of the upstream reply being collected.
    reply_lines: Vec<Line>,
    slots: VecDeque<Slot>,
    /// From the upstream's last EHLO reply.
    upstream_pipelining: bool,
    /// A successful EHLO or HELO since TLS started (RFC 3207 §4.2).
    greeted_since_tls: bool,
    /// The client closed its sending side; the session ends once the replies still
    /// owed have been sent.
    client_done: bool,
    /// The client to announce with XCLIENT after the greeting (listener option).
    xclient: Option<xclient::Identity>,
}

impl Session {
    /// A session for a new connection; `tls_active` is true on implicit-TLS listeners.
    pub fn new(config: Config, tls_active: bool) -> Self {
        let tally = Tally::new(TALLY_ORDER, &["starttls", "auth"]);
        let mut conn = Conn::new(
            config.limits,
            config.user_hasher,
            MAX_UPSTREAM_LINE_LEN,
            tally,
        );
        conn.tls_active = tls_active;
        Session {
            conn,
            policy: config.policy,
            bare_newlines: config.bare_newlines,
            mode: Mode::Greeting,
            reply_lines: Vec::new(),
            slots: VecDeque::from([Slot::Upstream {
                verb: Verb::Other,
                awaiting: Awaiting::Greeting,
            }]),
            upstream_pipelining: false,
            greeted_since_tls: false,
            client_done: false,
            xclient: None,
        }
    }

    /// Announces `identity` to the upstream with XCLIENT before the client's dialogue
    /// (see the module documentation).
    pub fn with_xclient(mut self, identity: xclient::Identity) -> Self {
        self.xclient = Some(identity);
        self
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
            self.conn.tally.record(tally_name(verb), positive);
            if close {
                return self.conn.close_with(reply);
            }
            self.conn.send_client(reply);
            if !positive {
                self.count_error();
                if !self.conn.is_open() {
                    return;
                }
            }
        }
    }

    /// Queues a reply of the proxy's own, in order behind outstanding upstream replies.
    fn reply_local(&mut self, verb: Verb, reply: &'static [u8]) {
        self.queue_local(verb, reply, false);
    }

    /// Queues the proxy's reply; with `close`, the session ends once it is sent and
    /// nothing more is read meanwhile.
    fn queue_local(&mut self, verb: Verb, reply: &'static [u8], close: bool) {
        self.slots.push_back(Slot::Local { verb, reply, close });
        if close && self.conn.is_open() {
            self.mode = Mode::Closing;
        }
        self.flush_local_replies();
    }

    /// Sends a command line the proxy wrote (or a client line after TLS) and waits for
    /// its reply.
    fn forward(&mut self, verb: Verb, line: &[u8], awaiting: Awaiting) {
        // The verb at column 0 and CRLF at the end, whatever the client sent: Exim, for
        // one, reads a command only at column 0, and the two must classify it alike.
        self.conn.send_upstream_line(&[line.trim_ascii_start()]);
        self.slots.push_back(Slot::Upstream { verb, awaiting });
    }

    // ---- client side ----

    /// Client bytes inside a DATA body: framed, neutralised and forwarded (§5).
    fn process_body(&mut self) {
        let Mode::Data(body) = &mut self.mode else {
            return;
        };
        // Long unchanged runs leave as slices of what the client sent (ARCHITECTURE.md
        // §5): the body is copied only where the scanner rewrites it.
        let input = self.conn.client_in.split().freeze();
        let mut out = Forward::new(input.clone());
        let progress = body.feed(&input, &mut out);
        let bare = body.bare_newlines();
        let neutralized = body.neutralized();
        if bare > 0 && self.bare_newlines == BareNewlines::Reject {
            // Nothing more reaches the upstream, which never sees an end-of-data: the
            // partial message is discarded there.
            self.conn
                .event(Event::BareNewlineNormalized { count: bare });
            return self.conn.close_with(reply::BARE_NEWLINE);
        }
        if progress == Progress::Refused {
            // The upstream never sees an end-of-data: the partial message is discarded.
            self.conn.event(Event::LimitExceeded {
                limit: "control_line",
            });
            return self.conn.close_with(reply::CONTROL_LINE);
        }
        for part in out.into_parts() {
            self.conn.send_upstream(part);
        }
        if let Progress::End { consumed } = progress {
            // What follows the end of data is commands.
            self.conn.client_in.extend_from_slice(&input[consumed..]);
            if bare > 0 {
                self.conn
                    .event(Event::BareNewlineNormalized { count: bare });
            }
            if neutralized > 0 {
                self.conn
                    .event(Event::SmugglingNeutralized { count: neutralized });
            }
            self.mode = Mode::Command;
            self.slots.push_back(Slot::Upstream {
                verb: Verb::Data,
                awaiting: Awaiting::EndOfData,
            });
        }
    }

    fn on_command(&mut self, line: Line) {
        if self.policy == Policy::RequireTls && self.plaintext_budget_spent() {
            return;
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
            self.conn
                .event(Event::ForbiddenCommand { verb: verb.label() });
            return self.refuse(&command, reply::NOT_AUTHORIZED);
        }

        if !self.conn.tls_active {
            if let Some(refusal) = self.plaintext_refusal(&command) {
                self.conn
                    .event(Event::PlaintextCommandRefused { verb: verb.label() });
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
        if self.conn.tls_active {
            return self.forward(verb, &line.text, awaiting);
        }
        // ARCHITECTURE.md §3, canonical forwarding: before TLS the upstream reads only
        // lines the proxy wrote from its own parse; what it cannot read whole stays here.
        match canonical::line(&command) {
            Ok(written) => {
                self.conn.send_upstream(written);
                self.slots.push_back(Slot::Upstream { verb, awaiting });
            }
            Err(canonical::Refusal(reply)) => {
                self.conn
                    .event(Event::PlaintextCommandRefused { verb: verb.label() });
                self.reply_local(verb, reply)
            }
        }
    }

    /// Answers a command locally. A refused BDAT's chunk follows it all the same: its
    /// octets are read and dropped, never taken for commands.
    fn refuse(&mut self, command: &parse::Command<'_>, reply: &'static [u8]) {
        if command.verb == Verb::Bdat
            && let Ok((size, _)) = parse::bdat_args(command.args)
            && size > 0
        {
            self.mode = Mode::SkipChunk { remaining: size };
        }
        self.reply_local(command.verb, reply);
    }

    /// Why a command may not be forwarded before TLS, if it may not (§3).
    fn plaintext_refusal(&mut self, command: &parse::Command<'_>) -> Option<&'static [u8]> {
        let verb = command.verb;
        if verb == Verb::Auth {
            self.note_plaintext_credentials(command.args);
            return Some(reply::MUST_STARTTLS);
        }
        if verb == Verb::Other {
            self.conn
                .note_mangled_upgrade(command.verb_text, b"STARTTLS");
        }
        let allowed = match self.policy {
            Policy::RequireTls => matches!(
                verb,
                Verb::Ehlo | Verb::Helo | Verb::Noop | Verb::Rset | Verb::Quit
            ),
            Policy::AuthRequiresTls => verb != Verb::Other,
        };
        match (allowed, self.policy) {
            (true, _) => None,
            (false, Policy::RequireTls) => Some(reply::MUST_STARTTLS),
            // On an MX, unknown verbs stay local: a client that ignores the refusal of its
            // AUTH would otherwise send its base64 credentials upstream as commands.
            (false, Policy::AuthRequiresTls) => Some(reply::UNRECOGNIZED),
        }
    }

    /// An AUTH before TLS: if it carries an initial response, a secret crossed the wire.
    fn note_plaintext_credentials(&mut self, args: &[u8]) {
        self.conn.note_login_before_tls();
        if let Ok((mechanism, Some(initial_response))) = parse::auth_args(args) {
            self.conn.sasl_exposed("", mechanism, initial_response);
        }
    }

    fn on_starttls(&mut self, no_parameters: bool) {
        if self.conn.tls_active {
            return self.reply_local(Verb::StartTls, reply::TLS_ACTIVE);
        }
        if !no_parameters {
            // RFC 3207 §4: STARTTLS takes no parameters; the session stays usable.
            return self.reply_local(Verb::StartTls, reply::NO_PARAMS);
        }
        self.mode = Mode::TlsPending { rset_sent: false };
    }

    /// BDAT is never forwarded and CHUNKING never offered (ARCHITECTURE.md §5): its
    /// framing is a byte count the upstream's chunk state decides how to read (Exim
    /// answers RSET inside a chunked transaction with 250 and reads on, dot-terminated),
    /// where DATA's end is one the proxy writes itself. The chunk that follows is read
    /// and dropped, never taken for commands.
    fn on_bdat(&mut self, command: &parse::Command<'_>) {
        let Ok((size, _)) = parse::bdat_args(command.args) else {
            // Without a size nobody can know where the chunk ends: its bytes are read
            // as commands by the proxy, and the upstream hears none of them.
            return self.reply_local(Verb::Bdat, reply::BDAT_SYNTAX);
        };
        if size > MAX_CHUNK_LEN {
            // Skipping gigabytes is no service: say so and close.
            self.conn.event(Event::LimitExceeded {
                limit: "chunk_size",
            });
            return self.queue_local(Verb::Bdat, reply::CHUNK_TOO_LARGE, true);
        }
        self.conn.event(Event::ForbiddenCommand { verb: "BDAT" });
        self.refuse(command, reply::BDAT_UNAVAILABLE);
    }

    // ---- upstream side ----

    fn on_reply(&mut self, code: u16, lines: Vec<Line>) {
        let Some(Slot::Upstream { verb, awaiting }) = self.slots.pop_front() else {
            // Unsolicited (a 421 before the upstream hangs up): relay as is.
            return self.relay(&lines);
        };
        let positive = code < 400;
        match awaiting {
            Awaiting::Greeting => {
                if code == 220 && self.xclient.is_some() {
                    // Our own command, sent alone after the banner (ARCHITECTURE.md §10).
                    self.conn.send_upstream_line(&[b"EHLO localhost"]);
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
                    // A HELO-only upstream: EHLO still gets a 250 (ARCHITECTURE.md §2),
                    // before TLS with STARTTLS in it, after TLS as the new greeting.
                    self.conn.send_upstream_line(&[b"HELO ", &domain]);
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
                    self.send_ehlo_reply(&[Bytes::copy_from_slice(text)]);
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
                self.conn.tally.record(tally_name(verb), positive);
                self.relay(&lines);
                return self.conn.close();
            }
            Awaiting::EndOfData | Awaiting::Reply => self.relay(&lines),
        }
        if matches!(verb, Verb::Ehlo | Verb::Helo) && positive && self.conn.tls_active {
            self.greeted_since_tls = true;
        }
        self.conn.tally.record(tally_name(verb), positive);
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
            return self.conn.close();
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
                self.conn.send_upstream(command);
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
    /// (the open-relay trap of ARCHITECTURE.md §7).
    fn xclient_unavailable(&mut self, reason: &'static str) {
        self.conn.event(Event::XclientUnavailable { reason });
        self.mode = Mode::Command;
        self.conn.close_with(reply::IDENTITY_UNAVAILABLE);
    }

    fn relay(&mut self, lines: &[Line]) {
        for line in lines {
            self.conn.send_client(&line.raw);
        }
    }

    /// The upstream's EHLO reply, rewritten per ARCHITECTURE.md §2.
    fn on_ehlo_reply(&mut self, lines: &[Line]) {
        let keywords = ehlo::keywords(lines, self.conn.tls_active);
        self.upstream_pipelining = keywords.pipelining;
        self.send_ehlo_reply(&keywords.kept);
    }

    /// A multi-line 250 of `lines`, with STARTTLS last before TLS.
    fn send_ehlo_reply(&mut self, lines: &[Bytes]) {
        let offer_starttls = !self.conn.tls_active;
        self.conn.starttls_offered |= offer_starttls;
        self.conn.send_client(&ehlo::reply(lines, offer_starttls));
    }

    fn on_tls_rset_reply(&mut self, positive: bool) {
        // Whatever the client queued behind STARTTLS goes to the TLS engine, or nowhere.
        let early = self.conn.take_early_bytes();
        if !self.conn.upstream_in.is_empty() || !self.reply_lines.is_empty() {
            // More than the RSET's reply: replies out of step (ARCHITECTURE.md §9:
            // nothing before TLS may survive into it).
            return self.upstream_broken("data after the reply to RSET");
        }
        if !positive {
            self.conn.tally.record(tally_name(Verb::StartTls), false);
            self.mode = Mode::Command;
            return self.conn.send_client(reply::TLS_UNAVAILABLE);
        }
        if self.client_done {
            // The client closed its side behind STARTTLS: no handshake can complete,
            // and nothing may be queued behind the upgrade.
            self.conn.tally.record(tally_name(Verb::StartTls), false);
            return self.conn.close();
        }
        self.conn.tally.record(tally_name(Verb::StartTls), true);
        self.conn.send_client(reply::READY_TLS);
        self.mode = Mode::Command;
        self.greeted_since_tls = false;
        self.upstream_pipelining = false;
        self.conn.start_tls(early);
    }
}

impl crate::proto::Session for Session {
    fn goodbyes(&self) -> &'static Goodbyes {
        &GOODBYES
    }

    fn client_step(&mut self) -> bool {
        match &mut self.mode {
            Mode::Greeting | Mode::Closing => false,
            Mode::TlsPending { rset_sent } => {
                // RFC 3207 §4.2: the upstream must forget the plaintext dialogue. The
                // RSET goes alone, once every earlier reply is in (ARCHITECTURE.md §10).
                if !*rset_sent && self.slots.is_empty() {
                    *rset_sent = true;
                    self.forward(Verb::StartTls, b"RSET", Awaiting::TlsRset);
                }
                false
            }
            Mode::Data(_) if self.conn.client_in.is_empty() => false,
            Mode::Data(_) => {
                self.process_body();
                true
            }
            Mode::SkipChunk { .. } if self.conn.client_in.is_empty() => false,
            Mode::SkipChunk { remaining } => {
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(self.conn.client_in.len());
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.mode = Mode::Command;
                }
                self.conn.client_in.advance(n);
                true
            }
            Mode::SaslResponse => match self.next_client_line() {
                Some(line) => {
                    self.mode = Mode::Command;
                    // A SASL response is data (RFC 4954 §4): base64 or a cancel, never
                    // bytes an upstream could read as a second line.
                    let response = crate::proto::sasl::response_line(&line.text);
                    self.forward(Verb::Auth, response, Awaiting::Auth);
                    true
                }
                None => false,
            },
            Mode::Command => {
                if self.blocked() {
                    return false;
                }
                match self.next_client_line() {
                    Some(line) => {
                        self.on_command(line);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// A goodbye for what the client did waits for the replies owed before it; one for
    /// the upstream, the clock or an error too many goes at once.
    fn end(&mut self, why: Goodbye) {
        let reply = GOODBYES.reply(why);
        match why {
            Goodbye::LineTooLong | Goodbye::TooManyPlaintext => {
                self.queue_local(Verb::Other, reply, true)
            }
            _ => {
                self.slots.clear();
                self.conn.close_with(reply);
            }
        }
    }

    fn upstream_step(&mut self) -> bool {
        let line = match self.conn.next_upstream_line() {
            Ok(Some(line)) => line,
            Ok(None) => return false,
            Err(_) => {
                self.upstream_broken("reply line too long");
                return false;
            }
        };
        let Ok(reply) = parse::reply_line(&line.text) else {
            self.upstream_broken("malformed reply line");
            return false;
        };
        let (code, last) = (reply.code, reply.last);
        if let Some(first) = self.reply_lines.first()
            && parse::reply_line(&first.text).map(|r| r.code) != Ok(code)
        {
            self.upstream_broken("reply code changed inside a reply");
            return false;
        }
        if self.reply_lines.len() == MAX_REPLY_LINES {
            self.upstream_broken("reply has too many lines");
            return false;
        }
        self.reply_lines.push(line);
        if last {
            let lines = std::mem::take(&mut self.reply_lines);
            self.on_reply(code, lines);
            self.flush_local_replies();
        }
        true
    }

    fn process_client(&mut self) {
        while self.conn.is_open() && !self.conn.output_full() && self.client_step() {}
        // A client that half-closed is done once every command it sent has been read
        // and answered: the commands held behind the reply just in go first.
        if self.client_done && self.slots.is_empty() {
            self.conn.close();
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
            // message is ever delivered (ARCHITECTURE.md §9).
            Mode::Data(_) | Mode::SkipChunk { .. } | Mode::SaslResponse => self.conn.close(),
            // A client that pipelined its commands and half-closed still gets its
            // replies (and its last message is not lost).
            Mode::Command | Mode::Greeting if owed && self.conn.is_open() => {}
            _ => self.conn.close(),
        }
    }

    fn on_upstream_eof(&mut self) {
        if matches!(self.mode, Mode::Command) && self.slots.is_empty() {
            // Between commands (after the upstream's own 421, say): nothing is owed.
            self.conn.close();
        } else {
            self.end(Goodbye::UpstreamUnavailable);
        }
    }

    fn phase(&self) -> Phase {
        match (self.conn.stage, &self.mode) {
            (Stage::Handshake, _) => Phase::Handshake,
            (_, Mode::Greeting) => Phase::Greeting,
            (_, Mode::Data(_) | Mode::SkipChunk { .. }) => Phase::Data,
            _ => Phase::Command,
        }
    }

    fn client_stream_buffer(&mut self) -> Option<&mut bytes::BytesMut> {
        matches!(self.mode, Mode::Data(_)).then_some(&mut self.conn.client_in)
    }

    fn wants_client_data(&self) -> bool {
        !self.client_done && !matches!(self.mode, Mode::Closing) && self.conn.wants_client_data()
    }

    fn release_idle_memory(&mut self) {
        self.conn.release_idle_memory();
        release_queue_if_empty(&mut self.slots);
        if self.reply_lines.is_empty() {
            self.reply_lines = Vec::new();
        }
    }

    fn awaiting_greeting(&self) -> bool {
        matches!(self.mode, Mode::Greeting)
    }

    fn at_command_boundary(&self) -> bool {
        matches!(self.mode, Mode::Command)
            && self.slots.is_empty()
            && self.conn.client_in.is_empty()
    }

    /// The 421 takes the place of the greeting (RFC 5321 §3.1); between commands the
    /// upstream's side ends cleanly too, with a QUIT.
    fn close_if_idle(&mut self) -> bool {
        if !self.conn.is_open() {
            return false;
        }
        if self.at_command_boundary() {
            self.conn.send_upstream_line(&[b"QUIT"]);
        } else if !self.awaiting_greeting() {
            return false;
        }
        self.end(Goodbye::ShuttingDown);
        true
    }

    fn conn(&self) -> &Conn {
        &self.conn
    }

    fn conn_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests;
