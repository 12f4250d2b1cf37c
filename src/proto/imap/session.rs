//! The IMAP session before login: capabilities rewritten wherever they appear,
//! LOGINDISABLED enforced, STARTTLS owned by the proxy, literals tracked so their octets
//! are never read as commands, and a blind relay once the upstream accepts the login
//! (DESIGN §1-§4, §10).
//!
//! Before login one command is handled at a time: a forwarded command's tagged response
//! is awaited before the next client line is read, so local replies and upstream
//! responses can never cross, and bytes a client pipelines behind LOGIN or AUTHENTICATE
//! are held until the upstream has answered (Courier drops early input, DESIGN §10).

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::{self, Astring, Literal, LoginProgress, Response, Status, Verb};
use crate::policy::{UserHasher, is_channel_binding_mechanism, is_mangled_upgrade_verb};
use crate::proto::line::{Framer, Line};
use crate::proto::{
    Action, Event, Phase, ReplyBudget, Tally, release_if_empty, release_queue_if_empty,
};

/// Replies the proxy gives itself. Tagged ones follow `TAG`.
mod reply {
    pub const PRIVACY_REQUIRED: &[u8] =
        b" NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";
    pub const NOT_ALLOWED: &[u8] = b" BAD Command not allowed before STARTTLS\r\n";
    pub const ARGUMENTS: &[u8] = b" BAD Unexpected arguments\r\n";
    pub const LITERAL_NOT_ALLOWED: &[u8] = b" BAD Literal not allowed here\r\n";
    pub const CONTROL_CHARACTER: &[u8] = b" BAD Control character in command\r\n";
    pub const TOO_MANY_ERRORS: &[u8] = b"* BYE Too many invalid commands\r\n";
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
    pub const LINE_TOO_LONG: &[u8] = b"* BYE Command line too long\r\n";
    pub const PREAUTH: &[u8] =
        b"* BYE [UNAVAILABLE] Server misconfigured: login cannot be required, closing\r\n";
    pub const UPSTREAM_UNAVAILABLE: &[u8] =
        b"* BYE [UNAVAILABLE] Service temporarily unavailable, closing connection\r\n";
    pub const UPSTREAM_BROKEN: &[u8] = b"* BYE [UNAVAILABLE] Upstream protocol error, closing\r\n";
    pub const IDLE_TIMEOUT: &[u8] = b"* BYE Autologout; idle for too long\r\n";
    /// RFC 9051 §7.1.5 BYE; RFC 5530 UNAVAILABLE: try again later.
    pub const SHUTTING_DOWN: &[u8] = b"* BYE [UNAVAILABLE] Server shutting down\r\n";
    pub const TOO_MANY_PLAINTEXT: &[u8] = b"* BYE Too many commands before STARTTLS\r\n";
}

/// Longest upstream response line accepted before login.
const MAX_UPSTREAM_LINE_LEN: usize = 64 * 1024;
/// RFC 7888 §3: LITERAL- allows non-synchronising literals up to 4096 octets.
const LITERAL_MINUS_MAX: u64 = 4096;

/// How a session is set up, from its listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest client command line, CRLF included.
    pub max_line_len: usize,
    /// Largest literal accepted before login.
    pub max_literal_len: u64,
    /// Most client bytes held unprocessed before the driver stops reading.
    pub max_held_bytes: usize,
    /// Commands accepted before TLS before the connection closes.
    pub max_plaintext_commands: u32,
    /// Error replies the proxy gives itself before it closes the connection.
    pub max_errors: u32,
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

/// What the session is doing.
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
    /// The driver runs the TLS handshake.
    Handshake,
    /// Logged in: the driver relays blindly.
    Relayed,
    /// The session is over.
    Closed,
}

/// The sans-I/O IMAP session.
#[derive(Debug)]
pub struct Session {
    config: Config,
    tls_active: bool,
    mode: Mode,
    client_in: BytesMut,
    client_lines: Framer,
    upstream_in: BytesMut,
    upstream_lines: Framer,
    /// Octets of a literal inside the current upstream response still to relay.
    upstream_literal: u64,
    /// The next upstream line continues a response after its literal.
    upstream_continues: bool,
    /// The upstream advertised LITERAL+ / LITERAL- (RFC 7888).
    literal_plus: bool,
    literal_minus: bool,
    /// The client was shown STARTTLS in a capability list.
    starttls_offered: bool,
    /// Commands read before TLS.
    plaintext_commands: u32,
    /// Error replies given by the proxy itself.
    errors: u32,
    /// Reply bytes not yet written by the driver.
    replies: ReplyBudget,
    actions: std::collections::VecDeque<Action>,
    counters: Tally,
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

fn verb_label(verb: Verb) -> &'static str {
    match verb {
        Verb::Capability => "CAPABILITY",
        Verb::Noop => "NOOP",
        Verb::Logout => "LOGOUT",
        Verb::StartTls => "STARTTLS",
        Verb::Id => "ID",
        Verb::Login => "LOGIN",
        Verb::Authenticate => "AUTHENTICATE",
        Verb::Other => "unknown",
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
        let client_lines = Framer::new(config.max_line_len);
        Session {
            config,
            tls_active: false,
            mode: Mode::Greeting,
            client_in: BytesMut::new(),
            client_lines,
            upstream_in: BytesMut::new(),
            upstream_lines: Framer::new(MAX_UPSTREAM_LINE_LEN),
            upstream_literal: 0,
            upstream_continues: false,
            literal_plus: false,
            literal_minus: false,
            starttls_offered: false,
            plaintext_commands: 0,
            errors: 0,
            replies: ReplyBudget::default(),
            actions: std::collections::VecDeque::new(),
            counters: Tally::new(
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
            ),
        }
    }

    fn send_client(&mut self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        self.replies.queued(bytes.len());
        self.actions.push_back(Action::ToClient(bytes));
    }

    /// An error reply of the proxy's own; past `max_errors` of them the session ends
    /// (a client that only draws errors is probing, as Postfix's hard error limit has it).
    fn reply_error(&mut self, reply: Bytes) -> Mode {
        self.send_client(reply);
        self.errors += 1;
        if self.errors > self.config.max_errors {
            self.event(Event::LimitExceeded { limit: "errors" });
            return self.close_with(reply::TOO_MANY_ERRORS);
        }
        Mode::Command
    }

    fn send_upstream(&mut self, bytes: impl Into<Bytes>) {
        self.actions.push_back(Action::ToUpstream(bytes.into()));
    }

    fn event(&mut self, event: Event) {
        self.replies.event();
        self.actions.push_back(Action::Event(event));
    }

    /// Replies (unless mid-handshake), closes, and returns the closed mode.
    fn close_with(&mut self, reply: &[u8]) -> Mode {
        if !matches!(self.mode, Mode::Handshake) {
            self.send_client(Bytes::copy_from_slice(reply));
        }
        self.actions.push_back(Action::Close);
        Mode::Closed
    }

    fn forward_line(&mut self, line: &Line) {
        let mut out = BytesMut::with_capacity(line.text.len() + 2);
        out.put_slice(&line.text);
        out.put_slice(b"\r\n");
        self.send_upstream(out.freeze());
    }

    // ---- client side ----

    fn process_client(&mut self) {
        loop {
            if self.replies.is_full() {
                // The client has not taken what it was sent: nothing more is read until
                // the driver has written it (`on_output_written`).
                return;
            }
            let mode = std::mem::replace(&mut self.mode, Mode::Closed);
            let (next, progressed) = match mode {
                Mode::Command => match self.next_client_line() {
                    Ok(Some(line)) => (self.on_command_line(line), true),
                    Ok(None) => (Mode::Command, false),
                    Err(mode) => (mode, false),
                },
                Mode::Continuation(command) => match self.next_client_line() {
                    Ok(Some(line)) => (self.on_continuation_line(command, line), true),
                    Ok(None) => (Mode::Continuation(command), false),
                    Err(mode) => (mode, false),
                },
                Mode::Literal { command, remaining } if !self.client_in.is_empty() => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(self.client_in.len());
                    let octets = self.client_in.split_to(n).freeze();
                    if command.local_reply.is_none() {
                        self.send_upstream(octets);
                    }
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        (Mode::Continuation(command), true)
                    } else {
                        (Mode::Literal { command, remaining }, true)
                    }
                }
                Mode::SaslResponse(command) => match self.next_client_line() {
                    Ok(Some(line)) => {
                        // RFC 9051 §6.2.2: base64 data or `*`, never a command, and
                        // never bytes an upstream could read as a second line.
                        let response = crate::proto::sasl::response_line(&line.text);
                        self.send_upstream(Bytes::from([response, b"\r\n"].concat()));
                        (Mode::AwaitResponse(command), true)
                    }
                    Ok(None) => (Mode::SaslResponse(command), false),
                    Err(mode) => (mode, false),
                },
                other => (other, false),
            };
            self.mode = next;
            if !progressed {
                return;
            }
        }
    }

    /// The next client line; on an over-long line, the goodbye and the closed mode.
    fn next_client_line(&mut self) -> Result<Option<Line>, Mode> {
        self.client_lines
            .next_line(&mut self.client_in)
            .map_err(|_| {
                self.client_in.clear();
                self.event(Event::LimitExceeded {
                    limit: "line_length",
                });
                self.close_with(reply::LINE_TOO_LONG)
            })
    }

    fn on_command_line(&mut self, line: Line) -> Mode {
        if !self.tls_active {
            self.plaintext_commands += 1;
            if self.plaintext_commands > self.config.max_plaintext_commands {
                self.event(Event::LimitExceeded {
                    limit: "plaintext_commands",
                });
                return self.close_with(reply::TOO_MANY_PLAINTEXT);
            }
        }
        let start = match parse::command_start(&line.text) {
            Ok(start) => start,
            Err(parse::Error::MissingCommand) => {
                let tag = line.text.split(|&b| b == b' ').next().unwrap_or_default();
                return self.reply_error(tagged(tag, reply::MISSING_COMMAND));
            }
            Err(_) => return self.reply_error(Bytes::from_static(reply::BAD_LINE)),
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
        if !self.tls_active {
            command.local_reply = match start.verb {
                // DESIGN §3, canonical forwarding: these take no arguments, and only the
                // proxy's own `TAG VERB` reaches the upstream. A literal, an argument or
                // anything else on the line is refused here, whatever the upstream's
                // parser would make of it (Dovecot reads `NOOP ~{n+}` as a parse error
                // and the literal's octets as commands).
                Verb::Capability | Verb::Noop | Verb::Logout if start.args.is_empty() => None,
                Verb::Capability | Verb::Noop | Verb::Logout => {
                    self.event(Event::PlaintextCommandRefused {
                        verb: verb_label(start.verb),
                    });
                    Some(tagged(&command.tag, reply::ARGUMENTS))
                }
                // RFC 2971: answered by the proxy, so nothing about the client reaches
                // the upstream before TLS.
                Verb::Id => Some(self.id_reply(&command.tag)),
                Verb::Login | Verb::Authenticate => {
                    self.event(Event::PlaintextCommandRefused {
                        verb: verb_label(start.verb),
                    });
                    if self.starttls_offered {
                        self.event(Event::StarttlsStrippingSuspected {
                            reason: "auth_after_starttls_offered",
                        });
                    }
                    if start.verb == Verb::Login {
                        command.password_may_follow = self.note_plaintext_login(start.args);
                    } else {
                        self.note_plaintext_authenticate(start.args);
                    }
                    Some(tagged(&command.tag, reply::PRIVACY_REQUIRED))
                }
                Verb::Other | Verb::StartTls => {
                    if is_mangled_upgrade_verb(start.name, b"STARTTLS") {
                        self.event(Event::StarttlsStrippingSuspected {
                            reason: "mangled_verb",
                        });
                    }
                    self.event(Event::PlaintextCommandRefused { verb: "unknown" });
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
                self.event(Event::CredentialsExposed {
                    mechanism: "LOGIN".into(),
                    user_hash: None,
                });
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
            // DESIGN §3: a literal is honoured only where the proxy is certain the
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
        let too_big = literal.is_some_and(|l| {
            command.literal_octets.saturating_add(l.len) > self.config.max_literal_len
        });
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
                // DESIGN §9: refused before the `+`, so the octets are never sent.
                self.event(Event::LimitExceeded {
                    limit: "literal_size",
                });
                self.counters.record(tally_name(command.verb), false);
                self.reply_error(tagged(&command.tag, reply::TOO_BIG))
            }
            (_, Some(_)) if too_big => {
                // The octets are on their way (or the upstream holds half a command):
                // nothing can be resynchronised (RFC 7888 §4 allows closing).
                self.event(Event::LimitExceeded {
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
                self.forward_line(line);
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
                    self.forward_line(line);
                    command.forwarded = true;
                    Mode::Literal {
                        command,
                        remaining: len,
                    }
                } else if !command.forwarded {
                    // DESIGN §2: honoured only if the upstream advertised it. The octets
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
    /// `TAG VERB` for a verb that takes no arguments (DESIGN §3, canonical forwarding).
    fn forward_command_line(&mut self, command: &Command, line: &Line) {
        if self.tls_active {
            return self.forward_line(line);
        }
        let verb = verb_label(command.verb).as_bytes();
        let mut out = BytesMut::with_capacity(command.tag.len() + verb.len() + 3);
        out.put_slice(&command.tag);
        out.put_u8(b' ');
        out.put_slice(verb);
        out.put_slice(b"\r\n");
        self.send_upstream(out.freeze());
    }

    /// A command answered by the proxy: its reply, counted as an error unless it was ID.
    fn finish_local(&mut self, command: Command) -> Mode {
        let accepted = command.verb == Verb::Id;
        self.counters.record(tally_name(command.verb), accepted);
        match command.local_reply {
            Some(reply) if !accepted => self.reply_error(reply),
            Some(reply) => {
                self.send_client(reply);
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
        let user_hash = match &login.user {
            Some(Astring::Inline(user)) => Some(self.config.user_hasher.hash(user)),
            _ => None,
        };
        let exposed = matches!(
            login.password,
            Some(Astring::Inline(_)) | Some(Astring::Literal(Literal { non_sync: true, .. }))
        );
        if exposed {
            self.event(Event::CredentialsExposed {
                mechanism: "LOGIN".into(),
                user_hash,
            });
        }
        matches!(
            login.user,
            Some(Astring::Literal(Literal { non_sync: true, .. }))
        )
    }

    /// An AUTHENTICATE before TLS with an initial response (RFC 4959): exposed.
    fn note_plaintext_authenticate(&mut self, args: &[u8]) {
        let Some((mechanism, Some(response))) = parse::authenticate_args(args) else {
            return;
        };
        let user = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            crate::proto::sasl::plain_authcid(response)
        } else {
            None
        };
        let mechanism = crate::proto::sasl::mechanism_label(mechanism);
        self.event(Event::CredentialsExposed {
            mechanism,
            user_hash: user.map(|u| self.config.user_hasher.hash(&u)),
        });
    }

    fn on_starttls(&mut self, tag: Bytes, no_arguments: bool) -> Mode {
        if self.tls_active {
            self.counters.record("starttls", false);
            return self.reply_error(tagged(&tag, reply::TLS_ACTIVE));
        }
        if !no_arguments {
            self.counters.record("starttls", false);
            return self.reply_error(tagged(&tag, reply::STARTTLS_ARGUMENTS));
        }
        if !self.upstream_in.is_empty() || self.upstream_literal > 0 || self.upstream_continues {
            // Half an unsolicited response would arrive inside TLS (DESIGN §9).
            self.event(Event::UpstreamProtocolError {
                detail: "upstream data pending at STARTTLS",
            });
            return self.close_with(reply::UPSTREAM_BROKEN);
        }
        self.counters.record("starttls", true);
        self.send_client(tagged(&tag, reply::BEGIN_TLS));
        // RFC 9051 §6.2.1 option 1 (DESIGN §4): whatever follows is the TLS handshake.
        let early = self.client_in.split().freeze();
        self.client_lines.reset();
        if !early.is_empty() && early[0] != 0x16 {
            self.event(Event::StarttlsInjection { bytes: early.len() });
        }
        self.actions.push_back(Action::StartTls { early });
        Mode::Handshake
    }

    // ---- upstream side ----

    fn process_upstream(&mut self) {
        loop {
            // During the handshake upstream bytes wait; `on_tls_established` refuses them.
            if matches!(self.mode, Mode::Closed | Mode::Relayed | Mode::Handshake) {
                return;
            }
            if self.upstream_literal > 0 {
                if self.upstream_in.is_empty() {
                    return;
                }
                let n = usize::try_from(self.upstream_literal)
                    .unwrap_or(usize::MAX)
                    .min(self.upstream_in.len());
                let octets = self.upstream_in.split_to(n).freeze();
                self.send_client(octets);
                self.upstream_literal -= n as u64;
                self.upstream_continues = self.upstream_literal == 0;
                continue;
            }
            let line = match self.upstream_lines.next_line(&mut self.upstream_in) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(_) => return self.upstream_broken("response line too long"),
            };
            let continuing = std::mem::take(&mut self.upstream_continues);
            // Literals belong to untagged data (`* ID (... {7}`); a tagged or
            // continuation line that ends in `{n}` may echo the client's text.
            let literal = parse::trailing_literal(&line.text)
                .filter(|_| continuing || line.text.starts_with(b"* "));
            if continuing {
                self.send_client(line.raw.clone());
            } else {
                self.on_response(&line);
            }
            match literal {
                Some(Literal { len: 0, .. }) => self.upstream_continues = true,
                Some(literal) => self.upstream_literal = literal.len,
                None => {}
            }
        }
    }

    fn upstream_broken(&mut self, detail: &'static str) {
        self.event(Event::UpstreamProtocolError { detail });
        self.mode = self.close_with(reply::UPSTREAM_BROKEN);
    }

    fn on_response(&mut self, line: &Line) {
        let Some(response) = parse::response(&line.text) else {
            return self.upstream_broken("malformed response line");
        };
        let mode = std::mem::replace(&mut self.mode, Mode::Closed);
        self.mode = match (mode, response) {
            (Mode::Greeting, Response::Untagged { rest }) => self.on_greeting(line, rest),
            (Mode::Greeting, _) => {
                self.event(Event::UpstreamProtocolError {
                    detail: "greeting is not untagged",
                });
                self.close_with(reply::UPSTREAM_BROKEN)
            }
            (mode, Response::Untagged { .. }) => {
                self.relay_rewritten(line);
                mode
            }
            (Mode::AwaitContinuation { command, len }, Response::Continuation) => {
                self.send_client(line.raw.clone());
                Mode::Literal {
                    command,
                    remaining: len,
                }
            }
            (Mode::AwaitResponse(command), Response::Continuation)
                if command.verb == Verb::Authenticate =>
            {
                self.send_client(line.raw.clone());
                Mode::SaslResponse(command)
            }
            (
                Mode::AwaitResponse(command) | Mode::AwaitContinuation { command, .. },
                Response::Tagged { tag, status, .. },
            ) if tag == &command.tag[..] => {
                self.relay_rewritten(line);
                let accepted = status == Status::Ok;
                self.counters.record(tally_name(command.verb), accepted);
                if accepted && matches!(command.verb, Verb::Login | Verb::Authenticate) {
                    self.go_blind()
                } else if command.verb == Verb::Logout {
                    // RFC 9051 §6.1.3: the upstream closes now; nothing more is owed.
                    self.actions.push_back(Action::Close);
                    Mode::Closed
                } else {
                    Mode::Command
                }
            }
            (mode, _) => {
                // Anything else (a stray continuation, another tag) is the upstream's
                // business with the client: relayed unchanged.
                self.send_client(line.raw.clone());
                mode
            }
        };
    }

    fn on_greeting(&mut self, line: &Line, rest: &[u8]) -> Mode {
        let word = rest.split(|&b| b == b' ').next().unwrap_or_default();
        if word.eq_ignore_ascii_case(b"OK") {
            self.relay_rewritten(line);
            Mode::Command
        } else if word.eq_ignore_ascii_case(b"PREAUTH") {
            // DESIGN §1.4: the client would be logged in without credentials.
            self.event(Event::UpstreamPreauth);
            self.close_with(reply::PREAUTH)
        } else {
            // `* BYE`: the upstream refuses service; the client hears it.
            self.send_client(line.raw.clone());
            self.actions.push_back(Action::Close);
            Mode::Closed
        }
    }

    /// After the upstream accepted the login: hand out everything held, then relay.
    fn go_blind(&mut self) -> Mode {
        if !self.client_in.is_empty() {
            let held = self.client_in.split().freeze();
            self.send_upstream(held);
        }
        if !self.upstream_in.is_empty() {
            let rest = self.upstream_in.split().freeze();
            self.send_client(rest);
        }
        self.actions.push_back(Action::Relay);
        Mode::Relayed
    }

    /// Relays a response line, its capability list rewritten per DESIGN §2 if it has one.
    fn relay_rewritten(&mut self, line: &Line) {
        let Some(span) = parse::capability_span(&line.text) else {
            return self.send_client(line.raw.clone());
        };
        let rewritten = self.rewrite_capabilities(&line.text[span.clone()]);
        let mut out = BytesMut::with_capacity(line.text.len() + 32);
        out.put_slice(&line.text[..span.start]);
        out.put_slice(&rewritten);
        out.put_slice(&line.text[span.end..]);
        out.put_slice(b"\r\n");
        self.send_client(out.freeze());
    }

    /// The upstream's capabilities in its order, tokens only removed or appended.
    fn rewrite_capabilities(&mut self, list: &[u8]) -> Vec<u8> {
        let before_tls = !self.tls_active;
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
            self.starttls_offered = true;
        }
        kept.join(&b' ')
    }
}

impl crate::proto::Session for Session {
    fn on_client_data(&mut self, data: &[u8]) {
        if matches!(self.mode, Mode::Closed | Mode::Relayed) {
            return;
        }
        self.client_in.extend_from_slice(data);
        self.process_client();
    }

    fn on_upstream_data(&mut self, data: &[u8]) {
        if matches!(self.mode, Mode::Closed | Mode::Relayed) {
            return;
        }
        self.upstream_in.extend_from_slice(data);
        self.process_upstream();
        self.process_client();
    }

    fn on_client_eof(&mut self) {
        if !matches!(self.mode, Mode::Closed) {
            self.mode = Mode::Closed;
            self.actions.push_back(Action::Close);
        }
    }

    fn on_upstream_eof(&mut self) {
        match self.mode {
            Mode::Closed => {}
            Mode::Handshake => {
                self.mode = Mode::Closed;
                self.actions.push_back(Action::Close);
            }
            _ => self.mode = self.close_with(reply::UPSTREAM_UNAVAILABLE),
        }
    }

    fn on_tls_established(&mut self) {
        self.tls_active = true;
        self.starttls_offered = false;
        // On an implicit-TLS listener this comes before the greeting: the mode stays.
        if matches!(self.mode, Mode::Handshake) {
            self.mode = Mode::Command;
            if !self.upstream_in.is_empty() {
                return self.upstream_broken("upstream spoke during the TLS handshake");
            }
        }
        self.process_client();
    }

    fn on_timeout(&mut self) {
        let reply = match self.mode {
            Mode::Greeting => reply::UPSTREAM_UNAVAILABLE,
            _ => reply::IDLE_TIMEOUT,
        };
        if !matches!(self.mode, Mode::Closed) {
            self.mode = self.close_with(reply);
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
        !matches!(self.mode, Mode::Closed | Mode::Handshake | Mode::Relayed)
            && self.client_in.len() < self.config.max_held_bytes
    }

    fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn release_idle_memory(&mut self) {
        release_if_empty(&mut self.client_in);
        release_if_empty(&mut self.upstream_in);
        release_queue_if_empty(&mut self.actions);
    }

    fn on_output_written(&mut self) -> bool {
        let was_full = self.replies.is_full();
        self.replies.written();
        if was_full && !matches!(self.mode, Mode::Closed | Mode::Relayed) {
            self.process_client();
        }
        !self.actions.is_empty()
    }

    fn close_if_idle(&mut self) -> bool {
        let idle = match self.mode {
            Mode::Greeting => true,
            // `Command`: no command is in flight; an empty buffer: none half read.
            Mode::Command => self.client_in.is_empty(),
            _ => false,
        };
        if idle {
            self.mode = self.close_with(reply::SHUTTING_DOWN);
        }
        idle
    }

    fn summary(&self) -> String {
        self.counters.summary()
    }
}

#[cfg(test)]
mod tests;
