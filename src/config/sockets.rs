//! What Linux makes of mailmoat's listening sockets, so that validation refuses the
//! addresses `mailmoat run` could not bind together.
//!
//! `listener.rs` binds each listener with SO_REUSEADDR, adds SO_REUSEPORT only for
//! `reuse_port: true`, and leaves IPV6_V6ONLY as the kernel sets it on a new socket
//! (`net.ipv6.bindv6only`, 0 unless changed: `[::]` then takes IPv4 connections too). On
//! Linux, SO_REUSEADDR does not let a second socket bind an address that overlaps a
//! *listening* one; SO_REUSEPORT on both (same user) does. Two addresses on one port
//! overlap when they are equal or one is the wildcard of the other's family, and a
//! dual-stack `[::]` overlaps every IPv4 address. (Checked against the kernel by
//! tests/config.rs, which binds every pair through `listener.rs`.)

use std::cell::OnceCell;
use std::net::{IpAddr, SocketAddr};

/// What validation needs to know about the host it runs on.
pub(crate) trait Host {
    /// IPV6_V6ONLY of a new IPv6 socket: whether `[::]` leaves IPv4 to others.
    fn ipv6_only(&self) -> bool;
}

/// The host this process runs on, asked once.
#[derive(Debug, Default)]
pub(crate) struct ThisHost {
    ipv6_only: OnceCell<bool>,
}

impl Host for ThisHost {
    fn ipv6_only(&self) -> bool {
        // The socket's own default, not the sysctl's file: systemd's ProcSubset=pid hides
        // /proc/sys from the service.
        *self.ipv6_only.get_or_init(|| {
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
                .and_then(|socket| socket.only_v6())
                // Without IPv6 no `[::]` binds at all; nothing to overlap.
                .unwrap_or(false)
        })
    }
}

/// The address as the kernel matches it: a v4-mapped IPv6 address is its IPv4 address.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Whether listening sockets on `a` and `b` overlap, so that without SO_REUSEPORT on both
/// the second bind fails (EADDRINUSE). Port 0 asks the kernel for a free port: never.
pub(super) fn overlap(a: SocketAddr, b: SocketAddr, ipv6_only: bool) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    match (canonical(a.ip()), canonical(b.ip())) {
        (x @ IpAddr::V4(_), y @ IpAddr::V4(_)) | (x @ IpAddr::V6(_), y @ IpAddr::V6(_)) => {
            x == y || x.is_unspecified() || y.is_unspecified()
        }
        (IpAddr::V6(v6), IpAddr::V4(_)) | (IpAddr::V4(_), IpAddr::V6(v6)) => {
            v6.is_unspecified() && !ipv6_only
        }
    }
}

/// Why `a` and `b` overlap, for the message.
pub(super) fn why_overlap(a: SocketAddr, b: SocketAddr) -> &'static str {
    let dual_stack = |addr: SocketAddr| addr.is_ipv6() && addr.ip().is_unspecified();
    if a.is_ipv4() != b.is_ipv4() && (dual_stack(a) || dual_stack(b)) {
        "[::] takes IPv4 connections too (net.ipv6.bindv6only is 0)"
    } else if canonical(a.ip()) == canonical(b.ip()) {
        "the same address"
    } else {
        "the wildcard address takes every address of its family"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_addresses_on_one_port() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let cases = [
            ("0.0.0.0:25", "127.0.0.1:25", false, true),
            ("127.0.0.1:25", "127.0.0.2:25", false, false),
            ("127.0.0.1:25", "127.0.0.1:26", false, false),
            ("0.0.0.0:0", "0.0.0.0:0", false, false),
            ("[::]:25", "127.0.0.1:25", false, true),
            ("[::]:25", "127.0.0.1:25", true, false),
            ("[::]:25", "[::1]:25", true, true),
            ("[::1]:25", "0.0.0.0:25", false, false),
            ("[::ffff:127.0.0.1]:25", "127.0.0.1:25", false, true),
            ("[::ffff:127.0.0.1]:25", "127.0.0.2:25", false, false),
            ("[::ffff:0.0.0.0]:25", "127.0.0.2:25", false, true),
        ];
        for (a, b, ipv6_only, expected) in cases {
            assert_eq!(
                overlap(at(a), at(b), ipv6_only),
                expected,
                "{a} {b} {ipv6_only}"
            );
            assert_eq!(
                overlap(at(b), at(a), ipv6_only),
                expected,
                "{b} {a} {ipv6_only}"
            );
        }
    }
}
