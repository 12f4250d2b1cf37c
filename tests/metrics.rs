//! The Prometheus endpoint of the real binary: counters move by exactly what a session
//! did, `/healthz` answers, and bad requests are refused without stopping the endpoint.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mailmoat::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// base64 of "\0alice\0alice-secret-pw".
const PLAIN_IR: &str = "AGFsaWNlAGFsaWNlLXNlY3JldC1wdw==";

/// The binary with a STARTTLS `submission` and an implicit `smtps` listener, and its
/// metrics endpoint, once `/healthz` says ready and the port probes' sessions are over.
async fn start(upstream: SocketAddr) -> (Mailmoat, SocketAddr) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mailmoat = Mailmoat::start_with(
        &[
            ("submission", "smtp", "starttls", "require_tls", upstream),
            ("smtps", "smtp", "implicit", "require_tls", upstream),
        ],
        &format!("metrics: {{ listen: \"{metrics}\" }}\n"),
    );
    wait_for_async(STEP, "the metrics endpoint", async || {
        let healthz = try_http(metrics, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        matches!(healthz, Ok((200, _, _))).then_some(())
    })
    .await;
    // `start_with` probed each port: wait until those sessions have ended.
    settle(metrics).await;
    (mailmoat, metrics)
}

/// One request on a fresh connection: (status, head, body).
async fn try_http(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    within(stream.read_to_end(&mut response)).await?;
    let text = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    Ok((status, head.to_owned(), body.to_owned()))
}

async fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    within(try_http(addr, request)).await.unwrap()
}

/// Every sample of a scrape, by series (`name{labels}`).
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, head, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    let mut samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value {line:?}"));
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

/// The series key `name{a="x",b="y"}`, labels in the order the encoder writes them.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn value(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = series(name, labels);
    *samples
        .get(&key)
        .unwrap_or_else(|| panic!("no series {key}; have {:#?}", samples.keys()))
}

fn event(samples: &HashMap<String, f64>, listener: &str, event: &str) -> f64 {
    value(
        samples,
        "mailmoat_security_events_total",
        &[("listener", listener), ("event", event)],
    )
}

fn active(samples: &HashMap<String, f64>, listener: &str) -> f64 {
    value(
        samples,
        "mailmoat_sessions_active",
        &[("listener", listener), ("protocol", "smtp")],
    )
}

/// Waits (bounded) until no session is open, and returns that scrape.
async fn settle(addr: SocketAddr) -> HashMap<String, f64> {
    wait_for_async(STEP, "every session to close", async || {
        let samples = scrape(addr).await;
        (active(&samples, "submission") == 0.0 && active(&samples, "smtps") == 0.0)
            .then_some(samples)
    })
    .await
}

/// Every series whose value differs between two scrapes, with the change.
fn changes(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut changed: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(key, now)| {
            let was = before.get(key).copied().unwrap_or(0.0);
            (*now != was).then(|| (key.clone(), now - was))
        })
        .collect();
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    changed
}

#[tokio::test]
async fn a_refused_plaintext_login_moves_its_counters_by_exactly_one() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (mailmoat, metrics) = start(upstream.addr).await;
    let before = scrape(metrics).await;
    for name in ["plaintext_command_refused", "credentials_exposed"] {
        assert_eq!(event(&before, "submission", name), 0.0, "{name}");
    }

    let mut plain = connect(SocketAddr::from((
        [127, 0, 0, 1],
        mailmoat.port("submission"),
    )))
    .await;
    let greeting = plain.reply().await;
    let ehlo = plain.cmd("EHLO client.example").await;
    let auth = format!("AUTH PLAIN {PLAIN_IR}");
    assert_eq!(
        plain.cmd(&auth).await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    let open = scrape(metrics).await;
    assert_eq!(active(&open, "submission"), 1.0);
    assert_eq!(plain.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    drop(plain);
    let after = settle(metrics).await;

    // Exactly these series moved, by exactly this much: one session's worth.
    let sent = "EHLO client.example\r\n".len() + auth.len() + 2 + "QUIT\r\n".len();
    let received = greeting.len()
        + ehlo.len()
        + "530 5.7.0 Must issue a STARTTLS command first\r\n".len()
        + "221 2.0.0 Bye\r\n".len();
    let on = |event: &str| {
        series(
            "mailmoat_security_events_total",
            &[("listener", "submission"), ("event", event)],
        )
    };
    let bytes = |direction: &str| {
        series(
            "mailmoat_relayed_bytes_total",
            &[("listener", "submission"), ("direction", direction)],
        )
    };
    let mut expected = vec![
        (
            series(
                "mailmoat_connections_accepted_total",
                &[("listener", "submission")],
            ),
            1.0,
        ),
        (bytes("client_to_upstream"), sent as f64),
        (bytes("upstream_to_client"), received as f64),
        (on("credentials_exposed"), 1.0),
        (on("plaintext_command_refused"), 1.0),
        (on("session_end"), 1.0),
        // AUTH after STARTTLS was offered (ARCHITECTURE.md §8).
        (on("starttls_stripping_suspected"), 1.0),
        (
            series(
                "mailmoat_sessions_total",
                &[
                    ("listener", "submission"),
                    ("protocol", "smtp"),
                    ("tls", "none"),
                ],
            ),
            1.0,
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(changes(&before, &after), expected);
    // The refused credentials reached neither the upstream nor a metric.
    assert!(!upstream.commands().iter().any(|c| c.starts_with("AUTH")));
    let (_, _, body) = http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(!body.contains("alice") && !body.contains("127.0.0.1"));
}

#[tokio::test]
async fn tls_sessions_move_handshake_session_and_byte_counters() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (mailmoat, metrics) = start(upstream.addr).await;
    let before = scrape(metrics).await;

    // STARTTLS, counting every byte each way.
    let (mut sent, mut received) = (0usize, 0usize);
    let mut plain = connect(SocketAddr::from((
        [127, 0, 0, 1],
        mailmoat.port("submission"),
    )))
    .await;
    received += plain.reply().await.len();
    for line in ["EHLO client.example", "STARTTLS"] {
        sent += line.len() + 2;
        received += plain.cmd(line).await.len();
    }
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut client = Client::new(tls);
    sent += "EHLO client.example\r\n".len();
    received += client.cmd("EHLO client.example").await.len();
    let open = scrape(metrics).await;
    assert_eq!(active(&open, "submission"), 1.0);
    assert_eq!(
        event(&open, "submission", "tls_established")
            - event(&before, "submission", "tls_established"),
        1.0
    );
    sent += "QUIT\r\n".len();
    received += client.cmd("QUIT").await.len();
    assert!(client.rest().await.is_empty());
    drop(client);

    // Implicit TLS on the other listener.
    let stream = within(TcpStream::connect(("127.0.0.1", mailmoat.port("smtps"))))
        .await
        .unwrap();
    let mut implicit = Client::new(tls_connect(stream, "mail.example.test", &[]).await.unwrap());
    assert!(implicit.reply().await.starts_with("220 "));
    assert_eq!(implicit.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    drop(implicit);

    let after = settle(metrics).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    for listener in ["submission", "smtps"] {
        assert_eq!(
            delta(
                "mailmoat_security_events_total",
                &[("listener", listener), ("event", "tls_established")]
            ),
            1.0,
            "{listener}"
        );
        assert_eq!(
            delta(
                "mailmoat_security_events_total",
                &[("listener", listener), ("event", "tls_handshake_failed")]
            ),
            0.0,
            "{listener}"
        );
        assert_eq!(
            delta(
                "mailmoat_tls_handshake_duration_seconds_count",
                &[("listener", listener)]
            ),
            1.0,
            "{listener}"
        );
        assert_eq!(
            delta(
                "mailmoat_tls_handshake_duration_seconds_bucket",
                &[("listener", listener), ("le", "+Inf")]
            ),
            1.0,
            "{listener}"
        );
        assert_eq!(
            delta(
                "mailmoat_sessions_total",
                &[
                    ("listener", listener),
                    ("protocol", "smtp"),
                    ("tls", "none")
                ]
            ),
            0.0,
            "{listener}"
        );
    }
    assert_eq!(
        delta(
            "mailmoat_sessions_total",
            &[
                ("listener", "submission"),
                ("protocol", "smtp"),
                ("tls", "starttls")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "mailmoat_sessions_total",
            &[
                ("listener", "smtps"),
                ("protocol", "smtp"),
                ("tls", "implicit")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "mailmoat_relayed_bytes_total",
            &[
                ("listener", "submission"),
                ("direction", "client_to_upstream")
            ]
        ),
        sent as f64
    );
    assert_eq!(
        delta(
            "mailmoat_relayed_bytes_total",
            &[
                ("listener", "submission"),
                ("direction", "upstream_to_client")
            ]
        ),
        received as f64
    );
    assert_eq!(
        delta(
            "mailmoat_relayed_bytes_total",
            &[("listener", "smtps"), ("direction", "client_to_upstream")]
        ),
        "QUIT\r\n".len() as f64
    );
    let sum = value(
        &after,
        "mailmoat_tls_handshake_duration_seconds_sum",
        &[("listener", "submission")],
    );
    assert!(sum > 0.0 && sum < 10.0, "{sum}");
}

#[tokio::test]
async fn the_endpoint_answers_health_and_refuses_bad_requests_without_stopping() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (_mailmoat, metrics) = start(upstream.addr).await;

    // A scraper that never sends its request holds no one up, and is timed out.
    let mut silent = TcpStream::connect(metrics).await.unwrap();

    let (status, head, body) = http(metrics, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{head}");
    assert!(head.contains("\r\nConnection: close"), "{head}");
    assert_eq!(http(metrics, b"GET /nope HTTP/1.1\r\n\r\n").await.0, 404);
    let (status, head, _) = http(
        metrics,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(head.contains("\r\nAllow: GET, HEAD"), "{head}");
    assert_eq!(
        http(
            metrics,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
        )
        .await
        .0,
        400
    );
    // Exactly the 8 KiB read limit, all read: the 431 is not lost to a reset.
    let oversized = format!("GET /{}", "a".repeat(8 * 1024 - 5));
    assert_eq!(http(metrics, oversized.as_bytes()).await.0, 431);

    // OpenMetrics for a scraper that asks for it.
    let (status, head, body) = http(
        metrics,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        head.contains(
            "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"));
    assert!(body.lines().any(|l| l == "mailmoat_security_events_total{listener=\"submission\",event=\"exempt_plaintext_session\"} 0"));

    // Still serving, and the silent one got its timeout.
    assert!(scrape(metrics).await.contains_key(&series(
        "mailmoat_sessions_active",
        &[("listener", "smtps"), ("protocol", "smtp")]
    )));
    let mut response = Vec::new();
    within(silent.read_to_end(&mut response)).await.unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

/// What the endpoint did with a request it should refuse: `Some(status)` if it answered,
/// `None` if it closed the connection (a reset included) without a response.
async fn refusal(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = within(TcpStream::connect(addr)).await.unwrap();
    // The endpoint may stop reading and close before all of it is sent.
    let _ = within(stream.write_all(request)).await;
    let mut response = Vec::new();
    let _ = within(stream.read_to_end(&mut response)).await;
    if response.is_empty() {
        return None;
    }
    let status = response
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok());
    assert!(
        status.is_some(),
        "not a response: {}",
        String::from_utf8_lossy(&response)
    );
    status
}

#[tokio::test]
async fn healthz_answers_while_hundreds_of_idle_and_half_sent_connections_are_open() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (_mailmoat, metrics) = start(upstream.addr).await;

    // 200 connections that never send a byte and 50 stopped halfway through a request
    // line: far more than the 32 the endpoint once served at once.
    let mut held = Vec::new();
    for i in 0..250 {
        let mut stream = within(TcpStream::connect(metrics)).await.unwrap();
        if i >= 200 {
            within(stream.write_all(b"GET /hea")).await.unwrap();
        }
        held.push(stream);
    }
    let (status, head, body) = http(metrics, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{head}");

    // None of them is kept: each gets its 408 when its 2 s for a request head are up.
    for (i, mut stream) in held.into_iter().enumerate() {
        let mut response = Vec::new();
        within(stream.read_to_end(&mut response)).await.unwrap();
        assert!(
            response.starts_with(b"HTTP/1.1 408 "),
            "connection {i}: {}",
            String::from_utf8_lossy(&response)
        );
    }
}

#[tokio::test]
async fn a_request_head_sent_slower_than_the_header_timeout_is_cut_off() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (_mailmoat, metrics) = start(upstream.addr).await;

    let (mut reader, mut writer) = within(TcpStream::connect(metrics))
        .await
        .unwrap()
        .into_split();
    let closed = tokio::spawn(async move {
        let mut response = Vec::new();
        // A reset (a field sent as the server closed) ends it too; bytes read stay.
        let _ = within(reader.read_to_end(&mut response)).await;
        response
    });
    // Never silent, never done: a header field every 200 ms. The 2 s are for the whole
    // head, so this is cut off however steadily it trickles. 40 fields take 8 s, well
    // past the 2 s and short of the 10 s a connection may last at all, so the head's
    // deadline is what ends it.
    writer
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut fields = 0;
    while fields < 40 && !closed.is_finished() {
        // The trickle is the behaviour under test (the real binary: real time).
        tokio::time::sleep(Duration::from_millis(200)).await;
        if writer
            .write_all(format!("X-Slow-{fields}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        fields += 1;
    }
    let response = within(closed).await.unwrap();
    assert!(fields < 40, "the endpoint waited for all {fields} fields");
    // The 408 is lost only if a field arrives just as the server closes (a reset).
    assert!(
        response.is_empty() || response.starts_with(b"HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(http(metrics, b"GET /healthz HTTP/1.1\r\n\r\n").await.0, 200);
}

#[tokio::test]
async fn oversized_and_garbage_requests_are_refused_and_the_endpoint_carries_on() {
    let upstream = scripted_upstream(Behaviour::Esmtp).await;
    let (_mailmoat, metrics) = start(upstream.addr).await;

    let long_field = format!(
        "GET /metrics HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let many_fields = format!(
        "GET /metrics HTTP/1.1\r\n{}\r\n",
        (0..100)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect::<String>()
    );
    let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 * 1024));
    let requests: [&[u8]; 7] = [
        long_field.as_bytes(),
        many_fields.as_bytes(),
        long_line.as_bytes(),
        b"\x00\xff\xfe\x7f garbage \x01\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Bad: a\x00b\r\n\r\n",
    ];
    for (i, request) in requests.into_iter().enumerate() {
        if let Some(status) = refusal(metrics, request).await {
            assert!((400..500).contains(&status), "request {i}: {status}");
        }
        // The endpoint carries on after each.
        let (status, head, body) = http(metrics, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"), "after {i}: {head}");
    }
    assert!(scrape(metrics).await.contains_key(&series(
        "mailmoat_sessions_active",
        &[("listener", "submission"), ("protocol", "smtp")]
    )));
}

#[test]
fn the_metrics_key_is_validated_with_its_line() {
    let certs = certs();
    let yaml = |metrics: &str| {
        format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:2525\", upstream: \"127.0.0.1:25\" }}\n{metrics}",
            certs.default.0.display(),
            certs.default.1.display()
        )
    };
    let config =
        Config::from_yaml(&yaml("metrics: { listen: \"127.0.0.1:9925\" }\n"), "m.yaml").unwrap();
    assert_eq!(
        config.metrics.unwrap().listen,
        "127.0.0.1:9925".parse().unwrap()
    );
    assert!(
        Config::from_yaml(&yaml(""), "m.yaml")
            .unwrap()
            .metrics
            .is_none()
    );

    let err = Config::from_yaml(&yaml("metrics: { listen: \"127.0.0.1:2525\" }\n"), "m.yaml")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.yaml:6: metrics.listen: 127.0.0.1:2525 is also a listener's address"
    );
    let err = Config::from_yaml(&yaml("metrics: { listen: \"localhost:9925\" }\n"), "m.yaml")
        .unwrap_err();
    assert_eq!(err.problems[0].line, Some(6), "{err}");
    let err = Config::from_yaml(
        &yaml("metrics: { listen: \"127.0.0.1:9925\", path: /m }\n"),
        "m.yaml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `path`"), "{err}");
}

#[test]
fn a_metrics_address_in_use_is_a_config_error_exit_64() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let certs = certs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailmoat.yaml");
    std::fs::write(
        &config,
        format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:25\" }}\nmetrics: {{ listen: \"{}\" }}\n",
            certs.default.0.display(),
            certs.default.1.display(),
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_program(
        env!("CARGO_BIN_EXE_mailmoat"),
        &["run", "-c", config.to_str().unwrap()],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "metrics: cannot listen on {}",
            taken.local_addr().unwrap()
        )),
        "{stderr}"
    );
}
