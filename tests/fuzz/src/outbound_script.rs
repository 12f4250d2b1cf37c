//! Runs the outbound relay's session (`proto::outbound::session`) on a script of events
//! read from the fuzz input, the way its driver would, and checks what it must keep
//! whatever the legacy MTA and the MXes send.
//!
//! Like `session_script.rs`, this file depends on nothing but `mailmoat` and this crate's
//! `canonical` module, so `tests/fuzz_regressions.rs` can include it with `#[path]`.
//!
//! # Input format
//!
//! Byte 0 picks the configuration:
//!
//! | bit | set                          | clear                 |
//! |-----|------------------------------|-----------------------|
//! | 0   | `max_line_len` 4096          | 512                   |
//! | 1   | `max_held_bytes` 1024        | 64 KiB                |
//! | 2   | `max_message_size` 64        | 10 MB                 |
//! | 3-4 | `max_errors` 20, 1, 3, 1000 (in that order)           ||
//!
//! Then operations, an op byte each (taken modulo 17), some with a payload:
//!
//! | op    | event                                   | payload               |
//! |-------|-----------------------------------------|-----------------------|
//! | 0-3   | client data                             | length byte, bytes    |
//! | 4-6   | MX data                                 | length byte, bytes    |
//! | 7     | MX data                                 | u16 LE length, bytes  |
//! | 8     | MX connected                            | a byte: its `TlsRequirement` (mod 3) |
//! | 9     | no MX usable (`on_mx_unavailable`)      |                       |
//! | 10    | MX TLS handshake completed              |                       |
//! | 11    | MX TLS handshake failed                 |                       |
//! | 12    | client end of stream                    |                       |
//! | 13    | MX end of stream                        |                       |
//! | 14    | deadline of the phase                   |                       |
//! | 15    | client data                             | u16 LE length, bytes  |
//! | 16    | shutdown (`close_if_idle`)              |                       |
//!
//! A payload cut short by the end of the input is delivered as far as it goes.
//!
//! # The driver, modelled
//!
//! - Client bytes and end of stream only while `wants_client_data()`.
//! - An MX link is none, being sought (after `OpenMx` or `NextMx`), up, or in its TLS
//!   handshake (after `StartMxTls`). "MX connected" and "no MX usable" mean something only
//!   while one is sought, MX bytes and end of stream only while it is up, a handshake
//!   result only during the handshake; otherwise the op is skipped, as a driver would
//!   never report them. `CloseMx` ends the link.
//! - After `Close` the driver stops: the script ends.
//!
//! With `MAILMOAT_FUZZ_TRACE=1` every event and action is printed to stderr.
//!
//! # Invariants (a panic, so a crash for the fuzzer)
//!
//! - No panic inside the session; nothing follows `Close`, and `Close` comes with no MX
//!   link left open.
//! - `OpenMx` only without an MX link, `NextMx` only for one that is up (or in its
//!   handshake), `StartMxTls` only on one that is up; bytes to an MX only while it is up.
//! - Every byte an MX receives is a line the relay writes in canonical form (`EHLO`,
//!   `HELO`, `STARTTLS`, `MAIL`, `RCPT`, `DATA`, `QUIT`, `RSET`, `NOOP`:
//!   `crate::canonical::Canonical::relay`, a strict reader independent of mailmoat's
//!   parsers), or a body after the MX's `354`
//!   that no lenient reader ends anywhere but at its `CRLF.CRLF`; no command is left
//!   without its CRLF when TLS starts or the link ends.
//! - The client receives only whole, well-formed replies: `code (SP / "-") text CRLF`,
//!   codes 2xx-5xx, one code per multi-line reply, no control character but HTAB, no
//!   line longer than an MX reply line may be.
//! - Bounded work: the actions never outnumber `4 * bytes in + 16 * (steps + 1)`, the
//!   client gets at most `64 * bytes in + 4096` bytes, the MXes `8 * bytes in + 4096`
//!   plus, for each MX connection, the transaction's MAIL and RCPT lines again (each at
//!   most a client line, `max_line_len`).

use std::sync::OnceLock;

use mailmoat::proto::Limits;
use mailmoat::proto::outbound::session::{
    Action, Config, MX_UNREACHABLE, MxAttempt, MxTlsFailure, Phase, Session, TlsRequirement,
};

use crate::canonical::{Canonical, show};

/// The configuration picked by byte 0.
#[derive(Debug, Clone, Copy)]
struct Flags(u8);

impl Flags {
    fn config(self) -> Config {
        Config {
            hostname: "relay.example.net".to_owned(),
            max_message_size: if self.0 & 4 != 0 { 64 } else { 10_000_000 },
            limits: Limits {
                max_line_len: if self.0 & 1 != 0 { 4096 } else { 512 },
                max_held_bytes: if self.0 & 2 != 0 { 1024 } else { 64 * 1024 },
                max_plaintext_commands: 20,
                max_errors: [20, 1, 3, 1000][usize::from((self.0 >> 3) & 3)],
            },
        }
    }
}

/// One event of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Bytes from the legacy MTA.
    Client(&'a [u8]),
    /// Bytes from the MX.
    Mx(&'a [u8]),
    /// The driver connected to an MX with this requirement.
    Connected(TlsRequirement),
    /// No MX could be used.
    Unavailable,
    /// The TLS handshake with the MX completed.
    TlsOk,
    /// The TLS handshake with the MX failed.
    TlsFailed,
    /// The client closed.
    ClientEof,
    /// The MX closed.
    MxEof,
    /// The phase's deadline expired.
    Timeout,
    /// The server shuts down.
    Shutdown,
}

/// Reads the operations after byte 0.
pub fn parse_ops(mut data: &[u8]) -> Vec<Op<'_>> {
    fn take_byte(data: &mut &[u8]) -> Option<u8> {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        Some(b)
    }
    fn payload<'a>(data: &mut &'a [u8], wide: bool) -> &'a [u8] {
        let len = if wide {
            let lo = take_byte(data).unwrap_or(0);
            let hi = take_byte(data).unwrap_or(0);
            usize::from(u16::from_le_bytes([lo, hi]))
        } else {
            usize::from(take_byte(data).unwrap_or(0))
        };
        let (bytes, rest) = data.split_at(len.min(data.len()));
        *data = rest;
        bytes
    }
    let mut ops = Vec::new();
    while let Some(op) = take_byte(&mut data) {
        ops.push(match op % 17 {
            0..=3 => Op::Client(payload(&mut data, false)),
            4..=6 => Op::Mx(payload(&mut data, false)),
            7 => Op::Mx(payload(&mut data, true)),
            8 => Op::Connected(
                [
                    TlsRequirement::Required,
                    TlsRequirement::Opportunistic,
                    TlsRequirement::Plaintext,
                ][usize::from(take_byte(&mut data).unwrap_or(0) % 3)],
            ),
            9 => Op::Unavailable,
            10 => Op::TlsOk,
            11 => Op::TlsFailed,
            12 => Op::ClientEof,
            13 => Op::MxEof,
            14 => Op::Timeout,
            15 => Op::Client(payload(&mut data, true)),
            _ => Op::Shutdown,
        });
    }
    ops
}

/// The MX connection as the driver sees it.
#[derive(Debug)]
enum Link {
    None,
    Sought,
    /// Up, with the strict reader of what the MX received.
    Up(Canonical),
    Handshake(Canonical),
}

/// Runs the script `data` on a fresh session; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&flags, ops)) = data.split_first() else {
        return;
    };
    static TRACE: OnceLock<bool> = OnceLock::new();
    let trace = *TRACE.get_or_init(|| std::env::var_os("MAILMOAT_FUZZ_TRACE").is_some());
    let flags = Flags(flags);
    if trace {
        eprintln!("outbound {flags:?}");
    }
    let mut harness = Harness {
        trace,
        link: Link::None,
        replies: Replies::default(),
        steps: 0,
        bytes_in: 1,
        actions: 0,
        to_client: 0,
        to_mx: 0,
        connections: 0,
        max_line_len: flags.config().limits.max_line_len,
    };
    let mut session = Session::new(flags.config());
    if harness.drain(&mut session) {
        return;
    }
    for op in parse_ops(ops) {
        if trace {
            eprintln!("{}", show_op(op));
        }
        harness.bytes_in += 1;
        match op {
            Op::Client(bytes) => {
                if !session.wants_client_data() {
                    continue;
                }
                harness.bytes_in += bytes.len();
                session.on_client_data(bytes);
            }
            Op::Mx(bytes) => {
                let Link::Up(canonical) = &mut harness.link else {
                    continue;
                };
                harness.bytes_in += bytes.len();
                canonical.replied(bytes);
                session.on_mx_data(bytes);
            }
            Op::Connected(tls) => {
                if !matches!(harness.link, Link::Sought) {
                    continue;
                }
                harness.link = Link::Up(Canonical::relay());
                harness.connections += 1;
                session.on_mx_connected(MxAttempt {
                    host: "mx1.example.org".to_owned(),
                    tls,
                    policy: "fuzz",
                });
            }
            Op::Unavailable => {
                if !matches!(harness.link, Link::Sought) {
                    continue;
                }
                harness.link = Link::None;
                session.on_mx_unavailable(MX_UNREACHABLE);
            }
            Op::TlsOk | Op::TlsFailed => {
                // Taken only during the handshake: otherwise the op is skipped.
                if !matches!(harness.link, Link::Handshake(_)) {
                    continue;
                }
                let Link::Handshake(canonical) = std::mem::replace(&mut harness.link, Link::None)
                else {
                    unreachable!("matched above");
                };
                if op == Op::TlsOk {
                    // The reader goes on inside TLS: the 220 answered the STARTTLS, and
                    // nothing is owed.
                    harness.link = Link::Up(canonical);
                    session.on_mx_tls(Ok(()));
                } else {
                    // The link stays in the handshake until the session gives it up.
                    harness.link = Link::Handshake(canonical);
                    session.on_mx_tls(Err(MxTlsFailure {
                        result_type: "validation-failure",
                        detail: "fuzz".to_owned(),
                    }));
                }
            }
            Op::ClientEof => {
                if !session.wants_client_data() {
                    continue;
                }
                session.on_client_eof();
            }
            Op::MxEof => {
                if !matches!(harness.link, Link::Up(_)) {
                    continue;
                }
                session.on_mx_eof();
            }
            Op::Timeout => session.on_timeout(),
            Op::Shutdown => {
                session.close_if_idle();
            }
        }
        if harness.drain(&mut session) {
            return;
        }
        // As the driver does once it has written everything.
        while session.on_output_written() {
            if harness.drain(&mut session) {
                return;
            }
        }
        if session.phase() == Phase::Command {
            session.release_idle_memory();
        }
    }
    // Whatever the state, these must not panic either.
    let _ = (
        session.phase(),
        session.wants_client_data(),
        session.summary(),
    );
}

struct Harness {
    trace: bool,
    link: Link,
    replies: Replies,
    steps: usize,
    bytes_in: usize,
    actions: usize,
    to_client: usize,
    to_mx: usize,
    /// MX connections made.
    connections: usize,
    max_line_len: usize,
}

impl Harness {
    /// Carries out one step's actions; true once the driver would stop.
    fn drain(&mut self, session: &mut Session) -> bool {
        self.steps += 1;
        let bound = 4 * self.bytes_in + 16 * (self.steps + 1);
        let mut stop = false;
        while let Some(action) = session.next_action() {
            if self.trace {
                eprintln!("    {}", show_action(&action));
            }
            assert!(!stop, "{action:?} after Close is never carried out");
            self.actions += 1;
            assert!(
                self.actions <= bound,
                "{} actions for {} bytes in {} steps: a runaway loop",
                self.actions,
                self.bytes_in,
                self.steps
            );
            match action {
                Action::ToClient(bytes) => {
                    self.to_client += bytes.len();
                    assert!(
                        self.to_client <= 64 * self.bytes_in + 4096,
                        "{} bytes to the client for {} bytes in",
                        self.to_client,
                        self.bytes_in
                    );
                    self.replies.feed(&bytes);
                }
                Action::ToMx(bytes) => {
                    self.to_mx += bytes.len();
                    let resent = self.connections * (2 * self.max_line_len + 256);
                    assert!(
                        self.to_mx <= 8 * self.bytes_in + 4096 + resent,
                        "{} bytes to MXes for {} bytes in",
                        self.to_mx,
                        self.bytes_in
                    );
                    let Link::Up(canonical) = &mut self.link else {
                        panic!("{} to an MX link that is not up", show(&bytes));
                    };
                    if let Err(violation) = canonical.forwarded(&bytes) {
                        panic!("{violation}");
                    }
                }
                Action::OpenMx { domain } => {
                    assert!(
                        matches!(self.link, Link::None),
                        "OpenMx {domain} with an MX link open"
                    );
                    self.link = Link::Sought;
                }
                Action::NextMx { failure } => {
                    match std::mem::replace(&mut self.link, Link::Sought) {
                        Link::Up(canonical) | Link::Handshake(canonical) => finish(&canonical),
                        other => panic!("NextMx ({failure:?}) for a link {other:?}"),
                    }
                }
                Action::StartMxTls => {
                    let Link::Up(canonical) = std::mem::replace(&mut self.link, Link::None) else {
                        panic!("StartMxTls without an MX link up");
                    };
                    finish(&canonical);
                    self.link = Link::Handshake(canonical);
                }
                Action::CloseMx => {
                    if let Link::Up(canonical) | Link::Handshake(canonical) =
                        std::mem::replace(&mut self.link, Link::None)
                    {
                        finish(&canonical);
                    }
                }
                Action::Event(event) => {
                    let _ = event.name();
                }
                Action::Close => {
                    assert!(
                        matches!(self.link, Link::None),
                        "Close with the MX link {:?}",
                        self.link
                    );
                    stop = true;
                }
            }
        }
        stop
    }
}

/// A link ends (or TLS starts): no command may be left without its line end.
fn finish(canonical: &Canonical) {
    if let Err(violation) = canonical.finish() {
        panic!("{violation}");
    }
}

/// Longest reply line the client may get: an MX reply line (2048 with its CRLF) or the
/// relay's own.
const MAX_CLIENT_LINE: usize = 2048;

/// The client's stream, checked reply line by reply line.
#[derive(Debug, Default)]
struct Replies {
    line: Vec<u8>,
    /// The code of a multi-line reply under way.
    open: Option<[u8; 3]>,
}

impl Replies {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.line.push(b);
            assert!(
                self.line.len() <= MAX_CLIENT_LINE,
                "a reply line longer than {MAX_CLIENT_LINE}: {}",
                show(&self.line)
            );
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.check(&line);
            }
        }
    }

    fn check(&mut self, line: &[u8]) {
        let shown = show(line);
        let text = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("a reply line without CRLF: {shown}"));
        assert!(
            text.len() >= 3
                && (b'2'..=b'5').contains(&text[0])
                && text[1..3].iter().all(u8::is_ascii_digit),
            "no reply code 2xx-5xx: {shown}"
        );
        assert!(
            matches!(text.get(3), None | Some(b' ' | b'-')),
            "no SP or - after the code: {shown}"
        );
        assert!(
            text.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            "a control character in a reply: {shown}"
        );
        let code = [text[0], text[1], text[2]];
        if let Some(open) = self.open {
            assert_eq!(open, code, "the code changed inside a reply: {shown}");
        }
        self.open = (text.get(3) == Some(&b'-')).then_some(code);
    }
}

fn show_op(op: Op<'_>) -> String {
    match op {
        Op::Client(bytes) => format!("client {}", show(bytes)),
        Op::Mx(bytes) => format!("mx {}", show(bytes)),
        other => format!("{other:?}"),
    }
}

fn show_action(action: &Action) -> String {
    match action {
        Action::ToClient(bytes) => format!("-> client {}", show(bytes)),
        Action::ToMx(bytes) => format!("-> mx {}", show(bytes)),
        other => format!("{other:?}"),
    }
}
