//! The POP3 session: policy before TLS, STLS owned by the proxy, CAPA rewritten,
//! multi-line replies framed by the command that asked for them, and a blind relay once
//! the upstream accepts the login (ARCHITECTURE.md §1-§4, §10).
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
//!   SMTP answers for a HELO-only upstream (ARCHITECTURE.md §2, §9: STLS must not vanish).
//! - Dovecot's `XCLIENT` (which lets a trusted peer such as this proxy claim any client
//!   address) is refused after TLS with `forbidden_command` and removed from CAPA, as in
//!   SMTP (ARCHITECTURE.md §2, §5).
//! - Command lines are forwarded as `keyword [SP args] CRLF`, white space normalised, so
//!   that the upstream sees exactly the arguments the proxy based its framing on; PASS
//!   lines go verbatim, since spaces may be part of the password (RFC 1939 §7).
//! - An unknown command's reply is expected on one line. An upstream that answers some
//!   private extension with a multi-line reply desynchronises: its body lines are then
//!   not status lines, which is an upstream protocol error, and the session closes.

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::{self, Keyword, Status};
use crate::policy::{
    Mechanisms, UserHasher, is_channel_binding_mechanism, without_channel_binding,
};
use crate::proto::line::Line;
use crate::proto::{Conn, Event, Goodbye, Goodbyes, Limits, Session as _, Tally};

/// Replies the proxy gives itself (ARCHITECTURE.md §3, §4, §9).
mod reply {
    pub const AUTH_REQUIRES_TLS: &[u8] =
        b"-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
    pub const NOT_BEFORE_STLS: &[u8] = b"-ERR Command not allowed before STLS\r\n";
    pub const BEGIN_TLS: &[u8] = b"+OK Begin TLS negotiation\r\n";
    pub const TLS_ACTIVE: &[u8] = b"-ERR TLS already active\r\n";
    pub const STLS_ARGUMENTS: &[u8] = b"-ERR Syntax error, STLS takes no arguments\r\n";
    pub const BAD_SYNTAX: &[u8] = b"-ERR Syntax error\r\n";
    pub const FORBIDDEN: &[u8] = b"-ERR Command not allowed\r\n";
    pub const CAPA_FALLBACK: &[u8] = b"+OK Capability list follows\r\nSTLS\r\n.\r\n";
    pub const NO_ARGUMENTS: &[u8] = b"-ERR Syntax error, no arguments allowed before STLS\r\n";
}

/// The replies that end a session, one for each `proto::Goodbye`.
const GOODBYES: Goodbyes = Goodbyes {
    line_too_long: b"-ERR Line too long\r\n",
    too_many_plaintext: b"-ERR Too many commands before STLS\r\n",
    too_many_errors: b"-ERR Too many invalid commands, closing connection\r\n",
    upstream_unavailable: super::UNAVAILABLE,
    upstream_broken: b"-ERR [SYS/TEMP] Upstream protocol error, closing connection\r\n",
    idle_timeout: b"-ERR Disconnected for inactivity\r\n",
    // RFC 3206 SYS/TEMP: a temporary condition, try again later.
    shutting_down: b"-ERR [SYS/TEMP] Server shutting down\r\n",
};

/// Longest upstream status or CAPA line accepted (bodies are streamed, not framed).
const MAX_UPSTREAM_LINE_LEN: usize = 8192;

/// How a session is set up, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bounds every protocol shares.
    pub limits: Limits,
    /// Hashes user names for `credentials_exposed`.
    pub user_hasher: UserHasher,
}

/// What the reading of client bytes is doing (the handshake, the relay, the close:
/// [`Stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the upstream's greeting; nothing from the client is read (ARCHITECTURE.md §10).
    Greeting,
    /// Reading command lines, one at a time.
    Command,
    /// After a `+` continuation: the next client line is SASL data, never a command
    /// (RFC 5034 §4, ARCHITECTURE.md §4).
    SaslResponse,
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
    /// CAPA lines, filtered and extended (ARCHITECTURE.md §2).
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
    conn: Conn,
    mode: Mode,
    owed: Owed,
    /// Keyed hash of the name in a refused plaintext USER, for a PASS that follows.
    plaintext_user: Option<String>,
}

impl Session {
    /// A session for a new connection. TLS starts off; on implicit-TLS listeners the
    /// driver calls `on_tls_established` before the upstream's greeting arrives.
    pub fn new(config: Config) -> Self {
        let tally = Tally::new(&TALLY_ORDER, &["stls", "pass", "apop", "auth"]);
        Session {
            conn: Conn::new(
                config.limits,
                config.user_hasher,
                MAX_UPSTREAM_LINE_LEN,
                tally,
            ),
            mode: Mode::Greeting,
            owed: Owed::Reply(Awaiting::Greeting),
            plaintext_user: None,
        }
    }

    /// A reply of the proxy's own. Nothing is outstanding upstream when a command is
    /// read, so it goes out at once, in order.
    fn reply_local(&mut self, keyword: Keyword, reply: &'static [u8]) {
        let positive = reply.starts_with(b"+");
        self.conn.tally.record(tally_name(keyword), positive);
        self.conn.send_client(reply);
        if !positive {
            self.count_error();
        }
    }

    // ---- client side ----

    fn on_command(&mut self, line: Line) {
        if self.plaintext_budget_spent() {
            return;
        }
        let command = match parse::command(&line.text) {
            Ok(command) => command,
            Err(_) => return self.reply_local(Keyword::Other, reply::BAD_SYNTAX),
        };
        let keyword = command.verb;
        if keyword == Keyword::Stls {
            return self.on_stls(command.args.is_empty());
        }
        if !self.conn.tls_active {
            return self.on_plaintext_command(&command, &line);
        }
        if keyword == Keyword::XClient {
            // The upstream trusts the local link; only the proxy may speak for it.
            self.conn.event(Event::ForbiddenCommand { verb: "XCLIENT" });
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

    /// Before TLS only the upgrade dialogue passes (ARCHITECTURE.md §3): CAPA, QUIT and NOOP are
    /// forwarded in the proxy's own words, STLS is the proxy's, everything else is
    /// answered here.
    fn on_plaintext_command(&mut self, command: &parse::Command<'_>, line: &Line) {
        let keyword = command.verb;
        match keyword {
            Keyword::Capa | Keyword::Quit | Keyword::Noop if !command.args.is_empty() => {
                // ARCHITECTURE.md §3, canonical forwarding: none of them takes an argument, and
                // what an upstream would make of one is its parser's business.
                self.conn.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                self.reply_local(keyword, reply::NO_ARGUMENTS);
            }
            Keyword::Capa => self.forward(command, line, Awaiting::Capa),
            Keyword::Quit => self.forward(command, line, Awaiting::Quit),
            Keyword::Noop => self.forward(command, line, Awaiting::Single(keyword)),
            Keyword::User | Keyword::Pass | Keyword::Apop | Keyword::Auth => {
                self.conn.note_login_before_tls();
                self.note_plaintext_credentials(command);
                self.conn.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                // Refusing USER means a well-behaved client never sends its PASS.
                self.reply_local(keyword, reply::AUTH_REQUIRES_TLS);
            }
            _ => {
                if keyword == Keyword::Other {
                    self.conn.note_mangled_upgrade(command.verb_text, b"STLS");
                }
                self.conn.event(Event::PlaintextCommandRefused {
                    verb: keyword.label(),
                });
                self.reply_local(keyword, reply::NOT_BEFORE_STLS);
            }
        }
    }

    /// A refused login command: if a secret crossed the wire, say so, with a keyed hash
    /// of the user name and never the secret (ARCHITECTURE.md §3).
    fn note_plaintext_credentials(&mut self, command: &parse::Command<'_>) {
        let args = command.args;
        match command.verb {
            Keyword::User if !args.is_empty() => {
                self.plaintext_user = Some(self.conn.user_hash(args));
            }
            Keyword::Pass if !args.is_empty() => {
                self.conn.event(Event::CredentialsExposed {
                    mechanism: "PASS".to_owned(),
                    user_hash: self.plaintext_user.clone(),
                });
            }
            Keyword::Apop => {
                // The digest is MD5(timestamp + secret) (RFC 1939 §7): open to offline
                // guessing once seen.
                if let Ok((name, _digest)) = parse::apop_args(args) {
                    self.conn.credentials_exposed("APOP".to_owned(), Some(name));
                }
            }
            Keyword::Auth => {
                // RFC 5034 §4: an empty initial response (`=`) carries nothing.
                if let Ok((mechanism, Some(response))) = parse::auth_args(args)
                    && response != b"="
                {
                    self.conn.sasl_exposed("AUTH ", mechanism, response);
                }
            }
            _ => {}
        }
    }

    /// RFC 2595 §4: STLS takes no argument; the proxy answers it and never forwards it.
    fn on_stls(&mut self, no_args: bool) {
        if self.conn.tls_active {
            return self.reply_local(Keyword::Stls, reply::TLS_ACTIVE);
        }
        if !no_args {
            // The session stays usable in plaintext (ARCHITECTURE.md §9).
            return self.reply_local(Keyword::Stls, reply::STLS_ARGUMENTS);
        }
        // Commands go one at a time, so every earlier reply is out already; anything
        // still buffered would arrive inside TLS (ARCHITECTURE.md §9).
        if !self.conn.upstream_in.is_empty() {
            return self.upstream_broken("upstream data pending at STLS");
        }
        self.conn.tally.record(tally_name(Keyword::Stls), true);
        self.conn.send_client(reply::BEGIN_TLS);
        // ARCHITECTURE.md §4: whatever the client queued behind STLS is the start of
        // the handshake (it fails there unless it is a ClientHello), never a command.
        let early = self.conn.take_early_bytes();
        self.conn.start_tls(early);
    }

    /// Sends a command upstream as `keyword [SP args] CRLF` and waits for its reply.
    /// Before TLS the keyword is the proxy's own spelling, and there are no arguments.
    fn forward(&mut self, command: &parse::Command<'_>, line: &Line, awaiting: Awaiting) {
        if !self.conn.tls_active {
            self.conn
                .send_upstream_line(&[command.verb.label().as_bytes()]);
        } else if command.verb == Keyword::Pass {
            // RFC 1939 §7: the password may contain (even end in) spaces.
            self.conn.send_upstream_line(&[&line.text]);
        } else if command.args.is_empty() {
            self.conn.send_upstream_line(&[command.verb_text]);
        } else {
            self.conn
                .send_upstream_line(&[command.verb_text, b" ", command.args]);
        }
        self.owed = Owed::Reply(awaiting);
    }

    // ---- upstream side ----

    /// Relays body bytes up to and including the terminating `.` line, as they come:
    /// complete lines, and the start of a long line before its end has arrived.
    fn stream_body(&mut self, mut at_line_start: bool) -> BodyProgress {
        loop {
            if self.conn.upstream_in.is_empty() {
                return BodyProgress::More { at_line_start };
            }
            if at_line_start && self.conn.upstream_in[0] == b'.' {
                // RFC 1939 §3: the body ends with "." CRLF; any other line starting with
                // "." is byte-stuffed content. Liberal: "." LF ends it too (ARCHITECTURE.md §10).
                match &self.conn.upstream_in[..self.conn.upstream_in.len().min(3)] {
                    [b'.'] | [b'.', b'\r'] => return BodyProgress::More { at_line_start },
                    [b'.', b'\n', ..] | [b'.', b'\r', b'\n'] => {
                        let end = if self.conn.upstream_in[1] == b'\n' {
                            2
                        } else {
                            3
                        };
                        let terminator = self.conn.upstream_in.split_to(end);
                        self.conn.stream_to_client(&terminator);
                        self.conn.upstream_lines.reset();
                        return BodyProgress::End;
                    }
                    _ => {}
                }
            }
            let chunk = match memchr::memchr(b'\n', &self.conn.upstream_in) {
                Some(lf) => {
                    at_line_start = true;
                    self.conn.upstream_in.split_to(lf + 1)
                }
                None => {
                    at_line_start = false;
                    self.conn.upstream_in.split()
                }
            };
            self.conn.stream_to_client(&chunk);
        }
    }

    /// A line while nothing is owed: a status line (Dovecot's `-ERR Disconnected for
    /// inactivity.` before it hangs up) is relayed; anything else is a broken upstream.
    fn on_unsolicited(&mut self, line: &Line) {
        match parse::status_line(&line.text) {
            Ok(status) if status.status != Status::Continue => self.conn.send_client(&line.raw),
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
                self.conn.send_client(&line.raw);
                if ok {
                    self.mode = Mode::Command;
                } else {
                    self.conn.close();
                }
            }
            Awaiting::Single(keyword) => {
                self.conn.send_client(&line.raw);
                self.conn.tally.record(tally_name(keyword), ok);
            }
            Awaiting::MultiLine(keyword) => {
                self.conn.send_client(&line.raw);
                if ok {
                    // Counted once the body is complete.
                    self.owed = Owed::Body {
                        keyword,
                        body: Body::Data {
                            at_line_start: true,
                        },
                    };
                } else {
                    self.conn.tally.record(tally_name(keyword), false);
                }
            }
            Awaiting::Capa => {
                if ok {
                    self.conn.send_client(&line.raw);
                    self.owed = Owed::Body {
                        keyword: Keyword::Capa,
                        body: Body::Capa,
                    };
                    return;
                }
                if self.conn.tls_active {
                    self.conn.send_client(&line.raw);
                } else {
                    // An RFC 1939-only upstream: STLS must not vanish (module docs).
                    self.conn.send_client(reply::CAPA_FALLBACK);
                    self.conn.starttls_offered = true;
                }
                self.conn.tally.record(tally_name(Keyword::Capa), false);
            }
            Awaiting::Mechanisms => {
                // A listing, not a login: not counted.
                self.conn.send_client(&line.raw);
                if ok {
                    self.owed = Owed::Body {
                        keyword: Keyword::Auth,
                        body: Body::Mechanisms,
                    };
                }
            }
            Awaiting::Login(keyword) => {
                self.conn.tally.record(tally_name(keyword), ok);
                if ok {
                    return self.go_blind(line);
                }
                self.conn.send_client(&line.raw);
            }
            Awaiting::Auth => match status {
                Status::Continue => {
                    // Relayed unchanged, even a challenge that decodes to a NUL (DESIGN
                    // §10). Counted once, with the final reply of the exchange.
                    self.conn.send_client(&line.raw);
                    self.mode = Mode::SaslResponse;
                }
                Status::Ok => {
                    self.conn.tally.record(tally_name(Keyword::Auth), true);
                    self.go_blind(line);
                }
                Status::Err => {
                    self.conn.tally.record(tally_name(Keyword::Auth), false);
                    self.conn.send_client(&line.raw);
                }
            },
            Awaiting::Quit => {
                self.conn.tally.record(tally_name(Keyword::Quit), ok);
                self.conn.send_client(&line.raw);
                self.conn.close();
            }
        }
    }

    fn on_body_line(&mut self, keyword: Keyword, body: Body, line: &Line) {
        if &line.text[..] == b"." {
            if body == Body::Capa && !self.conn.tls_active {
                // Exactly one STLS, mailmoat's own, last (ARCHITECTURE.md §2, §9).
                self.conn.send_client(b"STLS\r\n");
                self.conn.starttls_offered = true;
            }
            self.conn.send_client(&line.raw);
            self.owed = Owed::Nothing;
            if body != Body::Mechanisms {
                self.conn.tally.record(tally_name(keyword), true);
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
            self.conn.send_client(&kept);
        }
    }

    /// One line of the upstream's CAPA list, rewritten per ARCHITECTURE.md §2: removed, shortened
    /// or kept, never reordered, never de-duplicated.
    fn capa_line(&self, line: &Line) -> Option<Bytes> {
        let capability = parse::capability(&line.text);
        let is = |name: &[u8]| capability.tag.eq_ignore_ascii_case(name);
        // mailmoat owns TLS; only mailmoat may speak for the local link.
        if is(b"STLS") || is(b"XCLIENT") {
            return None;
        }
        // RFC 2595 §4 lets a server hide what needs TLS; ARCHITECTURE.md §3 requires it.
        if !self.conn.tls_active && (is(b"USER") || is(b"SASL")) {
            return None;
        }
        if !self.conn.tls_active && is(b"UTF8") {
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
    /// the driver goes blind (ARCHITECTURE.md §1.7, §10).
    fn go_blind(&mut self, line: &Line) {
        self.conn.send_client(&line.raw);
        self.conn.go_blind();
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
    match without_channel_binding(tag, parse::params(params)) {
        Mechanisms::Unchanged => Some(line.raw.clone()),
        Mechanisms::Without(mut out) => {
            out.put_slice(if line.bare_lf { b"\n" } else { b"\r\n" });
            Some(out.freeze())
        }
        Mechanisms::Empty => None,
    }
}

impl crate::proto::Session for Session {
    fn goodbyes(&self) -> &'static Goodbyes {
        &GOODBYES
    }

    fn client_step(&mut self) -> bool {
        match self.mode {
            Mode::Command if self.owed == Owed::Nothing => match self.next_client_line() {
                Some(line) => {
                    self.on_command(line);
                    true
                }
                None => false,
            },
            Mode::SaslResponse => match self.next_client_line() {
                Some(line) => {
                    // RFC 5034 §4: a SASL response (or `*` to cancel), relayed as is when
                    // it is base64; anything else cancels.
                    self.mode = Mode::Command;
                    let response = crate::proto::sasl::response_line(&line.text);
                    self.conn.send_upstream_line(&[response]);
                    self.owed = Owed::Reply(Awaiting::Auth);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    fn upstream_step(&mut self) -> bool {
        {
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
                        return false;
                    }
                    BodyProgress::End => {
                        self.owed = Owed::Nothing;
                        self.conn.tally.record(tally_name(keyword), true);
                        return true;
                    }
                }
            }
            let line = match self.conn.next_upstream_line() {
                Ok(Some(line)) => line,
                Ok(None) => return false,
                Err(_) => {
                    self.upstream_broken("line too long");
                    return false;
                }
            };
            match self.owed {
                Owed::Nothing => self.on_unsolicited(&line),
                Owed::Reply(awaiting) => self.on_status_line(awaiting, &line),
                Owed::Body { keyword, body } => self.on_body_line(keyword, body, &line),
            }
        }
        true
    }

    fn process_client(&mut self) {
        while self.conn.is_open() && !self.conn.output_full() && self.client_step() {}
    }

    fn on_upstream_eof(&mut self) {
        // Between commands (after the upstream's own -ERR goodbye, say): nothing is
        // owed, nothing to say.
        if self.mode == Mode::Command && self.owed == Owed::Nothing {
            self.conn.close();
        } else {
            self.end(Goodbye::UpstreamUnavailable);
        }
    }

    fn on_timeout(&mut self) {
        // The upstream never greeted, or went quiet mid-reply; or the client is idle.
        if self.mode == Mode::Greeting || self.owed != Owed::Nothing {
            self.end(Goodbye::UpstreamUnavailable);
        } else {
            self.end(Goodbye::IdleTimeout);
        }
    }

    fn awaiting_greeting(&self) -> bool {
        self.mode == Mode::Greeting
    }

    fn at_command_boundary(&self) -> bool {
        self.mode == Mode::Command && self.owed == Owed::Nothing && self.conn.client_in.is_empty()
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
