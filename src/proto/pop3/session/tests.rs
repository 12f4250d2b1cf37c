//! Transcript tests of the POP3 session: inputs fed, actions asserted, no sockets.

use super::*;
use crate::proto::testing::*;
use crate::proto::{Action, Phase};
use proptest::prelude::*;

const GREETING: &str = "+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n";
const CAPA_UPSTREAM: &str = "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256-PLUS\r\nstls\r\n.\r\n";
const CAPA_BEFORE_TLS: &str =
    "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n";
const CAPA_AFTER_TLS: &str = "+OK\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
const AUTH_REFUSED: &str = "-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
const NOT_BEFORE_STLS: &str = "-ERR Command not allowed before STLS\r\n";
const UNAVAILABLE: &str = "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
// "\0alice@example.test\0alice-secret-pw"
const PLAIN_IR: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=";

fn config() -> Config {
    Config {
        limits: limits(512),
        user_hasher: hasher(),
    }
}

/// A session past the greeting.
#[test]
fn shutdown_waits_for_the_reply_then_says_err() {
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    assert!(!s.close_if_idle(), "the CAPA reply is owed");
    upstream(&mut s, "+OK\r\nTOP\r\n");
    assert!(!s.close_if_idle(), "mid multi-line reply");
    upstream(&mut s, ".\r\n");
    assert!(s.close_if_idle());
    let out = drain(&mut s);
    assert_eq!(out.client, "-ERR [SYS/TEMP] Server shutting down\r\n");
    assert_eq!((out.upstream.as_str(), out.closed), ("", true));
}

fn greeted() -> Session {
    let mut session = Session::new(config());
    assert_eq!(upstream(&mut session, GREETING).client, GREETING);
    session
}

#[test]
fn the_plaintext_command_budget_closes_a_chatty_client() {
    let mut s = greeted();
    let out = client(&mut s, &"STAT\r\n".repeat(20));
    assert!(!out.closed);
    let out = client(&mut s, "STAT\r\n");
    assert_eq!(out.client, "-ERR Too many commands before STLS\r\n");
    assert!(out.closed);
    assert_eq!(names(&out.events), vec!["limit_exceeded"]);
}

#[test]
fn upstream_bytes_never_cross_into_tls() {
    let mut s = greeted();
    upstream(&mut s, "+OK half a line");
    let out = client(&mut s, "STLS\r\n");
    assert!(out.client.starts_with("-ERR [SYS/TEMP]"), "{out:?}");
    assert!(out.closed && out.starttls.is_none());
    let mut s = greeted();
    client(&mut s, "STLS\r\n");
    assert_eq!(upstream(&mut s, "+OK late\r\n"), Out::default());
    s.on_tls_established();
    let out = drain(&mut s);
    assert!(out.closed && !out.client.contains("late"));
}

/// A session after STLS and the handshake.
fn after_tls() -> Session {
    let mut s = greeted();
    let out = client(&mut s, "STLS\r\n");
    assert_eq!(out.client, "+OK Begin TLS negotiation\r\n");
    assert_eq!(out.starttls, Some(vec![]));
    s.on_tls_established();
    assert_eq!(drain(&mut s), Out::default());
    s
}

// ---- greeting ----

#[test]
fn nothing_from_the_client_is_read_before_the_greeting() {
    let mut s = Session::new(config());
    assert_eq!(s.phase(), Phase::Greeting);
    assert_eq!(client(&mut s, "CAPA\r\n"), Out::default());
    let out = upstream(&mut s, GREETING);
    // C: CAPA   S: +OK Dovecot ready. <1896...>  (the APOP timestamp stays)
    assert_eq!(out.client, GREETING);
    assert_eq!(out.upstream, "CAPA\r\n");
    assert_eq!(s.phase(), Phase::Command);
}

#[test]
fn an_err_greeting_is_relayed_and_closes() {
    let mut s = Session::new(config());
    let out = upstream(&mut s, "-ERR [SYS/TEMP] too many connections\r\n");
    assert_eq!(out.client, "-ERR [SYS/TEMP] too many connections\r\n");
    assert!(out.closed);
}

#[test]
fn a_greeting_in_pieces_with_a_bare_lf_is_relayed_unchanged() {
    let mut s = Session::new(config());
    assert_eq!(upstream(&mut s, "+OK POP3 ").client, "");
    assert_eq!(upstream(&mut s, "ready\n").client, "+OK POP3 ready\n");
}

#[test]
fn the_upstream_failing_gets_the_client_a_sys_temp_error() {
    // Gone before its greeting.
    let mut s = Session::new(config());
    s.on_upstream_eof();
    let out = drain(&mut s);
    assert_eq!(out.client, UNAVAILABLE);
    assert!(out.closed);
    // Garbage instead of a greeting.
    let mut s = Session::new(config());
    let out = upstream(&mut s, "220 smtp.example ESMTP\r\n");
    assert_eq!(
        out.client,
        "-ERR [SYS/TEMP] Upstream protocol error, closing connection\r\n"
    );
    assert_eq!(
        out.events,
        vec![Event::UpstreamProtocolError {
            detail: "malformed greeting"
        }]
    );
    assert!(out.closed);
    // Gone while a reply is owed.
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    upstream(&mut s, "+OK\r\nTOP\r\n");
    s.on_upstream_eof();
    let out = drain(&mut s);
    assert_eq!(out.client, UNAVAILABLE);
    assert!(out.closed);
    // Garbage instead of a status line.
    let mut s = greeted();
    client(&mut s, "NOOP\r\n");
    let out = upstream(&mut s, "OK fine\r\n");
    assert_eq!(names(&out.events), vec!["upstream_protocol_error"]);
    assert!(out.closed);
    // Gone between commands: nothing is owed, nothing to say.
    let mut s = greeted();
    s.on_upstream_eof();
    let out = drain(&mut s);
    assert_eq!(out.client, "");
    assert!(out.closed);
}

#[test]
fn an_unsolicited_status_line_is_relayed_and_garbage_is_not() {
    let mut s = greeted();
    let out = upstream(&mut s, "-ERR Disconnected for inactivity.\r\n");
    assert_eq!(out.client, "-ERR Disconnected for inactivity.\r\n");
    assert!(!out.closed);
    let out = upstream(&mut s, "+ challenge\r\n");
    assert_eq!(names(&out.events), vec!["upstream_protocol_error"]);
    assert!(out.closed);
}

#[test]
fn an_endless_upstream_line_is_a_protocol_error() {
    let mut s = greeted();
    client(&mut s, "NOOP\r\n");
    let out = upstream(&mut s, &"+OK ".repeat(3000));
    assert_eq!(
        out.events,
        vec![Event::UpstreamProtocolError {
            detail: "line too long"
        }]
    );
    assert!(out.closed);
}

// ---- CAPA ----

#[test]
fn before_tls_the_upstream_hears_only_the_proxys_own_capa_noop_and_quit() {
    let mut s = greeted();
    assert_eq!(client(&mut s, "capa\r\n").upstream, "CAPA\r\n");
    upstream(&mut s, CAPA_UPSTREAM);
    assert_eq!(client(&mut s, " nOoP \r\n").upstream, "NOOP\r\n");
    upstream(&mut s, "+OK\r\n");
    // An argument none of them takes is refused here, whatever follows it.
    for line in ["CAPA x", "NOOP USER alice", "QUIT now", "CAPA {5+}"] {
        let out = client(&mut s, &format!("{line}\r\n"));
        assert_eq!(
            out.client, "-ERR Syntax error, no arguments allowed before STLS\r\n",
            "{line:?}"
        );
        assert_eq!(out.upstream, "", "{line:?}");
        assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
    }
}

#[test]
fn utf8_user_is_hidden_until_tls() {
    let capa = "+OK\r\nTOP\r\nUTF8 USER\r\nUSER\r\n.\r\n";
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, capa).client,
        "+OK\r\nTOP\r\nUTF8\r\nSTLS\r\n.\r\n"
    );
    let mut s = after_tls();
    client(&mut s, "CAPA\r\n");
    assert_eq!(upstream(&mut s, capa).client, capa);
}

#[test]
fn a_session_that_only_draws_errors_is_closed() {
    let mut s = after_tls();
    let out = client(&mut s, &"\r\n".repeat(20));
    assert_eq!(out.client.matches("-ERR Syntax error").count(), 20);
    assert!(!out.closed);
    let out = client(&mut s, "\r\nNOOP\r\n");
    assert_eq!(
        out.client,
        "-ERR Syntax error\r\n-ERR Too many invalid commands, closing connection\r\n"
    );
    assert_eq!(out.upstream, "");
    assert!(out.closed);
    assert_eq!(out.events, vec![Event::LimitExceeded { limit: "errors" }]);
}

#[test]
fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
    assert_flood_waits_for_the_client(&mut after_tls(), reply::BAD_SYNTAX.len());
}

#[test]
fn capa_before_tls_offers_stls_and_hides_user_and_sasl() {
    let mut s = greeted();
    assert_eq!(client(&mut s, "CAPA\r\n").upstream, "CAPA\r\n");
    let out = upstream(&mut s, CAPA_UPSTREAM);
    assert_eq!(out.client, CAPA_BEFORE_TLS);
    assert_eq!(s.summary(), "capa=1");
}

#[test]
fn capa_after_tls_shows_the_upstream_list_without_stls_and_channel_binding() {
    let mut s = after_tls();
    assert_eq!(client(&mut s, "capa\r\n").upstream, "capa\r\n");
    assert_eq!(upstream(&mut s, CAPA_UPSTREAM).client, CAPA_AFTER_TLS);
}

#[test]
fn capa_keeps_order_and_duplicates_and_drops_every_stls_and_xclient() {
    let reply = "+OK Capability list follows\r\nTOP\r\nSTLS\r\nTOP\r\nStLs\r\n\
SASL SCRAM-SHA-1-PLUS SCRAM-SHA-256-PLUS\r\nXCLIENT\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\n.\r\n";
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, reply).client,
        "+OK Capability list follows\r\nTOP\r\nTOP\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\nSTLS\r\n.\r\n"
    );
    let mut s = after_tls();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, reply).client,
        "+OK Capability list follows\r\nTOP\r\nTOP\r\nEXPIRE 60 USER\r\n\
IMPLEMENTATION legacy\r\n.\r\n"
    );
}

#[test]
fn capa_lines_ending_in_bare_lf_are_relayed_unchanged() {
    let mut s = after_tls();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, "+OK\nTOP\nSASL PLAIN SCRAM-SHA-256-PLUS\nUSER\n.\n").client,
        "+OK\nTOP\nSASL PLAIN\nUSER\n.\n"
    );
}

#[test]
fn an_upstream_without_capa_still_gets_stls_offered_before_tls() {
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, "-ERR Unknown command\r\n").client,
        "+OK Capability list follows\r\nSTLS\r\n.\r\n"
    );
    let mut s = after_tls();
    client(&mut s, "CAPA\r\n");
    assert_eq!(
        upstream(&mut s, "-ERR Unknown command\r\n").client,
        "-ERR Unknown command\r\n"
    );
    assert_eq!(s.summary(), "capa=0/1 stls=1/1");
}

// ---- before TLS ----

#[test]
fn credential_commands_before_tls_are_refused_locally_in_any_case_and_spacing() {
    for line in [
        "USER alice\r\n",
        "user alice\r\n",
        "  UsEr\talice  \r\n",
        "USER alice\n",
        "USER\r\n",
        "PASS secret\r\n",
        "pass secret\r\n",
        "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
        "AUTH\r\n",
        "AUTH PLAIN\r\n",
        &format!("auth plain {PLAIN_IR}\r\n"),
    ] {
        let mut s = greeted();
        let out = client(&mut s, line);
        assert_eq!(out.client, AUTH_REFUSED, "{line:?}");
        assert_eq!(out.upstream, "", "{line:?}");
        assert!(names(&out.events).contains(&"plaintext_command_refused"));
    }
}

#[test]
fn everything_but_the_upgrade_dialogue_is_refused_before_tls() {
    let mut s = greeted();
    for line in [
        "STAT",
        "LIST",
        "LIST 1",
        "RETR 1",
        "TOP 1 10",
        "UIDL",
        "DELE 1",
        "RSET",
        "UTF8",
        "LANG",
        "XCLIENT ADDR=192.0.2.1",
        "FOO",
        "XXXXXXXX",
    ] {
        let out = client(&mut s, &format!("{line}\r\n"));
        assert_eq!(out.client, NOT_BEFORE_STLS, "{line:?}");
        assert_eq!(out.upstream, "", "{line:?}");
        assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
    }
    let out = client(&mut s, "RETR 1\r\n");
    assert_eq!(
        out.events,
        vec![Event::PlaintextCommandRefused { verb: "RETR" }]
    );
    // Never the client's own text in an event.
    let out = client(&mut s, "HACKED\r\n");
    assert_eq!(
        out.events,
        vec![Event::PlaintextCommandRefused { verb: "unknown" }]
    );
    for line in ["CAPA", "NOOP", "QUIT"] {
        let out = client(&mut s, &format!("{line}\r\n"));
        assert_eq!(out.upstream, format!("{line}\r\n"));
        assert!(out.events.is_empty());
        upstream(
            &mut s,
            if line == "CAPA" {
                "+OK\r\n.\r\n"
            } else {
                "+OK\r\n"
            },
        );
    }
    assert_eq!(
        s.summary(),
        "capa=1 stat=0/1 list=0/2 uidl=0/1 retr=0/2 top=0/1 dele=0/1 rset=0/1 noop=1 \
lang=0/1 utf8=0/1 quit=1 xclient=0/1 unknown=0/3"
    );
}

#[test]
fn quit_before_tls_is_relayed_and_closes() {
    let mut s = greeted();
    client(&mut s, "QUIT\r\nNOOP\r\n");
    let out = upstream(&mut s, "+OK Logging out.\r\n");
    assert_eq!(out.client, "+OK Logging out.\r\n");
    assert_eq!(out.upstream, "");
    assert!(out.closed);
}

#[test]
fn a_plaintext_pass_is_exposed_with_the_hash_of_the_user_seen_before() {
    let mut s = greeted();
    client(&mut s, "CAPA\r\n");
    upstream(&mut s, CAPA_UPSTREAM);
    let out = client(
        &mut s,
        "USER alice@example.test\r\nPASS alice-secret-pw\r\n",
    );
    assert_eq!(out.client, format!("{AUTH_REFUSED}{AUTH_REFUSED}"));
    assert_eq!(out.upstream, "");
    assert_eq!(
        out.events,
        vec![
            Event::StarttlsStrippingSuspected {
                reason: "auth_after_starttls_offered"
            },
            Event::PlaintextCommandRefused { verb: "USER" },
            Event::StarttlsStrippingSuspected {
                reason: "auth_after_starttls_offered"
            },
            Event::CredentialsExposed {
                mechanism: "PASS".into(),
                user_hash: hash("alice@example.test"),
            },
            Event::PlaintextCommandRefused { verb: "PASS" },
        ]
    );
    let debug = format!("{:?}", out.events);
    assert!(!debug.contains("alice") && !debug.contains("secret"));
    assert_eq!(s.summary(), "capa=1 user=0/1 pass=0/1");
}

#[test]
fn a_pass_without_user_has_no_user_hash_and_no_stripping_without_a_capa() {
    let mut s = greeted();
    let out = client(&mut s, "PASS hunter2\r\n");
    assert_eq!(
        out.events,
        vec![
            Event::CredentialsExposed {
                mechanism: "PASS".into(),
                user_hash: None,
            },
            Event::PlaintextCommandRefused { verb: "PASS" },
        ]
    );
    // No password, nothing exposed.
    let out = client(&mut s, "PASS\r\n");
    assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
}

#[test]
fn apop_and_auth_initial_responses_are_exposed_with_a_hashed_user() {
    let table = [
        (
            "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n".to_owned(),
            Some(("APOP", hash("mrose"))),
        ),
        ("APOP mrose\r\n".to_owned(), None),
        (
            format!("AUTH PLAIN {PLAIN_IR}\r\n"),
            Some(("AUTH PLAIN", hash("alice@example.test"))),
        ),
        (
            "auth login YWxpY2U=\r\n".to_owned(),
            Some(("AUTH LOGIN", hash("alice"))),
        ),
        (
            "AUTH X-SECRET c2VjcmV0\r\n".to_owned(),
            Some(("AUTH X-SECRET", None)),
        ),
        (
            "AUTH pl\u{e9}in c2VjcmV0\r\n".to_owned(),
            Some(("AUTH unknown", None)),
        ),
        ("AUTH PLAIN\r\n".to_owned(), None),
        ("AUTH PLAIN =\r\n".to_owned(), None),
    ];
    for (line, exposed) in table {
        let mut s = greeted();
        let out = client(&mut s, &line);
        let mut expected = Vec::new();
        if let Some((mechanism, user_hash)) = exposed {
            expected.push(Event::CredentialsExposed {
                mechanism: mechanism.into(),
                user_hash,
            });
        }
        let verb = if line.starts_with("APOP") {
            "APOP"
        } else {
            "AUTH"
        };
        expected.push(Event::PlaintextCommandRefused { verb });
        assert_eq!(out.events, expected, "{line:?}");
        assert_eq!(out.upstream, "");
    }
}

#[test]
fn mangled_stls_is_suspected_stripping() {
    for verb in ["XXXX", "xxxx", "STLX", "XTLS", "stlz", "SSLS"] {
        let mut s = greeted();
        let out = client(&mut s, &format!("{verb}\r\n"));
        assert_eq!(out.client, NOT_BEFORE_STLS);
        assert_eq!(
            out.events,
            vec![
                Event::StarttlsStrippingSuspected {
                    reason: "mangled_verb"
                },
                Event::PlaintextCommandRefused { verb: "unknown" },
            ],
            "{verb}"
        );
    }
    for verb in ["XXXXXXXX", "XXX", "SLTS", "FOOO", "STAT", "STLS2"] {
        let mut s = greeted();
        let out = client(&mut s, &format!("{verb}\r\n"));
        assert!(
            !names(&out.events).contains(&"starttls_stripping_suspected"),
            "{verb}"
        );
    }
}

#[test]
fn control_characters_and_empty_lines_are_refused_locally() {
    for mut s in [greeted(), after_tls()] {
        for line in ["NOOP\rUSER x\r\n", "NOOP\0\r\n", "\r\n", "   \r\n"] {
            let out = client(&mut s, line);
            assert_eq!(out.client, "-ERR Syntax error\r\n", "{line:?}");
            assert_eq!(out.upstream, "");
        }
    }
}

#[test]
fn an_over_long_line_gets_an_error_and_closes() {
    let mut s = greeted();
    let out = client(&mut s, &"A".repeat(600));
    assert_eq!(out.client, "-ERR Line too long\r\n");
    assert_eq!(
        out.events,
        vec![Event::LimitExceeded {
            limit: "line_length"
        }]
    );
    assert_eq!(out.upstream, "");
    assert!(out.closed);
    assert!(!s.wants_client_data());
}

// ---- STLS ----

#[test]
fn stls_is_answered_locally_and_never_forwarded() {
    let mut s = greeted();
    let out = client(&mut s, "STLS\r\n");
    assert_eq!(
        out,
        Out {
            client: "+OK Begin TLS negotiation\r\n".into(),
            starttls: Some(vec![]),
            ..Out::default()
        }
    );
    assert_eq!(s.phase(), Phase::Handshake);
    assert!(!s.wants_client_data());
    s.on_tls_established();
    assert_eq!(s.phase(), Phase::Command);
    assert!(s.wants_client_data());
    assert_eq!(s.summary(), "stls=1/1");
}

#[test]
fn bytes_behind_stls_go_to_the_tls_engine_and_are_never_commands() {
    for payload in ["STLS\r\nCAPA\r\n", "STLS\r\nUSER attacker\r\nPASS pw\r\n"] {
        let mut s = greeted();
        let out = client(&mut s, payload);
        let injected = &payload.as_bytes()["STLS\r\n".len()..];
        assert_eq!(
            out,
            Out {
                client: "+OK Begin TLS negotiation\r\n".into(),
                events: vec![Event::StarttlsInjection {
                    bytes: injected.len()
                }],
                starttls: Some(injected.to_vec()),
                ..Out::default()
            },
            "{payload:?}"
        );
        // Bytes arriving during the handshake belong to the TLS engine too.
        assert_eq!(client(&mut s, "NOOP\r\n"), Out::default());
    }
}

#[test]
fn a_client_hello_behind_stls_is_no_injection() {
    let mut s = greeted();
    s.on_client_data(b"STLS\r\n\x16\x03\x01\x00\x05hello");
    let out = drain(&mut s);
    assert!(out.events.is_empty());
    assert_eq!(
        out.starttls.as_deref(),
        Some(&b"\x16\x03\x01\x00\x05hello"[..])
    );
}

#[test]
fn stls_waits_for_the_reply_owed_before_it() {
    let mut s = greeted();
    let out = client(&mut s, "CAPA\r\nSTLS\r\nUSER x\r\n");
    assert_eq!(out.upstream, "CAPA\r\n");
    assert_eq!(out.client, "");
    assert_eq!(out.starttls, None);
    let out = upstream(&mut s, "+OK\r\nTOP\r\n");
    assert_eq!(out.client, "+OK\r\nTOP\r\n");
    assert_eq!(out.starttls, None);
    let out = upstream(&mut s, ".\r\n");
    assert_eq!(out.client, "STLS\r\n.\r\n+OK Begin TLS negotiation\r\n");
    assert_eq!(out.starttls.as_deref(), Some(&b"USER x\r\n"[..]));
    assert_eq!(out.upstream, "");
}

#[test]
fn stls_with_arguments_is_an_error_and_the_session_goes_on() {
    let mut s = greeted();
    let out = client(&mut s, "STLS now\r\n");
    assert_eq!(out.client, "-ERR Syntax error, STLS takes no arguments\r\n");
    assert_eq!(out.starttls, None);
    assert_eq!(out.upstream, "");
    assert_eq!(client(&mut s, "CAPA\r\n").upstream, "CAPA\r\n");
    upstream(&mut s, "+OK\r\n.\r\n");
    assert_eq!(s.summary(), "capa=1 stls=0/1");
}

#[test]
fn stls_after_tls_is_refused() {
    let mut s = after_tls();
    for line in ["STLS\r\n", "stls now\r\n"] {
        let out = client(&mut s, line);
        assert_eq!(out.client, "-ERR TLS already active\r\n");
        assert_eq!(out.upstream, "");
        assert_eq!(out.starttls, None);
    }
}

#[test]
fn implicit_tls_sessions_start_with_tls_active_and_still_wait_for_the_greeting() {
    let mut s = Session::new(config());
    s.on_tls_established();
    assert_eq!(s.phase(), Phase::Greeting);
    assert_eq!(client(&mut s, "CAPA\r\n"), Out::default());
    let out = upstream(&mut s, GREETING);
    assert_eq!(out.client, GREETING);
    assert_eq!(out.upstream, "CAPA\r\n");
    assert_eq!(upstream(&mut s, CAPA_UPSTREAM).client, CAPA_AFTER_TLS);
    assert_eq!(
        client(&mut s, "STLS\r\n").client,
        "-ERR TLS already active\r\n"
    );
    assert_eq!(client(&mut s, "USER alice\r\n").upstream, "USER alice\r\n");
}

// ---- after TLS ----

#[test]
fn commands_after_tls_are_forwarded_one_at_a_time_in_canonical_form() {
    let mut s = after_tls();
    let out = client(&mut s, "  user\talice  \r\nPASS  two  words \nSTAT\r\n");
    assert_eq!(out.upstream, "user alice\r\n");
    let out = upstream(&mut s, "+OK\r\n");
    assert_eq!(out.client, "+OK\r\n");
    // The password goes verbatim: spaces may be part of it (RFC 1939 §7).
    assert_eq!(out.upstream, "PASS  two  words \r\n");
    let out = upstream(&mut s, "-ERR [AUTH] Authentication failed.\r\n");
    assert_eq!(out.client, "-ERR [AUTH] Authentication failed.\r\n");
    assert_eq!(out.upstream, "STAT\r\n");
    assert_eq!(s.summary(), "stls=1/1 user=1 pass=0/1");
}

#[test]
fn a_retr_body_is_relayed_unchanged_and_the_next_reply_still_matched() {
    let mut s = after_tls();
    let out = client(&mut s, "RETR 1\r\nNOOP\r\n");
    assert_eq!(out.upstream, "RETR 1\r\n");
    let body = "+OK 97 octets\r\nSubject: tricks\r\n\r\n..\r\n+OK\r\n-ERR\r\n\
...\r\n..STLS\r\n.. \r\n.\rnot the end\r\n+ \r\n";
    let out = upstream(&mut s, body);
    assert_eq!(out.client, body);
    assert_eq!(out.upstream, "");
    let out = upstream(&mut s, ".\r\n");
    assert_eq!(out.client, ".\r\n");
    assert_eq!(out.upstream, "NOOP\r\n");
    let out = upstream(&mut s, "+OK\r\n");
    assert_eq!(out.client, "+OK\r\n");
    assert_eq!(s.summary(), "stls=1/1 retr=1 noop=1");
}

#[test]
fn the_end_of_a_body_is_found_across_any_split() {
    let mut s = after_tls();
    client(&mut s, "TOP 1 0\r\nNOOP\r\n");
    let mut relayed = String::new();
    for piece in ["+OK\r\nHead", "er: x\r", "\n", ".", "\r", "\n"] {
        let out = upstream(&mut s, piece);
        relayed.push_str(&out.client);
        if piece == "\n" && relayed.ends_with(".\r\n") {
            assert_eq!(out.upstream, "NOOP\r\n");
        } else {
            assert_eq!(out.upstream, "", "{piece:?}");
        }
    }
    assert_eq!(relayed, "+OK\r\nHeader: x\r\n.\r\n");
}

#[test]
fn bodies_ending_in_bare_lf_are_relayed_unchanged() {
    let mut s = after_tls();
    client(&mut s, "UIDL\r\nNOOP\r\n");
    let out = upstream(&mut s, "+OK\n1 whqtswO00WBw418f9t5JxYwZ\n.\n");
    assert_eq!(out.client, "+OK\n1 whqtswO00WBw418f9t5JxYwZ\n.\n");
    assert_eq!(out.upstream, "NOOP\r\n");
}

#[test]
fn list_and_uidl_are_multi_line_only_without_an_argument() {
    let mut s = after_tls();
    for (command, reply) in [
        ("LIST 1", "+OK 1 120\r\n"),
        ("UIDL 1", "+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n"),
        ("LIST", "+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
        ("UIDL", "+OK\r\n1 a\r\n2 b\r\n.\r\n"),
        ("LIST 9", "-ERR no such message\r\n"),
        ("RETR 9", "-ERR no such message\r\n"),
        ("TOP 1 0", "+OK\r\nSubject: x\r\n\r\n.\r\n"),
        ("STAT", "+OK 2 320\r\n"),
        ("DELE 1", "+OK deleted\r\n"),
        (
            "LANG",
            "+OK Language listing follows\r\nen English\r\n.\r\n",
        ),
    ] {
        assert_eq!(
            client(&mut s, &format!("{command}\r\n")).upstream,
            format!("{command}\r\n")
        );
        let out = upstream(&mut s, reply);
        assert_eq!(out.client, reply, "{command}");
        // The reply is complete: the next command goes out at once.
        assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n", "{command}");
        upstream(&mut s, "+OK\r\n");
    }
}

#[test]
fn a_long_body_line_is_streamed_as_it_arrives() {
    let mut s = after_tls();
    client(&mut s, "RETR 1\r\n");
    upstream(&mut s, "+OK\r\n");
    let chunk = "x".repeat(16 * 1024);
    for _ in 0..64 {
        // 1 MiB in one line: each piece goes to the client as it comes.
        assert_eq!(upstream(&mut s, &chunk).client.len(), chunk.len());
    }
    assert_eq!(upstream(&mut s, "\r\n.\r\n").client, "\r\n.\r\n");
    assert!(s.conn.upstream_in.is_empty());
    assert_eq!(client(&mut s, "QUIT\r\n").upstream, "QUIT\r\n");
}

#[test]
fn a_successful_login_relays_the_ok_then_the_held_bytes_then_goes_blind() {
    let mut s = after_tls();
    client(&mut s, "USER alice\r\n");
    upstream(&mut s, "+OK\r\n");
    let out = client(&mut s, "PASS secret\r\nSTAT\r\nLIST\r\nRET");
    assert_eq!(out.upstream, "PASS secret\r\n");
    s.on_upstream_data(b"+OK Logged in.\r\n");
    let mut actions = Vec::new();
    while let Some(action) = s.next_action() {
        actions.push(action);
    }
    assert_eq!(
        actions,
        vec![
            Action::ToClient(Bytes::from_static(b"+OK Logged in.\r\n")),
            Action::ToUpstream(Bytes::from_static(b"STAT\r\nLIST\r\nRET")),
            Action::Relay,
        ]
    );
    assert!(!s.wants_client_data());
    // The driver copies from now on; the session takes no part.
    assert_eq!(client(&mut s, "DELE 1\r\n"), Out::default());
    assert_eq!(upstream(&mut s, "+OK 2 320\r\n"), Out::default());
    s.on_client_eof();
    s.on_timeout();
    assert_eq!(drain(&mut s), Out::default());
    assert_eq!(s.summary(), "stls=1/1 user=1 pass=1/1");
}

#[test]
fn a_login_without_held_bytes_goes_blind_at_once_and_apop_works_too() {
    let mut s = after_tls();
    client(&mut s, "APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n");
    s.on_upstream_data(b"+OK mrose's maildrop has 2 messages (320 octets)\r\n+OK 2 320\r\n");
    let mut actions = Vec::new();
    while let Some(action) = s.next_action() {
        actions.push(action);
    }
    // Bytes behind the +OK are the client's, and handed out before the switch.
    assert_eq!(
        actions,
        vec![
            Action::ToClient(Bytes::from_static(
                b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"
            )),
            Action::ToClient(Bytes::from_static(b"+OK 2 320\r\n")),
            Action::Relay,
        ]
    );
    assert_eq!(s.summary(), "stls=1/1 apop=1/1");
}

#[test]
fn auth_plain_after_tls_relays_its_exchange_then_goes_blind() {
    let mut s = after_tls();
    let out = client(&mut s, &format!("AUTH PLAIN\r\n{PLAIN_IR}\r\nSTAT\r\n"));
    assert_eq!(out.upstream, "AUTH PLAIN\r\n");
    let out = upstream(&mut s, "+ \r\n");
    assert_eq!(out.client, "+ \r\n");
    // The line queued behind AUTH is the SASL response, not a command.
    assert_eq!(out.upstream, format!("{PLAIN_IR}\r\n"));
    let out = upstream(&mut s, "+OK Logged in.\r\n");
    assert_eq!(out.client, "+OK Logged in.\r\n");
    assert_eq!(out.upstream, "STAT\r\n");
    assert!(out.relay);
    assert!(out.events.is_empty());
    assert_eq!(s.summary(), "stls=1/1 auth=1/1");
}

#[test]
fn auth_with_an_initial_response_after_tls() {
    let mut s = after_tls();
    let out = client(&mut s, &format!("AUTH PLAIN {PLAIN_IR}\r\n"));
    assert_eq!(out.upstream, format!("AUTH PLAIN {PLAIN_IR}\r\n"));
    let out = upstream(&mut s, "+OK Logged in.\r\n");
    assert!(out.relay);
}

#[test]
fn a_sasl_response_is_never_read_as_a_command_and_star_cancels() {
    let mut s = after_tls();
    client(&mut s, "AUTH LOGIN\r\n");
    assert_eq!(
        upstream(&mut s, "+ VXNlcm5hbWU6\r\n").client,
        "+ VXNlcm5hbWU6\r\n"
    );
    // Even a line that reads like STLS is SASL data here.
    let out = client(&mut s, "STLS\r\n");
    assert_eq!(out.upstream, "STLS\r\n");
    assert_eq!(out.client, "");
    assert_eq!(upstream(&mut s, "+ UGFzc3dvcmQ6\r\n").upstream, "");
    assert_eq!(client(&mut s, "*\r\n").upstream, "*\r\n");
    let out = upstream(&mut s, "-ERR [AUTH] Authentication aborted\r\n");
    assert_eq!(out.client, "-ERR [AUTH] Authentication aborted\r\n");
    assert!(!out.relay);
    // Commands again.
    assert_eq!(
        client(&mut s, "STLS\r\n").client,
        "-ERR TLS already active\r\n"
    );
    assert_eq!(s.summary(), "stls=1/2 auth=0/1");
}

#[test]
fn auth_without_arguments_lists_mechanisms_without_channel_binding() {
    let mut s = after_tls();
    client(&mut s, "AUTH\r\n");
    let out = upstream(
        &mut s,
        "+OK\r\nPLAIN\r\nSCRAM-SHA-256-PLUS\r\nLOGIN\r\n.\r\n",
    );
    assert_eq!(out.client, "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
    assert!(!out.relay);
    assert_eq!(client(&mut s, "NOOP\r\n").upstream, "NOOP\r\n");
}

#[test]
fn a_continuation_outside_auth_is_an_upstream_protocol_error() {
    let mut s = after_tls();
    client(&mut s, "USER alice\r\n");
    let out = upstream(&mut s, "+ \r\n");
    assert_eq!(
        out.events,
        vec![Event::UpstreamProtocolError {
            detail: "continuation outside AUTH"
        }]
    );
    assert!(out.closed);
}

#[test]
fn xclient_after_tls_is_forbidden() {
    let mut s = after_tls();
    let out = client(&mut s, "XCLIENT ADDR=192.0.2.1 PORT=110\r\n");
    assert_eq!(out.client, "-ERR Command not allowed\r\n");
    assert_eq!(out.upstream, "");
    assert_eq!(
        out.events,
        vec![Event::ForbiddenCommand { verb: "XCLIENT" }]
    );
}

// ---- limits, deadlines, ends ----

#[test]
fn held_bytes_are_bounded() {
    let mut s = Session::new(Config {
        limits: Limits {
            max_held_bytes: 1024,
            max_plaintext_commands: 1000,
            max_errors: 1000,
            ..limits(512)
        },
        ..config()
    });
    assert!(s.wants_client_data());
    client(&mut s, &"NOOP\r\n".repeat(200));
    assert!(!s.wants_client_data());
    upstream(&mut s, GREETING);
    // One NOOP is out, the rest wait for its reply.
    assert!(!s.wants_client_data());
    for _ in 0..200 {
        upstream(&mut s, "+OK\r\n");
    }
    assert!(s.wants_client_data());
    assert_eq!(s.summary(), "noop=200");
}

#[test]
fn timeouts_say_goodbye() {
    let mut s = greeted();
    s.on_timeout();
    let out = drain(&mut s);
    assert_eq!(out.client, "-ERR Disconnected for inactivity\r\n");
    assert!(out.closed);
    // A silent upstream before its greeting or mid-reply: a temporary failure.
    let mut s = Session::new(config());
    s.on_timeout();
    assert_eq!(drain(&mut s).client, UNAVAILABLE);
    let mut s = greeted();
    client(&mut s, "NOOP\r\n");
    s.on_timeout();
    assert_eq!(drain(&mut s).client, UNAVAILABLE);
}

#[test]
fn client_eof_closes() {
    let mut s = greeted();
    client(&mut s, "NOOP\r\n");
    s.on_client_eof();
    let out = drain(&mut s);
    assert!(out.closed);
    assert_eq!(upstream(&mut s, "+OK\r\n"), Out::default());
}

// ---- chunking and hostile input ----

#[derive(Debug, Clone, Copy)]
enum Step {
    Client(&'static str),
    Upstream(&'static str),
    TlsUp,
}

/// A whole dialogue: refusals, STLS, CAPA both ways, bodies with tricks, a cancelled
/// AUTH, a login with pipelined commands behind it.
const DIALOGUE: &[Step] = &[
    Step::Client("CAPA\r\n"),
    Step::Upstream(GREETING),
    Step::Upstream(CAPA_UPSTREAM),
    Step::Client("USER alice\r\nXXXX\r\nPASS secret\r\nNOOP\r\n"),
    Step::Upstream("+OK\r\n"),
    Step::Client("STLS\r\n"),
    Step::TlsUp,
    Step::Client("CAPA\r\nLIST\r\n"),
    Step::Upstream(CAPA_UPSTREAM),
    Step::Upstream("+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
    Step::Client("RETR 1\r\nAUTH PLAIN\r\n"),
    Step::Upstream("+OK\r\n..\r\n+OK\r\n-ERR x\r\n.\rx\n...\r\nlast\r\n.\r\n"),
    Step::Upstream("+ \r\n"),
    Step::Client("*\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n"),
    Step::Upstream("-ERR [AUTH] Authentication aborted\r\n"),
    Step::Upstream("+OK\r\n"),
    Step::Upstream("+OK Logged in.\r\n"),
];

/// Feeds the dialogue, each step cut at `cuts` (fractions of its length), and
/// returns everything the session did, concatenated.
fn run_dialogue(cuts: &[f64]) -> Out {
    let mut s = Session::new(config());
    let mut total = Out::default();
    let mut cuts = cuts.iter().cycle();
    for step in DIALOGUE {
        let (bytes, to_client) = match *step {
            Step::Client(b) => (b.as_bytes(), true),
            Step::Upstream(b) => (b.as_bytes(), false),
            Step::TlsUp => {
                s.on_tls_established();
                continue;
            }
        };
        let mut points: Vec<usize> = (0..3)
            .map(|_| (cuts.next().copied().unwrap_or(0.0) * bytes.len() as f64) as usize)
            .collect();
        points.sort_unstable();
        let mut start = 0;
        for end in points.into_iter().chain(std::iter::once(bytes.len())) {
            let end = end.clamp(start, bytes.len());
            if to_client {
                s.on_client_data(&bytes[start..end]);
            } else {
                s.on_upstream_data(&bytes[start..end]);
            }
            start = end;
            let out = drain(&mut s);
            total.client.push_str(&out.client);
            total.upstream.push_str(&out.upstream);
            total.events.extend(out.events);
            if let Some(early) = out.starttls {
                total.starttls.get_or_insert_with(Vec::new).extend(early);
            }
            total.relay |= out.relay;
            total.closed |= out.closed;
        }
    }
    total
}

#[test]
fn the_dialogue_gives_the_expected_transcript() {
    let out = run_dialogue(&[1.0]);
    assert_eq!(
        out.client,
        format!(
            "{GREETING}{CAPA_BEFORE_TLS}{AUTH_REFUSED}{NOT_BEFORE_STLS}{AUTH_REFUSED}+OK\r\n\
+OK Begin TLS negotiation\r\n{CAPA_AFTER_TLS}+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n\
+OK\r\n..\r\n+OK\r\n-ERR x\r\n.\rx\n...\r\nlast\r\n.\r\n+ \r\n\
-ERR [AUTH] Authentication aborted\r\n+OK\r\n+OK Logged in.\r\n"
        )
    );
    assert_eq!(
        out.upstream,
        "CAPA\r\nNOOP\r\nCAPA\r\nLIST\r\nRETR 1\r\nAUTH PLAIN\r\n*\r\nUSER alice\r\n\
PASS secret\r\nSTAT\r\n"
    );
    assert_eq!(
        names(&out.events),
        vec![
            "starttls_stripping_suspected",
            "plaintext_command_refused",
            "starttls_stripping_suspected",
            "plaintext_command_refused",
            "starttls_stripping_suspected",
            "credentials_exposed",
            "plaintext_command_refused",
        ]
    );
    assert_eq!(out.starttls, Some(vec![]));
    assert!(out.relay);
    assert!(!out.closed);
}

/// What hostile streams are made of.
const TOKENS: &[&[u8]] = &[
    b"STLS",
    b"USER a",
    b"PASS p",
    b"CAPA",
    b"NOOP",
    b"QUIT",
    b"AUTH PLAIN",
    b"RETR 1",
    b"LIST",
    b"+OK",
    b"-ERR",
    b"+ ",
    b".",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\x16\x03",
    b"\0",
    b"STLS\r\nUSER x\r\n",
];

proptest! {
    /// Any chunking of the same client and upstream streams gives the same bytes
    /// both ways and the same events.
    #[test]
    fn chunking_does_not_change_the_outcome(
        cuts in proptest::collection::vec(0.0f64..=1.0, 1..64),
    ) {
        prop_assert_eq!(run_dialogue(&cuts), run_dialogue(&[1.0]));
    }

    /// Hostile bytes from either side never panic, and before TLS nothing but the
    /// upgrade dialogue ever reaches the upstream.
    #[test]
    fn hostile_input_never_panics_or_leaks_commands_before_tls(
        inputs in proptest::collection::vec(
            (0u8..4, proptest::collection::vec(proptest::sample::select(TOKENS), 0..12)),
            0..40,
        ),
    ) {
        let mut s = Session::new(Config { limits: Limits { max_line_len: 64, max_held_bytes: 128, ..limits(512) }, ..config() });
        let mut tls = false;
        let mut handshake = false;
        for (side, tokens) in inputs {
            let bytes = tokens.concat();
            match side {
                0 | 1 => s.on_client_data(&bytes),
                2 => s.on_upstream_data(&bytes),
                _ if handshake => {
                    s.on_tls_established();
                    tls = true;
                    handshake = false;
                }
                _ => s.on_timeout(),
            }
            let _ = s.phase();
            let _ = s.wants_client_data();
            while let Some(action) = s.next_action() {
                match action {
                    Action::ToUpstream(bytes) if !tls => {
                        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                            let upper = line.to_ascii_uppercase();
                            prop_assert!(
                                ["CAPA", "NOOP", "QUIT"].iter().any(|k| upper.starts_with(k.as_bytes())),
                                "{:?} forwarded before TLS", String::from_utf8_lossy(line)
                            );
                        }
                    }
                    Action::StartTls { .. } => handshake = true,
                    _ => {}
                }
            }
        }
        let _ = s.summary();
    }
}
