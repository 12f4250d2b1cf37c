//! Client identity on loopback (ARCHITECTURE.md §7): PROXY headers from a trusted balancer, the
//! header mailmoat sends the upstream, XCLIENT, `source_address`. A recording upstream
//! keeps the exact bytes of every header it received and the address each connection
//! came from.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// An SMTP upstream that first reads a PROXY header if `header` (v1: one CRLF line; v2:
/// 16 bytes and the length they announce), and offers XCLIENT if `xclient`, answering it
/// with a new greeting as Postfix does.
async fn recorder(header: bool, xclient: bool) -> Upstream {
    upstream::listen(move |stream, rec| serve(stream, header, xclient, rec)).await
}

async fn serve(stream: TcpStream, header: bool, xclient: bool, seen: Arc<Mutex<Recording>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    if header {
        let mut bytes = vec![0u8; 16];
        if read.read_exact(&mut bytes).await.is_err() {
            return;
        }
        if bytes.starts_with(V2_SIGNATURE) {
            let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
            let mut rest = vec![0u8; len];
            if read.read_exact(&mut rest).await.is_err() {
                return;
            }
            bytes.extend_from_slice(&rest);
        } else {
            let mut rest = Vec::new();
            if read.read_until(b'\n', &mut rest).await.is_err() {
                return;
            }
            bytes.extend_from_slice(&rest);
        }
        seen.lock().unwrap().headers.push(bytes);
    }
    let _ = write.write_all(b"220 upstream ESMTP\r\n").await;
    let mut line = Vec::new();
    while let Some(command) = upstream::read_line(&mut read, &mut line, &seen).await {
        let verb = command.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" if xclient => {
                "250-upstream\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n"
            }
            "EHLO" => "250-upstream\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "XCLIENT" => "220 upstream ESMTP after xclient\r\n",
            "QUIT" => {
                let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => "250 2.0.0 Ok\r\n",
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn listener(upstream: SocketAddr, keys: &str) -> String {
    format!(
        "{{ name: id, protocol: smtp, listen: \"127.0.0.1:0\", policy: auth_requires_tls, upstream: \"{upstream}\", {keys} }}"
    )
}

/// Connects, sends `header`, and runs greeting, EHLO, QUIT; returns the greeting.
/// Runs a session behind `header`, from a loopback address of its own (the `via` of its
/// log lines); returns the greeting and that address.
async fn session_through(addr: SocketAddr, header: &[u8]) -> (String, SocketAddr) {
    let mut client = traceable_connect(addr).await;
    let via = client.local_addr();
    client.send(header).await;
    let greeting = client.reply().await;
    assert!(
        client.cmd("EHLO client.example").await.starts_with("250-"),
        "EHLO"
    );
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    (greeting, via)
}

fn v2_header(client: [u8; 4], client_port: u16, destination: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    header.extend_from_slice(&client);
    header.extend_from_slice(&destination);
    header.extend_from_slice(&client_port.to_be_bytes());
    header.extend_from_slice(&port.to_be_bytes());
    header
}

#[tokio::test]
async fn inbound_v1_from_a_trusted_network_reaches_the_upstream_as_the_real_client() {
    let upstream = recorder(true, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8], upstream_proxy_protocol: v1",
        )],
        "",
    )
    .await;
    let (greeting, via) = session_through(
        proxy.addr("id"),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n",
    )
    .await;
    assert_eq!(greeting, "220 upstream ESMTP\r\n");
    assert_eq!(
        upstream.headers(),
        [b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n".to_vec()]
    );
    // The header is not a command: the upstream's first command is the client's EHLO.
    assert_eq!(upstream.commands(), ["EHLO client.example", "QUIT"]);
    // Other tests' sessions name the same client: this one is told apart by its `via`.
    let logs = captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("client=203.0.113.7:51234") && l.contains(&format!("via={via}"))),
        "no session span with the real client and via={via}:\n{logs}"
    );
}

#[tokio::test]
async fn inbound_v2_from_a_trusted_network_goes_upstream_as_v2() {
    let upstream = recorder(true, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8], upstream_proxy_protocol: v2",
        )],
        "",
    )
    .await;
    let header = v2_header([203, 0, 113, 9], 40001, [192, 0, 2, 1], 587);
    session_through(proxy.addr("id"), &header).await;
    assert_eq!(upstream.headers(), [header]);
}

#[tokio::test]
async fn an_untrusted_peers_proxy_line_is_an_unknown_command_and_the_peer_goes_upstream() {
    let upstream = recorder(true, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [192.0.2.0/24], upstream_proxy_protocol: v1",
        )],
        "",
    )
    .await;
    let mut client = connect(proxy.addr("id")).await;
    let local = client.stream.get_ref().local_addr().unwrap();
    assert_eq!(client.reply().await, "220 upstream ESMTP\r\n");
    assert_eq!(
        client
            .cmd("PROXY TCP4 203.0.113.7 192.0.2.1 51234 25")
            .await,
        "500 5.5.2 Error: command not recognized\r\n"
    );
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    assert_eq!(
        upstream.headers(),
        [format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            local.port(),
            proxy.addr("id").port()
        )
        .into_bytes()]
    );
    assert_eq!(upstream.commands(), ["QUIT"]);
}

#[tokio::test]
async fn bad_headers_close_their_connection_while_another_session_completes() {
    let upstream = recorder(false, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8]",
        )],
        "timeouts: { tls_handshake: 500ms }\n",
    )
    .await;
    let addr = proxy.addr("id");
    // Slow: a header that never completes.
    let mut slow = traceable_connect(addr).await;
    slow.send(b"PROXY TCP4 203.0.113.").await;
    // Malformed: a client that does not know it is behind a balancer.
    let mut malformed = traceable_connect(addr).await;
    malformed.send(b"EHLO client.example\r\n").await;
    // Oversized: a v2 header announcing 65535 bytes.
    let mut oversized = traceable_connect(addr).await;
    oversized
        .send(&[V2_SIGNATURE, &[0x21, 0x11, 0xff, 0xff]].concat())
        .await;
    // A v1 line past 107 bytes.
    let mut long = traceable_connect(addr).await;
    long.send(format!("PROXY TCP4 {}", "1".repeat(120)).as_bytes())
        .await;

    let (greeting, _) = session_through(addr, b"PROXY TCP4 198.51.100.1 192.0.2.1 1 25\r\n").await;
    assert_eq!(greeting, "220 upstream ESMTP\r\n");

    for (name, client, reason) in [
        ("malformed", &mut malformed, "missing"),
        ("oversized", &mut oversized, "too_long"),
        ("long", &mut long, "too_long"),
        ("slow", &mut slow, "timeout"),
    ] {
        assert_eq!(client.rest().await, b"", "{name}: closed without a word");
        // Each connection's own event (found by its address), with its own reason.
        let event = session_log_line(client.local_addr(), "event=\"proxy_protocol_error\"").await;
        assert!(
            event.contains(&format!("reason=\"{reason}\"")),
            "{name}: {event}"
        );
    }
    // Only the good session reached the upstream.
    assert_eq!(upstream.peers().len(), 1);
}

#[tokio::test]
async fn clients_behind_a_balancer_are_counted_by_their_own_address() {
    let upstream = recorder(false, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8]",
        )],
        "limits: { max_connections_per_client: 1 }\n",
    )
    .await;
    let addr = proxy.addr("id");
    // Two clients through the same balancer address: both served.
    let mut first = connect(addr).await;
    first
        .send(b"PROXY TCP4 203.0.113.1 192.0.2.1 1000 25\r\n")
        .await;
    assert_eq!(first.reply().await, "220 upstream ESMTP\r\n");
    let mut second = connect(addr).await;
    second
        .send(b"PROXY TCP4 203.0.113.2 192.0.2.1 1000 25\r\n")
        .await;
    assert_eq!(second.reply().await, "220 upstream ESMTP\r\n");
    // The first client again: over its own limit.
    let mut again = connect(addr).await;
    again
        .send(b"PROXY TCP4 203.0.113.1 192.0.2.1 1001 25\r\n")
        .await;
    assert_eq!(
        again.reply().await,
        "421 4.3.2 Too many connections, try again later\r\n"
    );
}

#[tokio::test]
async fn xclient_tells_the_upstream_the_real_client_invisibly() {
    let upstream = recorder(false, true).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8], xclient: true",
        )],
        "",
    )
    .await;
    let mut client = connect(proxy.addr("id")).await;
    client
        .send(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n")
        .await;
    assert_eq!(client.reply().await, "220 upstream ESMTP after xclient\r\n");
    let ehlo = client.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("XCLIENT"), "{ehlo}");
    assert!(ehlo.ends_with("250 STARTTLS\r\n"), "{ehlo}");
    // A client's own XCLIENT is still refused.
    assert_eq!(
        client.cmd("XCLIENT ADDR=192.0.2.66").await,
        "550 5.7.0 Error: insufficient authorization\r\n"
    );
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    assert_eq!(
        upstream.commands(),
        [
            "EHLO localhost",
            "XCLIENT ADDR=203.0.113.7 PORT=51234 NAME=[UNAVAILABLE] DESTADDR=192.0.2.1 DESTPORT=25",
            "EHLO client.example",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn xclient_not_offered_refuses_the_session_rather_than_run_it_as_mailmoat() {
    let upstream = recorder(false, false).await;
    let proxy = proxy(&[listener(upstream.addr, "xclient: true")], "").await;
    let mut client = traceable_connect(proxy.addr("id")).await;
    assert_eq!(
        String::from_utf8(client.rest().await).unwrap(),
        "421 4.3.0 Service temporarily unavailable, closing connection\r\n"
    );
    // Nothing of the client's ever reached the upstream.
    assert_eq!(upstream.commands(), ["EHLO localhost"]);
    session_log_line(
        client.local_addr(),
        "event=\"xclient_unavailable\" reason=\"not_announced\"",
    )
    .await;
}

#[tokio::test]
async fn source_address_is_the_upstream_connections_local_address() {
    let upstream = recorder(false, false).await;
    let proxy = proxy(&[listener(upstream.addr, "source_address: 127.0.0.2")], "").await;
    session_through(proxy.addr("id"), b"").await;
    let peers = upstream.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip().to_string(), "127.0.0.2");
}

#[tokio::test]
async fn on_an_implicit_tls_listener_the_header_comes_before_the_handshake() {
    let upstream = recorder(true, false).await;
    let proxy = proxy(
        &[format!(
            "{{ name: smtps, protocol: smtp, listen: \"127.0.0.1:0\", tls: implicit, upstream: \"{}\", proxy_protocol_from: [127.0.0.0/8], upstream_proxy_protocol: v1 }}",
            upstream.addr
        )],
        "",
    )
    .await;
    let mut tcp = within(TcpStream::connect(proxy.addr("smtps")))
        .await
        .unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 465\r\n")
        .await
        .unwrap();
    let tls = tls_connect(tcp, "mail.example.test", &[]).await.unwrap();
    let mut client = Client::new(tls);
    assert_eq!(client.reply().await, "220 upstream ESMTP\r\n");
    assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
    assert!(client.cmd("QUIT").await.starts_with("221 "));
    assert_eq!(
        upstream.headers(),
        [b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 465\r\n".to_vec()]
    );
}

#[tokio::test]
async fn a_health_check_that_names_no_client_is_never_exempt() {
    let upstream = recorder(false, false).await;
    let proxy = proxy(
        &[listener(
            upstream.addr,
            "proxy_protocol_from: [127.0.0.0/8], exempt_networks: [127.0.0.0/8], \
             source_address: 127.0.0.5",
        )],
        "",
    )
    .await;
    // PROXY v2 LOCAL (a balancer's own health check): no address.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut health_check = traceable_connect(proxy.addr("id")).await;
    health_check.send(&local).await;
    assert!(health_check.reply().await.starts_with("220 "));
    let ehlo = health_check.cmd("EHLO check.example").await;
    assert!(ehlo.ends_with("250 STARTTLS\r\n"), "not the policy: {ehlo}");
    // A client the header names inside the exempt network is exempt: relayed as is.
    let mut named = traceable_connect(proxy.addr("id")).await;
    named
        .send(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n")
        .await;
    assert!(named.reply().await.starts_with("220 "));
    let ehlo = named.cmd("EHLO device.example").await;
    assert!(!ehlo.contains("STARTTLS"), "not relayed unchanged: {ehlo}");
    // The event of this session (the client the header names, via this connection), and
    // none for the health check's.
    let via = format!("via={}", named.local_addr());
    let logs = captured_logs();
    let exempt = |line: &&str| line.contains("event=\"exempt_plaintext_session\"");
    assert!(
        logs.lines()
            .filter(exempt)
            .any(|l| l.contains("client=127.0.0.9:40000") && l.contains(&via)),
        "no exempt_plaintext_session for client=127.0.0.9:40000 {via}:\n{logs}"
    );
    let health_check = format!("via={}", health_check.local_addr());
    assert!(
        !logs
            .lines()
            .filter(exempt)
            .any(|l| l.contains(&health_check))
    );
}
