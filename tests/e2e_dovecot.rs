//! End to end with real components for IMAP and POP3: a real legacy Dovecot (no TLS,
//! plaintext login allowed, Maildir) and Postfix started by `scripts/legacy.sh`, the real
//! `mailmoat` binary, and real clients: Python imaplib/poplib and raw-socket drivers
//! (`tests/clients/imap_client.py`, `tests/clients/pop3_client.py`), curl, mbsync
//! (isync) and fetchmail. A missing component fails these tests; it never skips.
//!
//! All tests of this binary share one legacy instance, so alice's mailbox holds the mail
//! of several tests at once: every test finds its own message by a unique Message-ID, and
//! a POP3 DELE only ever deletes the test's own message. The clients that sync a whole
//! mailbox (mbsync, fetchmail, curl's POP3 listing) use bob's mailbox, which only ever
//! receives small messages and from which nothing is deleted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SECRET: &str = "alice-secret-pw";
/// alice's password, plain and as SASL PLAIN / LOGIN encode it.
const ALICE_SECRETS: [&str; 3] = [
    SECRET,
    "YWxpY2Utc2VjcmV0LXB3",
    "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=",
];
const BOB_SECRETS: [&str; 3] = [
    "bob-secret-pw",
    "Ym9iLXNlY3JldC1wdw==",
    "AGJvYkBleGFtcGxlLnRlc3QAYm9iLXNlY3JldC1wdw==",
];

/// IMAP (STARTTLS and implicit), POP3 (STLS and implicit) in front of the legacy
/// Dovecot, and submission in front of the legacy Postfix to deliver test mail.
fn mailmoat() -> Mailmoat {
    let legacy = legacy();
    Mailmoat::start(&[
        ("imap", "imap", "starttls", "require_tls", legacy.imap),
        ("imaps", "imap", "implicit", "require_tls", legacy.imap),
        ("pop3", "pop3", "starttls", "require_tls", legacy.pop3),
        ("pop3s", "pop3", "implicit", "require_tls", legacy.pop3),
        ("submission", "smtp", "starttls", "require_tls", legacy.smtp),
    ])
}

fn ca() -> &'static str {
    certs().ca_pem.to_str().unwrap()
}

/// `python3 tests/clients/SCRIPT ARGS`, parsed.
fn py_client(script: &str, args: &[&str]) -> Value {
    let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut all = vec![path.as_str()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_program("python3", &all);
    assert_eq!(
        code, 0,
        "{script} {args:?} failed (exit {code}):\n{stdout}\n{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

fn imap_client(args: &[&str]) -> Value {
    py_client("imap_client.py", args)
}

fn pop3_client(args: &[&str]) -> Value {
    py_client("pop3_client.py", args)
}

/// A JSON array of strings.
fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

/// The message a test sends: unique Subject and Message-ID, lines that look like
/// protocol (content inside a body), and `body_lines` 80-byte lines.
fn write_message(dir: &Path, tag: &str, to: &str, body_lines: usize) -> (PathBuf, Vec<u8>) {
    let mut message = format!(
        "From: Bob <bob@example.test>\r\nTo: <{to}>\r\nSubject: {tag}\r\n\
Message-ID: <{tag}@client.example>\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    message.extend_from_slice(b"STARTTLS\r\nAUTH PLAIN AGFsaWNl\r\n..leading dot\r\n");
    message.extend_from_slice(b"a1 LOGIN alice secret\r\n* 1 EXISTS\r\n+OK\r\n.\tnot an end\r\n");
    for index in 0..body_lines {
        message.extend_from_slice(
            format!(
                "{index:08} abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/\r\n"
            )
            .as_bytes(),
        );
    }
    let path = dir.join(format!("{tag}.eml"));
    std::fs::write(&path, &message).unwrap();
    (path, message)
}

fn maildir_bob() -> PathBuf {
    // legacy.sh: MAIL_DIR/example.test/{alice,bob}/Maildir
    legacy()
        .maildir_alice
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("bob/Maildir")
}

/// Waits (bounded) for exactly one message containing `tag` in `maildir`.
fn wait_in_maildir(maildir: &Path, tag: &str) -> Vec<u8> {
    let found = poll_for(Duration::from_secs(60), || {
        // Keyed by the Maildir unique name (before ":2,"): Dovecot moves a file from new/
        // to cur/ and adds flags while we look, so one message can be seen twice.
        let mut found = std::collections::BTreeMap::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(bytes) = std::fs::read(entry.path())
                    && memchr::memmem::find(&bytes, tag.as_bytes()).is_some()
                {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let unique = name.split(':').next().unwrap_or(&name).to_owned();
                    found.insert(unique, bytes);
                }
            }
        }
        assert!(found.len() < 2, "{} messages tagged {tag}", found.len());
        found.into_values().next()
    });
    found.unwrap_or_else(|| panic!("no message tagged {tag} in {}", maildir.display()))
}

/// How many messages containing `tag` are in `maildir` right now.
fn count_in_maildir(maildir: &Path, tag: &str) -> usize {
    let mut count = 0;
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path())
                && memchr::memmem::find(&bytes, tag.as_bytes()).is_some()
            {
                count += 1;
            }
        }
    }
    count
}

/// Sends `message_file` through mailmoat's submission listener (smtplib, STARTTLS,
/// AUTH as alice) to the legacy Postfix.
fn submit(mailmoat: &Mailmoat, message_file: &Path, to: &str) {
    let result = smtp_client(&[
        "send",
        "--port",
        &mailmoat.port("submission").to_string(),
        "--cafile",
        ca(),
        "--user",
        "alice@example.test",
        "--password",
        SECRET,
        "--to",
        to,
        "--message-file",
        message_file.to_str().unwrap(),
    ]);
    assert_eq!(result["refused"], serde_json::json!({}), "{result}");
}

/// Sends a message through mailmoat's SMTP listener and returns (sent, as stored in the
/// Maildir by Postfix).
fn deliver(
    mailmoat: &Mailmoat,
    dir: &Path,
    tag: &str,
    to: &str,
    body_lines: usize,
) -> (Vec<u8>, Vec<u8>) {
    let (path, sent) = write_message(dir, tag, to, body_lines);
    submit(mailmoat, &path, to);
    let maildir = if to == "bob@example.test" {
        maildir_bob()
    } else {
        legacy().maildir_alice.clone()
    };
    let stored = wait_in_maildir(&maildir, tag);
    assert_stored_intact(&stored, &sent);
    (sent, stored)
}

/// What Postfix stores: the message with LF line ends, after the headers Postfix
/// prepends (Return-Path, Delivered-To, Received).
fn assert_stored_intact(stored: &[u8], sent: &[u8]) {
    let sent_lf = lf(sent);
    assert!(
        stored.ends_with(&sent_lf),
        "stored message differs from the one sent ({} vs {} bytes)",
        stored.len(),
        sent_lf.len()
    );
    assert!(stored.starts_with(b"Return-Path: <bob@example.test>\n"));
}

fn lf(bytes: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(bytes)
        .replace("\r\n", "\n")
        .into_bytes()
}

/// What IMAP and POP3 serve for a Maildir file: every LF as CRLF.
fn crlf(stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + stored.len() / 40);
    for &b in stored {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// Byte equality with a readable report instead of megabytes of output.
#[track_caller]
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |b: &[u8]| {
        let start = at.saturating_sub(40);
        String::from_utf8_lossy(&b[start..(at + 40).min(b.len())]).into_owned()
    };
    panic!(
        "{what}: {} bytes received, {} expected; first difference at byte {at}:\n\
         received: {:?}\nexpected: {:?}",
        got.len(),
        want.len(),
        around(got),
        around(want)
    );
}

/// No secret in mailmoat's trace-level log or in the legacy servers' logs.
#[track_caller]
fn assert_no_secret_logged(mailmoat: &Mailmoat, secrets: &[&str]) {
    let log = mailmoat.log_text();
    let legacy_logs = legacy().logs();
    for secret in secrets {
        assert!(!log.contains(secret), "{secret} is in mailmoat's log");
        assert!(
            !legacy_logs.contains(secret),
            "{secret} is in the legacy logs"
        );
    }
}

/// Capability lists of the legacy Dovecot itself, straight from its plaintext port:
/// (pre-login CAPABILITY, greeting, post-login CAPABILITY).
fn dovecot_imap_caps() -> (Vec<String>, String, Vec<String>) {
    let direct = imap_client(&[
        "caps",
        "--no-tls",
        "--port",
        &legacy().imap.port().to_string(),
    ]);
    (
        strings(&direct["caps"]),
        direct["greeting"].as_str().unwrap().to_owned(),
        strings(&direct["post_login_caps"]),
    )
}

/// `seen` is `upstream` minus what `removed` matches (in the upstream's order), plus
/// each of `added` exactly once (anywhere).
#[track_caller]
fn assert_rewritten(
    what: &str,
    seen: &[String],
    upstream: &[String],
    removed: impl Fn(&str) -> bool,
    added: &[&str],
) {
    for token in added {
        assert_eq!(
            seen.iter().filter(|t| t.as_str() == *token).count(),
            1,
            "{what}: {token} must appear exactly once in {seen:?}"
        );
    }
    let kept: Vec<&String> = seen
        .iter()
        .filter(|t| !added.contains(&t.as_str()))
        .collect();
    let expected: Vec<&String> = upstream.iter().filter(|t| !removed(t)).collect();
    assert_eq!(
        kept, expected,
        "{what}: the upstream's list {upstream:?} rewritten, seen {seen:?}"
    );
}

fn imap_pre_tls_removed(token: &str) -> bool {
    let upper = token.to_ascii_uppercase();
    upper.starts_with("AUTH=") || upper == "SASL-IR" || upper.ends_with("-PLUS")
}

const PRIVACYREQUIRED: &str =
    "NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";

// ---------------------------------------------------------------- IMAP

#[test]
fn imap_before_tls_offers_starttls_refuses_credentials_and_no_secret_goes_anywhere() {
    let mailmoat = mailmoat();
    let (dovecot_caps, dovecot_greeting, _) = dovecot_imap_caps();
    assert!(
        dovecot_caps.iter().any(|c| c == "AUTH=PLAIN") && dovecot_caps.contains(&"SASL-IR".into()),
        "the legacy Dovecot is expected to offer AUTH=PLAIN and SASL-IR: {dovecot_caps:?}"
    );
    let user = unique("imap-pretls-user");
    let password = unique("imap-pretls-password");
    let r = imap_client(&[
        "pretls",
        "--port",
        &mailmoat.port("imap").to_string(),
        "--cafile",
        ca(),
        "--user",
        &user,
        "--password",
        &password,
    ]);

    // The greeting: Dovecot's own, its [CAPABILITY] code rewritten.
    let greeting = r["greeting"].as_str().unwrap();
    let dovecot_text = dovecot_greeting.split_once("] ").unwrap().1;
    assert!(greeting.starts_with("* OK [CAPABILITY "), "{greeting:?}");
    assert!(
        greeting.ends_with(&format!("] {dovecot_text}")),
        "{greeting:?}"
    );
    let removed = imap_pre_tls_removed;
    let added = ["STARTTLS", "LOGINDISABLED"];
    assert_rewritten(
        "greeting",
        &strings(&r["greeting_caps"]),
        &dovecot_caps,
        removed,
        &added,
    );
    // CAPABILITY: the same list, untagged, then the upstream's tagged OK.
    let capability = strings(&r["capability"]);
    assert_eq!(capability.len(), 2, "{capability:?}");
    assert!(capability[0].starts_with("* CAPABILITY "), "{capability:?}");
    assert!(capability[1].starts_with("a1 OK"), "{capability:?}");
    assert_rewritten(
        "CAPABILITY",
        &strings(&r["caps"]),
        &dovecot_caps,
        removed,
        &added,
    );

    // ID is answered locally; NOOP is allowed.
    let id = strings(&r["id"]);
    assert_eq!(id[0], "* ID NIL\r\n", "{id:?}");
    assert!(id.len() == 2 && id[1].starts_with("a2 OK"), "{id:?}");
    let noop = strings(&r["noop"]);
    assert!(noop.last().unwrap().starts_with("a3 OK"), "{noop:?}");

    // Everything else is refused by mailmoat with the exact replies of ARCHITECTURE.md §3.
    assert_eq!(
        strings(&r["select"]),
        ["a4 BAD Command not allowed before STARTTLS\r\n"]
    );
    assert_eq!(strings(&r["login"]), [format!("a5 {PRIVACYREQUIRED}")]);
    // The literal password: refused before any "+" continuation, so it is never sent.
    assert_eq!(
        r["literal_login_first_line"].as_str().unwrap(),
        format!("a6 {PRIVACYREQUIRED}"),
        "{r}"
    );
    assert!(r.get("literal_login_rest").is_none(), "{r}");
    assert_eq!(
        strings(&r["authenticate"]),
        [format!("a7 {PRIVACYREQUIRED}")]
    );
    // STARTTLS with an argument: BAD, and the session stays usable.
    let starttls_args = strings(&r["starttls_args"]);
    assert!(
        starttls_args.len() == 1 && starttls_args[0].starts_with("a8 BAD "),
        "{starttls_args:?}"
    );

    // STARTTLS, then TLS verified against the test CA for mail.example.test.
    assert_eq!(
        strings(&r["starttls"]),
        ["a9 OK Begin TLS negotiation now\r\n"]
    );
    assert!(
        r["tls"]["version"].as_str().unwrap().starts_with("TLSv1."),
        "{r}"
    );
    // After TLS: Dovecot's own list, AUTH= back, no STARTTLS, no LOGINDISABLED.
    let post = strings(&r["post_caps"]);
    let expected: Vec<String> = dovecot_caps
        .iter()
        .filter(|c| !c.to_ascii_uppercase().ends_with("-PLUS"))
        .cloned()
        .collect();
    assert_eq!(post, expected, "after STARTTLS");
    assert!(post.iter().any(|c| c == "AUTH=PLAIN"), "{post:?}");
    // STARTTLS inside TLS: BAD.
    let again = strings(&r["post_starttls_again"]);
    assert!(
        again.len() == 1 && again[0].starts_with("b2 BAD "),
        "{again:?}"
    );
    let logout = strings(&r["logout"]);
    assert!(logout[0].starts_with("* BYE"), "{logout:?}");
    assert!(logout.last().unwrap().starts_with("b3 OK"), "{logout:?}");

    // The refused credentials reached neither Dovecot (it logs every attempt with the
    // user name, auth_verbose) nor any log; mailmoat logged the exposure as a hash.
    // Kept: what is checked is that something never reaches another process's log, and
    // no event says it never will; a margin for Dovecot's log writer.
    std::thread::sleep(Duration::from_millis(300));
    let dovecot_log = std::fs::read_to_string(&legacy().dovecot_log).unwrap();
    assert!(!dovecot_log.contains(&user), "the user reached Dovecot");
    assert_no_secret_logged(&mailmoat, &[&password, &user]);
    let log = mailmoat.log_text();
    assert!(log.contains("event=\"plaintext_command_refused\""), "{log}");
    assert!(log.contains("event=\"credentials_exposed\""), "{log}");
    assert!(log.contains("event=\"tls_established\""), "{log}");
}

#[test]
fn imap_capabilities_after_login_are_dovecots_own_on_both_listeners() {
    let mailmoat = mailmoat();
    let (dovecot_caps, _, dovecot_post_login) = dovecot_imap_caps();
    assert!(
        dovecot_post_login.iter().any(|c| c == "COMPRESS=DEFLATE"),
        "{dovecot_post_login:?}"
    );
    for (listener, implicit) in [("imap", false), ("imaps", true)] {
        let port = mailmoat.port(listener).to_string();
        let mut args = vec!["caps", "--port", &port, "--cafile", ca()];
        if implicit {
            args.push("--implicit");
        }
        let r = imap_client(&args);
        if implicit {
            // Implicit TLS: the greeting already shows the after-TLS list.
            assert_eq!(strings(&r["greeting_caps"]), dovecot_caps, "{listener}");
        } else {
            assert_eq!(
                strings(&r["starttls"]),
                ["s OK Begin TLS negotiation now\r\n"]
            );
        }
        assert_eq!(strings(&r["caps"]), dovecot_caps, "{listener}");
        let login = strings(&r["login"]);
        assert!(
            login.last().unwrap().starts_with("l OK "),
            "{listener}: {login:?}"
        );
        // Dovecot announces its post-login list with the login (untagged here, as the
        // client asked for CAPABILITY before): relayed as Dovecot sent it.
        assert_eq!(
            strings(&r["login_caps"]),
            dovecot_post_login,
            "{listener}: {login:?}"
        );
        // After login mailmoat is a blind relay: Dovecot's post-login list, unchanged.
        assert_eq!(
            strings(&r["post_login_caps"]),
            dovecot_post_login,
            "{listener}"
        );
        assert!(strings(&r["logout"]).last().unwrap().starts_with("z OK"));
    }
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
}

/// The full loop: smtplib → mailmoat submission → Postfix → Maildir → Dovecot →
/// mailmoat IMAP (STARTTLS and implicit) → imaplib, 10 MB, byte-identical.
#[test]
fn imaplib_fetches_a_10_mb_message_delivered_through_the_moat_byte_identical() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("imap-big");
    let (sent, stored) = deliver(
        &mailmoat,
        dir.path(),
        &tag,
        "alice@example.test",
        10 * 1024 * 1024 / 80,
    );
    let served = crlf(&stored);
    for (listener, implicit) in [("imap", false), ("imaps", true)] {
        let out = dir.path().join(format!("{listener}.fetched"));
        let port = mailmoat.port(listener).to_string();
        let message_id = format!("<{tag}@client.example>");
        let mut args = vec![
            "fetch",
            "--port",
            &port,
            "--cafile",
            ca(),
            "--message-id",
            &message_id,
            "--out",
            out.to_str().unwrap(),
        ];
        if implicit {
            args.push("--implicit");
        }
        let r = imap_client(&args);
        assert_eq!(r["login"][0], "OK", "{listener}: {r}");
        assert_eq!(r["select"][0], "OK", "{listener}: {r}");
        assert_eq!(r["found"], 1, "{listener}: {r}");
        assert_eq!(r["fetch_status"], "OK", "{listener}: {r}");
        assert_eq!(r["logout"], "BYE", "{listener}: {r}");
        // imaplib upper-cases capability names.
        let caps = strings(&r["caps"]);
        assert!(caps.contains(&"AUTH=PLAIN".into()), "{listener}: {caps:?}");
        assert!(
            !caps.contains(&"STARTTLS".into()) && !caps.contains(&"LOGINDISABLED".into()),
            "{listener}: {caps:?}"
        );
        if !implicit {
            let pre = strings(&r["pre_tls_caps"]);
            assert!(
                pre.contains(&"STARTTLS".into()) && pre.contains(&"LOGINDISABLED".into()),
                "{pre:?}"
            );
            assert!(!pre.iter().any(|c| c.starts_with("AUTH=")), "{pre:?}");
            assert!(!pre.contains(&"SASL-IR".into()), "{pre:?}");
        }
        let fetched = std::fs::read(&out).unwrap();
        assert_eq!(r["rfc822_size"], served.len(), "{listener}");
        assert_same_bytes(&format!("{listener} FETCH BODY[]"), &fetched, &served);
        // Modulo Postfix's prepended headers, the bytes the client sent.
        assert!(fetched.ends_with(&sent), "{listener}");
    }
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
    assert!(mailmoat.log_text().contains("event=\"tls_established\""));
}

#[test]
fn imap_append_with_a_synchronising_literal_and_with_literal_plus() {
    let mailmoat = mailmoat();
    let tag = unique("imap-append");
    let r = imap_client(&[
        "append",
        "--port",
        &mailmoat.port("imap").to_string(),
        "--cafile",
        ca(),
        "--tag",
        &tag,
    ]);
    assert_eq!(
        strings(&r["starttls"]),
        ["s OK Begin TLS negotiation now\r\n"]
    );
    let caps = strings(&r["caps"]);
    assert!(caps.contains(&"LITERAL+".into()), "{caps:?}");
    assert!(
        strings(&r["login"]).last().unwrap().starts_with("l OK "),
        "{r}"
    );
    let sync = &r["results"]["sync"];
    assert!(
        sync["continuation"].as_str().unwrap().starts_with("+"),
        "{sync}"
    );
    let reply = strings(&sync["reply"]);
    assert!(
        reply.last().unwrap().starts_with("p1 OK [APPENDUID "),
        "{reply:?}"
    );
    assert_eq!(sync["found"], 1, "{sync}");
    assert_eq!(sync["identical"], true, "{sync}");
    let plus = &r["results"]["plus"];
    assert!(plus.get("continuation").is_none());
    let reply = strings(&plus["reply"]);
    assert!(
        reply.iter().all(|l| !l.starts_with('+')),
        "no continuation for LITERAL+: {reply:?}"
    );
    assert!(
        reply.last().unwrap().starts_with("p2 OK [APPENDUID "),
        "{reply:?}"
    );
    assert_eq!(plus["found"], 1, "{plus}");
    assert_eq!(plus["identical"], true, "{plus}");
    // Dovecot stored both in the Maildir.
    for mode in ["sync", "plus"] {
        let stored = wait_in_maildir(&legacy().maildir_alice, &format!("{tag}-{mode}@"));
        let sent = plus["sent"].as_str().unwrap().replace("plus", mode);
        assert_eq!(lf(&stored), lf(sent.as_bytes()), "{mode}");
    }
    assert!(strings(&r["logout"]).last().unwrap().starts_with("z OK"));
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
}

#[test]
fn imap_idle_sees_a_message_delivered_through_the_smtp_listener() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("imap-idle");
    let (path, _) = write_message(dir.path(), &tag, "alice@example.test", 10);
    let r = imap_client(&[
        "idle",
        "--port",
        &mailmoat.port("imap").to_string(),
        "--cafile",
        ca(),
        "--tag",
        &tag,
        "--smtp-port",
        &mailmoat.port("submission").to_string(),
        "--message-file",
        path.to_str().unwrap(),
        "--maildir",
        legacy().maildir_alice.to_str().unwrap(),
    ]);
    assert!(
        strings(&r["select"]).last().unwrap().starts_with("s2 OK"),
        "{r}"
    );
    assert!(
        r["idle_continuation"].as_str().unwrap().starts_with("+ "),
        "{r}"
    );
    assert_eq!(r["smtp_exit"], 0, "{r}");
    assert_eq!(r["delivered"], true, "{r}");
    let exists: Vec<u64> = r["exists"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert!(!exists.is_empty(), "no EXISTS while idling: {r}");
    let done = strings(&r["idle_done"]);
    assert!(done.last().unwrap().starts_with("i OK"), "{done:?}");
    // The EXISTS the client saw while idling covers our message.
    let found: Vec<u64> = r["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{r}");
    assert!(
        found[0] <= *exists.iter().max().unwrap(),
        "message {} not announced by the EXISTS seen while idling ({exists:?})",
        found[0]
    );
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
}

#[test]
fn imap_compress_deflate_after_login() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("imap-compress");
    // 1 MB, so the FETCH crosses many deflate blocks.
    let (_, stored) = deliver(
        &mailmoat,
        dir.path(),
        &tag,
        "alice@example.test",
        1024 * 1024 / 80,
    );
    let out = dir.path().join("compressed.fetched");
    let r = imap_client(&[
        "compress",
        "--port",
        &mailmoat.port("imap").to_string(),
        "--cafile",
        ca(),
        "--tag",
        &tag,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        strings(&r["post_login_caps"]).contains(&"COMPRESS=DEFLATE".into()),
        "{r}"
    );
    let compress = strings(&r["compress"]);
    assert!(
        compress.len() == 1 && compress[0].starts_with("z1 OK"),
        "{compress:?}"
    );
    // Everything below went through raw DEFLATE (RFC 4978) inside TLS.
    assert!(
        strings(&r["select"]).last().unwrap().starts_with("z2 OK"),
        "{r}"
    );
    let search = strings(&r["search"]);
    assert!(search[0].starts_with("* SEARCH "), "{search:?}");
    assert!(
        r["fetch_status"].as_str().unwrap().starts_with("z4 OK"),
        "{r}"
    );
    assert_same_bytes(
        "FETCH through COMPRESS",
        &std::fs::read(&out).unwrap(),
        &crlf(&stored),
    );
    assert!(
        strings(&r["noop"]).last().unwrap().starts_with("z5 OK"),
        "{r}"
    );
    let logout = strings(&r["logout"]);
    assert!(logout[0].starts_with("* BYE"), "{logout:?}");
    assert!(logout.last().unwrap().starts_with("z6 OK"), "{logout:?}");
}

/// curl with `--resolve`: the certificate is verified for mail.example.test.
fn curl(
    url_scheme: &str,
    port: u16,
    path: &str,
    extra: &[&str],
    user: &str,
) -> (i32, String, String) {
    let url = format!("{url_scheme}://mail.example.test:{port}/{path}");
    let resolve = format!("mail.example.test:{port}:127.0.0.1");
    let mut args = vec![
        "--silent",
        "--show-error",
        "--verbose",
        "--max-time",
        "60",
        "--ssl-reqd",
        "--cacert",
        ca(),
        "--resolve",
        &resolve,
        "--user",
        user,
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    run_program("curl", &args)
}

/// curl's `--verbose` transcript: the certificate was verified, and with STARTTLS/STLS
/// the upgrade came before any credential command and got mailmoat's go-ahead.
#[track_caller]
fn assert_curl_transcript(stderr: &str, upgrade: bool, verb: &str, go_ahead: &str) {
    assert!(stderr.contains("SSL certificate verify ok"), "{stderr}");
    if !upgrade {
        return;
    }
    let lines: Vec<&str> = stderr.lines().map(str::trim_end).collect();
    let sent = lines
        .iter()
        .position(|l| {
            l.starts_with("> ") && l.ends_with(&format!(" {verb}")) || *l == format!("> {verb}")
        })
        .unwrap_or_else(|| panic!("curl sent no {verb}:\n{stderr}"));
    for line in &lines[..sent] {
        let upper = line.to_ascii_uppercase();
        for credential in [" LOGIN ", " AUTHENTICATE ", "> USER ", "> PASS ", "> AUTH "] {
            assert!(
                !upper.contains(credential),
                "before {verb}: {line}\n{stderr}"
            );
        }
    }
    let reply = lines[sent + 1..]
        .iter()
        .find(|l| l.starts_with("< "))
        .unwrap_or_else(|| panic!("no reply to {verb}:\n{stderr}"));
    assert!(reply.ends_with(go_ahead), "{reply:?}\n{stderr}");
}

#[test]
fn curl_lists_searches_and_fetches_over_imap_starttls_and_imaps() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("imap-curl");
    let (_, stored) = deliver(&mailmoat, dir.path(), &tag, "alice@example.test", 100);
    let alice = format!("alice@example.test:{SECRET}");
    for (scheme, listener) in [("imap", "imap"), ("imaps", "imaps")] {
        let port = mailmoat.port(listener);
        let (code, stdout, stderr) = curl(scheme, port, "INBOX", &[], &alice);
        assert_eq!(code, 0, "{scheme} list:\n{stdout}\n{stderr}");
        assert!(stdout.contains("INBOX"), "{scheme} list:\n{stdout}");
        assert_curl_transcript(
            &stderr,
            scheme == "imap",
            "STARTTLS",
            "OK Begin TLS negotiation now",
        );
        let search = format!("UID SEARCH HEADER Message-ID <{tag}@client.example>");
        let (code, stdout, stderr) = curl(scheme, port, "INBOX", &["--request", &search], &alice);
        assert_eq!(code, 0, "{scheme} search:\n{stdout}\n{stderr}");
        let uids: Vec<&str> = stdout
            .trim_end()
            .strip_prefix("* SEARCH ")
            .unwrap_or_else(|| panic!("{scheme} search: {stdout:?}"))
            .split(' ')
            .collect();
        assert_eq!(uids.len(), 1, "{stdout:?}");
        let (code, stdout, stderr) =
            curl(scheme, port, &format!("INBOX;UID={}", uids[0]), &[], &alice);
        assert_eq!(code, 0, "{scheme} fetch:\n{stderr}");
        assert_same_bytes(
            &format!("curl {scheme} fetch"),
            stdout.as_bytes(),
            &crlf(&stored),
        );
    }
    // A wrong password is refused by Dovecot through the moat, after TLS.
    let (code, _, stderr) = curl(
        "imap",
        mailmoat.port("imap"),
        "INBOX",
        &[],
        "alice@example.test:wrong",
    );
    assert_ne!(code, 0, "{stderr}");
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
}

#[test]
fn mbsync_syncs_inbox_over_starttls_verifying_the_certificate() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("mbsync");
    let (_, stored) = deliver(&mailmoat, dir.path(), &tag, "bob@example.test", 20);
    let near = dir.path().join("near");
    std::fs::create_dir_all(&near).unwrap();
    // Tunnel: mbsync then verifies the certificate for Host (mail.example.test) against
    // the test CA, without resolving the name.
    let tunnel = format!(
        "python3 {}/tests/clients/imap_client.py tunnel --port {}",
        env!("CARGO_MANIFEST_DIR"),
        mailmoat.port("imap")
    );
    let config = format!(
        "IMAPAccount far\n\
         Host mail.example.test\n\
         Tunnel \"{tunnel}\"\n\
         User bob@example.test\n\
         Pass bob-secret-pw\n\
         SSLType STARTTLS\n\
         SSLVersions TLSv1.2 TLSv1.3\n\
         SystemCertificates no\n\
         CertificateFile {ca}\n\
         Timeout 60\n\
         \n\
         IMAPStore far-store\n\
         Account far\n\
         \n\
         MaildirStore near\n\
         Path {near}/\n\
         Inbox {near}/INBOX\n\
         \n\
         Channel inbox\n\
         Far :far-store:\n\
         Near :near:\n\
         Sync Pull\n\
         Create Near\n\
         Expunge None\n\
         SyncState *\n",
        ca = ca(),
        near = near.display()
    );
    let rc = dir.path().join("mbsyncrc");
    std::fs::write(&rc, config).unwrap();
    let (code, stdout, stderr) =
        run_program("mbsync", &["-V", "-c", rc.to_str().unwrap(), "inbox"]);
    assert_eq!(code, 0, "mbsync failed:\n{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("sent in the clear"), "{all}");
    let synced = wait_in_maildir(&near.join("INBOX"), &tag);
    // mbsync adds one header of its own (X-TUID, to find the message again) and stores
    // with LF line ends: apart from that, the bytes Dovecot has.
    let synced_text = String::from_utf8_lossy(&synced);
    let without_tuid: String = synced_text
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("X-TUID: "))
        .collect();
    assert_eq!(
        synced_text.len() - without_tuid.len(),
        "X-TUID: 123456789012\n".len(),
        "{synced_text}"
    );
    assert_same_bytes("mbsync's copy", without_tuid.as_bytes(), &stored);
    let log = mailmoat.log_text();
    assert!(log.contains("event=\"tls_established\""), "{log}");
    assert_no_secret_logged(&mailmoat, &BOB_SECRETS);
}

// ---------------------------------------------------------------- POP3

fn dovecot_pop3_capa() -> (String, Vec<String>) {
    let direct = pop3_client(&[
        "pretls",
        "--no-tls",
        "--port",
        &legacy().pop3.port().to_string(),
        "--user",
        "nobody-direct",
    ]);
    (
        direct["greeting"].as_str().unwrap().to_owned(),
        strings(&direct["capa_list"]),
    )
}

#[test]
fn pop3_before_tls_offers_stls_refuses_user_and_the_name_never_reaches_dovecot() {
    let mailmoat = mailmoat();
    let (dovecot_greeting, dovecot_capa) = dovecot_pop3_capa();
    assert!(
        dovecot_capa.contains(&"USER".into()) && dovecot_capa.iter().any(|c| c.starts_with("SASL")),
        "{dovecot_capa:?}"
    );
    let user = unique("pop3-pretls-user");
    let password = unique("pop3-pretls-password");
    let r = pop3_client(&[
        "pretls",
        "--port",
        &mailmoat.port("pop3").to_string(),
        "--cafile",
        ca(),
        "--user",
        &user,
        "--password",
        &password,
    ]);
    assert_eq!(r["greeting"].as_str().unwrap(), dovecot_greeting);
    let capa = strings(&r["capa"]);
    assert!(capa[0].starts_with("+OK"), "{capa:?}");
    assert_eq!(capa.last().unwrap(), ".\r\n");
    assert_rewritten(
        "CAPA before TLS",
        &strings(&r["capa_list"]),
        &dovecot_capa,
        |c| {
            let upper = c.to_ascii_uppercase();
            upper == "USER" || upper == "SASL" || upper.starts_with("SASL ")
        },
        &["STLS"],
    );
    let refused_auth = ["-ERR [AUTH] TLS is required before authentication, use STLS\r\n"];
    assert_eq!(strings(&r["user"]), refused_auth);
    assert_eq!(strings(&r["pass"]), refused_auth);
    assert_eq!(strings(&r["auth"]), refused_auth);
    assert_eq!(strings(&r["apop"]), refused_auth);
    assert_eq!(
        strings(&r["stat"]),
        ["-ERR Command not allowed before STLS\r\n"]
    );
    let stls_args = strings(&r["stls_args"]);
    assert!(
        stls_args.len() == 1 && stls_args[0].starts_with("-ERR"),
        "{stls_args:?}"
    );
    assert_eq!(strings(&r["stls"]), ["+OK Begin TLS negotiation\r\n"]);
    assert!(r["tls"]["version"].as_str().unwrap().starts_with("TLSv1."));
    // After STLS: Dovecot's own list, USER and SASL back, no STLS.
    assert_eq!(
        strings(&r["post_capa_list"]),
        dovecot_capa,
        "CAPA after STLS"
    );
    let again = strings(&r["post_stls_again"]);
    assert!(
        again.len() == 1 && again[0].starts_with("-ERR"),
        "{again:?}"
    );
    assert!(strings(&r["quit"])[0].starts_with("+OK"), "{r}");

    // Kept: what is checked is that something never reaches another process's log, and
    // no event says it never will; a margin for Dovecot's log writer.
    std::thread::sleep(Duration::from_millis(300));
    let dovecot_log = std::fs::read_to_string(&legacy().dovecot_log).unwrap();
    assert!(!dovecot_log.contains(&user), "the user reached Dovecot");
    assert_no_secret_logged(&mailmoat, &[&user, &password]);
    let log = mailmoat.log_text();
    // The PASS crossed the wire in plaintext (not forwarded): logged as an exposure.
    assert!(log.contains("event=\"credentials_exposed\""), "{log}");
    assert!(log.contains("event=\"plaintext_command_refused\""), "{log}");
    assert!(log.contains("event=\"tls_established\""), "{log}");
}

/// The full loop over POP3: a 10 MB message through mailmoat's SMTP listener, read back
/// with poplib over implicit TLS, then over STLS, byte-identical, then deleted.
#[test]
fn poplib_retrieves_a_10_mb_message_byte_identical_and_deletes_only_its_own() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("pop3-big");
    let (sent, stored) = deliver(
        &mailmoat,
        dir.path(),
        &tag,
        "alice@example.test",
        10 * 1024 * 1024 / 80,
    );
    let served = crlf(&stored);
    for (listener, implicit) in [("pop3s", true), ("pop3", false)] {
        let out = dir.path().join(format!("{listener}.retr"));
        let port = mailmoat.port(listener).to_string();
        let mut args = vec![
            "session",
            "--port",
            &port,
            "--cafile",
            ca(),
            "--tag",
            &tag,
            "--out",
            out.to_str().unwrap(),
        ];
        if implicit {
            args.push("--implicit");
        } else {
            // Only the last session deletes, and only its own message.
            args.push("--delete");
        }
        let r = pop3_client(&args);
        let capa = r["capa"].as_object().unwrap();
        assert!(
            capa.contains_key("USER") && capa.contains_key("SASL") && !capa.contains_key("STLS"),
            "{listener}: {r}"
        );
        if !implicit {
            let pre = r["pre_tls_capa"].as_object().unwrap();
            assert!(
                pre.contains_key("STLS") && !pre.contains_key("USER") && !pre.contains_key("SASL"),
                "{r}"
            );
            assert_eq!(r["stls"], "+OK Begin TLS negotiation", "{r}");
        }
        assert_eq!(r["user"], "+OK", "{listener}: {r}");
        assert!(
            r["pass"].as_str().unwrap().starts_with("+OK"),
            "{listener}: {r}"
        );
        let count = r["stat"][0].as_u64().unwrap();
        assert!(count >= 1, "{r}");
        assert_eq!(r["list_count"], count, "{r}");
        assert_eq!(r["uidl_count"], count, "{r}");
        assert_eq!(r["found"].as_array().unwrap().len(), 1, "{listener}: {r}");
        let num = r["found"][0].as_u64().unwrap();
        assert_eq!(r["list_size"], served.len(), "{listener}: {r}");
        assert_eq!(
            r["list_one"],
            format!("+OK {num} {}", served.len()),
            "{listener}"
        );
        assert_eq!(
            r["uidl_one"],
            format!("+OK {num} {}", r["uid"].as_str().unwrap()),
            "{listener}"
        );
        assert!(r["retr_status"].as_str().unwrap().starts_with("+OK"), "{r}");
        let retrieved = std::fs::read(&out).unwrap();
        assert_same_bytes(&format!("{listener} RETR"), &retrieved, &served);
        assert!(retrieved.ends_with(&sent), "{listener}");
        // TOP n 3: the headers, the blank line, three body lines (dot-unstuffed).
        let top = strings(&r["top"]);
        assert_eq!(top[0], "Return-Path: <bob@example.test>", "{top:?}");
        assert!(top.contains(&format!("Subject: {tag}")), "{top:?}");
        let blank = top.iter().position(|l| l.is_empty()).unwrap();
        assert_eq!(
            &top[blank + 1..],
            ["STARTTLS", "AUTH PLAIN AGFsaWNl", "..leading dot"],
            "{top:?}"
        );
        if implicit {
            assert!(r["quit"].as_str().unwrap().starts_with("+OK"), "{r}");
        } else {
            assert!(r["dele"].as_str().unwrap().starts_with("+OK"), "{r}");
            assert!(r["quit"].as_str().unwrap().starts_with("+OK"), "{r}");
        }
    }
    // The DELE took effect at QUIT: our message is gone from the Maildir.
    wait_until(Duration::from_secs(20), "the deleted message to go", || {
        count_in_maildir(&legacy().maildir_alice, &tag) == 0
    });
    assert_no_secret_logged(&mailmoat, &ALICE_SECRETS);
}

#[test]
fn curl_lists_and_retrieves_over_pop3_stls_and_pop3s() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("pop3-curl");
    let (_, stored) = deliver(&mailmoat, dir.path(), &tag, "bob@example.test", 50);
    let bob = "bob@example.test:bob-secret-pw";
    for (scheme, listener) in [("pop3", "pop3"), ("pop3s", "pop3s")] {
        let port = mailmoat.port(listener);
        let (code, listing, stderr) = curl(scheme, port, "", &[], bob);
        assert_eq!(code, 0, "{scheme} list:\n{listing}\n{stderr}");
        assert_curl_transcript(
            &stderr,
            scheme == "pop3",
            "STLS",
            "+OK Begin TLS negotiation",
        );
        // Bob's mailbox is only ever added to: find our message among the listed ones.
        let mut found = Vec::new();
        for line in listing.lines() {
            let (num, size) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("{listing:?}"));
            let (code, message, stderr) = curl(scheme, port, num, &[], bob);
            assert_eq!(code, 0, "{scheme} RETR {num}:\n{stderr}");
            assert_eq!(message.len().to_string(), size, "{scheme} RETR {num}");
            if message.contains(&tag) {
                found.push(message);
            }
        }
        assert_eq!(found.len(), 1, "{scheme}: {listing:?}");
        assert_same_bytes(
            &format!("curl {scheme} RETR"),
            found[0].as_bytes(),
            &crlf(&stored),
        );
    }
    assert_no_secret_logged(&mailmoat, &BOB_SECRETS);
}

#[test]
fn fetchmail_retrieves_over_stls_verifying_the_certificate() {
    let mailmoat = mailmoat();
    let dir = tempfile::tempdir().unwrap();
    let tag = unique("fetchmail");
    let (sent, _) = deliver(&mailmoat, dir.path(), &tag, "bob@example.test", 20);
    let mbox = dir.path().join("fetched.mbox");
    // sslproto without "ssl": STLS is mandatory; the certificate is checked against the
    // test CA for the name mail.example.test (we connect to 127.0.0.1).
    let rc = dir.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\n\
             poll 127.0.0.1 port {port} protocol POP3 timeout 60 auth password\n\
             \x20 user \"bob@example.test\" there with password \"bob-secret-pw\" is \"root\" here\n\
             \x20 sslproto \"TLS1.2+\" sslcertck sslcertfile \"{ca}\" sslcommonname \"mail.example.test\"\n\
             \x20 keep fetchall\n\
             \x20 mda \"cat >> {mbox}\"\n",
            port = mailmoat.port("pop3"),
            ca = ca(),
            mbox = mbox.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let idfile = dir.path().join("fetchids");
    let pidfile = dir.path().join("fetchmail.pid");
    let (code, stdout, stderr) = run_program(
        "fetchmail",
        &[
            "--verbose",
            "--nodetach",
            "--fetchmailrc",
            rc.to_str().unwrap(),
            "--idfile",
            idfile.to_str().unwrap(),
            "--pidfile",
            pidfile.to_str().unwrap(),
        ],
    );
    let all = format!("{stdout}{stderr}");
    // 0: mail retrieved.
    assert_eq!(code, 0, "fetchmail failed:\n{all}");
    assert!(all.contains("POP3> STLS"), "{all}");
    assert!(all.contains("POP3< +OK Begin TLS negotiation"), "{all}");
    let before_tls = all.split("POP3> STLS").next().unwrap();
    assert!(
        !before_tls.contains("POP3> USER") && !before_tls.contains("POP3> AUTH"),
        "{all}"
    );
    let fetched = std::fs::read(&mbox).unwrap_or_default();
    assert!(
        memchr::memmem::find(&fetched, &lf(&sent)).is_some(),
        "the message is not in what fetchmail delivered:\n{all}"
    );
    assert_no_secret_logged(&mailmoat, &BOB_SECRETS);
}
