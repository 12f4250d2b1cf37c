//! Shared pieces of the integration tests, one module per job:
//!
//! - [`wait`]: `within`, the bounded step, and polling a condition under a deadline.
//! - [`certs`]: the test CA and the two server certificates.
//! - [`listener`]: `listeners:` entries and whole configurations.
//! - [`proxy`]: the proxy started in-process on port 0; [`logs`]: its captured log lines.
//! - [`upstream`]: scripted SMTP, IMAP and POP3 upstreams that record every byte.
//! - [`client`]: the TLS client, the line client, writes cut as an attacker cuts them.
//! - [`binary`]: the real `mailmoat` binary; [`legacy`]: the real Postfix and Dovecot;
//!   [`process`]: programs run under a bound, and /proc.
//! - [`canonical_e2e`], [`exim`], [`mailutils`], [`recorder`]: the real-server harnesses;
//!   [`outbound_lab`]: the outbound relay's lab.
//!
//! Everything but the per-protocol upstream details is re-exported here, so a test
//! says `use common::*;`.
// Each test binary uses part of the harness: the rest is not dead code.
#![allow(dead_code)]

pub mod binary;
/// The harness of the canonical rule against a real legacy server.
pub mod canonical_e2e;
pub mod certs;
pub mod client;
/// A real Exim 4.96 upstream (`scripts/exim.sh`).
pub mod exim;
pub mod legacy;
pub mod listener;
pub mod logs;
/// Real GNU Mailutils 3.15 imap4d and pop3d upstreams.
pub mod mailutils;
/// The outbound relay's lab (`scripts/outbound-lab.sh`).
pub mod outbound_lab;
pub mod process;
pub mod proxy;
/// A recording forwarder for the upstream leg.
pub mod recorder;
pub mod upstream;
pub mod wait;

// What a test binary does not use of these is not an unused import.
#[allow(unused_imports)]
pub use binary::*;
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use legacy::*;
#[allow(unused_imports)]
pub use listener::*;
#[allow(unused_imports)]
pub use logs::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use upstream::smtp::*;
#[allow(unused_imports)]
pub use upstream::{Recording, Upstream};
#[allow(unused_imports)]
pub use wait::*;

/// `message` byte-stuffed, then the terminating `.` line: a DATA body (RFC 5321
/// §4.5.2) or a POP3 multi-line reply (RFC 1939 §3).
pub fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A tag unique to this test run, for finding our messages and log lines.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}-{n}", std::process::id())
}
