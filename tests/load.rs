//! A bounded load test on loopback: 2,000 connections that stay silent, plus 200 that
//! each do STARTTLS + AUTH + a message, through the real binary. Every full session must
//! succeed, and the proxy's resident memory must stay within the documented budget per
//! connection (README: Limits). Bounded in count and time; loopback only.

mod common;

use std::time::Duration;

use common::*;

const SILENT: usize = 2_000;
const FULL: usize = 200;
/// The documented budget: resident memory per open connection (client and upstream
/// legs, session state and buffers), measured as the growth over an idle proxy. About
/// 9.5 KB is measured (debug and release builds alike): no connection holds a read
/// buffer of its own.
const BUDGET_PER_CONNECTION: u64 = 16 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn full_session(addr: std::net::SocketAddr, index: usize) {
    let mut client = starttls_client(addr).await;
    // "\0alice@example.test\0alice-secret-pw"
    let auth = client
        .cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=")
        .await;
    assert_eq!(auth, "235 2.7.0 Authentication successful\r\n");
    assert_eq!(
        client.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.0.0 Ok\r\n"
    );
    assert_eq!(
        client.cmd("RCPT TO:<b@example.test>").await,
        "250 2.0.0 Ok\r\n"
    );
    assert!(client.cmd("DATA").await.starts_with("354 "));
    let body = format!("Subject: load {index}\r\n\r\n{}\r\n.", "x".repeat(2000));
    assert_eq!(client.cmd(&body).await, "250 2.0.0 Ok: queued\r\n");
    assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_and_two_hundred_full_sessions() {
    // Each connection costs this process two descriptors and the proxy two.
    let needed = (SILENT + FULL) as u64 * 2 + 256;
    assert!(
        open_files_limit() >= needed,
        "the load test needs `ulimit -n` >= {needed} (have {})",
        open_files_limit()
    );
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    // Every test client is 127.0.0.1: lift the per-client cap above the load.
    let mailmoat = Mailmoat::start_with(
        &[(
            "submission",
            "smtp",
            "starttls",
            "require_tls",
            upstream.addr,
        )],
        "limits: { max_connections_per_client: 10000 }\n",
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], mailmoat.port("submission")).into();
    let pid = mailmoat.pid();
    // Warm up: one full session, so that what is allocated once is not counted.
    full_session(addr, 0).await;
    let baseline = rss_bytes(pid);

    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        let mut client = connect(addr).await;
        assert!(client.reply().await.starts_with("220 "));
        silent.push(client);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_silent = rss_bytes(pid);

    let sessions: Vec<_> = (1..=FULL)
        .map(|i| tokio::spawn(full_session(addr, i)))
        .collect();
    for session in sessions {
        within(session).await.expect("full session succeeded");
    }
    let after = rss_bytes(pid);

    let per_connection = with_silent.saturating_sub(baseline) / SILENT as u64;
    println!(
        "load: baseline {} KiB, with {SILENT} silent {} KiB ({} B per connection), after {FULL} full sessions {} KiB",
        baseline / 1024,
        with_silent / 1024,
        per_connection,
        after / 1024
    );
    assert!(
        per_connection <= BUDGET_PER_CONNECTION,
        "{per_connection} bytes per idle connection, budget {BUDGET_PER_CONNECTION}"
    );
    // Every silent connection is still open and served.
    assert_eq!(silent[0].cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert_eq!(silent[SILENT - 1].cmd("NOOP").await, "250 2.0.0 Ok\r\n");
    assert_eq!(upstream.recording.lock().unwrap().messages.len(), FULL + 1);
}
