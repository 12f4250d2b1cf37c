//! ARCHITECTURE.md §3's canonical rule against a second real legacy server, GNU Mailutils 3.15
//! (`imap4d`, `pop3d`; `tests/common/mailutils.rs`), the one the issue names besides
//! Dovecot: its IMAP parser reads the octets of a literal placed where its grammar allows
//! none as commands, so a LOGIN hidden there ran before TLS through mailmoat.
//!
//! First the control: the attacks, sent straight to imap4d and pop3d (no mailmoat), and
//! which of them log the hidden user (bob) in. imap4d falls for a LOGIN after a
//! `literal8` header it does not know (`a NOOP ~{40+}`, on any verb, with or without
//! `+`) and after a bare LF (`a NOOP` LF `b LOGIN ...`); it reads `{40+}`, `{40}` and
//! `x {40+}` as the literals they are, and refuses the command whole. pop3d refuses junk
//! arguments (`CAPA USER bob`: `-ERR Invalid arguments`) but ends a line at a bare LF, so
//! `CAPA` LF `USER bob` LF `PASS ...` logs in. The control pins exactly that, so the
//! attacks below are known to be real against this server.
//!
//! Then the same bytes through mailmoat's STARTTLS listeners (policy `require_tls`),
//! with a recording forwarder on the upstream leg (`common::recorder`) whose port names
//! the server's log of that connection. For every variant, all together (one run names
//! every variant that gets through): the client gets no tagged OK for the hidden tag; the
//! server logs no login of bob and reads, before the real login, only canonical
//! `TAG VERB` lines (IMAP `CAPABILITY`/`NOOP`/`LOGOUT`, POP3 `CAPA`/`NOOP`/`QUIT`); the
//! upstream leg before TLS passes the strict reader of `tests/fuzz/src/canonical.rs`;
//! mailmoat logs `plaintext_command_refused` (except for a POP3 line with a bare CR or a
//! NUL, which is no command to mailmoat: `-ERR Syntax error`, no event); and afterwards,
//! in the same connection, STARTTLS and alice's real login work (the server logs it).
//! Each IMAP attack starts with the `x CAPABILITY` an attacker sends first, so that
//! mailmoat has seen imap4d's LITERAL+: mailmoat as it was before the fix (the parent of
//! the commit "Before TLS the upstream hears only what mailmoat writes") then forwarded
//! `a NOOP ~{40+}` with its octets, the client got `b OK LOGIN Completed` and imap4d
//! logged ``user `bob' logged in`` (the `~{40+}` variants on NOOP, CAPABILITY and
//! LOGOUT; the `{40}` one carried the LOGIN's octets upstream too, as literal data).
//!
//! Mailutils ends some lines with a bare LF (`a OK AUTHENTICATE PLAIN authentication
//! successful` LF): after STARTTLS, an AUTHENTICATE PLAIN through mailmoat gets that line
//! byte for byte, and the session goes on.

mod common;

#[allow(dead_code)]
#[path = "fuzz/src/canonical.rs"]
mod canonical;

use std::net::SocketAddr;

use base64::Engine;
use canonical::{Canonical, Dialect, show};
use common::canonical_e2e::{
    Attacked, Lines, Login, WellBehaved, imap_attack, imap_well_behaved, pop3_attack,
    pop3_well_behaved, tagged, tls_lines,
};
use common::mailutils::{
    HIDDEN_PASSWORD, HIDDEN_USER, Mailutils, PASSWORD, Program, USER, commands, logins,
};
use common::recorder::{Leg, Recorder};
use common::*;
use tokio::net::TcpStream;

/// The local part Mailutils logs for the hidden user.
const HIDDEN: &str = "bob";
/// The local part Mailutils logs for the real user.
const REAL: &str = "alice";

// ---------------------------------------------------------------- the attacks

/// An IMAP attack: `head` ends the first line (`#` stands for the length of the hidden
/// LOGIN line), then the hidden `b LOGIN bob ...` line.
struct ImapVariant {
    head: &'static str,
    /// The client waits for a reply after the head (a synchronising literal).
    synchronising: bool,
    /// imap4d, reached directly, runs the hidden LOGIN (what the control pins).
    imap4d_falls: bool,
}

const IMAP_VARIANTS: &[ImapVariant] = &[
    ImapVariant {
        head: "a NOOP ~{#+}\r\n",
        synchronising: false,
        imap4d_falls: true,
    },
    ImapVariant {
        head: "a CAPABILITY ~{#+}\r\n",
        synchronising: false,
        imap4d_falls: true,
    },
    ImapVariant {
        head: "a LOGOUT ~{#+}\r\n",
        synchronising: false,
        imap4d_falls: true,
    },
    ImapVariant {
        head: "a NOOP ~{#}\r\n",
        synchronising: true,
        imap4d_falls: true,
    },
    ImapVariant {
        head: "a NOOP\n",
        synchronising: false,
        imap4d_falls: true,
    },
    ImapVariant {
        head: "a NOOP {#+}\r\n",
        synchronising: false,
        imap4d_falls: false,
    },
    ImapVariant {
        head: "a CAPABILITY {#+}\r\n",
        synchronising: false,
        imap4d_falls: false,
    },
    ImapVariant {
        head: "a NOOP x {#+}\r\n",
        synchronising: false,
        imap4d_falls: false,
    },
    ImapVariant {
        head: "a CAPABILITY x {#+}\r\n",
        synchronising: false,
        imap4d_falls: false,
    },
    ImapVariant {
        head: "a NOOP {#}\r\n",
        synchronising: true,
        imap4d_falls: false,
    },
];

/// What an IMAP attacker sends first, and waits for: the upstream's capabilities pass
/// through mailmoat (LITERAL+ among them), so that a proxy that honours `{n+}` only where
/// the upstream announced it takes the attack's literal for one. Before the fix of the
/// issue, mailmoat then forwarded `a NOOP ~{40+}` and its octets, and imap4d logged bob
/// in; without the CAPABILITY that mailmoat refused the `+` literal for want of LITERAL+.
const CAPABILITY_FIRST: &[u8] = b"x CAPABILITY\r\n";

fn hidden_login() -> String {
    format!("b LOGIN {HIDDEN_USER} {HIDDEN_PASSWORD}\r\n")
}

impl ImapVariant {
    fn head(&self) -> String {
        self.head.replace('#', &hidden_login().len().to_string())
    }

    fn name(&self) -> String {
        format!("{:?} + {:?}", self.head(), hidden_login())
    }
}

/// A POP3 attack: credentials behind allowed verbs, in their arguments or after a line
/// end only some parsers see.
struct Pop3Variant {
    bytes: &'static str,
    /// pop3d, reached directly, logs bob in.
    pop3d_falls: bool,
    /// mailmoat reads a command in it and logs `plaintext_command_refused`. A line with
    /// a bare CR or a NUL is no command to mailmoat at all: `-ERR Syntax error`, answered
    /// locally like any line it cannot parse, and no event.
    refusal_event: bool,
}

const POP3_VARIANTS: &[Pop3Variant] = &[
    Pop3Variant {
        bytes: "CAPA x\r\n",
        pop3d_falls: false,
        refusal_event: true,
    },
    Pop3Variant {
        bytes: "CAPA USER bob@example.test\r\nCAPA PASS bob-secret-pw\r\n",
        pop3d_falls: false,
        refusal_event: true,
    },
    Pop3Variant {
        bytes: "NOOP USER bob@example.test\r\nNOOP PASS bob-secret-pw\r\n",
        pop3d_falls: false,
        refusal_event: true,
    },
    Pop3Variant {
        bytes: "CAPA\tUSER bob@example.test\r\nCAPA\tPASS bob-secret-pw\r\n",
        pop3d_falls: false,
        refusal_event: true,
    },
    Pop3Variant {
        bytes: "CAPA\rUSER bob@example.test\r\nCAPA\rPASS bob-secret-pw\r\n",
        pop3d_falls: false,
        refusal_event: false,
    },
    Pop3Variant {
        bytes: "CAPA\0USER bob@example.test\r\nCAPA\0PASS bob-secret-pw\r\n",
        pop3d_falls: false,
        refusal_event: false,
    },
    Pop3Variant {
        bytes: "CAPA\nUSER bob@example.test\nPASS bob-secret-pw\n",
        pop3d_falls: true,
        refusal_event: true,
    },
];

// ---------------------------------------------------------------- the control

/// One attack straight to the server: the replies and the session's log. An IMAP
/// attack starts with the CAPABILITY an attacker asks first ([`CAPABILITY_FIRST`]).
async fn direct(
    mailutils: &Mailutils,
    program: Program,
    greeting: &str,
    attack: &[u8],
    closing: &[u8],
    last: impl Fn(&str) -> bool,
) -> (Vec<String>, String) {
    let addr = match program {
        Program::Imap4d => mailutils.imap,
        Program::Pop3d => mailutils.pop3,
    };
    let tcp = within(TcpStream::connect(addr)).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut client = Lines::new(tcp);
    let first = client.line().await.unwrap();
    assert!(first.starts_with(greeting), "{first:?}");
    let mut replies = Vec::new();
    if program == Program::Imap4d {
        client.send(CAPABILITY_FIRST).await.unwrap();
        replies.extend(client.until(tagged("x")).await);
    }
    client.send(attack).await.unwrap();
    client.send(closing).await.unwrap();
    replies.extend(client.until(last).await);
    drop(client);
    (replies, mailutils.finished_session_log(program, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_imap4d_reached_directly_runs_a_login_hidden_after_a_literal8_or_a_bare_lf() {
    let mailutils = Mailutils::start();
    let mut report = String::new();
    let mut wrong = 0;
    for variant in IMAP_VARIANTS {
        let attack = format!("{}{}", variant.head(), hidden_login());
        let (replies, log) = direct(
            &mailutils,
            Program::Imap4d,
            "* OK ",
            attack.as_bytes(),
            b"\r\nc NOOP\r\nz LOGOUT\r\n",
            tagged("z"),
        )
        .await;
        let told = replies.iter().any(|l| l.starts_with("b OK"));
        let logged = logins(&log).contains(&HIDDEN.to_owned());
        let fell = told && logged;
        if fell != variant.imap4d_falls || told != logged {
            wrong += 1;
        }
        report.push_str(&format!(
            "\n== {} -> {} (expected {})\n   replies: {replies:?}\n   imap4d read: {:?}\n",
            variant.name(),
            if fell { "LOGGED IN" } else { "refused" },
            if variant.imap4d_falls {
                "LOGGED IN"
            } else {
                "refused"
            },
            commands(&log)
        ));
    }
    // Printed on success too (`--nocapture`): the evidence of which variants are real.
    println!("imap4d, reached directly:{report}");
    assert_eq!(wrong, 0, "imap4d, reached directly:{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_pop3d_reached_directly_refuses_junk_arguments_but_splits_at_a_bare_lf() {
    let mailutils = Mailutils::start();
    let mut report = String::new();
    let mut wrong = 0;
    for variant in POP3_VARIANTS {
        // STAT answers +OK only in the TRANSACTION state (after a login); the client
        // reads up to the end of the connection, which pop3d closes after QUIT.
        let (replies, log) = direct(
            &mailutils,
            Program::Pop3d,
            "+OK",
            variant.bytes.as_bytes(),
            b"STAT\r\nQUIT\r\n",
            |_| false,
        )
        .await;
        let logged = logins(&log).contains(&HIDDEN.to_owned());
        let opened = replies.iter().any(|l| l.starts_with("+OK opened mailbox"));
        if logged != variant.pop3d_falls || opened != logged {
            wrong += 1;
        }
        report.push_str(&format!(
            "\n== {:?} -> {} (expected {})\n   replies: {replies:?}\n   pop3d read: {:?}\n",
            variant.bytes,
            if logged { "LOGGED IN" } else { "refused" },
            if variant.pop3d_falls {
                "LOGGED IN"
            } else {
                "refused"
            },
            commands(&log)
        ));
    }
    println!("pop3d, reached directly:{report}");
    assert_eq!(wrong, 0, "pop3d, reached directly:{report}");
}

// ---------------------------------------------------------------- through mailmoat

/// mailmoat's IMAP and POP3 STARTTLS listeners in front of Mailutils, each through a
/// recording forwarder. Fields drop in this order: mailmoat first, Mailutils last.
struct Rig {
    mailmoat: Mailmoat,
    imap: Recorder,
    pop3: Recorder,
    mailutils: Mailutils,
}

fn rig() -> Rig {
    let mailutils = Mailutils::start();
    let imap = Recorder::start(mailutils.imap);
    let pop3 = Recorder::start(mailutils.pop3);
    let mailmoat = Mailmoat::start(&[
        ("imap", "imap", "starttls", "require_tls", imap.addr),
        ("pop3", "pop3", "starttls", "require_tls", pop3.addr),
    ]);
    Rig {
        mailmoat,
        imap,
        pop3,
        mailutils,
    }
}

impl Rig {
    fn addr(&self, listener: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mailmoat.port(listener)))
    }
}

/// The strict reader's verdict on the upstream leg's bytes before TLS.
fn judge(dialect: Dialect, bytes: &[u8]) -> Result<(), String> {
    let mut reader = Canonical::new(dialect);
    reader.forwarded(bytes)?;
    reader.finish()
}

/// A command line as the server logged it is canonical: `TAG VERB` (IMAP) or `VERB`
/// (POP3), with an allowed verb and nothing else.
fn canonical_line(program: Program, line: &str) -> bool {
    match program {
        Program::Imap4d => line.split_once(' ').is_some_and(|(tag, verb)| {
            !tag.is_empty()
                && tag.bytes().all(|b| b.is_ascii_alphanumeric())
                && ["CAPABILITY", "NOOP", "LOGOUT"].contains(&verb)
        }),
        Program::Pop3d => ["CAPA", "NOOP", "QUIT"].contains(&line),
    }
}

/// The line that starts alice's login, as the server logged it (`l LOGIN
/// alice@example.test "***"`, `USER alice@example.test`).
fn real_login(program: Program, line: &str) -> bool {
    let words: Vec<&str> = line.split(' ').collect();
    match program {
        Program::Imap4d => words.len() > 2 && words[1] == "LOGIN" && words[2] == USER,
        Program::Pop3d => words == ["USER", USER],
    }
}

/// The real user, as the attacks log in after TLS.
const LOGIN: Login = Login {
    user: USER,
    password: PASSWORD,
};

/// What one variant did, on every side; the server's part is the session's log.
type Seen = common::canonical_e2e::Seen<String>;

/// The client's side is over: joins the session to its upstream leg (mailmoat's
/// `upstream_port`) and reads that leg as it was before TLS, the server's log of the
/// connection (complete once the server's process has exited) and mailmoat's log.
async fn settle(seen: &mut Seen, rig: &Rig, program: Program, attacked: Attacked) {
    let dialect = match program {
        Program::Imap4d => Dialect::Imap,
        Program::Pop3d => Dialect::Pop3,
    };
    seen.settle(
        &rig.mailmoat,
        attacked,
        show,
        |bytes| judge(dialect, bytes),
        async |leg: &Leg, after_tls: Result<(), String>| {
            let log = rig
                .mailutils
                .finished_session_log(program, leg.upstream_port);
            (after_tls, log)
        },
    )
    .await;
}

fn problems(seen: &Seen, program: Program, hidden_tag: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    seen.told_logged_in(&mut out, |l| {
        hidden_tag.is_some_and(|tag| l.starts_with(&format!("{tag} OK")))
            || l.starts_with("+OK opened mailbox")
    });
    let logins = logins(&seen.server);
    if logins.contains(&HIDDEN.to_owned()) {
        out.push(format!("{} logged bob in", program.name()));
    }
    if logins != [REAL] {
        out.push(format!(
            "{} logged in {logins:?}, not alice alone after TLS",
            program.name()
        ));
    }
    // Everything the server read before alice's login came before TLS (or is
    // mailmoat's own canonical command after it).
    let read = commands(&seen.server);
    let before_login: Vec<&String> = read
        .iter()
        .take_while(|c| !real_login(program, c))
        .collect();
    let strange: Vec<&&String> = before_login
        .iter()
        .filter(|c| !canonical_line(program, c))
        .collect();
    if !strange.is_empty() {
        out.push(format!(
            "{} read non-canonical commands before the real login: {strange:?}",
            program.name()
        ));
    }
    seen.leg_problems(
        &mut out,
        &["LOGIN", "USER", "PASS", HIDDEN_USER, HIDDEN_PASSWORD],
        false,
    );
    out
}

/// No password, no hidden user name and no SASL response in mailmoat's trace-level log
/// (ARCHITECTURE.md §3: a user name refused before TLS is logged as a keyed hash).
#[track_caller]
fn assert_no_secret_logged(rig: &Rig) {
    let log = rig.mailmoat.log_text();
    for secret in [PASSWORD, HIDDEN_PASSWORD, HIDDEN_USER, &plain_response()] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(secret)).take(3).collect();
        assert!(
            lines.is_empty(),
            "{secret:?} is in mailmoat's log: {lines:#?}"
        );
    }
}

/// alice's AUTHENTICATE PLAIN response (RFC 4616).
fn plain_response() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"))
}

#[track_caller]
fn assert_all_clean(program: Program, seen: &[Seen], hidden_tag: Option<&str>) {
    let mut report = String::new();
    let mut failed = 0;
    for seen in seen {
        let problems = problems(seen, program, hidden_tag);
        report.push_str(&format!(
            "\n== {} -> {}\n   client got: {:?}\n   upstream leg before TLS: {}\n   {} read: {:?}\n",
            seen.variant,
            if problems.is_empty() { "clean" } else { "BROKEN" },
            seen.replies,
            seen.upstream_before_tls,
            program.name(),
            commands(&seen.server)
        ));
        if !problems.is_empty() {
            failed += 1;
        }
        for problem in problems {
            report.push_str(&format!("   - {problem}\n"));
        }
    }
    println!("{} through mailmoat:{report}", program.name());
    assert!(
        failed == 0,
        "{}: {failed} of {} variants broke the canonical rule:{report}",
        program.name(),
        seen.len()
    );
}

async fn imap_variant(rig: &Rig, variant: &ImapVariant) -> Seen {
    let mut seen = Seen::new(variant.name());
    let attacked = imap_attack(
        rig.addr("imap"),
        &rig.imap,
        Some(CAPABILITY_FIRST),
        &variant.head(),
        variant.synchronising,
        &hidden_login(),
        LOGIN,
    )
    .await;
    settle(&mut seen, rig, Program::Imap4d, attacked).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_a_login_hidden_after_a_literal_or_a_bare_lf_never_reaches_imap4d() {
    let rig = rig();
    let mut seen = Vec::new();
    for variant in IMAP_VARIANTS {
        seen.push(imap_variant(&rig, variant).await);
    }
    assert_all_clean(Program::Imap4d, &seen, Some("b"));
    assert_no_secret_logged(&rig);
}

async fn pop3_variant(rig: &Rig, variant: &Pop3Variant) -> Seen {
    let mut seen = Seen::new(format!("{:?}", variant.bytes));
    seen.refusal_expected = variant.refusal_event;
    let attacked = pop3_attack(
        rig.addr("pop3"),
        &rig.pop3,
        variant.bytes,
        LOGIN,
        "+OK opened mailbox",
    )
    .await;
    settle(&mut seen, rig, Program::Pop3d, attacked).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_credentials_behind_allowed_commands_never_reach_pop3d() {
    let rig = rig();
    let mut seen = Vec::new();
    for variant in POP3_VARIANTS {
        seen.push(pop3_variant(&rig, variant).await);
    }
    assert_all_clean(Program::Pop3d, &seen, None);
    assert_no_secret_logged(&rig);
}

// ---------------------------------------------------------------- well-behaved clients

/// A well-behaved session through the rig, settled: no refusal logged for it, exactly
/// `upstream` crossed the upstream leg before TLS, and no check finds a problem.
async fn assert_well_behaved(
    rig: &Rig,
    program: Program,
    name: &str,
    client: SocketAddr,
    before_tls: &[Leg],
    upstream: &[u8],
) {
    let mut seen = Seen::new(name.into());
    seen.refusal_expected = false;
    let attacked = Attacked {
        client,
        replies: Vec::new(),
        before_tls: before_tls.to_vec(),
        after_tls: Ok(()),
    };
    settle(&mut seen, rig, program, attacked).await;
    assert!(
        !seen.refusal_logged,
        "a refusal logged for a well-behaved client"
    );
    assert_eq!(seen.upstream_before_tls, show(upstream));
    let problems = problems(&seen, program, None);
    assert!(problems.is_empty(), "{problems:#?}\n{}", seen.server);
}

/// The harness itself: canonical dialogues through the same rig pass every check above
/// (they must not fail for reasons of their own), and reach the mailboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_passes_a_well_behaved_imap_and_pop3_client() {
    let rig = rig();

    let (
        WellBehaved {
            client: client_addr,
            before_tls,
            mut tls,
        },
        replies,
    ) = imap_well_behaved(rig.addr("imap"), &rig.imap).await;
    let capability = replies.iter().find(|l| l.starts_with("* CAPABILITY"));
    assert!(
        capability.is_some_and(|l| l.contains(" STARTTLS") && l.contains("LOGINDISABLED")),
        "{replies:?}"
    );
    tls.send(format!("l LOGIN {USER} {PASSWORD}\r\nm SELECT INBOX\r\nz LOGOUT\r\n").as_bytes())
        .await
        .unwrap();
    let session = tls.until(tagged("z")).await;
    assert!(
        session.iter().any(|l| l.starts_with("l OK"))
            && session
                .iter()
                .any(|l| l.starts_with("m OK [READ-WRITE] SELECT")),
        "{session:?}"
    );
    assert_well_behaved(
        &rig,
        Program::Imap4d,
        "well-behaved IMAP",
        client_addr,
        &before_tls,
        b"a CAPABILITY\r\nb NOOP\r\n",
    )
    .await;

    let WellBehaved {
        client: client_addr,
        before_tls,
        mut tls,
    } = pop3_well_behaved(rig.addr("pop3"), &rig.pop3).await;
    tls.send(format!("USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n").as_bytes())
        .await
        .unwrap();
    let session = tls.until(|_| false).await;
    assert_eq!(session[0], "+OK\r\n", "{session:?}");
    assert_eq!(
        session[1], "+OK opened mailbox for alice\r\n",
        "{session:?}"
    );
    assert_eq!(session[2], "+OK 0 0\r\n", "{session:?}");
    assert_well_behaved(
        &rig,
        Program::Pop3d,
        "well-behaved POP3",
        client_addr,
        &before_tls,
        b"CAPA\r\n",
    )
    .await;
    assert_no_secret_logged(&rig);
}

/// imap4d ends its tagged OK to a successful AUTHENTICATE with a bare LF; after STARTTLS
/// mailmoat relays that line byte for byte, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_authenticate_after_starttls_relays_imap4ds_bare_lf_ok_unchanged() {
    let rig = rig();
    let tcp = traceable_tcp(rig.addr("imap")).await;
    let mut client = Lines::new(tcp);
    assert!(client.line().await.unwrap().starts_with("* OK "));
    client.send(b"s STARTTLS\r\n").await.unwrap();
    assert!(client.line().await.unwrap().starts_with("s OK"));
    let mut tls = tls_lines(client).await.unwrap();
    tls.send(b"a AUTHENTICATE PLAIN\r\n").await.unwrap();
    let go_ahead = tls.line().await.unwrap();
    assert!(go_ahead.starts_with('+'), "{go_ahead:?}");
    tls.send(format!("{}\r\n", plain_response()).as_bytes())
        .await
        .unwrap();
    let ok = tls.until(tagged("a")).await;
    assert_eq!(
        ok.last().unwrap(),
        "a OK AUTHENTICATE PLAIN authentication successful\n",
        "{ok:?}"
    );
    tls.send(b"b SELECT INBOX\r\nz LOGOUT\r\n").await.unwrap();
    let rest = tls.until(tagged("z")).await;
    assert!(
        rest.iter()
            .any(|l| l.starts_with("b OK [READ-WRITE] SELECT"))
            && rest.last().unwrap().starts_with("z OK"),
        "{rest:?}"
    );
    assert_no_secret_logged(&rig);
}
