//! Runs a session on a script of events read from the fuzz input, the way
//! `driver::run` would, and checks what every session must keep whatever the client and
//! the upstream send.
//!
//! This file depends on nothing but `mailmoat`, so a regression test in the main package
//! can include it with `#[path]` and replay a crashing input through exactly the code
//! the fuzz target ran.
//!
//! # Input format
//!
//! Byte 0 picks the configuration:
//!
//! | bit | set                          | clear                 |
//! |-----|------------------------------|-----------------------|
//! | 0   | implicit TLS                 | STARTTLS listener     |
//! | 1   | SMTP `auth_requires_tls`     | `require_tls`         |
//! | 2   | SMTP bare newlines `reject`  | `normalize`           |
//! | 3   | `max_line_len` 4096          | 512                   |
//! | 4   | `max_held_bytes` 1024        | 64 KiB (production)   |
//! | 5-6 | `max_plaintext_commands` 20, 1, 3, 1000 (in that order)   ||
//! | 7   | IMAP `max_literal_len` 16    | 64 KiB                |
//!
//! Then operations, an op byte each (taken modulo 16), some with a payload:
//!
//! | op   | event                     | payload                   |
//! |------|---------------------------|---------------------------|
//! | 0-4  | client data               | length byte, bytes        |
//! | 5-8  | upstream data             | length byte, bytes        |
//! | 9    | upstream data             | u16 LE length, bytes      |
//! | 10-11| TLS handshake completed   |                           |
//! | 12   | client end of stream      |                           |
//! | 13   | upstream end of stream    |                           |
//! | 14   | deadline of the phase     |                           |
//! | 15   | client data               | u16 LE length, bytes      |
//!
//! A payload cut short by the end of the input is delivered as far as it goes.
//!
//! # The driver, modelled
//!
//! - Client bytes and the client's end of stream are delivered only while
//!   `wants_client_data()` (the driver does not read the client otherwise).
//! - After `StartTls` the driver runs the handshake and feeds the session nothing:
//!   client bytes go to the TLS engine (dropped here), upstream bytes and end of stream
//!   wait in the socket (delivered after the handshake), a client end of stream or a
//!   deadline fails the handshake (the script ends). "TLS handshake completed" means
//!   something only then, and at the start on an implicit-TLS listener.
//! - After `Close` or `Relay` the driver stops: the script ends.
//!
//! With `MAILMOAT_FUZZ_TRACE=1` in the environment every event and action is printed to
//! stderr: `MAILMOAT_FUZZ_TRACE=1 cargo fuzz run --fuzz-dir tests/fuzz TARGET FILE`.
//!
//! # Invariants (a panic, so a crash for the fuzzer)
//!
//! - No panic inside the session.
//! - Nothing follows `Close` or `Relay` in the actions (it would never be carried out),
//!   and only events follow `StartTls` in the same step (anything else would cross from
//!   the plaintext phase into TLS).
//! - `StartTls` only while TLS is off; SMTP never asks for `Relay`; IMAP and POP3 reach
//!   `Relay` (a login) only after TLS.
//! - Bounded work: the actions never outnumber `4 * bytes fed + 16 * (steps + 1)`, the
//!   client never gets more than `64 * bytes fed + 4096` bytes, the upstream never more
//!   than `4 * bytes fed + 4096`.
//! - Before TLS, on listeners that require it (SMTP `require_tls`, IMAP, POP3), every
//!   command the upstream receives is one of the upgrade dialogue's, and never a
//!   credential command: SMTP `AUTH`; IMAP `LOGIN`, `AUTHENTICATE`; POP3 `USER`, `PASS`,
//!   `APOP`, `AUTH`. The upstream's byte stream is cut into commands the way the
//!   upstream reads it: lines end at LF, and IMAP literals (`{n}` / `{n+}` at the end of
//!   a line) are skipped; the octets of a synchronising `{n}` follow only if the
//!   upstream answered `+`, not if it answered the command with a tagged response.
//! - IMAP: nothing is forwarded between a synchronising literal and the upstream's
//!   answer to it (RFC 9051 §4.3).
//! - The canonical rule (ARCHITECTURE.md §3), on every listener that starts in plaintext, MX
//!   included: before TLS the upstream receives only canonical allow-listed commands
//!   (`crate::canonical`, a strict parser independent of mailmoat's), no command line
//!   left without its CRLF when TLS starts or the script ends, and on an MX no message
//!   body that an upstream dropping NUL and other controls, or taking a bare LF for a
//!   line end, would end anywhere but at the client's real `CRLF.CRLF`. Which reply
//!   answers which command (a `354` to DATA) is read from the upstream's bytes in order.
//!   It holds whatever the driver does between batches of actions (it depends on no
//!   call but those modelled here).

use std::collections::VecDeque;
use std::sync::OnceLock;

use mailmoat::policy::{BareNewlines, Policy, UserHasher};
use mailmoat::proto::{Action, Event, Limits, Phase, Session, imap, pop3, smtp};

use crate::canonical::{Canonical, Dialect};

/// Which session a script drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `smtp::Session`.
    Smtp,
    /// `imap::Session`.
    Imap,
    /// `pop3::Session`.
    Pop3,
}

/// The configuration picked by byte 0.
#[derive(Debug, Clone, Copy)]
struct Flags(u8);

impl Flags {
    fn implicit_tls(self) -> bool {
        self.0 & 1 != 0
    }
    fn policy(self) -> Policy {
        if self.0 & 2 != 0 {
            Policy::AuthRequiresTls
        } else {
            Policy::RequireTls
        }
    }
    fn bare_newlines(self) -> BareNewlines {
        if self.0 & 4 != 0 {
            BareNewlines::Reject
        } else {
            BareNewlines::Normalize
        }
    }
    fn max_line_len(self) -> usize {
        if self.0 & 8 != 0 { 4096 } else { 512 }
    }
    fn max_held_bytes(self) -> usize {
        if self.0 & 16 != 0 { 1024 } else { 64 * 1024 }
    }
    fn max_plaintext_commands(self) -> u32 {
        [20, 1, 3, 1000][usize::from((self.0 >> 5) & 3)]
    }
    fn max_literal_len(self) -> u64 {
        if self.0 & 128 != 0 { 16 } else { 64 * 1024 }
    }
}

/// The SMTP session a listener builds (`inbound::listener`), with the picked settings.
fn smtp_session(flags: Flags) -> smtp::Session {
    smtp::Session::new(
        smtp::Config {
            policy: flags.policy(),
            bare_newlines: flags.bare_newlines(),
            limits: Limits {
                max_line_len: flags.max_line_len(),
                max_held_bytes: flags.max_held_bytes(),
                max_plaintext_commands: flags.max_plaintext_commands(),
                max_errors: flags.max_plaintext_commands(),
            },
            user_hasher: UserHasher::new(b"key"),
        },
        false,
    )
}

fn imap_session(flags: Flags) -> imap::Session {
    imap::Session::new(imap::Config {
        max_literal_len: flags.max_literal_len(),
        limits: Limits {
            max_line_len: flags.max_line_len(),
            max_held_bytes: flags.max_held_bytes(),
            max_plaintext_commands: flags.max_plaintext_commands(),
            max_errors: flags.max_plaintext_commands(),
        },
        user_hasher: UserHasher::new(b"key"),
    })
}

fn pop3_session(flags: Flags) -> pop3::Session {
    pop3::Session::new(pop3::Config {
        limits: Limits {
            max_line_len: flags.max_line_len(),
            max_held_bytes: flags.max_held_bytes(),
            max_plaintext_commands: flags.max_plaintext_commands(),
            max_errors: flags.max_plaintext_commands(),
        },
        user_hasher: UserHasher::new(b"key"),
    })
}

/// One event of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Bytes from the client.
    Client(&'a [u8]),
    /// Bytes from the upstream.
    Upstream(&'a [u8]),
    /// The TLS handshake completed.
    Tls,
    /// The client closed.
    ClientEof,
    /// The upstream closed.
    UpstreamEof,
    /// The phase's deadline expired.
    Timeout,
}

/// Reads the operations after byte 0.
pub fn parse_ops(mut data: &[u8]) -> Vec<Op<'_>> {
    fn payload<'a>(data: &mut &'a [u8], wide: bool) -> &'a [u8] {
        let len = if wide {
            let lo = take_byte(data).unwrap_or(0);
            let hi = take_byte(data).unwrap_or(0);
            usize::from(u16::from_le_bytes([lo, hi]))
        } else {
            usize::from(take_byte(data).unwrap_or(0))
        };
        let len = len.min(data.len());
        let (bytes, rest) = data.split_at(len);
        *data = rest;
        bytes
    }
    fn take_byte(data: &mut &[u8]) -> Option<u8> {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        Some(b)
    }
    let mut ops = Vec::new();
    while let Some(op) = take_byte(&mut data) {
        ops.push(match op % 16 {
            0..=4 => Op::Client(payload(&mut data, false)),
            5..=8 => Op::Upstream(payload(&mut data, false)),
            9 => Op::Upstream(payload(&mut data, true)),
            10 | 11 => Op::Tls,
            12 => Op::ClientEof,
            13 => Op::UpstreamEof,
            14 => Op::Timeout,
            _ => Op::Client(payload(&mut data, true)),
        });
    }
    ops
}

/// Runs the script `data` on a fresh session of `protocol`; panics on a broken invariant.
pub fn run(protocol: Protocol, data: &[u8]) {
    let Some((&flags, ops)) = data.split_first() else {
        return;
    };
    let flags = Flags(flags);
    let ops = parse_ops(ops);
    // SMTP on an MX (`auth_requires_tls`) lets mail through in plaintext: a body may
    // hold any line, so the command check would need the upstream's replies.
    let checked = !flags.implicit_tls()
        && (protocol != Protocol::Smtp || flags.policy() == Policy::RequireTls);
    static TRACE: OnceLock<bool> = OnceLock::new();
    let trace = *TRACE.get_or_init(|| std::env::var_os("MAILMOAT_FUZZ_TRACE").is_some());
    if trace {
        eprintln!("{protocol:?} {flags:?} checked={checked}");
    }
    // The canonical rule holds on every listener that starts in plaintext.
    let canonical = (!flags.implicit_tls()).then(|| {
        Canonical::new(match (protocol, flags.policy()) {
            (Protocol::Smtp, Policy::RequireTls) => Dialect::SmtpSubmission,
            (Protocol::Smtp, Policy::AuthRequiresTls) => Dialect::SmtpMx,
            (Protocol::Imap, _) => Dialect::Imap,
            (Protocol::Pop3, _) => Dialect::Pop3,
        })
    });
    let harness = Harness {
        protocol: Some(protocol),
        trace,
        upstream: UpstreamView::new(protocol, checked),
        canonical,
        ..Harness::default()
    };
    match protocol {
        Protocol::Smtp => harness.run(smtp_session(flags), flags, &ops),
        Protocol::Imap => harness.run(imap_session(flags), flags, &ops),
        Protocol::Pop3 => harness.run(pop3_session(flags), flags, &ops),
    }
}

#[derive(Debug, Default)]
struct Harness {
    protocol: Option<Protocol>,
    /// Print every event and action to stderr.
    trace: bool,
    upstream: UpstreamView,
    /// The strict reader of the canonical rule, on listeners that start in plaintext;
    /// `None` once TLS is up.
    canonical: Option<Canonical>,
    /// `on_tls_established` was called.
    tls: bool,
    /// `StartTls` was handed out; the handshake runs.
    handshake: bool,
    /// What the upstream sent during the handshake, delivered after it.
    deferred_upstream: Vec<u8>,
    deferred_upstream_eof: bool,
    steps: usize,
    bytes_in: usize,
    actions: usize,
    to_client: usize,
    to_upstream: usize,
}

impl Harness {
    fn run<S: Session>(mut self, mut session: S, flags: Flags, ops: &[Op<'_>]) {
        if flags.implicit_tls() {
            // The driver completes the handshake before the greeting is read.
            self.tls = true;
            session.on_tls_established();
            if self.drain(&mut session) {
                return;
            }
            // As the driver does once it has written everything.
            while session.on_output_written() {
                if self.drain(&mut session) {
                    return;
                }
            }
        }
        for &op in ops {
            if self.trace {
                eprintln!("{}", show_op(op, self.handshake));
            }
            if self.handshake {
                match op {
                    Op::Tls => {
                        self.handshake = false;
                        self.tls = true;
                        session.on_tls_established();
                        if self.drain(&mut session) {
                            return;
                        }
                        let held = std::mem::take(&mut self.deferred_upstream);
                        if !held.is_empty() {
                            self.bytes_in += held.len();
                            session.on_upstream_data(&held);
                            if self.drain(&mut session) {
                                return;
                            }
                        }
                        if std::mem::take(&mut self.deferred_upstream_eof) {
                            session.on_upstream_eof();
                            if self.drain(&mut session) {
                                return;
                            }
                        }
                    }
                    Op::Client(_) => {} // handshake bytes, for the TLS engine
                    Op::Upstream(bytes) => {
                        if !self.deferred_upstream_eof {
                            self.deferred_upstream.extend_from_slice(bytes);
                        }
                    }
                    Op::UpstreamEof => self.deferred_upstream_eof = true,
                    Op::ClientEof | Op::Timeout => return, // the handshake failed
                }
                continue;
            }
            match op {
                Op::Client(bytes) => {
                    if !session.wants_client_data() {
                        continue;
                    }
                    self.bytes_in += bytes.len();
                    session.on_client_data(bytes);
                }
                Op::Upstream(bytes) => {
                    self.bytes_in += bytes.len();
                    if !self.tls {
                        self.upstream.upstream_sent(bytes);
                        if let Some(canonical) = &mut self.canonical {
                            canonical.replied(bytes);
                        }
                    }
                    session.on_upstream_data(bytes);
                }
                Op::Tls => continue, // the driver never says so unasked
                Op::ClientEof => {
                    if !session.wants_client_data() {
                        continue;
                    }
                    session.on_client_eof();
                }
                Op::UpstreamEof => session.on_upstream_eof(),
                Op::Timeout => session.on_timeout(),
            }
            if self.drain(&mut session) {
                return;
            }
            // As the driver does once it has written everything.
            while session.on_output_written() {
                if self.drain(&mut session) {
                    return;
                }
            }
            // As the driver does before it waits between commands.
            if session.phase() == Phase::Command {
                session.release_idle_memory();
            }
        }
        if let Some(canonical) = &self.canonical
            && let Err(violation) = canonical.finish()
        {
            panic!("{violation}");
        }
        // Whatever the state, these must not panic either.
        let _ = session.phase();
        let _ = session.wants_client_data();
        let _ = session.summary();
    }

    /// Carries out one step's actions; true once the driver would stop.
    fn drain<S: Session>(&mut self, session: &mut S) -> bool {
        self.steps += 1;
        let protocol = self.protocol.expect("set by run");
        let mut step: VecDeque<Action> = VecDeque::new();
        let action_bound = 4 * self.bytes_in + 16 * (self.steps + 1);
        while let Some(action) = session.next_action() {
            self.actions += 1;
            assert!(
                self.actions <= action_bound,
                "{} actions for {} bytes in {} steps: a runaway loop",
                self.actions,
                self.bytes_in,
                self.steps
            );
            step.push_back(action);
        }
        let mut stop = false;
        let mut after_starttls = false;
        for action in step {
            if self.trace {
                eprintln!("    {}", show_action(&action));
            }
            assert!(
                !stop,
                "{action:?} after Close or Relay is never carried out"
            );
            if after_starttls {
                assert!(
                    matches!(action, Action::Event(_)),
                    "{action:?} queued behind StartTls crosses into TLS"
                );
            }
            match action {
                Action::ToClient(bytes) => {
                    self.to_client += bytes.len();
                    assert!(
                        self.to_client <= 64 * self.bytes_in + 4096,
                        "{} bytes to the client for {} bytes in",
                        self.to_client,
                        self.bytes_in
                    );
                }
                Action::ToUpstream(bytes) => {
                    self.to_upstream += bytes.len();
                    assert!(
                        self.to_upstream <= 4 * self.bytes_in + 4096,
                        "{} bytes to the upstream for {} bytes in",
                        self.to_upstream,
                        self.bytes_in
                    );
                    if !self.tls {
                        self.upstream.before_tls(&bytes);
                        if let Some(canonical) = &mut self.canonical
                            && let Err(violation) = canonical.forwarded(&bytes)
                        {
                            panic!("{violation}");
                        }
                    }
                }
                Action::StartTls { .. } => {
                    assert!(!self.tls && !self.handshake, "StartTls with TLS up");
                    // The plaintext phase is over: what the upstream got must be whole.
                    if let Some(canonical) = self.canonical.take()
                        && let Err(violation) = canonical.finish()
                    {
                        panic!("{violation}");
                    }
                    self.handshake = true;
                    after_starttls = true;
                }
                Action::Event(event) => check_event(&event),
                Action::Relay => {
                    assert_ne!(protocol, Protocol::Smtp, "SMTP never relays blindly");
                    assert!(self.tls, "{protocol:?} logged in before TLS");
                    stop = true;
                }
                Action::Close => stop = true,
            }
        }
        stop
    }
}

fn show_op(op: Op<'_>, handshake: bool) -> String {
    let during = if handshake {
        " (during the handshake)"
    } else {
        ""
    };
    match op {
        Op::Client(bytes) => format!("client {:?}{during}", String::from_utf8_lossy(bytes)),
        Op::Upstream(bytes) => format!("upstream {:?}{during}", String::from_utf8_lossy(bytes)),
        other => format!("{other:?}{during}"),
    }
}

fn show_action(action: &Action) -> String {
    match action {
        Action::ToClient(bytes) => format!("-> client {:?}", String::from_utf8_lossy(bytes)),
        Action::ToUpstream(bytes) => format!("-> upstream {:?}", String::from_utf8_lossy(bytes)),
        other => format!("{other:?}"),
    }
}

/// Events go to the logs: what the client typed may appear only as a recognised name or
/// a keyed hash (STYLE 11, ARCHITECTURE.md §8).
fn check_event(event: &Event) {
    let _ = event.name();
    if let Event::CredentialsExposed {
        mechanism,
        user_hash,
    } = event
    {
        assert!(
            mechanism.len() <= 32
                && mechanism
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_ ".contains(&b)),
            "client text in a logged mechanism: {mechanism:?}"
        );
        if let Some(hash) = user_hash {
            assert!(
                hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "a user hash that is not one: {hash:?}"
            );
        }
    }
}

/// Cuts LF-terminated lines out of a byte stream, with room for literal octets.
#[derive(Debug, Default)]
struct Lines {
    /// The line being received.
    line: Vec<u8>,
    /// Literal octets still to come (IMAP).
    literal: u64,
}

impl Lines {
    /// Feeds `bytes`; `on_line` gets each line without its CRLF or LF, and says how many
    /// literal octets follow it.
    fn feed(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(&[u8]) -> u64) {
        while !bytes.is_empty() {
            if self.literal > 0 {
                let n = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.literal -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n') {
                Some(lf) => {
                    self.line.extend_from_slice(&bytes[..lf]);
                    bytes = &bytes[lf + 1..];
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.literal = on_line(&line);
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
        }
    }
}

/// The upstream's reading of the dialogue before TLS: what it is sent, cut into
/// commands, and (IMAP) what it answers to a synchronising literal, which decides
/// whether the literal's octets follow (`+`) or the command is over (tagged response).
#[derive(Debug, Default)]
struct UpstreamView {
    protocol: Option<Protocol>,
    /// Check the commands (a listener that requires TLS).
    checked: bool,
    /// What the upstream receives.
    received: Lines,
    /// IMAP: the current line continues a command after a literal.
    continuation: bool,
    /// IMAP: the tag of the command being received.
    tag: Vec<u8>,
    /// IMAP: a forwarded line ended in a synchronising literal of this many octets; the
    /// upstream has not answered it yet.
    awaiting_answer: Option<u64>,
    /// IMAP: what the upstream sends.
    sent: Lines,
    /// IMAP: the upstream's current line continues a response after a literal.
    sent_continuation: bool,
}

impl UpstreamView {
    fn new(protocol: Protocol, checked: bool) -> Self {
        UpstreamView {
            protocol: Some(protocol),
            checked,
            ..UpstreamView::default()
        }
    }

    /// Bytes the session forwarded to the upstream.
    fn before_tls(&mut self, bytes: &[u8]) {
        if !self.checked || bytes.is_empty() {
            return;
        }
        let protocol = self.protocol.expect("set by new");
        assert!(
            self.awaiting_answer.is_none(),
            "{protocol:?}: {:?} forwarded before the upstream answered a synchronising \
             literal (RFC 9051 §4.3: the client waits for the `+`)",
            String::from_utf8_lossy(bytes)
        );
        let mut received = std::mem::take(&mut self.received);
        received.feed(bytes, |line| self.on_received_line(protocol, line));
        self.received = received;
    }

    fn on_received_line(&mut self, protocol: Protocol, line: &[u8]) -> u64 {
        if !std::mem::take(&mut self.continuation) {
            check_command(protocol, line);
            let tag_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
            self.tag = line[..tag_len].to_vec();
        }
        if protocol != Protocol::Imap {
            return 0;
        }
        match imap_trailing_literal(line) {
            Some((len, true)) => {
                self.continuation = true;
                len
            }
            Some((len, false)) => {
                self.awaiting_answer = Some(len);
                0
            }
            None => 0,
        }
    }

    /// Bytes the upstream sent (before the session read them: the session reads the
    /// upstream before the client in every step).
    fn upstream_sent(&mut self, bytes: &[u8]) {
        if !self.checked || self.protocol != Some(Protocol::Imap) {
            return;
        }
        let mut sent = std::mem::take(&mut self.sent);
        sent.feed(bytes, |line| self.on_sent_line(line));
        self.sent = sent;
    }

    fn on_sent_line(&mut self, line: &[u8]) -> u64 {
        let continuing = std::mem::take(&mut self.sent_continuation);
        if !continuing && let Some(len) = self.awaiting_answer {
            if line.first() == Some(&b'+') {
                // The octets follow, then the rest of the command.
                self.awaiting_answer = None;
                self.received.literal = len;
                self.continuation = true;
            } else if let Some(status) = line
                .strip_prefix(&self.tag[..])
                .and_then(|rest| rest.strip_prefix(b" "))
                && [&b"OK"[..], b"NO", b"BAD"]
                    .iter()
                    .any(|s| status.len() >= s.len() && status[..s.len()].eq_ignore_ascii_case(s))
            {
                // Refused (or done) without the octets: the next line is a command.
                self.awaiting_answer = None;
            }
        }
        // Literals in untagged data (`* ID (... {7}`) and in their continuations.
        match imap_trailing_literal(line) {
            Some((len, _)) if continuing || line.starts_with(b"* ") => {
                self.sent_continuation = true;
                len
            }
            _ => 0,
        }
    }
}

/// `{n}` or `{n+}` at the end of an IMAP line (RFC 9051 §4.3, RFC 7888): the length and
/// whether it is non-synchronising.
fn imap_trailing_literal(line: &[u8]) -> Option<(u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let number = &inner[open + 1..];
    let (number, non_sync) = match number.strip_suffix(b"+") {
        Some(number) => (number, true),
        None => (number, false),
    };
    if number.is_empty() || !number.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(number).ok()?.parse().ok()?, non_sync))
}

/// A command the upstream received before TLS on a listener that requires TLS.
fn check_command(protocol: Protocol, line: &[u8]) {
    let word = |text: &[u8]| -> Vec<u8> {
        text.split(|&b| b == b' ' || b == b'\t')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    };
    let (verb, credentials, allowed): (Vec<u8>, &[&[u8]], &[&[u8]]) = match protocol {
        Protocol::Smtp => (
            word(line),
            &[b"AUTH"],
            &[b"EHLO", b"HELO", b"NOOP", b"RSET", b"QUIT"],
        ),
        Protocol::Pop3 => (
            word(line),
            &[b"USER", b"PASS", b"APOP", b"AUTH"],
            &[b"CAPA", b"QUIT", b"NOOP"],
        ),
        Protocol::Imap => {
            // `tag SP command`
            let after_tag = line
                .iter()
                .position(|&b| b == b' ')
                .map_or(&b""[..], |sp| &line[sp + 1..]);
            (
                word(after_tag),
                &[b"LOGIN", b"AUTHENTICATE"],
                &[b"CAPABILITY", b"NOOP", b"LOGOUT"],
            )
        }
    };
    let shown = String::from_utf8_lossy(line);
    if protocol == Protocol::Imap && !allowed.contains(&&verb[..]) {
        // The proxy reads the command name as the longest run of ATOM-CHARs; a name
        // followed by anything but SP or the line end is no command of RFC 9051 §9.
        let after_tag = &line[line
            .iter()
            .position(|&b| b == b' ')
            .map_or(line.len(), |i| i + 1)..];
        let atom_len = after_tag
            .iter()
            .position(|&b| !(b > 0x20 && b < 0x7f && !b"(){%*\"\\]".contains(&b)))
            .unwrap_or(after_tag.len());
        let atom = after_tag[..atom_len].to_ascii_uppercase();
        assert!(
            !allowed.contains(&&atom[..]),
            "Imap: a command named {:?} followed by {:?} was forwarded before TLS as {:?}: \
             {shown:?}",
            String::from_utf8_lossy(&verb),
            after_tag.get(atom_len).map(|b| format!("{b:#04x}")),
            String::from_utf8_lossy(&atom),
        );
    }
    assert!(
        !credentials.contains(&&verb[..]),
        "{protocol:?}: credential command reached the upstream before TLS: {shown:?}"
    );
    assert!(
        allowed.contains(&&verb[..]),
        "{protocol:?}: command outside the upgrade dialogue reached the upstream before \
         TLS: {shown:?}"
    );
}
