//! `mailmoat explain` against the real legacy Postfix and Dovecot: the client's view
//! before and after TLS is exactly the upstream's own reply, rewritten by the rules of
//! ARCHITECTURE.md §2, and the upstream's view is the dialogue mailmoat really holds.

mod common;

use common::{config_file, listener};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const UPSTREAM: &str = "upstream said (C: mailmoat, S: upstream)";
const BEFORE: &str = "client sees before TLS (C: client, S: mailmoat)";
const AFTER: &str = "client sees after TLS (C: client, S: mailmoat)";

/// One listener's part of the output: its header and its sections by title.
#[derive(Debug)]
struct Listener {
    header: String,
    sections: BTreeMap<String, Vec<String>>,
    error: Option<String>,
}

impl Listener {
    fn section(&self, title: &str) -> &[String] {
        self.sections
            .get(title)
            .unwrap_or_else(|| panic!("no section {title:?} in {self:#?}"))
    }
}

/// Runs `mailmoat explain` on these listener lines; returns the exit code, the parsed
/// output and the raw output.
fn explain(listeners: &[String]) -> (Option<i32>, Vec<Listener>, String) {
    let dir = tempfile::tempdir().unwrap();
    run(&config_file(dir.path(), listeners, ""))
}

fn run(path: &Path) -> (Option<i32>, Vec<Listener>, String) {
    let output = common::run_bounded(
        Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["explain", "-c"])
            .arg(path),
        std::time::Duration::from_secs(120),
    );
    let stdout = output.stdout;
    let mut parsed: Vec<Listener> = Vec::new();
    let mut title = String::new();
    for line in stdout.lines() {
        if let Some(header) = line.strip_prefix("listener ") {
            parsed.push(Listener {
                header: header.to_owned(),
                sections: BTreeMap::new(),
                error: None,
            });
        } else if let Some(error) = line.strip_prefix("  error: ") {
            parsed.last_mut().unwrap().error = Some(error.to_owned());
        } else if let Some(content) = line.strip_prefix("    ") {
            let listener = parsed.last_mut().unwrap();
            listener
                .sections
                .get_mut(&title)
                .unwrap()
                .push(content.to_owned());
        } else if let Some(heading) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            title = heading.to_owned();
            parsed
                .last_mut()
                .unwrap()
                .sections
                .insert(title.clone(), Vec::new());
        } else {
            assert!(line.is_empty(), "unexpected line {line:?} in\n{stdout}");
        }
    }
    (output.code, parsed, stdout)
}

/// The lines of the first reply to `command` in a view: after `C: command`, up to the
/// next `C:` line.
fn reply_to(view: &[String], command: &str) -> Vec<String> {
    view.iter()
        .skip_while(|line| *line != &format!("C: {command}"))
        .skip(1)
        .take_while(|line| line.starts_with("S: "))
        .cloned()
        .collect()
}

fn lines(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn explain_shows_what_postfix_said_and_what_clients_see() {
    let legacy = common::legacy();
    let smtp = legacy.smtp.to_string();
    let (code, listeners, stdout) = explain(&[
        listener("submission", "smtp", "starttls", "require_tls", &smtp),
        listener("smtps", "smtp", "implicit", "require_tls", &smtp),
    ]);
    assert_eq!(code, Some(0), "{stdout}");
    let [submission, smtps] = &listeners[..] else {
        panic!("{stdout}")
    };
    assert_eq!(
        submission.header,
        format!(
            "submission (SMTP, 127.0.0.1:0, tls: starttls, policy: require_tls) -> upstream {smtp}"
        )
    );

    // The upstream's own EHLO reply, as Postfix sends it: AUTH, no STARTTLS.
    let upstream = submission.section(UPSTREAM);
    let ehlo = reply_to(upstream, "EHLO explain.invalid");
    assert_eq!(ehlo[0], "S: 250-legacy.example.test", "{stdout}");
    assert!(
        ehlo.contains(&"S: 250-AUTH PLAIN LOGIN".to_owned()),
        "{stdout}"
    );
    assert!(ehlo.last().unwrap().starts_with("S: 250 "), "{stdout}");
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{stdout}");

    // The whole dialogue with the upstream: EHLO, the RSET before the go-ahead
    // (ARCHITECTURE.md §1.6), the client's new EHLO after TLS, QUIT.
    let mut expected = lines(&[
        "S: 220 legacy.example.test ESMTP legacy",
        "C: EHLO explain.invalid",
    ]);
    expected.extend(ehlo.iter().cloned());
    expected.extend(lines(&[
        "C: RSET",
        "S: 250 2.0.0 Ok",
        "-- TLS handshake between the client and mailmoat --",
        "C: EHLO explain.invalid",
    ]));
    expected.extend(ehlo.iter().cloned());
    expected.extend(lines(&["C: QUIT", "S: 221 2.0.0 Bye"]));
    assert_eq!(upstream, expected, "{stdout}");

    // What a client sees of it: CHUNKING never crosses (BDAT is not forwarded, ARCHITECTURE.md
    // §5), the rest in the upstream's order.
    let mut client_ehlo: Vec<String> = ehlo
        .iter()
        .filter(|line| !line.ends_with("CHUNKING"))
        .map(|line| line.replacen("S: 250 ", "S: 250-", 1))
        .collect();
    let last = client_ehlo.len() - 1;
    client_ehlo[last] = client_ehlo[last].replacen("S: 250-", "S: 250 ", 1);

    // Before TLS: the same lines in the same order, AUTH removed, STARTTLS appended.
    let mut before_ehlo: Vec<String> = client_ehlo
        .iter()
        .filter(|line| !line.starts_with("S: 250-AUTH"))
        .map(|line| line.replacen("S: 250 ", "S: 250-", 1))
        .collect();
    before_ehlo.push("S: 250 STARTTLS".into());
    let mut expected = lines(&[
        "S: 220 legacy.example.test ESMTP legacy",
        "C: EHLO explain.invalid",
    ]);
    expected.extend(before_ehlo);
    expected.extend(lines(&["C: STARTTLS", "S: 220 2.0.0 Ready to start TLS"]));
    assert_eq!(submission.section(BEFORE), expected, "{stdout}");

    // After TLS: the upstream's reply, AUTH back, no STARTTLS.
    let mut expected = lines(&["C: EHLO explain.invalid"]);
    expected.extend(client_ehlo.iter().cloned());
    expected.extend(lines(&["C: QUIT", "S: 221 2.0.0 Bye"]));
    assert_eq!(submission.section(AFTER), expected, "{stdout}");

    // Implicit TLS: there is no before-TLS view, and the client sees the upstream's reply
    // (without CHUNKING).
    assert!(!smtps.sections.contains_key(BEFORE), "{stdout}");
    let mut expected = lines(&[
        "S: 220 legacy.example.test ESMTP legacy",
        "C: EHLO explain.invalid",
    ]);
    expected.extend(client_ehlo.iter().cloned());
    expected.extend(lines(&["C: QUIT", "S: 221 2.0.0 Bye"]));
    assert_eq!(smtps.section(AFTER), expected, "{stdout}");
    assert!(submission.error.is_none() && smtps.error.is_none());
}

/// IMAP capability tokens rewritten for before TLS (ARCHITECTURE.md §2): `AUTH=*` and `SASL-IR`
/// removed, `STARTTLS LOGINDISABLED` appended.
fn imap_before_tls(capabilities: &str) -> String {
    let mut tokens: Vec<&str> = capabilities
        .split(' ')
        .filter(|t| !t.to_ascii_uppercase().starts_with("AUTH=") && *t != "SASL-IR")
        .collect();
    tokens.extend(["STARTTLS", "LOGINDISABLED"]);
    tokens.join(" ")
}

#[test]
fn explain_shows_what_dovecot_imap_said_and_what_clients_see() {
    let legacy = common::legacy();
    let (code, listeners, stdout) = explain(&[listener(
        "imap",
        "imap",
        "starttls",
        "require_tls",
        &legacy.imap.to_string(),
    )]);
    assert_eq!(code, Some(0), "{stdout}");
    let imap = &listeners[0];
    let upstream = imap.section(UPSTREAM);

    // Dovecot's greeting carries its capabilities in a response code.
    let greeting = &upstream[0];
    let (head, rest) = greeting.split_once(" [CAPABILITY ").expect(greeting);
    let (greeting_caps, tail) = rest.split_once(']').unwrap();
    assert_eq!(head, "S: * OK");
    assert!(greeting_caps.contains("AUTH=PLAIN"), "{stdout}");
    let capability = reply_to(upstream, "a CAPABILITY");
    let caps = capability[0]
        .strip_prefix("S: * CAPABILITY ")
        .expect(&capability[0]);
    assert!(caps.starts_with("IMAP4rev1 "), "{stdout}");
    assert!(caps.contains("AUTH=PLAIN"), "{stdout}");
    assert!(!caps.contains("STARTTLS"), "{stdout}");
    assert!(capability[1].starts_with("S: a OK "), "{stdout}");

    let mut expected = vec![
        format!(
            "S: * OK [CAPABILITY {}]{tail}",
            imap_before_tls(greeting_caps)
        ),
        "C: a CAPABILITY".into(),
        format!("S: * CAPABILITY {}", imap_before_tls(caps)),
        capability[1].clone(),
        "C: b STARTTLS".into(),
        "S: b OK Begin TLS negotiation now".into(),
    ];
    assert_eq!(imap.section(BEFORE), expected, "{stdout}");
    assert!(
        imap.section(BEFORE)[2].ends_with(" STARTTLS LOGINDISABLED"),
        "{stdout}"
    );

    // After TLS the upstream's capabilities come back unchanged; nothing about STARTTLS.
    let after_capability = reply_to(upstream, "c CAPABILITY");
    assert_eq!(after_capability[0], capability[0]);
    expected = vec!["C: c CAPABILITY".into()];
    expected.extend(after_capability);
    expected.push("C: d LOGOUT".into());
    expected.extend(reply_to(upstream, "d LOGOUT"));
    assert_eq!(imap.section(AFTER), expected, "{stdout}");
    assert!(
        !imap
            .section(AFTER)
            .iter()
            .any(|l| l.contains("LOGINDISABLED")),
        "{stdout}"
    );
    assert_eq!(
        imap.section(AFTER).last().unwrap(),
        "S: d OK Logout completed."
    );

    // STARTTLS is answered by mailmoat and never forwarded (ARCHITECTURE.md §1.6).
    assert!(!upstream.iter().any(|l| l.contains("STARTTLS")), "{stdout}");
}

#[test]
fn explain_shows_what_dovecot_pop3_said_and_what_clients_see() {
    let legacy = common::legacy();
    let (code, listeners, stdout) = explain(&[listener(
        "pop3",
        "pop3",
        "starttls",
        "require_tls",
        &legacy.pop3.to_string(),
    )]);
    assert_eq!(code, Some(0), "{stdout}");
    let pop3 = &listeners[0];
    let upstream = pop3.section(UPSTREAM);
    let capa = reply_to(upstream, "CAPA");
    assert_eq!(capa[0], "S: +OK", "{stdout}");
    assert!(capa.contains(&"S: USER".to_owned()), "{stdout}");
    assert!(capa.iter().any(|l| l.starts_with("S: SASL ")), "{stdout}");
    assert_eq!(capa.last().unwrap(), "S: .");

    // Before TLS: USER and SASL removed, STLS added before the end (ARCHITECTURE.md §2).
    let mut before_capa: Vec<String> = capa
        .iter()
        .filter(|l| *l != "S: USER" && !l.starts_with("S: SASL"))
        .cloned()
        .collect();
    before_capa.insert(before_capa.len() - 1, "S: STLS".into());
    let mut expected = vec![upstream[0].clone(), "C: CAPA".into()];
    expected.extend(before_capa);
    expected.extend(lines(&["C: STLS", "S: +OK Begin TLS negotiation"]));
    assert_eq!(pop3.section(BEFORE), expected, "{stdout}");
    assert!(upstream[0].starts_with("S: +OK "), "{stdout}");

    // After TLS: the upstream's CAPA unchanged, with USER and SASL.
    let mut expected = lines(&["C: CAPA"]);
    expected.extend(capa.iter().cloned());
    expected.push("C: QUIT".into());
    expected.extend(reply_to(upstream, "QUIT"));
    assert_eq!(pop3.section(AFTER), expected, "{stdout}");
    assert!(!upstream.iter().any(|l| l.contains("STLS")), "{stdout}");
}

#[test]
fn explain_reports_an_unreachable_upstream_and_goes_on() {
    let legacy = common::legacy();
    let closed = format!("127.0.0.1:{}", common::free_port());
    let (code, listeners, stdout) = explain(&[
        listener("down", "smtp", "starttls", "require_tls", &closed),
        listener(
            "pop3",
            "pop3",
            "implicit",
            "require_tls",
            &legacy.pop3.to_string(),
        ),
    ]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        listeners[0]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with(&format!("cannot connect to {closed}: "))),
        "{stdout}"
    );
    assert!(listeners[1].error.is_none(), "{stdout}");
    assert_eq!(listeners[1].section(AFTER)[1], "C: CAPA", "{stdout}");
}
