//! The POP3 session: policy before TLS, STLS owned by the proxy, CAPA rewritten,
//! multi-line replies framed by the command that asked for them, and a blind relay once
//! the upstream accepts the login (DESIGN §1-§4, §10).
//!
//! Ordering: a POP3 client waits for each reply (RFC 1939 §3; PIPELINING, RFC 2449 §6.6,
//! is an option the proxy does not need), so the session forwards one command at a time:
//! nothing after a command is read until its whole reply, body included, has arrived.
//! Reply matching is then exact, and whatever a client pipelines behind PASS, APOP or
//! AUTH is held until the login's outcome is known (Courier drops early input, DESIGN
//! §10).
//!
//! Which replies are multi-line is known only from the command (RFC 1939 §3): CAPA,
//! LIST and UIDL without argument, RETR, TOP, LANG without argument (RFC 6856 §3), and
//! AUTH without argument, the de facto mechanism listing that Outlook sends and Dovecot
//! answers. Bodies are relayed unchanged (dot-stuffing included, bare LF included) and
//! streamed as they arrive, without a line length limit, so a message with a 1 MB line
//! or a 10 MB RETR never sits in memory. Only a line `.` at the start of a line ends
//! them; a line reading `+OK` or `-ERR` inside is content.
//!
//! Decisions where DESIGN is silent:
//! - An upstream that answers CAPA with `-ERR` (plain RFC 1939) still gets STLS offered
//!   before TLS: the client is answered `+OK Capability list follows`, `STLS`, `.`, as
//!   SMTP answers for a HELO-only upstream (DESIGN §2, §9: STLS must not vanish).
//! - Dovecot's `XCLIENT` (which lets a trusted peer such as this proxy claim any client
//!   address) is refused after TLS with `forbidden_command` and removed from CAPA, as in
//!   SMTP (DESIGN §2, §5).
//! - Command lines are forwarded as `keyword [SP args] CRLF`, white space normalised, so
//!   that the upstream sees exactly the arguments the proxy based its framing on; PASS
//!   lines go verbatim, since spaces may be part of the password (RFC 1939 §7).
//! - An unknown command's reply is expected on one line. An upstream that answers some
//!   private extension with a multi-line reply desynchronises: its body lines are then
//!   not status lines, which is an upstream protocol error, and the session closes.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::{self, Keyword, Status};
use crate::policy::{UserHasher, is_channel_binding_mechanism, is_mangled_upgrade_verb};
use crate::proto::line::{Framer, Line};
use crate::proto::sasl::{login_username, plain_authcid};
use crate::proto::{
    Action, Event, Phase, ReplyBudget, Tally, release_if_empty, release_queue_if_empty,
};

/// Replies the proxy gives itself (DESIGN §3, §4, §9).
mod reply {
    pub const AUTH_REQUIRES_TLS: &[u8] =
        b"-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
    pub const NOT_BEFORE_STLS: &[u8] = b"-ERR Command not allowed before STLS\r\n";
    pub const BEGIN_TLS: &[u8] = b"+OK Begin TLS negotiation\r\n";
    pub const TLS_ACTIVE: &[u8] = b"-ERR TLS already active\r\n";
    pub const STLS_ARGUMENTS: &[u8] = b"-ERR Syntax error, STLS takes no arguments\r\n";
    pub const BAD_SYNTAX: &[u8] = b"-ERR Syntax error\r\n";
    pub const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
    pub const FORBIDDEN: &[u8] = b"-ERR Command not allowed\r\n";
    pub const CAPA_FALLBACK: &[u8] = b"+OK Capability list follows\r\nSTLS\r\n.\r\n";
    pub const UPSTREAM_UNAVAILABLE: &[u8] = super::super::UNAVAILABLE;
    pub const UPSTREAM_BROKEN: &[u8] =
        b"-ERR [SYS/TEMP] Upstream protocol error, closing connection\r\n";
    pub const IDLE_TIMEOUT: &[u8] = b"-ERR Disconnected for inactivity\r\n";
    /// RFC 3206 SYS/TEMP: a temporary condition, try again later.
    pub const SHUTTING_DOWN: &[u8] = b"-ERR [SYS/TEMP] Server shutting down\r\n";
    pub const TOO_MANY_PLAINTEXT: &[u8] = b"-ERR Too many commands before STLS\r\n";
    pub const NO_ARGUMENTS: &[u8] = b"-ERR Syntax error, no arguments allowed before STLS\r\n";
    pub const TOO_MANY_ERRORS: &[u8] = b"-ERR Too many invalid commands, closing connection\r\n";
}

/// Longest upstream status or CAPA line accepted (bodies are streamed, not framed).
const MAX_UPSTREAM_LINE_LEN: usize = 8192;

/// How a session is set up, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest client command line, CRLF included.
    pub max_line_len: usize,
    /// Most client bytes held unprocessed (pipelined behind an outstanding reply) before
    /// the driver stops reading.
    pub max_held_bytes: usize,
    /// Commands accepted before TLS before the connection closes.
    pub max_plaintext_commands: u32,
    /// Error replies the proxy gives itself before it closes the connection.
    pub max_errors: u32,
    /// Hashes user names for `credentials_exposed`.
    pub user_hasher: UserHasher,
}

/// What the reading of client bytes is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the upstream's greeting; nothing from the client is read (DESIGN §10).
    Greeting,
    /// Reading command lines, one at a time.
    Command,
    /// After a `+` continuation: the next client line is SASL data, never a command
    /// (RFC 5034 §4, DESIGN §4).
    SaslResponse,
    /// The driver runs the TLS handshake.
    Handshake,
    /// The login succeeded and the driver copies bytes blindly (DESIGN §1.7).
    Relay,
    /// The session is over.
    Closed,
}

/// The status line the upstream owes, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Greeting,
    /// A single-line reply.
    Single(Keyword),
    /// A body follows a `+OK`.
    MultiLine(Keyword),
    /// A CAPA list follows a `+OK`; it is rewritten.
    Capa,
    /// `AUTH` without argument: a mechanism list follows a `+OK`.
    Mechanisms,
    /// PASS or APOP: a `+OK` ends the proxy's part.
    Login(Keyword),
    /// An AUTH step: `+` continuation, or the final `+OK`/`-ERR`.
    Auth,
    Quit,
}

/// How the lines of a multi-line body are relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Streamed unchanged; `at_line_start` says whether the next byte starts a line.
    Data { at_line_start: bool },
    /// CAPA lines, filtered and extended (DESIGN §2).
    Capa,
    /// AUTH mechanism names, channel binding removed.
    Mechanisms,
}

/// What the upstream owes the client now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Nothing: a line now is unsolicited (a `-ERR` before the upstream hangs up).
    Nothing,
    /// A status line.
    Reply(Awaiting),
    /// The rest of a multi-line reply to `keyword`.
    Body { keyword: Keyword, body: Body },
}

/// Whether a streamed body has ended.
enum BodyProgress {
    More { at_line_start: bool },
    End,
}

/// The counted keywords and their summary names, in summary order.
const COUNTED: [(Keyword, &str); 19] = [
    (Keyword::Capa, "capa"),
    (Keyword::Stls, "stls"),
    (Keyword::User, "user"),
    (Keyword::Pass, "pass"),
    (Keyword::Apop, "apop"),
    (Keyword::Auth, "auth"),
    (Keyword::Stat, "stat"),
    (Keyword::List, "list"),
    (Keyword::Uidl, "uidl"),
    (Keyword::Retr, "retr"),
    (Keyword::Top, "top"),
    (Keyword::Dele, "dele"),
    (Keyword::Rset, "rset"),
    (Keyword::Noop, "noop"),
    (Keyword::Lang, "lang"),
    (Keyword::Utf8, "utf8"),
    (Keyword::Quit, "quit"),
    (Keyword::XClient, "xclient"),
    (Keyword::Other, "unknown"),
];

/// The order of the session summary: the names of [`COUNTED`].
const TALLY_ORDER: [&str; COUNTED.len()] = {
    let mut names = [""; COUNTED.len()];
    let mut i = 0;
    while i < COUNTED.len() {
        names[i] = COUNTED[i].1;
        i += 1;
    }
    names
};

/// The summary name of a keyword (`capa=1 stls=1/1 user=1 pass=1/1`).
fn tally_name(keyword: Keyword) -> &'static str {
    COUNTED
        .iter()
        .find(|(k, _)| *k == keyword)
        .map_or("unknown", |&(_, name)| name)
}

/// The sans-I/O POP3 session.
#[derive(Debug)]
pub struct Session {
    config: Config,
    tls_active: bool,
    mode: Mode,
    owed: Owed,
    client_in: BytesMut,
    client_lines: Framer,
    upstream_in: BytesMut,
    upstream_lines: Framer,
    /// Bytes for the client not yet handed out: one `ToClient` per step, not per line.
    client_out: BytesMut,
    /// The client was shown STLS in a CAPA reply.
    starttls_offered: bool,
    /// Commands read before TLS.
    plaintext_commands: u32,
    /// Keyed hash of the name in a refused plaintext USER, for a PASS that follows.
    plaintext_user: Option<String>,
    /// Error replies given by the proxy itself.
    errors: u32,
    /// Reply bytes not yet written by the driver.
    replies: ReplyBudget,
    actions: VecDeque<Action>,
    counters: Tally,
}

impl Session {
    /// A session for a new connection. TLS starts off; on implicit-TLS listeners the
    /// driver calls `on_tls_established` before the upstream's greeting arrives.
    pub fn new(config: Config) -> Self {
        let client_lines = Framer::new(config.max_line_len);
        Session {
            config,
            tls_active: false,
            mode: Mode::Greeting,
            owed: Owed::Reply(Awaiting::Greeting),
            client_in: BytesMut::new(),
            client_lines,
            upstream_in: BytesMut::new(),
            upstream_lines: Framer::new(MAX_UPSTREAM_LINE_LEN),
            client_out: BytesMut::new(),
            starttls_offered: false,
            plaintext_commands: 0,
            plaintext_user: None,
            errors: 0,
            replies: ReplyBudget::default(),
            actions: VecDeque::new(),
            counters: Tally::new(&TALLY_ORDER, &["stls", "pass", "apop", "auth"]),
        }
    }

    /// Hands out the client bytes collected so far, keeping them in order with the
    /// actions that follow.
    fn flush_client(&mut self) {
        if !self.client_out.is_empty() {
            let bytes = self.client_out.split().freeze();
            self.actions.push_back(Action::ToClient(bytes));
        }
    }

    fn push(&mut self, action: Action) {
        self.flush_client();
        self.actions.push_back(action);
    }

    fn send_client(&mut self, bytes: &[u8]) {
        self.replies.queued(bytes.len());
        self.client_out.put_slice(bytes);
    }

    fn event(&mut self, event: Event) {
        self.replies.event();
        self.push(Action::Event(event));
    }

    fn close(&mut self) {
        if self.mode != Mode::Closed {
            self.mode = Mode::Closed;
            self.push(Action::Close);
        }
    }

    /// Something the client cannot recover from: reply, then close.
    fn close_with(&mut self, reply: &'static [u8]) {
        if !matches!(self.mode, Mode::Closed | Mode::Handshake | Mode::Relay) {
            self.send_client(reply);
        }
        self.close();
    }

    /// A reply of the proxy's own. Nothing is outstanding upstream when a command is
    /// read, so it goes out at once, in order.
    fn reply_local(&mut self, keyword: Keyword, reply: &'static [u8]) {
        let positive = reply.starts_with(b"+");
        self.counters.record(tally_name(keyword), positive);
        self.send_client(reply);
        if !positive {
            // A client that only draws errors is probing (Postfix's hard error limit).
            self.errors += 1;
            if self.errors > self.config.max_errors {
                self.event(Event::LimitExceeded { limit: "errors" });
                self.close_with(reply::TOO_MANY_ERRORS);
            }
        }
    }

    // ---- client side ----

    fn process_client(&mut self) {
        loop {
            if self.replies.is_full() {
                // The client has not taken what it was sent: nothing more is read until
                // the driver has written it (`on_output_written`).
                return;
            }
            match self.mode {
                Mode::Command if self.owed == Owed::Nothing => match self.next_client_line() {
                    Some(line) => self.on_command(line),
                    None => return,
                },
                Mode::SaslResponse => match self.next_client_line() {
                    Some(line) => {
                        // RFC 5034 §4: a SASL response (or `*` to cancel), relayed as is
                        // when it is base64; anything else cancels.
                        self.mode = Mode::Command;
                        let mut out = BytesMut::with_capacity(line.text.len() + 2);
                        out.put_slice(crate::proto::sasl::response_line(&line.text));
                        out.put_slice(b"\r\n");
                        self.push(Action::ToUpstream(out.freeze()));
                        self.owed = Owed::Reply(Awaiting::Auth);
                    }
                    None => return,
                },
                _ => return,
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
                self.close_with(reply::LINE_TOO_LONG);
                None
            }
        }
    }

    fn on_command(&mut self, line: Line) {
        if !self.tls_active {
            self.plaintext_commands += 1;
            if self.plaintext_commands > self.config.max_plaintext_commands {
                self.event(Event::LimitExceeded {
                    limit: "plaintext_commands",
                });
                return self.close_with(reply::TOO_MANY_PLAINTEXT);
            }
        }
        let command = match parse::command(&line.text) {
            Ok(command) => command,
            Err(_) => return self.reply_local(Keyword::Other, reply::BAD_SYNTAX),
        };
        let keyword = command.keyword;
        if keyword == Keyword::Stls {
            return self.on_stls(command.args.is_empty());
        }
        if !self.tls_active {
            return self.on_plaintext_command(&command, &line);
        }
        if keyword == Keyword::XClient {
            // The upstream trusts the local link; only the proxy may speak for it.
            self.event(Event::ForbiddenCommand { verb: "XCLIENT" });
            return self.reply_local(keyword, reply::FORBIDDEN);
        }
        let no_args = command.args.is_empty();
        let awaiting = match keyword {
            Keyword::Capa => Awaiting::Capa,
            Keyword::List | Keyword::Uidl | Keyword::Lang if no_args => {
                Awaiting::MultiLine(keyword)
            }
            Keyword::Retr | Keyword::Top => Awaiting::MultiLine(keyword),
            Keyword::Auth if no_args => Awaiting::Mechanisms,
            Keyword::Auth => Awaiting::Auth,
            Keyword::Pass | Keyword::Apop => Awaiting::Login(keyword),
            Keyword::Quit => Awaiting::Quit,
            _ => Awaiting::Single(keyword),
        };
        self.forward(&command, &line, awaiting);
    }

    /// Before TLS only the upgrade dialogue passes (DESIGN §3): CAPA, QUIT and NOOP are
    /// forwarded in the proxy's own words, STLS is the proxy's, everything else is
    /// answered here.
    fn on_plaintext_command(&mut self, command: &parse::Command<'_>, line: &Line) {
        let keyword = command.keyword;
        match keyword {
            Keyword::Capa | Keyword::Quit | Keyword::Noop if !command.args.is_empty() => {
                // DESIGN §3, canonical forwarding: none of them takes an argument, and
                // what an upstream would make of one is its parser's business.
                self.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                self.reply_local(keyword, reply::NO_ARGUMENTS);
            }
            Keyword::Capa => self.forward(command, line, Awaiting::Capa),
            Keyword::Quit => self.forward(command, line, Awaiting::Quit),
            Keyword::Noop => self.forward(command, line, Awaiting::Single(keyword)),
            Keyword::User | Keyword::Pass | Keyword::Apop | Keyword::Auth => {
                if self.starttls_offered {
                    self.event(Event::StarttlsStrippingSuspected {
                        reason: "auth_after_starttls_offered",
                    });
                }
                self.note_plaintext_credentials(command);
                self.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                // Refusing USER means a well-behaved client never sends its PASS.
                self.reply_local(keyword, reply::AUTH_REQUIRES_TLS);
            }
            _ => {
                if keyword == Keyword::Other
                    && is_mangled_upgrade_verb(command.keyword_text, b"STLS")
                {
                    self.event(Event::StarttlsStrippingSuspected {
                        reason: "mangled_verb",
                    });
                }
                self.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                self.reply_local(keyword, reply::NOT_BEFORE_STLS);
            }
        }
    }

    /// A refused login command: if a secret crossed the wire, say so, with a keyed hash
    /// of the user name and never the secret (DESIGN §3).
    fn note_plaintext_credentials(&mut self, command: &parse::Command<'_>) {
        let args = command.args;
        let hash = |hasher: &UserHasher, name: &[u8]| hasher.hash(&String::from_utf8_lossy(name));
        match command.keyword {
            Keyword::User if !args.is_empty() => {
                self.plaintext_user = Some(hash(&self.config.user_hasher, args));
            }
            Keyword::Pass if !args.is_empty() => {
                self.event(Event::CredentialsExposed {
                    mechanism: "PASS".to_owned(),
                    user_hash: self.plaintext_user.clone(),
                });
            }
            Keyword::Apop => {
                // The digest is MD5(timestamp + secret) (RFC 1939 §7): open to offline
                // guessing once seen.
                if let Ok((name, _digest)) = parse::apop_args(args) {
                    let user_hash = Some(hash(&self.config.user_hasher, name));
                    self.event(Event::CredentialsExposed {
                        mechanism: "APOP".to_owned(),
                        user_hash,
                    });
                }
            }
            Keyword::Auth => {
                let Ok((mechanism, Some(initial_response))) = parse::auth_args(args) else {
                    return;
                };
                if initial_response == b"=" {
                    return; // RFC 5034 §4: an empty initial response carries nothing.
                }
                let user = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
                    plain_authcid(initial_response)
                } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
                    login_username(initial_response)
                } else {
                    None
                };
                let user_hash = user.map(|user| self.config.user_hasher.hash(&user));
                self.event(Event::CredentialsExposed {
                    mechanism: format!("AUTH {}", crate::proto::sasl::mechanism_label(mechanism)),
                    user_hash,
                });
            }
            _ => {}
        }
    }

    /// RFC 2595 §4: STLS takes no argument; the proxy answers it and never forwards it.
    fn on_stls(&mut self, no_args: bool) {
        if self.tls_active {
            return self.reply_local(Keyword::Stls, reply::TLS_ACTIVE);
        }
        if !no_args {
            // The session stays usable in plaintext (DESIGN §9).
            return self.reply_local(Keyword::Stls, reply::STLS_ARGUMENTS);
        }
        // Commands go one at a time, so every earlier reply is out already; anything
        // still buffered would arrive inside TLS (DESIGN §9).
        if !self.upstream_in.is_empty() {
            return self.upstream_broken("upstream data pending at STLS");
        }
        self.counters.record(tally_name(Keyword::Stls), true);
        self.send_client(reply::BEGIN_TLS);
        // DESIGN §4: whatever the client queued behind STLS is the start of the
        // handshake (it fails there unless it is a ClientHello), never a command.
        let early = self.client_in.split().freeze();
        self.client_lines.reset();
        if !early.is_empty() && early[0] != 0x16 {
            self.event(Event::StarttlsInjection { bytes: early.len() });
        }
        self.mode = Mode::Handshake;
        self.push(Action::StartTls { early });
    }

    /// Sends a command upstream as `keyword [SP args] CRLF` and waits for its reply.
    /// Before TLS the keyword is the proxy's own spelling, and there are no arguments.
    fn forward(&mut self, command: &parse::Command<'_>, line: &Line, awaiting: Awaiting) {
        let mut out = BytesMut::with_capacity(line.text.len() + 2);
        if !self.tls_active {
            out.put_slice(command.keyword.label().as_bytes());
        } else if command.keyword == Keyword::Pass {
            // RFC 1939 §7: the password may contain (even end in) spaces.
            out.put_slice(&line.text);
        } else {
            out.put_slice(command.keyword_text);
            if !command.args.is_empty() {
                out.put_u8(b' ');
                out.put_slice(command.args);
            }
        }
        out.put_slice(b"\r\n");
        self.push(Action::ToUpstream(out.freeze()));
        self.owed = Owed::Reply(awaiting);
    }

    // ---- upstream side ----

    fn process_upstream(&mut self) {
        // During the handshake upstream bytes wait; `on_tls_established` refuses them.
        while !matches!(self.mode, Mode::Closed | Mode::Relay | Mode::Handshake) {
            if let Owed::Body {
                keyword,
                body: Body::Data { at_line_start },
            } = self.owed
            {
                match self.stream_body(at_line_start) {
                    BodyProgress::More { at_line_start } => {
                        self.owed = Owed::Body {
                            keyword,
                            body: Body::Data { at_line_start },
                        };
                        return;
                    }
                    BodyProgress::End => {
                        self.owed = Owed::Nothing;
                        self.counters.record(tally_name(keyword), true);
                        continue;
                    }
                }
            }
            let line = match self.upstream_lines.next_line(&mut self.upstream_in) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(_) => return self.upstream_broken("line too long"),
            };
            match self.owed {
                Owed::Nothing => self.on_unsolicited(&line),
                Owed::Reply(awaiting) => self.on_status_line(awaiting, &line),
                Owed::Body { keyword, body } => self.on_body_line(keyword, body, &line),
            }
        }
    }

    /// Relays body bytes up to and including the terminating `.` line, as they come:
    /// complete lines, and the start of a long line before its end has arrived.
    fn stream_body(&mut self, mut at_line_start: bool) -> BodyProgress {
        loop {
            if self.upstream_in.is_empty() {
                return BodyProgress::More { at_line_start };
            }
            if at_line_start && self.upstream_in[0] == b'.' {
                // RFC 1939 §3: the body ends with "." CRLF; any other line starting with
                // "." is byte-stuffed content. Liberal: "." LF ends it too (DESIGN §10).
                match &self.upstream_in[..self.upstream_in.len().min(3)] {
                    [b'.'] | [b'.', b'\r'] => return BodyProgress::More { at_line_start },
                    [b'.', b'\n', ..] | [b'.', b'\r', b'\n'] => {
                        let end = if self.upstream_in[1] == b'\n' { 2 } else { 3 };
                        let terminator = self.upstream_in.split_to(end);
                        self.client_out.put_slice(&terminator);
                        self.upstream_lines.reset();
                        return BodyProgress::End;
                    }
                    _ => {}
                }
            }
            let chunk = match memchr::memchr(b'\n', &self.upstream_in) {
                Some(lf) => {
                    at_line_start = true;
                    self.upstream_in.split_to(lf + 1)
                }
                None => {
                    at_line_start = false;
                    self.upstream_in.split()
                }
            };
            self.client_out.put_slice(&chunk);
        }
    }

    fn upstream_broken(&mut self, detail: &'static str) {
        self.event(Event::UpstreamProtocolError { detail });
        self.close_with(reply::UPSTREAM_BROKEN);
    }

    /// A line while nothing is owed: a status line (Dovecot's `-ERR Disconnected for
    /// inactivity.` before it hangs up) is relayed; anything else is a broken upstream.
    fn on_unsolicited(&mut self, line: &Line) {
        match parse::status_line(&line.text) {
            Ok(status) if status.status != Status::Continue => self.send_client(&line.raw),
            _ => self.upstream_broken("unsolicited line"),
        }
    }

    fn on_status_line(&mut self, awaiting: Awaiting, line: &Line) {
        let status = match parse::status_line(&line.text) {
            Ok(status) => status.status,
            Err(_) if awaiting == Awaiting::Greeting => {
                return self.upstream_broken("malformed greeting");
            }
            Err(_) => return self.upstream_broken("malformed status line"),
        };
        if status == Status::Continue && awaiting != Awaiting::Auth {
            return self.upstream_broken("continuation outside AUTH");
        }
        self.owed = Owed::Nothing;
        let ok = status == Status::Ok;
        match awaiting {
            Awaiting::Greeting => {
                // Verbatim: an APOP timestamp in it stays (RFC 1939 §7).
                self.send_client(&line.raw);
                if ok {
                    self.mode = Mode::Command;
                } else {
                    self.close();
                }
            }
            Awaiting::Single(keyword) => {
                self.send_client(&line.raw);
                self.counters.record(tally_name(keyword), ok);
            }
            Awaiting::MultiLine(keyword) => {
                self.send_client(&line.raw);
                if ok {
                    // Counted once the body is complete.
                    self.owed = Owed::Body {
                        keyword,
                        body: Body::Data {
                            at_line_start: true,
                        },
                    };
                } else {
                    self.counters.record(tally_name(keyword), false);
                }
            }
            Awaiting::Capa => {
                if ok {
                    self.send_client(&line.raw);
                    self.owed = Owed::Body {
                        keyword: Keyword::Capa,
                        body: Body::Capa,
                    };
                    return;
                }
                if self.tls_active {
                    self.send_client(&line.raw);
                } else {
                    // An RFC 1939-only upstream: STLS must not vanish (module docs).
                    self.send_client(reply::CAPA_FALLBACK);
                    self.starttls_offered = true;
                }
                self.counters.record(tally_name(Keyword::Capa), false);
            }
            Awaiting::Mechanisms => {
                // A listing, not a login: not counted.
                self.send_client(&line.raw);
                if ok {
                    self.owed = Owed::Body {
                        keyword: Keyword::Auth,
                        body: Body::Mechanisms,
                    };
                }
            }
            Awaiting::Login(keyword) => {
                self.counters.record(tally_name(keyword), ok);
                if ok {
                    return self.go_blind(line);
                }
                self.send_client(&line.raw);
            }
            Awaiting::Auth => match status {
                Status::Continue => {
                    // Relayed unchanged, even a challenge that decodes to a NUL (DESIGN
                    // §10). Counted once, with the final reply of the exchange.
                    self.send_client(&line.raw);
                    self.mode = Mode::SaslResponse;
                }
                Status::Ok => {
                    self.counters.record(tally_name(Keyword::Auth), true);
                    self.go_blind(line);
                }
                Status::Err => {
                    self.counters.record(tally_name(Keyword::Auth), false);
                    self.send_client(&line.raw);
                }
            },
            Awaiting::Quit => {
                self.counters.record(tally_name(Keyword::Quit), ok);
                self.send_client(&line.raw);
                self.close();
            }
        }
    }

    fn on_body_line(&mut self, keyword: Keyword, body: Body, line: &Line) {
        if &line.text[..] == b"." {
            if body == Body::Capa && !self.tls_active {
                // Exactly one STLS, mailmoat's own, last (DESIGN §2, §9).
                self.send_client(b"STLS\r\n");
                self.starttls_offered = true;
            }
            self.send_client(&line.raw);
            self.owed = Owed::Nothing;
            if body != Body::Mechanisms {
                self.counters.record(tally_name(keyword), true);
            }
            return;
        }
        let kept = match body {
            Body::Capa => self.capa_line(line),
            Body::Mechanisms => {
                (!is_channel_binding_mechanism(line.text.trim_ascii())).then(|| line.raw.clone())
            }
            Body::Data { .. } => Some(line.raw.clone()),
        };
        if let Some(kept) = kept {
            self.send_client(&kept);
        }
    }

    /// One line of the upstream's CAPA list, rewritten per DESIGN §2: removed, shortened
    /// or kept, never reordered, never de-duplicated.
    fn capa_line(&self, line: &Line) -> Option<Bytes> {
        let capability = parse::capability(&line.text);
        let is = |name: &[u8]| capability.tag.eq_ignore_ascii_case(name);
        // mailmoat owns TLS; only mailmoat may speak for the local link.
        if is(b"STLS") || is(b"XCLIENT") {
            return None;
        }
        // RFC 2595 §4 lets a server hide what needs TLS; DESIGN §3 requires it.
        if !self.tls_active && (is(b"USER") || is(b"SASL")) {
            return None;
        }
        if !self.tls_active && is(b"UTF8") {
            // RFC 6856 §2: `UTF8 USER` says USER takes UTF-8 names, a login option the
            // proxy refuses until TLS; `UTF8` alone (UTF8 command, LANG) stays.
            return Some(utf8_without_user(line, capability.tag, capability.params));
        }
        if is(b"SASL") {
            return sasl_without_channel_binding(line, capability.tag, capability.params);
        }
        Some(line.raw.clone())
    }

    /// The upstream accepted the login: the +OK, then every byte the session held, then
    /// the driver goes blind (DESIGN §1.7, §10).
    fn go_blind(&mut self, line: &Line) {
        self.flush_client();
        self.push(Action::ToClient(line.raw.clone()));
        if !self.upstream_in.is_empty() {
            let rest = self.upstream_in.split().freeze();
            self.push(Action::ToClient(rest));
        }
        if !self.client_in.is_empty() {
            let held = self.client_in.split().freeze();
            self.push(Action::ToUpstream(held));
        }
        self.mode = Mode::Relay;
        self.push(Action::Relay);
    }
}

/// A `UTF8` capability line without its `USER` argument.
fn utf8_without_user(line: &Line, tag: &[u8], params: &[u8]) -> Bytes {
    let mut words = parse::params(params);
    if !words.clone().any(|w| w.eq_ignore_ascii_case(b"USER")) {
        return line.raw.clone();
    }
    let mut out = BytesMut::from(tag);
    for word in words.by_ref().filter(|w| !w.eq_ignore_ascii_case(b"USER")) {
        out.put_u8(b' ');
        out.put_slice(word);
    }
    out.put_slice(if line.bare_lf { b"\n" } else { b"\r\n" });
    out.freeze()
}

/// A `SASL` capability line without channel-binding mechanisms (RFC 5802 §6: they
/// cannot cross a TLS-terminating proxy); `None` when none remain.
fn sasl_without_channel_binding(line: &Line, tag: &[u8], params: &[u8]) -> Option<Bytes> {
    let mechanisms = parse::params(params);
    if !mechanisms.clone().any(is_channel_binding_mechanism) {
        return Some(line.raw.clone());
    }
    let kept: Vec<&[u8]> = mechanisms
        .filter(|m| !is_channel_binding_mechanism(m))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let mut out = BytesMut::from(tag);
    for mechanism in kept {
        out.put_u8(b' ');
        out.put_slice(mechanism);
    }
    out.put_slice(if line.bare_lf { b"\n" } else { b"\r\n" });
    Some(out.freeze())
}

impl crate::proto::Session for Session {
    fn on_client_data(&mut self, data: &[u8]) {
        // During the handshake the driver hands client bytes to the TLS engine, never here.
        if matches!(self.mode, Mode::Closed | Mode::Relay | Mode::Handshake) {
            return;
        }
        self.client_in.extend_from_slice(data);
        self.process_client();
    }

    fn on_upstream_data(&mut self, data: &[u8]) {
        if matches!(self.mode, Mode::Closed | Mode::Relay) {
            return;
        }
        self.upstream_in.extend_from_slice(data);
        self.process_upstream();
        self.process_client();
    }

    fn on_client_eof(&mut self) {
        if self.mode != Mode::Relay {
            self.close();
        }
    }

    fn on_upstream_eof(&mut self) {
        match self.mode {
            Mode::Closed | Mode::Relay => {}
            Mode::Handshake => self.close(),
            // Between commands (after the upstream's own -ERR goodbye, say): nothing is
            // owed, nothing to say.
            Mode::Command if self.owed == Owed::Nothing => self.close(),
            _ => self.close_with(reply::UPSTREAM_UNAVAILABLE),
        }
    }

    fn on_tls_established(&mut self) {
        if matches!(self.mode, Mode::Closed | Mode::Relay) {
            return;
        }
        self.tls_active = true;
        // On an implicit-TLS listener this comes before the greeting, which is still
        // awaited: the mode stays.
        if self.mode == Mode::Handshake {
            self.mode = Mode::Command;
            if !self.upstream_in.is_empty() {
                return self.upstream_broken("upstream spoke during the TLS handshake");
            }
        }
        self.process_client();
    }

    fn on_timeout(&mut self) {
        match self.mode {
            Mode::Closed | Mode::Relay => {}
            Mode::Handshake => self.close(),
            // The upstream never greeted, or went quiet mid-reply.
            Mode::Greeting => self.close_with(reply::UPSTREAM_UNAVAILABLE),
            _ if self.owed != Owed::Nothing => self.close_with(reply::UPSTREAM_UNAVAILABLE),
            _ => self.close_with(reply::IDLE_TIMEOUT),
        }
    }

    fn phase(&self) -> Phase {
        match self.mode {
            Mode::Greeting => Phase::Greeting,
            Mode::Handshake => Phase::Handshake,
            _ => Phase::Command,
        }
    }

    fn wants_client_data(&self) -> bool {
        // Never less than a line: a line cut off by the hold limit could never complete.
        let limit = self.config.max_held_bytes.max(self.config.max_line_len);
        !matches!(self.mode, Mode::Closed | Mode::Relay | Mode::Handshake)
            && self.client_in.len() < limit
    }

    fn next_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.flush_client();
        }
        self.actions.pop_front()
    }

    fn release_idle_memory(&mut self) {
        release_if_empty(&mut self.client_in);
        release_if_empty(&mut self.upstream_in);
        release_if_empty(&mut self.client_out);
        release_queue_if_empty(&mut self.actions);
    }

    fn on_output_written(&mut self) -> bool {
        let was_full = self.replies.is_full();
        self.replies.written();
        if was_full && !matches!(self.mode, Mode::Closed | Mode::Relay | Mode::Handshake) {
            self.process_client();
            self.flush_client();
        }
        !self.actions.is_empty()
    }

    fn close_if_idle(&mut self) -> bool {
        let idle = match self.mode {
            Mode::Greeting => true,
            Mode::Command => self.owed == Owed::Nothing && self.client_in.is_empty(),
            _ => false,
        };
        if idle {
            self.close_with(reply::SHUTTING_DOWN);
        }
        idle
    }

    fn summary(&self) -> String {
        self.counters.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Session as _;
    use proptest::prelude::*;

    const GREETING: &str = "+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n";
    const CAPA_UPSTREAM: &str = "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256-PLUS\r\nstls\r\n.\r\n";
    const CAPA_BEFORE_TLS: &str =
        "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n";
    const CAPA_AFTER_TLS: &str = "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    const AUTH_REFUSED: &str = "-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
    const NOT_BEFORE_STLS: &str = "-ERR Command not allowed before STLS\r\n";
    const UNAVAILABLE: &str =
        "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
    // "\0alice@example.test\0alice-secret-pw"
    const PLAIN_IR: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=";

    /// What one step produced, split by kind.
    #[derive(Debug, Default, PartialEq)]
    struct Out {
        client: String,
        upstream: String,
        events: Vec<Event>,
        starttls: Option<Vec<u8>>,
        relay: bool,
        closed: bool,
    }

    fn drain(session: &mut Session) -> Out {
        let mut out = Out::default();
        while let Some(action) = session.next_action() {
            assert!(!out.relay && !out.closed, "{action:?} after relay/close");
            match action {
                Action::ToClient(b) => out.client.push_str(&String::from_utf8_lossy(&b)),
                Action::ToUpstream(b) => out.upstream.push_str(&String::from_utf8_lossy(&b)),
                Action::Event(e) => out.events.push(e),
                Action::StartTls { early } => out.starttls = Some(early.to_vec()),
                Action::Relay => out.relay = true,
                Action::Close => out.closed = true,
            }
        }
        out
    }

    fn config() -> Config {
        Config {
            max_line_len: 512,
            max_held_bytes: 64 * 1024,
            max_plaintext_commands: 20,
            max_errors: 20,
            user_hasher: UserHasher::new(b"test key"),
        }
    }

    fn hash(user: &str) -> Option<String> {
        Some(UserHasher::new(b"test key").hash(user))
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

    /// A session past the greeting.
    #[test]
    fn shutdown_waits_for_the_reply_then_says_err() {
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        assert!(!s.close_if_idle(), "the CAPA reply is owed");
        upstream(&mut s, "+OK\r\nTOP\r\n");
        assert!(!s.close_if_idle(), "mid multi-line reply");
        upstream(&mut s, ".\r\n");
        assert!(s.close_if_idle());
        let out = drain(&mut s);
        assert_eq!(out.client, "-ERR [SYS/TEMP] Server shutting down\r\n");
        assert_eq!((out.upstream.as_str(), out.closed), ("", true));
    }

    fn greeted() -> Session {
        let mut session = Session::new(config());
        assert_eq!(upstream(&mut session, GREETING).client, GREETING);
        session
    }

    #[test]
    fn the_plaintext_command_budget_closes_a_chatty_client() {
        let mut s = greeted();
        let out = client(&mut s, &"STAT\r\n".repeat(20));
        assert!(!out.closed);
        let out = client(&mut s, "STAT\r\n");
        assert_eq!(out.client, "-ERR Too many commands before STLS\r\n");
        assert!(out.closed);
        assert_eq!(names(&out.events), vec!["limit_exceeded"]);
    }

    #[test]
    fn upstream_bytes_never_cross_into_tls() {
        let mut s = greeted();
        upstream(&mut s, "+OK half a line");
        let out = client(&mut s, "STLS\r\n");
        assert!(out.client.starts_with("-ERR [SYS/TEMP]"), "{out:?}");
        assert!(out.closed && out.starttls.is_none());
        let mut s = greeted();
        client(&mut s, "STLS\r\n");
        assert_eq!(upstream(&mut s, "+OK late\r\n"), Out::default());
        s.on_tls_established();
        let out = drain(&mut s);
        assert!(out.closed && !out.client.contains("late"));
    }

    /// A session after STLS and the handshake.
    fn after_tls() -> Session {
        let mut s = greeted();
        let out = client(&mut s, "STLS\r\n");
        assert_eq!(out.client, "+OK Begin TLS negotiation\r\n");
        assert_eq!(out.starttls, Some(vec![]));
        s.on_tls_established();
        assert_eq!(drain(&mut s), Out::default());
        s
    }

    // ---- greeting ----

    #[test]
    fn nothing_from_the_client_is_read_before_the_greeting() {
        let mut s = Session::new(config());
        assert_eq!(s.phase(), Phase::Greeting);
        assert_eq!(client(&mut s, "CAPA\r\n"), Out::default());
        let out = upstream(&mut s, GREETING);
        // C: CAPA   S: +OK Dovecot ready. <1896...>  (the APOP timestamp stays)
        assert_eq!(out.client, GREETING);
        assert_eq!(out.upstream, "CAPA\r\n");
        assert_eq!(s.phase(), Phase::Command);
    }

    #[test]
    fn an_err_greeting_is_relayed_and_closes() {
        let mut s = Session::new(config());
        let out = upstream(&mut s, "-ERR [SYS/TEMP] too many connections\r\n");
        assert_eq!(out.client, "-ERR [SYS/TEMP] too many connections\r\n");
        assert!(out.closed);
    }

    #[test]
    fn a_greeting_in_pieces_with_a_bare_lf_is_relayed_unchanged() {
        let mut s = Session::new(config());
        assert_eq!(upstream(&mut s, "+OK POP3 ").client, "");
        assert_eq!(upstream(&mut s, "ready\n").client, "+OK POP3 ready\n");
    }

    #[test]
    fn the_upstream_failing_gets_the_client_a_sys_temp_error() {
        // Gone before its greeting.
        let mut s = Session::new(config());
        s.on_upstream_eof();
        let out = drain(&mut s);
        assert_eq!(out.client, UNAVAILABLE);
        assert!(out.closed);
        // Garbage instead of a greeting.
        let mut s = Session::new(config());
        let out = upstream(&mut s, "220 smtp.example ESMTP\r\n");
        assert_eq!(
            out.client,
            "-ERR [SYS/TEMP] Upstream protocol error, closing connection\r\n"
        );
        assert_eq!(
            out.events,
            vec![Event::UpstreamProtocolError {
                detail: "malformed greeting"
            }]
        );
        assert!(out.closed);
        // Gone while a reply is owed.
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        upstream(&mut s, "+OK\r\nTOP\r\n");
        s.on_upstream_eof();
        let out = drain(&mut s);
        assert_eq!(out.client, UNAVAILABLE);
        assert!(out.closed);
        // Garbage instead of a status line.
        let mut s = greeted();
        client(&mut s, "NOOP\r\n");
        let out = upstream(&mut s, "OK fine\r\n");
        assert_eq!(names(&out.events), vec!["upstream_protocol_error"]);
        assert!(out.closed);
        // Gone between commands: nothing is owed, nothing to say.
        let mut s = greeted();
        s.on_upstream_eof();
        let out = drain(&mut s);
        assert_eq!(out.client, "");
        assert!(out.closed);
    }

    #[test]
    fn an_unsolicited_status_line_is_relayed_and_garbage_is_not() {
        let mut s = greeted();
        let out = upstream(&mut s, "-ERR Disconnected for inactivity.\r\n");
        assert_eq!(out.client, "-ERR Disconnected for inactivity.\r\n");
        assert!(!out.closed);
        let out = upstream(&mut s, "+ challenge\r\n");
        assert_eq!(names(&out.events), vec!["upstream_protocol_error"]);
        assert!(out.closed);
    }

    #[test]
    fn an_endless_upstream_line_is_a_protocol_error() {
        let mut s = greeted();
        client(&mut s, "NOOP\r\n");
        let out = upstream(&mut s, &"+OK ".repeat(3000));
        assert_eq!(
            out.events,
            vec![Event::UpstreamProtocolError {
                detail: "line too long"
            }]
        );
        assert!(out.closed);
    }

    // ---- CAPA ----

    #[test]
    fn before_tls_the_upstream_hears_only_the_proxys_own_capa_noop_and_quit() {
        let mut s = greeted();
        assert_eq!(client(&mut s, "capa\r\n").upstream, "CAPA\r\n");
        upstream(&mut s, CAPA_UPSTREAM);
        assert_eq!(client(&mut s, " nOoP \r\n").upstream, "NOOP\r\n");
        upstream(&mut s, "+OK\r\n");
        // An argument none of them takes is refused here, whatever follows it.
        for line in ["CAPA x", "NOOP USER alice", "QUIT now", "CAPA {5+}"] {
            let out = client(&mut s, &format!("{line}\r\n"));
            assert_eq!(
                out.client, "-ERR Syntax error, no arguments allowed before STLS\r\n",
                "{line:?}"
            );
            assert_eq!(out.upstream, "", "{line:?}");
            assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
        }
    }

    #[test]
    fn utf8_user_is_hidden_until_tls() {
        let capa = "+OK\r\nTOP\r\nUTF8 USER\r\nUSER\r\n.\r\n";
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, capa).client,
            "+OK\r\nTOP\r\nUTF8\r\nSTLS\r\n.\r\n"
        );
        let mut s = after_tls();
        client(&mut s, "CAPA\r\n");
        assert_eq!(upstream(&mut s, capa).client, capa);
    }

    #[test]
    fn a_session_that_only_draws_errors_is_closed() {
        let mut s = after_tls();
        let out = client(&mut s, &"\r\n".repeat(20));
        assert_eq!(out.client.matches("-ERR Syntax error").count(), 20);
        assert!(!out.closed);
        let out = client(&mut s, "\r\nNOOP\r\n");
        assert_eq!(
            out.client,
            "-ERR Syntax error\r\n-ERR Too many invalid commands, closing connection\r\n"
        );
        assert_eq!(out.upstream, "");
        assert!(out.closed);
        assert_eq!(out.events, vec![Event::LimitExceeded { limit: "errors" }]);
    }

    #[test]
    fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
        use crate::proto::MAX_UNWRITTEN_REPLY_BYTES;
        let mut s = after_tls();
        s.config.max_errors = u32::MAX;
        assert!(!s.on_output_written());
        let flood = "\n".repeat(64 * 1024);
        let out = client(&mut s, &flood);
        let reply_len = reply::BAD_SYNTAX.len();
        // Each reply costs its bytes and its action's slot in the queue.
        let batch = MAX_UNWRITTEN_REPLY_BYTES.div_ceil(reply_len + crate::proto::ACTION_COST);
        assert_eq!(out.client.len(), batch * reply_len);
        let mut total = out.client.len() / reply_len;
        while s.on_output_written() {
            let out = drain(&mut s);
            assert!(out.client.len() < MAX_UNWRITTEN_REPLY_BYTES + reply_len);
            total += out.client.len() / reply_len;
        }
        assert_eq!(total, flood.len());
    }

    #[test]
    fn capa_before_tls_offers_stls_and_hides_user_and_sasl() {
        let mut s = greeted();
        assert_eq!(client(&mut s, "CAPA\r\n").upstream, "CAPA\r\n");
        let out = upstream(&mut s, CAPA_UPSTREAM);
        assert_eq!(out.client, CAPA_BEFORE_TLS);
        assert_eq!(s.summary(), "capa=1");
    }

    #[test]
    fn capa_after_tls_shows_the_upstream_list_without_stls_and_channel_binding() {
        let mut s = after_tls();
        assert_eq!(client(&mut s, "capa\r\n").upstream, "capa\r\n");
        assert_eq!(upstream(&mut s, CAPA_UPSTREAM).client, CAPA_AFTER_TLS);
    }

    #[test]
    fn capa_keeps_order_and_duplicates_and_drops_every_stls_and_xclient() {
        let reply = "+OK Capability list follows\r\nTOP\r\nSTLS\r\nTOP\r\nStLs\r\n\
SASL SCRAM-SHA-1-PLUS SCRAM-SHA-256-PLUS\r\nXCLIENT\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\n.\r\n";
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, reply).client,
            "+OK Capability list follows\r\nTOP\r\nTOP\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\nSTLS\r\n.\r\n"
        );
        let mut s = after_tls();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, reply).client,
            "+OK Capability list follows\r\nTOP\r\nTOP\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\n.\r\n"
        );
    }

    #[test]
    fn capa_lines_ending_in_bare_lf_are_relayed_unchanged() {
        let mut s = after_tls();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, "+OK\nTOP\nSASL PLAIN SCRAM-SHA-256-PLUS\nUSER\n.\n").client,
            "+OK\nTOP\nSASL PLAIN\nUSER\n.\n"
        );
    }

    #[test]
    fn an_upstream_without_capa_still_gets_stls_offered_before_tls() {
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, "-ERR Unknown command\r\n").client,
            "+OK Capability list follows\r\nSTLS\r\n.\r\n"
        );
        let mut s = after_tls();
        client(&mut s, "CAPA\r\n");
        assert_eq!(
            upstream(&mut s, "-ERR Unknown command\r\n").client,
            "-ERR Unknown command\r\n"
        );
        assert_eq!(s.summary(), "capa=0/1 stls=1/1");
    }

    // ---- before TLS ----

    #[test]
    fn credential_commands_before_tls_are_refused_locally_in_any_case_and_spacing() {
        for line in [
            "USER alice\r\n",
            "user alice\r\n",
            "  UsEr\talice  \r\n",
            "USER alice\n",
            "USER\r\n",
            "PASS secret\r\n",
            "pass secret\r\n",
            "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
            "AUTH\r\n",
            "AUTH PLAIN\r\n",
            &format!("auth plain {PLAIN_IR}\r\n"),
        ] {
            let mut s = greeted();
            let out = client(&mut s, line);
            assert_eq!(out.client, AUTH_REFUSED, "{line:?}");
            assert_eq!(out.upstream, "", "{line:?}");
            assert!(names(&out.events).contains(&"plaintext_command_refused"));
        }
    }

    #[test]
    fn everything_but_the_upgrade_dialogue_is_refused_before_tls() {
        let mut s = greeted();
        for line in [
            "STAT",
            "LIST",
            "LIST 1",
            "RETR 1",
            "TOP 1 10",
            "UIDL",
            "DELE 1",
            "RSET",
            "UTF8",
            "LANG",
            "XCLIENT ADDR=192.0.2.1",
            "FOO",
            "XXXXXXXX",
        ] {
            let out = client(&mut s, &format!("{line}\r\n"));
            assert_eq!(out.client, NOT_BEFORE_STLS, "{line:?}");
            assert_eq!(out.upstream, "", "{line:?}");
            assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
        }
        let out = client(&mut s, "RETR 1\r\n");
        assert_eq!(
            out.events,
            vec![Event::PlaintextCommandRefused { verb: "RETR" }]
        );
        // Never the client's own text in an event.
        let out = client(&mut s, "HACKED\r\n");
        assert_eq!(
            out.events,
            vec![Event::PlaintextCommandRefused { verb: "unknown" }]
        );
        for line in ["CAPA", "NOOP", "QUIT"] {
            let out = client(&mut s, &format!("{line}\r\n"));
            assert_eq!(out.upstream, format!("{line}\r\n"));
            assert!(out.events.is_empty());
            upstream(
                &mut s,
                if line == "CAPA" {
                    "+OK\r\n.\r\n"
                } else {
                    "+OK\r\n"
                },
            );
        }
        assert_eq!(
            s.summary(),
            "capa=1 stat=0/1 list=0/2 uidl=0/1 retr=0/2 top=0/1 dele=0/1 rset=0/1 noop=1 \
lang=0/1 utf8=0/1 quit=1 xclient=0/1 unknown=0/3"
        );
    }

    #[test]
    fn quit_before_tls_is_relayed_and_closes() {
        let mut s = greeted();
        client(&mut s, "QUIT\r\nNOOP\r\n");
        let out = upstream(&mut s, "+OK Logging out.\r\n");
        assert_eq!(out.client, "+OK Logging out.\r\n");
        assert_eq!(out.upstream, "");
        assert!(out.closed);
    }

    #[test]
    fn a_plaintext_pass_is_exposed_with_the_hash_of_the_user_seen_before() {
        let mut s = greeted();
        client(&mut s, "CAPA\r\n");
        upstream(&mut s, CAPA_UPSTREAM);
        let out = client(
            &mut s,
            "USER alice@example.test\r\nPASS alice-secret-pw\r\n",
        );
        assert_eq!(out.client, format!("{AUTH_REFUSED}{AUTH_REFUSED}"));
        assert_eq!(out.upstream, "");
        assert_eq!(
            out.events,
            vec![
                Event::StarttlsStrippingSuspected {
                    reason: "auth_after_starttls_offered"
                },
                Event::PlaintextCommandRefused { verb: "USER" },
                Event::StarttlsStrippingSuspected {
                    reason: "auth_after_starttls_offered"
                },
                Event::CredentialsExposed {
                    mechanism: "PASS".into(),
                    user_hash: hash("alice@example.test"),
                },
                Event::PlaintextCommandRefused { verb: "PASS" },
            ]
        );
        let debug = format!("{:?}", out.events);
        assert!(!debug.contains("alice") && !debug.contains("secret"));
        assert_eq!(s.summary(), "capa=1 user=0/1 pass=0/1");
    }

    #[test]
    fn a_pass_without_user_has_no_user_hash_and_no_stripping_without_a_capa() {
        let mut s = greeted();
        let out = client(&mut s, "PASS hunter2\r\n");
        assert_eq!(
            out.events,
            vec![
                Event::CredentialsExposed {
                    mechanism: "PASS".into(),
                    user_hash: None,
                },
                Event::PlaintextCommandRefused { verb: "PASS" },
            ]
        );
        // No password, nothing exposed.
        let out = client(&mut s, "PASS\r\n");
        assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
    }

    #[test]
    fn apop_and_auth_initial_responses_are_exposed_with_a_hashed_user() {
        let table = [
            (
                "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n".to_owned(),
                Some(("APOP", hash("mrose"))),
            ),
            ("APOP mrose\r\n".to_owned(), None),
            (
                format!("AUTH PLAIN {PLAIN_IR}\r\n"),
                Some(("AUTH PLAIN", hash("alice@example.test"))),
            ),
            (
                "auth login YWxpY2U=\r\n".to_owned(),
                Some(("AUTH LOGIN", hash("alice"))),
            ),
            (
                "AUTH X-SECRET c2VjcmV0\r\n".to_owned(),
                Some(("AUTH X-SECRET", None)),
            ),
            (
                "AUTH pl\u{e9}in c2VjcmV0\r\n".to_owned(),
                Some(("AUTH unknown", None)),
            ),
            ("AUTH PLAIN\r\n".to_owned(), None),
            ("AUTH PLAIN =\r\n".to_owned(), None),
        ];
        for (line, exposed) in table {
            let mut s = greeted();
            let out = client(&mut s, &line);
            let mut expected = Vec::new();
            if let Some((mechanism, user_hash)) = exposed {
                expected.push(Event::CredentialsExposed {
                    mechanism: mechanism.into(),
                    user_hash,
                });
            }
            let verb = if line.starts_with("APOP") {
                "APOP"
            } else {
                "AUTH"
            };
            expected.push(Event::PlaintextCommandRefused { verb });
            assert_eq!(out.events, expected, "{line:?}");
            assert_eq!(out.upstream, "");
        }
    }

    #[test]
    fn mangled_stls_is_suspected_stripping() {
        for verb in ["XXXX", "xxxx", "STLX", "XTLS", "stlz", "SSLS"] {
            let mut s = greeted();
            let out = client(&mut s, &format!("{verb}\r\n"));
            assert_eq!(out.client, NOT_BEFORE_STLS);
            assert_eq!(
                out.events,
                vec![
                    Event::StarttlsStrippingSuspected {
                        reason: "mangled_verb"
                    },
                    Event::PlaintextCommandRefused { verb: "unknown" },
                ],
                "{verb}"
            );
        }
        for verb in ["XXXXXXXX", "XXX", "SLTS", "FOOO", "STAT", "STLS2"] {
            let mut s = greeted();
            let out = client(&mut s, &format!("{verb}\r\n"));
            assert!(
                !names(&out.events).contains(&"starttls_stripping_suspected"),
                "{verb}"
            );
        }
    }

    #[test]
    fn control_characters_and_empty_lines_are_refused_locally() {
        for mut s in [greeted(), after_tls()] {
            for line in ["NOOP\rUSER x\r\n", "NOOP\0\r\n", "\r\n", "   \r\n"] {
                let out = client(&mut s, line);
                assert_eq!(out.client, "-ERR Syntax error\r\n", "{line:?}");
                assert_eq!(out.upstream, "");
            }
        }
    }

    #[test]
    fn an_over_long_line_gets_an_error_and_closes() {
        let mut s = greeted();
        let out = client(&mut s, &"A".repeat(600));
        assert_eq!(out.client, "-ERR Line too long\r\n");
        assert_eq!(
            out.events,
            vec![Event::LimitExceeded {
                limit: "line_length"
            }]
        );
        assert_eq!(out.upstream, "");
        assert!(out.closed);
        assert!(!s.wants_client_data());
    }

    // ---- STLS ----

    #[test]
    fn stls_is_answered_locally_and_never_forwarded() {
        let mut s = greeted();
        let out = client(&mut s, "STLS\r\n");
        assert_eq!(
            out,
            Out {
                client: "+OK Begin TLS negotiation\r\n".into(),
                starttls: Some(vec![]),
                ..Out::default()
            }
        );
        assert_eq!(s.phase(), Phase::Handshake);
        assert!(!s.wants_client_data());
        s.on_tls_established();
        assert_eq!(s.phase(), Phase::Command);
        assert!(s.wants_client_data());
        assert_eq!(s.summary(), "stls=1/1");
    }

    #[test]
    fn bytes_behind_stls_go_to_the_tls_engine_and_are_never_commands() {
        for payload in ["STLS\r\nCAPA\r\n", "STLS\r\nUSER attacker\r\nPASS pw\r\n"] {
            let mut s = greeted();
            let out = client(&mut s, payload);
            let injected = &payload.as_bytes()["STLS\r\n".len()..];
            assert_eq!(
                out,
                Out {
                    client: "+OK Begin TLS negotiation\r\n".into(),
                    events: vec![Event::StarttlsInjection {
                        bytes: injected.len()
                    }],
                    starttls: Some(injected.to_vec()),
                    ..Out::default()
                },
                "{payload:?}"
            );
            // Bytes arriving during the handshake belong to the TLS engine too.
            assert_eq!(client(&mut s, "NOOP\r\n"), Out::default());
        }
    }

    #[test]
    fn a_client_hello_behind_stls_is_no_injection() {
        let mut s = greeted();
        s.on_client_data(b"STLS\r\n\x16\x03\x01\x00\x05hello");
        let out = drain(&mut s);
        assert!(out.events.is_empty());
        assert_eq!(
            out.starttls.as_deref(),
            Some(&b"\x16\x03\x01\x00\x05hello"[..])
        );
    }

    #[test]
    fn stls_waits_for_the_reply_owed_before_it() {
        let mut s = greeted();
        let out = client(&mut s, "CAPA\r\nSTLS\r\nUSER x\r\n");
        assert_eq!(out.upstream, "CAPA\r\n");
        assert_eq!(out.client, "");
        assert_eq!(out.starttls, None);
        let out = upstream(&mut s, "+OK\r\nTOP\r\n");
        assert_eq!(out.client, "+OK\r\nTOP\r\n");
        assert_eq!(out.starttls, None);
        let out = upstream(&mut s, ".\r\n");
        assert_eq!(out.client, "STLS\r\n.\r\n+OK Begin TLS negotiation\r\n");
        assert_eq!(out.starttls.as_deref(), Some(&b"USER x\r\n"[..]));
        assert_eq!(out.upstream, "");
    }

    #[test]
    fn stls_with_arguments_is_an_error_and_the_session_goes_on() {
        let mut s = greeted();
        let out = client(&mut s, "STLS now\r\n");
        assert_eq!(out.client, "-ERR Syntax error, STLS takes no arguments\r\n");
        assert_eq!(out.starttls, None);
        assert_eq!(out.upstream, "");
        assert_eq!(client(&mut s, "CAPA\r\n").upstream, "CAPA\r\n");
        upstream(&mut s, "+OK\r\n.\r\n");
        assert_eq!(s.summary(), "capa=1 stls=0/1");
    }

    #[test]
    fn stls_after_tls_is_refused() {
        let mut s = after_tls();
        for line in ["STLS\r\n", "stls now\r\n"] {
            let out = client(&mut s, line);
            assert_eq!(out.client, "-ERR TLS already active\r\n");
            assert_eq!(out.upstream, "");
            assert_eq!(out.starttls, None);
        }
    }

    #[test]
    fn implicit_tls_sessions_start_with_tls_active_and_still_wait_for_the_greeting() {
        let mut s = Session::new(config());
        s.on_tls_established();
        assert_eq!(s.phase(), Phase::Greeting);
        assert_eq!(client(&mut s, "CAPA\r\n"), Out::default());
        let out = upstream(&mut s, GREETING);
        assert_eq!(out.client, GREETING);
        assert_eq!(out.upstream, "CAPA\r\n");
        assert_eq!(upstream(&mut s, CAPA_UPSTREAM).client, CAPA_AFTER_TLS);
        assert_eq!(
            client(&mut s, "STLS\r\n").client,
            "-ERR TLS already active\r\n"
        );
        assert_eq!(client(&mut s, "USER alice\r\n").upstream, "USER alice\r\n");
    }

    // ---- after TLS ----

    #[test]
    fn commands_after_tls_are_forwarded_one_at_a_time_in_canonical_form() {
        let mut s = after_tls();
        let out = client(&mut s, "  user\talice  \r\nPASS  two  words \nSTAT\r\n");
        assert_eq!(out.upstream, "user alice\r\n");
        let out = upstream(&mut s, "+OK\r\n");
        assert_eq!(out.client, "+OK\r\n");
        // The password goes verbatim: spaces may be part of it (RFC 1939 §7).
        assert_eq!(out.upstream, "PASS  two  words \r\n");
        let out = upstream(&mut s, "-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(out.client, "-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(out.upstream, "STAT\r\n");
        assert_eq!(s.summary(), "stls=1/1 user=1 pass=0/1");
    }

    #[test]
    fn a_retr_body_is_relayed_unchanged_and_the_next_reply_still_matched() {
        let mut s = after_tls();
        let out = client(&mut s, "RETR 1\r\nNOOP\r\n");
        assert_eq!(out.upstream, "RETR 1\r\n");
        let body = "+OK 97 octets\r\nSubject: tricks\r\n\r\n..\r\n+OK\r\n-ERR\r\n\
...\r\n..STLS\r\n.. \r\n.\rnot the end\r\n+ \r\n";
        let out = upstream(&mut s, body);
        assert_eq!(out.client, body);
        assert_eq!(out.upstream, "");
        let out = upstream(&mut s, ".\r\n");
        assert_eq!(out.client, ".\r\n");
        assert_eq!(out.upstream, "NOOP\r\n");
        let out = upstream(&mut s, "+OK\r\n");
        assert_eq!(out.client, "+OK\r\n");
        assert_eq!(s.summary(), "stls=1/1 retr=1 noop=1");
    }

    #[test]
    fn the_end_of_a_body_is_found_across_any_split() {
        let mut s = after_tls();
        client(&mut s, "TOP 1 0\r\nNOOP\r\n");
        let mut relayed = String::new();
        for piece in ["+OK\r\nHead", "er: x\r", "\n", ".", "\r", "\n"] {
            let out = upstream(&mut s, piece);
            relayed.push_str(&out.client);
            if piece == "\n" && relayed.ends_with(".\r\n") {
                assert_eq!(out.upstream, "NOOP\r\n");
            } else {
                assert_eq!(out.upstream, "", "{piece:?}");
            }
        }
        assert_eq!(relayed, "+OK\r\nHeader: x\r\n.\r\n");
    }

    #[test]
    fn bodies_ending_in_bare_lf_are_relayed_unchanged() {
        let mut s = after_tls();
        client(&mut s, "UIDL\r\nNOOP\r\n");
        let out = upstream(&mut s, "+OK\n1 whqtswO00WBw418f9t5JxYwZ\n.\n");
        assert_eq!(out.client, "+OK\n1 whqtswO00WBw418f9t5JxYwZ\n.\n");
        assert_eq!(out.upstream, "NOOP\r\n");
    }

    #[test]
    fn list_and_uidl_are_multi_line_only_without_an_argument() {
        let mut s = after_tls();
        for (command, reply) in [
            ("LIST 1", "+OK 1 120\r\n"),
            ("UIDL 1", "+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n"),
            ("LIST", "+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
            ("UIDL", "+OK\r\n1 a\r\n2 b\r\n.\r\n"),
            ("LIST 9", "-ERR no such message\r\n"),
            ("RETR 9", "-ERR no such message\r\n"),
            ("TOP 1 0", "+OK\r\nSubject: x\r\n\r\n.\r\n"),
            ("STAT", "+OK 2 320\r\n"),
            ("DELE 1", "+OK deleted\r\n"),
            (
                "LANG",
                "+OK Language listing follows\r\nen English\r\n.\r\n",
            ),
        ] {
            assert_eq!(
                client(&mut s, &format!("{command}\r\n")).upstream,
                format!("{command}\r\n")
            );
            let out = upstream(&mut s, reply);
            assert_eq!(out.client, reply, "{command}");
            // The reply is complete: the next command goes out at once.
            assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n", "{command}");
            upstream(&mut s, "+OK\r\n");
        }
    }

    #[test]
    fn a_long_body_line_is_streamed_as_it_arrives() {
        let mut s = after_tls();
        client(&mut s, "RETR 1\r\n");
        upstream(&mut s, "+OK\r\n");
        let chunk = "x".repeat(16 * 1024);
        for _ in 0..64 {
            // 1 MiB in one line: each piece goes to the client as it comes.
            assert_eq!(upstream(&mut s, &chunk).client.len(), chunk.len());
        }
        assert_eq!(upstream(&mut s, "\r\n.\r\n").client, "\r\n.\r\n");
        assert!(s.upstream_in.is_empty());
        assert_eq!(client(&mut s, "QUIT\r\n").upstream, "QUIT\r\n");
    }

    #[test]
    fn a_successful_login_relays_the_ok_then_the_held_bytes_then_goes_blind() {
        let mut s = after_tls();
        client(&mut s, "USER alice\r\n");
        upstream(&mut s, "+OK\r\n");
        let out = client(&mut s, "PASS secret\r\nSTAT\r\nLIST\r\nRET");
        assert_eq!(out.upstream, "PASS secret\r\n");
        s.on_upstream_data(b"+OK Logged in.\r\n");
        let mut actions = Vec::new();
        while let Some(action) = s.next_action() {
            actions.push(action);
        }
        assert_eq!(
            actions,
            vec![
                Action::ToClient(Bytes::from_static(b"+OK Logged in.\r\n")),
                Action::ToUpstream(Bytes::from_static(b"STAT\r\nLIST\r\nRET")),
                Action::Relay,
            ]
        );
        assert!(!s.wants_client_data());
        // The driver copies from now on; the session takes no part.
        assert_eq!(client(&mut s, "DELE 1\r\n"), Out::default());
        assert_eq!(upstream(&mut s, "+OK 2 320\r\n"), Out::default());
        s.on_client_eof();
        s.on_timeout();
        assert_eq!(drain(&mut s), Out::default());
        assert_eq!(s.summary(), "stls=1/1 user=1 pass=1/1");
    }

    #[test]
    fn a_login_without_held_bytes_goes_blind_at_once_and_apop_works_too() {
        let mut s = after_tls();
        client(&mut s, "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n");
        s.on_upstream_data(b"+OK mrose's maildrop has 2 messages (320 octets)\r\n+OK 2 320\r\n");
        let mut actions = Vec::new();
        while let Some(action) = s.next_action() {
            actions.push(action);
        }
        // Bytes behind the +OK are the client's, and handed out before the switch.
        assert_eq!(
            actions,
            vec![
                Action::ToClient(Bytes::from_static(
                    b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"
                )),
                Action::ToClient(Bytes::from_static(b"+OK 2 320\r\n")),
                Action::Relay,
            ]
        );
        assert_eq!(s.summary(), "stls=1/1 apop=1/1");
    }

    #[test]
    fn auth_plain_after_tls_relays_its_exchange_then_goes_blind() {
        let mut s = after_tls();
        let out = client(&mut s, &format!("AUTH PLAIN\r\n{PLAIN_IR}\r\nSTAT\r\n"));
        assert_eq!(out.upstream, "AUTH PLAIN\r\n");
        let out = upstream(&mut s, "+ \r\n");
        assert_eq!(out.client, "+ \r\n");
        // The line queued behind AUTH is the SASL response, not a command.
        assert_eq!(out.upstream, format!("{PLAIN_IR}\r\n"));
        let out = upstream(&mut s, "+OK Logged in.\r\n");
        assert_eq!(out.client, "+OK Logged in.\r\n");
        assert_eq!(out.upstream, "STAT\r\n");
        assert!(out.relay);
        assert!(out.events.is_empty());
        assert_eq!(s.summary(), "stls=1/1 auth=1/1");
    }

    #[test]
    fn auth_with_an_initial_response_after_tls() {
        let mut s = after_tls();
        let out = client(&mut s, &format!("AUTH PLAIN {PLAIN_IR}\r\n"));
        assert_eq!(out.upstream, format!("AUTH PLAIN {PLAIN_IR}\r\n"));
        let out = upstream(&mut s, "+OK Logged in.\r\n");
        assert!(out.relay);
    }

    #[test]
    fn a_sasl_response_is_never_read_as_a_command_and_star_cancels() {
        let mut s = after_tls();
        client(&mut s, "AUTH LOGIN\r\n");
        assert_eq!(
            upstream(&mut s, "+ VXNlcm5hbWU6\r\n").client,
            "+ VXNlcm5hbWU6\r\n"
        );
        // Even a line that reads like STLS is SASL data here.
        let out = client(&mut s, "STLS\r\n");
        assert_eq!(out.upstream, "STLS\r\n");
        assert_eq!(out.client, "");
        assert_eq!(upstream(&mut s, "+ UGFzc3dvcmQ6\r\n").upstream, "");
        assert_eq!(client(&mut s, "*\r\n").upstream, "*\r\n");
        let out = upstream(&mut s, "-ERR [AUTH] Authentication aborted\r\n");
        assert_eq!(out.client, "-ERR [AUTH] Authentication aborted\r\n");
        assert!(!out.relay);
        // Commands again.
        assert_eq!(
            client(&mut s, "STLS\r\n").client,
            "-ERR TLS already active\r\n"
        );
        assert_eq!(s.summary(), "stls=1/2 auth=0/1");
    }

    #[test]
    fn auth_without_arguments_lists_mechanisms_without_channel_binding() {
        let mut s = after_tls();
        client(&mut s, "AUTH\r\n");
        let out = upstream(
            &mut s,
            "+OK\r\nPLAIN\r\nSCRAM-SHA-256-PLUS\r\nLOGIN\r\n.\r\n",
        );
        assert_eq!(out.client, "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
        assert!(!out.relay);
        assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
    }

    #[test]
    fn a_continuation_outside_auth_is_an_upstream_protocol_error() {
        let mut s = after_tls();
        client(&mut s, "USER alice\r\n");
        let out = upstream(&mut s, "+ \r\n");
        assert_eq!(
            out.events,
            vec![Event::UpstreamProtocolError {
                detail: "continuation outside AUTH"
            }]
        );
        assert!(out.closed);
    }

    #[test]
    fn xclient_after_tls_is_forbidden() {
        let mut s = after_tls();
        let out = client(&mut s, "XCLIENT ADDR=192.0.2.1 PORT=110\r\n");
        assert_eq!(out.client, "-ERR Command not allowed\r\n");
        assert_eq!(out.upstream, "");
        assert_eq!(
            out.events,
            vec![Event::ForbiddenCommand { verb: "XCLIENT" }]
        );
    }

    // ---- limits, deadlines, ends ----

    #[test]
    fn held_bytes_are_bounded() {
        let mut s = Session::new(Config {
            max_held_bytes: 1024,
            max_plaintext_commands: 1000,
            max_errors: 1000,
            ..config()
        });
        assert!(s.wants_client_data());
        client(&mut s, &"NOOP\r\n".repeat(200));
        assert!(!s.wants_client_data());
        upstream(&mut s, GREETING);
        // One NOOP is out, the rest wait for its reply.
        assert!(!s.wants_client_data());
        for _ in 0..200 {
            upstream(&mut s, "+OK\r\n");
        }
        assert!(s.wants_client_data());
        assert_eq!(s.summary(), "noop=200");
    }

    #[test]
    fn timeouts_say_goodbye() {
        let mut s = greeted();
        s.on_timeout();
        let out = drain(&mut s);
        assert_eq!(out.client, "-ERR Disconnected for inactivity\r\n");
        assert!(out.closed);
        // A silent upstream before its greeting or mid-reply: a temporary failure.
        let mut s = Session::new(config());
        s.on_timeout();
        assert_eq!(drain(&mut s).client, UNAVAILABLE);
        let mut s = greeted();
        client(&mut s, "NOOP\r\n");
        s.on_timeout();
        assert_eq!(drain(&mut s).client, UNAVAILABLE);
    }

    #[test]
    fn client_eof_closes() {
        let mut s = greeted();
        client(&mut s, "NOOP\r\n");
        s.on_client_eof();
        let out = drain(&mut s);
        assert!(out.closed);
        assert_eq!(upstream(&mut s, "+OK\r\n"), Out::default());
    }

    // ---- chunking and hostile input ----

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Client(&'static str),
        Upstream(&'static str),
        TlsUp,
    }

    /// A whole dialogue: refusals, STLS, CAPA both ways, bodies with tricks, a cancelled
    /// AUTH, a login with pipelined commands behind it.
    const DIALOGUE: &[Step] = &[
        Step::Client("CAPA\r\n"),
        Step::Upstream(GREETING),
        Step::Upstream(CAPA_UPSTREAM),
        Step::Client("USER alice\r\nXXXX\r\nPASS secret\r\nNOOP\r\n"),
        Step::Upstream("+OK\r\n"),
        Step::Client("STLS\r\n"),
        Step::TlsUp,
        Step::Client("CAPA\r\nLIST\r\n"),
        Step::Upstream(CAPA_UPSTREAM),
        Step::Upstream("+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
        Step::Client("RETR 1\r\nAUTH PLAIN\r\n"),
        Step::Upstream("+OK\r\n..\r\n+OK\r\n-ERR x\r\n.\rx\n...\r\nlast\r\n.\r\n"),
        Step::Upstream("+ \r\n"),
        Step::Client("*\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n"),
        Step::Upstream("-ERR [AUTH] Authentication aborted\r\n"),
        Step::Upstream("+OK\r\n"),
        Step::Upstream("+OK Logged in.\r\n"),
    ];

    /// Feeds the dialogue, each step cut at `cuts` (fractions of its length), and
    /// returns everything the session did, concatenated.
    fn run_dialogue(cuts: &[f64]) -> Out {
        let mut s = Session::new(config());
        let mut total = Out::default();
        let mut cuts = cuts.iter().cycle();
        for step in DIALOGUE {
            let (bytes, to_client) = match *step {
                Step::Client(b) => (b.as_bytes(), true),
                Step::Upstream(b) => (b.as_bytes(), false),
                Step::TlsUp => {
                    s.on_tls_established();
                    continue;
                }
            };
            let mut points: Vec<usize> = (0..3)
                .map(|_| (cuts.next().copied().unwrap_or(0.0) * bytes.len() as f64) as usize)
                .collect();
            points.sort_unstable();
            let mut start = 0;
            for end in points.into_iter().chain(std::iter::once(bytes.len())) {
                let end = end.clamp(start, bytes.len());
                if to_client {
                    s.on_client_data(&bytes[start..end]);
                } else {
                    s.on_upstream_data(&bytes[start..end]);
                }
                start = end;
                let out = drain(&mut s);
                total.client.push_str(&out.client);
                total.upstream.push_str(&out.upstream);
                total.events.extend(out.events);
                if let Some(early) = out.starttls {
                    total.starttls.get_or_insert_with(Vec::new).extend(early);
                }
                total.relay |= out.relay;
                total.closed |= out.closed;
            }
        }
        total
    }

    #[test]
    fn the_dialogue_gives_the_expected_transcript() {
        let out = run_dialogue(&[1.0]);
        assert_eq!(
            out.client,
            format!(
                "{GREETING}{CAPA_BEFORE_TLS}{AUTH_REFUSED}{NOT_BEFORE_STLS}{AUTH_REFUSED}+OK\r\n\
+OK Begin TLS negotiation\r\n{CAPA_AFTER_TLS}+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n\
+OK\r\n..\r\n+OK\r\n-ERR x\r\n.\rx\n...\r\nlast\r\n.\r\n+ \r\n\
-ERR [AUTH] Authentication aborted\r\n+OK\r\n+OK Logged in.\r\n"
            )
        );
        assert_eq!(
            out.upstream,
            "CAPA\r\nNOOP\r\nCAPA\r\nLIST\r\nRETR 1\r\nAUTH PLAIN\r\n*\r\nUSER alice\r\n\
PASS secret\r\nSTAT\r\n"
        );
        assert_eq!(
            names(&out.events),
            vec![
                "starttls_stripping_suspected",
                "plaintext_command_refused",
                "starttls_stripping_suspected",
                "plaintext_command_refused",
                "starttls_stripping_suspected",
                "credentials_exposed",
                "plaintext_command_refused",
            ]
        );
        assert_eq!(out.starttls, Some(vec![]));
        assert!(out.relay);
        assert!(!out.closed);
    }

    /// What hostile streams are made of.
    const TOKENS: &[&[u8]] = &[
        b"STLS",
        b"USER a",
        b"PASS p",
        b"CAPA",
        b"NOOP",
        b"QUIT",
        b"AUTH PLAIN",
        b"RETR 1",
        b"LIST",
        b"+OK",
        b"-ERR",
        b"+ ",
        b".",
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"\x16\x03",
        b"\0",
        b"STLS\r\nUSER x\r\n",
    ];

    proptest! {
        /// Any chunking of the same client and upstream streams gives the same bytes
        /// both ways and the same events.
        #[test]
        fn chunking_does_not_change_the_outcome(
            cuts in proptest::collection::vec(0.0f64..=1.0, 1..64),
        ) {
            prop_assert_eq!(run_dialogue(&cuts), run_dialogue(&[1.0]));
        }

        /// Hostile bytes from either side never panic, and before TLS nothing but the
        /// upgrade dialogue ever reaches the upstream.
        #[test]
        fn hostile_input_never_panics_or_leaks_commands_before_tls(
            inputs in proptest::collection::vec(
                (0u8..4, proptest::collection::vec(proptest::sample::select(TOKENS), 0..12)),
                0..40,
            ),
        ) {
            let mut s = Session::new(Config { max_line_len: 64, max_held_bytes: 128, ..config() });
            let mut tls = false;
            let mut handshake = false;
            for (side, tokens) in inputs {
                let bytes = tokens.concat();
                match side {
                    0 | 1 => s.on_client_data(&bytes),
                    2 => s.on_upstream_data(&bytes),
                    _ if handshake => {
                        s.on_tls_established();
                        tls = true;
                        handshake = false;
                    }
                    _ => s.on_timeout(),
                }
                let _ = s.phase();
                let _ = s.wants_client_data();
                while let Some(action) = s.next_action() {
                    match action {
                        Action::ToUpstream(bytes) if !tls => {
                            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                                let upper = line.to_ascii_uppercase();
                                prop_assert!(
                                    ["CAPA", "NOOP", "QUIT"].iter().any(|k| upper.starts_with(k.as_bytes())),
                                    "{:?} forwarded before TLS", String::from_utf8_lossy(line)
                                );
                            }
                        }
                        Action::StartTls { .. } => handshake = true,
                        _ => {}
                    }
                }
            }
            let _ = s.summary();
        }
    }
}
