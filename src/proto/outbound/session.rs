//! The outbound relay's session (ARCHITECTURE.md §11 and "The outbound transaction"):
//! an SMTP server to the legacy MTA (the **client**, which uses mailmoat as its
//! relayhost) and an SMTP client to the recipient domain's **MX**, delivering each
//! transaction live, with no queue of its own.
//!
//! Pure, like every `proto` session: the driver feeds what arrived (client bytes, MX
//! bytes, ends of stream, the outcome of finding an MX and of the TLS handshake, a
//! deadline) and carries out the [`Action`]s, in order. DNS, the DANE/MTA-STS policy,
//! connecting and TLS are the driver's; what to say and when is decided here.
//!
//! One transaction, one MX session:
//! - `EHLO`/`HELO`, `MAIL`, `NOOP`, `RSET`, `HELP`, `VRFY` are answered locally: no MX is
//!   known before the first `RCPT`.
//! - The first `RCPT` fixes the transaction's [`Domain`] and asks the driver for an MX
//!   ([`Action::OpenMx`]); the `RCPT` waits while the session reads the MX's greeting,
//!   says `EHLO`, `STARTTLS` and `EHLO` again, then the transaction's own `MAIL` and this
//!   `RCPT`. Everything that fails before the MX answered this first `RCPT` costs only
//!   this MX ([`Action::NextMx`]); after it the transaction is bound to the MX, and a
//!   failure is a `4xx` to the command that waits.
//! - Later `RCPT`s of the domain are forwarded; another domain's get `452 4.5.3`
//!   (RFC 5321 §4.5.3.1.10), and the legacy MTA sends them in a new transaction. One
//!   DATA reply cannot speak for two MXes.
//! - `DATA` goes to the MX; its `354` and its final reply pass back, the body crosses
//!   [`Body`] (the inbound framing and smuggling defence, ARCHITECTURE.md §5). The end of
//!   a transaction, `RSET`, `EHLO` and `QUIT` end the MX session with `QUIT`.
//!
//! Ordering is simple because the session never pipelines to the MX: while a reply from
//! the MX (or the driver's search for one) is awaited, no client command is read, so the
//! client's pipelined commands (RFC 2920) are answered in order by construction, held up
//! to `max_held_bytes` ([`Session::wants_client_data`]).
//!
//! What crosses (ARCHITECTURE.md, invariants): the MX hears only lines this session
//! writes (its own `EHLO`, `STARTTLS`, `QUIT`, `DATA`, and `envelope`'s `MAIL`/`RCPT`)
//! and body bytes as [`Body`] writes them. The client hears only replies to commands it
//! gave: each MX reply line is checked (RFC 5321 §4.2 grammar, no control characters a
//! legacy reader could split a line at, bounded length and count) and written with CRLF;
//! an MX that speaks out of turn is broken (`451 4.4.0`). Nothing of an MX's is ever
//! answered `250` unless the MX said it.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::envelope::{self, Domain, Extensions, MailRequirements, Refusal};
use crate::proto::conn::release_queue_if_empty;
use crate::proto::line::{Framer, Line};
use crate::proto::smtp::body::{self, Body, Forward, Progress};
use crate::proto::smtp::canonical::{self, Envelope};
use crate::proto::smtp::parse::{self, Verb};
use crate::proto::{Event, Limits, MAX_UNWRITTEN_REPLY_BYTES, Tally};

/// Replies the relay gives itself, to the client.
mod reply {
    pub const OK: &[u8] = b"250 2.0.0 Ok\r\n";
    pub const MAIL_OK: &[u8] = b"250 2.1.0 Ok\r\n";
    pub const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
    pub const HELP: &[u8] =
        b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\r\n";
    /// RFC 5321 §3.5.3: 252 when the relay cannot verify but will try to deliver.
    pub const VRFY: &[u8] = b"252 2.0.0 Cannot VRFY user; send RCPT to attempt delivery\r\n";
    pub const VRFY_SYNTAX: &[u8] = b"501 5.5.4 Syntax: VRFY address\r\n";
    pub const HELO_SYNTAX: &[u8] = b"501 5.5.4 Syntax: EHLO/HELO hostname\r\n";
    pub const NO_PARAMS: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
    pub const BAD_SYNTAX: &[u8] = b"500 5.5.2 Error: bad syntax\r\n";
    pub const UNRECOGNIZED: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
    /// STARTTLS, AUTH, BDAT, EXPN, ETRN, XCLIENT, XFORWARD: not offered on the local link.
    pub const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 Error: command not implemented\r\n";
    pub const HELO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
    pub const NESTED_MAIL: &[u8] = b"503 5.5.1 Error: nested MAIL command\r\n";
    pub const NEED_MAIL: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
    /// RFC 5321 §3.3: DATA with no recipient accepted.
    pub const NO_VALID_RECIPIENTS: &[u8] = b"554 5.5.1 Error: no valid recipients\r\n";
    /// RFC 1870 §6.1 (declared) and §6.3 (sent), RFC 3463 5.3.4.
    pub const TOO_BIG: &[u8] = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n";
    /// RFC 5321 §4.5.3.1.10 semantics: "try this one later, in another transaction".
    pub const OTHER_DOMAIN: &[u8] =
        b"452 4.5.3 One recipient domain per transaction: send this recipient in another\r\n";
    pub const TOO_MANY_RECIPIENTS: &[u8] = b"452 4.5.3 Error: too many recipients\r\n";
    /// RFC 3463 4.4.2: bad connection.
    pub const MX_LOST: &[u8] = b"451 4.4.2 Connection to the recipient's mail server lost\r\n";
    pub const MX_TIMEOUT: &[u8] = b"451 4.4.2 Timeout waiting for the recipient's mail server\r\n";
    /// RFC 3463 4.4.0: other network or routing status.
    pub const MX_BROKEN: &[u8] =
        b"451 4.4.0 The recipient's mail server broke the SMTP protocol\r\n";
    pub const CONTROL_LINE: &[u8] =
        b"554 5.6.0 Error: message line of control characters only, closing connection\r\n";
    pub const CHUNK_TOO_LARGE: &[u8] = b"552 5.3.4 Error: chunk too large, closing connection\r\n";
    pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
    pub const TOO_MANY_ERRORS: &[u8] = b"421 4.7.0 Too many errors, closing connection\r\n";
    pub const TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
    /// RFC 5321 §3.8.
    pub const SHUTTING_DOWN: &[u8] = b"421 4.3.2 Service shutting down, closing connection\r\n";
}

/// The reply when no MX of the domain could be reached (RFC 3463 4.4.1, no answer from
/// host).
pub const MX_UNREACHABLE: &[u8] =
    b"451 4.4.1 No answer from the recipient domain's mail servers\r\n";
/// The reply when every MX failed the domain's TLS policy (DANE, MTA-STS, the floor;
/// ARCHITECTURE.md §11: `4.7.5`, RFC 3463 cryptographic failure).
pub const MX_TLS_POLICY: &[u8] =
    b"451 4.7.5 The recipient domain's mail servers failed its TLS policy\r\n";

/// Longest MX reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5 says 512; real
/// servers write longer texts, and the client gets each line whole).
pub const MAX_MX_LINE_LEN: usize = 2048;
/// Most lines in one MX reply (an EHLO reply has a dozen or two).
pub const MAX_REPLY_LINES: usize = 64;
/// Most recipients of one transaction that the MX is asked about (RFC 5321 §4.5.3.1.8
/// asks for at least 100); past it, `452 4.5.3`.
pub const MAX_RECIPIENTS: u32 = 1000;
/// Largest BDAT chunk skipped: what a 32-bit size field can express.
const MAX_CHUNK_LEN: u64 = u32::MAX as u64;

/// How a session is set up, from the outbound listener's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our name: in the greeting, the EHLO reply, and the EHLO sent to MXes.
    pub hostname: String,
    /// The `SIZE` offered (RFC 1870) and enforced on every body, in octets as the MX
    /// receives them (line ends normalised, dots stuffed, the final `.` line excluded).
    pub max_message_size: u64,
    /// `max_line_len`, `max_held_bytes` and `max_errors` apply as on the inbound side;
    /// `max_plaintext_commands` does not: the local link is plaintext by design, and its
    /// trust is the listener's network.
    pub limits: Limits,
}

/// What the driver must do next, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    ToClient(Bytes),
    /// Write these bytes to the MX.
    ToMx(Bytes),
    /// Find an MX for `domain`: resolve it, apply its DANE / MTA-STS / floor policy,
    /// connect to the first usable candidate; then [`Session::on_mx_connected`], or
    /// [`Session::on_mx_unavailable`] if none can be used.
    OpenMx {
        /// The recipient domain of the transaction.
        domain: Domain,
    },
    /// Run the TLS handshake as a client on the MX connection, with the verifier the
    /// policy names; then [`Session::on_mx_tls`]. Nothing is written to the MX in
    /// plaintext after this.
    StartMxTls,
    /// This MX failed before it accepted anything of the transaction: close it (after
    /// writing what was queued before this, a `QUIT` at most) and connect to the next
    /// candidate ([`Session::on_mx_connected`] again), or, with none left, call
    /// [`Session::on_mx_unavailable`]. `failure` is for TLS-RPT and the driver's
    /// per-MX memory (an MX that offered STARTTLS before and no longer does).
    NextMx {
        /// Why this MX was given up.
        failure: MxFailure,
    },
    /// The session is done with the MX connection (after its `QUIT`, or on a failure):
    /// write what was queued before this, then close it; the driver may first wait
    /// briefly for the `221` (RFC 5321 §4.1.1.10). Nothing more of that connection
    /// reaches the session. Also ends a search for an MX that is under way.
    CloseMx,
    /// Record an event (`telemetry::record`).
    Event(Event),
    /// Close the client connection once everything before this is written. Any MX
    /// connection was closed by a [`Action::CloseMx`] before this.
    Close,
}

/// Whether TLS is a must on an MX, as its domain's policy decided (ARCHITECTURE.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequirement {
    /// DANE, MTA-STS `enforce`, the `encrypt`/`verify` floors: STARTTLS must be offered
    /// and succeed, or the MX is given up ([`MxFailure::StarttlsNotOffered`], ...).
    Required,
    /// RFC 7435 opportunistic TLS: STARTTLS when the MX offers it, plaintext (logged as a
    /// downgrade) when it does not. A STARTTLS the MX refuses, or a handshake that
    /// fails, gives this MX up all the same ([`Action::NextMx`]); whether to retry the
    /// same MX in plaintext is the driver's decision, with [`TlsRequirement::Plaintext`].
    Opportunistic,
    /// No STARTTLS even if offered: only for the driver's plaintext retry of an
    /// opportunistic MX whose STARTTLS failed. Logged as a downgrade.
    Plaintext,
}

/// One MX connection, as the driver made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxAttempt {
    /// The MX host's name as DNS gave it (for events).
    pub host: String,
    /// What the domain's policy asks of this MX.
    pub tls: TlsRequirement,
    /// The policy's name for the events, a fixed name from the driver's code: `dane`,
    /// `mta-sts`, `mta-sts-testing`, `verify`, `encrypt`, `opportunistic`.
    pub policy: &'static str,
}

/// A failed TLS handshake with an MX, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxTlsFailure {
    /// The RFC 8460 §4.3 result type (`validation-failure`, `tlsa-invalid`, ...).
    pub result_type: &'static str,
    /// What went wrong, safe to log (no bytes of the MX's beyond what the verifier
    /// named).
    pub detail: String,
}

/// Why an MX was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxFailure {
    /// Its greeting was not `220` (RFC 5321 §3.1: `554` means no service).
    GreetingRefused {
        /// The greeting's code.
        code: u16,
    },
    /// It refused `EHLO` (4xx), or `EHLO` and then `HELO`.
    HelloRefused {
        /// The last reply's code.
        code: u16,
    },
    /// TLS is required and its EHLO reply offers no STARTTLS.
    StarttlsNotOffered,
    /// It answered STARTTLS with something else than `220` (RFC 3207 §4).
    StarttlsRefused {
        /// The reply's code.
        code: u16,
    },
    /// The TLS handshake failed.
    Tls(MxTlsFailure),
    /// It closed the connection.
    ConnectionLost,
    /// It did not answer before the phase's deadline.
    Timeout,
    /// It broke SMTP: a reply line too long or malformed, too many lines, a code that
    /// changed inside a reply, bytes after a reply or without a command.
    ProtocolError {
        /// What was wrong.
        detail: &'static str,
    },
}

impl MxFailure {
    /// A stable name for logs and the driver.
    pub fn reason(&self) -> &'static str {
        match self {
            MxFailure::GreetingRefused { .. } => "greeting_refused",
            MxFailure::HelloRefused { .. } => "hello_refused",
            MxFailure::StarttlsNotOffered => "starttls_not_offered",
            MxFailure::StarttlsRefused { .. } => "starttls_refused",
            MxFailure::Tls(_) => "tls_failed",
            MxFailure::ConnectionLost => "connection_lost",
            MxFailure::Timeout => "timeout",
            MxFailure::ProtocolError { .. } => "protocol_error",
        }
    }

    /// The RFC 8460 §4.3 result type, for the failures TLS-RPT reports: a missing or
    /// refused STARTTLS is `starttls-not-supported` (§4.3.1), a handshake failure the
    /// driver's type. `None` for failures that are not TLS's.
    pub fn rfc8460_result_type(&self) -> Option<&'static str> {
        match self {
            MxFailure::StarttlsNotOffered | MxFailure::StarttlsRefused { .. } => {
                Some("starttls-not-supported")
            }
            MxFailure::Tls(failure) => Some(failure.result_type),
            _ => None,
        }
    }

    /// A detail for the log line: a reply code, the TLS failure's detail, the protocol
    /// error.
    pub fn detail(&self) -> String {
        match self {
            MxFailure::GreetingRefused { code }
            | MxFailure::HelloRefused { code }
            | MxFailure::StarttlsRefused { code } => format!("reply {code}"),
            MxFailure::Tls(failure) => failure.detail.clone(),
            MxFailure::ProtocolError { detail } => (*detail).to_owned(),
            MxFailure::StarttlsNotOffered | MxFailure::ConnectionLost | MxFailure::Timeout => {
                String::new()
            }
        }
    }
}

/// What became of one message handed to an MX ([`Event::OutboundDelivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The recipient domain, as DNS names it ([`Domain`]).
    pub domain: String,
    /// The MX host, as the driver named it in [`MxAttempt`].
    pub mx: String,
    /// The policy that set the MX's TLS requirement, as the driver named it.
    pub policy: &'static str,
    /// The message crossed inside TLS.
    pub tls: bool,
    /// `delivered` (2xx), `deferred` (4xx), `rejected` (5xx), or `unknown`: no final
    /// reply came (the MX went away or timed out after the end of data, so the legacy
    /// MTA retries, and the MX may have the message twice).
    pub result: &'static str,
    /// The MX's final reply code, if it gave one.
    pub code: Option<u16>,
    /// What the TLS handshake established, filled in by the driver, which ran it (the
    /// session only knows that TLS is up).
    pub tls_detail: Option<TlsDetail>,
}

/// The TLS a delivery crossed, as the driver read it after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDetail {
    /// `TLSv1_3`, `TLSv1_2`.
    pub version: String,
    /// The cipher suite's name.
    pub cipher: String,
    /// A TLSA record matched, or the certificate is PKIX-valid for the MX name.
    pub verified: bool,
    /// The RFC 8460 result type of a check that failed but was only recorded (MTA-STS
    /// `testing`, the floors).
    pub failure: Option<&'static str>,
}

/// A transaction sent to an MX without TLS ([`Event::OutboundPlaintext`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plaintext {
    /// The recipient domain.
    pub domain: String,
    /// The MX host.
    pub mx: String,
    /// The policy that allowed it.
    pub policy: &'static str,
    /// `starttls_not_offered` (opportunistic, the MX's EHLO reply has no STARTTLS) or
    /// `tls_disabled` (the driver's plaintext retry, [`TlsRequirement::Plaintext`]).
    pub reason: &'static str,
}

/// An MX given up ([`Event::OutboundMxFailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxGivenUp {
    /// The recipient domain.
    pub domain: String,
    /// The MX host.
    pub mx: String,
    /// What went wrong.
    pub failure: MxFailure,
}

/// Which deadline runs now; the driver maps each to a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the client's next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    Command,
    /// Inside a message body from the client (§4.5.3.2.7 too).
    Data,
    /// The driver looks for a usable MX ([`Action::OpenMx`], [`Action::NextMx`]).
    MxConnect,
    /// Waiting for an MX reply: greeting, EHLO, STARTTLS, MAIL, RCPT, DATA
    /// (§4.5.3.2.1-4: 5 minutes, 2 for DATA).
    MxReply,
    /// The driver runs the TLS handshake with the MX ([`Action::StartMxTls`]).
    MxHandshake,
    /// Waiting for the MX's reply to the end of data (§4.5.3.2.6: 10 minutes).
    MxFinalReply,
}

impl Phase {
    /// The `limit` of a `limit_exceeded` event when this phase's deadline expires.
    pub fn timeout_limit(self) -> &'static str {
        match self {
            Phase::Command => "idle_timeout",
            Phase::Data => "data_timeout",
            Phase::MxConnect => "mx_connect_timeout",
            Phase::MxReply => "mx_reply_timeout",
            Phase::MxHandshake => "mx_handshake_timeout",
            Phase::MxFinalReply => "mx_final_reply_timeout",
        }
    }
}

/// How the client's bytes are read.
#[derive(Debug)]
enum Mode {
    /// Command lines.
    Command,
    /// A body after the MX's `354`, forwarded; `sent` octets of content so far.
    Body { body: Body, sent: u64 },
    /// A body nobody receives (too big, or the MX went away mid-body): read to its end,
    /// then `reply`. The MX never sees an end of data.
    Discard { body: Body, reply: &'static [u8] },
    /// The chunk of a refused BDAT: data (RFC 3030 §2), read and dropped.
    SkipChunk { remaining: u64 },
}

/// What the MX owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// Nothing: idle in the transaction, or taking a body.
    Nothing,
    Greeting,
    Ehlo,
    /// The EHLO got a 5xx; HELO went in its place (RFC 5321 §4.1.4).
    Helo,
    StartTls,
    /// Not a reply: the driver runs the handshake.
    Handshake,
    Mail,
    Rcpt,
    Data,
    EndOfData,
}

/// The MX connection of the transaction.
#[derive(Debug)]
struct MxConn {
    host: String,
    requirement: TlsRequirement,
    policy: &'static str,
    tls: bool,
    /// What its last EHLO reply offers; forgotten at TLS (RFC 3207 §4.2).
    extensions: Extensions,
    awaiting: Awaiting,
}

#[derive(Debug)]
enum Mx {
    None,
    /// The driver looks for an MX.
    Connecting,
    Up(MxConn),
}

/// One mail transaction (RFC 5321 §3.3), from MAIL to its end.
#[derive(Debug)]
struct Transaction {
    /// MAIL's arguments as the client sent them, already checked.
    mail: Bytes,
    wants: MailRequirements,
    domain: Option<Domain>,
    /// The first RCPT's arguments, until the MX has answered it: a failure until then
    /// costs only the MX.
    first_rcpt: Option<Bytes>,
    /// RCPTs of the domain the MX was, or would have been, asked about.
    recipients: u32,
    /// RCPTs the MX accepted.
    accepted: u32,
    /// The reply every later RCPT gets (and DATA, if a recipient was accepted): no MX
    /// could be used, the MX refused MAIL, or it went away. No second MX is sought.
    closed: Option<Bytes>,
}

/// Summary order, as in Postfix's `disconnect` line.
const TALLY_ORDER: &[&str] = &[
    "ehlo", "helo", "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy", "quit", "unknown",
];

fn tally_name(verb: Verb) -> &'static str {
    match verb {
        Verb::Ehlo => "ehlo",
        Verb::Helo => "helo",
        Verb::Mail => "mail",
        Verb::Rcpt => "rcpt",
        Verb::Data => "data",
        Verb::Bdat => "bdat",
        Verb::Rset => "rset",
        Verb::Noop => "noop",
        Verb::Vrfy => "vrfy",
        Verb::Quit => "quit",
        _ => "unknown",
    }
}

/// What one queued action costs besides its bytes (as `Conn` counts it).
const ACTION_COST: usize = std::mem::size_of::<Action>();

/// The outbound relay's sans-I/O session. See the module documentation.
#[derive(Debug)]
pub struct Session {
    hostname: String,
    max_message_size: u64,
    limits: Limits,
    /// `EHLO` or `HELO` was accepted.
    greeted: bool,
    mode: Mode,
    txn: Option<Transaction>,
    mx: Mx,
    client_in: BytesMut,
    client_lines: Framer,
    mx_in: BytesMut,
    mx_lines: Framer,
    /// Lines of the MX reply being collected.
    reply_lines: Vec<Line>,
    /// Client bytes collected until the next action of another kind: one write per step.
    client_out: BytesMut,
    actions: VecDeque<Action>,
    /// Reply bytes and actions queued since the driver last wrote everything.
    unwritten: usize,
    errors: u32,
    /// False once `Close` is queued.
    open: bool,
    /// The client closed its side; the session ends once nothing is owed.
    client_done: bool,
    tally: Tally,
}

impl Session {
    /// A session for a new connection from the legacy MTA; the `220` greeting is queued.
    pub fn new(config: Config) -> Session {
        let mut session = Session {
            client_lines: Framer::new(config.limits.max_line_len),
            hostname: config.hostname,
            max_message_size: config.max_message_size,
            limits: config.limits,
            greeted: false,
            mode: Mode::Command,
            txn: None,
            mx: Mx::None,
            client_in: BytesMut::new(),
            mx_in: BytesMut::new(),
            mx_lines: Framer::new(MAX_MX_LINE_LEN),
            reply_lines: Vec::new(),
            client_out: BytesMut::new(),
            actions: VecDeque::new(),
            unwritten: 0,
            errors: 0,
            open: true,
            client_done: false,
            tally: Tally::new(TALLY_ORDER, &["rcpt", "data"]),
        };
        let greeting = format!("220 {} ESMTP\r\n", session.hostname);
        session.send_client(greeting.as_bytes());
        session
    }

    // ---- inputs ----

    /// Bytes arrived from the client.
    pub fn on_client_data(&mut self, data: &[u8]) {
        if self.open && !self.client_done {
            self.client_in.extend_from_slice(data);
            self.process_client();
        }
    }

    /// The client closed its side. Mid-body the MX is closed without an end of data, so
    /// no partial message is delivered (ARCHITECTURE.md §9); otherwise the commands
    /// already received are answered, then the session ends.
    pub fn on_client_eof(&mut self) {
        if !self.open {
            return;
        }
        self.client_done = true;
        match self.mode {
            Mode::Command => self.process_client(),
            Mode::Body { .. } | Mode::Discard { .. } | Mode::SkipChunk { .. } => self.close(),
        }
    }

    /// The driver connected to an MX after [`Action::OpenMx`] or [`Action::NextMx`]. The
    /// session waits for its greeting. Ignored at any other time.
    pub fn on_mx_connected(&mut self, mx: MxAttempt) {
        if !self.open || !matches!(self.mx, Mx::Connecting) {
            return;
        }
        self.reset_mx_input();
        self.mx = Mx::Up(MxConn {
            host: mx.host,
            requirement: mx.tls,
            policy: mx.policy,
            tls: false,
            extensions: Extensions::default(),
            awaiting: Awaiting::Greeting,
        });
    }

    /// Bytes arrived from the MX (decrypted, once TLS is up). Ignored while no MX
    /// connection is up or its handshake runs.
    pub fn on_mx_data(&mut self, data: &[u8]) {
        if !self.open {
            return;
        }
        match &self.mx {
            Mx::Up(conn) if conn.awaiting != Awaiting::Handshake => {}
            _ => return,
        }
        self.mx_in.extend_from_slice(data);
        self.process_mx();
        self.process_client();
    }

    /// The MX closed the connection: before it answered the first RCPT the next MX is
    /// tried; after, the waiting command gets `451 4.4.2`.
    pub fn on_mx_eof(&mut self) {
        if self.open && matches!(self.mx, Mx::Up(_)) {
            self.mx_failed(MxFailure::ConnectionLost);
            self.process_client();
        }
    }

    /// The TLS handshake of [`Action::StartMxTls`] ended. On success the session says
    /// EHLO again and forgets what it learnt before (RFC 3207 §4.2); a failure gives
    /// this MX up ([`Action::NextMx`]). Ignored at any other time.
    pub fn on_mx_tls(&mut self, result: Result<(), MxTlsFailure>) {
        let Mx::Up(conn) = &mut self.mx else { return };
        if !self.open || conn.awaiting != Awaiting::Handshake {
            return;
        }
        match result {
            Ok(()) => {
                conn.tls = true;
                conn.extensions = Extensions::default();
                self.send_hello(b"EHLO ", Awaiting::Ehlo);
            }
            // The connection is in no state for a QUIT.
            Err(failure) => self.next_mx(MxFailure::Tls(failure), false),
        }
        self.process_client();
    }

    /// No MX could be used (DNS, policy, connect, every candidate failed): the waiting
    /// RCPT gets `reply` (the plan's failure, [`MX_UNREACHABLE`] or [`MX_TLS_POLICY`], CRLF
    /// included), and so does every later RCPT of the transaction: no second [`Action::OpenMx`] within one transaction. Ignored
    /// unless an MX was asked for.
    pub fn on_mx_unavailable(&mut self, reply: &'static [u8]) {
        if self.open && matches!(self.mx, Mx::Connecting) {
            self.mx = Mx::None;
            self.refuse_first_rcpt(Bytes::from_static(reply));
            self.process_client();
        }
    }

    /// The deadline of the current [`Phase`] passed. A silent client gets `421 4.4.2`
    /// and the session ends (mid-body the MX sees no end of data); a silent MX fails
    /// like a lost one (`451 4.4.2` to the waiting command, or the next MX before the
    /// first RCPT was answered). A timeout while the MX owes the reply to the end of data
    /// is `451 4.4.2` too: the legacy MTA retries, and a duplicate is better than a loss.
    pub fn on_timeout(&mut self) {
        if !self.open {
            return;
        }
        match self.phase() {
            Phase::Command => {
                self.quit_mx();
                self.close_with(reply::TIMEOUT);
            }
            Phase::Data => self.close_with(reply::TIMEOUT),
            Phase::MxConnect => {
                self.drop_mx();
                self.refuse_first_rcpt(Bytes::from_static(reply::MX_TIMEOUT));
            }
            Phase::MxReply | Phase::MxHandshake | Phase::MxFinalReply => {
                self.mx_failed(MxFailure::Timeout)
            }
        }
        self.process_client();
    }

    /// The driver wrote every action handed out so far. A session that stopped reading
    /// the client because too many of its replies were unwritten
    /// ([`MAX_UNWRITTEN_REPLY_BYTES`]) goes on; returns true when that queued actions.
    pub fn on_output_written(&mut self) -> bool {
        let was_full = self.output_full();
        self.unwritten = 0;
        if was_full && self.open {
            self.process_client();
        }
        self.has_output()
    }

    /// The server is shutting down (ARCHITECTURE.md §8). At a command boundary (no reply
    /// owed by the MX, no body or command half read) the session says `421 4.3.2`,
    /// QUITs the MX and closes, and returns true; otherwise false, and the driver asks
    /// again after the next step.
    pub fn close_if_idle(&mut self) -> bool {
        let idle = self.open
            && matches!(self.mode, Mode::Command)
            && !self.waiting()
            && self.client_in.is_empty();
        if idle {
            self.quit_mx();
            self.close_with(reply::SHUTTING_DOWN);
        }
        idle
    }

    // ---- questions ----

    /// Which deadline runs now.
    pub fn phase(&self) -> Phase {
        if matches!(
            self.mode,
            Mode::Body { .. } | Mode::Discard { .. } | Mode::SkipChunk { .. }
        ) {
            return Phase::Data;
        }
        match &self.mx {
            Mx::Connecting => Phase::MxConnect,
            Mx::Up(conn) => match conn.awaiting {
                Awaiting::Nothing => Phase::Command,
                Awaiting::Handshake => Phase::MxHandshake,
                Awaiting::EndOfData => Phase::MxFinalReply,
                _ => Phase::MxReply,
            },
            Mx::None => Phase::Command,
        }
    }

    /// False while the session holds as many unprocessed client bytes as it may (the
    /// pipelining bound: commands wait while the MX owes a reply), and once the session
    /// or the client's side is closed: the driver stops reading the client.
    pub fn wants_client_data(&self) -> bool {
        let limit = self.limits.max_held_bytes.max(self.limits.max_line_len);
        self.open && !self.client_done && self.client_in.len() < limit
    }

    /// The next action, if any.
    pub fn next_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.flush_client();
        }
        self.actions.pop_front()
    }

    /// The Postfix-style summary of the client's commands (`ehlo=1 mail=1 rcpt=2/3 ...`).
    pub fn summary(&self) -> String {
        self.tally.summary()
    }

    /// The driver is about to wait: empty buffers and queues give their memory back.
    pub fn release_idle_memory(&mut self) {
        for buffer in [&mut self.client_in, &mut self.mx_in, &mut self.client_out] {
            if buffer.is_empty() && buffer.capacity() > 0 {
                *buffer = BytesMut::new();
            }
        }
        release_queue_if_empty(&mut self.actions);
        if self.reply_lines.is_empty() {
            self.reply_lines = Vec::new();
        }
    }

    // ---- output ----

    fn send_client(&mut self, bytes: &[u8]) {
        self.unwritten = self.unwritten.saturating_add(bytes.len() + ACTION_COST);
        self.client_out.put_slice(bytes);
    }

    fn send_mx(&mut self, bytes: impl Into<Bytes>) {
        self.push(Action::ToMx(bytes.into()));
    }

    fn event(&mut self, event: Event) {
        self.unwritten = self.unwritten.saturating_add(ACTION_COST);
        self.push(Action::Event(event));
    }

    fn push(&mut self, action: Action) {
        self.flush_client();
        self.actions.push_back(action);
    }

    fn flush_client(&mut self) {
        if !self.client_out.is_empty() {
            let bytes = self.client_out.split().freeze();
            self.actions.push_back(Action::ToClient(bytes));
        }
    }

    fn has_output(&self) -> bool {
        !self.actions.is_empty() || !self.client_out.is_empty()
    }

    fn output_full(&self) -> bool {
        self.unwritten >= MAX_UNWRITTEN_REPLY_BYTES
    }

    /// A reply of the relay's own to `verb`. Protocol errors count against `max_errors`,
    /// as Postfix's `smtpd_hard_error_limit` does; refusals of an envelope the MX would
    /// refuse anyway, and the `452`s of a second domain, do not.
    fn reply(&mut self, verb: Verb, reply: &[u8]) {
        let positive = reply.first().is_some_and(|&b| b < b'4');
        self.tally.record(tally_name(verb), positive);
        self.send_client(reply);
        if [&b"500 "[..], b"501 ", b"502 ", b"503 ", b"555 "]
            .iter()
            .any(|code| reply.starts_with(code))
        {
            self.count_error();
        }
    }

    /// A reply for `verb` that came from the MX (or stands for its absence).
    fn relay(&mut self, verb: Verb, reply: &[u8], positive: bool) {
        self.tally.record(tally_name(verb), positive);
        self.send_client(reply);
    }

    fn count_error(&mut self) {
        self.errors += 1;
        if self.errors > self.limits.max_errors {
            self.event(Event::LimitExceeded { limit: "errors" });
            self.quit_mx();
            self.close_with(reply::TOO_MANY_ERRORS);
        }
    }

    /// The MX closed (without QUIT), the reply, then the close.
    fn close_with(&mut self, reply: &[u8]) {
        self.drop_mx();
        if self.open {
            self.send_client(reply);
        }
        self.close();
    }

    /// Closes the client connection, and the MX's first if one is open (without QUIT:
    /// callers that can say it do so first).
    fn close(&mut self) {
        if self.open {
            self.drop_mx();
            self.open = false;
            self.push(Action::Close);
        }
    }

    // ---- the MX connection ----

    /// True while the MX (or the search for one) owes the waiting client command its
    /// reply: no client command is read meanwhile.
    fn waiting(&self) -> bool {
        match &self.mx {
            Mx::Connecting => true,
            Mx::Up(conn) => conn.awaiting != Awaiting::Nothing,
            Mx::None => false,
        }
    }

    fn reset_mx_input(&mut self) {
        self.mx_in.clear();
        self.mx_lines.reset();
        self.reply_lines.clear();
    }

    /// Closes the MX connection (or ends the search for one) without a word.
    fn drop_mx(&mut self) {
        if !matches!(self.mx, Mx::None) {
            self.mx = Mx::None;
            self.reset_mx_input();
            self.push(Action::CloseMx);
        }
    }

    /// Ends the MX session: `QUIT` if it owes nothing (RFC 5321 §4.1.1.10), then closed.
    fn quit_mx(&mut self) {
        if let Mx::Up(conn) = &self.mx
            && conn.awaiting == Awaiting::Nothing
        {
            self.send_mx(Bytes::from_static(b"QUIT\r\n"));
        }
        self.drop_mx();
    }

    /// The domain and host of the transaction's MX, for events.
    fn mx_names(&self) -> (String, String) {
        let domain = self
            .txn
            .as_ref()
            .and_then(|txn| txn.domain.as_ref())
            .map_or_else(String::new, |domain| domain.as_str().to_owned());
        let host = match &self.mx {
            Mx::Up(conn) => conn.host.clone(),
            _ => String::new(),
        };
        (domain, host)
    }

    /// This MX is given up before it accepted anything: the driver tries the next.
    fn next_mx(&mut self, failure: MxFailure, quit: bool) {
        let (domain, mx) = self.mx_names();
        self.event(Event::OutboundMxFailed(Box::new(MxGivenUp {
            domain,
            mx,
            failure: failure.clone(),
        })));
        if quit {
            self.send_mx(Bytes::from_static(b"QUIT\r\n"));
        }
        self.reset_mx_input();
        self.mx = Mx::Connecting;
        self.push(Action::NextMx { failure });
    }

    /// The MX went away, timed out or broke the protocol. Until it answered the first
    /// RCPT nothing is lost but this MX; after, the transaction is bound to it.
    fn mx_failed(&mut self, failure: MxFailure) {
        let first_rcpt_pending = self
            .txn
            .as_ref()
            .is_some_and(|txn| txn.first_rcpt.is_some());
        if first_rcpt_pending {
            return self.next_mx(failure, false);
        }
        let reply = match failure {
            MxFailure::Timeout => reply::MX_TIMEOUT,
            MxFailure::ConnectionLost => reply::MX_LOST,
            _ => reply::MX_BROKEN,
        };
        self.lose_mx(failure, reply);
    }

    /// The transaction's MX is gone: the command waiting for it gets `reply` (the end of
    /// data included: never a `250` the MX did not give), and so does every later
    /// RCPT and DATA of the transaction.
    fn lose_mx(&mut self, failure: MxFailure, reply: &'static [u8]) {
        let Mx::Up(conn) = &self.mx else { return };
        let awaiting = conn.awaiting;
        let (tls, policy) = (conn.tls, conn.policy);
        let (domain, mx) = self.mx_names();
        self.event(Event::OutboundMxFailed(Box::new(MxGivenUp {
            domain: domain.clone(),
            mx: mx.clone(),
            failure,
        })));
        self.drop_mx();
        let reply_bytes = Bytes::from_static(reply);
        match awaiting {
            Awaiting::EndOfData => {
                self.event(Event::OutboundDelivery(Box::new(Delivery {
                    domain,
                    mx,
                    policy,
                    tls,
                    result: "unknown",
                    code: None,
                    tls_detail: None,
                })));
                self.relay(Verb::Data, reply, false);
                self.txn = None;
                return;
            }
            Awaiting::Rcpt => self.relay(Verb::Rcpt, reply, false),
            Awaiting::Data => self.relay(Verb::Data, reply, false),
            _ => {}
        }
        if let Mode::Body { body, .. } = &mut self.mode {
            // The client is mid-body and reads no reply before its end.
            let body = std::mem::take(body);
            self.mode = Mode::Discard { body, reply };
        }
        if let Some(txn) = &mut self.txn {
            txn.closed = Some(reply_bytes);
        }
    }

    /// The first RCPT's answer, when it is not the MX's reply to it: `reply` goes to it
    /// and to every later RCPT of the transaction.
    fn refuse_first_rcpt(&mut self, reply: Bytes) {
        if let Some(txn) = &mut self.txn {
            txn.first_rcpt = None;
            txn.closed = Some(reply.clone());
        }
        self.relay(Verb::Rcpt, &reply, false);
    }

    fn send_hello(&mut self, verb: &[u8], awaiting: Awaiting) {
        let mut line = BytesMut::with_capacity(self.hostname.len() + 7);
        line.put_slice(verb);
        line.put_slice(self.hostname.as_bytes());
        line.put_slice(b"\r\n");
        self.send_mx(line.freeze());
        self.set_awaiting(awaiting);
    }

    fn set_awaiting(&mut self, awaiting: Awaiting) {
        if let Mx::Up(conn) = &mut self.mx {
            conn.awaiting = awaiting;
        }
    }

    /// Reads what it can of the MX's bytes: whole reply lines, checked, collected into
    /// replies.
    fn process_mx(&mut self) {
        while self.open {
            let awaiting = match &self.mx {
                Mx::Up(conn) if conn.awaiting != Awaiting::Handshake => conn.awaiting,
                _ => return,
            };
            let line = match self.mx_lines.next_line(&mut self.mx_in) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(_) => return self.mx_broken("reply line too long"),
            };
            if awaiting == Awaiting::Nothing {
                // No command outstanding: never relayed, never read as a later reply.
                return self.mx_broken("reply without a command");
            }
            let Some((code, last)) = mx_reply_line(&line.text) else {
                return self.mx_broken("malformed reply line");
            };
            if let Some(first) = self.reply_lines.first()
                && mx_reply_line(&first.text).map(|(code, _)| code) != Some(code)
            {
                return self.mx_broken("reply code changed inside a reply");
            }
            if self.reply_lines.len() == MAX_REPLY_LINES {
                return self.mx_broken("reply has too many lines");
            }
            self.reply_lines.push(line);
            if last {
                if !self.mx_in.is_empty() {
                    // The session never pipelines: bytes behind a reply answer nothing
                    // (and behind a 220 to STARTTLS they would be read as if inside TLS).
                    return self.mx_broken("data after a reply");
                }
                let lines = std::mem::take(&mut self.reply_lines);
                self.on_mx_reply(awaiting, code, &lines);
            }
        }
    }

    fn mx_broken(&mut self, detail: &'static str) {
        self.mx_failed(MxFailure::ProtocolError { detail });
    }

    /// A whole reply from the MX to what it was `awaiting`.
    fn on_mx_reply(&mut self, awaiting: Awaiting, code: u16, lines: &[Line]) {
        self.set_awaiting(Awaiting::Nothing);
        let positive = (200..300).contains(&code);
        match awaiting {
            // RFC 5321 §3.1: only 220 opens a session.
            Awaiting::Greeting if code == 220 => self.send_hello(b"EHLO ", Awaiting::Ehlo),
            Awaiting::Greeting => self.next_mx(MxFailure::GreetingRefused { code }, true),
            Awaiting::Ehlo if positive => {
                let extensions = Extensions::from_ehlo_reply(
                    lines
                        .iter()
                        .map(|line| mx_reply_text(&line.text).unwrap_or_default()),
                );
                if let Mx::Up(conn) = &mut self.mx {
                    conn.extensions = extensions;
                }
                self.after_hello();
            }
            // RFC 5321 §4.1.4: a server that does not know EHLO answers 5xx; HELO then.
            Awaiting::Ehlo if code >= 500 => self.send_hello(b"HELO ", Awaiting::Helo),
            Awaiting::Helo if positive => {
                if let Mx::Up(conn) = &mut self.mx {
                    conn.extensions = Extensions::default();
                }
                self.after_hello();
            }
            Awaiting::Ehlo | Awaiting::Helo => self.next_mx(MxFailure::HelloRefused { code }, true),
            Awaiting::StartTls if code == 220 => {
                // Nothing follows the 220 (checked in `process_mx`): the handshake
                // starts on a clean connection (RFC 3207 §4.2 and §6).
                self.set_awaiting(Awaiting::Handshake);
                self.reset_mx_input();
                self.push(Action::StartMxTls);
            }
            Awaiting::StartTls => self.next_mx(MxFailure::StarttlsRefused { code }, true),
            Awaiting::Mail if positive => self.send_first_rcpt(),
            Awaiting::Mail => {
                // RFC 5321 §3.3: without a transaction no RCPT of it can succeed; the
                // MX's reason is every RCPT's reply.
                self.refuse_first_rcpt(join(lines));
                self.quit_mx();
            }
            Awaiting::Rcpt => {
                if let Some(txn) = &mut self.txn {
                    txn.first_rcpt = None;
                    txn.accepted += u32::from(positive);
                }
                self.relay(Verb::Rcpt, &join(lines), positive);
            }
            Awaiting::Data if code == 354 => {
                // Counted once, with the reply to the end of data.
                self.send_client(&join(lines));
                self.mode = Mode::Body {
                    body: Body::default(),
                    sent: 0,
                };
            }
            Awaiting::Data => self.relay(Verb::Data, &join(lines), false),
            Awaiting::EndOfData => self.on_final_reply(code, lines),
            // `process_mx` reads no reply for these.
            Awaiting::Nothing | Awaiting::Handshake => {}
        }
    }

    /// The MX's EHLO or HELO succeeded: STARTTLS if it can and should be, then MAIL.
    fn after_hello(&mut self) {
        let Mx::Up(conn) = &self.mx else { return };
        if conn.tls {
            return self.send_mail(None);
        }
        match (conn.requirement, conn.extensions.starttls) {
            (TlsRequirement::Required | TlsRequirement::Opportunistic, true) => {
                self.send_mx(Bytes::from_static(b"STARTTLS\r\n"));
                self.set_awaiting(Awaiting::StartTls);
            }
            (TlsRequirement::Required, false) => self.next_mx(MxFailure::StarttlsNotOffered, true),
            (TlsRequirement::Opportunistic, false) => self.send_mail(Some("starttls_not_offered")),
            (TlsRequirement::Plaintext, _) => self.send_mail(Some("tls_disabled")),
        }
    }

    /// The transaction's MAIL, in the words the MX's extensions allow; a message the MX
    /// cannot take as it is (`envelope::mail_line`'s refusal) is the first RCPT's reply.
    /// `plaintext`: why the MX gets it without TLS, logged as a downgrade right before.
    fn send_mail(&mut self, plaintext: Option<&'static str>) {
        let (Some(txn), Mx::Up(conn)) = (&self.txn, &self.mx) else {
            return self.quit_mx();
        };
        let mail = txn.mail.clone();
        let line = canonical::envelope_args(Envelope::Mail, &mail)
            .map_err(|canonical::Refusal(reply)| Refusal(reply))
            .and_then(|args| envelope::mail_line(&args, &txn.wants, &conn.extensions));
        match line {
            Ok(line) => {
                if let (Some(reason), Mx::Up(conn)) = (plaintext, &self.mx) {
                    let policy = conn.policy;
                    let (domain, mx) = self.mx_names();
                    self.event(Event::OutboundPlaintext(Box::new(Plaintext {
                        domain,
                        mx,
                        policy,
                        reason,
                    })));
                }
                self.send_mx(line);
                self.set_awaiting(Awaiting::Mail);
            }
            Err(Refusal(reply)) => {
                self.refuse_first_rcpt(Bytes::from_static(reply));
                self.quit_mx();
            }
        }
    }

    /// The first RCPT, now that the MX took MAIL.
    fn send_first_rcpt(&mut self) {
        let (Some(txn), Mx::Up(conn)) = (&self.txn, &self.mx) else {
            return self.quit_mx();
        };
        let Some(rcpt) = txn.first_rcpt.clone() else {
            return self.quit_mx();
        };
        match canonical::envelope_args(Envelope::Rcpt, &rcpt) {
            Ok(args) => {
                let line = envelope::rcpt_line(&args, &conn.extensions);
                self.send_mx(line);
                self.set_awaiting(Awaiting::Rcpt);
            }
            // Checked when it arrived: not reached.
            Err(canonical::Refusal(reply)) => {
                self.refuse_first_rcpt(Bytes::from_static(reply));
                self.quit_mx();
            }
        }
    }

    /// The MX's reply to the end of data: the client's, verbatim; the transaction and
    /// the MX session end.
    fn on_final_reply(&mut self, code: u16, lines: &[Line]) {
        let (domain, mx) = self.mx_names();
        let (tls, policy) = match &self.mx {
            Mx::Up(conn) => (conn.tls, conn.policy),
            _ => (false, ""),
        };
        let result = match code / 100 {
            2 => "delivered",
            4 => "deferred",
            _ => "rejected",
        };
        self.event(Event::OutboundDelivery(Box::new(Delivery {
            domain,
            mx,
            policy,
            tls,
            result,
            code: Some(code),
            tls_detail: None,
        })));
        self.relay(Verb::Data, &join(lines), (200..300).contains(&code));
        self.quit_mx();
        self.txn = None;
    }

    // ---- the client ----

    /// Reads what it can of the client's bytes; a client that closed its side is done
    /// once nothing is owed and no whole command is left.
    fn process_client(&mut self) {
        while self.open && !self.output_full() && self.client_step() {}
        if self.open
            && self.client_done
            && !self.output_full()
            && !self.waiting()
            && matches!(self.mode, Mode::Command)
        {
            self.quit_mx();
            self.close();
        }
    }

    /// The next piece of the client's bytes; false when nothing more can be read now.
    fn client_step(&mut self) -> bool {
        match &mut self.mode {
            Mode::Command => {
                if self.waiting() {
                    return false;
                }
                match self.client_lines.next_line(&mut self.client_in) {
                    Ok(Some(line)) => {
                        self.on_command(&line);
                        true
                    }
                    Ok(None) => false,
                    Err(_) => {
                        // Nothing can be resynchronised after an over-long line.
                        self.client_in.clear();
                        self.event(Event::LimitExceeded {
                            limit: "line_length",
                        });
                        self.quit_mx();
                        self.close_with(reply::LINE_TOO_LONG);
                        false
                    }
                }
            }
            Mode::SkipChunk { remaining } => {
                if self.client_in.is_empty() {
                    return false;
                }
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(self.client_in.len());
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.mode = Mode::Command;
                }
                self.client_in.advance(n);
                true
            }
            Mode::Body { .. } | Mode::Discard { .. } => {
                if self.client_in.is_empty() {
                    return false;
                }
                self.process_body();
                true
            }
        }
    }

    fn on_command(&mut self, line: &Line) {
        let Ok(command) = parse::command(&line.text) else {
            return self.reply(Verb::Other, reply::BAD_SYNTAX);
        };
        let args = command.args;
        match command.verb {
            Verb::Ehlo | Verb::Helo => self.on_hello(command.verb, args),
            Verb::Mail => self.on_mail(line.text.slice_ref(args)),
            Verb::Rcpt => self.on_rcpt(line.text.slice_ref(args)),
            Verb::Data => self.on_data(args),
            Verb::Rset if !args.is_empty() => self.reply(Verb::Rset, reply::NO_PARAMS),
            Verb::Rset => {
                // The MX session goes too: the next transaction may be another domain's.
                self.end_transaction();
                self.reply(Verb::Rset, reply::OK);
            }
            // RFC 5321 §4.1.1.9: NOOP's argument has no effect.
            Verb::Noop => self.reply(Verb::Noop, reply::OK),
            Verb::Quit => {
                self.reply(Verb::Quit, reply::BYE);
                self.quit_mx();
                self.close();
            }
            Verb::Help => self.reply(Verb::Help, reply::HELP),
            Verb::Vrfy if args.is_empty() => self.reply(Verb::Vrfy, reply::VRFY_SYNTAX),
            Verb::Vrfy => self.reply(Verb::Vrfy, reply::VRFY),
            Verb::Bdat => self.on_bdat(args),
            // Not offered: no STARTTLS, no AUTH on the local link (trust is the
            // listener's network), and nothing a relay without a queue could do.
            Verb::StartTls
            | Verb::Auth
            | Verb::Expn
            | Verb::Etrn
            | Verb::XClient
            | Verb::XForward => self.reply(command.verb, reply::NOT_IMPLEMENTED),
            Verb::Other => self.reply(Verb::Other, reply::UNRECOGNIZED),
        }
    }

    /// EHLO and HELO reset the transaction as RSET does (RFC 5321 §4.1.4).
    fn on_hello(&mut self, verb: Verb, args: &[u8]) {
        if canonical::domain_or_literal(args).is_none() {
            return self.reply(verb, reply::HELO_SYNTAX);
        }
        self.end_transaction();
        self.greeted = true;
        let reply = if verb == Verb::Ehlo {
            format!(
                "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                 250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n",
                self.hostname, self.max_message_size
            )
        } else {
            format!("250 {}\r\n", self.hostname)
        };
        self.reply(verb, reply.as_bytes());
    }

    /// MAIL is answered here: no MX is known before the first RCPT.
    fn on_mail(&mut self, args: Bytes) {
        if !self.greeted {
            return self.reply(Verb::Mail, reply::HELO_FIRST);
        }
        if self.txn.is_some() {
            return self.reply(Verb::Mail, reply::NESTED_MAIL);
        }
        let wants = match canonical::envelope_args(Envelope::Mail, &args) {
            Ok(parsed) => match envelope::mail_requirements(&parsed) {
                Ok(wants) => wants,
                Err(Refusal(reply)) => return self.reply(Verb::Mail, reply),
            },
            Err(canonical::Refusal(reply)) => return self.reply(Verb::Mail, reply),
        };
        if wants.size.is_some_and(|size| size > self.max_message_size) {
            return self.reply(Verb::Mail, reply::TOO_BIG);
        }
        self.txn = Some(Transaction {
            mail: args,
            wants,
            domain: None,
            first_rcpt: None,
            recipients: 0,
            accepted: 0,
            closed: None,
        });
        self.reply(Verb::Mail, reply::MAIL_OK);
    }

    fn on_rcpt(&mut self, args: Bytes) {
        if self.txn.is_none() {
            return self.reply(Verb::Rcpt, reply::NEED_MAIL);
        }
        let parsed = match canonical::envelope_args(Envelope::Rcpt, &args) {
            Ok(parsed) => parsed,
            Err(canonical::Refusal(reply)) => return self.reply(Verb::Rcpt, reply),
        };
        let domain = envelope::check_rcpt_params(&parsed)
            .and_then(|()| envelope::recipient_domain(parsed.address));
        let domain = match domain {
            Ok(domain) => domain,
            Err(Refusal(reply)) => return self.reply(Verb::Rcpt, reply),
        };
        let Some(txn) = &mut self.txn else { return };
        if txn.domain.as_ref().is_some_and(|fixed| *fixed != domain) {
            return self.reply(Verb::Rcpt, reply::OTHER_DOMAIN);
        }
        if txn.recipients >= MAX_RECIPIENTS {
            self.event(Event::LimitExceeded {
                limit: "recipients",
            });
            return self.reply(Verb::Rcpt, reply::TOO_MANY_RECIPIENTS);
        }
        txn.recipients += 1;
        if txn.domain.is_none() {
            // The first RCPT fixes the domain and waits for an MX.
            txn.domain = Some(domain.clone());
            txn.first_rcpt = Some(args);
            self.mx = Mx::Connecting;
            return self.push(Action::OpenMx { domain });
        }
        if let Some(closed) = txn.closed.clone() {
            return self.relay(Verb::Rcpt, &closed, false);
        }
        let Mx::Up(conn) = &self.mx else {
            // Not reached: a domain without an MX session has `closed` set.
            return self.relay(Verb::Rcpt, reply::MX_LOST, false);
        };
        let line = envelope::rcpt_line(&parsed, &conn.extensions);
        self.send_mx(line);
        self.set_awaiting(Awaiting::Rcpt);
    }

    fn on_data(&mut self, args: &[u8]) {
        if !args.is_empty() {
            return self.reply(Verb::Data, reply::NO_PARAMS);
        }
        let Some(txn) = &self.txn else {
            return self.reply(Verb::Data, reply::NEED_MAIL);
        };
        if txn.accepted == 0 {
            return self.reply(Verb::Data, reply::NO_VALID_RECIPIENTS);
        }
        if let Some(closed) = txn.closed.clone() {
            return self.relay(Verb::Data, &closed, false);
        }
        if !matches!(self.mx, Mx::Up(_)) {
            // Not reached: recipients were accepted by an MX that is gone, so `closed`.
            return self.relay(Verb::Data, reply::MX_LOST, false);
        }
        self.send_mx(Bytes::from_static(b"DATA\r\n"));
        self.set_awaiting(Awaiting::Data);
    }

    /// BDAT is not offered (CHUNKING never is, ARCHITECTURE.md §5); a chunk that
    /// follows it anyway is read and dropped, never taken for commands.
    fn on_bdat(&mut self, args: &[u8]) {
        match parse::bdat_args(args) {
            Ok((size, _)) if size > MAX_CHUNK_LEN => {
                self.event(Event::LimitExceeded {
                    limit: "chunk_size",
                });
                self.tally.record(tally_name(Verb::Bdat), false);
                self.quit_mx();
                self.close_with(reply::CHUNK_TOO_LARGE);
            }
            Ok((size, _)) => {
                if size > 0 {
                    self.mode = Mode::SkipChunk { remaining: size };
                }
                self.reply(Verb::Bdat, reply::NOT_IMPLEMENTED);
            }
            // Without a size nobody can know where a chunk ends: what follows is
            // read as commands, and the MX hears none of it.
            Err(_) => self.reply(Verb::Bdat, reply::NOT_IMPLEMENTED),
        }
    }

    /// RSET, EHLO, HELO: the transaction and its MX session end.
    fn end_transaction(&mut self) {
        self.txn = None;
        self.quit_mx();
    }

    /// Body bytes: framed and neutralised by [`Body`], forwarded within the size limit.
    fn process_body(&mut self) {
        let input = self.client_in.split().freeze();
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Body { mut body, sent } => {
                let mut out = Forward::new(input.clone());
                let progress = body.feed(&input, &mut out);
                if progress == Progress::Refused {
                    return self.control_line();
                }
                let parts = out.into_parts();
                let written: u64 = parts.iter().map(|part| part.len() as u64).sum();
                let end = match progress {
                    Progress::End { consumed } => Some(consumed),
                    _ => None,
                };
                // `Body` writes the final `.` CRLF only with the end, never before.
                let content = sent
                    .saturating_add(written)
                    .saturating_sub(if end.is_some() { 3 } else { 0 });
                if content > self.max_message_size {
                    // RFC 1870 §6.3. The MX gets exactly the first `max_message_size`
                    // octets (whatever the chunking) and never an end of data: it
                    // discards the message when the connection closes.
                    let mut room = self.max_message_size.saturating_sub(sent);
                    for part in parts {
                        if room == 0 {
                            break;
                        }
                        let n = usize::try_from(room).unwrap_or(usize::MAX).min(part.len());
                        room -= n as u64;
                        self.send_mx(part.slice(..n));
                    }
                    self.event(Event::LimitExceeded {
                        limit: "message_size",
                    });
                    self.drop_mx();
                    self.mode = Mode::Discard {
                        body,
                        reply: reply::TOO_BIG,
                    };
                    if let Some(consumed) = end {
                        self.end_discard(&input, consumed, reply::TOO_BIG);
                    }
                    return;
                }
                for part in parts {
                    self.send_mx(part);
                }
                let Some(consumed) = end else {
                    self.mode = Mode::Body {
                        body,
                        sent: content,
                    };
                    return;
                };
                // What follows the end of data is commands.
                self.client_in.extend_from_slice(&input[consumed..]);
                if body.bare_newlines() > 0 {
                    self.event(Event::BareNewlineNormalized {
                        count: body.bare_newlines(),
                    });
                }
                if body.neutralized() > 0 {
                    self.event(Event::SmugglingNeutralized {
                        count: body.neutralized(),
                    });
                }
                self.set_awaiting(Awaiting::EndOfData);
            }
            Mode::Discard { mut body, reply } => match body.feed(&input, &mut Discard) {
                Progress::Refused => self.control_line(),
                Progress::End { consumed } => self.end_discard(&input, consumed, reply),
                Progress::More => self.mode = Mode::Discard { body, reply },
            },
            other => self.mode = other,
        }
    }

    /// The end of a body nobody received: its reply, and the transaction is over.
    fn end_discard(&mut self, input: &Bytes, consumed: usize, reply: &'static [u8]) {
        self.mode = Mode::Command;
        self.client_in.extend_from_slice(&input[consumed..]);
        self.txn = None;
        self.relay(Verb::Data, reply, false);
    }

    /// A line of more control bytes than a text line may hold (ARCHITECTURE.md §5): the
    /// message cannot be written safely. The MX sees no end of data.
    fn control_line(&mut self) {
        self.event(Event::LimitExceeded {
            limit: "control_line",
        });
        self.close_with(reply::CONTROL_LINE);
    }
}

/// The body output of a message nobody receives.
struct Discard;

impl body::Output for Discard {
    fn put(&mut self, _: &[u8]) {}

    fn pass(&mut self, _: &[u8], _: Range<usize>) {}
}

/// An MX reply line's code and whether it is the reply's last: `Reply-line` of RFC 5321
/// §4.2 with `Reply-code = %x32-35 %x30-35 %x30-39` read as 200..=599, and a
/// `textstring` of HTAB, printable ASCII and UTF-8 octets. Any other control character
/// (a bare CR a legacy reader may take for a line end, a NUL a C string ends at) could
/// make the client read a reply the MX did not give, so the line is malformed.
fn mx_reply_line(text: &[u8]) -> Option<(u16, bool)> {
    let reply = parse::reply_line(text).ok()?;
    let clean = reply
        .text
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    ((200..=599).contains(&reply.code) && clean).then_some((reply.code, reply.last))
}

/// The text of a reply line, after its code and separator.
fn mx_reply_text(text: &[u8]) -> Option<&[u8]> {
    parse::reply_line(text).ok().map(|reply| reply.text)
}

/// A reply's lines as the client gets them: each as the MX wrote it, ended by CRLF.
fn join(lines: &[Line]) -> Bytes {
    let mut out = BytesMut::with_capacity(lines.iter().map(|line| line.text.len() + 2).sum());
    for line in lines {
        out.put_slice(&line.text);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

#[cfg(test)]
mod tests;
