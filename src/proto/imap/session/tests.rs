//! Transcript tests of the IMAP session: inputs fed, actions asserted, no sockets.

use super::*;

use crate::proto::testing::*;
use proptest::prelude::*;

const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ \
AUTH=PLAIN AUTH=LOGIN AUTH=SCRAM-SHA-256-PLUS starttls] Dovecot (Debian) ready.\r\n";
const GREETING_BEFORE_TLS: &str = "* OK [CAPABILITY IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE \
LITERAL+ STARTTLS LOGINDISABLED] Dovecot (Debian) ready.\r\n";
const PRIVACY: &str =
    " NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";

fn config() -> Config {
    Config {
        max_literal_len: 1000,
        limits: limits(1024),
        user_hasher: hasher(),
    }
}

#[test]
fn the_plaintext_command_budget_closes_a_chatty_client() {
    let mut s = greeted();
    let out = client(&mut s, &"a ID NIL\r\n".repeat(20));
    assert!(!out.closed);
    let out = client(&mut s, "b ID NIL\r\n");
    assert_eq!(out.client, "* BYE Too many commands before STARTTLS\r\n");
    assert!(out.closed);
}

#[test]
fn shutdown_waits_for_the_tagged_response_then_says_bye() {
    let mut s = greeted();
    client(&mut s, "a1 NOOP\r\n");
    assert!(!s.close_if_idle(), "a1 is in flight");
    upstream(&mut s, "a1 OK NOOP completed\r\n");
    client(&mut s, "a2 NO");
    assert!(!s.close_if_idle(), "half a command line is held");
    client(&mut s, "OP\r\n");
    upstream(&mut s, "a2 OK NOOP completed\r\n");
    assert!(s.close_if_idle());
    let out = drain(&mut s);
    assert_eq!(out.client, "* BYE [UNAVAILABLE] Server shutting down\r\n");
    assert_eq!((out.upstream.as_str(), out.closed), ("", true));
}

fn greeted() -> Session {
    let mut s = Session::new(config());
    assert_eq!(upstream(&mut s, GREETING).client, GREETING_BEFORE_TLS);
    s
}

fn after_tls() -> Session {
    let mut s = greeted();
    let out = client(&mut s, "t STARTTLS\r\n");
    assert_eq!(out.client, "t OK Begin TLS negotiation now\r\n");
    assert_eq!(out.starttls, Some(vec![]));
    assert_eq!(out.upstream, "");
    s.on_tls_established();
    s
}

#[test]
fn nothing_is_read_before_the_greeting_and_its_capabilities_are_rewritten() {
    let mut s = Session::new(config());
    assert_eq!(client(&mut s, "a CAPABILITY\r\n"), Out::default());
    let out = upstream(&mut s, GREETING);
    assert_eq!(out.client, GREETING_BEFORE_TLS);
    assert_eq!(out.upstream, "a CAPABILITY\r\n");
}

#[test]
fn capability_before_and_after_tls() {
    let mut s = greeted();
    assert_eq!(
        client(&mut s, "a CAPABILITY\r\n").upstream,
        "a CAPABILITY\r\n"
    );
    let out = upstream(
        &mut s,
        "* CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=PLAIN LITERAL+ LITERAL+\r\na OK Pre-login capabilities listed, post-login capabilities have more.\r\n",
    );
    assert_eq!(
        out.client,
        "* CAPABILITY IMAP4rev1 LITERAL+ LITERAL+ STARTTLS LOGINDISABLED\r\n\
a OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
    );
    let mut s = after_tls();
    client(&mut s, "b CAPABILITY\r\n");
    let out = upstream(
        &mut s,
        "* CAPABILITY IMAP4rev1 SASL-IR LOGINDISABLED starttls AUTH=PLAIN AUTH=SCRAM-SHA-1-PLUS ID\r\nb OK done\r\n",
    );
    assert_eq!(
        out.client,
        "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID\r\nb OK done\r\n"
    );
}

#[test]
fn login_before_tls_is_refused_and_never_forwarded() {
    for (line, exposed) in [
        ("a LOGIN alice secret\r\n", true),
        ("a login \"alice\" \"secret\"\r\n", true),
        ("a LOGIN alice\r\n", false),
        ("a AUTHENTICATE PLAIN\r\n", false),
        ("a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", true),
    ] {
        let mut s = greeted();
        let out = client(&mut s, line);
        assert_eq!(out.client, format!("a{PRIVACY}"), "{line:?}");
        assert_eq!(out.upstream, "");
        let events = names(&out.events);
        assert!(events.contains(&"plaintext_command_refused"));
        assert!(events.contains(&"starttls_stripping_suspected"));
        assert_eq!(events.contains(&"credentials_exposed"), exposed, "{line:?}");
        assert!(!format!("{:?}", out.events).contains("secret"));
    }
}

#[test]
fn a_synchronising_literal_password_is_refused_before_the_continuation() {
    let mut s = greeted();
    let out = client(&mut s, "a LOGIN alice {6}\r\n");
    assert_eq!(out.client, format!("a{PRIVACY}"));
    assert!(!out.client.contains('+'));
    assert!(!names(&out.events).contains(&"credentials_exposed"));
    // A client that sends the octets anyway: they are read as (refused) commands,
    // nothing reaches the upstream.
    let out = client(&mut s, "secret\r\n");
    assert_eq!(out.client, "* BAD Invalid tag or command line\r\n");
    assert_eq!(out.upstream, "");
}

#[test]
fn a_non_synchronising_literal_is_swallowed_then_refused_and_the_next_command_works() {
    let mut s = greeted();
    let out = client(
        &mut s,
        "a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb CAPABILITY\r\n",
    );
    assert_eq!(out.client, format!("a{PRIVACY}"));
    assert_eq!(out.upstream, "b CAPABILITY\r\n");
    assert_eq!(
        out.events
            .iter()
            .filter(|e| e.name() == "credentials_exposed")
            .count(),
        1
    );
}

/// Dovecot 2.3 reads `NOOP ~{n+}` as a parse error before the literal and the
/// literal's octets as commands: a LOGIN hidden there ran before TLS. Before TLS the
/// upstream now hears only `TAG VERB` lines the proxy wrote.
#[test]
fn a_literal_on_an_allowed_command_before_tls_never_reaches_the_upstream() {
    let hidden = "b LOGIN alice secret1\r\n";
    let n = hidden.len();
    for first in [
        format!("a NOOP ~{{{n}+}}"),
        format!("a CAPABILITY {{{n}+}}"),
        format!("a LOGOUT x {{{n}+}}"),
        format!("a NOOP ({{{n}+}}"),
        format!("a noop \"x\" ~{{{n}+}}"),
    ] {
        let mut s = greeted();
        // The literal's octets, then the end of command a's line, then c.
        let out = client(&mut s, &format!("{first}\r\n{hidden}\r\nc noop\r\n"));
        let tag_reply = "a BAD Unexpected arguments\r\n";
        assert_eq!(out.client, tag_reply, "{first:?}");
        assert_eq!(out.upstream, "c NOOP\r\n", "{first:?}");
        assert_eq!(names(&out.events), vec!["plaintext_command_refused"]);
    }
    // A synchronising literal is refused before the `+`: a client that sends the
    // octets anyway has them read as commands, by the proxy.
    let mut s = greeted();
    let out = client(&mut s, &format!("a NOOP {{{n}}}\r\n{hidden}"));
    assert_eq!(
        out.client,
        format!("a BAD Unexpected arguments\r\nb{PRIVACY}")
    );
    assert_eq!(out.upstream, "");
}

#[test]
fn after_tls_a_literal_is_honoured_only_where_login_has_an_astring() {
    // LOGIN's user id and password may be literals.
    let mut s = after_tls();
    let out = client(&mut s, "a LOGIN {5}\r\n");
    assert_eq!(out.upstream, "a LOGIN {5}\r\n");
    upstream(&mut s, "+ OK\r\n");
    let out = client(&mut s, "alice {7}\r\n");
    assert_eq!(out.upstream, "alice {7}\r\n");
    upstream(&mut s, "+ OK\r\n");
    assert_eq!(client(&mut s, "secret1\r\n").upstream, "secret1\r\n");
    // Anywhere else, refused before any octet moves.
    for line in [
        "b NOOP {5}",
        "b ID (\"name\" {5}",
        "b XYZZY {5}",
        "b LOGIN alice ~{5}",
        "b LOGIN x{3}",
    ] {
        let mut s = after_tls();
        let out = client(&mut s, &format!("{line}\r\n"));
        assert_eq!(out.client, "b BAD Literal not allowed here\r\n", "{line:?}");
        assert_eq!(out.upstream, "", "{line:?}");
    }
    // A non-synchronising one: its octets are read and dropped.
    let mut s = after_tls();
    s.literal_plus = true;
    let out = client(
        &mut s,
        "b NOOP ~{22+}\r\nc LOGIN alice secret1\r\nd NOOP\r\n",
    );
    assert_eq!(out.client, "b BAD Literal not allowed here\r\n");
    assert_eq!(out.upstream, "d NOOP\r\n");
    // A continuation line holds no control character either.
    let mut s = after_tls();
    client(&mut s, "a LOGIN {5}\r\n");
    upstream(&mut s, "+ OK\r\n");
    let out = client(&mut s, "alice \"pw\rb NOOP\"\r\n");
    assert_eq!(out.client, "a BAD Control character in command\r\n");
    assert_eq!(out.upstream, "alice");
    assert!(out.closed);
    // The password line after a literal user id must be just that.
    let mut s = after_tls();
    client(&mut s, "a LOGIN {5}\r\n");
    upstream(&mut s, "+ OK\r\n");
    let out = client(&mut s, "alice x {3}\r\n");
    assert_eq!(out.client, "a BAD Literal not allowed here\r\n");
    assert!(out.closed, "the upstream holds half a command");
}

#[test]
fn the_literal_bound_holds_for_the_whole_command() {
    let mut s = after_tls();
    assert_eq!(config().max_literal_len, 1000);
    client(&mut s, "a LOGIN {600}\r\n");
    upstream(&mut s, "+ OK\r\n");
    let out = client(&mut s, &format!("{} {{600}}\r\n", "u".repeat(600)));
    assert_eq!(out.client, "a BAD [TOOBIG] Literal too large\r\n");
    assert!(out.closed);
    assert_eq!(
        out.events,
        vec![Event::LimitExceeded {
            limit: "literal_size"
        }]
    );
}

#[test]
fn a_session_that_only_draws_errors_is_closed() {
    let mut s = after_tls();
    let out = client(&mut s, &"\r\n".repeat(20));
    assert_eq!(out.client.matches("* BAD").count(), 20);
    assert!(!out.closed);
    let out = client(&mut s, "\r\na NOOP\r\n");
    assert_eq!(
        out.client,
        "* BAD Invalid tag or command line\r\n* BYE Too many invalid commands\r\n"
    );
    assert_eq!(out.upstream, "");
    assert!(out.closed);
    assert_eq!(out.events, vec![Event::LimitExceeded { limit: "errors" }]);
}

#[test]
fn a_flood_of_locally_answered_lines_waits_for_the_client_to_read() {
    assert_flood_waits_for_the_client(&mut after_tls(), reply::BAD_LINE.len());
}

#[test]
fn other_commands_before_tls() {
    let mut s = greeted();
    assert_eq!(
        client(&mut s, "a SELECT INBOX\r\n").client,
        "a BAD Command not allowed before STARTTLS\r\n"
    );
    assert_eq!(
        client(&mut s, "b ID (\"name\" \"x\")\r\n").client,
        "* ID NIL\r\nb OK ID completed\r\n"
    );
    assert_eq!(client(&mut s, "c NOOP\r\n").upstream, "c NOOP\r\n");
    upstream(&mut s, "c OK NOOP completed.\r\n");
    assert_eq!(
        client(&mut s, "d STARTTLS now\r\n").client,
        "d BAD STARTTLS takes no arguments\r\n"
    );
    assert_eq!(
        client(&mut s, "NOOP\r\n").client,
        "* BAD Invalid tag or command line\r\n"
    );
    assert_eq!(
        client(&mut s, "e\r\n").client,
        "* BAD Invalid tag or command line\r\n"
    );
    let out = client(&mut s, "f XXXXXXXX\r\n");
    assert_eq!(
        names(&out.events),
        vec!["starttls_stripping_suspected", "plaintext_command_refused"]
    );
    assert_eq!(s.summary(), "id=1 starttls=0/1 noop=1 other=0/2");
}

#[test]
fn injected_commands_behind_starttls_go_to_the_tls_engine() {
    for payload in [
        "a STARTTLS\r\nb NOOP\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400}\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400+}\r\n",
    ] {
        let mut s = greeted();
        let out = client(&mut s, payload);
        let tag = &payload[..1];
        assert_eq!(
            out.client,
            format!("{tag} OK Begin TLS negotiation now\r\n")
        );
        assert_eq!(out.upstream, "");
        let early = &payload.as_bytes()[payload.find("\r\n").unwrap() + 2..];
        assert_eq!(out.starttls.as_deref(), Some(early));
        assert_eq!(
            out.events,
            vec![Event::StarttlsInjection { bytes: early.len() }]
        );
    }
}

#[test]
fn starttls_inside_tls_is_bad() {
    let mut s = after_tls();
    assert_eq!(
        client(&mut s, "x STARTTLS\r\n").client,
        "x BAD TLS is already active\r\n"
    );
}

#[test]
fn a_successful_login_hands_out_held_bytes_then_relays() {
    let mut s = after_tls();
    let out = client(&mut s, "a LOGIN alice secret\r\nb SELECT INBOX\r\n");
    assert_eq!(out.upstream, "a LOGIN alice secret\r\n");
    let out = upstream(
        &mut s,
        "a OK [CAPABILITY IMAP4rev1 STARTTLS IDLE COMPRESS=DEFLATE] Logged in\r\n* 1 EXISTS\r\n",
    );
    assert_eq!(
        out.client,
        "a OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n* 1 EXISTS\r\n"
    );
    assert_eq!(out.upstream, "b SELECT INBOX\r\n");
    assert!(out.relay);
    assert!(!s.wants_client_data());
    assert_eq!(s.summary(), "starttls=1/1 login=1/1");
}

#[test]
fn a_failed_login_keeps_the_session_in_the_proxy() {
    let mut s = after_tls();
    client(&mut s, "a LOGIN alice wrong\r\nb NOOP\r\n");
    let out = upstream(
        &mut s,
        "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    );
    assert_eq!(
        out.client,
        "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    );
    assert_eq!(out.upstream, "b NOOP\r\n");
    assert!(!out.relay);
}

#[test]
fn synchronising_literals_after_tls_wait_for_the_upstreams_continuation() {
    let mut s = after_tls();
    let out = client(&mut s, "a LOGIN {5}\r\n");
    assert_eq!(out.upstream, "a LOGIN {5}\r\n");
    let out = client(&mut s, "alice {6}\r\n");
    assert_eq!(out.upstream, "", "octets wait for the upstream's +");
    let out = upstream(&mut s, "+ OK\r\n");
    assert_eq!(out.client, "+ OK\r\n");
    assert_eq!(out.upstream, "alice {6}\r\n");
    let out = upstream(&mut s, "+ \r\n");
    assert_eq!(out.client, "+ \r\n");
    let out = client(&mut s, "secret\r\n");
    assert_eq!(out.upstream, "secret\r\n");
    let out = upstream(&mut s, "a OK Logged in\r\n");
    assert!(out.relay);
}

#[test]
fn literals_above_the_bound_are_refused_before_the_continuation() {
    let mut s = after_tls();
    let out = client(&mut s, "a LOGIN alice {1001}\r\n");
    assert_eq!(out.client, "a NO [TOOBIG] Literal too large\r\n");
    assert_eq!(out.upstream, "");
    assert_eq!(names(&out.events), vec!["limit_exceeded"]);
    let out = client(&mut s, "b LOGIN alice {1001+}\r\n");
    assert_eq!(out.client, "b BAD [TOOBIG] Literal too large\r\n");
    assert!(out.closed);
}

#[test]
fn non_synchronising_literals_need_the_upstreams_literal_plus() {
    let mut s = Session::new(config());
    upstream(&mut s, "* OK [CAPABILITY IMAP4rev1] legacy ready\r\n");
    client(&mut s, "t STARTTLS\r\n");
    s.on_tls_established();
    let out = client(&mut s, "a LOGIN alice {6+}\r\nsecret\r\nb NOOP\r\n");
    assert_eq!(
        out.client,
        "a BAD Non-synchronizing literals are not supported by this server\r\n"
    );
    assert_eq!(out.upstream, "b NOOP\r\n");
    // With LITERAL+ (learned from the greeting) they pass straight through.
    let mut s = after_tls();
    let out = client(&mut s, "a LOGIN alice {6+}\r\nsecret\r\n");
    assert_eq!(out.upstream, "a LOGIN alice {6+}\r\nsecret\r\n");
}

#[test]
fn authenticate_after_tls_relays_the_sasl_exchange() {
    let mut s = after_tls();
    assert_eq!(
        client(&mut s, "a AUTHENTICATE PLAIN\r\n").upstream,
        "a AUTHENTICATE PLAIN\r\n"
    );
    let out = upstream(&mut s, "+ \r\n");
    assert_eq!(out.client, "+ \r\n");
    // The SASL response is data even when it looks like a command: not base64, so
    // the exchange is cancelled (RFC 9051 §6.2.2), never forwarded as a line.
    assert_eq!(client(&mut s, "b LOGOUT\r\n").upstream, "*\r\n");
    let out = upstream(&mut s, "a OK Logged in\r\n");
    assert!(out.relay);
}

#[test]
fn logout_before_tls_is_relayed_and_ends_the_session() {
    let mut s = greeted();
    assert_eq!(client(&mut s, "z LOGOUT\r\n").upstream, "z LOGOUT\r\n");
    let out = upstream(&mut s, "* BYE Logging out\r\nz OK Logout completed.\r\n");
    assert_eq!(
        out.client,
        "* BYE Logging out\r\nz OK Logout completed.\r\n"
    );
    assert!(out.closed);
    s.on_upstream_eof();
    assert_eq!(drain(&mut s), Out::default());
}

#[test]
fn a_preauth_greeting_closes_with_bye() {
    let mut s = Session::new(config());
    let out = upstream(
        &mut s,
        "* PREAUTH [CAPABILITY IMAP4rev1] logged in as alice\r\n",
    );
    assert_eq!(
        out.client,
        "* BYE [UNAVAILABLE] Server misconfigured: login cannot be required, closing\r\n"
    );
    assert_eq!(out.events, vec![Event::UpstreamPreauth]);
    assert!(out.closed);
}

#[test]
fn upstream_literals_and_bare_lf_lines_are_relayed_unchanged() {
    let mut s = after_tls();
    client(&mut s, "a ID NIL\r\n");
    let out = upstream(
        &mut s,
        "* ID (\"name\" {14}\r\na OK injected\n)\r\na OK ID completed\n",
    );
    assert_eq!(
        out.client,
        "* ID (\"name\" {14}\r\na OK injected\n)\r\na OK ID completed\n"
    );
    assert_eq!(client(&mut s, "b NOOP\r\n").upstream, "b NOOP\r\n");
}

#[test]
fn echoed_client_text_in_upstream_lines_is_not_structure() {
    let mut s = Session::new(config());
    upstream(&mut s, "* OK [CAPABILITY IMAP4rev1] legacy ready\r\n");
    client(&mut s, "a NOOP {20}\r\n");
    // A tagged BAD that ends in `{5}` and mentions LITERAL+: neither a literal
    // nor a capability list.
    let out = upstream(
        &mut s,
        "a BAD Unknown command [CAPABILITY LITERAL+] {5}\r\n",
    );
    assert_eq!(
        out.client,
        "a BAD Unknown command [CAPABILITY LITERAL+] {5}\r\n"
    );
    client(&mut s, "t STARTTLS\r\n");
    s.on_tls_established();
    let out = client(&mut s, "b LOGIN alice {6+}\r\nsecret\r\n");
    assert_eq!(
        out.client,
        "b BAD Non-synchronizing literals are not supported by this server\r\n"
    );
    assert_eq!(out.upstream, "");
}

#[test]
fn an_empty_upstream_literal_continues_the_response() {
    let mut s = greeted();
    client(&mut s, "a NOOP\r\n");
    let out = upstream(&mut s, "* 1 FETCH (BODY[] {0}\r\n)\r\na OK done\r\n");
    assert_eq!(out.client, "* 1 FETCH (BODY[] {0}\r\n)\r\na OK done\r\n");
    assert!(!out.closed);
}

#[test]
fn upstream_bytes_never_cross_into_tls() {
    let mut s = greeted();
    upstream(&mut s, "* OK half a line");
    let out = client(&mut s, "t STARTTLS\r\n");
    assert_eq!(
        out.client,
        "* BYE [UNAVAILABLE] Upstream protocol error, closing\r\n"
    );
    assert!(out.closed && out.starttls.is_none());
    let mut s = greeted();
    client(&mut s, "t STARTTLS\r\n");
    assert_eq!(upstream(&mut s, "* OK late\r\n"), Out::default());
    s.on_tls_established();
    let out = drain(&mut s);
    assert!(out.closed && !out.client.contains("late"));
}

#[test]
fn upstream_failures_get_bye() {
    let mut s = Session::new(config());
    s.on_upstream_eof();
    assert_eq!(
        drain(&mut s).client,
        "* BYE [UNAVAILABLE] Service temporarily unavailable, closing connection\r\n"
    );
    let mut s = greeted();
    let out = upstream(&mut s, "garbage\r\n");
    assert_eq!(
        out.client,
        "* BYE [UNAVAILABLE] Upstream protocol error, closing\r\n"
    );
    assert!(out.closed);
    let mut s = greeted();
    s.on_timeout();
    assert_eq!(
        drain(&mut s).client,
        "* BYE Autologout; idle for too long\r\n"
    );
}

#[test]
fn an_over_long_line_is_refused_with_bye() {
    let mut s = greeted();
    let out = client(&mut s, &"a".repeat(2000));
    assert_eq!(out.client, "* BYE Command line too long\r\n");
    assert!(out.closed);
    assert_eq!(out.upstream, "");
}

#[test]
fn implicit_tls_waits_for_the_greeting_and_shows_auth() {
    let mut s = Session::new(config());
    s.on_tls_established();
    assert_eq!(client(&mut s, "a CAPABILITY\r\n").upstream, "");
    let out = upstream(&mut s, GREETING);
    assert_eq!(
        out.client,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN \
AUTH=LOGIN] Dovecot (Debian) ready.\r\n"
    );
    assert_eq!(out.upstream, "a CAPABILITY\r\n");
}

/// Runs a fixed dialogue with the client's bytes cut at `cuts`; the upstream answers
/// each forwarded command as soon as it is complete.
fn run_chunked(client_stream: &[u8], cuts: &[usize]) -> Out {
    let mut s = Session::new(config());
    let mut total = drain(&mut s);
    let merge = |total: &mut Out, out: Out| {
        total.client.push_str(&out.client);
        total.upstream.push_str(&out.upstream);
        total.events.extend(out.events);
        total.starttls = total.starttls.take().or(out.starttls);
        total.relay |= out.relay;
        total.closed |= out.closed;
    };
    merge(&mut total, upstream(&mut s, GREETING));
    let mut answered = 0;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&client_stream.len())) {
        s.on_client_data(&client_stream[start..cut]);
        start = cut;
        merge(&mut total, drain(&mut s));
        for (tag, response) in [
            (
                "a CAPABILITY\r\n",
                "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK done\r\n",
            ),
            ("d NOOP\r\n", "d OK done\r\n"),
        ] {
            if total.upstream.contains(tag)
                && answered < 2
                && !total.client.contains(&response[response.len() - 11..])
            {
                answered += 1;
                merge(&mut total, upstream(&mut s, response));
            }
        }
    }
    total
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_bytes_and_events(
        cuts in proptest::collection::vec(0usize..120, 0..8),
    ) {
        // Up to STARTTLS: later bytes go to the TLS engine, not to the session.
        let stream = b"a CAPABILITY\r\nb LOGIN alice {6+}\r\nsecret\r\nc ID NIL\r\nd NOOP\r\ne SELECT INBOX\r\nf STARTTLS\r\n";
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
        cuts.sort_unstable();
        let expected = run_chunked(stream, &[]);
        prop_assert_eq!(&expected.upstream, "a CAPABILITY\r\nd NOOP\r\n");
        prop_assert!(expected.starttls.is_some());
        prop_assert_eq!(run_chunked(stream, &cuts), expected);
    }
}
