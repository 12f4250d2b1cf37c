//! SMTP through the proxy on loopback, against a scripted upstream that records every
//! byte: injection, smuggling, limits, upstream failures, implicit TLS, ALPN and SNI.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

// "\0alice@example.test\0alice-secret-pw"
const PLAIN_IR: &str = "AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=";

async fn mx_and_submission(upstream: &Upstream) -> Proxy {
    proxy(
        &[
            smtp_listener("mx", "starttls", "auth_requires_tls", upstream.addr),
            smtp_listener("submission", "starttls", "require_tls", upstream.addr),
            smtp_listener("smtps", "implicit", "require_tls", upstream.addr),
        ],
        "",
    )
    .await
}

#[tokio::test]
async fn starttls_command_injection_is_never_answered_and_never_forwarded() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let payloads = [
        "STARTTLS\r\nEHLO x\r\n".to_owned(),
        "STARTTLS\r\nRSET\r\n".to_owned(),
        format!("STARTTLS\r\nAUTH PLAIN {PLAIN_IR}\r\nMAIL FROM:<attacker@example.org>\r\n"),
    ];
    for listener in ["mx", "submission"] {
        for payload in &payloads {
            for cut in [Cut::OneWrite, Cut::ByteByByte, Cut::AtCrlf] {
                let before = upstream.commands().len();
                let mut client = connect(proxy.addr(listener)).await;
                assert!(client.reply().await.starts_with("220 scripted.upstream"));
                assert!(
                    client
                        .cmd("EHLO victim.example")
                        .await
                        .ends_with("250 STARTTLS\r\n")
                );
                client.send_cut(payload.as_bytes(), cut).await;
                assert_eq!(client.reply().await, "220 2.0.0 Ready to start TLS\r\n");
                // Whatever follows is the TLS engine's alert, never an SMTP reply.
                let rest = client.rest().await;
                assert!(
                    rest.is_empty() || rest[0] == 0x15,
                    "{listener} {cut:?} {payload:?}: got {:?}",
                    String::from_utf8_lossy(&rest)
                );
                upstream.wait_closed().await;
                let seen = upstream.commands()[before..].to_vec();
                assert_eq!(
                    seen,
                    vec!["EHLO victim.example".to_owned(), "RSET".to_owned()],
                    "{listener} {cut:?} {payload:?}"
                );
            }
        }
    }
    assert_no_secret_logged(&[PLAIN_IR, "alice-secret-pw"]);
}

#[tokio::test]
async fn a_full_starttls_session_hides_auth_until_tls_then_relays_it() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let mut plain = connect(proxy.addr("submission")).await;
    plain.reply().await;
    assert_eq!(
        plain.cmd("EHLO client.example").await,
        "250-scripted.upstream\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
    );
    assert_eq!(
        plain.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(
        plain.cmd("STARTTLS").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    let mut tls = Client::new(
        tls_connect(plain.into_inner(), "mail.example.test", &[b"smtp"])
            .await
            .unwrap(),
    );
    assert_eq!(
        tls.cmd("MAIL FROM:<a@example.test>").await,
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    assert_eq!(
        tls.cmd("EHLO client.example").await,
        "250-scripted.upstream\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
    );
    assert_eq!(
        tls.cmd("STARTTLS").await,
        "503 5.5.1 TLS already active\r\n"
    );
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(tls.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    upstream.wait_closed().await;
    assert_eq!(
        upstream.commands(),
        vec![
            "EHLO client.example".to_owned(),
            "RSET".to_owned(),
            "EHLO client.example".to_owned(),
            format!("AUTH PLAIN {PLAIN_IR}"),
            "QUIT".to_owned(),
        ]
    );
    assert_no_secret_logged(&[PLAIN_IR, "alice-secret-pw"]);
}

#[tokio::test]
async fn bare_newline_smuggling_never_ends_the_message_early_at_the_upstream() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let smuggled = [
        "\n.\nMAIL FROM:<spoof@bank.example>\n",
        "\r.\rMAIL FROM:<spoof@bank.example>\r",
        "\r\n.\nMAIL FROM:<spoof@bank.example>\r\n",
        "\n.\r\nMAIL FROM:<spoof@bank.example>\r\n",
    ];
    for (index, trick) in smuggled.iter().enumerate() {
        for cut in [Cut::OneWrite, Cut::ByteByByte] {
            let mut client = connect(proxy.addr("mx")).await;
            client.reply().await;
            client.cmd("EHLO client.example").await;
            assert_eq!(
                client.cmd("MAIL FROM:<a@example.test>").await,
                "250 2.0.0 Ok\r\n"
            );
            assert_eq!(
                client.cmd("RCPT TO:<b@example.test>").await,
                "250 2.0.0 Ok\r\n"
            );
            assert!(client.cmd("DATA").await.starts_with("354 "));
            let body = format!("Subject: t{index}\r\n\r\nbefore{trick}after\r\n.\r\n");
            client.send_cut(body.as_bytes(), cut).await;
            assert_eq!(client.reply().await, "250 2.0.0 Ok: queued\r\n");
            assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        }
    }
    upstream.wait_closed().await;
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.messages.len(), smuggled.len() * 2);
    for message in &recording.messages {
        let text = String::from_utf8_lossy(message);
        assert!(
            text.contains("\r\n..\r\nMAIL FROM:<spoof@bank.example>\r\nafter\r\n"),
            "{text:?}"
        );
    }
    assert!(!recording.commands.iter().any(|c| c.contains("spoof")));
    for (i, &b) in recording.raw.iter().enumerate() {
        if b == b'\n' {
            assert_eq!(recording.raw[i - 1], b'\r', "bare LF reached the upstream");
        }
        if b == b'\r' {
            assert_eq!(
                recording.raw.get(i + 1),
                Some(&b'\n'),
                "bare CR reached the upstream"
            );
        }
    }
}

/// BDAT is never forwarded and CHUNKING never offered (ARCHITECTURE.md §5, ARCHITECTURE.md): a
/// byte-counted chunk is framed by the upstream's chunk state, which mailmoat does not
/// model. The chunk is read and dropped, never taken for commands; DATA carries the
/// message instead.
#[tokio::test]
async fn bdat_never_reaches_the_upstream_and_its_chunk_is_never_commands() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let mut client = starttls_client(proxy.addr("submission")).await;
    client.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await;
    client.cmd("MAIL FROM:<a@example.test>").await;
    client.cmd("RCPT TO:<b@example.test>").await;
    let chunk = b"line one\r\n.\r\nQUIT\r\nbare\nend";
    client
        .send(&[format!("BDAT {} LAST\r\n", chunk.len()).as_bytes(), chunk].concat())
        .await;
    assert_eq!(
        client.reply().await,
        "502 5.5.1 Error: command not implemented\r\n"
    );
    assert_eq!(client.cmd("DATA").await.get(..4), Some("354 "));
    assert_eq!(
        client.cmd("line one\r\n..\r\nend\r\n.").await.get(..4),
        Some("250 ")
    );
    assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    let commands = upstream.commands();
    assert!(
        !commands.iter().any(|c| c.starts_with("BDAT")),
        "{commands:?}"
    );
    assert_eq!(
        commands.iter().filter(|c| *c == "QUIT").count(),
        1,
        "{commands:?}"
    );
    assert_eq!(
        upstream.recording.lock().unwrap().messages,
        vec![b"line one\r\n..\r\nend\r\n".to_vec()]
    );
    assert_no_secret_logged(&[PLAIN_IR, "alice-secret-pw"]);
}

#[tokio::test]
async fn a_client_that_vanishes_mid_data_delivers_nothing() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    // Plain TCP cut on the MX, and TLS cut without close_notify on submission.
    let mut client = connect(proxy.addr("mx")).await;
    client.reply().await;
    client.cmd("EHLO c").await;
    client.cmd("MAIL FROM:<a@example.test>").await;
    client.cmd("RCPT TO:<b@example.test>").await;
    client.cmd("DATA").await;
    client
        .send(b"Subject: partial\r\n\r\nhalf a message\r\n")
        .await;
    drop(client);

    let mut tls = starttls_client(proxy.addr("submission")).await;
    tls.cmd("MAIL FROM:<a@example.test>").await;
    tls.cmd("RCPT TO:<b@example.test>").await;
    tls.cmd("DATA").await;
    tls.send(b"Subject: partial\r\n\r\nhalf a message\r\n")
        .await;
    let (tcp, _) = tls.into_inner().into_inner();
    drop(tcp); // no close_notify

    wait_until_async(STEP, "the upstream to see both bodies cut", || {
        upstream.recording.lock().unwrap().aborted_bodies == 2
    })
    .await;
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.aborted_bodies, 2);
    assert!(recording.messages.is_empty());
}

#[tokio::test]
async fn a_100_kb_line_gets_an_error_while_other_sessions_carry_on() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let mut flooder = connect(proxy.addr("mx")).await;
    flooder.reply().await;
    let mut bystander = connect(proxy.addr("mx")).await;
    bystander.reply().await;
    // The write may fail once the proxy closes; the reply is what counts.
    let _ = flooder
        .stream
        .get_mut()
        .write_all(&vec![b'A'; 100_000])
        .await;
    assert_eq!(flooder.reply().await, "500 5.5.2 Error: line too long\r\n");
    assert!(flooder.rest().await.is_empty());
    assert!(
        bystander
            .cmd("EHLO still.here")
            .await
            .ends_with("250 STARTTLS\r\n")
    );
    assert_eq!(bystander.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert!(!upstream.commands().iter().any(|c| c.starts_with("AAAA")));
}

#[tokio::test]
async fn upstream_down_gets_421_on_both_kinds_of_listener() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(
        &[
            smtp_listener("down", "starttls", "require_tls", closed),
            smtp_listener("down-tls", "implicit", "require_tls", closed),
        ],
        "",
    )
    .await;
    let mut client = connect(proxy.addr("down")).await;
    assert_eq!(
        client.reply().await,
        "421 4.3.0 Service temporarily unavailable, try again later\r\n"
    );
    let tcp = tokio::net::TcpStream::connect(proxy.addr("down-tls"))
        .await
        .unwrap();
    let mut tls = Client::new(tls_connect(tcp, "mail.example.test", &[]).await.unwrap());
    assert_eq!(
        tls.reply().await,
        "421 4.3.0 Service temporarily unavailable, try again later\r\n"
    );
}

#[tokio::test]
async fn a_silent_upstream_times_out_with_421() {
    let upstream = scripted_upstream(Behaviour::Silent).await;
    let proxy = proxy(
        &[smtp_listener(
            "silent",
            "starttls",
            "require_tls",
            upstream.addr,
        )],
        "timeouts: { greeting: 300ms }\n",
    )
    .await;
    let mut client = traceable_connect(proxy.addr("silent")).await;
    assert_eq!(
        client.reply().await,
        "421 4.3.0 Service temporarily unavailable, closing connection\r\n"
    );
    session_log_line(
        client.local_addr(),
        "event=\"limit_exceeded\" limit=\"greeting_timeout\"",
    )
    .await;
}

#[tokio::test]
async fn a_helo_only_upstream_still_gets_starttls_offered() {
    let upstream = scripted_upstream(Behaviour::HeloOnly).await;
    let proxy = proxy(
        &[smtp_listener(
            "helo",
            "starttls",
            "require_tls",
            upstream.addr,
        )],
        "",
    )
    .await;
    let mut client = connect(proxy.addr("helo")).await;
    client.reply().await;
    assert_eq!(
        client.cmd("EHLO client.example").await,
        "250-scripted.upstream\r\n250 STARTTLS\r\n"
    );
    assert_eq!(
        client.cmd("STARTTLS").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
}

#[tokio::test]
async fn implicit_tls_serves_the_same_session_with_tls_from_the_start() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr("smtps"))
        .await
        .unwrap();
    let mut tls = Client::new(
        tls_connect(tcp, "mail.example.test", &[b"smtp"])
            .await
            .unwrap(),
    );
    assert_eq!(tls.reply().await, "220 scripted.upstream ESMTP\r\n");
    assert_eq!(
        tls.cmd("EHLO client.example").await,
        "250-scripted.upstream\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
    );
    assert_eq!(
        tls.cmd("STARTTLS").await,
        "503 5.5.1 TLS already active\r\n"
    );
    assert_eq!(
        tls.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_no_secret_logged(&[PLAIN_IR, "alice-secret-pw"]);
}

#[tokio::test]
async fn strict_alpn_refuses_foreign_protocols_and_accepts_none_or_smtp() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let addr = proxy.addr("smtps");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let err = tls_connect(tcp, "mail.example.test", &[b"http/1.1"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    for alpn in [
        &[][..],
        &[&b"smtp"[..]][..],
        &[&b"http/1.1"[..], &b"smtp"[..]][..],
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, "mail.example.test", alpn).await.unwrap();
        let expected: Option<&[u8]> = if alpn.is_empty() { None } else { Some(b"smtp") };
        assert_eq!(tls.get_ref().1.alpn_protocol(), expected);
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_no_sni_gets_the_first() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let addr = proxy.addr("smtps");
    for (name, expected) in [
        ("mail.example.test", &certs().default.2),
        ("other.example.test", &certs().other.2),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, name, &[]).await.unwrap();
        assert_eq!(&tls.get_ref().1.peer_certificates().unwrap()[0], expected);
    }
    // No SNI: an IP address as the name makes rustls send none.
    let mut config = (*tls_client_config(&[])).clone();
    config.enable_sni = false;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = within(connector.connect(
        rustls_pki_types::ServerName::try_from("mail.example.test").unwrap(),
        tcp,
    ))
    .await
    .unwrap();
    assert_eq!(
        &tls.get_ref().1.peer_certificates().unwrap()[0],
        &certs().default.2
    );
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_fails_the_handshake_and_others_carry_on() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let mut garbage = connect(proxy.addr("smtps")).await;
    garbage.send(b"EHLO not-tls\r\n\r\n\r\n").await;
    let rest = garbage.rest().await;
    assert!(rest.is_empty() || rest[0] == 0x15, "{rest:?}");
    let tcp = tokio::net::TcpStream::connect(proxy.addr("smtps"))
        .await
        .unwrap();
    let mut tls = Client::new(tls_connect(tcp, "mail.example.test", &[]).await.unwrap());
    assert_eq!(tls.reply().await, "220 scripted.upstream ESMTP\r\n");
}

#[tokio::test]
async fn a_unix_socket_upstream_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smtp.sock");
    let recording = scripted_unix_upstream(&path).await;
    let proxy = proxy(
        &[format!(
            "{{ name: unix, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"unix:{}\" }}",
            path.display()
        )],
        "",
    )
    .await;
    let mut client = starttls_client(proxy.addr("unix")).await;
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert_eq!(
        recording.lock().unwrap().commands,
        ["EHLO client.example", "RSET", "EHLO client.example", "NOOP"]
    );
}

async fn handshake_with(
    addr: std::net::SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs().ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("mail.example.test").unwrap();
    let tls = within(connector.connect(name, tcp)).await?;
    let mut client = Client::new(tls);
    Ok(client.reply().await)
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_and_min_tls_version_1_3_refuses_1_2() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let greeting = handshake_with(proxy.addr("smtps"), version).await.unwrap();
        assert_eq!(greeting, "220 scripted.upstream ESMTP\r\n");
    }
    let yaml = config_yaml(
        Certificates::Default,
        &[smtp_listener(
            "strict",
            "implicit",
            "require_tls",
            upstream.addr,
        )],
        "",
    )
    .replacen("tls:\n", "tls:\n  min_tls_version: \"1.3\"\n", 1);
    let strict = Proxy::start(&yaml).await;
    let addr = strict.addr("strict");
    assert!(handshake_with(addr, &rustls::version::TLS12).await.is_err());
    assert!(handshake_with(addr, &rustls::version::TLS13).await.is_ok());
}

#[tokio::test]
async fn a_client_that_never_starts_its_handshake_is_cut_at_the_deadline() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = proxy(
        &[smtp_listener(
            "smtps",
            "implicit",
            "require_tls",
            upstream.addr,
        )],
        "timeouts: { tls_handshake: 300ms }\n",
    )
    .await;
    let mut silent = traceable_connect(proxy.addr("smtps")).await;
    let client = silent.local_addr();
    // Closed by the proxy's deadline: `rest` fails the test if the close never comes.
    assert!(silent.rest().await.is_empty());
    session_log_line(
        client,
        "event=\"limit_exceeded\" limit=\"handshake_timeout\"",
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr("smtps"))
        .await
        .unwrap();
    let mut tls = Client::new(tls_connect(tcp, "mail.example.test", &[]).await.unwrap());
    assert_eq!(tls.reply().await, "220 scripted.upstream ESMTP\r\n");
}

#[tokio::test]
async fn a_client_that_pipelines_and_half_closes_gets_every_reply() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = mx_and_submission(&upstream).await;
    let mut client = connect(proxy.addr("mx")).await;
    client.reply().await;
    client.cmd("EHLO c").await;
    client
        .send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        .await;
    assert_eq!(client.reply().await, "250 2.0.0 Ok\r\n");
    assert_eq!(client.reply().await, "250 2.0.0 Ok\r\n");
    assert!(client.reply().await.starts_with("354 "));
    client
        .send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    client.stream.get_mut().shutdown().await.unwrap();
    assert_eq!(client.reply().await, "250 2.0.0 Ok: queued\r\n");
    assert_eq!(client.reply().await, "221 2.0.0 Bye\r\n");
    assert_eq!(upstream.recording.lock().unwrap().messages.len(), 1);
}

/// A connection from `source` (a loopback address of its own) to `addr`.
async fn connect_from(source: &str, addr: std::net::SocketAddr) -> Client<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    Client::new(within(socket.connect(addr)).await.unwrap())
}

#[tokio::test]
async fn an_exempt_device_is_relayed_unchanged_and_counted_while_others_are_not() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let listener = smtp_listener("sub", "starttls", "require_tls", upstream.addr).replace(
        " }",
        ", exempt_networks: [127.0.0.2/32], source_address: 127.0.0.5 }",
    );
    let proxy = proxy(&[listener], "").await;
    let addr = proxy.addr("sub");

    // The printer at 127.0.0.2 talks to the upstream itself: its own greeting and EHLO
    // unchanged, and a plaintext AUTH that reaches it.
    let mut device = connect_from("127.0.0.2", addr).await;
    assert_eq!(device.reply().await, "220 scripted.upstream ESMTP\r\n");
    let ehlo = device.cmd("EHLO printer.example").await;
    assert_eq!(
        ehlo,
        "250-scripted.upstream\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n\
         250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-XCLIENT ADDR NAME\r\n250 8BITMIME\r\n"
    );
    assert_eq!(
        device.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert!(
        upstream
            .commands()
            .contains(&format!("AUTH PLAIN {PLAIN_IR}"))
    );

    // Anyone else on the same listener gets the policy.
    let mut other = connect_from("127.0.0.3", addr).await;
    assert_eq!(other.reply().await, "220 scripted.upstream ESMTP\r\n");
    assert!(
        other
            .cmd("EHLO c.example")
            .await
            .contains("250 STARTTLS\r\n")
    );
    assert_eq!(
        other.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    let logs = captured_logs();
    let exempt: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("event=\"exempt_plaintext_session\""))
        .collect();
    assert_eq!(exempt.len(), 1, "{logs}");
    assert!(exempt[0].contains("client=127.0.0.2:"), "{}", exempt[0]);
    let metrics = mailmoat::metrics::global()
        .render(mailmoat::metrics::Format::Prometheus)
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            == "mailmoat_security_events_total{listener=\"sub\",event=\"exempt_plaintext_session\"} 1"),
        "{metrics}"
    );
    assert_no_secret_logged(&[PLAIN_IR, "alice-secret-pw"]);
}
