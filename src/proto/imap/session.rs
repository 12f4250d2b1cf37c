//! The IMAP session before login: capabilities rewritten wherever they appear,
//! LOGINDISABLED enforced, STARTTLS owned by the proxy, literals tracked so their octets
//! are never read as commands, and a blind relay once the upstream accepts the login
//! (ARCHITECTURE.md §1-§4, §10).
//!
//! Before login one command is handled at a time: a forwarded command's tagged response
//! is awaited before the next client line is read, so local replies and upstream
//! responses can never cross, and bytes a client pipelines behind LOGIN or AUTHENTICATE
//! are held until the upstream has answered (Courier drops early input, ARCHITECTURE.md §10).

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::{self, Astring, Literal, LoginProgress, Response, Status, Verb};
use crate::policy::{UserHasher, is_channel_binding_mechanism};
use crate::proto::line::Line;
use crate::proto::{Conn, Event, Goodbye, Goodbyes, Limits, Session as _, Tally};

/// Replies the proxy gives itself. Tagged ones follow `TAG`.
mod reply {
    pub const PRIVACY_REQUIRED: &[u8] =
        b" NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";
    pub const NOT_ALLOWED: &[u8] = b" BAD Command not allowed before STARTTLS\r\n";
    pub const ARGUMENTS: &[u8] = b" BAD Unexpected arguments\r\n";
    pub const LITERAL_NOT_ALLOWED: &[u8] = b" BAD Literal not allowed here\r\n";
    pub const CONTROL_CHARACTER: &[u8] = b" BAD Control character in command\r\n";
    pub const BEGIN_TLS: &[u8] = b" OK Begin TLS negotiation now\r\n";
    pub const TLS_ACTIVE: &[u8] = b" BAD TLS is already active\r\n";
    pub const STARTTLS_ARGUMENTS: &[u8] = b" BAD STARTTLS takes no arguments\r\n";
    pub const ID_COMPLETED: &[u8] = b" OK ID completed\r\n";
    pub const ID_NIL: &[u8] = b"* ID NIL\r\n";
    pub const TOO_BIG: &[u8] = b" NO [TOOBIG] Literal too large\r\n";
    pub const TOO_BIG_FATAL: &[u8] = b" BAD [TOOBIG] Literal too large\r\n";
    pub const NON_SYNC_UNSUPPORTED: &[u8] =
        b" BAD Non-synchronizing literals are not supported by this server\r\n";
    pub const MISSING_COMMAND: &[u8] = b" BAD Missing command\r\n";
    pub const BAD_LINE: &[u8] = b"* BAD Invalid tag or command line\r\n";
    pub const PREAUTH: &[u8] =
        b"* BYE [UNAVAILABLE] Server misconfigured: login cannot be required, closing\r\n";
}

/// The replies that end a session, one for each `proto::Goodbye`.
const GOODBYES: Goodbyes = Goodbyes {
    line_too_long: b"* BYE Command line too long\r\n",
    too_many_plaintext: b"* BYE Too many commands before STARTTLS\r\n",
    too_many_errors: b"* BYE Too many invalid commands\r\n",
    upstream_unavailable:
        b"* BYE [UNAVAILABLE] Service temporarily unavailable, closing connection\r\n",
    upstream_broken: b"* BYE [UNAVAILABLE] Upstream protocol error, closing\r\n",
    idle_timeout: b"* BYE Autologout; idle for too long\r\n",
    // RFC 9051 §7.1.5 BYE; RFC 5530 UNAVAILABLE: try again later.
    shutting_down: b"* BYE [UNAVAILABLE] Server shutting down\r\n",
};

/// Longest upstream response line accepted before login.
const MAX_UPSTREAM_LINE_LEN: usize = 64 * 1024;
/// RFC 7888 §3: LITERAL- allows non-synchronising literals up to 4096 octets.
const LITERAL_MINUS_MAX: u64 = 4096;

/// How a session is set up, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most octets of a command's literals before login.
    pub max_literal_len: u64,
    /// The bounds every protocol shares.
    pub limits: Limits,
    /// Hashes user names for `credentials_exposed`.
    pub user_hasher: UserHasher,
}

/// The command being read from the client or awaited from the upstream.
#[derive(Debug)]
struct Command {
    tag: Bytes,
    verb: Verb,
    /// `None`: forwarded. `Some(reply)`: answered by the proxy once the client has sent
    /// the whole command (or at once, when the client waits for a `+` that never comes).
    local_reply: Option<Bytes>,
    /// Some of it already went to the upstream.
    forwarded: bool,
    /// A refused LOGIN whose user name was a literal: the password may still arrive.
    password_may_follow: bool,
    /// Where a forwarded LOGIN stands: its literals are honoured only where its
    /// grammar has an astring.
    login: LoginProgress,
    /// Octets of all the command's literals so far: the bound is per command.
    literal_octets: u64,
}

/// What the session is doing (the handshake, the relay, the close: [`Stage`]).
#[derive(Debug)]
enum Mode {
    /// Waiting for the upstream's greeting; nothing from the client is read.
    Greeting,
    /// Ready for the next command.
    Command,
    /// The next client line continues `Command` after one of its literals.
    Continuation(Command),
    /// `remaining` literal octets of the command come from the client: forwarded, or
    /// dropped when the command is answered locally.
    Literal { command: Command, remaining: u64 },
    /// A forwarded line ended in a synchronising literal: the upstream's `+` is awaited
    /// before the client may send the octets.
    AwaitContinuation { command: Command, len: u64 },
    /// A whole command was forwarded; its tagged response is awaited.
    AwaitResponse(Command),
    /// AUTHENTICATE: the upstream sent a challenge; the next client line is SASL data.
    SaslResponse(Command),
    /// The stage is no longer open: nothing more is read.
    Done,
}

/// The sans-I/O IMAP session.
#[derive(Debug)]
pub struct Session {
    conn: Conn,
    max_literal_len: u64,
    mode: Mode,
    /// Octets of a literal inside the current upstream response still to relay.
    upstream_literal: u64,
    /// The next upstream line continues a response after its literal.
    upstream_continues: bool,
    /// The upstream advertised LITERAL+ / LITERAL- (RFC 7888).
    literal_plus: bool,
    literal_minus: bool,
}

fn tally_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Capability => "capability",
        Verb::Noop => "noop",
        Verb::Logout => "logout",
        Verb::StartTls => "starttls",
        Verb::Id => "id",
        Verb::Login => "login",
        Verb::Authenticate => "authenticate",
        Verb::Other => "other",
    }
}

/// A literal in a forwarded command is honoured only where the proxy is certain of its
/// place in the grammar: LOGIN's user id and password (RFC 9051 §9 `astring`). Before
/// TLS no command with a literal is forwarded at all.
fn literal_due(command: &Command) -> bool {
    command.verb == Verb::Login
        && matches!(
            command.login,
            LoginProgress::UserLiteral | LoginProgress::PasswordLiteral
        )
}

fn tagged(tag: &[u8], text: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(tag.len() + text.len());
    out.put_slice(tag);
    out.put_slice(text);
    out.freeze()
}

impl Session {
    /// A session for a new connection, TLS off (implicit-TLS listeners call
    /// `on_tls_established` before the greeting arrives).
    pub fn new(config: Config) -> Self {
        let tally = Tally::new(
            &[
                "capability",
                "id",
                "starttls",
                "login",
                "authenticate",
                "noop",
                "logout",
                "other",
            ],
            &["starttls", "login", "authenticate"],
        );
        Session {
            conn: Conn::new(
                config.limits,
                config.user_hasher,
                MAX_UPSTREAM_LINE_LEN,
                tally,
            ),
            max_literal_len: config.max_literal_len,
            mode: Mode::Greeting,
            upstream_literal: 0,
            upstream_continues: false,
            literal_plus: false,
            literal_minus: false,
        }
    }

    /// An error reply of the proxy's own; past `max_errors` of them the session ends.
    fn reply_error(&mut self, reply: &[u8]) -> Mode {
        self.conn.send_client(reply);
        self.count_error();
        Mode::Command
    }

    /// Replies (where a reply can reach the client), closes.
    fn close_with(&mut self, reply: &[u8]) -> Mode {
        self.conn.close_with(reply);
        Mode::Done
    }

    // ---- client side ----

    fn on_command_line(&mut self, line: Line) -> Mode {
        if self.plaintext_budget_spent() {
            return Mode::Done;
        }
        let start = match parse::command_start(&line.text) {
            Ok(start) => start,
            Err(parse::Error::MissingCommand) => {
                let tag = line.text.split(|&b| b == b' ').next().unwrap_or_default();
                return self.reply_error(&tagged(tag, reply::MISSING_COMMAND));
            }
            Err(_) => return self.reply_error(reply::BAD_LINE),
        };
        let tag = line.text.slice_ref(start.tag);
        let literal = parse::trailing_literal(&line.text);
        if start.verb == Verb::StartTls {
            return self.on_starttls(tag, start.args.is_empty());
        }
        let mut command = Command {
            tag,
            verb: start.verb,
            local_reply: None,
            forwarded: false,
            password_may_follow: false,
            login: LoginProgress::Start,
            literal_octets: 0,
        };
        if !self.conn.tls_active {
            command.local_reply = match start.verb {
                // ARCHITECTURE.md §3, canonical forwarding: these take no arguments, and only the
                // proxy's own `TAG VERB` reaches the upstream. A literal, an argument or
                // anything else on the line is refused here, whatever the upstream's
                // parser would make of it (Dovecot reads `NOOP ~{n+}` as a parse error
                // and the literal's octets as commands).
                Verb::Capability | Verb::Noop | Verb::Logout if start.args.is_empty() => None,
                Verb::Capability | Verb::Noop | Verb::Logout => {
                    self.conn.event(Event::PlaintextCommandRefused {
                        verb: start.verb.label(),
                    });
                    Some(tagged(&command.tag, reply::ARGUMENTS))
                }
                // RFC 2971: answered by the proxy, so nothing about the client reaches
                // the upstream before TLS.
                Verb::Id => Some(self.id_reply(&command.tag)),
                Verb::Login | Verb::Authenticate => {
                    self.conn.event(Event::PlaintextCommandRefused {
                        verb: start.verb.label(),
                    });
                    self.conn.note_login_before_tls();
                    if start.verb == Verb::Login {
                        command.password_may_follow = self.note_plaintext_login(start.args);
                    } else {
                        self.note_plaintext_authenticate(start.args);
                    }
                    Some(tagged(&command.tag, reply::PRIVACY_REQUIRED))
                }
                Verb::Other | Verb::StartTls => {
                    self.conn.note_mangled_upgrade(start.name, b"STARTTLS");
                    self.conn
                        .event(Event::PlaintextCommandRefused { verb: "unknown" });
                    Some(tagged(&command.tag, reply::NOT_ALLOWED))
                }
            };
        }
        self.command_part(command, &line, start.args, literal)
    }

    fn on_continuation_line(&mut self, mut command: Command, line: Line) -> Mode {
        if command.password_may_follow {
            // The user name was a literal; what follows it is the password.
            command.password_may_follow = false;
            let args = parse::login_args(line.text.trim_ascii_start());
            if matches!(
                args.user,
                Some(Astring::Inline(_)) | Some(Astring::Literal(Literal { non_sync: true, .. }))
            ) {
                self.conn.credentials_exposed("LOGIN".into(), None);
            }
        }
        let literal = parse::trailing_literal(&line.text);
        self.command_part(command, &line, &line.text, literal)
    }

    /// One line of a command (the first, or one after a literal), ending in `literal`.
    /// `text` is what the command's grammar reads on this line: the first line's
    /// arguments, or a continuation line whole.
    fn command_part(
        &mut self,
        mut command: Command,
        line: &Line,
        text: &[u8],
        literal: Option<Literal>,
    ) -> Mode {
        if command.local_reply.is_none()
            && text.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            // As on a first line (`parse::command_start`): implementations split such
            // lines differently.
            if command.forwarded {
                return self.close_with(&tagged(&command.tag, reply::CONTROL_CHARACTER));
            }
            command.local_reply = Some(tagged(&command.tag, reply::CONTROL_CHARACTER));
        }
        if command.local_reply.is_none() && command.verb == Verb::Login {
            command.login = parse::login_line(command.login, text);
        }
        if command.local_reply.is_none() && literal.is_some() && !literal_due(&command) {
            // ARCHITECTURE.md §3: a literal is honoured only where the proxy is certain the
            // upstream reads one too; elsewhere the upstream might read its octets as
            // commands.
            if command.forwarded {
                // The upstream holds half a command: nothing can be resynchronised.
                return self.close_with(&tagged(&command.tag, reply::LITERAL_NOT_ALLOWED));
            }
            command.local_reply = Some(tagged(&command.tag, reply::LITERAL_NOT_ALLOWED));
        }
        // The bound holds for the whole command, not each literal: chained literals
        // would pass megabytes otherwise.
        let too_big = literal
            .is_some_and(|l| command.literal_octets.saturating_add(l.len) > self.max_literal_len);
        if let Some(l) = literal {
            command.literal_octets = command.literal_octets.saturating_add(l.len);
        }
        match (command.local_reply.is_some(), literal) {
            (true, None)
            | (
                true,
                Some(Literal {
                    non_sync: false, ..
                }),
            ) => {
                // The client waits for a `+` before sending a synchronising literal: the
                // refusal comes first, so the octets (a password) are never sent.
                self.finish_local(command)
            }
            (
                false,
                Some(Literal {
                    non_sync: false, ..
                }),
            ) if too_big && !command.forwarded => {
                // ARCHITECTURE.md §9: refused before the `+`, so the octets are never sent.
                self.conn.event(Event::LimitExceeded {
                    limit: "literal_size",
                });
                self.conn.tally.record(tally_name(command.verb), false);
                self.reply_error(&tagged(&command.tag, reply::TOO_BIG))
            }
            (_, Some(_)) if too_big => {
                // The octets are on their way (or the upstream holds half a command):
                // nothing can be resynchronised (RFC 7888 §4 allows closing).
                self.conn.event(Event::LimitExceeded {
                    limit: "literal_size",
                });
                self.close_with(&tagged(&command.tag, reply::TOO_BIG_FATAL))
            }
            (true, Some(Literal { len, .. })) => Mode::Literal {
                command,
                remaining: len,
            },
            (false, None) => {
                self.forward_command_line(&command, line);
                command.forwarded = true;
                Mode::AwaitResponse(command)
            }
            (
                false,
                Some(Literal {
                    len,
                    non_sync: false,
                }),
            ) => {
                self.conn.send_upstream_line(&[&line.text]);
                command.forwarded = true;
                Mode::AwaitContinuation { command, len }
            }
            (
                false,
                Some(Literal {
                    len,
                    non_sync: true,
                }),
            ) => {
                let allowed = self.literal_plus || (self.literal_minus && len <= LITERAL_MINUS_MAX);
                if allowed {
                    self.conn.send_upstream_line(&[&line.text]);
                    command.forwarded = true;
                    Mode::Literal {
                        command,
                        remaining: len,
                    }
                } else if !command.forwarded {
                    // ARCHITECTURE.md §2: honoured only if the upstream advertised it. The octets
                    // follow at once; read and drop them, then refuse.
                    command.local_reply = Some(tagged(&command.tag, reply::NON_SYNC_UNSUPPORTED));
                    Mode::Literal {
                        command,
                        remaining: len,
                    }
                } else {
                    self.close_with(&tagged(&command.tag, reply::NON_SYNC_UNSUPPORTED))
                }
            }
        }
    }

    /// The last line of a forwarded command. Before TLS only the proxy's own words go:
    /// `TAG VERB` for a verb that takes no arguments (ARCHITECTURE.md §3, canonical forwarding).
    fn forward_command_line(&mut self, command: &Command, line: &Line) {
        if self.conn.tls_active {
            return self.conn.send_upstream_line(&[&line.text]);
        }
        let verb = command.verb.label().as_bytes();
        self.conn.send_upstream_line(&[&command.tag, b" ", verb]);
    }

    /// A command answered by the proxy: its reply, counted as an error unless it was ID.
    fn finish_local(&mut self, command: Command) -> Mode {
        let accepted = command.verb == Verb::Id;
        self.conn.tally.record(tally_name(command.verb), accepted);
        match command.local_reply {
            Some(reply) if !accepted => self.reply_error(&reply),
            Some(reply) => {
                self.conn.send_client(&reply);
                Mode::Command
            }
            None => Mode::Command,
        }
    }

    fn id_reply(&self, tag: &[u8]) -> Bytes {
        let mut out = BytesMut::from(reply::ID_NIL);
        out.put_slice(tag);
        out.put_slice(reply::ID_COMPLETED);
        out.freeze()
    }

    /// A LOGIN before TLS: a password that arrived is exposed. Returns whether the
    /// password may still follow (the user name was a non-synchronising literal).
    fn note_plaintext_login(&mut self, args: &[u8]) -> bool {
        let login = parse::login_args(args);
        let exposed = matches!(
            login.password,
            Some(Astring::Inline(_)) | Some(Astring::Literal(Literal { non_sync: true, .. }))
        );
        if exposed {
            let user = match &login.user {
                Some(Astring::Inline(user)) => Some(user.as_bytes()),
                _ => None,
            };
            self.conn.credentials_exposed("LOGIN".into(), user);
        }
        matches!(
            login.user,
            Some(Astring::Literal(Literal { non_sync: true, .. }))
        )
    }

    /// An AUTHENTICATE before TLS with an initial response (RFC 4959): exposed.
    fn note_plaintext_authenticate(&mut self, args: &[u8]) {
        if let Some((mechanism, Some(response))) = parse::authenticate_args(args) {
            self.conn.sasl_exposed("", mechanism, response);
        }
    }

    fn on_starttls(&mut self, tag: Bytes, no_arguments: bool) -> Mode {
        if self.conn.tls_active {
            self.conn.tally.record("starttls", false);
            return self.reply_error(&tagged(&tag, reply::TLS_ACTIVE));
        }
        if !no_arguments {
            self.conn.tally.record("starttls", false);
            return self.reply_error(&tagged(&tag, reply::STARTTLS_ARGUMENTS));
        }
        if !self.conn.upstream_in.is_empty() || self.upstream_literal > 0 || self.upstream_continues
        {
            // Half an unsolicited response would arrive inside TLS (ARCHITECTURE.md §9).
            self.upstream_broken("upstream data pending at STARTTLS");
            return Mode::Done;
        }
        self.conn.tally.record("starttls", true);
        self.conn.send_client(&tagged(&tag, reply::BEGIN_TLS));
        // RFC 9051 §6.2.1 option 1 (ARCHITECTURE.md §4): whatever follows is the TLS
        // handshake.
        let early = self.conn.take_early_bytes();
        self.conn.start_tls(early);
        Mode::Command
    }

    // ---- upstream side ----

    fn on_response(&mut self, line: &Line) {
        let Some(response) = parse::response(&line.text) else {
            return self.upstream_broken("malformed response line");
        };
        let mode = std::mem::replace(&mut self.mode, Mode::Done);
        let next = match (mode, response) {
            (Mode::Greeting, Response::Untagged { rest }) => self.on_greeting(line, rest),
            (Mode::Greeting, _) => {
                self.upstream_broken("greeting is not untagged");
                Mode::Done
            }
            (mode, Response::Untagged { .. }) => {
                self.relay_rewritten(line);
                mode
            }
            (Mode::AwaitContinuation { command, len }, Response::Continuation) => {
                self.conn.send_client(&line.raw);
                Mode::Literal {
                    command,
                    remaining: len,
                }
            }
            (Mode::AwaitResponse(command), Response::Continuation)
                if command.verb == Verb::Authenticate =>
            {
                self.conn.send_client(&line.raw);
                Mode::SaslResponse(command)
            }
            (
                Mode::AwaitResponse(command) | Mode::AwaitContinuation { command, .. },
                Response::Tagged { tag, status, .. },
            ) if tag == &command.tag[..] => {
                self.relay_rewritten(line);
                let accepted = status == Status::Ok;
                self.conn.tally.record(tally_name(command.verb), accepted);
                if accepted && matches!(command.verb, Verb::Login | Verb::Authenticate) {
                    self.conn.go_blind();
                    Mode::Done
                } else if command.verb == Verb::Logout {
                    // RFC 9051 §6.1.3: the upstream closes now; nothing more is owed.
                    self.conn.close();
                    Mode::Done
                } else {
                    Mode::Command
                }
            }
            (mode, _) => {
                // Anything else (a stray continuation, another tag) is the upstream's
                // business with the client: relayed unchanged.
                self.conn.send_client(&line.raw);
                mode
            }
        };
        self.mode = next;
    }

    fn on_greeting(&mut self, line: &Line, rest: &[u8]) -> Mode {
        let word = rest.split(|&b| b == b' ').next().unwrap_or_default();
        if word.eq_ignore_ascii_case(b"OK") {
            self.relay_rewritten(line);
            Mode::Command
        } else if word.eq_ignore_ascii_case(b"PREAUTH") {
            // ARCHITECTURE.md §1.4: the client would be logged in without credentials.
            self.conn.event(Event::UpstreamPreauth);
            self.close_with(reply::PREAUTH)
        } else {
            // `* BYE`: the upstream refuses service; the client hears it.
            self.close_with(&line.raw)
        }
    }

    /// Relays a response line, its capability list rewritten per ARCHITECTURE.md §2 if it has one.
    fn relay_rewritten(&mut self, line: &Line) {
        let Some(span) = parse::capability_span(&line.text) else {
            return self.conn.send_client(&line.raw);
        };
        let rewritten = self.rewrite_capabilities(&line.text[span.clone()]);
        self.conn.send_client(&line.text[..span.start]);
        self.conn.send_client(&rewritten);
        self.conn.send_client(&line.text[span.end..]);
        self.conn.send_client(b"\r\n");
    }

    /// The upstream's capabilities in its order, tokens only removed or appended.
    fn rewrite_capabilities(&mut self, list: &[u8]) -> Vec<u8> {
        let before_tls = !self.conn.tls_active;
        let mut kept: Vec<&[u8]> = Vec::new();
        for token in list.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
            let is = |name: &[u8]| token.eq_ignore_ascii_case(name);
            self.literal_plus |= is(b"LITERAL+");
            self.literal_minus |= is(b"LITERAL-");
            let auth = token.len() > 5 && token[..5].eq_ignore_ascii_case(b"AUTH=");
            let drop = is(b"STARTTLS")
                || is(b"LOGINDISABLED")
                || (auth && (before_tls || is_channel_binding_mechanism(&token[5..])))
                || (before_tls && is(b"SASL-IR"));
            if !drop {
                kept.push(token);
            }
        }
        if before_tls {
            kept.push(b"STARTTLS");
            kept.push(b"LOGINDISABLED");
            self.conn.starttls_offered = true;
        }
        kept.join(&b' ')
    }
}

impl crate::proto::Session for Session {
    fn goodbyes(&self) -> &'static Goodbyes {
        &GOODBYES
    }

    fn client_step(&mut self) -> bool {
        let mode = std::mem::replace(&mut self.mode, Mode::Done);
        let (next, progressed) = match mode {
            Mode::Command => match self.next_client_line() {
                Some(line) => (self.on_command_line(line), true),
                None => (Mode::Command, false),
            },
            Mode::Continuation(command) => match self.next_client_line() {
                Some(line) => (self.on_continuation_line(command, line), true),
                None => (Mode::Continuation(command), false),
            },
            Mode::Literal { command, remaining } if !self.conn.client_in.is_empty() => {
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(self.conn.client_in.len());
                let octets = self.conn.client_in.split_to(n).freeze();
                if command.local_reply.is_none() {
                    self.conn.send_upstream(octets);
                }
                let remaining = remaining - n as u64;
                if remaining == 0 {
                    (Mode::Continuation(command), true)
                } else {
                    (Mode::Literal { command, remaining }, true)
                }
            }
            Mode::SaslResponse(command) => match self.next_client_line() {
                Some(line) => {
                    // RFC 9051 §6.2.2: base64 data or `*`, never a command, and never
                    // bytes an upstream could read as a second line.
                    let response = crate::proto::sasl::response_line(&line.text);
                    self.conn.send_upstream_line(&[response]);
                    (Mode::AwaitResponse(command), true)
                }
                None => (Mode::SaslResponse(command), false),
            },
            other => (other, false),
        };
        self.mode = next;
        progressed
    }

    fn upstream_step(&mut self) -> bool {
        if self.upstream_literal > 0 {
            if self.conn.upstream_in.is_empty() {
                return false;
            }
            let n = usize::try_from(self.upstream_literal)
                .unwrap_or(usize::MAX)
                .min(self.conn.upstream_in.len());
            let octets = self.conn.upstream_in.split_to(n);
            self.conn.send_client(&octets);
            self.upstream_literal -= n as u64;
            self.upstream_continues = self.upstream_literal == 0;
            return true;
        }
        let line = match self.conn.next_upstream_line() {
            Ok(Some(line)) => line,
            Ok(None) => return false,
            Err(_) => {
                self.upstream_broken("response line too long");
                return false;
            }
        };
        let continuing = std::mem::take(&mut self.upstream_continues);
        // Literals belong to untagged data (`* ID (... {7}`); a tagged or continuation
        // line that ends in `{n}` may echo the client's text.
        let literal = parse::trailing_literal(&line.text)
            .filter(|_| continuing || line.text.starts_with(b"* "));
        if continuing {
            self.conn.send_client(&line.raw);
        } else {
            self.on_response(&line);
        }
        match literal {
            Some(Literal { len: 0, .. }) => self.upstream_continues = true,
            Some(literal) => self.upstream_literal = literal.len,
            None => {}
        }
        true
    }

    fn on_upstream_eof(&mut self) {
        self.end(Goodbye::UpstreamUnavailable);
    }

    fn awaiting_greeting(&self) -> bool {
        matches!(self.mode, Mode::Greeting)
    }

    /// `Command`: no command is in flight; an empty buffer: none half read.
    fn at_command_boundary(&self) -> bool {
        matches!(self.mode, Mode::Command) && self.conn.client_in.is_empty()
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
