//! Micro-benchmarks of the per-byte and per-command hot paths, through the library's
//! public API only: the line framer, the DATA end-of-body scan with bare-LF
//! normalisation (alone and inside the SMTP session), EHLO capability rewriting, and
//! IMAP CAPABILITY rewriting and literal tracking before login.
//!
//! `cargo bench --bench hot_paths` (add `-- --quick` for a short run). Not part of the
//! test command.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mailmoat::policy::{BareNewlines, Policy, UserHasher};
use mailmoat::proto::line::Framer;
use mailmoat::proto::smtp::body::{Body, Progress};
use mailmoat::proto::{Action, Limits, Session as _, imap, smtp};

const MB: usize = 1 << 20;

/// `len` bytes of 78-byte CRLF lines (76 characters of text each).
fn crlf_lines(len: usize) -> Vec<u8> {
    let line = format!("{}\r\n", "x".repeat(76));
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

/// The same text with every line ended by a bare LF instead.
fn bare_lf_lines(len: usize) -> Vec<u8> {
    let line = format!("{}\n", "x".repeat(77));
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

/// Drains a session's actions, returning the bytes meant for each side.
fn drain(session: &mut impl mailmoat::proto::Session) -> (usize, usize) {
    let (mut to_client, mut to_upstream) = (0, 0);
    while let Some(action) = session.next_action() {
        match action {
            Action::ToClient(b) => to_client += b.len(),
            Action::ToUpstream(b) => to_upstream += b.len(),
            _ => {}
        }
    }
    (to_client, to_upstream)
}

fn framer(c: &mut Criterion) {
    let mut group = c.benchmark_group("framer");
    for (name, line_len) in [("short_lines_16B", 16), ("command_lines_78B", 78)] {
        let line = format!("{}\r\n", "a".repeat(line_len - 2));
        let input: Vec<u8> = line.as_bytes().repeat(MB / line_len);
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || BytesMut::from(&input[..]),
                |mut buf| {
                    let mut framer = Framer::new(4096);
                    let mut n = 0;
                    while let Ok(Some(line)) = framer.next_line(&mut buf) {
                        n += line.text.len();
                    }
                    black_box(n)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn body_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp_body_scan_1MB");
    let clean = crlf_lines(MB);
    let bare = bare_lf_lines(MB);
    group.throughput(Throughput::Bytes(MB as u64));
    for (name, input) in [("clean_crlf", &clean), ("bare_lf", &bare)] {
        // What is measured is what is meant: bare LFs are rewritten, clean lines kept.
        let mut check = BytesMut::new();
        let mut body = Body::default();
        assert_eq!(body.feed(input, &mut check), Progress::More);
        let expected = if name == "bare_lf" { MB / 78 } else { 0 };
        assert_eq!(body.bare_newlines(), expected as u64, "{name}");
        assert_eq!(check.len(), MB + expected, "{name}");
        // 16 KiB reads, as a TLS record-sized socket read would hand them over.
        group.bench_function(name, |b| {
            let mut out = BytesMut::with_capacity(2 * MB);
            b.iter(|| {
                out.clear();
                let mut body = Body::default();
                for chunk in input.chunks(16 * 1024) {
                    if let Progress::End { .. } = body.feed(chunk, &mut out) {
                        unreachable!("no end-of-data in the input");
                    }
                }
                black_box((out.len(), body.bare_newlines()))
            })
        });
    }
    group.finish();
}

fn smtp_config() -> smtp::Config {
    smtp::Config {
        policy: Policy::RequireTls,
        bare_newlines: BareNewlines::Normalize,
        limits: Limits {
            max_line_len: 4096,
            max_held_bytes: 64 * 1024,
            max_plaintext_commands: 20,
            max_errors: 20,
        },
        user_hasher: UserHasher::new(b"bench key"),
    }
}

const SMTP_GREETING: &[u8] = b"220 legacy.example.test ESMTP\r\n";
const SMTP_EHLO_REPLY: &[u8] = b"250-legacy.example.test\r\n250-PIPELINING\r\n\
250-SIZE 52428800\r\n250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n\
250-XCLIENT ADDR NAME\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 CHUNKING\r\n";

/// An SMTP session on an implicit-TLS listener, greeted, with `EHLO` sent.
fn smtp_awaiting_ehlo_reply() -> smtp::Session {
    let mut s = smtp::Session::new(smtp_config(), true);
    s.on_upstream_data(SMTP_GREETING);
    drain(&mut s);
    s.on_client_data(b"EHLO client.example\r\n");
    drain(&mut s);
    s
}

fn smtp_capabilities(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp");
    group.bench_function("ehlo_reply_rewrite", |b| {
        b.iter_batched(
            smtp_awaiting_ehlo_reply,
            |mut s| {
                s.on_upstream_data(black_box(SMTP_EHLO_REPLY));
                black_box(drain(&mut s))
            },
            BatchSize::SmallInput,
        )
    });
    // A 1 MB DATA body through the whole session, clean and with bare LFs, 16 KiB
    // at a time: framer hand-off, body scan, action queue.
    for (name, body) in [
        ("data_1MB_clean", crlf_lines(MB)),
        ("data_1MB_bare_lf", bare_lf_lines(MB)),
    ] {
        group.throughput(Throughput::Bytes(MB as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut s = smtp_awaiting_ehlo_reply();
                    s.on_upstream_data(SMTP_EHLO_REPLY);
                    s.on_client_data(b"MAIL FROM:<a@example.test>\r\n");
                    s.on_upstream_data(b"250 2.1.0 Ok\r\n");
                    s.on_client_data(b"RCPT TO:<b@example.test>\r\n");
                    s.on_upstream_data(b"250 2.1.5 Ok\r\n");
                    s.on_client_data(b"DATA\r\n");
                    s.on_upstream_data(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    drain(&mut s);
                    s
                },
                |mut s| {
                    let mut forwarded = 0;
                    for chunk in body.chunks(16 * 1024) {
                        s.on_client_data(chunk);
                        forwarded += drain(&mut s).1;
                    }
                    s.on_client_data(b".\r\n");
                    forwarded += drain(&mut s).1;
                    assert!(forwarded >= MB, "the body went upstream");
                    black_box(forwarded)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn imap_config() -> imap::Config {
    imap::Config {
        max_literal_len: 65536,
        limits: Limits {
            max_line_len: 8192,
            max_held_bytes: 64 * 1024,
            max_plaintext_commands: 20,
            max_errors: 20,
        },
        user_hasher: UserHasher::new(b"bench key"),
    }
}

const IMAP_GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE \
IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN] Legacy ready.\r\n";
const IMAP_CAPABILITY: &[u8] = b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE \
SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL \
CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH \
ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY \
STATUS=SIZE SAVEDATE LITERAL+ NOTIFY STARTTLS AUTH=PLAIN AUTH=LOGIN AUTH=SCRAM-SHA-256-PLUS\r\n\
c OK Capability completed.\r\n";

/// An IMAP session on an implicit-TLS listener, greeted.
fn imap_greeted() -> imap::Session {
    let mut s = imap::Session::new(imap_config());
    s.on_tls_established();
    s.on_upstream_data(IMAP_GREETING);
    drain(&mut s);
    s
}

fn imap_paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("imap");
    group.bench_function("capability_rewrite", |b| {
        b.iter_batched(
            || {
                let mut s = imap_greeted();
                s.on_client_data(b"c CAPABILITY\r\n");
                drain(&mut s);
                s
            },
            |mut s| {
                s.on_upstream_data(black_box(IMAP_CAPABILITY));
                black_box(drain(&mut s))
            },
            BatchSize::SmallInput,
        )
    });
    // LOGIN with two synchronising literals: the session must hold each `+` until the
    // upstream gives it, then pass the literal bytes through.
    let user = b"alice@example.test";
    let password = vec![b'p'; 4000];
    group.throughput(Throughput::Bytes((user.len() + password.len()) as u64));
    group.bench_function("login_literals_4KB", |b| {
        b.iter_batched(
            imap_greeted,
            |mut s| {
                s.on_client_data(format!("a LOGIN {{{}}}\r\n", user.len()).as_bytes());
                drain(&mut s);
                s.on_upstream_data(b"+ OK\r\n");
                drain(&mut s);
                s.on_client_data(user);
                s.on_client_data(format!(" {{{}}}\r\n", password.len()).as_bytes());
                drain(&mut s);
                s.on_upstream_data(b"+ OK\r\n");
                drain(&mut s);
                s.on_client_data(&password);
                s.on_client_data(b"\r\n");
                black_box(drain(&mut s))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, framer, body_scan, smtp_capabilities, imap_paths);
criterion_main!(benches);
