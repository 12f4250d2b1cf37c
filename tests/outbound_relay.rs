//! The outbound relay end to end (issue 15): the lab's real legacy Postfix, which has no
//! TLS at all, relays through mailmoat (`outbound` in the config) to real Postfix MXes
//! found through the lab's DNSSEC-validating unbound. Each test sends with the legacy
//! Postfix's own `sendmail` and asserts where the message ended up: delivered at which
//! MX, over which TLS (the MX's own `Received` header), with the body unchanged; or
//! still deferred in the legacy Postfix's queue with mailmoat's reply.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::outbound_lab::Lab;
use common::{Mailmoat, poll_for};

/// The lab of this binary and the one mailmoat its legacy sender relays through.
fn lab_and_relay() -> Option<(&'static Lab, &'static Mailmoat)> {
    static RELAY: OnceLock<Mailmoat> = OnceLock::new();
    let lab = Lab::shared()?;
    let relay = RELAY.get_or_init(|| {
        let cache = lab.dir().join("mailmoat-mta-sts");
        let outbound = format!(
            "metrics: {{ listen: \"127.0.0.1:{}\" }}\n\
             outbound:\n  listen: \"127.0.0.1:{}\"\n  hostname: relay.example.test\n  \
             resolver: \"{}\"\n  extra_ca_file: {}\n  mta_sts_cache_dir: {}\n",
            metrics_port(),
            lab.relay_port,
            lab.resolver,
            lab.ca.display(),
            cache.display()
        );
        // One inbound listener, as every configuration has; nothing connects to it.
        let upstream = "127.0.0.1:9".parse().unwrap();
        let relay = Mailmoat::start_with(
            &[("mx", "smtp", "starttls", "require_tls", upstream)],
            &outbound,
        );
        let listening = poll_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", lab.relay_port)).ok()
        });
        assert!(
            listening.is_some(),
            "no outbound listener: {}",
            relay.log_text()
        );
        relay
    });
    Some((lab, relay))
}

/// The port of the relay's `/metrics` endpoint.
fn metrics_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(common::free_port)
}

/// The value of the `/metrics` series `series` (name and labels, as rendered).
fn metric(series: &str) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port())).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// A message with a tag in its subject and body, submitted to the legacy sender.
fn send(lab: &Lab, to: &[&str], tag: &str) {
    let message = format!(
        "From: alice@legacy.example\r\nTo: {}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@legacy.example>\r\n\r\n\
         body of {tag}\r\n.leading dot\r\n\r\nlast line\r\n",
        to.join(", ")
    );
    let mut args = vec!["-f", "alice@legacy.example"];
    args.extend_from_slice(to);
    lab.sendmail(&args, &message);
}

/// Waits (bounded) for a line of mailmoat's log holding every one of `parts`.
fn wait_for_line(relay: &Mailmoat, parts: &[&str]) -> String {
    poll_for(Duration::from_secs(60), || {
        relay
            .log_text()
            .lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no log line with {parts:?}:\n{}", relay.log_text()))
}

/// The body [`send`] sends, as an MX's Maildir stores it (LF line ends).
fn expected_body(tag: &str) -> String {
    format!("body of {tag}\n.leading dot\n\nlast line\n")
}

/// The body of a delivered message (after the first empty line).
fn body(message: &str) -> &str {
    message.split_once("\n\n").map_or("", |(_, body)| body)
}

/// Sends a message to `recipient` and asserts that the legacy sender keeps it deferred
/// with mailmoat's reply `code` (`451 4.7.5`...) as the reason.
fn assert_deferred(lab: &Lab, recipient: &str, code: &str) {
    send(lab, &[recipient], &format!("deferred-{recipient}"));
    let reason = deferred_reason(lab, recipient);
    assert!(reason.contains(code), "{recipient}: {reason}");
}

/// Waits (bounded) for the legacy sender to hold the message to `recipient` deferred;
/// returns the reason its Postfix recorded (mailmoat's reply, as Postfix quotes it).
fn deferred_reason(lab: &Lab, recipient: &str) -> String {
    let found = poll_for(Duration::from_secs(60), || {
        lab.sender_queue().into_iter().find_map(|message| {
            let recipients = message["recipients"].as_array()?;
            recipients.iter().find_map(|r| {
                let reason = r["delay_reason"].as_str()?;
                (r["address"] == recipient && !reason.is_empty()).then(|| reason.to_owned())
            })
        })
    });
    found.unwrap_or_else(|| panic!("{recipient}: not deferred: {:?}", lab.sender_queue()))
}

#[test]
fn dane_ee_mail_is_delivered_over_verified_tls_with_its_body_unchanged() {
    let Some((lab, relay)) = lab_and_relay() else {
        return;
    };
    let tag = "dane-ee-one";
    send(lab, &["someone@dane.test"], tag);
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(
        delivered.contains("X-Original-To: someone@dane.test"),
        "{delivered}"
    );
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
    assert!(
        delivered.contains("by mx1.dane.test (Postfix) with ESMTPS"),
        "{delivered}"
    );
    assert_eq!(body(&delivered), expected_body(tag));
    wait_for_line(
        relay,
        &[
            "event=\"outbound_delivery\"",
            "domain=dane.test ",
            "policy=\"dane\"",
            "tls=true",
            "tls_version=\"TLSv1_3\"",
            "verified=true",
            "result=\"delivered\"",
        ],
    );
    let series =
        "mailmoat_outbound_deliveries_total{policy=\"dane\",result=\"delivered\",tls=\"yes\"}";
    let counted = metric(series).unwrap_or_else(|| panic!("no {series}"));
    assert!(counted >= 1.0, "{series} {counted}");
}

#[test]
fn dane_ta_mail_is_delivered_at_the_mx_whose_chain_ends_at_the_named_ca() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let tag = "dane-ta-one";
    send(lab, &["someone@ta.dane.test"], tag);
    let delivered = lab.wait_for_delivery("MX2", tag);
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
}

#[test]
fn a_tlsa_mismatch_is_deferred_never_sent_in_plaintext() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    assert_deferred(lab, "someone@badtlsa.dane.test", "451 4.7.5");
}

#[test]
fn a_dane_mx_without_starttls_is_deferred() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    assert_deferred(lab, "nostarttls@notls.dane.test", "451 4.7.5");
}

#[test]
fn a_bogus_dnssec_domain_is_deferred_as_a_dns_failure() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    assert_deferred(lab, "someone@bogus.test", "451 4.4.3");
}

#[test]
fn the_next_mx_takes_the_mail_when_the_first_fails_its_dane_check() {
    let Some((lab, relay)) = lab_and_relay() else {
        return;
    };
    let tag = "failover-one";
    send(lab, &["someone@fallback.dane.test"], tag);
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(
        delivered.contains("X-Original-To: someone@fallback.dane.test"),
        "{delivered}"
    );
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
    wait_for_line(
        relay,
        &[
            "event=\"outbound_mx_failed\"",
            "domain=fallback.dane.test",
            "mx=mx3.dane.test",
            "result_type=\"tlsa-invalid\"",
        ],
    );
}

#[test]
fn mta_sts_enforce_delivers_only_over_pkix_verified_tls_to_a_listed_mx() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let tag = "sts-enforce-one";
    send(lab, &["someone@sts.test"], tag);
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(
        delivered.contains("X-Original-To: someone@sts.test"),
        "{delivered}"
    );
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
    assert_eq!(body(&delivered), expected_body(tag));

    // A certificate for another name, and an MX the policy does not list: deferred.
    assert_deferred(lab, "someone@badcert.sts.test", "451 4.7.5");
    assert_deferred(lab, "someone@unlisted.sts.test", "451 4.7.5");
}

#[test]
fn mta_sts_testing_delivers_despite_a_certificate_for_another_name() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let tag = "sts-testing-one";
    send(lab, &["someone@testing.sts.test"], tag);
    let delivered = lab.wait_for_delivery("MX_WRONGNAME", tag);
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
}

#[test]
fn an_unsigned_domain_gets_opportunistic_tls_and_plaintext_is_a_downgrade_event() {
    let Some((lab, relay)) = lab_and_relay() else {
        return;
    };
    let tag = "plain-tls-one";
    send(lab, &["someone@plain.test"], tag);
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");

    let tag = "plain-cleartext-one";
    send(lab, &["someone@notls.plain.test"], tag);
    let delivered = lab.wait_for_delivery("MX_NOTLS", tag);
    assert!(!delivered.contains("(using TLS"), "{delivered}");
    assert!(delivered.contains("with ESMTP id"), "{delivered}");
    assert_eq!(body(&delivered), expected_body(tag));
    wait_for_line(
        relay,
        &[
            "event=\"outbound_plaintext\"",
            "domain=notls.plain.test",
            "starttls_not_offered",
        ],
    );
}

#[test]
fn recipients_of_one_domain_share_a_transaction_and_two_domains_each_get_the_mail_once() {
    let Some((lab, relay)) = lab_and_relay() else {
        return;
    };
    let tag = "two-domains-one";
    send(
        lab,
        &["first@dane.test", "second@dane.test", "third@plain.test"],
        tag,
    );
    let copies = |recipient: &str| -> Vec<String> {
        let maildir = lab.maildir("MX1");
        ["new", "cur"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(maildir.join(sub)).ok())
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .filter(|m| m.contains(tag) && m.contains(&format!("X-Original-To: {recipient}\n")))
            .collect()
    };
    let recipients = ["first@dane.test", "second@dane.test", "third@plain.test"];
    for recipient in recipients {
        let arrived = poll_for(Duration::from_secs(60), || {
            (!copies(recipient).is_empty()).then_some(())
        });
        assert!(
            arrived.is_some(),
            "{recipient} never arrived: {}",
            relay.log_text()
        );
    }
    // Nobody got the message twice.
    let [first, second, third] = recipients.map(|recipient| {
        let copies = copies(recipient);
        assert_eq!(copies.len(), 1, "{recipient}: {copies:?}");
        // The MX's queue id: one per transaction it received.
        copies[0]
            .split_once(" with ESMTPS id ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{recipient}: no queue id: {}", copies[0]))
            .to_owned()
    });
    assert_eq!(
        first, second,
        "the two dane.test recipients, one transaction"
    );
    assert_ne!(first, third, "plain.test in a transaction of its own");
    // The legacy Postfix was told 452 4.5.3 for the second domain and sent it again.
    let sender_log = std::fs::read_to_string(lab.var("LAB_SENDER_LOG")).unwrap();
    assert!(
        sender_log
            .lines()
            .any(|l| l.contains("third@plain.test") && l.contains("452 4.5.3")),
        "{sender_log}"
    );
}

#[test]
fn a_client_outside_relay_networks_cannot_relay() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let port = common::free_port();
    let outbound = format!(
        "outbound:\n  listen: \"127.0.0.1:{port}\"\n  hostname: relay.example.test\n  \
         resolver: \"{}\"\n  relay_networks: [127.0.0.2/32]\n",
        lab.resolver
    );
    let upstream = "127.0.0.1:9".parse().unwrap();
    let relay = Mailmoat::start_with(
        &[("mx", "smtp", "starttls", "require_tls", upstream)],
        &outbound,
    );
    let mut client = poll_for(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("the outbound listener");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut client, &mut reply).unwrap();
    assert_eq!(
        reply,
        "554 5.7.1 This host relays only for its configured networks\r\n"
    );
    wait_for_line(&relay, &["event=\"relay_refused\"", "client=127.0.0.1:"]);
}

#[test]
fn an_smime_signed_message_still_verifies_at_the_mx() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let openssl = |args: &[&str]| {
        let ran = common::run_bounded(
            Command::new("openssl").args(args).current_dir(dir.path()),
            Duration::from_secs(60),
        );
        assert_eq!(ran.code, Some(0), "openssl {args:?}: {}", ran.both());
        ran
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "signer.key",
        "-out",
        "signer.pem",
        "-days",
        "2",
        "-subj",
        "/CN=alice@legacy.example",
    ]);
    let tag = "smime-signed-one";
    // Text with trailing spaces, a tab, a leading dot and a long line: what a relay
    // that rewrote anything would break.
    let content = format!(
        "Content-Type: text/plain; charset=utf-8\r\n\r\nsigned {tag}\r\n\
         trailing spaces   \r\n\ta tab\r\n.a leading dot\r\n{}\r\n",
        "x".repeat(900)
    );
    std::fs::write(path("content.txt"), content).unwrap();
    openssl(&[
        "cms",
        "-sign",
        "-in",
        "content.txt",
        "-signer",
        "signer.pem",
        "-inkey",
        "signer.key",
        "-out",
        "signed.eml",
    ]);
    let signed = std::fs::read_to_string(path("signed.eml")).unwrap();
    let message = format!(
        "From: alice@legacy.example\r\nTo: someone@dane.test\r\nSubject: {tag}\r\n{}",
        signed.replace("\r\n", "\n").replace('\n', "\r\n")
    );
    lab.sendmail(
        &["-f", "alice@legacy.example", "someone@dane.test"],
        &message,
    );

    let delivered = lab.wait_for_delivery("MX1", &format!("Subject: {tag}"));
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
    std::fs::write(path("delivered.eml"), &delivered).unwrap();
    let verified = openssl(&[
        "cms",
        "-verify",
        "-in",
        "delivered.eml",
        "-CAfile",
        "signer.pem",
        "-purpose",
        "any",
        "-out",
        "verified.txt",
    ]);
    assert!(
        verified.both().contains("Verification successful"),
        "{}",
        verified.both()
    );
    let out = std::fs::read_to_string(path("verified.txt")).unwrap();
    assert!(out.contains(&format!("signed {tag}")), "{out}");
    // The control: one changed byte of the signed text fails the same check.
    std::fs::write(path("edited.eml"), delivered.replacen("a tab", "a tub", 1)).unwrap();
    let edited = common::run_bounded(
        Command::new("openssl")
            .args([
                "cms",
                "-verify",
                "-in",
                "edited.eml",
                "-CAfile",
                "signer.pem",
            ])
            .args(["-purpose", "any", "-out", "/dev/null"])
            .current_dir(dir.path()),
        Duration::from_secs(60),
    );
    assert_ne!(
        edited.code,
        Some(0),
        "an edited body verified: {}",
        edited.both()
    );
}

#[test]
fn an_internationalized_address_and_an_8bit_body_cross_unchanged() {
    let Some((lab, relay)) = lab_and_relay() else {
        return;
    };
    let tag = "utf8-one";
    let recipient = "jörg@dane.test";
    let message = format!(
        "From: alice@legacy.example\r\nTo: {recipient}\r\nSubject: {tag}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, {tag}\r\nÆØÅ 日本語\r\n"
    );
    // Postfix's sendmail marks the message SMTPUTF8 itself (smtputf8_autodetect_classes).
    lab.sendmail(
        &["-f", "alice@legacy.example", "-B", "8BITMIME", recipient],
        &message,
    );
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(
        delivered.contains(&format!("X-Original-To: {recipient}")),
        "{delivered}"
    );
    assert!(delivered.contains("(using TLSv1.3"), "{delivered}");
    assert!(
        delivered.contains("with UTF8SMTPS"),
        "SMTPUTF8 at the MX: {delivered}"
    );
    assert_eq!(
        body(&delivered),
        format!("Grüße aus Köln, {tag}\nÆØÅ 日本語\n")
    );
    wait_for_line(
        relay,
        &[
            "event=\"outbound_delivery\"",
            "domain=dane.test ",
            "result=\"delivered\"",
        ],
    );
}

#[test]
fn connections_to_mxes_come_from_the_configured_source_address() {
    let Some((lab, _)) = lab_and_relay() else {
        return;
    };
    let port = common::free_port();
    let outbound = format!(
        "outbound:\n  listen: \"127.0.0.1:{port}\"\n  hostname: relay.example.test\n  \
         resolver: \"{}\"\n  source_address: 127.0.0.5\n",
        lab.resolver
    );
    let upstream = "127.0.0.1:9".parse().unwrap();
    let _relay = Mailmoat::start_with(
        &[("mx", "smtp", "starttls", "require_tls", upstream)],
        &outbound,
    );
    let listening = poll_for(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(listening.is_some(), "no outbound listener");
    let tag = "source-address-one";
    // swaks as the legacy MTA, straight to this relay.
    let sent = common::run_bounded(
        Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{port}")])
            .args([
                "--from",
                "alice@legacy.example",
                "--to",
                "someone@dane.test",
            ])
            .args(["--header", &format!("Subject: {tag}"), "--body", tag]),
        Duration::from_secs(60),
    );
    assert_eq!(sent.code, Some(0), "{}", sent.both());
    let delivered = lab.wait_for_delivery("MX1", tag);
    assert!(
        delivered.contains("from relay.example.test (unknown [127.0.0.5])"),
        "{delivered}"
    );
}
