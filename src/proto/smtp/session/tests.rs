//! Transcript tests of the SMTP session: inputs fed, actions asserted, no sockets.

use super::*;

use crate::proto::testing::*;

const GREETING: &[u8] = b"220 legacy.example.test ESMTP legacy\r\n";
const EHLO_REPLY: &[u8] = b"250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-starttls\r\n250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-AUTH=PLAIN LOGIN\r\n\
250-XCLIENT NAME ADDR PROTO HELO\r\n250-XFORWARD NAME ADDR\r\n250-PIPECONNECT\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 CHUNKING\r\n";
// "\0alice@example.test\0alice-secret-pw"
const PLAIN_IR: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=";

fn config(policy: Policy) -> Config {
    Config {
        policy,
        bare_newlines: BareNewlines::Normalize,
        limits: limits(512),
        user_hasher: hasher(),
    }
}

#[test]
fn a_half_closed_client_gets_every_command_held_behind_a_barrier_processed() {
    let mut s = greeted(Policy::AuthRequiresTls);
    // HELO is a barrier: what follows is held until its reply.
    let out = client(
        &mut s,
        "HELO c.example\r\nMAIL FROM:<a@example.test>\r\nQUIT\r\n",
    );
    assert_eq!(out.upstream, "HELO c.example\r\n");
    s.on_client_eof();
    let out = upstream(&mut s, "250 legacy.example.test\r\n");
    assert_eq!(out.client, "250 legacy.example.test\r\n");
    // No PIPELINING announced: one command at a time (ARCHITECTURE.md §10).
    assert_eq!(out.upstream, "MAIL FROM:<a@example.test>\r\n");
    assert!(!out.closed);
    let out = upstream(&mut s, "250 2.1.0 Ok\r\n");
    assert_eq!(
        (out.client.as_str(), out.upstream.as_str()),
        ("250 2.1.0 Ok\r\n", "QUIT\r\n")
    );
    assert!(!out.closed);
    let out = upstream(&mut s, "221 2.0.0 Bye\r\n");
    assert_eq!(out.client, "221 2.0.0 Bye\r\n");
    assert!(out.closed);
}

#[test]
fn shutdown_waits_for_the_command_boundary_then_says_421() {
    // Before the greeting the 421 takes its place; nothing goes upstream.
    let mut s = Session::new(config(Policy::RequireTls), false);
    assert!(s.close_if_idle());
    let out = drain(&mut s);
    assert_eq!(
        out.client,
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert_eq!((out.upstream.as_str(), out.closed), ("", true));

    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "MAIL FROM:<a@example.test>\r\n");
    assert!(!s.close_if_idle(), "a reply is owed");
    upstream(&mut s, "250 2.1.0 Ok\r\n");
    client(&mut s, "RCPT TO:<b@example.test>\r\nDATA\r\n");
    upstream(
        &mut s,
        "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
    );
    client(&mut s, "Subject: x\r\n\r\nbody\r\n");
    assert!(!s.close_if_idle(), "mid-DATA");
    client(&mut s, ".\r\nNO");
    upstream(&mut s, "250 2.0.0 Ok: queued\r\n");
    assert!(!s.close_if_idle(), "half a command line is held");
    client(&mut s, "OP\r\n");
    upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert!(s.close_if_idle());
    let out = drain(&mut s);
    assert_eq!(
        out.client,
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert_eq!((out.upstream.as_str(), out.closed), ("QUIT\r\n", true));
}

#[test]
fn the_plaintext_command_budget_closes_a_chatty_client() {
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, &"NOOP\r\n".repeat(20));
    assert_eq!(out.upstream, "NOOP\r\n");
    for _ in 0..20 {
        upstream(&mut s, "250 2.0.0 Ok\r\n");
    }
    let out = client(&mut s, "NOOP\r\n");
    assert_eq!(
        out.client,
        "421 4.7.0 Too many commands before STARTTLS, closing connection\r\n"
    );
    assert!(out.closed);
    assert_eq!(names(&out.events), vec!["limit_exceeded"]);
    // The MX policy lets mail flow in plaintext: no budget there.
    let mut s = greeted(Policy::AuthRequiresTls);
    let out = client(&mut s, &"RSET\r\n".repeat(30));
    assert!(!out.closed);
}

/// A session past the greeting.
fn greeted(policy: Policy) -> Session {
    let mut session = Session::new(config(policy), false);
    session.on_upstream_data(GREETING);
    assert_eq!(
        drain(&mut session).client,
        String::from_utf8_lossy(GREETING)
    );
    session
}

/// A session after STARTTLS, the handshake, and a fresh EHLO.
fn after_tls(policy: Policy) -> Session {
    let mut s = greeted(policy);
    assert_eq!(client(&mut s, "STARTTLS\r\n").upstream, "RSET\r\n");
    let go = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(go.client, "220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(go.starttls, Some(vec![]));
    s.on_tls_established();
    assert_eq!(
        client(&mut s, "EHLO c.example\r\n").upstream,
        "EHLO c.example\r\n"
    );
    upstream(
        &mut s,
        "250-legacy.example.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n",
    );
    s
}

#[test]
fn nothing_from_the_client_is_read_before_the_greeting() {
    let mut s = Session::new(config(Policy::RequireTls), false);
    assert_eq!(client(&mut s, "EHLO early\r\n"), Out::default());
    let out = upstream(&mut s, "220 legacy ESMTP\r\n");
    assert_eq!(out.client, "220 legacy ESMTP\r\n");
    assert_eq!(out.upstream, "EHLO early\r\n");
}

#[test]
fn ehlo_before_tls_gets_the_upstream_list_with_starttls_and_without_auth() {
    let mut s = greeted(Policy::RequireTls);
    assert_eq!(
        client(&mut s, "EHLO c.example\r\n").upstream,
        "EHLO c.example\r\n"
    );
    let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
    assert_eq!(
        out.client,
        "250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
    );
}

#[test]
fn a_client_that_closes_behind_starttls_gets_no_handshake() {
    // Found by the smtp_session fuzz target: the Close queued behind StartTls.
    // STARTTLS waits behind the EHLO, and the client half-closes meanwhile.
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "EHLO c\r\nSTARTTLS\r\n");
    s.on_client_eof();
    let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
    assert_eq!(out.upstream, "RSET\r\n");
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(out.client, "");
    assert_eq!(out.starttls, None);
    assert!(out.closed);
    assert_eq!(s.summary(), "ehlo=1 starttls=0/1");
}

#[test]
fn an_idle_session_gives_its_buffers_back() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "EHLO c.example\r\nNOOP\r\n");
    upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
    upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert!(s.conn.actions.is_empty() && s.slots.is_empty());
    s.release_idle_memory();
    assert_eq!(
        (
            s.conn.client_in.capacity(),
            s.conn.upstream_in.capacity(),
            s.conn.actions.capacity(),
            s.slots.capacity(),
            s.reply_lines.capacity()
        ),
        (0, 0, 0, 0, 0)
    );
    // And the session goes on.
    assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
}

#[test]
fn ehlo_after_tls_gets_auth_back_without_channel_binding_and_no_starttls() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    upstream(&mut s, "250 2.0.0 Ok\r\n");
    s.on_tls_established();
    client(&mut s, "EHLO c.example\r\n");
    let out = upstream(&mut s, std::str::from_utf8(EHLO_REPLY).unwrap());
    assert_eq!(
        out.client,
        "250-legacy.example.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n\
250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n\
250 8BITMIME\r\n"
    );
}

#[test]
fn a_single_line_ehlo_reply_becomes_multi_line() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "EHLO c\r\n");
    assert_eq!(
        upstream(&mut s, "250 legacy\r\n").client,
        "250-legacy\r\n250 STARTTLS\r\n"
    );
}

#[test]
fn a_helo_only_upstream_still_offers_starttls() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "EHLO c.example\r\n");
    let out = upstream(&mut s, "502 5.5.2 Error: command not recognized\r\n");
    assert_eq!(out.upstream, "HELO c.example\r\n");
    assert_eq!(out.client, "");
    let out = upstream(&mut s, "250 legacy.example.test\r\n");
    assert_eq!(out.client, "250-legacy.example.test\r\n250 STARTTLS\r\n");
    assert_eq!(s.summary(), "ehlo=1");
}

#[test]
fn a_helo_only_upstream_answers_ehlo_with_250_after_tls_too() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    upstream(&mut s, "250 2.0.0 Ok\r\n");
    s.on_tls_established();
    let out = client(&mut s, "EHLO c.example\r\n");
    assert_eq!(out.upstream, "EHLO c.example\r\n");
    let out = upstream(&mut s, "500 5.5.1 Unknown command\r\n");
    assert_eq!(out.upstream, "HELO c.example\r\n");
    let out = upstream(&mut s, "250 legacy.example.test Hello\r\n");
    assert_eq!(out.client, "250 legacy.example.test Hello\r\n");
    // The new greeting counts: mail may flow.
    assert_eq!(
        client(&mut s, "MAIL FROM:<a@b>\r\n").upstream,
        "MAIL FROM:<a@b>\r\n"
    );
}

#[test]
fn auth_before_tls_is_refused_locally_in_any_case_and_spacing() {
    for line in [
        format!("AUTH PLAIN {PLAIN_IR}\r\n"),
        format!("auth plain {PLAIN_IR}\r\n"),
        format!("  AuTh\tPlain   {PLAIN_IR}\r\n"),
        format!("AUTH PLAIN {PLAIN_IR}\n"),
        "AUTH LOGIN\r\n".to_owned(),
        "AUTH\r\n".to_owned(),
    ] {
        for policy in [Policy::RequireTls, Policy::AuthRequiresTls] {
            let mut s = greeted(policy);
            let out = client(&mut s, &line);
            assert_eq!(
                out.client, "530 5.7.0 Must issue a STARTTLS command first\r\n",
                "{line:?}"
            );
            assert_eq!(out.upstream, "", "{line:?}");
            assert!(names(&out.events).contains(&"plaintext_command_refused"));
        }
    }
}

#[test]
fn exposed_credentials_are_logged_with_a_hashed_user_and_never_the_secret() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250 legacy\r\n");
    let out = client(&mut s, &format!("AUTH PLAIN {PLAIN_IR}\r\n"));
    let expected_hash = UserHasher::new(b"test key").hash("alice@example.test");
    assert_eq!(
        out.events,
        vec![
            Event::StarttlsStrippingSuspected {
                reason: "auth_after_starttls_offered"
            },
            Event::CredentialsExposed {
                mechanism: "PLAIN".into(),
                user_hash: Some(expected_hash)
            },
            Event::PlaintextCommandRefused { verb: "AUTH" },
        ]
    );
    let debug = format!("{:?}", out.events);
    assert!(!debug.contains("alice") && !debug.contains("secret") && !debug.contains(PLAIN_IR));
}

#[test]
fn require_tls_allows_only_the_upgrade_dialogue() {
    let mut s = greeted(Policy::RequireTls);
    for command in [
        "MAIL FROM:<a@b>",
        "RCPT TO:<a@b>",
        "DATA",
        "VRFY a",
        "HELP",
        "FOO",
    ] {
        let out = client(&mut s, &format!("{command}\r\n"));
        assert_eq!(
            out.client,
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert_eq!(out.upstream, "");
    }
    for command in ["EHLO c", "HELO c", "NOOP", "RSET"] {
        let out = client(&mut s, &format!("{command}\r\n"));
        assert_eq!(out.upstream, format!("{command}\r\n"));
        upstream(&mut s, "250 ok\r\n");
    }
    assert_eq!(
        s.summary(),
        "ehlo=1 helo=1 mail=0/1 rcpt=0/1 data=0/1 rset=1 noop=1 vrfy=0/1 unknown=0/2"
    );
}

#[test]
fn auth_requires_tls_lets_mail_flow_but_keeps_unknown_verbs_local() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    let out = client(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    // A client ignoring its AUTH refusal sends base64 lines: never forwarded.
    let out = client(&mut s, "dXNlcg==\r\n");
    assert_eq!(out.upstream, "");
    let out = upstream(&mut s, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    assert_eq!(
        out.client,
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n500 5.5.2 Error: command not recognized\r\n"
    );
}

#[test]
fn xclient_and_xforward_are_refused_always() {
    for mut s in [
        greeted(Policy::AuthRequiresTls),
        after_tls(Policy::RequireTls),
    ] {
        for line in ["XCLIENT ADDR=192.0.2.1\r\n", "xforward NAME=spoof\r\n"] {
            let out = client(&mut s, line);
            assert_eq!(
                out.client,
                "550 5.7.0 Error: insufficient authorization\r\n"
            );
            assert_eq!(out.upstream, "");
            assert_eq!(names(&out.events), vec!["forbidden_command"]);
        }
    }
}

#[test]
fn starttls_is_answered_locally_after_an_rset_upstream() {
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, "STARTTLS\r\n");
    assert_eq!(out.upstream, "RSET\r\n");
    assert_eq!(out.client, "");
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(out.starttls, Some(vec![]));
    assert!(out.events.is_empty());
}

#[test]
fn bytes_behind_starttls_go_to_the_tls_engine_and_are_never_commands() {
    for payload in [
        "STARTTLS\r\nEHLO x\r\n",
        "STARTTLS\r\nRSET\r\n",
        &format!("STARTTLS\r\nAUTH PLAIN {PLAIN_IR}\r\nMAIL FROM:<attacker@example.org>\r\n"),
    ] {
        let mut s = greeted(Policy::AuthRequiresTls);
        let out = client(&mut s, payload);
        assert_eq!(out.upstream, "RSET\r\n", "{payload:?}");
        assert_eq!(out.client, "");
        let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
        assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(out.upstream, "");
        let injected = &payload.as_bytes()["STARTTLS\r\n".len()..];
        assert_eq!(out.starttls.as_deref(), Some(injected));
        assert_eq!(
            out.events,
            vec![Event::StarttlsInjection {
                bytes: injected.len()
            }]
        );
    }
}

#[test]
fn bytes_sent_while_the_rset_is_outstanding_are_held_for_tls_too() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    assert_eq!(client(&mut s, "EHLO x\r\n"), Out::default());
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(out.starttls.as_deref(), Some(&b"EHLO x\r\n"[..]));
}

#[test]
fn a_client_hello_behind_starttls_is_no_injection() {
    let mut s = greeted(Policy::RequireTls);
    s.on_client_data(b"STARTTLS\r\n\x16\x03\x01\x00\x05hello");
    drain(&mut s);
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert!(out.events.is_empty());
    assert_eq!(
        out.starttls.as_deref(),
        Some(&b"\x16\x03\x01\x00\x05hello"[..])
    );
}

#[test]
fn starttls_waits_for_outstanding_replies_before_its_rset() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    let out = client(&mut s, "MAIL FROM:<a@b>\r\nSTARTTLS\r\n");
    assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
    let out = upstream(&mut s, "250 2.1.0 Ok\r\n");
    assert_eq!(out.client, "250 2.1.0 Ok\r\n");
    assert_eq!(out.upstream, "RSET\r\n");
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(out.client, "220 2.0.0 Ready to start TLS\r\n");
}

#[test]
fn starttls_with_parameters_is_a_syntax_error_and_the_session_goes_on() {
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, "STARTTLS now\r\n");
    assert_eq!(
        out.client,
        "501 5.5.4 Syntax error (no parameters allowed)\r\n"
    );
    assert_eq!(out.upstream, "");
    assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
}

#[test]
fn starttls_after_helo_is_accepted() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "HELO c\r\n");
    assert_eq!(upstream(&mut s, "250 legacy\r\n").client, "250 legacy\r\n");
    client(&mut s, "STARTTLS\r\n");
    assert_eq!(
        upstream(&mut s, "250 Ok\r\n").client,
        "220 2.0.0 Ready to start TLS\r\n"
    );
}

#[test]
fn a_failed_rset_refuses_tls_and_drops_queued_bytes() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\nNOOP\r\n");
    let out = upstream(&mut s, "451 4.3.0 busy\r\n");
    assert_eq!(
        out.client,
        "454 4.7.0 TLS not available due to temporary reason\r\n"
    );
    assert_eq!(out.upstream, "");
    assert_eq!(out.starttls, None);
}

#[test]
fn after_tls_a_new_ehlo_is_required() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    upstream(&mut s, "250 Ok\r\n");
    s.on_tls_established();
    for command in ["MAIL FROM:<a@b>", "AUTH PLAIN", "RCPT TO:<a@b>", "DATA"] {
        let out = client(&mut s, &format!("{command}\r\n"));
        assert_eq!(out.client, "503 5.5.1 Error: send HELO/EHLO first\r\n");
        assert_eq!(out.upstream, "");
    }
    let out = client(&mut s, "STARTTLS\r\n");
    assert_eq!(out.client, "503 5.5.1 TLS already active\r\n");
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250 legacy\r\n");
    assert_eq!(
        client(&mut s, "MAIL FROM:<a@b>\r\n").upstream,
        "MAIL FROM:<a@b>\r\n"
    );
}

#[test]
fn auth_after_tls_is_relayed_with_its_sasl_exchange() {
    let mut s = after_tls(Policy::RequireTls);
    let out = client(&mut s, "AUTH LOGIN\r\nMAIL FROM:<early@b>\r\n");
    assert_eq!(out.upstream, "AUTH LOGIN\r\n");
    let out = upstream(&mut s, "334 VXNlcm5hbWU6\r\n");
    assert_eq!(out.client, "334 VXNlcm5hbWU6\r\n");
    // The line queued behind AUTH is the SASL response, not a command; not being
    // base64, it cancels the exchange (RFC 4954 §4) rather than cross as a line.
    assert_eq!(out.upstream, "*\r\n");
    let out = upstream(&mut s, "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(out.upstream, "");
    assert_eq!(client(&mut s, "cHc=\r\n").upstream, "cHc=\r\n");
    assert_eq!(
        upstream(&mut s, "235 2.7.0 Authentication successful\r\n").client,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(s.summary(), "ehlo=1 starttls=1/1 auth=1/1");
}

#[test]
fn pipelined_replies_come_back_in_order_with_local_ones_in_place() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    let out = client(
        &mut s,
        "MAIL FROM:<a@b>\r\nXCLIENT ADDR=1.2.3.4\r\nRCPT TO:<c@d>\r\nAUTH PLAIN\r\nRCPT TO:<e@f>\r\n",
    );
    assert_eq!(
        out.upstream,
        "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n"
    );
    assert_eq!(out.client, "");
    let out = upstream(&mut s, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    assert_eq!(
        out.client,
        "250 2.1.0 Ok\r\n550 5.7.0 Error: insufficient authorization\r\n250 2.1.5 Ok\r\n\
530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(
        upstream(&mut s, "250 2.1.5 Ok\r\n").client,
        "250 2.1.5 Ok\r\n"
    );
}

#[test]
fn without_upstream_pipelining_commands_go_one_at_a_time() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250 legacy\r\n");
    let out = client(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
    assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "RCPT TO:<c@d>\r\n");
    assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "DATA\r\n");
}

#[test]
fn a_group_with_ehlo_in_the_middle_is_processed_in_order() {
    let mut s = greeted(Policy::AuthRequiresTls);
    let out = client(&mut s, "RSET\r\nEHLO c\r\nNOOP\r\n");
    assert_eq!(out.upstream, "RSET\r\n");
    assert_eq!(upstream(&mut s, "250 Ok\r\n").upstream, "EHLO c\r\n");
    let out = upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    assert_eq!(out.upstream, "NOOP\r\n");
    assert_eq!(
        out.client,
        "250-legacy\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
    );
}

#[test]
fn the_body_waits_for_354_and_ends_only_at_crlf_dot_crlf() {
    let mut s = after_tls(Policy::RequireTls);
    client(&mut s, "MAIL FROM:<a@b>\r\n");
    upstream(&mut s, "250 Ok\r\n");
    client(&mut s, "RCPT TO:<c@d>\r\n");
    upstream(&mut s, "250 Ok\r\n");
    let out = client(&mut s, "DATA\r\nSubject: x\r\n");
    assert_eq!(out.upstream, "DATA\r\n");
    let out = upstream(&mut s, "354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(out.client, "354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(out.upstream, "Subject: x\r\n");
    let out = client(
        &mut s,
        "\r\nSTARTTLS\r\nAUTH x\r\nbare\nMAIL FROM:<evil>\n.\n",
    );
    assert_eq!(
        out.upstream,
        "\r\nSTARTTLS\r\nAUTH x\r\nbare\r\nMAIL FROM:<evil>\r\n..\r\n"
    );
    // With PIPELINING, QUIT may follow the end of data in the same write.
    let out = client(&mut s, "end\r\n.\r\nQUIT\r\n");
    assert_eq!(out.upstream, "end\r\n.\r\nQUIT\r\n");
    assert_eq!(out.events, vec![Event::BareNewlineNormalized { count: 3 }]);
    let out = upstream(&mut s, "250 2.0.0 Ok: queued\r\n");
    assert_eq!(out.client, "250 2.0.0 Ok: queued\r\n");
    let out = upstream(&mut s, "221 2.0.0 Bye\r\n");
    assert_eq!(out.client, "221 2.0.0 Bye\r\n");
    assert!(out.closed);
    assert_eq!(
        s.summary(),
        "ehlo=1 starttls=1/1 mail=1 rcpt=1 data=1 quit=1"
    );
}

#[test]
fn a_refused_data_leaves_the_following_lines_as_commands() {
    let mut s = after_tls(Policy::RequireTls);
    client(&mut s, "DATA\r\nNOOP\r\n");
    let out = upstream(&mut s, "554 5.5.1 Error: no valid recipients\r\n");
    assert_eq!(out.upstream, "NOOP\r\n");
}

#[test]
fn bare_newlines_reject_mode_drops_the_transaction() {
    let mut s = after_tls(Policy::RequireTls);
    s.bare_newlines = BareNewlines::Reject;
    client(&mut s, "DATA\r\n");
    upstream(&mut s, "354 go\r\n");
    let out = client(&mut s, "a\nb\r\n.\r\n");
    assert_eq!(out.upstream, "");
    assert_eq!(out.client, "521 5.5.2 Error: bare CR or LF received\r\n");
    assert!(out.closed);
}

#[test]
fn bdat_is_never_forwarded_and_its_chunk_is_never_commands() {
    for line in ["BDAT 13", "BDAT\t13 LAST", "  bdat 13   last"] {
        let mut s = after_tls(Policy::RequireTls);
        let out = client(
            &mut s,
            &format!("{line}\r\nab\r\n.\r\nQUIT\r\nBDAT 0 LAST\r\n"),
        );
        assert_eq!(out.upstream, "", "{line:?}");
        assert_eq!(
            out.client,
            "502 5.5.1 Error: command not implemented\r\n".repeat(2)
        );
        assert_eq!(names(&out.events), vec!["forbidden_command"; 2]);
    }
}

/// Exim 4.96 answers RSET inside a chunked transaction with 250 and reads on, dot-
/// terminated: a `.` line in the next chunk ended the message there and the rest ran
/// as commands, AUTH before TLS included. The upstream now hears no chunk at all.
#[test]
fn the_exim_rset_inside_bdat_exploit_reaches_the_upstream_as_canonical_lines_only() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO attacker.example\r\n");
    upstream(
        &mut s,
        "250-exim.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n",
    );
    let hidden = "x\r\n.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\nMAIL FROM:<a@b>\r\n\
RCPT TO:<v@exim.example>\r\nDATA\r\nhidden\r\n.\r\n";
    let dialogue = format!(
        "MAIL FROM:<a@attacker.example>\r\nRCPT TO:<v@exim.example>\r\nBDAT 5\r\nhello\r\n\
RSET\r\nBDAT {}\r\n{hidden}QUIT\r\n",
        hidden.len()
    );
    let mut to_upstream = client(&mut s, &dialogue).upstream;
    to_upstream += &upstream(&mut s, "250 OK\r\n250 Accepted\r\n").upstream;
    to_upstream += &upstream(&mut s, "250 Reset OK\r\n").upstream;
    to_upstream += &upstream(&mut s, "221 bye\r\n").upstream;
    assert_eq!(
        to_upstream,
        "MAIL FROM:<a@attacker.example>\r\nRCPT TO:<v@exim.example>\r\nRSET\r\nQUIT\r\n"
    );
}

#[test]
fn before_tls_commands_reach_the_upstream_in_the_proxys_own_words() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "ehlo c.example\r\n");
    upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    let out = client(
        &mut s,
        "mail from: <a@b.example> size=10\r\nrcpt to:c@d.example\r\nnoop AUTH PLAIN x\r\n\
vrfy  bob\r\n",
    );
    assert_eq!(
        out.upstream,
        "MAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<c@d.example>\r\nNOOP\r\nVRFY bob\r\n"
    );
    // What cannot be read whole is answered here, and never forwarded.
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, "EHLO two words\r\nRSET now\r\nEHLO a{5+}\r\n");
    assert_eq!(out.upstream, "");
    assert_eq!(
        out.client,
        "501 5.5.4 Syntax: EHLO/HELO hostname\r\n\
501 5.5.4 Syntax error (no parameters allowed)\r\n\
501 5.5.4 Syntax: EHLO/HELO hostname\r\n"
    );
    assert_eq!(names(&out.events), vec!["plaintext_command_refused"; 3]);
    // After TLS the client's line goes as it came (from column 0).
    let mut s = after_tls(Policy::RequireTls);
    assert_eq!(
        client(&mut s, "mail from: <a@b.example> size=10\r\n").upstream,
        "mail from: <a@b.example> size=10\r\n"
    );
}

#[test]
fn a_nul_dot_line_is_content_for_an_upstream_that_drops_nul() {
    let mut s = greeted(Policy::AuthRequiresTls);
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250 legacy\r\n");
    client(&mut s, "DATA\r\n");
    upstream(&mut s, "354 go\r\n");
    let out = client(
        &mut s,
        "hi\r\n\0.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n.\0\r\nQUIT\r\n.\r\n",
    );
    assert_eq!(
        out.upstream,
        "hi\r\n.\0.\r\nAUTH PLAIN AGFsaWNlAHNlY3JldDE=\r\n\0\r\nQUIT\r\n.\r\n"
    );
    assert_eq!(out.events, vec![Event::SmugglingNeutralized { count: 2 }]);
}

#[test]
fn a_session_that_only_draws_errors_is_closed() {
    let mut s = greeted(Policy::AuthRequiresTls);
    let out = client(&mut s, &"XYZZY\r\n".repeat(20));
    assert_eq!(out.client.matches("500 5.5.2").count(), 20);
    assert!(!out.closed);
    let out = client(&mut s, "XYZZY\r\nNOOP\r\n");
    assert_eq!(
        out.client,
        "500 5.5.2 Error: command not recognized\r\n\
421 4.7.0 Too many errors, closing connection\r\n"
    );
    assert_eq!(out.upstream, "");
    assert!(out.closed);
    assert!(
        out.events
            .contains(&Event::LimitExceeded { limit: "errors" })
    );
}

#[test]
fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
    use crate::proto::MAX_UNWRITTEN_REPLY_BYTES;
    let mut s = greeted(Policy::AuthRequiresTls);
    s.conn.limits.max_errors = u32::MAX;
    // The driver wrote the greeting.
    assert!(!s.on_output_written());
    let flood = "\n".repeat(64 * 1024);
    let out = client(&mut s, &flood);
    let reply_len = "500 5.5.2 Error: bad syntax\r\n".len();
    let replies = out.client.len() / reply_len;
    // Each reply costs its bytes and its action's slot in the queue.
    let batch = MAX_UNWRITTEN_REPLY_BYTES.div_ceil(reply_len + crate::proto::conn::ACTION_COST);
    assert_eq!(out.client.len(), batch * reply_len);
    assert_eq!(s.conn.client_in.len(), flood.len() - replies);
    // The driver wrote it all: the next batch, no larger.
    assert!(s.on_output_written());
    let out = drain(&mut s);
    assert_eq!(out.client.len(), replies * reply_len);
    // Nothing is lost: every line gets its reply once the client reads.
    let mut total = 2 * replies;
    while s.on_output_written() {
        total += drain(&mut s).client.len() / reply_len;
    }
    assert_eq!(total, flood.len());
    assert!(s.conn.client_in.is_empty());
}

#[test]
fn a_chunk_size_beyond_32_bits_closes_the_connection() {
    let mut s = after_tls(Policy::RequireTls);
    let out = client(&mut s, "BDAT 4294967306 LAST\r\n0123456789AUTH PLAIN x\r\n");
    assert_eq!(
        out.client,
        "552 5.3.4 Error: chunk too large, closing connection\r\n"
    );
    assert_eq!(out.upstream, "");
    assert!(out.closed);
}

#[test]
fn a_bdat_refused_for_want_of_ehlo_after_tls_skips_its_chunk() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    upstream(&mut s, "250 Ok\r\n");
    s.on_tls_established();
    let out = client(
        &mut s,
        "BDAT 30 LAST\r\nMAIL FROM:<ceo@bank.example>\r\nNOOP\r\n",
    );
    assert_eq!(out.client, "503 5.5.1 Error: send HELO/EHLO first\r\n");
    assert_eq!(out.upstream, "NOOP\r\n");
}

#[test]
fn commands_reach_the_upstream_at_column_zero() {
    let mut s = greeted(Policy::AuthRequiresTls);
    assert_eq!(client(&mut s, " \tNOOP\r\n").upstream, "NOOP\r\n");
}

#[test]
fn upstream_bytes_after_the_rset_reply_never_cross_into_tls() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    let out = upstream(&mut s, "250 2.0.0 Ok\r\n250 smuggled\r\n");
    assert_eq!(
        out.client,
        "421 4.3.0 Upstream protocol error, closing connection\r\n"
    );
    assert_eq!(out.starttls, None);
    assert!(out.closed);
    // And bytes arriving during the handshake are refused once it completes.
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "STARTTLS\r\n");
    upstream(&mut s, "250 2.0.0 Ok\r\n");
    assert_eq!(upstream(&mut s, "250 late\r\n"), Out::default());
    s.on_tls_established();
    let out = drain(&mut s);
    assert!(out.closed);
    assert!(!out.client.contains("250 late"));
}

#[test]
fn replies_owed_to_the_client_are_bounded() {
    let mut s = greeted(Policy::AuthRequiresTls);
    s.conn.limits.max_errors = 1000;
    client(&mut s, "EHLO c\r\n");
    upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    let out = client(
        &mut s,
        &format!("MAIL FROM:<a@b>\r\n{}", "X\r\n".repeat(200)),
    );
    assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\n");
    assert!(s.slots.len() <= MAX_QUEUED_REPLIES);
    let mut replies = upstream(&mut s, "250 2.1.0 Ok\r\n").client;
    assert!(replies.starts_with("250 2.1.0 Ok\r\n500 5.5.2"));
    // As the driver does once it has written them (the reply bound, `Conn::output_written`).
    while s.on_output_written() {
        replies += &drain(&mut s).client;
    }
    assert_eq!(
        replies
            .matches("500 5.5.2 Error: command not recognized")
            .count(),
        200
    );
}

#[test]
fn refused_bdat_chunks_are_swallowed_not_read_as_commands() {
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, "BDAT 8\r\nNOOP\r\n\r\nRSET\r\n");
    assert_eq!(
        out.client,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(out.upstream, "RSET\r\n");
}

#[test]
fn an_over_long_line_gets_an_error_and_closes() {
    let mut s = greeted(Policy::RequireTls);
    let out = client(&mut s, &"A".repeat(600));
    assert_eq!(out.client, "500 5.5.2 Error: line too long\r\n");
    assert!(out.closed);
    assert_eq!(out.upstream, "");
    assert_eq!(names(&out.events), vec!["limit_exceeded"]);
}

#[test]
fn mangled_starttls_is_suspected_stripping() {
    for verb in ["XXXXXXXX", "STARTTLX", "xxxxxxxx", "STARXTLS"] {
        let mut s = greeted(Policy::RequireTls);
        let out = client(&mut s, &format!("{verb}\r\n"));
        assert_eq!(
            names(&out.events),
            vec!["starttls_stripping_suspected", "plaintext_command_refused"]
        );
    }
}

#[test]
fn control_characters_in_commands_are_refused_locally() {
    let mut s = greeted(Policy::AuthRequiresTls);
    let out = client(&mut s, "NOOP\rAUTH PLAIN x\r\n");
    assert_eq!(out.client, "500 5.5.2 Error: bad syntax\r\n");
    assert_eq!(out.upstream, "");
}

#[test]
fn the_upstream_going_away_gets_the_client_a_421() {
    let mut s = Session::new(config(Policy::RequireTls), false);
    s.on_upstream_eof();
    let out = drain(&mut s);
    assert_eq!(
        out.client,
        "421 4.3.0 Service temporarily unavailable, closing connection\r\n"
    );
    assert!(out.closed);
    let mut s = greeted(Policy::RequireTls);
    let out = upstream(&mut s, "garbage\r\n");
    assert_eq!(
        out.client,
        "421 4.3.0 Upstream protocol error, closing connection\r\n"
    );
    assert!(out.closed);
}

#[test]
fn upstream_lines_ending_in_bare_lf_are_relayed_unchanged() {
    let mut s = greeted(Policy::RequireTls);
    client(&mut s, "NOOP\r\n");
    assert_eq!(upstream(&mut s, "250 2.0.0 Ok\n").client, "250 2.0.0 Ok\n");
}

#[test]
fn implicit_tls_sessions_start_with_tls_active() {
    let mut s = Session::new(config(Policy::RequireTls), false);
    s.on_tls_established();
    // Still nothing is read before the upstream's greeting.
    assert_eq!(client(&mut s, "EHLO early\r\n").upstream, "");
    assert_eq!(
        upstream(&mut s, "220 legacy\r\n").upstream,
        "EHLO early\r\n"
    );
    upstream(&mut s, "250 legacy\r\n");
    client(&mut s, "EHLO c\r\n");
    let out = upstream(&mut s, "250-legacy\r\n250 AUTH PLAIN\r\n");
    assert_eq!(out.client, "250-legacy\r\n250 AUTH PLAIN\r\n");
}

#[test]
fn a_half_closed_client_still_gets_the_replies_it_is_owed() {
    let mut s = after_tls(Policy::RequireTls);
    s.on_client_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    s.on_client_eof();
    let out = drain(&mut s);
    assert_eq!(out.upstream, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
    assert!(!out.closed);
    assert!(!s.wants_client_data());
    let out = upstream(&mut s, "250 Ok\r\n250 Ok\r\n");
    assert!(!out.closed);
    // DATA's 354 starts a body that can never arrive: the upstream is dropped.
    let out = upstream(&mut s, "354 go\r\n");
    assert!(out.closed);
}

#[test]
fn a_client_gone_mid_body_closes_at_once() {
    let mut s = after_tls(Policy::RequireTls);
    client(&mut s, "DATA\r\n");
    upstream(&mut s, "354 go\r\n");
    client(&mut s, "Subject: half\r\n");
    s.on_client_eof();
    let out = drain(&mut s);
    assert!(out.closed);
    assert_eq!(out.upstream, "");
}

/// Runs a whole dialogue with the client's bytes cut at `cuts`. A legacy upstream
/// without PIPELINING answers each line the proxy forwards, as soon as it is whole.
fn run_chunked(client_stream: &[u8], cuts: &[usize]) -> Out {
    let mut s = greeted(Policy::AuthRequiresTls);
    let mut total = Out::default();
    let mut forwarded = String::new();
    let mut answered = 0;
    let mut in_body = false;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&client_stream.len())) {
        s.on_client_data(&client_stream[start..cut]);
        start = cut;
        loop {
            let out = drain(&mut s);
            forwarded.push_str(&out.upstream);
            total.client.push_str(&out.client);
            total.upstream.push_str(&out.upstream);
            total.events.extend(out.events);
            total.starttls = total.starttls.take().or(out.starttls);
            total.closed |= out.closed;
            let Some(end) = forwarded[answered..].find("\r\n") else {
                break;
            };
            let line = forwarded[answered..answered + end].to_owned();
            answered += end + 2;
            let reply = if in_body {
                if line != "." {
                    continue;
                }
                in_body = false;
                "250 2.0.0 Ok: queued\r\n"
            } else if line.starts_with("EHLO") {
                "250-legacy\r\n250 SIZE 1000\r\n"
            } else if line == "DATA" {
                in_body = true;
                "354 go ahead\r\n"
            } else {
                "250 2.0.0 Ok\r\n"
            };
            s.on_upstream_data(reply.as_bytes());
        }
    }
    total
}

proptest::proptest! {
    #[test]
    fn any_chunking_gives_the_same_bytes_and_events(
        cuts in proptest::collection::vec(0usize..170, 0..10),
    ) {
        let stream: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\
Subject: x\r\n\r\nline\nbare\r\n.\nMAIL FROM:<evil@x>\r\n.\r\nAUTH PLAIN eHl6\r\nXCLIENT ADDR=1.2.3.4\r\n\
NOOP\r\nSTARTTLS\r\n";
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
        cuts.sort_unstable();
        let expected = run_chunked(stream, &[]);
        proptest::prop_assert!(expected.upstream.ends_with("NOOP\r\nRSET\r\n"));
        proptest::prop_assert!(expected.upstream.contains("\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n"));
        proptest::prop_assert_eq!(
            names(&expected.events),
            vec![
                "bare_newline_normalized",
                "starttls_stripping_suspected",
                "credentials_exposed",
                "plaintext_command_refused",
                "forbidden_command",
            ]
        );
        proptest::prop_assert_eq!(run_chunked(stream, &cuts), expected);
    }
}

#[test]
fn a_silent_client_gets_a_timeout_goodbye() {
    let mut s = greeted(Policy::RequireTls);
    s.on_timeout();
    let out = drain(&mut s);
    assert_eq!(
        out.client,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    assert!(out.closed);
}

fn xclient_session() -> Session {
    Session::new(config(Policy::RequireTls), false).with_xclient(xclient::Identity {
        client: "203.0.113.7:51234".parse().unwrap(),
        destination: "192.0.2.1:587".parse().unwrap(),
    })
}

/// An XCLIENT session whose upstream has greeted: the proxy's own EHLO is out.
fn greeted_xclient_session() -> Session {
    let mut s = xclient_session();
    s.on_upstream_data(GREETING);
    drain(&mut s);
    s
}

#[test]
fn xclient_is_sent_alone_after_the_proxys_own_ehlo_and_the_new_greeting_is_relayed() {
    let mut s = xclient_session();
    // Client bytes sent early wait: nothing is read before the greeting.
    assert_eq!(client(&mut s, "EHLO client.example\r\n"), Out::default());
    let out = upstream(&mut s, "220 legacy ESMTP\r\n");
    assert_eq!(out.client, "", "the greeting waits for XCLIENT");
    assert_eq!(out.upstream, "EHLO localhost\r\n");
    let out = upstream(
        &mut s,
        "250-legacy\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 8BITMIME\r\n",
    );
    assert_eq!(
        out.upstream,
        "XCLIENT ADDR=203.0.113.7 PORT=51234 NAME=[UNAVAILABLE]\r\n"
    );
    assert_eq!(out.client, "");
    // The new session's greeting is the client's; then its own EHLO goes through.
    let out = upstream(&mut s, "220 legacy ESMTP again\r\n");
    assert_eq!(out.client, "220 legacy ESMTP again\r\n");
    assert_eq!(out.upstream, "EHLO client.example\r\n");
    s.on_upstream_data(EHLO_REPLY);
    let out = drain(&mut s);
    assert!(out.client.ends_with("250 STARTTLS\r\n"), "{}", out.client);
    assert!(!out.client.contains("XCLIENT"));
    assert_eq!(s.summary(), "ehlo=1");
}

const IDENTITY_UNAVAILABLE: &str =
    "421 4.3.0 Service temporarily unavailable, closing connection\r\n";

#[test]
fn without_xclient_in_the_ehlo_reply_the_session_is_refused_not_run_as_the_proxy() {
    let mut s = greeted_xclient_session();
    let out = upstream(&mut s, "250-legacy\r\n250 PIPELINING\r\n");
    assert_eq!(names(&out.events), ["xclient_unavailable"]);
    assert_eq!(out.client, IDENTITY_UNAVAILABLE);
    assert_eq!((out.upstream.as_str(), out.closed), ("", true));
    // A HELO-only upstream refuses the proxy's EHLO: the same.
    let mut s = greeted_xclient_session();
    let out = upstream(&mut s, "502 5.5.2 Error: command not recognized\r\n");
    assert_eq!(
        out.events,
        [Event::XclientUnavailable {
            reason: "not_announced"
        }]
    );
    assert_eq!(
        (out.client.as_str(), out.closed),
        (IDENTITY_UNAVAILABLE, true)
    );
    // An upstream that turns sessions away answers the proxy's EHLO with 421: the
    // client gets that 421, not the stale first greeting.
    let mut s = greeted_xclient_session();
    let out = upstream(&mut s, "421 4.7.0 Too many connections\r\n");
    assert!(out.events.is_empty());
    assert_eq!(
        (out.client.as_str(), out.closed),
        ("421 4.7.0 Too many connections\r\n", true)
    );
}

#[test]
fn a_refused_xclient_refuses_the_session_and_a_421_ends_it() {
    let mut s = greeted_xclient_session();
    upstream(&mut s, "250-legacy\r\n250 XCLIENT ADDR\r\n");
    let out = upstream(&mut s, "550 5.7.0 Error: insufficient authorization\r\n");
    assert_eq!(
        out.events,
        [Event::XclientUnavailable { reason: "refused" }]
    );
    assert_eq!(
        (out.client.as_str(), out.closed),
        (IDENTITY_UNAVAILABLE, true)
    );

    let mut s = greeted_xclient_session();
    upstream(&mut s, "250-legacy\r\n250 XCLIENT ADDR\r\n");
    let out = upstream(&mut s, "421 4.7.0 go away\r\n");
    assert_eq!(out.client, "421 4.7.0 go away\r\n");
    assert!(out.events.is_empty());
}

#[test]
fn an_upstream_banner_refusal_is_relayed_without_xclient() {
    let mut s = xclient_session();
    let out = upstream(&mut s, "554 5.3.2 not now\r\n");
    assert_eq!(out.client, "554 5.3.2 not now\r\n");
    assert_eq!(out.upstream, "");
}
