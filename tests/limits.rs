//! Every bound and every per-phase deadline, over real sockets: the exact goodbye, and a
//! well-behaved session that completes meanwhile.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A complete plaintext mail transaction on an MX listener.
async fn well_behaved(addr: SocketAddr) {
    let mut client = connect(addr).await;
    assert!(client.reply().await.starts_with("220 "));
    transaction(client).await;
}

/// A connection to `addr` that the proxy greets with 220 (not a 421 for a place not yet
/// free), once one is (bounded).
async fn admitted(addr: SocketAddr) -> Client<tokio::net::TcpStream> {
    wait_for_async(
        STEP,
        format_args!("{addr} to admit a connection"),
        async || {
            let mut client = connect(addr).await;
            client.reply().await.starts_with("220 ").then_some(client)
        },
    )
    .await
}

/// [`well_behaved`] after the greeting.
async fn transaction(mut client: Client<tokio::net::TcpStream>) {
    assert!(
        client
            .cmd("EHLO good.example")
            .await
            .ends_with("250 STARTTLS\r\n")
    );
    assert_eq!(
        client.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.0.0 Ok\r\n"
    );
    assert_eq!(
        client.cmd("RCPT TO:<b@example.test>").await,
        "250 2.0.0 Ok\r\n"
    );
    assert!(client.cmd("DATA").await.starts_with("354 "));
    assert_eq!(
        client.cmd("Subject: fine\r\n\r\nbody\r\n.").await,
        "250 2.0.0 Ok: queued\r\n"
    );
    assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
}

async fn smtp_proxy(upstream: &Upstream, extra: &str) -> Proxy {
    proxy(
        &[
            smtp_listener("mx", "starttls", "auth_requires_tls", upstream.addr),
            smtp_listener("submission", "starttls", "require_tls", upstream.addr),
        ],
        extra,
    )
    .await
}

#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = smtp_proxy(&upstream, "limits: { max_connections_per_client: 2 }\n").await;
    let mut first = connect(proxy.addr("mx")).await;
    first.reply().await;
    let mut second = connect(proxy.addr("submission")).await;
    second.reply().await;
    let mut third = connect(proxy.addr("mx")).await;
    assert_eq!(
        third.reply().await,
        "421 4.3.2 Too many connections, try again later\r\n"
    );
    assert!(third.rest().await.is_empty());
    // The two admitted sessions carry on; a place freed is a place taken.
    assert_eq!(first.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    drop(second);
    transaction(admitted(proxy.addr("mx")).await).await;
}

#[tokio::test]
async fn connections_in_total_are_capped_with_the_protocols_goodbye() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let imap_upstream = scripted_upstream(Behaviour::Silent).await;
    let proxy = proxy(
        &[
            smtp_listener("mx", "starttls", "auth_requires_tls", upstream.addr),
            format!(
                "{{ name: imap, protocol: imap, listen: \"127.0.0.1:0\", upstream: \"{}\" }}",
                imap_upstream.addr
            ),
        ],
        "limits: { max_connections: 1 }\n",
    )
    .await;
    let mut held = connect(proxy.addr("mx")).await;
    held.reply().await;
    let mut refused = tokio::net::TcpStream::connect(proxy.addr("imap"))
        .await
        .unwrap();
    let mut reply = String::new();
    within(refused.read_to_string(&mut reply)).await.unwrap();
    assert_eq!(
        reply,
        "* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    );
    assert_eq!(held.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
}

#[tokio::test]
async fn an_idle_client_gets_421_while_others_complete() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = smtp_proxy(&upstream, "timeouts: { idle: 400ms }\n").await;
    let mut idle = traceable_connect(proxy.addr("submission")).await;
    idle.reply().await;
    well_behaved(proxy.addr("mx")).await;
    assert_eq!(
        idle.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    assert!(idle.rest().await.is_empty());
    session_log_line(
        idle.local_addr(),
        "event=\"limit_exceeded\" limit=\"idle_timeout\"",
    )
    .await;
}

#[tokio::test]
async fn a_stalled_message_body_gets_421_and_nothing_is_delivered() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = smtp_proxy(&upstream, "timeouts: { data: 400ms }\n").await;
    let mut stalled = traceable_connect(proxy.addr("mx")).await;
    let client = stalled.local_addr();
    stalled.reply().await;
    stalled.cmd("EHLO slow.example").await;
    stalled.cmd("MAIL FROM:<a@example.test>").await;
    stalled.cmd("RCPT TO:<b@example.test>").await;
    assert!(stalled.cmd("DATA").await.starts_with("354 "));
    stalled.send(b"Subject: half\r\n\r\nhalf a bo").await;
    well_behaved(proxy.addr("mx")).await;
    assert_eq!(
        stalled.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    session_log_line(client, "event=\"limit_exceeded\" limit=\"data_timeout\"").await;
    upstream.wait_closed().await;
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.aborted_bodies, 1);
    assert_eq!(recording.messages.len(), 1, "only the well-behaved message");
}

#[tokio::test]
async fn a_client_chatting_before_starttls_is_cut_off() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = smtp_proxy(&upstream, "limits: { max_plaintext_commands: 5 }\n").await;
    let mut chatty = connect(proxy.addr("submission")).await;
    chatty.reply().await;
    for _ in 0..5 {
        assert_eq!(chatty.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    }
    assert_eq!(
        chatty.cmd("NOOP").await,
        "421 4.7.0 Too many commands before STARTTLS, closing connection\r\n"
    );
    assert!(chatty.rest().await.is_empty());
    well_behaved(proxy.addr("mx")).await;
}

// Paused time: the deadline and the busy client's pauses are the runtime's clock, and
// it moves only when every task waits.
#[tokio::test(start_paused = true)]
async fn silence_after_login_ends_the_relay_while_a_busy_relay_continues() {
    let upstream = upstream::imap::scripted(upstream::imap::Behaviour::Quiet).await;
    let proxy = proxy(
        &[format!(
            "{{ name: imaps, protocol: imap, listen: \"127.0.0.1:0\", tls: implicit, upstream: \"{}\" }}",
            upstream.addr
        )],
        "timeouts: { idle_after_login: 500ms }\n",
    )
    .await;
    let mut sessions = Vec::new();
    let mut greeting = String::new();
    for _ in 0..2 {
        let tcp = traceable_tcp(proxy.addr("imaps")).await;
        let mut tls = BufReader::new(tls_connect(tcp, "mail.example.test", &[]).await.unwrap());
        let mut line = String::new();
        within(tls.read_line(&mut line)).await.unwrap();
        greeting = line.clone();
        tls.get_mut()
            .write_all(b"a LOGIN alice secret\r\n")
            .await
            .unwrap();
        line.clear();
        within(tls.read_line(&mut line)).await.unwrap();
        assert_eq!(line, "a OK done\r\n");
        sessions.push(tls);
    }
    let (mut silent, mut busy) = (sessions.remove(0), sessions.remove(0));
    // The busy one talks every 200 ms for 1.2 s; the silent one says nothing. The pauses
    // are the behaviour under test.
    for n in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        busy.get_mut()
            .write_all(format!("n{n} NOOP\r\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        within(busy.read_line(&mut line)).await.unwrap();
        assert_eq!(line, format!("n{n} OK done\r\n"));
    }
    // The silent one was closed by the deadline (`within` fails the test if the read
    // never ends), with nothing sent: a blind relay has no protocol goodbye to give.
    let mut rest = Vec::new();
    let _ = within(silent.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    let silent_client = silent.get_ref().get_ref().0.local_addr().unwrap();
    session_log_line(
        silent_client,
        "event=\"limit_exceeded\" limit=\"idle_after_login_timeout\"",
    )
    .await;
    // When the busy one falls silent too, its summary counts what crossed the relay as
    // well as the login before it.
    let client = busy.get_ref().get_ref().0.local_addr().unwrap();
    let _ = within(busy.read_to_end(&mut rest)).await;
    let summary = session_log_line(client, "session_end").await;
    let bytes_in = "a LOGIN alice secret\r\n".len() + 6 * "n0 NOOP\r\n".len();
    let bytes_out = greeting.len() + "a OK done\r\n".len() + 6 * "n0 OK done\r\n".len();
    assert!(
        summary.contains(&format!(" bytes_in={bytes_in} "))
            && summary.contains(&format!(" bytes_out={bytes_out} ")),
        "{summary}"
    );
}

#[tokio::test]
async fn an_upstream_that_dies_mid_reply_gets_the_client_a_421() {
    // Greets, then answers EHLO with half a multi-line reply and hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dying = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 dying ESMTP\r\n").await;
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"250-dying\r\n250-PIPELI").await;
            });
        }
    });
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = proxy(
        &[
            smtp_listener("dying", "starttls", "require_tls", dying),
            smtp_listener("mx", "starttls", "auth_requires_tls", upstream.addr),
        ],
        "",
    )
    .await;
    let mut client = connect(proxy.addr("dying")).await;
    assert_eq!(client.reply().await, "220 dying ESMTP\r\n");
    assert_eq!(
        client.cmd("EHLO c").await,
        "421 4.3.0 Service temporarily unavailable, closing connection\r\n"
    );
    well_behaved(proxy.addr("mx")).await;
}

/// Whether the replies on the connection from `client_port` to the proxy's `port` back
/// up: the client holds received bytes it has not read, and the proxy holds bytes the
/// client's window has no room for (`/proc/net/tcp`: `tx_queue:rx_queue` per socket).
fn replies_back_up(port: u16, client_port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let queue = |local: u16, remote: u16| {
        table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port_of = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
            if port_of(fields[1])? != local || port_of(fields[2])? != remote {
                return None;
            }
            let (tx, rx) = fields[4].split_once(':')?;
            Some((
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            ))
        })
    };
    let proxy_side = queue(port, client_port);
    let client_side = queue(client_port, port);
    matches!((proxy_side, client_side), (Some((unsent, _)), Some((_, unread))) if unsent > 0 && unread > 0)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_stays_bounded_and_is_cut_off() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start_with(
        &[("mx", "smtp", "starttls", "auth_requires_tls", upstream.addr)],
        "timeouts: { idle: 1s }\n",
    );
    let addr: SocketAddr = ([127, 0, 0, 1], mailmoat.port("mx")).into();
    well_behaved(addr).await;
    let before = rss_bytes(mailmoat.pid());

    // 6 MB of pipelined NOOPs (15 MB of replies, more than socket buffers hold),
    // replies never read.
    // A small receive window, so the proxy's writes block early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut flooder = within(socket.connect(addr)).await.unwrap();
    let flooder_port = flooder.local_addr().unwrap().port();
    let chunk = "NOOP\r\n".repeat(10_000);
    let sent = 100 * 10_000;
    let flood = tokio::spawn(async move {
        for _ in 0..100 {
            if flooder.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        flooder
    });
    wait_until_async(
        STEP,
        "the proxy's replies to the flooder to back up",
        || replies_back_up(addr.port(), flooder_port),
    )
    .await;
    // Meanwhile the proxy serves others, and holds no more than socket buffers.
    well_behaved(addr).await;
    let during = rss_bytes(mailmoat.pid());
    assert!(
        during.saturating_sub(before) < 8 * 1024 * 1024,
        "resident memory grew by {} KiB",
        (during - before) / 1024
    );
    // The write deadline cut the flooder off before it was answered in full. Until its
    // writes block, the proxy answers as many NOOPs as the kernel's send buffer holds
    // (megabytes, autotuned): in a debug build on a busy machine that alone has taken
    // close to STEP, so this one wait has a longer bound.
    let mut flooder = tokio::time::timeout(4 * STEP, flood)
        .await
        .expect("the flooder was never cut off")
        .unwrap();
    let mut replies = Vec::new();
    let _ = within(flooder.read_to_end(&mut replies)).await;
    let answered = replies.windows(4).filter(|w| w == b"250 ").count();
    assert!(
        answered < sent,
        "all {sent} NOOPs were answered: the client was never cut off"
    );
    well_behaved(addr).await;
}

// Paused time: the deadline and the trickle's pauses are the runtime's clock.
#[tokio::test(start_paused = true)]
async fn a_client_trickling_a_command_byte_by_byte_is_cut_off_like_a_silent_one() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = smtp_proxy(&upstream, "timeouts: { idle: 600ms }\n").await;
    let mut slow = connect(proxy.addr("submission")).await;
    slow.reply().await;
    // One byte every 150 ms, never a line end: reads keep coming, progress never does.
    // The pauses are the behaviour under test.
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            if slow.stream.get_mut().write_all(b"N").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        slow
    });
    well_behaved(proxy.addr("mx")).await;
    let mut slow = within(trickle).await.unwrap();
    assert_eq!(
        slow.reply().await,
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_never_reads_its_replies_is_cut_off_at_the_idle_deadline() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let proxy = proxy(
        &[
            smtp_listener("smtps", "implicit", "auth_requires_tls", upstream.addr),
            smtp_listener("mx", "starttls", "auth_requires_tls", upstream.addr),
        ],
        "timeouts: { idle: 500ms }\nlimits: { max_connections: 1 }\n",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(proxy.addr("smtps")).await.unwrap();
    let mut tls = tls_connect(tcp, "mail.example.test", &[]).await.unwrap();
    // Lines the proxy answers itself (503: no EHLO since TLS), replies never read: through
    // TLS the writes only fill rustls's buffer, and the flush is what waits.
    let flood = tokio::spawn(async move {
        let chunk = "MAIL FROM:<a@b>\r\n".repeat(4000);
        for _ in 0..200 {
            if tls.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    });
    // The only connection place comes back once the stalled session is cut (bounded).
    wait_for_async(
        STEP,
        "the stalled TLS session to give its place back",
        async || {
            let mut check = connect(proxy.addr("mx")).await;
            let reply = check.reply().await;
            if reply.starts_with("220 ") {
                return Some(());
            }
            assert_eq!(reply, "421 4.3.2 Too many connections, try again later\r\n");
            None
        },
    )
    .await;
    flood.abort();
}

/// A client that floods `addr` with lines the proxy answers itself (bare LF lines and
/// unknown verbs) and never reads: at most 4 MiB, until the proxy stops taking them for
/// a second; then it stays connected, unread, until aborted.
fn flooder(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let Ok(mut stream) = socket.connect(addr).await else {
            return;
        };
        let chunk = "\n\n\n\nXYZZY\r\n\n\n\n\nFLOOD x\r\n".repeat(2048);
        let mut sent = 0;
        while sent < 4 * 1024 * 1024 {
            match tokio::time::timeout(Duration::from_secs(1), stream.write(chunk.as_bytes())).await
            {
                Ok(Ok(n)) if n > 0 => sent += n,
                _ => break,
            }
        }
        std::future::pending::<()>().await;
    })
}

/// IMAP through STARTTLS to a login, each reply checked.
async fn imap_well_behaved(addr: SocketAddr) {
    let mut client = connect(addr).await;
    let greeting = client.line().await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 IDLE STARTTLS LOGINDISABLED]"),
        "{greeting:?}"
    );
    client.send(b"a CAPABILITY\r\n").await;
    assert_eq!(client.line().await, "a OK done\r\n");
    client.send(b"s STARTTLS\r\n").await;
    assert_eq!(client.line().await, "s OK Begin TLS negotiation now\r\n");
    let tls = tls_connect(client.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut client = Client::new(tls);
    client.send(b"l LOGIN alice secret\r\n").await;
    assert_eq!(client.line().await, "l OK done\r\n");
    client.send(b"n NOOP\r\n").await;
    assert_eq!(client.line().await, "n OK done\r\n");
}

/// POP3 through STLS to a login, each reply checked.
async fn pop3_well_behaved(addr: SocketAddr) {
    let mut client = connect(addr).await;
    assert_eq!(client.line().await, "+OK quiet ready\r\n");
    client.send(b"CAPA\r\n").await;
    let mut capa = Vec::new();
    loop {
        let l = client.line().await;
        let end = l == ".\r\n";
        capa.push(l);
        if end {
            break;
        }
    }
    assert_eq!(capa, ["+OK\r\n", "PIPELINING\r\n", "STLS\r\n", ".\r\n"]);
    client.send(b"STLS\r\n").await;
    assert_eq!(client.line().await, "+OK Begin TLS negotiation\r\n");
    let tls = tls_connect(client.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut client = Client::new(tls);
    client.send(b"USER alice\r\n").await;
    assert_eq!(client.line().await, "+OK\r\n");
    client.send(b"PASS secret\r\n").await;
    assert_eq!(client.line().await, "+OK logged in\r\n");
    client.send(b"STAT\r\n").await;
    assert_eq!(client.line().await, "+OK 0 0\r\n");
    client.send(b"QUIT\r\n").await;
    assert_eq!(client.line().await, "+OK bye\r\n");
}

/// Clients that make the proxy answer them (bare LF lines, unknown verbs) and never
/// read a reply, on all three protocols at once (the pre-TLS command budget lifted, so
/// nothing cuts them off early): meanwhile well-behaved SMTP, IMAP and POP3 sessions
/// through the same proxy complete, every reply as expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_behaved_sessions_complete_beside_clients_flooding_replies_they_never_read() {
    let smtp_upstream = scripted_upstream(Behaviour::Esmtp).await;
    let imap_upstream = upstream::imap::scripted(upstream::imap::Behaviour::Quiet)
        .await
        .addr
        .to_string();
    let pop3_upstream = upstream::pop3::scripted(upstream::pop3::Behaviour::Quiet)
        .await
        .addr
        .to_string();
    let proxy = proxy(
        &[
            smtp_listener("mx", "starttls", "auth_requires_tls", smtp_upstream.addr),
            listener("imap", "imap", "starttls", "require_tls", &imap_upstream),
            listener("pop3", "pop3", "starttls", "require_tls", &pop3_upstream),
        ],
        "limits: { max_plaintext_commands: 1000000 }\n",
    )
    .await;
    let mut flooders = Vec::new();
    for (name, count) in [("mx", 8), ("imap", 4), ("pop3", 4)] {
        for _ in 0..count {
            flooders.push(flooder(proxy.addr(name)));
        }
    }
    for _ in 0..3 {
        well_behaved(proxy.addr("mx")).await;
        imap_well_behaved(proxy.addr("imap")).await;
        pop3_well_behaved(proxy.addr("pop3")).await;
    }
    for flooder in flooders {
        flooder.abort();
    }
    let recording = smtp_upstream.recording.lock().unwrap();
    assert_eq!(recording.messages.len(), 3, "the well-behaved messages");
    assert!(
        !recording.commands.iter().any(|c| c.contains("XYZZY")),
        "the flood reached the upstream"
    );
}
