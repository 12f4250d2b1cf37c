//! Transcript tests of the outbound session: inputs from both sides fed, every action
//! asserted in order, no sockets.

use super::*;

use crate::proto::testing::limits;

const GREETING: &str = "220 relay.example.net ESMTP\r\n";
const EHLO_REPLY: &str = "250-relay.example.net\r\n250-PIPELINING\r\n250-SIZE 10000\r\n\
250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n";
const MX_GREETING: &str = "220 mx1.example.org ESMTP Postfix\r\n";
/// An MX's EHLO reply before TLS.
const MX_EHLO: &str = "250-mx1.example.org\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n";
/// The same MX inside TLS.
const MX_EHLO_TLS: &str = "250-mx1.example.org\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n";
/// An MX without STARTTLS, DSN or 8BITMIME.
const MX_EHLO_PLAIN: &str = "250-mx9.example.org\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n";
const MAIL: &str = "MAIL FROM:<alice@legacy.example.com>\r\n";
const RCPT: &str = "RCPT TO:<bob@example.org>\r\n";
const MX_LOST: &str = "C: 451 4.4.2 Connection to the recipient's mail server lost\r\n";
const MX_BROKEN: &str = "C: 451 4.4.0 The recipient's mail server broke the SMTP protocol\r\n";

fn config() -> Config {
    Config {
        hostname: "relay.example.net".to_owned(),
        max_message_size: 10_000,
        limits: limits(512),
    }
}

/// What the driver is asked to do, in order, one string each: `C: ` and `M: ` for bytes
/// to the client and the MX (consecutive writes to the same side joined), the other
/// actions by name, events by their name.
fn show(actions: &[Action]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for action in actions {
        let (prefix, text) = match action {
            Action::ToClient(bytes) => ("C: ", String::from_utf8_lossy(bytes).into_owned()),
            Action::ToMx(bytes) => ("M: ", String::from_utf8_lossy(bytes).into_owned()),
            Action::OpenMx { domain } => ("", format!("OpenMx {domain}")),
            Action::StartMxTls => ("", "StartMxTls".to_owned()),
            Action::NextMx { failure } => ("", format!("NextMx {}", failure.reason())),
            Action::CloseMx => ("", "CloseMx".to_owned()),
            Action::Event(event) => ("", format!("event {}", event.name())),
            Action::Close => ("", "Close".to_owned()),
        };
        match out.last_mut() {
            Some(last) if !prefix.is_empty() && last.starts_with(prefix) => last.push_str(&text),
            _ => out.push(format!("{prefix}{text}")),
        }
    }
    out
}

/// Every action queued; nothing may follow a close.
fn actions(s: &mut Session) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(action) = s.next_action() {
        assert!(
            out.last() != Some(&Action::Close),
            "{action:?} after the close"
        );
        out.push(action);
    }
    out
}

fn drain(s: &mut Session) -> Vec<String> {
    show(&actions(s))
}

fn client(s: &mut Session, text: &str) -> Vec<String> {
    s.on_client_data(text.as_bytes());
    drain(s)
}

fn mx(s: &mut Session, text: &str) -> Vec<String> {
    s.on_mx_data(text.as_bytes());
    drain(s)
}

fn connect(s: &mut Session, host: &str, tls: TlsRequirement) -> Vec<String> {
    s.on_mx_connected(MxAttempt {
        host: host.to_owned(),
        tls,
        policy: if tls == TlsRequirement::Required {
            "dane"
        } else {
            "opportunistic"
        },
    });
    drain(s)
}

fn c(text: &str) -> String {
    format!("C: {text}")
}

fn m(text: &str) -> String {
    format!("M: {text}")
}

const NOTHING: [String; 0] = [];

/// A session past the client's EHLO.
fn greeted() -> Session {
    let mut s = Session::new(config());
    assert_eq!(drain(&mut s), [c(GREETING)]);
    assert_eq!(
        client(&mut s, "EHLO legacy.example.com\r\n"),
        [c(EHLO_REPLY)]
    );
    s
}

/// MAIL and the first RCPT (`bob@example.org`): the session asks for an MX.
fn opened() -> Session {
    let mut s = greeted();
    assert_eq!(client(&mut s, MAIL), [c("250 2.1.0 Ok\r\n")]);
    assert_eq!(client(&mut s, RCPT), ["OpenMx example.org"]);
    s
}

/// Walks a TLS-required MX from its greeting to TLS and the EHLO inside it; returns what
/// the MX's EHLO reply inside TLS produced (the MAIL line).
fn through_tls(s: &mut Session) -> Vec<String> {
    assert_eq!(
        connect(s, "mx1.example.org", TlsRequirement::Required),
        NOTHING
    );
    assert_eq!(mx(s, MX_GREETING), [m("EHLO relay.example.net\r\n")]);
    assert_eq!(mx(s, MX_EHLO), [m("STARTTLS\r\n")]);
    assert_eq!(mx(s, "220 2.0.0 Ready to start TLS\r\n"), ["StartMxTls"]);
    s.on_mx_tls(Ok(()));
    assert_eq!(drain(s), [m("EHLO relay.example.net\r\n")]);
    mx(s, MX_EHLO_TLS)
}

/// A transaction whose first RCPT the MX (over TLS) accepted.
fn accepted() -> Session {
    let mut s = opened();
    assert_eq!(through_tls(&mut s), [m(MAIL)]);
    assert_eq!(mx(&mut s, "250 2.1.0 Ok\r\n"), [m(RCPT)]);
    assert_eq!(mx(&mut s, "250 2.1.5 Ok\r\n"), [c("250 2.1.5 Ok\r\n")]);
    s
}

/// `accepted()`, then DATA and the MX's 354: the client is sending the body.
fn in_body() -> Session {
    let mut s = accepted();
    assert_eq!(client(&mut s, "DATA\r\n"), [m("DATA\r\n")]);
    assert_eq!(mx(&mut s, "354 Go ahead\r\n"), [c("354 Go ahead\r\n")]);
    s
}

fn events(actions: &[Action]) -> Vec<&Event> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

// ---- the local side ----

#[test]
fn the_greeting_and_ehlo_reply_offer_what_the_relay_passes_on_and_nothing_else() {
    let mut s = greeted();
    // HELO works too, and a second greeting is allowed.
    assert_eq!(
        client(&mut s, "HELO legacy.example.com\r\n"),
        [c("250 relay.example.net\r\n")]
    );
    assert_eq!(
        client(&mut s, "NOOP anything\r\nRSET\r\nVRFY bob\r\nHELP\r\n"),
        [c("250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n\
252 2.0.0 Cannot VRFY user; send RCPT to attempt delivery\r\n\
214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\r\n")]
    );
    assert_eq!(
        client(&mut s, "QUIT\r\n"),
        [c("221 2.0.0 Bye\r\n"), "Close".to_owned()]
    );
    assert_eq!(
        s.summary(),
        "ehlo=1 helo=1 rset=1 noop=1 vrfy=1 quit=1 unknown=1"
    );
}

#[test]
fn what_the_local_link_does_not_offer_is_refused_locally() {
    let mut s = greeted();
    let not_implemented = "502 5.5.1 Error: command not implemented\r\n";
    for line in [
        "STARTTLS\r\n",
        "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        "EXPN staff\r\n",
        "ETRN example.org\r\n",
        "XCLIENT ADDR=192.0.2.1\r\n",
        "XFORWARD NAME=x\r\n",
    ] {
        assert_eq!(client(&mut s, line), [c(not_implemented)], "{line:?}");
    }
    // BDAT's chunk is read and dropped, never taken for commands.
    assert_eq!(
        client(&mut s, "BDAT 12 LAST\r\nQUIT\r\nNOOP\r\nRSET\r\n"),
        [c(&format!("{not_implemented}250 2.0.0 Ok\r\n"))]
    );
    assert_eq!(s.phase(), Phase::Command);
    // A chunk beyond 32 bits is no service: the session ends.
    assert_eq!(
        client(&mut s, "BDAT 4294967296\r\n"),
        [
            "event limit_exceeded".to_owned(),
            c("552 5.3.4 Error: chunk too large, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
}

#[test]
fn garbage_and_commands_out_of_sequence_get_local_errors() {
    let mut s = Session::new(config());
    drain(&mut s);
    let table = [
        (
            "MAIL FROM:<a@b.example>\r\n",
            "503 5.5.1 Error: send HELO/EHLO first\r\n",
        ),
        (
            "RCPT TO:<b@example.org>\r\n",
            "503 5.5.1 Error: need MAIL command\r\n",
        ),
        ("DATA\r\n", "503 5.5.1 Error: need MAIL command\r\n"),
        ("EHLO\r\n", "501 5.5.4 Syntax: EHLO/HELO hostname\r\n"),
        (
            "EHLO two words\r\n",
            "501 5.5.4 Syntax: EHLO/HELO hostname\r\n",
        ),
        ("\0NOOP\r\n", "500 5.5.2 Error: bad syntax\r\n"),
        ("\r\n", "500 5.5.2 Error: bad syntax\r\n"),
        ("NOOP\rRSET\r\n", "500 5.5.2 Error: bad syntax\r\n"),
        ("FROB\r\n", "500 5.5.2 Error: command not recognized\r\n"),
        ("VRFY\r\n", "501 5.5.4 Syntax: VRFY address\r\n"),
        (
            "RSET now\r\n",
            "501 5.5.4 Syntax error (no parameters allowed)\r\n",
        ),
        ("EHLO legacy.example.com\r\n", EHLO_REPLY),
        (
            "MAIL FROM:<a b@c>\r\n",
            "501 5.5.4 Syntax: MAIL FROM:<address>\r\n",
        ),
        (
            "MAIL FROM:<a@b.example> AUTH=<>\r\n",
            "555 5.5.4 Unsupported parameter\r\n",
        ),
        (
            "MAIL FROM:<a@b.example> SIZE=1x\r\n",
            "501 5.5.4 Bad parameter value\r\n",
        ),
        ("MAIL FROM:<a@b.example>\r\n", "250 2.1.0 Ok\r\n"),
        (
            "MAIL FROM:<a@b.example>\r\n",
            "503 5.5.1 Error: nested MAIL command\r\n",
        ),
        ("RCPT TO:<>\r\n", "501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (
            "RCPT TO:<Postmaster>\r\n",
            "550 5.1.3 Recipient without a domain is not relayed\r\n",
        ),
        (
            "RCPT TO:<b@[192.0.2.1]>\r\n",
            "550 5.1.2 Recipient at an address literal is not relayed\r\n",
        ),
        (
            "RCPT TO:<b@example.org> FOO=1\r\n",
            "555 5.5.4 Unsupported parameter\r\n",
        ),
        ("DATA\r\n", "554 5.5.1 Error: no valid recipients\r\n"),
        (
            "DATA now\r\n",
            "501 5.5.4 Syntax error (no parameters allowed)\r\n",
        ),
    ];
    for (line, reply) in table {
        assert_eq!(client(&mut s, line), [c(reply)], "{line:?}");
    }
    // None of it asked for an MX.
    assert_eq!(s.phase(), Phase::Command);
}

#[test]
fn an_over_long_line_gets_an_error_and_closes() {
    let mut s = greeted();
    let out = client(&mut s, &"x".repeat(600));
    assert_eq!(
        out,
        [
            "event limit_exceeded".to_owned(),
            c("500 5.5.2 Error: line too long\r\n"),
            "Close".to_owned()
        ]
    );
    assert!(!s.wants_client_data());
}

#[test]
fn an_over_long_line_mid_transaction_quits_the_mx_too() {
    let mut s = accepted();
    let out = client(&mut s, &"RCPT TO:<".repeat(100));
    assert_eq!(
        out,
        [
            "event limit_exceeded".to_owned(),
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            c("500 5.5.2 Error: line too long\r\n"),
            "Close".to_owned()
        ]
    );
}

#[test]
fn a_client_that_only_draws_errors_is_closed() {
    let mut s = greeted();
    let out = client(&mut s, &"FROB\r\n".repeat(21));
    assert_eq!(
        out,
        [
            c(&"500 5.5.2 Error: command not recognized\r\n".repeat(21)),
            "event limit_exceeded".to_owned(),
            c("421 4.7.0 Too many errors, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
    // Second-domain 452s are no errors: a legacy MTA sends them in every transaction.
    let mut s = accepted();
    let out = client(&mut s, &"RCPT TO:<x@other.example>\r\n".repeat(30));
    assert_eq!(out.len(), 1);
    assert!(s.wants_client_data());
}

#[test]
fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
    let mut s = greeted();
    let flood = "NOOP\r\n".repeat(10_000);
    let first = client(&mut s, &flood);
    let reply = "250 2.0.0 Ok\r\n";
    let mut answered = first[0].len().saturating_sub(3) / reply.len();
    assert!(
        answered < 10_000,
        "the unwritten-reply budget holds the rest"
    );
    while s.on_output_written() {
        let out = drain(&mut s);
        answered += out
            .iter()
            .map(|o| (o.len() - 3) / reply.len())
            .sum::<usize>();
    }
    assert_eq!(answered, 10_000);
}

/// The outbound events are boxed: every session's actions are as big as the biggest
/// event, and the unwritten-reply budget charges each action its size.
#[test]
fn the_outbound_events_do_not_make_every_sessions_actions_bigger() {
    // `CredentialsExposed { String, Option<String> }` is the biggest of the others.
    let biggest_other = std::mem::size_of::<(String, Option<String>)>();
    assert!(std::mem::size_of::<Event>() <= biggest_other + std::mem::size_of::<usize>());
}

// ---- the MX side: a whole delivery ----

#[test]
fn a_delivery_over_starttls_from_greeting_to_quit() {
    let mut s = Session::new(config());
    assert_eq!(drain(&mut s), [c(GREETING)]);
    assert_eq!(s.phase(), Phase::Command);
    assert_eq!(
        client(&mut s, "EHLO legacy.example.com\r\n"),
        [c(EHLO_REPLY)]
    );
    assert_eq!(
        client(
            &mut s,
            "MAIL FROM:<alice@legacy.example.com> SIZE=300 BODY=8BITMIME RET=HDRS\r\n"
        ),
        [c("250 2.1.0 Ok\r\n")]
    );
    assert_eq!(
        client(&mut s, "RCPT TO:<bob@Example.ORG> NOTIFY=FAILURE\r\n"),
        ["OpenMx example.org"]
    );
    assert_eq!(s.phase(), Phase::MxConnect);
    assert_eq!(
        connect(&mut s, "mx1.example.org", TlsRequirement::Required),
        NOTHING
    );
    assert_eq!(s.phase(), Phase::MxReply);
    // A multi-line greeting is one reply.
    assert_eq!(
        mx(&mut s, "220-mx1.example.org ESMTP\r\n220 no UCE\r\n"),
        [m("EHLO relay.example.net\r\n")]
    );
    assert_eq!(mx(&mut s, MX_EHLO), [m("STARTTLS\r\n")]);
    assert_eq!(
        mx(&mut s, "220 2.0.0 Ready to start TLS\r\n"),
        ["StartMxTls"]
    );
    assert_eq!(s.phase(), Phase::MxHandshake);
    // MX bytes during the handshake are the TLS engine's, never the session's.
    assert_eq!(mx(&mut s, "250 2.1.5 Ok\r\n"), NOTHING);
    s.on_mx_tls(Ok(()));
    assert_eq!(drain(&mut s), [m("EHLO relay.example.net\r\n")]);
    // Everything the relay passes on is offered: MAIL as the client gave it.
    assert_eq!(
        mx(&mut s, MX_EHLO_TLS),
        [m(
            "MAIL FROM:<alice@legacy.example.com> SIZE=300 BODY=8BITMIME RET=HDRS\r\n"
        )]
    );
    assert_eq!(
        mx(&mut s, "250 2.1.0 Ok\r\n"),
        [m("RCPT TO:<bob@Example.ORG> NOTIFY=FAILURE\r\n")]
    );
    assert_eq!(mx(&mut s, "250 2.1.5 Ok\r\n"), [c("250 2.1.5 Ok\r\n")]);
    assert_eq!(s.phase(), Phase::Command);
    assert_eq!(client(&mut s, "DATA\r\n"), [m("DATA\r\n")]);
    assert_eq!(
        mx(&mut s, "354 End data with <CR><LF>.<CR><LF>\r\n"),
        [c("354 End data with <CR><LF>.<CR><LF>\r\n")]
    );
    assert_eq!(s.phase(), Phase::Data);
    assert_eq!(
        client(&mut s, "Subject: hi\r\n\r\nHello.\r\n"),
        [m("Subject: hi\r\n\r\nHello.\r\n")]
    );
    assert_eq!(client(&mut s, ".\r\n"), [m(".\r\n")]);
    assert_eq!(s.phase(), Phase::MxFinalReply);
    s.on_mx_data(b"250 2.0.0 Ok: queued as 4Xyz\r\n");
    let out = actions(&mut s);
    assert_eq!(
        show(&out),
        [
            "event outbound_delivery".to_owned(),
            c("250 2.0.0 Ok: queued as 4Xyz\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned()
        ]
    );
    assert_eq!(
        events(&out),
        [&Event::OutboundDelivery(Box::new(Delivery {
            domain: "example.org".to_owned(),
            mx: "mx1.example.org".to_owned(),
            policy: "dane",
            tls: true,
            result: "delivered",
            code: Some(250),
            tls_detail: None,
        }))]
    );
    assert_eq!(
        client(&mut s, "QUIT\r\n"),
        [c("221 2.0.0 Bye\r\n"), "Close".to_owned()]
    );
    assert_eq!(s.summary(), "ehlo=1 mail=1 rcpt=1/1 data=1/1 quit=1");
}

#[test]
fn an_opportunistic_mx_without_starttls_gets_the_mail_in_plaintext_as_a_logged_downgrade() {
    let mut s = opened();
    assert_eq!(
        connect(&mut s, "mx9.example.org", TlsRequirement::Opportunistic),
        NOTHING
    );
    assert_eq!(mx(&mut s, MX_GREETING), [m("EHLO relay.example.net\r\n")]);
    s.on_mx_data(MX_EHLO_PLAIN.as_bytes());
    let out = actions(&mut s);
    assert_eq!(show(&out), ["event outbound_plaintext".to_owned(), m(MAIL)]);
    assert_eq!(
        events(&out),
        [&Event::OutboundPlaintext(Box::new(Plaintext {
            domain: "example.org".to_owned(),
            mx: "mx9.example.org".to_owned(),
            policy: "opportunistic",
            reason: "starttls_not_offered",
        }))]
    );
    assert_eq!(mx(&mut s, "250 2.1.0 Ok\r\n"), [m(RCPT)]);
    assert_eq!(mx(&mut s, "250 2.1.5 Ok\r\n"), [c("250 2.1.5 Ok\r\n")]);
    client(&mut s, "DATA\r\n");
    mx(&mut s, "354 go\r\n");
    client(&mut s, "x\r\n.\r\n");
    s.on_mx_data(b"250 2.0.0 Ok\r\n");
    let out = actions(&mut s);
    assert!(matches!(
        events(&out)[..],
        [Event::OutboundDelivery(delivery)] if !delivery.tls && delivery.result == "delivered"
    ));
}

#[test]
fn the_plaintext_retry_of_an_opportunistic_mx_skips_starttls_and_says_so() {
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Plaintext);
    mx(&mut s, MX_GREETING);
    s.on_mx_data(MX_EHLO.as_bytes());
    let out = actions(&mut s);
    assert_eq!(show(&out), ["event outbound_plaintext".to_owned(), m(MAIL)]);
    assert!(matches!(
        events(&out)[..],
        [Event::OutboundPlaintext(plaintext)] if plaintext.reason == "tls_disabled"
    ));
}

#[test]
fn a_tls_required_mx_without_starttls_is_given_up_for_the_next_one() {
    let mut s = opened();
    assert_eq!(
        connect(&mut s, "mx9.example.org", TlsRequirement::Required),
        NOTHING
    );
    mx(&mut s, MX_GREETING);
    s.on_mx_data(MX_EHLO_PLAIN.as_bytes());
    let out = actions(&mut s);
    assert_eq!(
        show(&out),
        [
            "event outbound_mx_failed".to_owned(),
            m("QUIT\r\n"),
            "NextMx starttls_not_offered".to_owned()
        ]
    );
    let Some(Action::NextMx { failure }) = out.last() else {
        unreachable!()
    };
    assert_eq!(
        failure.rfc8460_result_type(),
        Some("starttls-not-supported")
    );
    assert_eq!(s.phase(), Phase::MxConnect);
    // A late byte of the abandoned MX is nobody's.
    assert_eq!(mx(&mut s, "221 Bye\r\n"), NOTHING);
    // The second MX does TLS, and the RCPT gets its answer.
    assert_eq!(through_tls(&mut s), [m(MAIL)]);
    assert_eq!(mx(&mut s, "250 2.1.0 Ok\r\n"), [m(RCPT)]);
    assert_eq!(mx(&mut s, "250 2.1.5 Ok\r\n"), [c("250 2.1.5 Ok\r\n")]);
}

#[test]
fn an_mx_that_refuses_starttls_or_fails_the_handshake_is_given_up() {
    // Refused: even when TLS is only opportunistic (the driver may retry in plaintext).
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Opportunistic);
    mx(&mut s, MX_GREETING);
    mx(&mut s, MX_EHLO);
    assert_eq!(
        mx(&mut s, "454 4.7.0 TLS not available\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            m("QUIT\r\n"),
            "NextMx starttls_refused".to_owned()
        ]
    );
    // A failed handshake: no QUIT on a connection in no state for one.
    connect(&mut s, "mx2.example.org", TlsRequirement::Required);
    mx(&mut s, MX_GREETING);
    mx(&mut s, MX_EHLO);
    mx(&mut s, "220 Go ahead\r\n");
    s.on_mx_tls(Err(MxTlsFailure {
        result_type: "tlsa-invalid",
        detail: "no TLSA record matches the certificate".to_owned(),
    }));
    let out = actions(&mut s);
    assert_eq!(
        show(&out),
        [
            "event outbound_mx_failed".to_owned(),
            "NextMx tls_failed".to_owned()
        ]
    );
    let Some(Action::NextMx { failure }) = out.last() else {
        unreachable!()
    };
    assert_eq!(failure.rfc8460_result_type(), Some("tlsa-invalid"));
    assert_eq!(failure.detail(), "no TLSA record matches the certificate");
    // None left: the RCPT gets the driver's reply.
    s.on_mx_unavailable(MX_TLS_POLICY);
    assert_eq!(
        drain(&mut s),
        [c(
            "451 4.7.5 The recipient domain's mail servers failed its TLS policy\r\n"
        )]
    );
}

#[test]
fn bytes_behind_the_mxs_220_to_starttls_are_an_injection_and_cost_the_mx() {
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Required);
    mx(&mut s, MX_GREETING);
    mx(&mut s, MX_EHLO);
    assert_eq!(
        mx(&mut s, "220 Go ahead\r\n250-injected\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            "NextMx protocol_error".to_owned()
        ]
    );
}

#[test]
fn a_greeting_refused_or_a_hello_refused_costs_the_mx_with_a_quit() {
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Required);
    assert_eq!(
        mx(&mut s, "554 5.3.2 No service for you\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            m("QUIT\r\n"),
            "NextMx greeting_refused".to_owned()
        ]
    );
    connect(&mut s, "mx2.example.org", TlsRequirement::Required);
    mx(&mut s, MX_GREETING);
    assert_eq!(
        mx(&mut s, "421 4.7.0 Too busy\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            m("QUIT\r\n"),
            "NextMx hello_refused".to_owned()
        ]
    );
}

#[test]
fn an_ehlo_refused_with_5xx_falls_back_to_helo() {
    let mut s = opened();
    connect(&mut s, "old.example.org", TlsRequirement::Opportunistic);
    mx(&mut s, MX_GREETING);
    assert_eq!(
        mx(&mut s, "502 5.5.2 Error: command not recognized\r\n"),
        [m("HELO relay.example.net\r\n")]
    );
    // No extensions: no STARTTLS, a plaintext MAIL.
    assert_eq!(
        mx(&mut s, "250 old.example.org\r\n"),
        ["event outbound_plaintext".to_owned(), m(MAIL)]
    );
    // TLS required: a HELO-only MX cannot have it.
    let mut s = opened();
    connect(&mut s, "old.example.org", TlsRequirement::Required);
    mx(&mut s, MX_GREETING);
    mx(&mut s, "500 5.5.1 What?\r\n");
    assert_eq!(
        mx(&mut s, "250 old.example.org\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            m("QUIT\r\n"),
            "NextMx starttls_not_offered".to_owned()
        ]
    );
}

#[test]
fn no_usable_mx_answers_this_and_every_later_rcpt_of_the_transaction() {
    // A plan's failure, as the driver hands it on.
    const DNS_FAILURE: &[u8] = b"451 4.4.3 Recipient domain lookup failed, try again later\r\n";
    let mut s = opened();
    assert_eq!(s.phase(), Phase::MxConnect);
    s.on_mx_unavailable(DNS_FAILURE);
    let unavailable = "C: 451 4.4.3 Recipient domain lookup failed, try again later\r\n";
    assert_eq!(drain(&mut s), [unavailable]);
    // No second search within the transaction.
    assert_eq!(
        client(&mut s, "RCPT TO:<carol@example.org>\r\n"),
        [unavailable]
    );
    assert_eq!(
        client(&mut s, "RCPT TO:<dave@example.net>\r\n"),
        [c(
            "452 4.5.3 One recipient domain per transaction: send this recipient in another\r\n"
        )]
    );
    assert_eq!(
        client(&mut s, "DATA\r\n"),
        [c("554 5.5.1 Error: no valid recipients\r\n")]
    );
    // A new transaction may try again.
    assert_eq!(
        client(&mut s, &format!("RSET\r\n{MAIL}{RCPT}")),
        [
            c("250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"),
            "OpenMx example.org".to_owned()
        ]
    );
    // An answer nobody asked for is ignored.
    s.on_mx_unavailable(MX_UNREACHABLE);
    assert_eq!(
        drain(&mut s),
        [c(
            "451 4.4.1 No answer from the recipient domain's mail servers\r\n"
        )]
    );
    s.on_mx_unavailable(MX_UNREACHABLE);
    assert_eq!(drain(&mut s), NOTHING);
    assert_eq!(s.summary(), "ehlo=1 mail=2 rcpt=0/4 data=0/1 rset=1");
}

#[test]
fn the_mxs_refusal_of_mail_is_the_reply_of_this_and_every_later_rcpt() {
    let mut s = opened();
    assert_eq!(through_tls(&mut s), [m(MAIL)]);
    let refusal =
        "550-5.7.1 Sender address rejected\r\n550 5.7.1 See https://mx1.example.org/why\r\n";
    assert_eq!(
        mx(&mut s, refusal),
        [c(refusal), m("QUIT\r\n"), "CloseMx".to_owned()]
    );
    assert_eq!(
        client(&mut s, "RCPT TO:<carol@example.org>\r\n"),
        [c(refusal)]
    );
    assert_eq!(
        client(&mut s, "DATA\r\n"),
        [c("554 5.5.1 Error: no valid recipients\r\n")]
    );
}

#[test]
fn a_message_the_mx_cannot_take_as_it_is_is_refused_not_converted() {
    // BODY=8BITMIME to an MX without 8BITMIME (RFC 6152 §3): the RCPT's reply.
    let mut s = greeted();
    client(
        &mut s,
        "MAIL FROM:<alice@legacy.example.com> BODY=8BITMIME\r\n",
    );
    assert_eq!(client(&mut s, RCPT), ["OpenMx example.org"]);
    connect(&mut s, "mx9.example.org", TlsRequirement::Opportunistic);
    mx(&mut s, MX_GREETING);
    let refusal =
        "554 5.6.3 Recipient's server does not accept 8-bit MIME; the relay does not convert\r\n";
    assert_eq!(
        mx(&mut s, MX_EHLO_PLAIN),
        [c(refusal), m("QUIT\r\n"), "CloseMx".to_owned()]
    );
    assert_eq!(
        client(&mut s, "RCPT TO:<carol@example.org>\r\n"),
        [c(refusal)]
    );
}

#[test]
fn recipients_of_the_same_domain_are_forwarded_and_answered_verbatim() {
    let mut s = accepted();
    // DSN's NOTIFY passes: the MX offers DSN.
    assert_eq!(
        client(
            &mut s,
            "RCPT TO:<carol@EXAMPLE.org> NOTIFY=SUCCESS,FAILURE\r\n"
        ),
        [m("RCPT TO:<carol@EXAMPLE.org> NOTIFY=SUCCESS,FAILURE\r\n")]
    );
    assert_eq!(s.phase(), Phase::MxReply);
    assert_eq!(
        mx(&mut s, "250 2.1.5 Ok\n"),
        [c("250 2.1.5 Ok\r\n")],
        "a bare LF reply line reaches the client with CRLF"
    );
    client(&mut s, "RCPT TO:<nobody@example.org>\r\n");
    let refusal = "550-5.1.1 <nobody@example.org>: Recipient address rejected:\r\n\
550 5.1.1 User unknown in virtual mailbox table\r\n";
    assert_eq!(mx(&mut s, refusal), [c(refusal)]);
    assert_eq!(s.summary(), "ehlo=1 mail=1 rcpt=2/3");
}

#[test]
fn a_second_domain_waits_for_a_transaction_of_its_own() {
    let mut s = accepted();
    assert_eq!(
        client(&mut s, "RCPT TO:<carol@example.net>\r\n"),
        [c(
            "452 4.5.3 One recipient domain per transaction: send this recipient in another\r\n"
        )]
    );
    client(&mut s, "DATA\r\n");
    mx(&mut s, "354 go\r\n");
    client(&mut s, "hi\r\n.\r\n");
    assert_eq!(
        mx(&mut s, "250 2.0.0 Ok\r\n"),
        [
            "event outbound_delivery".to_owned(),
            c("250 2.0.0 Ok\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned()
        ]
    );
    // The legacy MTA's next transaction goes to the other domain's MX.
    assert_eq!(
        client(
            &mut s,
            "MAIL FROM:<alice@legacy.example.com>\r\nRCPT TO:<carol@example.net>\r\n"
        ),
        [c("250 2.1.0 Ok\r\n"), "OpenMx example.net".to_owned()]
    );
}

#[test]
fn recipients_per_transaction_are_bounded() {
    let mut s = accepted();
    for i in 1..MAX_RECIPIENTS {
        let line = format!("RCPT TO:<r{i}@example.org>\r\n");
        assert_eq!(client(&mut s, &line), [m(&line)]);
        mx(&mut s, "250 2.1.5 Ok\r\n");
        // The driver wrote the replies (or the unwritten-reply budget stops the reading).
        s.on_output_written();
    }
    assert_eq!(
        client(&mut s, "RCPT TO:<one-too-many@example.org>\r\n"),
        [
            "event limit_exceeded".to_owned(),
            c("452 4.5.3 Error: too many recipients\r\n")
        ]
    );
}

#[test]
fn a_pipelined_client_is_answered_in_order() {
    let mut s = greeted();
    assert_eq!(
        client(
            &mut s,
            "MAIL FROM:<alice@legacy.example.com>\r\nRCPT TO:<bob@example.org>\r\n\
RCPT TO:<nobody@example.org>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n"
        ),
        [c("250 2.1.0 Ok\r\n"), "OpenMx example.org".to_owned()]
    );
    assert!(s.wants_client_data());
    assert_eq!(through_tls(&mut s), [m(MAIL)]);
    assert_eq!(mx(&mut s, "250 2.1.0 Ok\r\n"), [m(RCPT)]);
    assert_eq!(
        mx(&mut s, "250 2.1.5 Ok\r\n"),
        [c("250 2.1.5 Ok\r\n"), m("RCPT TO:<nobody@example.org>\r\n")]
    );
    assert_eq!(
        mx(&mut s, "550 5.1.1 No such user\r\n"),
        [
            c(
                "550 5.1.1 No such user\r\n452 4.5.3 One recipient domain per transaction: send this recipient in another\r\n"
            ),
            m("DATA\r\n")
        ]
    );
    assert_eq!(mx(&mut s, "354 go\r\n"), [c("354 go\r\n")]);
}

#[test]
fn pipelined_bytes_are_held_up_to_the_bound_while_the_mx_owes_a_reply() {
    let mut config = config();
    config.limits.max_held_bytes = 1024;
    let mut s = Session::new(config);
    drain(&mut s);
    client(&mut s, &format!("EHLO legacy.example.com\r\n{MAIL}{RCPT}"));
    assert_eq!(s.phase(), Phase::MxConnect);
    client(&mut s, &"NOOP\r\n".repeat(170));
    assert!(s.wants_client_data());
    client(&mut s, "NOOP\r\n");
    assert!(!s.wants_client_data(), "1026 bytes held");
    s.on_mx_unavailable(MX_UNREACHABLE);
    assert_eq!(drain(&mut s).len(), 1);
    assert!(s.wants_client_data());
}

// ---- bodies ----

#[test]
fn a_body_crosses_the_scanner_smuggling_attempts_neutralised() {
    let mut s = in_body();
    let out = client(
        &mut s,
        "Subject: x\r\n\r\nline\nbare\r\n.\nMAIL FROM:<evil@x.example>\r\n\0.\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(
        out,
        [
            m(
                "Subject: x\r\n\r\nline\r\nbare\r\n..\r\nMAIL FROM:<evil@x.example>\r\n.\0.\r\n.\r\n"
            ),
            "event bare_newline_normalized".to_owned(),
            "event smuggling_neutralized".to_owned()
        ]
    );
    // The QUIT behind the end of data waits for the MX's reply.
    assert_eq!(s.phase(), Phase::MxFinalReply);
    assert_eq!(
        mx(&mut s, "250 2.0.0 Ok\r\n"),
        [
            "event outbound_delivery".to_owned(),
            c("250 2.0.0 Ok\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            c("221 2.0.0 Bye\r\n"),
            "Close".to_owned()
        ]
    );
}

#[test]
fn a_refused_data_leaves_the_following_lines_as_commands() {
    let mut s = accepted();
    assert_eq!(client(&mut s, "DATA\r\nNOOP\r\n"), [m("DATA\r\n")]);
    assert_eq!(
        mx(&mut s, "554 5.5.1 No thanks\r\n"),
        [c("554 5.5.1 No thanks\r\n250 2.0.0 Ok\r\n")]
    );
}

#[test]
fn a_declared_size_over_the_limit_is_refused_at_mail() {
    let mut s = greeted();
    assert_eq!(
        client(&mut s, "MAIL FROM:<a@legacy.example.com> SIZE=10001\r\n"),
        [c(
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        )]
    );
    // And one the MX's own SIZE is below: the RCPT's reply, no MAIL sent.
    let mut s = greeted();
    client(&mut s, "MAIL FROM:<a@legacy.example.com> SIZE=5000\r\n");
    client(&mut s, RCPT);
    connect(&mut s, "mx9.example.org", TlsRequirement::Opportunistic);
    mx(&mut s, MX_GREETING);
    assert_eq!(
        mx(&mut s, "250-mx9.example.org\r\n250 SIZE 4000\r\n"),
        [
            c("552 5.3.4 Message size exceeds the recipient's limit\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned()
        ]
    );
}

#[test]
fn a_body_over_the_limit_never_ends_at_the_mx() {
    let mut config = config();
    config.max_message_size = 40;
    let mut s = Session::new(config);
    drain(&mut s);
    client(&mut s, &format!("EHLO legacy.example.com\r\n{MAIL}{RCPT}"));
    through_tls(&mut s);
    mx(&mut s, "250 ok\r\n");
    mx(&mut s, "250 ok\r\n");
    client(&mut s, "DATA\r\n");
    mx(&mut s, "354 go\r\n");
    // 29 octets pass; 29 more would make 58: only 11 of them go.
    let line = "0123456789abcdefghijklmnopq\r\n"; // 29 octets
    assert_eq!(client(&mut s, line), [m(line)]);
    assert_eq!(
        client(&mut s, line),
        [
            m("0123456789a"),
            "event limit_exceeded".to_owned(),
            "CloseMx".to_owned()
        ]
    );
    assert_eq!(s.phase(), Phase::Data);
    // The rest is read to its end, and answered then.
    assert_eq!(client(&mut s, "more\r\n"), NOTHING);
    assert_eq!(
        client(&mut s, ".\r\nNOOP\r\n"),
        [c(
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
        )]
    );
    // The transaction is over.
    assert_eq!(
        client(&mut s, RCPT),
        [c("503 5.5.1 Error: need MAIL command\r\n")]
    );
}

#[test]
fn a_body_of_exactly_the_limit_is_delivered() {
    let mut config = config();
    config.max_message_size = 29;
    let mut s = Session::new(config);
    drain(&mut s);
    client(&mut s, &format!("EHLO legacy.example.com\r\n{MAIL}{RCPT}"));
    through_tls(&mut s);
    mx(&mut s, "250 ok\r\n");
    mx(&mut s, "250 ok\r\n");
    client(&mut s, "DATA\r\n");
    mx(&mut s, "354 go\r\n");
    let body = "0123456789abcdefghijklmnopq\r\n.\r\n";
    assert_eq!(client(&mut s, body), [m(body)]);
    assert_eq!(s.phase(), Phase::MxFinalReply);
}

#[test]
fn a_line_of_control_bytes_longer_than_a_text_line_ends_everything() {
    let mut s = in_body();
    let out = client(&mut s, &"\0".repeat(1000));
    assert_eq!(
        out,
        [
            "event limit_exceeded".to_owned(),
            "CloseMx".to_owned(),
            c("554 5.6.0 Error: message line of control characters only, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
}

#[test]
fn a_client_gone_mid_body_delivers_nothing() {
    let mut s = in_body();
    client(&mut s, "Subject: x\r\n\r\nhalf a messa");
    s.on_client_eof();
    assert_eq!(drain(&mut s), ["CloseMx", "Close"]);
}

#[test]
fn a_half_closed_client_still_gets_the_replies_it_is_owed() {
    let mut s = in_body();
    client(&mut s, "x\r\n.\r\nQUIT\r\n");
    s.on_client_eof();
    assert_eq!(drain(&mut s), NOTHING);
    assert_eq!(
        mx(&mut s, "250 2.0.0 Ok\r\n"),
        [
            "event outbound_delivery".to_owned(),
            c("250 2.0.0 Ok\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            c("221 2.0.0 Bye\r\n"),
            "Close".to_owned()
        ]
    );
    // A half-closed client without QUIT: closed once nothing is owed.
    let mut s = accepted();
    client(&mut s, "RCPT TO:<carol@example.org>\r\nNOOP");
    s.on_client_eof();
    assert_eq!(
        mx(&mut s, "250 2.1.5 Ok\r\n"),
        [
            c("250 2.1.5 Ok\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            "Close".to_owned()
        ]
    );
}

// ---- the MX failing ----

#[test]
fn an_mx_lost_before_the_first_rcpt_was_answered_costs_only_the_mx() {
    let mut s = opened();
    assert_eq!(through_tls(&mut s), [m(MAIL)]);
    s.on_mx_eof();
    assert_eq!(
        drain(&mut s),
        ["event outbound_mx_failed", "NextMx connection_lost"]
    );
    s.on_mx_unavailable(MX_UNREACHABLE);
    assert_eq!(
        drain(&mut s),
        [c(
            "451 4.4.1 No answer from the recipient domain's mail servers\r\n"
        )]
    );
}

#[test]
fn an_mx_lost_mid_transaction_fails_the_waiting_command_and_the_rest_of_it() {
    let mut s = accepted();
    client(&mut s, "RCPT TO:<carol@example.org>\r\n");
    s.on_mx_eof();
    assert_eq!(
        drain(&mut s),
        [
            "event outbound_mx_failed".to_owned(),
            "CloseMx".to_owned(),
            MX_LOST.to_owned()
        ]
    );
    assert_eq!(client(&mut s, "RCPT TO:<dave@example.org>\r\n"), [MX_LOST]);
    // A recipient was accepted: DATA is deferred, not refused.
    assert_eq!(client(&mut s, "DATA\r\n"), [MX_LOST]);
    // Idle, too: the MX is gone before anything waits for it.
    let mut s = accepted();
    s.on_mx_eof();
    assert_eq!(drain(&mut s), ["event outbound_mx_failed", "CloseMx"]);
    assert_eq!(client(&mut s, "DATA\r\n"), [MX_LOST]);
}

#[test]
fn an_mx_lost_while_the_body_streams_gets_the_client_a_451_at_its_end() {
    let mut s = in_body();
    assert_eq!(
        client(&mut s, "Subject: x\r\n\r\n"),
        [m("Subject: x\r\n\r\n")]
    );
    s.on_mx_eof();
    assert_eq!(drain(&mut s), ["event outbound_mx_failed", "CloseMx"]);
    assert_eq!(s.phase(), Phase::Data);
    assert_eq!(client(&mut s, "more\r\n"), NOTHING);
    assert_eq!(client(&mut s, ".\r\n"), [MX_LOST]);
    assert_eq!(
        client(&mut s, "QUIT\r\n"),
        [c("221 2.0.0 Bye\r\n"), "Close".to_owned()]
    );
}

#[test]
fn an_mx_lost_or_silent_after_the_end_of_data_is_never_a_250() {
    let mut s = in_body();
    client(&mut s, "x\r\n.\r\n");
    s.on_mx_eof();
    let out = actions(&mut s);
    assert_eq!(
        show(&out),
        [
            "event outbound_mx_failed".to_owned(),
            "CloseMx".to_owned(),
            "event outbound_delivery".to_owned(),
            MX_LOST.to_owned()
        ]
    );
    assert!(matches!(
        events(&out)[1],
        Event::OutboundDelivery(delivery) if delivery.result == "unknown" && delivery.code.is_none()
    ));
    let mut s = in_body();
    client(&mut s, "x\r\n.\r\n");
    assert_eq!(s.phase(), Phase::MxFinalReply);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        [
            "event outbound_mx_failed".to_owned(),
            "CloseMx".to_owned(),
            "event outbound_delivery".to_owned(),
            c("451 4.4.2 Timeout waiting for the recipient's mail server\r\n")
        ]
    );
    // The session goes on: the legacy MTA retries the message later.
    assert_eq!(s.phase(), Phase::Command);
    assert_eq!(client(&mut s, MAIL), [c("250 2.1.0 Ok\r\n")]);
}

#[test]
fn malformed_mx_replies_cost_the_mx_before_the_first_rcpt_and_451_after() {
    for bad in [
        "HTTP/1.1 400 Bad Request\r\n".to_owned(),
        format!("220 {}\r\n", "x".repeat(MAX_MX_LINE_LEN)),
        "220-a\r\n250 b\r\n".to_owned(),
        "199 what\r\n".to_owned(),
        "220 fine\0really\r\n".to_owned(),
        "220-x\r\n".repeat(MAX_REPLY_LINES + 1),
    ] {
        let mut s = opened();
        connect(&mut s, "mx1.example.org", TlsRequirement::Required);
        assert_eq!(
            mx(&mut s, &bad),
            ["event outbound_mx_failed", "NextMx protocol_error"],
            "{bad:?}"
        );
    }
    for bad in [
        "250 2.1.5 Ok\rINJECTED 250 2.0.0 queued\r\n".to_owned(),
        "250-2.1.5 Ok\r\n550 5.1.1 No\r\n".to_owned(),
        format!("250 {}\r\n", "x".repeat(MAX_MX_LINE_LEN)),
        "250-x\r\n".repeat(MAX_REPLY_LINES + 1),
        "2x0 what\r\n".to_owned(),
    ] {
        let mut s = accepted();
        client(&mut s, "RCPT TO:<carol@example.org>\r\n");
        assert_eq!(
            mx(&mut s, &bad),
            [
                "event outbound_mx_failed".to_owned(),
                "CloseMx".to_owned(),
                MX_BROKEN.to_owned()
            ],
            "{bad:?}"
        );
        assert_eq!(client(&mut s, "DATA\r\n"), [MX_BROKEN], "{bad:?}");
    }
}

#[test]
fn unsolicited_mx_bytes_never_reach_the_client() {
    // Idle in the transaction.
    let mut s = accepted();
    assert_eq!(
        mx(&mut s, "421 4.4.2 Idle too long\r\n"),
        ["event outbound_mx_failed", "CloseMx"]
    );
    assert_eq!(
        client(&mut s, "RCPT TO:<carol@example.org>\r\n"),
        [MX_BROKEN]
    );
    // A second reply behind the one owed, even in the same read.
    let mut s = accepted();
    client(&mut s, "RCPT TO:<carol@example.org>\r\n");
    assert_eq!(
        mx(&mut s, "550 5.1.1 No\r\n250 2.1.5 Ok\r\n"),
        [
            "event outbound_mx_failed".to_owned(),
            "CloseMx".to_owned(),
            MX_BROKEN.to_owned()
        ]
    );
    // Before the first RCPT was answered: the next MX; its extra line went nowhere.
    let mut s = opened();
    through_tls(&mut s);
    mx(&mut s, "250 2.1.0 Ok\r\n");
    assert_eq!(
        mx(&mut s, "250 2.1.5 Ok\r\n250 2.0.0 queued\r\n"),
        ["event outbound_mx_failed", "NextMx protocol_error"]
    );
    // While the body streams: a 451 at its end.
    let mut s = in_body();
    client(&mut s, "Subject: x\r\n");
    assert_eq!(
        mx(&mut s, "250 2.0.0 Ok\r\n"),
        ["event outbound_mx_failed", "CloseMx"]
    );
    assert_eq!(client(&mut s, "rest\r\n.\r\n"), [MX_BROKEN]);
}

// ---- ends ----

#[test]
fn rset_mid_transaction_quits_the_mx_so_the_next_may_go_elsewhere() {
    let mut s = accepted();
    assert_eq!(
        client(&mut s, "RSET\r\n"),
        [m("QUIT\r\n"), "CloseMx".to_owned(), c("250 2.0.0 Ok\r\n")]
    );
    assert_eq!(
        client(
            &mut s,
            "MAIL FROM:<a@legacy.example.com>\r\nRCPT TO:<c@example.net>\r\n"
        ),
        [c("250 2.1.0 Ok\r\n"), "OpenMx example.net".to_owned()]
    );
    // EHLO resets as RSET does (RFC 5321 §4.1.4).
    let mut s = accepted();
    assert_eq!(
        client(&mut s, "EHLO legacy.example.com\r\n"),
        [m("QUIT\r\n"), "CloseMx".to_owned(), c(EHLO_REPLY)]
    );
}

#[test]
fn quit_mid_transaction_quits_the_mx_too() {
    let mut s = accepted();
    assert_eq!(
        client(&mut s, "QUIT\r\nNOOP\r\n"),
        [
            c("221 2.0.0 Bye\r\n"),
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            "Close".to_owned()
        ]
    );
    assert!(!s.wants_client_data());
    assert_eq!(client(&mut s, "NOOP\r\n"), NOTHING);
}

#[test]
fn every_phase_has_its_timeout() {
    // A silent client, with an MX session open.
    let mut s = accepted();
    assert_eq!(s.phase(), Phase::Command);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        [
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            c("421 4.4.2 Timeout exceeded, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
    // A client silent mid-body: no end of data, no QUIT inside the body.
    let mut s = in_body();
    assert_eq!(s.phase(), Phase::Data);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        [
            "CloseMx".to_owned(),
            c("421 4.4.2 Timeout exceeded, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
    // The search for an MX.
    let mut s = opened();
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        [
            "CloseMx".to_owned(),
            c("451 4.4.2 Timeout waiting for the recipient's mail server\r\n")
        ]
    );
    // An MX silent before the first RCPT's answer: the next one.
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Required);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        ["event outbound_mx_failed", "NextMx timeout"]
    );
    // The handshake.
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Required);
    mx(&mut s, MX_GREETING);
    mx(&mut s, MX_EHLO);
    mx(&mut s, "220 go\r\n");
    assert_eq!(s.phase(), Phase::MxHandshake);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        ["event outbound_mx_failed", "NextMx timeout"]
    );
    // An MX silent after it: the waiting command's 451.
    let mut s = accepted();
    client(&mut s, "DATA\r\n");
    assert_eq!(s.phase(), Phase::MxReply);
    s.on_timeout();
    assert_eq!(
        drain(&mut s),
        [
            "event outbound_mx_failed".to_owned(),
            "CloseMx".to_owned(),
            c("451 4.4.2 Timeout waiting for the recipient's mail server\r\n")
        ]
    );
}

#[test]
fn shutdown_waits_for_the_command_boundary() {
    let mut s = opened();
    assert!(!s.close_if_idle(), "an MX is being sought");
    through_tls(&mut s);
    assert!(!s.close_if_idle(), "MAIL is out");
    mx(&mut s, "250 ok\r\n");
    mx(&mut s, "250 ok\r\n");
    client(&mut s, "NO");
    assert!(!s.close_if_idle(), "half a command is held");
    client(&mut s, "OP\r\n");
    assert!(s.close_if_idle());
    assert_eq!(
        drain(&mut s),
        [
            m("QUIT\r\n"),
            "CloseMx".to_owned(),
            c("421 4.3.2 Service shutting down, closing connection\r\n"),
            "Close".to_owned()
        ]
    );
    assert!(!s.close_if_idle());
}

#[test]
fn inputs_out_of_place_are_ignored() {
    let mut s = greeted();
    s.on_mx_connected(MxAttempt {
        host: "mx.example".to_owned(),
        tls: TlsRequirement::Required,
        policy: "dane",
    });
    s.on_mx_data(b"220 hi\r\n");
    s.on_mx_tls(Ok(()));
    s.on_mx_eof();
    s.on_mx_unavailable(MX_UNREACHABLE);
    assert_eq!(drain(&mut s), NOTHING);
    // A TLS result before StartMxTls.
    let mut s = opened();
    connect(&mut s, "mx1.example.org", TlsRequirement::Required);
    s.on_mx_tls(Ok(()));
    assert_eq!(drain(&mut s), NOTHING);
    assert_eq!(mx(&mut s, MX_GREETING), [m("EHLO relay.example.net\r\n")]);
}

#[test]
fn an_idle_session_gives_its_buffers_back() {
    let mut s = accepted();
    s.release_idle_memory();
    assert_eq!(
        (
            s.client_in.capacity(),
            s.mx_in.capacity(),
            s.client_out.capacity(),
            s.actions.capacity(),
            s.reply_lines.capacity()
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(client(&mut s, "NOOP\r\n"), [c("250 2.0.0 Ok\r\n")]);
}

// ---- properties ----

/// What the scripted MX and driver do next.
enum Input {
    Connect,
    Tls,
    Data(&'static str),
}

/// A well-behaved MX behind a well-behaved driver: every connection offers STARTTLS,
/// `nobody@` recipients are refused, everything else is accepted.
#[derive(Default)]
struct ScriptedMx {
    line: Vec<u8>,
    tls: bool,
    in_body: bool,
}

impl ScriptedMx {
    fn receive(&mut self, bytes: &[u8], replies: &mut Vec<Input>) {
        for &b in bytes {
            self.line.push(b);
            if b != b'\n' {
                continue;
            }
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            let line = line.trim_end_matches(['\r', '\n']);
            if self.in_body {
                if line == "." {
                    self.in_body = false;
                    replies.push(Input::Data("250 2.0.0 Ok: queued\r\n"));
                }
                continue;
            }
            let reply = match line.split(' ').next().unwrap_or_default() {
                "EHLO" if self.tls => MX_EHLO_TLS,
                "EHLO" => MX_EHLO,
                "STARTTLS" => "220 2.0.0 Ready\r\n",
                "MAIL" => "250 2.1.0 Ok\r\n",
                "RCPT" if line.contains("nobody@") => "550 5.1.1 No such user\r\n",
                "RCPT" => "250 2.1.5 Ok\r\n",
                "DATA" => {
                    self.in_body = true;
                    "354 go\r\n"
                }
                "QUIT" => continue,
                _ => "502 5.5.2 What?\r\n",
            };
            replies.push(Input::Data(reply));
        }
    }
}

/// Runs a whole dialogue with the client's bytes cut at `cuts`; the scripted MX answers
/// as soon as it can. Returns the transcript.
fn run_scripted(stream: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut s = Session::new(config());
    let mut all = Vec::new();
    let mut server = ScriptedMx::default();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        s.on_client_data(&stream[start..cut]);
        start = cut;
        loop {
            let step = actions(&mut s);
            if step.is_empty() {
                break;
            }
            let mut inputs = Vec::new();
            for action in &step {
                match action {
                    Action::OpenMx { .. } | Action::NextMx { .. } => inputs.push(Input::Connect),
                    Action::StartMxTls => inputs.push(Input::Tls),
                    Action::ToMx(bytes) => server.receive(bytes, &mut inputs),
                    Action::CloseMx => server = ScriptedMx::default(),
                    _ => {}
                }
            }
            all.extend(step);
            for input in inputs {
                match input {
                    Input::Connect => {
                        s.on_mx_connected(MxAttempt {
                            host: "mx1.example.org".to_owned(),
                            tls: TlsRequirement::Required,
                            policy: "dane",
                        });
                        s.on_mx_data(MX_GREETING.as_bytes());
                    }
                    Input::Tls => {
                        server.tls = true;
                        s.on_mx_tls(Ok(()));
                    }
                    Input::Data(reply) => s.on_mx_data(reply.as_bytes()),
                }
            }
        }
    }
    show(&all)
}

const DIALOGUE: &[u8] = b"EHLO legacy.example.com\r\n\
MAIL FROM:<alice@legacy.example.com> BODY=8BITMIME\r\nRCPT TO:<bob@example.org> NOTIFY=FAILURE\r\n\
RCPT TO:<carol@example.net>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n\
Subject: x\r\n\r\nline\nbare\r\n.\nMAIL FROM:<evil@x.example>\r\n\0.\r\n.\r\n\
MAIL FROM:<alice@legacy.example.com>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\nhi\r\n.\r\n\
NOOP\r\nQUIT\r\n";

#[test]
fn the_scripted_dialogue_delivers_two_messages() {
    let transcript = run_scripted(DIALOGUE, &[]);
    let to_mx: String = transcript
        .iter()
        .filter_map(|line| line.strip_prefix("M: "))
        .collect();
    assert!(
        to_mx.contains("\r\nline\r\nbare\r\n..\r\nMAIL FROM:<evil@x.example>\r\n.\0.\r\n.\r\n")
    );
    let to_client: String = transcript
        .iter()
        .filter_map(|line| line.strip_prefix("C: "))
        .collect();
    assert_eq!(
        to_client,
        format!(
            "{GREETING}{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
452 4.5.3 One recipient domain per transaction: send this recipient in another\r\n\
550 5.1.1 No such user\r\n354 go\r\n250 2.0.0 Ok: queued\r\n\
250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok: queued\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
        )
    );
    assert_eq!(
        transcript
            .iter()
            .filter(|line| line.starts_with("OpenMx"))
            .collect::<Vec<_>>(),
        ["OpenMx example.org", "OpenMx example.net"]
    );
    assert_eq!(transcript.last().map(String::as_str), Some("Close"));
}

/// An SMTP reply stream: whole lines of `code (SP / "-") text CRLF`, no control
/// characters, every multi-line reply ended.
fn assert_replies(stream: &[u8]) {
    assert!(stream.is_empty() || stream.ends_with(b"\r\n"), "{stream:?}");
    let mut open_code: Option<&[u8]> = None;
    for line in stream.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").expect("CRLF");
        assert!(
            line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit),
            "{line:?}"
        );
        assert!((b'2'..=b'5').contains(&line[0]), "{line:?}");
        assert!(
            line.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            "{line:?}"
        );
        if let Some(code) = open_code {
            assert_eq!(code, &line[..3]);
        }
        open_code = (line.get(3) == Some(&b'-')).then(|| &line[..3]);
    }
    assert!(open_code.is_none(), "a reply left unfinished");
}

/// One input of the arbitrary-input property.
#[derive(Debug, Clone)]
enum Op {
    Client(Vec<u8>),
    Mx(Vec<u8>),
    Connected(u8),
    Unavailable,
    TlsOk,
    TlsFailed,
    ClientEof,
    MxEof,
    Timeout,
    Written,
    Shutdown,
}

fn fragment(known: &'static [&'static str]) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        4 => proptest::sample::select(known).prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), Just(b'a'), Just(b'-'), Just(b'2')],
            0..40
        ),
    ]
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    const CLIENT: &[&str] = &[
        "EHLO legacy.example.com\r\n",
        "MAIL FROM:<a@legacy.example.com>\r\n",
        "MAIL FROM:<a@legacy.example.com> SIZE=20 BODY=8BITMIME\r\n",
        "RCPT TO:<b@example.org>\r\n",
        "RCPT TO:<c@example.net>\r\n",
        "DATA\r\n",
        "x\r\n.\r\n",
        "\n.\n",
        "RSET\r\n",
        "QUIT\r\n",
        "BDAT 3\r\n",
        "0123456789abcdefghij0123456789\r\n",
    ];
    const MX: &[&str] = &[
        "220 mx ESMTP\r\n",
        "250-mx\r\n250 STARTTLS\r\n",
        "250-mx\r\n250 8BITMIME\r\n",
        "250 ok\r\n",
        "220 go\r\n",
        "354 go\r\n",
        "550 no\r\n",
        "451 later\r\n",
        "502 what\r\n",
    ];
    prop_oneof![
        6 => fragment(CLIENT).prop_map(Op::Client),
        6 => fragment(MX).prop_map(Op::Mx),
        2 => any::<u8>().prop_map(Op::Connected),
        1 => Just(Op::Unavailable),
        1 => Just(Op::TlsOk),
        1 => Just(Op::TlsFailed),
        1 => Just(Op::ClientEof),
        1 => Just(Op::MxEof),
        1 => Just(Op::Timeout),
        1 => Just(Op::Written),
        1 => Just(Op::Shutdown),
    ]
}

proptest::proptest! {
    /// Any chunking of the client's bytes gives the same actions, byte for byte.
    #[test]
    fn any_chunking_gives_the_same_transcript(
        cuts in proptest::collection::vec(0usize..DIALOGUE.len(), 0..12),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        proptest::prop_assert_eq!(run_scripted(DIALOGUE, &cuts), run_scripted(DIALOGUE, &[]));
    }

    /// Whatever both sides send and whenever the driver reports: no panic, nothing after
    /// the close, bytes to the MX only on a connection that is up and not in its
    /// handshake, and to the client only whole, well-formed replies.
    #[test]
    fn arbitrary_inputs_never_break_the_session(ops in proptest::collection::vec(op(), 0..60)) {
        #[derive(PartialEq)]
        enum Link { None, Connecting, Up, Handshake }
        let mut s = Session::new(config());
        let mut link = Link::None;
        let mut to_client = Vec::new();
        let mut closed = false;
        for op in ops {
            match op {
                Op::Client(bytes) => s.on_client_data(&bytes),
                Op::Mx(bytes) => s.on_mx_data(&bytes),
                Op::Connected(pick) => {
                    if link == Link::Connecting {
                        link = Link::Up;
                    }
                    let tls = [TlsRequirement::Required, TlsRequirement::Opportunistic, TlsRequirement::Plaintext];
                    s.on_mx_connected(MxAttempt {
                        host: "mx.example".to_owned(),
                        tls: tls[usize::from(pick) % 3],
                        policy: "opportunistic",
                    });
                }
                Op::Unavailable => {
                    if link == Link::Connecting {
                        link = Link::None;
                    }
                    s.on_mx_unavailable(MX_UNREACHABLE);
                }
                Op::TlsOk => {
                    if link == Link::Handshake {
                        link = Link::Up;
                    }
                    s.on_mx_tls(Ok(()));
                }
                Op::TlsFailed => s.on_mx_tls(Err(MxTlsFailure {
                    result_type: "validation-failure",
                    detail: String::new(),
                })),
                Op::ClientEof => s.on_client_eof(),
                Op::MxEof => s.on_mx_eof(),
                Op::Timeout => s.on_timeout(),
                Op::Written => { s.on_output_written(); }
                Op::Shutdown => { s.close_if_idle(); }
            }
            while let Some(action) = s.next_action() {
                proptest::prop_assert!(!closed, "{action:?} after the close");
                match action {
                    Action::ToClient(bytes) => to_client.extend_from_slice(&bytes),
                    Action::ToMx(_) => proptest::prop_assert!(link == Link::Up),
                    Action::OpenMx { .. } => {
                        proptest::prop_assert!(link == Link::None);
                        link = Link::Connecting;
                    }
                    Action::NextMx { .. } => {
                        proptest::prop_assert!(matches!(link, Link::Up | Link::Handshake));
                        link = Link::Connecting;
                    }
                    Action::StartMxTls => {
                        proptest::prop_assert!(link == Link::Up);
                        link = Link::Handshake;
                    }
                    Action::CloseMx => link = Link::None,
                    Action::Event(event) => { let _ = event.name(); }
                    Action::Close => {
                        closed = true;
                        proptest::prop_assert!(link == Link::None);
                    }
                }
            }
            let _ = (s.phase(), s.wants_client_data(), s.summary());
        }
        assert_replies(&to_client);
    }
}
