//! Attackers that flood the proxy with lines it answers itself and never read a byte:
//! what a client costs that makes the proxy write and keeps its replies unread.
//!
//! Each attacker connects, reads nothing (not even the greeting), and writes a stream of
//! bare LF lines and unknown verbs (on an SMTP MX both are answered by the proxy: `500`
//! bad syntax, `500` not recognised) until the proxy stops taking them (no write
//! progress for `stall`), closes the connection, or `limit` bytes are out. The
//! connection is then held open, unread, for the caller to measure.

use std::time::Duration;

use anyhow::Result;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn;

/// What one attacker got done.
#[derive(Debug, Default, Clone, Copy)]
pub struct Attack {
    /// Bytes the proxy (or the kernel on its behalf) took.
    pub bytes: u64,
    /// The proxy stopped taking bytes: no write progress for the stall time.
    pub stalled: bool,
    /// The proxy closed or reset the connection.
    pub closed: bool,
}

/// The flood: bare LF lines and unknown verbs, interleaved, `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    const UNIT: &[u8] = b"\n\n\n\nXYZZY\r\n\n\n\n\nFLOOD x\r\n";
    UNIT.iter().copied().cycle().take(len).collect()
}

/// One attacker against `addr`; returns its connection (held, never read) and what it did.
pub async fn attacker(
    addr: std::net::SocketAddr,
    limit: u64,
    stall: Duration,
    step: Duration,
) -> Result<(TcpStream, Attack)> {
    let mut stream = conn::tcp(addr, step).await?;
    let chunk = pattern(64 * 1024);
    let mut attack = Attack::default();
    let mut offset = 0;
    while attack.bytes < limit {
        let room = usize::try_from(limit - attack.bytes).unwrap_or(usize::MAX);
        let end = chunk.len().min(offset + room);
        match tokio::time::timeout(stall, stream.write(&chunk[offset..end])).await {
            Err(_) => {
                attack.stalled = true;
                break;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                attack.closed = true;
                break;
            }
            Ok(Ok(n)) => {
                attack.bytes += n as u64;
                offset = (offset + n) % chunk.len();
            }
        }
    }
    Ok((stream, attack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_lines_a_proxy_answers_itself() {
        let flood = pattern(1000);
        assert_eq!(flood.len(), 1000);
        let text = String::from_utf8(flood).unwrap();
        let mut lines: Vec<&str> = text.split('\n').collect();
        lines.pop(); // the last one may be cut short
        assert!(
            lines
                .iter()
                .all(|l| matches!(*l, "" | "XYZZY\r" | "FLOOD x\r")),
            "{lines:?}"
        );
    }
}
