//! ARCHITECTURE.md §3's canonical rule as a property: whatever bytes a client sends before TLS,
//! the upstream receives only canonical allow-listed commands that mailmoat wrote
//! itself, and on an MX no message body that a lenient upstream could end early.
//!
//! Each session (SMTP `require_tls` and `auth_requires_tls`, IMAP, POP3) is driven
//! without sockets by arbitrary client byte streams, biased toward the dangerous bytes
//! and words (`{`, `}`, `+`, `~`, NUL, CR, LF, `.`, spaces, verbs, literal headers), cut
//! into arbitrary reads, against a scripted well-behaved upstream that answers every
//! command it receives (`250`, `354`, `TAG OK`, `+OK`...). Everything the session hands
//! the upstream before TLS is read by the strict parser of `tests/fuzz/src/canonical.rs`
//! (written from the RFCs, independent of mailmoat's parsers), the same one the fuzz
//! targets check with. The run stops at STARTTLS: the rule is about plaintext.
//!
//! Named tests replay the attacks the rule exists for, one by one, so that a failure
//! names its class; the properties look for the rest (256 cases each, a few seconds).

#[allow(dead_code)]
#[path = "fuzz/src/canonical.rs"]
mod canonical;

use canonical::{Canonical, Dialect, Received, show};
use mailmoat::policy::{BareNewlines, Policy, UserHasher};
use mailmoat::proto::{Action, Limits, Session, imap, pop3, smtp};
use proptest::prelude::*;

/// What the scripted upstream offers.
#[derive(Debug, Clone, Copy)]
struct Offers {
    /// IMAP: `LITERAL+` in its capabilities (Dovecot's pre-login list has it).
    literal_plus: bool,
    /// SMTP: `PIPELINING` in its EHLO reply.
    pipelining: bool,
    /// SMTP: `CHUNKING` in its EHLO reply.
    chunking: bool,
}

const ALL_OFFERS: Offers = Offers {
    literal_plus: true,
    pipelining: true,
    chunking: true,
};

fn session(dialect: Dialect) -> Box<dyn Session> {
    let hasher = UserHasher::new(b"key");
    match dialect {
        Dialect::SmtpSubmission | Dialect::SmtpMx => Box::new(smtp::Session::new(
            smtp::Config {
                policy: if dialect == Dialect::SmtpMx {
                    Policy::AuthRequiresTls
                } else {
                    Policy::RequireTls
                },
                bare_newlines: BareNewlines::Normalize,
                limits: Limits {
                    max_line_len: 4096,
                    max_held_bytes: 64 * 1024,
                    // Far above the default (20), so that the properties reach deep dialogues.
                    max_plaintext_commands: 1000,
                    max_errors: 1000,
                },
                user_hasher: hasher,
            },
            false,
        )),
        Dialect::Imap => Box::new(imap::Session::new(imap::Config {
            max_literal_len: 64 * 1024,
            limits: Limits {
                max_line_len: 4096,
                max_held_bytes: 64 * 1024,
                max_plaintext_commands: 1000,
                max_errors: 1000,
            },
            user_hasher: hasher,
        })),
        Dialect::Pop3 => Box::new(pop3::Session::new(pop3::Config {
            limits: Limits {
                max_line_len: 4096,
                max_held_bytes: 64 * 1024,
                max_plaintext_commands: 1000,
                max_errors: 1000,
            },
            user_hasher: hasher,
        })),
    }
}

/// The scripted upstream's greeting.
fn greeting(dialect: Dialect, offers: Offers) -> Vec<u8> {
    match dialect {
        Dialect::SmtpSubmission | Dialect::SmtpMx => b"220 upstream.example ESMTP\r\n".to_vec(),
        Dialect::Imap => format!(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE{} AUTH=PLAIN] ready\r\n",
            if offers.literal_plus { " LITERAL+" } else { "" }
        )
        .into_bytes(),
        Dialect::Pop3 => b"+OK ready\r\n".to_vec(),
    }
}

/// The well-behaved upstream's answer to what it received; true: it then hangs up.
fn answer(dialect: Dialect, offers: Offers, received: &Received) -> (Vec<u8>, bool) {
    let command = match received {
        Received::Command(line) => line.as_slice(),
        Received::EndOfData => return (b"250 2.0.0 Ok: queued\r\n".to_vec(), false),
        Received::ChunkDone { .. } => return (b"250 2.0.0 Ok: chunk\r\n".to_vec(), false),
    };
    let verb = |v: &[u8]| command.starts_with(v);
    match dialect {
        Dialect::SmtpSubmission | Dialect::SmtpMx => {
            if verb(b"EHLO ") {
                let mut reply = b"250-upstream.example\r\n".to_vec();
                if offers.pipelining {
                    reply.extend_from_slice(b"250-PIPELINING\r\n");
                }
                if offers.chunking {
                    reply.extend_from_slice(b"250-CHUNKING\r\n");
                }
                reply.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n");
                (reply, false)
            } else if verb(b"HELO ") {
                (b"250 upstream.example\r\n".to_vec(), false)
            } else if command == b"DATA" {
                (b"354 End data with <CR><LF>.<CR><LF>\r\n".to_vec(), false)
            } else if command == b"BDAT 0" || command == b"BDAT 0 LAST" {
                (b"250 2.0.0 Ok: chunk\r\n".to_vec(), false)
            } else if verb(b"BDAT ") {
                (Vec::new(), false) // answered once the chunk is in
            } else if command == b"QUIT" {
                (b"221 2.0.0 Bye\r\n".to_vec(), true)
            } else {
                (b"250 2.0.0 Ok\r\n".to_vec(), false)
            }
        }
        Dialect::Imap => {
            let (tag, name) = command
                .iter()
                .position(|&b| b == b' ')
                .map_or((command, &b""[..]), |sp| {
                    (&command[..sp], &command[sp + 1..])
                });
            let tag = String::from_utf8_lossy(tag);
            match name {
                b"CAPABILITY" => (
                    format!(
                        "* CAPABILITY IMAP4rev1 SASL-IR ID IDLE{} AUTH=PLAIN\r\n\
                         {tag} OK Pre-login capabilities listed\r\n",
                        if offers.literal_plus { " LITERAL+" } else { "" }
                    )
                    .into_bytes(),
                    false,
                ),
                b"LOGOUT" => (
                    format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n").into_bytes(),
                    true,
                ),
                _ => (format!("{tag} OK NOOP completed\r\n").into_bytes(), false),
            }
        }
        Dialect::Pop3 => match command {
            b"CAPA" => (
                b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n".to_vec(),
                false,
            ),
            b"QUIT" => (b"+OK Logging out\r\n".to_vec(), true),
            _ => (b"+OK\r\n".to_vec(), false),
        },
    }
}

/// Drives a fresh session of `dialect` with the client's `reads`, then its end of
/// stream, against the scripted upstream; stops at STARTTLS, a close or a relay.
/// Returns the first breach of the canonical rule.
///
/// The driver reads the client only while `wants_client_data()`; so does this. A session
/// that holds client input back until the driver says its output is written (a call
/// the `Session` trait does not have yet) merely gets fewer bytes here: no check
/// depends on it.
fn run(dialect: Dialect, offers: Offers, reads: &[Vec<u8>]) -> Result<(), String> {
    let mut session = session(dialect);
    let mut upstream = Canonical::new(dialect);
    let mut to_session = greeting(dialect, offers);
    let mut upstream_closed = false;
    let mut stopped = false;
    // Carries out the session's actions and gives it the upstream's answers, until
    // neither side has anything more to say (bounded: every answer needs a command).
    let mut pump = |session: &mut Box<dyn Session>,
                    upstream: &mut Canonical,
                    to_session: &mut Vec<u8>|
     -> Result<bool, String> {
        for _ in 0..10_000 {
            if !to_session.is_empty() {
                let bytes = std::mem::take(to_session);
                upstream.replied(&bytes);
                session.on_upstream_data(&bytes);
            }
            let mut hang_up = false;
            while let Some(action) = session.next_action() {
                match action {
                    Action::ToUpstream(bytes) => {
                        for received in upstream.forwarded(&bytes)? {
                            let (reply, close) = answer(dialect, offers, &received);
                            to_session.extend_from_slice(&reply);
                            hang_up |= close;
                        }
                    }
                    Action::StartTls { .. } => {
                        upstream.finish()?;
                        return Ok(true);
                    }
                    Action::Close | Action::Relay => return Ok(true),
                    Action::ToClient(_) | Action::Event(_) => {}
                }
            }
            if hang_up && !upstream_closed {
                upstream_closed = true;
                let bytes = std::mem::take(to_session);
                upstream.replied(&bytes);
                session.on_upstream_data(&bytes);
                session.on_upstream_eof();
                continue;
            }
            // As the driver does once it has written everything: a session that held
            // input back for its replies goes on.
            if session.on_output_written() {
                continue;
            }
            if to_session.is_empty() {
                return Ok(false);
            }
        }
        Err("the dialogue did not settle within 10,000 exchanges".to_owned())
    };
    stopped |= pump(&mut session, &mut upstream, &mut to_session)?;
    for read in reads {
        // The driver reads the client only while the session wants it.
        if stopped || !session.wants_client_data() {
            break;
        }
        session.on_client_data(read);
        stopped |= pump(&mut session, &mut upstream, &mut to_session)?;
    }
    if !stopped && session.wants_client_data() {
        session.on_client_eof();
        stopped |= pump(&mut session, &mut upstream, &mut to_session)?;
    }
    if !stopped {
        upstream.finish()?;
    }
    Ok(())
}

/// Every stream of `streams`, sent in one read each: all breaches are listed, not just
/// the first.
#[track_caller]
fn assert_canonical<S: AsRef<[u8]>>(dialect: Dialect, offers: Offers, streams: &[S]) {
    let breaches: Vec<String> = streams
        .iter()
        .filter_map(|stream| {
            let stream = stream.as_ref();
            run(dialect, offers, &[stream.to_vec()])
                .err()
                .map(|violation| format!("- client sent {}:\n  {violation}", show(stream)))
        })
        .collect();
    assert!(
        breaches.is_empty(),
        "{} of {} streams broke the canonical rule:\n{}",
        breaches.len(),
        streams.len(),
        breaches.join("\n")
    );
}

// ---------------------------------------------------------------- the known attacks

/// `head` (a line announcing a literal, `#` standing for its length) CRLF, then
/// `hidden` as the literal's octets.
fn literal_smuggle(head: &str, hidden: &str) -> Vec<u8> {
    let mut out = head.replace('#', &hidden.len().to_string()).into_bytes();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(hidden.as_bytes());
    out
}

#[test]
fn imap_allowed_verbs_ending_in_a_literal_hiding_a_login_are_never_forwarded() {
    let hidden = "b LOGIN alice alice-secret-pw\r\n";
    let streams: Vec<Vec<u8>> = [
        "a NOOP ~{#+}",
        "a NOOP {#+}",
        "a CAPABILITY {#+}",
        "a NOOP {#}",
        "a LOGOUT x {#+}",
        "a NOOP x {#+}",
        "a CAPABILITY ~{#}",
    ]
    .iter()
    .map(|head| literal_smuggle(head, hidden))
    .collect();
    assert_canonical(Dialect::Imap, ALL_OFFERS, &streams);
    let no_literal_plus = Offers {
        literal_plus: false,
        ..ALL_OFFERS
    };
    assert_canonical(Dialect::Imap, no_literal_plus, &streams);
}

#[test]
fn imap_allowed_verbs_go_upstream_only_in_canonical_form() {
    let streams: &[&[u8]] = &[
        b"a noop\r\n",
        b"a NOOP extra\r\n",
        b"a NOOP \r\n",
        b"a  NOOP\r\n",
        b"a CAPABILITY\tx\r\n",
        b"a NOOP\n",
        b"a{b NOOP\r\n",
        b"a\"b NOOP\r\n",
        b"a\\b NOOP\r\n",
        b"a%b NOOP\r\n",
        b"a(b NOOP\r\n",
        b"\x80 NOOP\r\n",
        b"a LOGOUT (x)\r\n",
    ];
    assert_canonical(Dialect::Imap, ALL_OFFERS, streams);
}

#[test]
fn pop3_allowed_verbs_go_upstream_only_alone_and_in_upper_case() {
    let streams: &[&[u8]] = &[
        b"CAPA x\r\n",
        b"NOOP USER alice\r\n",
        b"capa\r\n",
        b"Noop\r\n",
        b" CAPA\r\n",
        b"CAPA \r\n",
        b"CAPA\n",
        b"QUIT now\r\n",
        b"CAPA\tPASS secret\r\n",
    ];
    assert_canonical(Dialect::Pop3, ALL_OFFERS, streams);
}

#[test]
fn smtp_submission_allowed_verbs_go_upstream_only_in_canonical_form() {
    let streams: &[&[u8]] = &[
        b"ehlo client.example\r\n",
        b"EHLO\r\n",
        b"EHLO  client.example\r\n",
        b"EHLO client.example extra\r\n",
        b"EHLO client.example \r\n",
        b"EHLO \"quoted\"\r\n",
        b"EHLO a{5}\r\n",
        b"HELO client.example\tAUTH\r\n",
        b"NOOP AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"RSET x\r\n",
        b"  NOOP\r\n",
        b"QUIT\n",
    ];
    assert_canonical(Dialect::SmtpSubmission, ALL_OFFERS, streams);
}

#[test]
fn smtp_mx_envelope_commands_go_upstream_only_in_canonical_form() {
    let streams: &[&[u8]] = &[
        b"EHLO c.example\r\nmail from:<a@example.test>\r\n",
        b"EHLO c.example\r\nMAIL FROM: <a@example.test>\r\n",
        b"EHLO c.example\r\nMAIL FROM:<a@example.test>  SIZE=10\r\n",
        b"EHLO c.example\r\nMAIL FROM:a@example.test\r\n",
        b"EHLO c.example\r\nMAIL FROM:<@relay.example:a@example.test>\r\n",
        b"EHLO c.example\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test> {5+}\r\n",
        b"EHLO c.example\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA now\r\n",
        b"EHLO c.example\r\nVRFY a b\r\n",
        b"EHLO c.example\r\nHELO\r\n",
    ];
    assert_canonical(Dialect::SmtpMx, ALL_OFFERS, streams);
}

#[test]
fn smtp_mx_bodies_cannot_be_ended_early_by_an_upstream_dropping_nul_or_reading_bare_lf() {
    let transaction = "EHLO c.example\r\nMAIL FROM:<a@example.test>\r\n\
                       RCPT TO:<b@example.test>\r\nDATA\r\n";
    let streams: Vec<Vec<u8>> = [
        &b"Subject: x\r\n\r\nhello\r\n.\0\r\nMAIL FROM:<evil@example.test>\r\n.\r\n"[..],
        b"Subject: x\r\n\r\nhello\r\n\0.\r\nRSET\r\n.\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\x01\r\n.\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\x0b\n.\r\n",
        b"Subject: x\r\n\r\nhello\n.\n.\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\n.\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\r\r\n.\r\n",
    ]
    .iter()
    .map(|body| [transaction.as_bytes(), body, b"QUIT\r\n"].concat())
    .collect();
    assert_canonical(Dialect::SmtpMx, ALL_OFFERS, &streams);
}

#[test]
fn well_behaved_dialogues_are_canonical_already() {
    // The rule refuses nothing a real client needs: these pass on today's code.
    assert_canonical(
        Dialect::SmtpMx,
        ALL_OFFERS,
        &[
            b"EHLO c.example\r\nMAIL FROM:<a@example.test> BODY=8BITMIME\r\n\
          RCPT TO:<b@example.test>\r\nDATA\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n",
        ],
    );
    assert_canonical(
        Dialect::SmtpSubmission,
        ALL_OFFERS,
        &[b"EHLO c.example\r\nNOOP\r\nRSET\r\nSTARTTLS\r\n"],
    );
    assert_canonical(
        Dialect::Imap,
        ALL_OFFERS,
        &[b"a1 CAPABILITY\r\na2 NOOP\r\na3 ID NIL\r\na4 LOGIN alice secret\r\na5 STARTTLS\r\n"],
    );
    assert_canonical(
        Dialect::Pop3,
        ALL_OFFERS,
        &[b"CAPA\r\nNOOP\r\nUSER alice\r\nSTLS\r\n"],
    );
}

// ---------------------------------------------------------------- the properties

/// Bytes and words every protocol's parser must be careful with.
const DANGEROUS: &[&[u8]] = &[
    b"{",
    b"}",
    b"+",
    b"~",
    b"\0",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n",
    b".",
    b" ",
    b"  ",
    b"\t",
    b"\"",
    b"\\",
    b"(",
    b")",
    b"]",
    b"*",
    b"%",
    b"<",
    b">",
    b"@",
    b":",
    b"=",
    b"\x7f",
    b"\x80",
    b"\xc3\xa9",
    b"\x16\x03\x01",
    b"{5}",
    b"{5+}",
    b"~{5+}",
    b"{0}",
    b"{0+}",
    b"{31+}",
    b"5",
    b"0",
    b"x",
];

const SMTP_WORDS: &[&[u8]] = &[
    b"EHLO",
    b"HELO",
    b"ehlo",
    b"MAIL",
    b"RCPT",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"mail from:",
    b"DATA",
    b"data",
    b"BDAT",
    b"BDAT 5",
    b"BDAT 3 LAST",
    b"BDAT 0 LAST",
    b"NOOP",
    b"RSET",
    b"QUIT",
    b"STARTTLS",
    b"AUTH",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
    b"VRFY",
    b"EXPN",
    b"HELP",
    b"ETRN",
    b"XCLIENT",
    b"LAST",
    b"client.example",
    b"c_host",
    b"[127.0.0.1]",
    b"<a@example.test>",
    b"<>",
    b"<Postmaster>",
    b"SIZE=10",
    b"BODY=8BITMIME",
    b"\r\n.\r\n",
    b".\0\r\n",
    b"\0.\r\n",
    b"\n.\n",
    b"\r\n.\n",
    b".\r\r\n",
    b"..\r\n",
    b"EHLO c.example\r\n",
    b"MAIL FROM:<a@example.test>\r\n",
    b"RCPT TO:<b@example.test>\r\n",
    b"DATA\r\n",
    b"NOOP\r\n",
    b"RSET\r\n",
    b"EHLO c.example\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
];

const IMAP_WORDS: &[&[u8]] = &[
    b"a",
    b"b1",
    b"A001",
    b"x]",
    b"*",
    b"+",
    b"CAPABILITY",
    b"NOOP",
    b"LOGOUT",
    b"capability",
    b"noop",
    b"LOGIN",
    b"AUTHENTICATE PLAIN",
    b"ID NIL",
    b"ID (\"name\" \"x\")",
    b"STARTTLS",
    b"SELECT INBOX",
    b"alice",
    b"alice-secret-pw",
    b"a NOOP\r\n",
    b"a CAPABILITY\r\n",
    b"b LOGIN alice alice-secret-pw\r\n",
    b"a NOOP ~{31+}\r\nb LOGIN alice alice-secret-pw\r\n",
    b"a CAPABILITY {31+}\r\nb LOGIN alice alice-secret-pw\r\n",
    b"a NOOP {5}\r\n",
];

const POP3_WORDS: &[&[u8]] = &[
    b"CAPA",
    b"NOOP",
    b"QUIT",
    b"capa",
    b"noop",
    b"USER",
    b"USER alice",
    b"PASS",
    b"PASS alice-secret-pw",
    b"APOP",
    b"AUTH PLAIN",
    b"STLS",
    b"STAT",
    b"RETR 1",
    b"alice",
    b"CAPA\r\n",
    b"NOOP\r\n",
    b"CAPA x\r\n",
    b"NOOP\r\nUSER alice\r\n",
];

/// A client stream: words and dangerous bytes, with now and then an arbitrary byte.
fn stream(words: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        4 => proptest::sample::select(DANGEROUS).prop_map(<[u8]>::to_vec),
        4 => proptest::sample::select(words).prop_map(<[u8]>::to_vec),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ];
    proptest::collection::vec(token, 0..48).prop_map(|tokens| tokens.concat())
}

/// Cuts `stream` at the given (sorted, clamped) points: the reads the driver would make.
fn reads(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([stream.len()]) {
        out.push(stream[start..cut].to_vec());
        start = cut;
    }
    out
}

fn offers() -> impl Strategy<Value = Offers> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(literal_plus, pipelining, chunking)| Offers {
            literal_plus,
            pipelining,
            chunking,
        },
    )
}

fn property(
    dialect: Dialect,
    offers: Offers,
    stream: &[u8],
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    run(dialect, offers, &reads(stream, cuts)).map_err(|violation| {
        TestCaseError::fail(format!("client sent {}:\n{violation}", show(stream)))
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Failures are reported with their minimal input; no files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn smtp_submission_forwards_only_canonical_commands_before_tls(
        stream in stream(SMTP_WORDS),
        cuts in proptest::collection::vec(0usize..400, 0..6),
        offers in offers(),
    ) {
        property(Dialect::SmtpSubmission, offers, &stream, &cuts)?;
    }

    #[test]
    fn smtp_mx_forwards_only_canonical_commands_and_unambiguous_bodies(
        stream in stream(SMTP_WORDS),
        cuts in proptest::collection::vec(0usize..400, 0..6),
        offers in offers(),
    ) {
        property(Dialect::SmtpMx, offers, &stream, &cuts)?;
    }

    #[test]
    fn imap_forwards_only_canonical_commands_before_tls(
        stream in stream(IMAP_WORDS),
        cuts in proptest::collection::vec(0usize..400, 0..6),
        offers in offers(),
    ) {
        property(Dialect::Imap, offers, &stream, &cuts)?;
    }

    #[test]
    fn pop3_forwards_only_canonical_commands_before_tls(
        stream in stream(POP3_WORDS),
        cuts in proptest::collection::vec(0usize..400, 0..6),
        offers in offers(),
    ) {
        property(Dialect::Pop3, offers, &stream, &cuts)?;
    }
}
