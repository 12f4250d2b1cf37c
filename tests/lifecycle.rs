//! SIGHUP reload, SIGTERM drain and systemd notification, on the real binary (ARCHITECTURE.md §8).

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncReadExt;

/// The certificate the proxy presented on a TLS client stream.
fn peer_certificate<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Vec<u8> {
    let (_, connection) = tls.get_ref();
    connection.peer_certificates().unwrap()[0].to_vec()
}

/// Connects, EHLO, STARTTLS, handshake for `name`: the TLS client, or the handshake error.
async fn starttls_as(
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<Client<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
    let mut plain = connect(addr).await;
    assert!(plain.reply().await.starts_with("220 "));
    assert!(plain.cmd("EHLO client.example").await.contains("STARTTLS"));
    assert_eq!(
        plain.cmd("STARTTLS").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    let tls = tls_connect(plain.into_inner(), name, &[]).await?;
    Ok(Client::new(tls))
}

/// A plaintext session on an MX listener, inside DATA.
async fn in_data(addr: SocketAddr) -> Client<tokio::net::TcpStream> {
    let mut client = connect(addr).await;
    assert!(client.reply().await.starts_with("220 "));
    assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
    assert!(
        client
            .cmd("MAIL FROM:<a@example.test>")
            .await
            .starts_with("250")
    );
    assert!(
        client
            .cmd("RCPT TO:<b@example.test>")
            .await
            .starts_with("250")
    );
    assert!(client.cmd("DATA").await.starts_with("354"));
    client
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn send_message(
    client: &mut Client<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>,
    tag: &str,
) {
    assert!(
        client
            .cmd("MAIL FROM:<a@example.test>")
            .await
            .starts_with("250")
    );
    assert!(
        client
            .cmd("RCPT TO:<b@example.test>")
            .await
            .starts_with("250")
    );
    assert!(client.cmd("DATA").await.starts_with("354"));
    let reply = client
        .cmd(&format!("Subject: {tag}\r\n\r\nbody of {tag}\r\n."))
        .await;
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test]
async fn sighup_serves_the_new_certificate_to_the_next_client_and_keeps_open_sessions() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start(&[("sub", "smtp", "starttls", "require_tls", upstream.addr)]);
    let listener = addr(mailmoat.port("sub"));
    let certs = certs();

    let mut before = starttls_as(listener, "mail.example.test").await.unwrap();
    assert_eq!(
        peer_certificate(before.stream.get_ref()),
        certs.default.2.to_vec()
    );
    assert!(before.cmd("EHLO client.example").await.starts_with("250-"));
    // Not yet: the only certificate is mail.example.test.
    assert!(starttls_as(listener, "other.example.test").await.is_err());

    let yaml = std::fs::read_to_string(&mailmoat.config).unwrap();
    let swapped = yaml
        .replace(
            &certs.default.0.display().to_string(),
            &certs.other.0.display().to_string(),
        )
        .replace(
            &certs.default.1.display().to_string(),
            &certs.other.1.display().to_string(),
        );
    assert_ne!(yaml, swapped);
    std::fs::write(&mailmoat.config, swapped).unwrap();
    mailmoat.signal("HUP");
    let line = mailmoat.wait_for_log("event=\"config_reloaded\"", 1);
    assert!(line.contains("updated=[\"sub\"]"), "{line}");

    let after = starttls_as(listener, "other.example.test").await.unwrap();
    assert_eq!(
        peer_certificate(after.stream.get_ref()),
        certs.other.2.to_vec()
    );

    // The session opened before the reload carries on, on its old certificate.
    send_message(&mut before, "across-reload").await;
    assert_eq!(before.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    let recording = upstream.recording.lock().unwrap();
    assert!(
        recording
            .messages
            .iter()
            .any(|m| m.windows(13).any(|w| w == b"across-reload")),
        "message not delivered"
    );
}

#[tokio::test]
async fn a_broken_config_on_sighup_is_refused_and_the_old_one_keeps_serving() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start(&[("sub", "smtp", "starttls", "require_tls", upstream.addr)]);
    let listener = addr(mailmoat.port("sub"));
    let good = std::fs::read_to_string(&mailmoat.config).unwrap();

    // Three kinds of broken: invalid YAML keys, a certificate that does not exist, and a
    // port that cannot be bound. Each is refused with its reason.
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broken = [
        (
            good.replace("listeners:", "frobnicate: 1\nlisteners:"),
            "unknown field `frobnicate`",
        ),
        (
            good.replace("mail.example.test.pem", "missing.pem"),
            "missing.pem",
        ),
        (
            format!(
                "{good}  - {{ name: taken, protocol: smtp, listen: \"{}\", upstream: \"{}\" }}\n",
                occupied.local_addr().unwrap(),
                upstream.addr
            ),
            "cannot listen on",
        ),
    ];
    for (attempt, (config, reason)) in broken.iter().enumerate() {
        std::fs::write(&mailmoat.config, config).unwrap();
        mailmoat.signal("HUP");
        let line = mailmoat.wait_for_log("event=\"config_reload_failed\"", attempt + 1);
        assert!(line.contains(reason), "{line}");
        // Still the old configuration: the same certificate, the same listener.
        let mut client = starttls_as(listener, "mail.example.test").await.unwrap();
        assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
        send_message(&mut client, &format!("after-broken-{attempt}")).await;
    }
    assert!(!mailmoat.log_text().contains("config_reloaded"));
}

#[tokio::test]
async fn sighup_adds_and_removes_listeners() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start(&[("old", "smtp", "starttls", "require_tls", upstream.addr)]);
    let old = addr(mailmoat.port("old"));
    let mut open_on_old = connect(old).await;
    assert!(open_on_old.reply().await.starts_with("220 "));

    let new_port = free_port();
    let yaml = std::fs::read_to_string(&mailmoat.config).unwrap();
    let (head, _) = yaml.split_once("listeners:\n").unwrap();
    std::fs::write(
        &mailmoat.config,
        format!(
            "{head}listeners:\n  - {{ name: new, protocol: smtp, listen: \"127.0.0.1:{new_port}\", upstream: \"{}\" }}\n",
            upstream.addr
        ),
    )
    .unwrap();
    mailmoat.signal("HUP");
    let line = mailmoat.wait_for_log("event=\"config_reloaded\"", 1);
    assert!(
        line.contains("added=[\"new\"]") && line.contains("removed=[\"old\"]"),
        "{line}"
    );

    let mut client = connect(addr(new_port)).await;
    assert!(client.reply().await.starts_with("220 "));
    assert!(
        client
            .cmd("EHLO client.example")
            .await
            .contains("250 STARTTLS")
    );
    let refused = tokio::net::TcpStream::connect(old).await;
    assert!(refused.is_err(), "the removed listener still accepts");
    // The session accepted on the removed listener is untouched.
    assert!(
        open_on_old
            .cmd("EHLO client.example")
            .await
            .contains("STARTTLS")
    );
    assert_eq!(open_on_old.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
}

#[tokio::test]
async fn sigterm_gives_idle_sessions_their_goodbye_and_exits() {
    let legacy = legacy();
    let smtp = scripted_upstream(Behaviour::Esmtp).await;
    let mut mailmoat = Mailmoat::start(&[
        ("sub", "smtp", "starttls", "require_tls", smtp.addr),
        ("imap", "imap", "starttls", "require_tls", legacy.imap),
        ("pop3", "pop3", "starttls", "require_tls", legacy.pop3),
        ("smtps", "smtp", "implicit", "require_tls", smtp.addr),
    ]);
    let mut smtp_client = connect(addr(mailmoat.port("sub"))).await;
    assert!(smtp_client.reply().await.starts_with("220 "));
    assert!(
        smtp_client
            .cmd("EHLO client.example")
            .await
            .starts_with("250-")
    );
    let mut imap_client = connect(addr(mailmoat.port("imap"))).await;
    assert!(imap_client.line().await.starts_with("* OK"));
    let mut pop3_client = connect(addr(mailmoat.port("pop3"))).await;
    assert!(pop3_client.line().await.starts_with("+OK"));
    // Over TLS too: the goodbye goes through the TLS stream.
    let tcp = tokio::net::TcpStream::connect(addr(mailmoat.port("smtps")))
        .await
        .unwrap();
    let mut tls_client = Client::new(tls_connect(tcp, "mail.example.test", &[]).await.unwrap());
    assert!(tls_client.reply().await.starts_with("220 "));
    assert!(
        tls_client
            .cmd("EHLO client.example")
            .await
            .starts_with("250-")
    );

    mailmoat.signal("TERM");
    assert_eq!(
        String::from_utf8(smtp_client.rest().await).unwrap(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert_eq!(
        String::from_utf8(imap_client.rest().await).unwrap(),
        "* BYE [UNAVAILABLE] Server shutting down\r\n"
    );
    assert_eq!(
        String::from_utf8(pop3_client.rest().await).unwrap(),
        "-ERR [SYS/TEMP] Server shutting down\r\n"
    );
    assert_eq!(
        String::from_utf8(tls_client.rest().await).unwrap(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert!(mailmoat.wait_exit().success());
    // The upstream was told too: nothing was in flight.
    if poll_for_async(STEP, async || {
        (smtp.commands().iter().filter(|c| *c == "QUIT").count() >= 2).then_some(())
    })
    .await
    .is_none()
    {
        panic!("upstream commands: {:?}", smtp.commands());
    }
}

#[tokio::test]
async fn sigterm_lets_a_message_in_data_finish_then_says_goodbye() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mut mailmoat =
        Mailmoat::start(&[("mx", "smtp", "starttls", "auth_requires_tls", upstream.addr)]);
    let listener = addr(mailmoat.port("mx"));
    let mut client = in_data(listener).await;
    client
        .send(b"Subject: in-flight\r\n\r\nfirst half\r\n")
        .await;

    mailmoat.signal("TERM");
    mailmoat.wait_for_log("draining", 1);
    // No new connections once draining...
    assert!(tokio::net::TcpStream::connect(listener).await.is_err());
    // ...but the message in flight completes, and only then comes the goodbye.
    client.send(b"second half\r\n.\r\n").await;
    assert!(client.reply().await.starts_with("250 "));
    assert_eq!(
        String::from_utf8(client.rest().await).unwrap(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert!(mailmoat.wait_exit().success());
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.messages.len(), 1);
    assert!(String::from_utf8_lossy(&recording.messages[0]).contains("first half\r\nsecond half"));
}

#[tokio::test]
async fn after_the_grace_period_a_stuck_session_is_cut_and_nothing_is_delivered() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mut mailmoat = Mailmoat::start_with(
        &[("mx", "smtp", "starttls", "auth_requires_tls", upstream.addr)],
        "timeouts: { shutdown_grace: 1s }\n",
    );
    let mut client = in_data(addr(mailmoat.port("mx"))).await;
    client.send(b"Subject: never finished\r\n\r\n").await;

    mailmoat.signal("TERM");
    assert!(mailmoat.wait_exit().success());
    mailmoat.wait_for_log("grace period over", 1);
    // Cut without an end-of-data: the upstream saw an aborted body, no message.
    let mut rest = Vec::new();
    let _ = within(client.stream.read_to_end(&mut rest)).await;
    assert_eq!(rest, b"");
    wait_until_async(STEP, "the upstream to see the cut", || {
        upstream.recording.lock().unwrap().aborted_bodies > 0
    })
    .await;
    assert!(upstream.recording.lock().unwrap().messages.is_empty());
}

#[tokio::test]
async fn systemd_is_told_ready_reloading_and_stopping() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(STEP)).unwrap();
    let receive = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut mailmoat = Mailmoat::start_with_env(
        &[("sub", "smtp", "starttls", "require_tls", upstream.addr)],
        "",
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    assert_eq!(receive(), "READY=1\n");
    mailmoat.signal("HUP");
    let reloading = receive();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(receive(), "READY=1\n");
    mailmoat.signal("TERM");
    assert_eq!(receive(), "STOPPING=1\n");
    assert!(mailmoat.wait_exit().success());
}

#[tokio::test]
async fn a_second_sigterm_ends_the_grace_period_at_once() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    // A grace period longer than the test's step deadline: only the second signal can
    // make the process exit in time.
    let mut mailmoat = Mailmoat::start_with(
        &[("mx", "smtp", "starttls", "auth_requires_tls", upstream.addr)],
        "timeouts: { shutdown_grace: 10m }\n",
    );
    let _client = in_data(addr(mailmoat.port("mx"))).await;
    mailmoat.signal("TERM");
    mailmoat.wait_for_log("draining", 1);
    assert!(mailmoat.is_running());
    mailmoat.signal("TERM");
    assert!(mailmoat.wait_exit().success());
    mailmoat.wait_for_log("second signal: exiting without waiting", 1);
}

#[tokio::test]
async fn reuse_port_lets_two_processes_share_a_listener() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let port = free_port();
    let certs = certs();
    let dir = tempfile::tempdir().unwrap();
    let spawn = |name: &str, reuse: bool| {
        let config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  - {{ name: {name}, protocol: smtp, listen: \"127.0.0.1:{port}\", upstream: \"{}\", reuse_port: {reuse} }}\n",
                certs.default.0.display(),
                certs.default.1.display(),
                upstream.addr
            ),
        )
        .unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["run", "-c"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    };
    let listening = |log: &std::path::Path| {
        wait_until(STEP, format_args!("listening in {}", log.display()), || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("listening")
        })
    };
    let (mut first, first_log) = spawn("first", true);
    listening(&first_log);
    let (mut second, second_log) = spawn("second", true);
    listening(&second_log);
    // Both listen on the one port; without reuse_port a third cannot bind it.
    let (mut third, third_log) = spawn("third", false);
    assert_eq!(common::wait_exit(&mut third, STEP).code(), Some(64));
    let stderr = std::fs::read_to_string(&third_log).unwrap();
    assert!(stderr.contains("cannot listen on 127.0.0.1"), "{stderr}");
    for _ in 0..4 {
        let mut client = connect(addr(port)).await;
        assert_eq!(client.reply().await, "220 scripted.upstream ESMTP\r\n");
    }
    assert!(first.try_wait().unwrap().is_none() && second.try_wait().unwrap().is_none());
    let _ = first.kill();
    let _ = second.kill();
    let _ = first.wait();
    let _ = second.wait();
}
