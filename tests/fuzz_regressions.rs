//! Inputs the fuzz targets of `tests/fuzz/` (issue 5) found, replayed through the very
//! harness the targets run (`tests/fuzz/src/session_script.rs`, included below), after a
//! plain transcript of the same bug.
//!
//! To replay one by hand with the trace of every event and action:
//! `MAILMOAT_FUZZ_TRACE=1 RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -s none TARGET FILE`.

#[allow(dead_code)]
#[path = "fuzz/src/canonical.rs"]
mod canonical;
#[allow(dead_code)]
#[path = "fuzz/src/mta_sts.rs"]
mod mta_sts;
#[allow(dead_code)]
#[path = "fuzz/src/outbound_script.rs"]
mod outbound_script;
#[allow(dead_code)]
#[path = "fuzz/src/session_script.rs"]
mod session_script;

use mailmoat::policy::UserHasher;
use mailmoat::proto::{Action, Limits, Session, imap};
use session_script::{Protocol, run};

/// `imap_session` (minimised): the greeting, then `a NOOP` followed straight away by a
/// byte that is neither SP nor the line end.
///
/// Bug: `proto::imap::parse::command_start` reads the command name as the longest run of
/// ATOM-CHARs and then takes an optional SP, so `a NOOP\xce` (or `a NOOP(x)`,
/// `a CAPABILITY"x"`) is classified as NOOP and forwarded to the upstream before TLS,
/// although its command name, as RFC 9051 §9 and the upstream read it (`tag SP
/// command-name [SP ...] CRLF`), is `NOOP\xce`: not one of the upgrade dialogue's. The
/// allow-list of ARCHITECTURE.md §3 is then decided on a name the upstream never sees.
#[test]
fn imap_command_name_glued_to_a_non_sp_byte_is_not_forwarded_before_tls() {
    let mut session = imap::Session::new(imap::Config {
        max_literal_len: 64 * 1024,
        limits: Limits {
            max_line_len: 512,
            max_held_bytes: 64 * 1024,
            max_plaintext_commands: 20,
            max_errors: 20,
        },
        user_hasher: UserHasher::new(b"key"),
    });
    session.on_upstream_data(b"* OK hi\r\n");
    while session.next_action().is_some() {}
    for line in [
        &b"a NOOP\xce\r\n"[..],
        b"b NOOP(x)\r\n",
        b"c CAPABILITY\"x\"\r\n",
    ] {
        session.on_client_data(line);
        while let Some(action) = session.next_action() {
            assert!(
                !matches!(action, Action::ToUpstream(_)),
                "{:?} went upstream before TLS as {action:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    // The fuzz input: flags 0 (STARTTLS listener, defaults), upstream "* OK hi\r\n",
    // client "a NOOP\xce\r\n".
    run(
        Protocol::Imap,
        b"\x00\x05\x09* OK hi\r\n\x00\x0ba NOOP\xce\r\n",
    );
}

/// `smtp_session` (minimised): STARTTLS (`STARTTlS`) sent behind a pending command with
/// bytes injected after it, then the client's end of stream, then the upstream's replies.
///
/// Bug: the client had closed its side before STARTTLS was answered, yet the session
/// sent `220 Ready to start TLS`, asked for the handshake and queued a close behind it:
/// an action queued behind the upgrade crosses into TLS, which the harness forbids. A
/// client that has closed its side can complete no handshake; the session now closes
/// instead (plain transcript: `smtp::session` test
/// `a_client_that_closes_behind_starttls_gets_no_handshake`).
#[test]
fn smtp_starttls_answered_after_the_client_closed_starts_no_handshake() {
    run(
        Protocol::Smtp,
        b"\x00\x05\x12221 lega+cy ESMTP\r\x00+STARTTlS\r\nRSET PLAIN AGFsaWN\r\n\x00  ok\r\n\
          \x0c\xbe\xc2=\r\n,\x05\x0e270 2.0.0 Ok\r\n\x05\x12220 legacy ESMTP\r\n\x00 \x0c",
    );
}

/// `mta_sts_policy`: every seed of `tests/fuzz/seeds/mta_sts_policy/` through the
/// target's harness, so that its invariants hold for the RFC 8461 examples and run with
/// every `cargo test`, with or without cargo-fuzz.
#[test]
fn mta_sts_policy_seeds_hold_the_fuzz_invariants() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/seeds/mta_sts_policy");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let replayed = std::panic::catch_unwind(|| mta_sts::mta_sts_policy(&input));
        assert!(replayed.is_ok(), "{} broke an invariant", path.display());
        seeds += 1;
    }
    assert!(seeds >= 9, "only {seeds} seeds in {}", dir.display());
}

/// `outbound_session`: every seed of `tests/fuzz/seeds/outbound_session/` through the
/// target's harness (deliveries over STARTTLS and in plaintext, MXes given up, the size
/// limit, broken MXes), so that its invariants run with every `cargo test`.
#[test]
fn outbound_session_seeds_hold_the_fuzz_invariants() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/seeds/outbound_session");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let replayed = std::panic::catch_unwind(|| outbound_script::run(&input));
        assert!(replayed.is_ok(), "{} broke an invariant", path.display());
        seeds += 1;
    }
    assert!(seeds >= 5, "only {seeds} seeds in {}", dir.display());
}

/// A session script in the fuzz targets' format: `flags`, then client (`true`) or
/// upstream (`false`) data ops, each at most 255 bytes.
fn script(flags: u8, ops: &[(bool, &[u8])]) -> Vec<u8> {
    let mut out = vec![flags];
    for (client, bytes) in ops {
        out.push(if *client { 0 } else { 5 });
        out.push(u8::try_from(bytes.len()).expect("at most 255 bytes per op"));
        out.extend_from_slice(bytes);
    }
    out
}

/// The harness's canonical-rule invariant (ARCHITECTURE.md §3, `fuzz/src/canonical.rs`): one
/// breach per session target, each of the class the targets crash on until the sessions
/// forward only commands they serialise themselves. All are tried; the failures are
/// listed together.
#[test]
fn the_session_targets_hold_every_plaintext_listener_to_the_canonical_rule() {
    let cases: [(&str, Protocol, Vec<u8>); 4] = [
        (
            "IMAP: NOOP ending in a literal8 that hides a LOGIN",
            Protocol::Imap,
            script(
                0,
                &[
                    (false, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n"),
                    (true, b"a NOOP ~{31+}\r\nb LOGIN alice alice-secret-pw\r\n"),
                ],
            ),
        ),
        (
            "POP3: CAPA with an argument",
            Protocol::Pop3,
            script(0, &[(false, b"+OK hi\r\n"), (true, b"CAPA x\r\n")]),
        ),
        (
            "SMTP submission: EHLO in lower case",
            Protocol::Smtp,
            script(0, &[(false, b"220 hi\r\n"), (true, b"ehlo x.example\r\n")]),
        ),
        (
            "SMTP MX: a body line `.` NUL that a NUL-dropping upstream ends the message at",
            Protocol::Smtp,
            script(
                2,
                &[
                    (false, b"220 hi\r\n"),
                    (true, b"DATA\r\n"),
                    (false, b"354 go\r\n"),
                    (true, b"a\r\n.\0\r\nRSET\r\n"),
                ],
            ),
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(what, protocol, input)| {
            std::panic::catch_unwind(|| run(*protocol, input))
                .err()
                .map(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("- {what}: {message}")
                })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} scripts broke an invariant:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
