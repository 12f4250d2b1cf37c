//! IMAP through the proxy on loopback, against a scripted upstream that records every
//! byte: STARTTLS injection, credentials before TLS, literals, the blind relay after
//! login, implicit TLS, and an unreachable upstream.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN] scripted ready\r\n";
const PRIVACY: &str =
    "NO [PRIVACYREQUIRED] TLS is required before authentication, use STARTTLS\r\n";

/// A Dovecot-like scripted upstream: records every byte and every command line.
struct ImapUpstream {
    addr: SocketAddr,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl ImapUpstream {
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).into_owned()
    }
}

async fn imap_upstream() -> ImapUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&raw);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let raw = Arc::clone(&shared);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let _ = write.write_all(GREETING.as_bytes()).await;
                let mut logged_in = false;
                loop {
                    // One command, literals included.
                    let mut command = Vec::new();
                    loop {
                        let mut line = Vec::new();
                        if read.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        raw.lock().unwrap().extend_from_slice(&line);
                        command.extend_from_slice(&line);
                        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                        let Some(open) = text.rfind('{').filter(|_| text.ends_with('}')) else {
                            break;
                        };
                        let spec = &text[open + 1..text.len() - 1];
                        let (len, sync) = match spec.strip_suffix('+') {
                            Some(n) => (n.parse::<usize>().unwrap(), false),
                            None => (spec.parse::<usize>().unwrap(), true),
                        };
                        if sync {
                            let _ = write.write_all(b"+ OK\r\n").await;
                        }
                        let mut octets = vec![0; len];
                        if read.read_exact(&mut octets).await.is_err() {
                            return;
                        }
                        raw.lock().unwrap().extend_from_slice(&octets);
                        command.extend_from_slice(&octets);
                    }
                    let text = String::from_utf8_lossy(&command).into_owned();
                    let mut words = text.split_whitespace();
                    let tag = words.next().unwrap_or("*").to_owned();
                    let verb = words.next().unwrap_or("").to_ascii_uppercase();
                    let reply = match verb.as_str() {
                        "CAPABILITY" if logged_in => {
                            format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n")
                        }
                        "CAPABILITY" => format!(
                            "* CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN\r\n{tag} OK done\r\n"
                        ),
                        "LOGIN" => {
                            logged_in = true;
                            format!(
                                "{tag} OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
                            )
                        }
                        "FETCH" => {
                            // A large literal with protocol-looking lines inside.
                            let body = "a STARTTLS\r\n* BYE\r\n".repeat(20_000);
                            format!(
                                "* 1 FETCH (BODY[] {{{}}}\r\n{body})\r\n{tag} OK Fetch completed\r\n",
                                body.len()
                            )
                        }
                        "LOGOUT" => {
                            let _ = write
                                .write_all(
                                    format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n")
                                        .as_bytes(),
                                )
                                .await;
                            return;
                        }
                        _ => format!("{tag} OK {verb} completed\r\n"),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    ImapUpstream { addr, raw }
}

fn listener(name: &str, tls: &str, upstream: SocketAddr) -> String {
    format!(
        "{{ name: {name}, protocol: imap, listen: \"127.0.0.1:0\", tls: {tls}, upstream: \"{upstream}\" }}"
    )
}

async fn imap_proxy(upstream: &ImapUpstream) -> Proxy {
    proxy(
        &[
            listener("imap", "starttls", upstream.addr),
            listener("imaps", "implicit", upstream.addr),
        ],
        "limits: { max_literal_len: 1000 }\n",
    )
    .await
}

/// Reads lines until the tagged response for `tag` (or one line when `tag` is None).
async fn response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    tag: Option<&str>,
) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = within(stream.read_line(&mut line)).await.unwrap();
        assert!(n > 0, "connection closed after {all:?}");
        all.push_str(&line);
        match tag {
            None => return all,
            Some(tag) if line.starts_with(&format!("{tag} ")) => return all,
            _ => {}
        }
    }
}

async fn send<S: AsyncWrite + AsyncRead + Unpin>(stream: &mut BufReader<S>, bytes: &[u8]) {
    within(stream.get_mut().write_all(bytes)).await.unwrap();
    within(stream.get_mut().flush()).await.unwrap();
}

async fn connect_imap(addr: SocketAddr) -> BufReader<tokio::net::TcpStream> {
    let mut stream = BufReader::new(within(tokio::net::TcpStream::connect(addr)).await.unwrap());
    let greeting = response(&mut stream, None).await;
    assert_eq!(
        greeting,
        "* OK [CAPABILITY IMAP4rev1 ID IDLE LITERAL+ STARTTLS LOGINDISABLED] scripted ready\r\n"
    );
    stream
}

#[tokio::test]
async fn starttls_injection_is_never_answered_never_forwarded_and_a_later_login_works() {
    let upstream = imap_upstream().await;
    let proxy = imap_proxy(&upstream).await;
    let payloads = [
        "a STARTTLS\r\nb NOOP\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400}\r\n",
        "A STARTTLS\r\nB LOGIN attacker pw\r\nC APPEND INBOX {400+}\r\n",
    ];
    for payload in payloads {
        for cut in ["one write", "byte by byte", "at the CRLF"] {
            let mut victim = connect_imap(proxy.addr("imap")).await;
            match cut {
                "one write" => send(&mut victim, payload.as_bytes()).await,
                "byte by byte" => {
                    for byte in payload.as_bytes() {
                        send(&mut victim, std::slice::from_ref(byte)).await;
                    }
                }
                _ => {
                    let split = payload.find("\r\n").unwrap() + 2;
                    send(&mut victim, &payload.as_bytes()[..split]).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    send(&mut victim, &payload.as_bytes()[split..]).await;
                }
            }
            let tag = &payload[..1];
            assert_eq!(
                response(&mut victim, None).await,
                format!("{tag} OK Begin TLS negotiation now\r\n")
            );
            let mut rest = Vec::new();
            let _ = within(victim.read_to_end(&mut rest)).await;
            assert!(
                rest.is_empty() || rest[0] == 0x15,
                "{payload:?} {cut}: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = upstream.raw();
    assert!(
        !seen.contains("NOOP") && !seen.contains("LOGIN") && !seen.contains("APPEND"),
        "{seen:?}"
    );

    // The victim, on a clean connection, logs in normally.
    let plain = connect_imap(proxy.addr("imap")).await;
    let mut plain = plain;
    send(&mut plain, b"v1 STARTTLS\r\n").await;
    assert_eq!(
        response(&mut plain, None).await,
        "v1 OK Begin TLS negotiation now\r\n"
    );
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[b"imap"])
        .await
        .unwrap();
    let mut tls = BufReader::new(tls);
    send(&mut tls, b"v2 LOGIN alice secret\r\n").await;
    assert_eq!(
        response(&mut tls, Some("v2")).await,
        "v2 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
    );
    assert!(upstream.raw().ends_with("v2 LOGIN alice secret\r\n"));
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn credentials_before_tls_never_reach_the_upstream() {
    let upstream = imap_upstream().await;
    let proxy = imap_proxy(&upstream).await;
    let mut client = connect_imap(proxy.addr("imap")).await;
    send(&mut client, b"a LOGIN alice \"secret one\"\r\n").await;
    assert_eq!(
        response(&mut client, Some("a")).await,
        format!("a {PRIVACY}")
    );
    // A synchronising literal password: refused before any `+`.
    send(&mut client, b"b LOGIN alice {10}\r\n").await;
    assert_eq!(response(&mut client, None).await, format!("b {PRIVACY}"));
    // A non-synchronising one arrives anyway: swallowed, refused, never forwarded.
    send(&mut client, b"c LOGIN alice {10+}\r\nsecret two\r\n").await;
    assert_eq!(
        response(&mut client, Some("c")).await,
        format!("c {PRIVACY}")
    );
    send(
        &mut client,
        b"d AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldCB0aHJlZQ==\r\n",
    )
    .await;
    assert_eq!(
        response(&mut client, Some("d")).await,
        format!("d {PRIVACY}")
    );
    send(&mut client, b"e SELECT INBOX\r\n").await;
    assert_eq!(
        response(&mut client, Some("e")).await,
        "e BAD Command not allowed before STARTTLS\r\n"
    );
    send(&mut client, b"f ID (\"name\" \"test\")\r\n").await;
    assert_eq!(
        response(&mut client, Some("f")).await,
        "* ID NIL\r\nf OK ID completed\r\n"
    );
    send(&mut client, b"g CAPABILITY\r\n").await;
    assert_eq!(
        response(&mut client, Some("g")).await,
        "* CAPABILITY IMAP4rev1 ID IDLE LITERAL+ STARTTLS LOGINDISABLED\r\ng OK done\r\n"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(upstream.raw(), "g CAPABILITY\r\n");
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn a_large_literal_before_login_is_refused_before_the_continuation() {
    let upstream = imap_upstream().await;
    let proxy = imap_proxy(&upstream).await;
    let mut client = connect_imap(proxy.addr("imap")).await;
    send(&mut client, b"a STARTTLS\r\n").await;
    response(&mut client, None).await;
    let mut tls = BufReader::new(
        tls_connect(client.into_inner(), "mail.example.test", &[])
            .await
            .unwrap(),
    );
    send(&mut tls, b"b LOGIN alice {100000000}\r\n").await;
    assert_eq!(
        response(&mut tls, None).await,
        "b NO [TOOBIG] Literal too large\r\n"
    );
    send(&mut tls, b"c LOGIN alice {6}\r\n").await;
    assert_eq!(response(&mut tls, None).await, "+ OK\r\n");
    send(&mut tls, b"secret\r\n").await;
    assert!(response(&mut tls, Some("c")).await.starts_with("c OK "));
    assert!(!upstream.raw().contains("100000000"));
    assert_no_secret_logged(&[
        "alice secret",
        "secret one",
        "secret two",
        "AGFsaWNlAHNlY3JldCB0aHJlZQ==",
    ]);
}

#[tokio::test]
async fn after_login_bytes_are_relayed_blindly_over_starttls_and_implicit_tls() {
    let upstream = imap_upstream().await;
    let proxy = imap_proxy(&upstream).await;
    let expected_body = "a STARTTLS\r\n* BYE\r\n".repeat(20_000);
    for listener in ["imap", "imaps"] {
        let tcp = within(tokio::net::TcpStream::connect(proxy.addr(listener)))
            .await
            .unwrap();
        let mut tls = if listener == "imap" {
            let mut plain = BufReader::new(tcp);
            response(&mut plain, None).await;
            send(&mut plain, b"s STARTTLS\r\n").await;
            response(&mut plain, None).await;
            BufReader::new(
                tls_connect(plain.into_inner(), "mail.example.test", &[b"imap"])
                    .await
                    .unwrap(),
            )
        } else {
            let mut tls = BufReader::new(
                tls_connect(tcp, "mail.example.test", &[b"imap"])
                    .await
                    .unwrap(),
            );
            assert_eq!(
                response(&mut tls, None).await,
                "* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN] scripted ready\r\n"
            );
            tls
        };
        send(&mut tls, b"c CAPABILITY\r\n").await;
        assert_eq!(
            response(&mut tls, Some("c")).await,
            "* CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN\r\nc OK done\r\n"
        );
        // LOGIN and a pipelined FETCH in one write: the FETCH is held, then relayed.
        send(
            &mut tls,
            b"l LOGIN alice {6+}\r\nsecret\r\nf FETCH 1 BODY[]\r\n",
        )
        .await;
        assert!(
            response(&mut tls, Some("l"))
                .await
                .starts_with("l OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE]")
        );
        let fetched = response(&mut tls, Some("f")).await;
        assert_eq!(
            fetched,
            format!(
                "* 1 FETCH (BODY[] {{{}}}\r\n{expected_body})\r\nf OK Fetch completed\r\n",
                expected_body.len()
            )
        );
        send(&mut tls, b"o LOGOUT\r\n").await;
        assert_eq!(
            response(&mut tls, Some("o")).await,
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
    let upstream = imap_upstream().await;
    let proxy = imap_proxy(&upstream).await;
    let tcp = within(tokio::net::TcpStream::connect(proxy.addr("imaps")))
        .await
        .unwrap();
    let mut tls = BufReader::new(
        tls_connect(tcp, "mail.example.test", &[b"imap"])
            .await
            .unwrap(),
    );
    response(&mut tls, None).await;
    // An empty password by a non-synchronising literal (before login, literals are
    // honoured only in LOGIN's astrings), its line end in two more writes: the literal's
    // zero bytes are then the last thing a read gives the upstream.
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(50));
    send(&mut tls, b"a LOGIN alice {0+}\r\n").await;
    pause().await;
    send(&mut tls, b"\r").await;
    pause().await;
    send(&mut tls, b"\n").await;
    assert_eq!(
        response(&mut tls, Some("a")).await,
        "a OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"
    );
    assert!(
        String::from_utf8_lossy(&upstream.raw.lock().unwrap())
            .ends_with("a LOGIN alice {0+}\r\n\r\n")
    );
}

#[tokio::test]
async fn an_unreachable_upstream_gets_bye_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(&[listener("down", "starttls", closed)], "").await;
    let mut client = BufReader::new(
        tokio::net::TcpStream::connect(proxy.addr("down"))
            .await
            .unwrap(),
    );
    assert_eq!(
        response(&mut client, None).await,
        "* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
    );
}
