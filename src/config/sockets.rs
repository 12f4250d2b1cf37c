//! What Linux makes of mailmoat's listening sockets, so that validation refuses the
//! addresses `mailmoat run` could not bind together, and finds the listener an upstream
//! address would reach.
//!
//! `inbound::listener` binds each listener with SO_REUSEADDR, adds SO_REUSEPORT only for
//! `reuse_port: true`, and leaves IPV6_V6ONLY as the kernel sets it on a new socket
//! (`net.ipv6.bindv6only`, 0 unless changed: `[::]` then takes IPv4 connections too). On
//! Linux, SO_REUSEADDR does not let a second socket bind an address that overlaps a
//! *listening* one; SO_REUSEPORT on both (same user) does. Two addresses on one port
//! overlap when they are equal or one is the wildcard of the other's family, and a
//! dual-stack `[::]` overlaps every IPv4 address. (Checked against the kernel by
//! tests/config.rs, which binds every pair through `inbound::listener`.)

use std::cell::OnceCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// What validation needs to know about the host it runs on.
pub(crate) trait Host {
    /// IPV6_V6ONLY of a new IPv6 socket: whether `[::]` leaves IPv4 to others.
    fn ipv6_only(&self) -> bool;
    /// Whether a connection to `ip` stays on this host (loopback, or an address of one of
    /// its interfaces), where a wildcard listener takes it.
    fn is_own_address(&self, ip: IpAddr) -> bool;
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

    fn is_own_address(&self, ip: IpAddr) -> bool {
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        // Asked of the routing table, which knows this host's addresses, without a
        // privilege or /proc: a UDP socket (an ephemeral port, no listener) connected to
        // `ip` sends nothing, and the kernel gives it `ip` itself as its source address
        // exactly when `ip` is local. (Binding `ip` instead would be fooled by
        // ip_nonlocal_bind, set on hosts with floating addresses.)
        let any = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        UdpSocket::bind((any, 0))
            .and_then(|socket| {
                socket.connect((ip, 9))?;
                socket.local_addr()
            })
            .is_ok_and(|local| local.ip() == ip)
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

/// Which of `listeners` (index, address) would take a TCP connection to `upstream`, as
/// the kernel picks: a listener on the address itself before the wildcard of its family,
/// before a dual-stack `[::]`.
pub(super) fn receiver(
    listeners: &[(usize, SocketAddr)],
    upstream: SocketAddr,
    host: &dyn Host,
) -> Option<usize> {
    // Linux connects 0.0.0.0 and [::] to the loopback address of their family.
    let to = match canonical(upstream.ip()) {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    listeners
        .iter()
        .filter(|(_, listen)| listen.port() == upstream.port() && listen.port() != 0)
        .filter_map(|&(index, listen)| {
            let at = canonical(listen.ip());
            let score = if at == to {
                3
            } else if at.is_unspecified() && at.is_ipv4() == to.is_ipv4() {
                2
            } else if at.is_unspecified() && to.is_ipv4() && !host.ipv6_only() {
                1
            } else {
                return None;
            };
            // A wildcard takes only what reaches this host.
            (score == 3 || host.is_own_address(to)).then_some((score, index))
        })
        // The first of the best, as a tie (allowed only with reuse_port) cannot be told.
        .max_by_key(|&(score, index)| (score, std::cmp::Reverse(index)))
        .map(|(_, index)| index)
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

    struct FakeHost {
        ipv6_only: bool,
    }

    impl Host for FakeHost {
        fn ipv6_only(&self) -> bool {
            self.ipv6_only
        }
        fn is_own_address(&self, ip: IpAddr) -> bool {
            ip.is_loopback() || ip == "192.0.2.2".parse::<IpAddr>().unwrap()
        }
    }

    #[test]
    fn the_listener_a_connection_reaches() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let listeners = [
            (0, at("0.0.0.0:25")),
            (1, at("127.0.0.1:25")),
            (2, at("[::]:25")),
            (3, at("[::1]:587")),
            (4, at("127.0.0.2:0")),
        ];
        let dual = FakeHost { ipv6_only: false };
        let v6only = FakeHost { ipv6_only: true };
        let cases: [(&str, &FakeHost, Option<usize>); 13] = [
            ("127.0.0.1:25", &dual, Some(1)),
            ("127.0.0.5:25", &dual, Some(0)),
            ("192.0.2.2:25", &dual, Some(0)),
            ("192.0.2.3:25", &dual, None),
            ("0.0.0.0:25", &dual, Some(1)),
            ("[::ffff:127.0.0.1]:25", &dual, Some(1)),
            ("[::1]:25", &dual, Some(2)),
            ("[::]:25", &dual, Some(2)),
            ("[::1]:587", &dual, Some(3)),
            ("127.0.0.1:587", &dual, None),
            ("127.0.0.2:0", &dual, None),
            ("127.0.0.1:26", &dual, None),
            ("[::1]:25", &v6only, Some(2)),
        ];
        for (upstream, host, expected) in cases {
            assert_eq!(
                receiver(&listeners, at(upstream), host),
                expected,
                "{upstream}"
            );
        }
        // Only the dual-stack wildcard on the port: it takes IPv4 unless IPV6_V6ONLY.
        let only_v6 = [(0, at("[::]:25"))];
        assert_eq!(receiver(&only_v6, at("127.0.0.1:25"), &dual), Some(0));
        assert_eq!(receiver(&only_v6, at("127.0.0.1:25"), &v6only), None);
    }

    #[test]
    fn this_host_knows_its_own_addresses() {
        let host = ThisHost::default();
        assert!(host.is_own_address("127.0.0.1".parse().unwrap()));
        assert!(host.is_own_address("127.3.4.5".parse().unwrap()));
        assert!(host.is_own_address("::1".parse().unwrap()));
        // TEST-NET-2 (RFC 5737) is nobody's.
        assert!(!host.is_own_address("198.51.100.7".parse().unwrap()));
        // The address this host would reach the outside from, if it has one (the connect
        // sends nothing).
        let outside = UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| {
                socket.connect("198.51.100.7:9")?;
                socket.local_addr()
            })
            .ok();
        if let Some(own) = outside.filter(|addr| !addr.ip().is_unspecified()) {
            assert!(host.is_own_address(own.ip()), "{own}");
        }
    }
}
