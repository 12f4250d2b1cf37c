//! IMAP through the proxy on loopback, against a scripted upstream that records every
//! byte: STARTTLS injection, credentials before TLS, literals, the blind relay after
//! login, implicit TLS, and an unreachable upstream.

mod common;

use std::net::SocketAddr;

use common::upstream::imap::{Behaviour, scripted};
use common::*;
use tokio::net::TcpStream;

const PRIVACY: &str =
    "NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";

async fn imap_proxy(upstream: &Upstream) -> Proxy {
    proxy(
        &[
            imap_listener("imap", "starttls", upstream.addr),
            imap_listener("imaps", "implicit", upstream.addr),
        ],
        "limits: { max_literal_len: 1000 }\n",
    )
    .await
}

async fn connect_imap(addr: SocketAddr) -> Client<TcpStream> {
    let mut stream = connect(addr).await;
    let greeting = stream.response(None).await;
    assert_eq!(
        greeting,
        "* OK [CAPABILITY IMAP4rev1 ID IDLE LITERAL+ STARTTLS LOGINDISABLED] scripted ready\r\n"
    );
    stream
}

#[tokio::test]
async fn starttls_injection_is_never_answered_never_forwarded_and_a_later_login_works() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = imap_proxy(&upstream).await;
    let payloads = [
        "a STARTTLS\r\nb NOOP\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400}\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400+}\r\n",
    ];
    for payload in payloads {
        for cut in [Cut::OneWrite, Cut::ByteByByte, Cut::AtCrlf] {
            let mut victim = connect_imap(proxy.addr("imap")).await;
            victim.send_cut(payload.as_bytes(), cut).await;
            let tag = &payload[..1];
            assert_eq!(
                victim.response(None).await,
                format!("{tag} OK Begin TLS negotiation now\r\n")
            );
            let rest = victim.rest().await;
            assert!(
                rest.is_empty() || rest[0] == 0x15,
                "{payload:?} {cut:?}: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
    upstream.wait_closed().await;
    let seen = upstream.raw_text();
    assert!(
        !seen.contains("NOOP") && !seen.contains("LOGIN") && !seen.contains("APPEND"),
        "{seen:?}"
    );

    // The victim, on a clean connection, logs in normally.
    let plain = connect_imap(proxy.addr("imap")).await;
    let mut plain = plain;
    plain.send(b"v1 STARTTLS\r\n").await;
    assert_eq!(
        plain.response(None).await,
        "v1 OK Begin TLS negotiation now\r\n"
    );
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[b"imap"])
        .await
        .unwrap();
    let mut tls = Client::new(tls);
    tls.send(b"v2 LOGIN alice secret\r\n").await;
    assert_eq!(
        tls.response(Some("v2")).await,
        "v2 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
    );
    assert!(upstream.raw_text().ends_with("v2 LOGIN alice secret\r\n"));
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn credentials_before_tls_never_reach_the_upstream() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = imap_proxy(&upstream).await;
    let mut client = connect_imap(proxy.addr("imap")).await;
    client.send(b"a LOGIN alice \"secret one\"\r\n").await;
    assert_eq!(client.response(Some("a")).await, format!("a {PRIVACY}"));
    // A synchronising literal password: refused before any `+`.
    client.send(b"b LOGIN alice {10}\r\n").await;
    assert_eq!(client.response(None).await, format!("b {PRIVACY}"));
    // A non-synchronising one arrives anyway: swallowed, refused, never forwarded.
    client.send(b"c LOGIN alice {10+}\r\nsecret two\r\n").await;
    assert_eq!(client.response(Some("c")).await, format!("c {PRIVACY}"));
    client
        .send(b"d AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldCB0aHJlZQ==\r\n")
        .await;
    assert_eq!(client.response(Some("d")).await, format!("d {PRIVACY}"));
    client.send(b"e SELECT INBOX\r\n").await;
    assert_eq!(
        client.response(Some("e")).await,
        "e BAD Command not allowed before STARTTLS\r\n"
    );
    client.send(b"f ID (\"name\" \"test\")\r\n").await;
    assert_eq!(
        client.response(Some("f")).await,
        "* ID NIL\r\nf OK ID completed\r\n"
    );
    client.send(b"g CAPABILITY\r\n").await;
    assert_eq!(
        client.response(Some("g")).await,
        "* CAPABILITY IMAP4rev1 ID IDLE LITERAL+ STARTTLS LOGINDISABLED\r\ng OK done\r\n"
    );
    drop(client);
    upstream.wait_closed().await;
    assert_eq!(upstream.raw_text(), "g CAPABILITY\r\n");
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn a_large_literal_before_login_is_refused_before_the_continuation() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = imap_proxy(&upstream).await;
    let mut client = connect_imap(proxy.addr("imap")).await;
    client.send(b"a STARTTLS\r\n").await;
    client.response(None).await;
    let mut tls = Client::new(
        tls_connect(client.into_inner(), "mail.example.test", &[])
            .await
            .unwrap(),
    );
    tls.send(b"b LOGIN alice {100000000}\r\n").await;
    assert_eq!(
        tls.response(None).await,
        "b NO [TOOBIG] Literal too large\r\n"
    );
    tls.send(b"c LOGIN alice {6}\r\n").await;
    assert_eq!(tls.response(None).await, "+ OK\r\n");
    tls.send(b"secret\r\n").await;
    assert!(tls.response(Some("c")).await.starts_with("c OK "));
    assert!(!upstream.raw_text().contains("100000000"));
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn after_login_bytes_are_relayed_blindly_over_starttls_and_implicit_tls() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = imap_proxy(&upstream).await;
    let expected_body = "a STARTTLS\r\n* BYE\r\n".repeat(20_000);
    for listener in ["imap", "imaps"] {
        let tcp = within(tokio::net::TcpStream::connect(proxy.addr(listener)))
            .await
            .unwrap();
        let mut tls = if listener == "imap" {
            let mut plain = Client::new(tcp);
            plain.response(None).await;
            plain.send(b"s STARTTLS\r\n").await;
            plain.response(None).await;
            Client::new(
                tls_connect(plain.into_inner(), "mail.example.test", &[b"imap"])
                    .await
                    .unwrap(),
            )
        } else {
            let mut tls = Client::new(
                tls_connect(tcp, "mail.example.test", &[b"imap"])
                    .await
                    .unwrap(),
            );
            assert_eq!(
                tls.response(None).await,
                "* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN] scripted ready\r\n"
            );
            tls
        };
        tls.send(b"c CAPABILITY\r\n").await;
        assert_eq!(
            tls.response(Some("c")).await,
            "* CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN\r\nc OK done\r\n"
        );
        // LOGIN and a pipelined FETCH in one write: the FETCH is held, then relayed.
        tls.send(b"l LOGIN alice {6+}\r\nsecret\r\nf FETCH 1 BODY[]\r\n")
            .await;
        assert!(
            tls.response(Some("l"))
                .await
                .starts_with("l OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE]")
        );
        let fetched = tls.response(Some("f")).await;
        assert_eq!(
            fetched,
            format!(
                "* 1 FETCH (BODY[] {{{}}}\r\n{expected_body})\r\nf OK Fetch completed\r\n",
                expected_body.len()
            )
        );
        tls.send(b"o LOGOUT\r\n").await;
        assert_eq!(
            tls.response(Some("o")).await,
            "* BYE Logging out\r\no OK Logout completed\r\n"
        );
    }
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn a_zero_length_literal_split_across_reads_goes_upstream_whole() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = imap_proxy(&upstream).await;
    let tcp = within(tokio::net::TcpStream::connect(proxy.addr("imaps")))
        .await
        .unwrap();
    let mut tls = Client::new(
        tls_connect(tcp, "mail.example.test", &[b"imap"])
            .await
            .unwrap(),
    );
    tls.response(None).await;
    // An empty password by a non-synchronising literal (before login, literals are
    // honoured only in LOGIN's astrings), its line end in two more writes: the literal's
    // zero bytes are then the last thing a read gives the upstream. The pauses are the
    // behaviour under test: each write arrives in a read of its own.
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(50));
    tls.send(b"a LOGIN alice {0+}\r\n").await;
    pause().await;
    tls.send(b"\r").await;
    pause().await;
    tls.send(b"\n").await;
    assert_eq!(
        tls.response(Some("a")).await,
        "a OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
    );
    assert!(upstream.raw_text().ends_with("a LOGIN alice {0+}\r\n\r\n"));
}

#[tokio::test]
async fn an_unreachable_upstream_gets_bye_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(&[imap_listener("down", "starttls", closed)], "").await;
    let mut client = Client::new(
        tokio::net::TcpStream::connect(proxy.addr("down"))
            .await
            .unwrap(),
    );
    assert_eq!(
        client.response(None).await,
        "* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
    );
}
