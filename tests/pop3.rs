//! POP3 through the proxy on loopback, against a scripted Dovecot-like upstream that
//! records every byte it receives: STLS injection, refusals before TLS, a full session
//! through STLS and through implicit TLS, held bytes behind PASS, upstream failures.

mod common;

use std::net::SocketAddr;

use common::upstream::pop3::{Behaviour, GREETING, PLAIN_IR, message, retr_reply, scripted};
use common::{
    Client, Cut, Proxy, Upstream, assert_no_secret_logged, certs, connect, pop3_listener, proxy,
    tls_connect, within,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const CAPA_BEFORE_TLS: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nSTLS\r\n.\r\n";
const CAPA_AFTER_TLS: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
const AUTH_REFUSED: &str = "-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
const NOT_BEFORE_STLS: &str = "-ERR Command not allowed before STLS\r\n";
const BEGIN_TLS: &str = "+OK Begin TLS negotiation\r\n";

/// A TLS client, verifying the proxy's certificate, offering `pop3` as ALPN.
async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
) -> Client<tokio_rustls::client::TlsStream<S>> {
    let tls = tls_connect(stream, "mail.example.test", &[b"pop3"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"pop3"[..]));
    assert_eq!(
        &tls.get_ref().1.peer_certificates().unwrap()[0],
        &certs().default.2
    );
    Client::new(tls)
}

async fn pop3_proxy(upstream: &Upstream) -> Proxy {
    proxy(
        &[
            pop3_listener("pop3", "starttls", upstream.addr),
            pop3_listener("pop3s", "implicit", upstream.addr),
        ],
        "",
    )
    .await
}

/// Connects, reads the greeting, CAPA, STLS, handshake.
async fn stls_client(addr: SocketAddr) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut plain = connect(addr).await;
    assert_eq!(plain.line().await, GREETING);
    assert_eq!(plain.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
    assert_eq!(plain.cmd_line("STLS").await, BEGIN_TLS);
    tls(plain.into_inner()).await
}

// ---- the tests ----

#[tokio::test]
async fn stls_command_injection_is_never_answered_and_never_forwarded() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    for payload in ["STLS\r\nCAPA\r\n", "STLS\r\nUSER attacker\r\nPASS pw\r\n"] {
        for cut in [Cut::OneWrite, Cut::ByteByByte, Cut::AtCrlf] {
            let before = upstream.commands().len();
            let mut client = connect(proxy.addr("pop3")).await;
            assert_eq!(client.line().await, GREETING);
            assert_eq!(client.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
            client.send_cut(payload.as_bytes(), cut).await;
            assert_eq!(client.line().await, BEGIN_TLS, "{cut:?} {payload:?}");
            // Whatever follows is the TLS engine's alert, never a POP3 reply.
            let rest = client.rest().await;
            assert!(
                rest.is_empty() || rest[0] == 0x15,
                "{cut:?} {payload:?}: got {:?}",
                String::from_utf8_lossy(&rest)
            );
            upstream.wait_closed().await;
            assert_eq!(
                upstream.commands()[before..],
                ["CAPA"],
                "{cut:?} {payload:?}"
            );
        }
    }
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn credentials_before_tls_are_refused_and_never_reach_the_upstream() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = connect(proxy.addr("pop3")).await;
    assert_eq!(client.line().await, GREETING);
    assert_eq!(client.cmd_line("USER alice").await, AUTH_REFUSED);
    assert_eq!(client.cmd_line("PASS secret").await, AUTH_REFUSED);
    assert_eq!(
        client.cmd_line("APOP alice 0123456789abcdef").await,
        AUTH_REFUSED
    );
    assert_eq!(
        client.cmd_line(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        AUTH_REFUSED
    );
    for command in ["STAT", "LIST", "RETR 1", "DELE 1", "XXXX"] {
        assert_eq!(client.cmd_line(command).await, NOT_BEFORE_STLS, "{command}");
    }
    assert_eq!(
        client.cmd_line("STLS please").await,
        "-ERR Syntax error, STLS takes no arguments\r\n"
    );
    assert_eq!(client.cmd_line("NOOP").await, "+OK\r\n");
    assert_eq!(client.cmd_line("QUIT").await, "+OK Logging out.\r\n");
    assert!(client.rest().await.is_empty());
    upstream.wait_closed().await;
    assert_eq!(upstream.commands(), ["NOOP", "QUIT"]);
    let raw = String::from_utf8(upstream.recording.lock().unwrap().raw.clone()).unwrap();
    assert!(!raw.contains("alice") && !raw.contains("secret"));
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn a_full_stls_session_reads_mail_through_tls() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    assert_eq!(client.multi("CAPA").await, CAPA_AFTER_TLS.as_bytes());
    assert_eq!(client.cmd_line("STLS").await, "-ERR TLS already active\r\n");
    assert_eq!(client.cmd_line("USER alice").await, "+OK\r\n");
    assert_eq!(client.cmd_line("PASS secret").await, "+OK Logged in.\r\n");
    let size = message().len();
    assert_eq!(client.cmd_line("STAT").await, format!("+OK 1 {size}\r\n"));
    assert_eq!(
        client.multi("LIST").await,
        format!("+OK 1 messages:\r\n1 {size}\r\n.\r\n").as_bytes()
    );
    assert_eq!(client.multi("RETR 1").await, retr_reply());
    assert_eq!(client.cmd_line("QUIT").await, "+OK Logging out.\r\n");
    upstream.wait_closed().await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "CAPA",
            "USER alice",
            "PASS secret",
            "STAT",
            "LIST",
            "RETR 1",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn commands_pipelined_behind_the_login_reach_the_upstream_after_its_reply() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    client
        .send(b"USER alice\r\nPASS secret\r\nSTAT\r\nUIDL\r\nRETR 1\r\nQUIT\r\n")
        .await;
    assert_eq!(client.line().await, "+OK\r\n");
    assert_eq!(client.line().await, "+OK Logged in.\r\n");
    let rest = client.rest().await;
    let expected = [
        format!("+OK 1 {}\r\n", message().len()).into_bytes(),
        b"+OK\r\n1 000000014d9a5e5a\r\n.\r\n".to_vec(),
        retr_reply(),
        b"+OK Logging out.\r\n".to_vec(),
    ]
    .concat();
    assert_eq!(rest, expected);
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.early_input, 0, "bytes reached the upstream early");
    assert_eq!(
        recording.commands,
        [
            "CAPA",
            "USER alice",
            "PASS secret",
            "STAT",
            "UIDL",
            "RETR 1",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn auth_plain_through_tls_then_blind_relay() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    assert_eq!(client.cmd_line("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(
        client.cmd_line("*").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(client.cmd_line("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(client.cmd_line(PLAIN_IR).await, "+OK Logged in.\r\n");
    assert_eq!(
        client.cmd_line("STAT").await,
        format!("+OK 1 {}\r\n", message().len())
    );
    assert_eq!(client.cmd_line("QUIT").await, "+OK Logging out.\r\n");
    upstream.wait_closed().await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "AUTH PLAIN",
            "*",
            "AUTH PLAIN",
            PLAIN_IR,
            "STAT",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn implicit_tls_serves_the_same_session_with_tls_from_the_start() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let tcp = within(TcpStream::connect(proxy.addr("pop3s")))
        .await
        .unwrap();
    let mut client = tls(tcp).await;
    assert_eq!(client.line().await, GREETING);
    assert_eq!(client.multi("CAPA").await, CAPA_AFTER_TLS.as_bytes());
    assert_eq!(client.cmd_line("STLS").await, "-ERR TLS already active\r\n");
    assert_eq!(client.cmd_line("USER alice").await, "+OK\r\n");
    assert_eq!(
        client.cmd_line("PASS wrong").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(client.cmd_line("PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(
        client.cmd_line("STAT").await,
        format!("+OK 1 {}\r\n", message().len())
    );
    assert_eq!(client.multi("RETR 1").await, retr_reply());
    assert_eq!(client.cmd_line("QUIT").await, "+OK Logging out.\r\n");
    upstream.wait_closed().await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "USER alice",
            "PASS wrong",
            "PASS secret",
            "STAT",
            "RETR 1",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn upstream_down_gets_sys_temp_on_both_kinds_of_listener() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(
        &[
            pop3_listener("down", "starttls", closed),
            pop3_listener("down-tls", "implicit", closed),
        ],
        "",
    )
    .await;
    let expected = "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
    let mut client = connect(proxy.addr("down")).await;
    assert_eq!(client.line().await, expected);
    assert!(client.rest().await.is_empty());
    let tcp = within(TcpStream::connect(proxy.addr("down-tls")))
        .await
        .unwrap();
    let mut client = tls(tcp).await;
    assert_eq!(client.line().await, expected);
}

#[tokio::test]
async fn a_silent_upstream_times_out_with_sys_temp() {
    let upstream = scripted(Behaviour::Silent).await;
    let proxy = proxy(
        &[pop3_listener("silent", "starttls", upstream.addr)],
        "timeouts: { greeting: 300ms }\n",
    )
    .await;
    let mut client = connect(proxy.addr("silent")).await;
    // Nothing the client sends before the greeting is forwarded.
    client.send(b"USER early\r\n").await;
    assert_eq!(
        client.line().await,
        "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"
    );
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn an_over_long_line_gets_an_error_while_other_sessions_carry_on() {
    let upstream = scripted(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut flooder = connect(proxy.addr("pop3")).await;
    assert_eq!(flooder.line().await, GREETING);
    let mut bystander = connect(proxy.addr("pop3")).await;
    assert_eq!(bystander.line().await, GREETING);
    // The write may fail once the proxy closes; the reply is what counts.
    let _ = flooder
        .stream
        .get_mut()
        .write_all(&vec![b'A'; 100_000])
        .await;
    assert_eq!(flooder.line().await, "-ERR Line too long\r\n");
    assert!(flooder.rest().await.is_empty());
    assert_eq!(bystander.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
    assert!(!upstream.commands().iter().any(|c| c.starts_with("AAAA")));
}
