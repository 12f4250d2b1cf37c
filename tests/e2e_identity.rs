//! Client identity end to end with the real legacy servers (ARCHITECTURE.md §7): a client behind
//! a "load balancer" (the test sends the PROXY header a balancer would) reaches Postfix
//! and Dovecot through mailmoat, and their own logs name the client's address, not
//! mailmoat's: Postfix with `smtpd_upstream_proxy_protocol = haproxy` and with XCLIENT
//! (`smtpd_authorized_xclient_hosts`), Dovecot with `haproxy = yes`. A missing Postfix
//! or Dovecot fails these tests.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// The legacy instance of this binary, with an extra Postfix smtpd and extra Dovecot
/// listeners that expect a PROXY header (the main ports stay plain, so the start-up
/// banner check works), and XCLIENT allowed from loopback on the main smtpd.
struct IdentityLegacy {
    legacy: Legacy,
    smtp_proxied: SocketAddr,
    imap_proxied: SocketAddr,
    pop3_proxied: SocketAddr,
}

fn legacy_with_identity() -> &'static IdentityLegacy {
    static LEGACY: OnceLock<IdentityLegacy> = OnceLock::new();
    LEGACY.get_or_init(|| {
        let (smtp, imap, pop3) = (free_port(), free_port(), free_port());
        let master = format!(
            "127.0.0.1:{smtp} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy"
        );
        let dovecot = format!(
            "haproxy_trusted_networks = 127.0.0.0/8\n\
             service imap-login {{\n  inet_listener imap-proxied {{\n    address = 127.0.0.1\n    port = {imap}\n    haproxy = yes\n  }}\n}}\n\
             service pop3-login {{\n  inet_listener pop3-proxied {{\n    address = 127.0.0.1\n    port = {pop3}\n    haproxy = yes\n  }}\n}}\n"
        );
        let legacy = Legacy::start_with(
            "smtpd_authorized_xclient_hosts = 127.0.0.0/8",
            &master,
            &dovecot,
        );
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        IdentityLegacy {
            legacy,
            smtp_proxied: addr(smtp),
            imap_proxied: addr(imap),
            pop3_proxied: addr(pop3),
        }
    })
}

fn proxy_v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 192.0.2.1 {port} 25\r\n").into_bytes()
}

/// Waits (bounded) for a line of `log` that contains every one of `parts`.
async fn log_line(log: &Path, parts: &[&str]) -> String {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    poll_for_async(Duration::from_secs(30), async || {
        read()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
    })
    .await
    .unwrap_or_else(|| panic!("no line with {parts:?} in {}:\n{}", log.display(), read()))
}

/// Greeting (given), EHLO, STARTTLS, EHLO, one message to alice tagged `tag`, QUIT.
async fn send_mail(addr: SocketAddr, header: &[u8], tag: &str) -> String {
    let mut plain = connect(addr).await;
    plain.send(header).await;
    let greeting = plain.reply().await;
    assert!(plain.cmd("EHLO client.example").await.contains("STARTTLS"));
    assert!(plain.cmd("STARTTLS").await.starts_with("220 "));
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut client = Client::new(tls);
    assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
    assert!(
        client
            .cmd("MAIL FROM:<bob@example.test>")
            .await
            .starts_with("250 ")
    );
    assert!(
        client
            .cmd("RCPT TO:<alice@example.test>")
            .await
            .starts_with("250 ")
    );
    assert!(client.cmd("DATA").await.starts_with("354 "));
    let body = format!("Subject: {tag}\r\nFrom: bob@example.test\r\n\r\n{tag}\r\n.");
    let queued = client.cmd(&body).await;
    assert!(queued.starts_with("250 "), "{queued}");
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    greeting
}

fn smtp_listener_with(upstream: SocketAddr, keys: &str) -> String {
    format!(
        "{{ name: mx, protocol: smtp, listen: \"127.0.0.1:0\", policy: auth_requires_tls, upstream: \"{upstream}\", proxy_protocol_from: [127.0.0.0/8], {keys} }}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn postfix_logs_the_real_client_sent_with_proxy_protocol() {
    let legacy = legacy_with_identity();
    let proxy = proxy(
        &[smtp_listener_with(
            legacy.smtp_proxied,
            "upstream_proxy_protocol: v1",
        )],
        "",
    )
    .await;
    let tag = unique("proxy-v1");
    let greeting = send_mail(proxy.addr("mx"), &proxy_v1("203.0.113.7", 51234), &tag).await;
    assert!(
        greeting.starts_with("220 legacy.example.test"),
        "{greeting}"
    );
    let log = &legacy.legacy.postfix_log;
    log_line(log, &["connect from unknown[203.0.113.7]"]).await;
    log_line(log, &["client=unknown[203.0.113.7]"]).await;
    let delivered = legacy.legacy.wait_for_delivery(&tag);
    let delivered = String::from_utf8_lossy(&delivered);
    assert!(
        delivered.contains("from client.example (unknown [203.0.113.7])"),
        "{delivered}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postfix_logs_the_real_client_sent_with_xclient_also_after_starttls() {
    let legacy = legacy_with_identity();
    let proxy = proxy(
        &[smtp_listener_with(legacy.legacy.smtp, "xclient: true")],
        "",
    )
    .await;
    let tag = unique("xclient");
    // After STARTTLS mailmoat sends RSET upstream; the XCLIENT identity stays.
    let greeting = send_mail(proxy.addr("mx"), &proxy_v1("203.0.113.8", 40000), &tag).await;
    assert!(
        greeting.starts_with("220 legacy.example.test"),
        "{greeting}"
    );
    let log = &legacy.legacy.postfix_log;
    log_line(log, &["client=unknown[203.0.113.8]"]).await;
    log_line(log, &["disconnect from unknown[203.0.113.8]"]).await;
    // The XCLIENT was accepted (a refusal would have been logged and the greeting kept).
    // This session's lines (other tests in this binary may log their own), once it ended.
    let client: SocketAddr = "203.0.113.8:40000".parse().unwrap();
    session_log_line(client, "session_end").await;
    assert!(
        !captured_logs()
            .lines()
            .any(|l| l.contains("xclient_unavailable") && l.contains("client=203.0.113.8:40000"))
    );
    let delivered = legacy.legacy.wait_for_delivery(&tag);
    let delivered = String::from_utf8_lossy(&delivered);
    assert!(
        delivered.contains("from client.example (unknown [203.0.113.8])"),
        "{delivered}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dovecot_logs_the_real_client_sent_with_proxy_protocol_v2_imap_and_v1_pop3() {
    let legacy = legacy_with_identity();
    let proxy = proxy(
        &[
            format!(
                "{{ name: imap, protocol: imap, listen: \"127.0.0.1:0\", upstream: \"{}\", proxy_protocol_from: [127.0.0.0/8], upstream_proxy_protocol: v2 }}",
                legacy.imap_proxied
            ),
            format!(
                "{{ name: pop3, protocol: pop3, listen: \"127.0.0.1:0\", upstream: \"{}\", proxy_protocol_from: [127.0.0.0/8], upstream_proxy_protocol: v1 }}",
                legacy.pop3_proxied
            ),
        ],
        "",
    )
    .await;

    // IMAP: STARTTLS, LOGIN, LOGOUT from 203.0.113.9.
    let mut plain = connect(proxy.addr("imap")).await;
    plain.send(&proxy_v1("203.0.113.9", 50001)).await;
    plain.lines_until("* OK").await;
    plain.send(b"a STARTTLS\r\n").await;
    plain.lines_until("a OK").await;
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut imap = Client::new(tls);
    imap.send(b"b LOGIN alice@example.test alice-secret-pw\r\n")
        .await;
    imap.lines_until("b OK").await;
    imap.send(b"c LOGOUT\r\n").await;
    imap.lines_until("c OK").await;

    // POP3: STLS, USER/PASS, QUIT from 203.0.113.10.
    let mut plain = connect(proxy.addr("pop3")).await;
    plain.send(&proxy_v1("203.0.113.10", 50002)).await;
    plain.lines_until("+OK").await;
    plain.send(b"STLS\r\n").await;
    plain.lines_until("+OK").await;
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut pop3 = Client::new(tls);
    pop3.send(b"USER alice@example.test\r\n").await;
    pop3.lines_until("+OK").await;
    pop3.send(b"PASS alice-secret-pw\r\n").await;
    pop3.lines_until("+OK").await;
    pop3.send(b"QUIT\r\n").await;
    pop3.lines_until("+OK").await;

    let log = &legacy.legacy.dovecot_log;
    log_line(
        log,
        &[
            "imap-login: Info: Login: user=<alice@example.test>",
            "rip=203.0.113.9,",
        ],
    )
    .await;
    log_line(
        log,
        &[
            "pop3-login: Info: Login: user=<alice@example.test>",
            "rip=203.0.113.10,",
        ],
    )
    .await;
}
