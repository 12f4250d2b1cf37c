//! ARCHITECTURE.md §3's canonical rule against the real legacy Dovecot of `scripts/legacy.sh`:
//! through mailmoat's STARTTLS listeners, before TLS, a client sends an allow-listed
//! command whose line ends in a literal the grammar does not allow there, with a real
//! `LOGIN` hidden in the literal's octets (`a NOOP ~{31+}` CRLF `b LOGIN bob ...`): an
//! upstream that skips the rest of a line it cannot parse reads the octets as its next
//! command. POP3 gets the same treatment with its allowed verbs and junk arguments.
//!
//! Between mailmoat and Dovecot runs a recording forwarder (`common::recorder`) that
//! records every byte of the upstream leg; the harness is `common::canonical_e2e`. For each variant the test collects what it saw and
//! asserts, for all variants together (so one run names every variant that gets through):
//!
//! - the client got no tagged OK for the hidden tag and no `Logged in`;
//! - Dovecot's log (`auth_verbose`, each line carrying the upstream leg's port, `rport`)
//!   shows no login of the hidden user (bob) for that connection;
//! - the upstream leg before TLS holds only canonical commands (the strict reader of
//!   `tests/fuzz/src/canonical.rs`), no `LOGIN`, `USER` or `PASS`;
//! - mailmoat logged `plaintext_command_refused` for the session;
//! - afterwards, in the same connection, STARTTLS and a real login as alice work, and
//!   Dovecot logs alice's login for that connection.
//!
//! The hidden user is bob, the real one alice (both from legacy.sh), so the one login
//! Dovecot must log per connection is alice's, after TLS: waiting for it (bounded) also
//! makes sure the log holds everything before it.

mod common;

#[allow(dead_code)]
#[path = "fuzz/src/canonical.rs"]
mod canonical;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use canonical::{Canonical, Dialect, show};
use common::canonical_e2e::{
    Attacked, Login, WellBehaved, imap_attack, imap_well_behaved, pop3_attack, pop3_well_behaved,
    session_leg, tagged,
};
use common::recorder::{Leg, Recorder};
use common::*;

const HIDDEN_USER: &str = "bob@example.test";
const HIDDEN_PASSWORD: &str = "bob-secret-pw";
const USER: &str = "alice@example.test";
const PASSWORD: &str = "alice-secret-pw";

/// A legacy instance of this binary's own whose Dovecot names the remote port of each
/// connection in its login lines, so that a line can be tied to one upstream leg.
fn legacy() -> &'static Legacy {
    static LEGACY: OnceLock<Legacy> = OnceLock::new();
    LEGACY.get_or_init(|| {
        Legacy::start(
            "",
            "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} lip=%l \
             mpid=%e %c session=<%{session}>",
        )
    })
}

/// Dovecot's log lines about the connection from `port` (the forwarder's end).
fn dovecot_lines(port: u16) -> Vec<String> {
    let log = std::fs::read_to_string(&legacy().dovecot_log).unwrap_or_default();
    let needle = format!("rport={port},");
    log.lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) for Dovecot to log the login of `user` on the connection from `port`;
/// returns every line of that connection, or an error naming them.
async fn wait_for_dovecot_login(port: u16, user: &str) -> Result<Vec<String>, String> {
    let login = format!("Login: user=<{user}>");
    poll_for_async(Duration::from_secs(10), async || {
        let lines = dovecot_lines(port);
        lines.iter().any(|l| l.contains(&login)).then_some(lines)
    })
    .await
    .ok_or_else(|| {
        format!(
            "Dovecot logged no {login:?} for rport={port}; its lines for it: {:#?}",
            dovecot_lines(port)
        )
    })
}

/// The real user, as the attacks log in after TLS.
const LOGIN: Login = Login {
    user: USER,
    password: PASSWORD,
};

/// mailmoat with STARTTLS listeners for IMAP and POP3, each through its own recording
/// forwarder to the legacy Dovecot.
fn setup() -> (Mailmoat, Recorder, Recorder) {
    let legacy = legacy();
    let imap = Recorder::start(legacy.imap);
    let pop3 = Recorder::start(legacy.pop3);
    let mailmoat = Mailmoat::start(&[
        ("imap", "imap", "starttls", "require_tls", imap.addr),
        ("pop3", "pop3", "starttls", "require_tls", pop3.addr),
    ]);
    (mailmoat, imap, pop3)
}

fn addr(mailmoat: &Mailmoat, listener: &str) -> SocketAddr {
    ([127, 0, 0, 1], mailmoat.port(listener)).into()
}

/// What one variant did; Dovecot's part is its lines for this connection that log the
/// hidden user's login.
type Seen = common::canonical_e2e::Seen<Vec<String>>;

/// The session is over on the client's side: joins it with its upstream leg (by the
/// `upstream_port` of mailmoat's log) and reads that leg, Dovecot's log and mailmoat's
/// log.
async fn settle(
    mailmoat: &Mailmoat,
    dialect: Dialect,
    variant: String,
    attacked: Attacked,
) -> Seen {
    let mut seen = Seen::new(variant);
    seen.settle(
        mailmoat,
        attacked,
        show,
        |bytes| judge(dialect, bytes),
        async |leg: &Leg, after_tls: Result<(), String>| {
            let rport = leg.upstream_port;
            // The real login is the one Dovecot must log for this connection; once it is
            // there, so is anything logged before it.
            let after_tls = match after_tls {
                Ok(()) => wait_for_dovecot_login(rport, USER).await.map(|_| ()),
                Err(e) => Err(e),
            };
            let hidden_logins = dovecot_lines(rport)
                .into_iter()
                .filter(|l| l.contains(&format!("Login: user=<{HIDDEN_USER}>")))
                .collect();
            (after_tls, hidden_logins)
        },
    )
    .await;
    seen
}

fn problems(seen: &Seen, hidden_tag: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    seen.told_logged_in(&mut out, |l| {
        l.contains("Logged in") || hidden_tag.is_some_and(|tag| l.starts_with(&format!("{tag} OK")))
    });
    if !seen.server.is_empty() {
        out.push(format!(
            "Dovecot logged the hidden login: {:?}",
            seen.server
        ));
    }
    seen.leg_problems(&mut out, &["LOGIN", "USER ", "PASS "], true);
    out
}

/// Judges the upstream leg's bytes before TLS with the strict reader.
fn judge(dialect: Dialect, bytes: &[u8]) -> Result<(), String> {
    let mut reader = Canonical::new(dialect);
    reader.forwarded(bytes)?;
    reader.finish()
}

#[track_caller]
fn assert_all_clean(protocol: &str, seen: &[(Seen, Option<&str>)]) {
    let mut report = String::new();
    let mut failed = 0;
    for (seen, hidden_tag) in seen {
        let problems = problems(seen, *hidden_tag);
        if problems.is_empty() {
            continue;
        }
        failed += 1;
        report.push_str(&format!(
            "\n== {}\n   client got: {:?}\n   upstream leg before TLS: {}\n",
            seen.variant, seen.replies, seen.upstream_before_tls
        ));
        for problem in problems {
            report.push_str(&format!("   - {problem}\n"));
        }
    }
    assert!(
        failed == 0,
        "{protocol}: {failed} of {} variants broke the canonical rule:{report}",
        seen.len()
    );
}

// ---------------------------------------------------------------- IMAP

/// The IMAP variants: a line that ends in a literal (`#` is its length) where the
/// grammar allows none, and whether the client waits for `+` before the octets.
const IMAP_VARIANTS: &[(&str, bool)] = &[
    ("a NOOP ~{#+}", false),
    ("a CAPABILITY {#+}", false),
    ("a NOOP {#}", true),
    ("a LOGOUT x {#+}", false),
    ("a NOOP x {#+}", false),
    ("a CAPABILITY ~{#+}", false),
];

async fn imap_variant(
    mailmoat: &Mailmoat,
    recorder: &Recorder,
    head: &str,
    synchronising: bool,
) -> Seen {
    let hidden = format!("b LOGIN {HIDDEN_USER} {HIDDEN_PASSWORD}\r\n");
    let head = head.replace('#', &hidden.len().to_string());
    let variant = format!("{head:?} + {hidden:?}");
    // The attack: the literal's octets are a LOGIN line of their own.
    let attacked = imap_attack(
        addr(mailmoat, "imap"),
        recorder,
        None,
        &format!("{head}\r\n"),
        synchronising,
        &hidden,
        LOGIN,
    )
    .await;
    settle(mailmoat, Dialect::Imap, variant, attacked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_a_login_hidden_in_a_literal_of_an_allowed_command_never_reaches_dovecot() {
    let (mailmoat, imap, _pop3) = setup();
    let mut seen = Vec::new();
    for (head, synchronising) in IMAP_VARIANTS {
        seen.push((
            imap_variant(&mailmoat, &imap, head, *synchronising).await,
            Some("b"),
        ));
    }
    assert_all_clean("IMAP", &seen);
}

// ---------------------------------------------------------------- POP3

/// The POP3 variants: allowed verbs with junk, credentials in the junk.
const POP3_VARIANTS: &[&str] = &[
    "CAPA x\r\n",
    "NOOP USER bob@example.test\r\nNOOP PASS bob-secret-pw\r\n",
    "capa USER bob@example.test\r\nnoop PASS bob-secret-pw\r\n",
    "CAPA\tUSER bob@example.test\r\nCAPA\tPASS bob-secret-pw\r\n",
];

async fn pop3_variant(mailmoat: &Mailmoat, recorder: &Recorder, attack: &str) -> Seen {
    let attacked = pop3_attack(addr(mailmoat, "pop3"), recorder, attack, LOGIN, "+OK").await;
    settle(mailmoat, Dialect::Pop3, format!("{attack:?}"), attacked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_credentials_in_the_arguments_of_allowed_commands_never_reach_dovecot() {
    let (mailmoat, _imap, pop3) = setup();
    let mut seen = Vec::new();
    for attack in POP3_VARIANTS {
        seen.push((pop3_variant(&mailmoat, &pop3, attack).await, None));
    }
    assert_all_clean("POP3", &seen);
}

/// The harness itself: a canonical dialogue through the same forwarder passes every
/// check above (it must not fail for reasons of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_passes_a_well_behaved_imap_and_pop3_client() {
    let (mailmoat, imap, pop3) = setup();

    let (
        WellBehaved {
            client: client_addr,
            before_tls,
            mut tls,
        },
        _replies,
    ) = imap_well_behaved(addr(&mailmoat, "imap"), &imap).await;
    tls.send(format!("l LOGIN {USER} {PASSWORD}\r\n").as_bytes())
        .await
        .unwrap();
    let login = tls.until(tagged("l")).await;
    assert!(login.last().unwrap().starts_with("l OK"), "{login:?}");
    let leg = session_leg(&mailmoat, client_addr, &before_tls).await;
    let (rport, bytes) = (leg.upstream_port, leg.to_upstream);
    assert_eq!(show(&bytes), show(b"a CAPABILITY\r\nb NOOP\r\n"));
    judge(Dialect::Imap, &bytes).unwrap();
    let lines = wait_for_dovecot_login(rport, USER).await.unwrap();
    assert!(!lines.iter().any(|l| l.contains(HIDDEN_USER)), "{lines:#?}");

    let WellBehaved {
        client: client_addr,
        before_tls,
        mut tls,
    } = pop3_well_behaved(addr(&mailmoat, "pop3"), &pop3).await;
    tls.send(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes())
        .await
        .unwrap();
    assert!(tls.line().await.unwrap().starts_with("+OK"));
    assert!(tls.line().await.unwrap().starts_with("+OK"));
    let leg = session_leg(&mailmoat, client_addr, &before_tls).await;
    let (rport, bytes) = (leg.upstream_port, leg.to_upstream);
    assert_eq!(show(&bytes), show(b"CAPA\r\n"));
    wait_for_dovecot_login(rport, USER).await.unwrap();
}
