//! Smoke runs of the load generator (`mailmoat-bench`): a few sessions of each mode
//! through the real binary, every reply verified, and proof that a wrong reply makes it
//! fail. The benchmarks themselves (`scripts/bench.sh`) are not part of the tests.
//!
//! The generator is the workspace member `bench/`, not a binary of this package, so
//! cargo names no `CARGO_BIN_EXE_mailmoat-bench` here: [`generator`] finds it beside
//! this test's own binary. `cargo test --workspace` (scripts/check.sh) builds it before
//! any test runs; a `cargo test` of this package alone does not (then run
//! `cargo build -p mailmoat-bench` first).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The `mailmoat-bench` binary of this build: in the same target directory and profile
/// as this test (`<target>/<profile>/deps/bench_smoke-*` → `<target>/<profile>/`),
/// whatever `CARGO_TARGET_DIR` says. Fails, never skips, when it is not built.
fn generator() -> std::path::PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let dir = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from <target>/<profile>/deps");
    let path = dir.join(format!("mailmoat-bench{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: the load generator is the workspace member bench/; run \
         `cargo test --workspace`, or `cargo build -p mailmoat-bench` before this test",
        path.display()
    );
    path
}

/// Runs `mailmoat-bench ARGS` (bounded), returning its exit code and parsed JSON line.
async fn bench(args: &[String]) -> (i32, serde_json::Value, String) {
    let child = tokio::process::Command::new(generator())
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("mailmoat-bench finished within 60 s")
        .expect("mailmoat-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one JSON line on stdout: {stdout:?}\nstderr: {stderr}"
    );
    let json = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}\nstderr: {stderr}"));
    (output.status.code().unwrap_or(-1), json, stderr)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn ca() -> String {
    certs().ca_pem.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_starttls_and_implicit_sessions_are_verified_end_to_end() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start(&[
        ("sub", "smtp", "starttls", "require_tls", upstream.addr),
        ("smtps", "smtp", "implicit", "require_tls", upstream.addr),
    ]);
    let pid = mailmoat.pid().to_string();
    let sub = format!("127.0.0.1:{}", mailmoat.port("sub"));
    let smtps = format!("127.0.0.1:{}", mailmoat.port("smtps"));

    let (code, json, stderr) = bench(&args(&[
        "smtp",
        "--addr",
        &sub,
        "--ca",
        &ca(),
        "--sessions",
        "6",
        "--concurrency",
        "3",
        "--auth",
        "alice:secret",
        "--size",
        "10000",
        "--messages",
        "2",
        "--proxy-pid",
        &pid,
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["sessions"], 6);
    assert_eq!(json["ok"], 6);
    assert_eq!(json["errors"], 0);
    assert_eq!(json["bytes"], 6 * 2 * 10_000);
    assert_eq!(json["tls"], "starttls");
    let suites = json["tls_suites"].as_object().unwrap();
    assert_eq!(suites.values().filter_map(|n| n.as_u64()).sum::<u64>(), 6);
    assert!(
        suites.keys().all(|s| s.starts_with("TLSv1_3 ")),
        "{suites:?}"
    );
    assert!(json["proxy"]["cpu_us"].is_u64(), "{json}");
    assert!(json["proxy"]["rss_kib_after"].as_u64().unwrap() > 0);
    assert_eq!(json["session_latency_us"]["count"], 6);
    assert_eq!(json["transaction_latency_us"]["count"], 12);
    // The upstream received every message whole: the generator's bytes are real.
    {
        let recording = upstream.recording.lock().unwrap();
        assert_eq!(recording.messages.len(), 12);
        assert!(recording.messages.iter().all(|m| m.len() == 10_000));
        assert!(
            recording
                .commands
                .iter()
                .filter(|c| c.starts_with("AUTH PLAIN "))
                .count()
                == 6,
            "AUTH went upstream after TLS once per session"
        );
    }

    // A pipelining client (RFC 2920): MAIL, RCPT and DATA in one write, each reply checked.
    let (code, json, stderr) = bench(&args(&[
        "smtp",
        "--addr",
        &sub,
        "--ca",
        &ca(),
        "--sessions",
        "3",
        "--concurrency",
        "3",
        "--size",
        "5000",
        "--pipelining",
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["pipelining"], true);
    assert_eq!(
        (json["ok"].as_u64(), json["errors"].as_u64()),
        (Some(3), Some(0))
    );
    {
        let recording = upstream.recording.lock().unwrap();
        assert_eq!(recording.messages.len(), 12 + 3);
        assert!(recording.messages[12..].iter().all(|m| m.len() == 5_000));
    }

    // Implicit TLS, resuming with tickets: one at a time, so each session finds one.
    let (code, json, stderr) = bench(&args(&[
        "smtp",
        "--addr",
        &smtps,
        "--tls",
        "implicit",
        "--ca",
        &ca(),
        "--sessions",
        "4",
        "--concurrency",
        "1",
        "--resume",
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(
        (json["ok"].as_u64(), json["errors"].as_u64()),
        (Some(4), Some(0))
    );
    assert!(json["bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        json["resumed"], 3,
        "every session after the first resumed: {json}"
    );

    // Latency mode: one session, timed transactions with RSET.
    let (code, json, stderr) = bench(&args(&[
        "latency",
        "--addr",
        &sub,
        "--ca",
        &ca(),
        "--sessions",
        "1",
        "--messages",
        "20",
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["mode"], "latency");
    assert_eq!(json["transaction_latency_us"]["count"], 20);
    assert!(json["transaction_latency_us"]["p50"].as_u64().unwrap() > 0);

    // Idle: sessions held open after TLS and EHLO, memory sampled while they are.
    let (code, json, stderr) = bench(&args(&[
        "idle",
        "--addr",
        &sub,
        "--ca",
        &ca(),
        "--sessions",
        "10",
        "--concurrency",
        "5",
        "--settle",
        "0",
        "--proxy-pid",
        &pid,
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["held_open"], 10);
    assert!(json["proxy"]["rss_kib_per_conn"].is_number(), "{json}");
}

/// Flood: attackers that send lines the proxy answers itself and never read, on an MX
/// listener, while full sessions run through the submission listener; every session's
/// replies are still verified, and the proxy's memory per attacker is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_mode_runs_verified_sessions_beside_non_reading_attackers() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let mailmoat = Mailmoat::start(&[
        ("sub", "smtp", "starttls", "require_tls", upstream.addr),
        ("mx", "smtp", "starttls", "auth_requires_tls", upstream.addr),
    ]);
    let (code, json, stderr) = bench(&args(&[
        "flood",
        "--addr",
        &format!("127.0.0.1:{}", mailmoat.port("sub")),
        "--flood-addr",
        &format!("127.0.0.1:{}", mailmoat.port("mx")),
        "--ca",
        &ca(),
        "--attackers",
        "4",
        "--flood-bytes",
        "262144",
        "--stall",
        "1",
        "--settle",
        "0",
        "--sessions",
        "3",
        "--concurrency",
        "3",
        "--proxy-pid",
        &mailmoat.pid().to_string(),
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["mode"], "flood");
    assert_eq!(
        (json["ok"].as_u64(), json["errors"].as_u64()),
        (Some(3), Some(0)),
        "{json}"
    );
    assert_eq!(json["attackers"], 4);
    assert_eq!(json["attackers_failed"], 0, "{json}");
    assert!(json["attacker_bytes"].as_u64().unwrap() > 0, "{json}");
    assert!(json["proxy"]["rss_kib_per_attacker"].is_number(), "{json}");
    // The upstream saw the sessions' messages, and none of the flood.
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.messages.len(), 3);
    assert!(
        !recording.commands.iter().any(|c| c.contains("XYZZY")),
        "the flood reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_fetch_through_mailmoat_checks_the_literal_size() {
    let legacy = legacy();
    // A prepared message in alice's Maildir, about 300 KB.
    let tag = unique("bench-smoke");
    let mut message = format!("Subject: {tag}\r\nFrom: a@example.test\r\n\r\n").into_bytes();
    for _ in 0..4000 {
        message.extend_from_slice(format!("{}\r\n", "z".repeat(74)).as_bytes());
    }
    let new = legacy.maildir_alice.join("new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join(format!("{tag}.bench:2,")), &message).unwrap();

    let mailmoat = Mailmoat::start(&[
        ("imap", "imap", "starttls", "require_tls", legacy.imap),
        ("smtp", "smtp", "starttls", "require_tls", legacy.smtp),
    ]);
    let imap = format!("127.0.0.1:{}", mailmoat.port("imap"));
    let pid = mailmoat.pid().to_string();
    let (code, json, stderr) = bench(&args(&[
        "imap",
        "--addr",
        &imap,
        "--ca",
        &ca(),
        "--sessions",
        "3",
        "--concurrency",
        "3",
        "--login",
        "alice@example.test:alice-secret-pw",
        "--fetches",
        "2",
        "--proxy-pid",
        &pid,
    ]))
    .await;
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(
        (json["ok"].as_u64(), json["errors"].as_u64()),
        (Some(3), Some(0))
    );
    // This test binary's private Dovecot holds only this message: every FETCH got it whole.
    assert_eq!(
        json["bytes"].as_u64(),
        Some(6 * message.len() as u64),
        "{json}"
    );
    assert_eq!(json["transaction_latency_us"]["count"], 6);

    // Negative: the SMTP mode against the IMAP listener fails on the greeting.
    let (code, json, _) = bench(&args(&[
        "smtp",
        "--addr",
        &imap,
        "--ca",
        &ca(),
        "--sessions",
        "2",
        "--concurrency",
        "2",
    ]))
    .await;
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["errors"], 2);
    assert_eq!(json["ok"], 0);
    let sample = json["error_samples"][0].as_str().unwrap();
    assert!(sample.contains("not an SMTP reply line"), "{sample}");
}

/// An SMTP upstream that greets and accepts EHLO, then answers MAIL with a temporary
/// failure: a generator that does not check codes would count the session as done.
async fn refusing_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let _ = write.write_all(b"220 refusing ESMTP\r\n").await;
                let mut line = String::new();
                while read.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply: &[u8] = match line.get(..4).unwrap_or("") {
                        "EHLO" => b"250-refusing\r\n250 PIPELINING\r\n",
                        "MAIL" => b"451 4.3.0 try again later\r\n",
                        "QUIT" => b"221 bye\r\n",
                        _ => b"250 ok\r\n",
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_reply_code_fails_the_run() {
    let upstream = refusing_upstream().await;
    // Direct (plaintext) and through mailmoat: both must see the 451 as an error.
    let mailmoat = Mailmoat::start(&[("sub", "smtp", "starttls", "require_tls", upstream)]);
    let through = format!("127.0.0.1:{}", mailmoat.port("sub"));
    for extra in [
        vec![
            "--addr".to_string(),
            upstream.to_string(),
            "--tls".into(),
            "none".into(),
        ],
        vec!["--addr".to_string(), through, "--ca".into(), ca()],
    ] {
        // One command at a time, and pipelined: the 451 is found among the replies too.
        for pipelining in [&[][..], &["--pipelining"][..]] {
            let mut all = args(&["smtp", "--sessions", "3", "--concurrency", "3"]);
            all.extend(args(pipelining));
            all.extend(extra.clone());
            let (code, json, _) = bench(&all).await;
            assert_eq!(code, 1, "{json}");
            assert_eq!(
                (json["ok"].as_u64(), json["errors"].as_u64()),
                (Some(0), Some(3))
            );
            let sample = json["error_samples"][0].as_str().unwrap();
            assert!(sample.contains("MAIL: expected 250, got 451"), "{sample}");
        }
    }
}

#[tokio::test]
async fn a_non_loopback_target_is_refused() {
    let child = tokio::process::Command::new(generator())
        .args(["smtp", "--addr", "192.0.2.1:25", "--tls", "none"])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a loopback address"));
}
