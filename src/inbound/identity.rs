//! Client identity across the proxy (ARCHITECTURE.md §7): the PROXY protocol header a trusted load
//! balancer sends in front of a connection, the one mailmoat sends to the upstream, and
//! the networks a header is accepted from.
//!
//! The PROXY protocol is HAProxy's `proxy-protocol.txt` (versions 1 and 2); parsing and
//! encoding are the `ppp` crate's. This module only bounds the reads: it never reads a
//! byte past the header, so whatever the client sends next reaches its session intact.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v1 header, CRLF included (proxy-protocol.txt §2.1: 107 bytes).
pub const MAX_V1_LEN: usize = 107;
/// The fixed part of a v2 header: signature, version/command, family, length (§2.2).
const V2_FIXED_LEN: usize = 16;
/// The longest v2 header accepted. The protocol allows 16 + 65535 bytes; addresses take
/// at most 216 (AF_UNIX) and mailmoat reads no TLV, so a little room for a balancer's
/// TLVs (ALPN, authority, unique id) is plenty.
pub const MAX_V2_LEN: usize = V2_FIXED_LEN + 512;
/// The shortest header of either version: `PROXY UNKNOWN\r\n` (v1) is 15 bytes, a v2
/// header at least 16. Reading this much first never reads past a header.
const MIN_HEADER_LEN: usize = 15;
const V1_PREFIX: &[u8] = b"PROXY ";

/// Why an inbound PROXY header was refused. The texts are fixed: nothing the client sent
/// reaches a log line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing complete arrived before the deadline.
    #[error("no complete PROXY header before the deadline")]
    Deadline,
    /// The peer closed before the header was complete.
    #[error("connection closed inside the PROXY header")]
    Closed,
    /// The first bytes are neither a v1 nor a v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// Longer than [`MAX_V1_LEN`] or [`MAX_V2_LEN`].
    #[error("PROXY header too long")]
    TooLong,
    /// v1 syntax error (the `ppp` crate's fixed description).
    #[error("malformed PROXY v1 header: {0}")]
    MalformedV1(#[from] ppp::v1::BinaryParseError),
    /// v2 syntax error (the `ppp` crate's fixed description).
    #[error("malformed PROXY v2 header: {0}")]
    MalformedV2(#[from] ppp::v2::ParseError),
    /// A v2 header for a datagram (UDP) client: a mail session is a stream, so the
    /// balancer is misconfigured or the header is forged.
    #[error("PROXY v2 header names a datagram (UDP) connection")]
    Datagram,
    /// A read failed.
    #[error("{0}")]
    Io(io::Error),
}

impl Error {
    /// A short stable label for the `reason` field of the log event.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Deadline => "timeout",
            Error::Closed => "closed",
            Error::NotProxy => "missing",
            Error::TooLong => "too_long",
            Error::MalformedV1(_) | Error::MalformedV2(_) => "malformed",
            Error::Datagram => "datagram",
            Error::Io(_) => "io",
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            Error::Closed
        } else {
            Error::Io(err)
        }
    }
}

/// Who the client is and which address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The address and port the client connected to (the listener, or the balancer's
    /// front end).
    pub destination: SocketAddr,
}

impl Origin {
    /// A client from outside (192.0.2.1, RFC 5737 TEST-NET-1) connecting to `destination`:
    /// how `check` and `explain` present themselves to an upstream that is told who the
    /// client is, so that the open-relay probe tests what a stranger would get.
    pub fn outside(destination: SocketAddr) -> Origin {
        Origin::direct(SocketAddr::from(([192, 0, 2, 1], 40000)), destination)
    }

    /// A direct connection; IPv4 peers of a dual-stack socket (`::ffff:a.b.c.d`) are
    /// written as IPv4.
    pub fn direct(peer: SocketAddr, local: SocketAddr) -> Origin {
        Origin {
            client: canonical(peer),
            destination: canonical(local),
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads one PROXY v1 or v2 header from a trusted peer, within `deadline`, and returns
/// the origin it names. `LOCAL` (v2) and `UNKNOWN` (v1) headers, which a balancer sends
/// for its own health checks, and address families other than TCP over IP leave the
/// connection's own endpoints in place (proxy-protocol.txt §2.1, §2.2).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    direct: Origin,
    deadline: Duration,
) -> Result<Origin, Error> {
    let header = tokio::time::timeout(deadline, read_header_bytes(stream))
        .await
        .map_err(|_| Error::Deadline)??;
    parse_header(&header, direct)
}

/// Exactly the header's bytes, bounded, and not one byte more.
async fn read_header_bytes<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, Error> {
    let mut header = vec![0u8; MIN_HEADER_LEN];
    stream.read_exact(&mut header).await?;
    if header.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        header.resize(V2_FIXED_LEN, 0);
        stream.read_exact(&mut header[MIN_HEADER_LEN..]).await?;
        // §2.2: bytes 15-16 are the length of what follows, network byte order.
        let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if V2_FIXED_LEN + length > MAX_V2_LEN {
            return Err(Error::TooLong);
        }
        header.resize(V2_FIXED_LEN + length, 0);
        stream.read_exact(&mut header[V2_FIXED_LEN..]).await?;
        return Ok(header);
    }
    if !header.starts_with(V1_PREFIX) {
        return Err(Error::NotProxy);
    }
    // §2.1: one line ending in CRLF. Byte by byte: at most 92 more reads, once per
    // connection, so that nothing after the line is consumed here.
    while !header.ends_with(b"\r\n") {
        if header.len() == MAX_V1_LEN {
            return Err(Error::TooLong);
        }
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        header.push(byte[0]);
    }
    Ok(header)
}

/// The origin a complete header names.
fn parse_header(header: &[u8], direct: Origin) -> Result<Origin, Error> {
    let pair = if header.starts_with(V1_PREFIX) {
        match ppp::v1::Header::try_from(header)?.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            ppp::v1::Addresses::Tcp6(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            ppp::v1::Addresses::Unknown => None,
        }
    } else {
        let parsed = ppp::v2::Header::try_from(header)?;
        if parsed.header.len() != header.len() {
            // The length field and the bytes read disagree: cannot happen with the
            // reader above, refused all the same.
            return Err(Error::TooLong);
        }
        if parsed.command == ppp::v2::Command::Proxy
            && parsed.protocol == ppp::v2::Protocol::Datagram
        {
            return Err(Error::Datagram);
        }
        match (parsed.command, parsed.addresses) {
            (ppp::v2::Command::Local, _) => None,
            // An unspecified transport: the addresses may not be a TCP client's, and
            // the specification lets the receiver use the connection's own endpoints.
            (ppp::v2::Command::Proxy, _) if parsed.protocol != ppp::v2::Protocol::Stream => None,
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            (ppp::v2::Command::Proxy, _) => None,
        }
    };
    Ok(match pair {
        Some((client, destination)) => Origin::direct(client, destination),
        None => direct,
    })
}

/// Which PROXY protocol version mailmoat sends to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`): Postfix `haproxy`, Dovecot `haproxy = yes`.
    V1,
    /// The binary header; both Postfix (3.5+) and Dovecot accept it too.
    V2,
}

/// The header that tells the upstream who the client is (proxy-protocol.txt §2.1,
/// §2.2). Source and destination must be of one family: an IPv4 client behind an IPv6
/// listener is sent with the destination's IPv4 form when it has one, or the IPv4
/// unspecified address (the port stays).
pub fn upstream_header(version: ProxyVersion, origin: &Origin) -> Vec<u8> {
    let client = canonical(origin.client);
    let destination = same_family(canonical(origin.destination), client.ip());
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((client, destination))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, destination),
        )
        .build()
        // Writing into a Vec cannot fail; an empty header would be refused upstream.
        .unwrap_or_default(),
    }
}

fn same_family(addr: SocketAddr, like: IpAddr) -> SocketAddr {
    let ip = match (addr.ip(), like) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => addr.ip(),
        (IpAddr::V4(v4), IpAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (IpAddr::V6(_), IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, addr.port())
}

/// An IP network, `192.0.2.0/24` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or `ADDR`. Host bits must be zero, so that a typo such as
    /// `10.0.0.1/8` is noticed rather than silently widened.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}`: expected a network such as 10.0.0.0/8 or fd00::/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("`{text}`: prefix length must be 0..={max}"))?,
        };
        let cidr = Cidr {
            network,
            prefix_len,
        };
        if cidr.masked(network) != network {
            return Err(format!(
                "`{text}`: host bits are set (did you mean {}/{prefix_len}?)",
                cidr.masked(network)
            ));
        }
        Ok(cidr)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// True if every address inside is a loopback address (127.0.0.0/8, ::1).
    pub fn is_loopback(&self) -> bool {
        match self.network {
            IpAddr::V4(v4) => v4.is_loopback() && self.prefix_len >= 8,
            IpAddr::V6(v6) => v6.is_loopback() && self.prefix_len == 128,
        }
    }

    /// True if `ip` is inside; IPv4 peers of a dual-stack socket match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Cidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct() -> Origin {
        Origin::direct(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:25".parse().unwrap(),
        )
    }

    async fn read(bytes: &[u8]) -> (Result<Origin, Error>, Vec<u8>) {
        let mut stream = bytes;
        let result = read_header(&mut stream, direct(), Duration::from_secs(5)).await;
        (result, stream.to_vec())
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ppp::v2::PROTOCOL_PREFIX.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn v1_tcp4_names_the_client_and_leaves_what_follows() {
        let (origin, rest) = read(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\nEHLO x\r\n").await;
        let origin = origin.unwrap();
        assert_eq!(origin.client, "203.0.113.7:51234".parse().unwrap());
        assert_eq!(origin.destination, "192.0.2.1:25".parse().unwrap());
        assert_eq!(rest, b"EHLO x\r\n");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (origin, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 143\r\n").await;
        assert_eq!(
            origin.unwrap().client,
            "[2001:db8::7]:51234".parse().unwrap()
        );
        // A balancer's health check: the connection's own endpoints stay.
        let (origin, rest) = read(b"PROXY UNKNOWN\r\n\x16\x03").await;
        assert_eq!(origin.unwrap(), direct());
        assert_eq!(rest, b"\x16\x03");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 1];
        body.extend_from_slice(&51234u16.to_be_bytes());
        body.extend_from_slice(&587u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]); // a NOOP TLV, skipped
        let mut bytes = v2(0x1, 0x11, &body);
        bytes.extend_from_slice(b"rest");
        let (origin, rest) = read(&bytes).await;
        let origin = origin.unwrap();
        assert_eq!(origin.client, "203.0.113.7:51234".parse().unwrap());
        assert_eq!(origin.destination, "192.0.2.1:587".parse().unwrap());
        assert_eq!(rest, b"rest");
        let (origin, rest) = read(&[v2(0x0, 0x00, b""), b"x".to_vec()].concat()).await;
        assert_eq!(origin.unwrap(), direct());
        assert_eq!(rest, b"x");
    }

    #[tokio::test]
    async fn bad_headers_are_refused_with_a_reason() {
        let reason = |r: Result<Origin, Error>| r.unwrap_err().reason();
        assert_eq!(reason(read(b"EHLO client.example\r\n").await.0), "missing");
        assert_eq!(
            reason(read(b"PROXY TCP4 1.2.3\r\n\r\n\r\n").await.0),
            "malformed"
        );
        assert_eq!(reason(read(b"PROXY TCP4 203.0.113.7").await.0), "closed");
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        assert_eq!(reason(read(long.as_bytes()).await.0), "too_long");
        // v2 announcing more than accepted: refused before reading it.
        let mut big = ppp::v2::PROTOCOL_PREFIX.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(reason(read(&big).await.0), "too_long");
        // v2 with a wrong version nibble.
        let bad = [ppp::v2::PROTOCOL_PREFIX, &[0x31, 0x11, 0, 0]].concat();
        assert_eq!(reason(read(&bad).await.0), "malformed");
        // Address block shorter than the family needs.
        assert_eq!(
            reason(read(&v2(0x1, 0x11, &[1, 2, 3])).await.0),
            "malformed"
        );
        // A UDP client (family nibble INET or INET6, protocol nibble DGRAM) cannot be
        // behind a mail session.
        let udp4 = [[203, 0, 113, 7], [192, 0, 2, 1]].concat();
        let udp4 = [udp4, vec![0xc8, 0x22, 0, 25]].concat();
        assert_eq!(reason(read(&v2(0x1, 0x12, &udp4)).await.0), "datagram");
        assert_eq!(reason(read(&v2(0x1, 0x22, &[0; 36])).await.0), "datagram");
        // A balancer's own health check over any transport stays local.
        assert_eq!(read(&v2(0x0, 0x12, &udp4)).await.0.unwrap(), direct());
        // INET with an unspecified transport: the connection's own endpoints.
        assert_eq!(read(&v2(0x1, 0x10, &udp4)).await.0.unwrap(), direct());
    }

    #[tokio::test]
    async fn a_slow_header_meets_the_deadline() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 ")
            .await
            .unwrap();
        let err = read_header(&mut server, direct(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "timeout");
    }

    #[test]
    fn upstream_headers_are_the_wire_format() {
        let origin = Origin::direct(
            "[::ffff:203.0.113.7]:51234".parse().unwrap(),
            "[::]:25".parse().unwrap(),
        );
        assert_eq!(
            upstream_header(ProxyVersion::V1, &origin),
            b"PROXY TCP4 203.0.113.7 0.0.0.0 51234 25\r\n"
        );
        let origin = Origin::direct(
            "203.0.113.7:51234".parse().unwrap(),
            "192.0.2.1:587".parse().unwrap(),
        );
        let mut expected = ppp::v2::PROTOCOL_PREFIX.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 203, 0, 113, 7, 192, 0, 2, 1]);
        expected.extend_from_slice(&[0xc8, 0x22, 0x02, 0x4b]); // 51234, 587
        assert_eq!(upstream_header(ProxyVersion::V2, &origin), expected);
        let origin = Origin::direct(
            "[2001:db8::7]:1".parse().unwrap(),
            "192.0.2.1:25".parse().unwrap(),
        );
        assert_eq!(
            upstream_header(ProxyVersion::V1, &origin),
            b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 1 25\r\n"
        );
    }

    #[test]
    fn networks() {
        let net = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(net.contains("127.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:127.9.9.9".parse().unwrap()));
        assert!(!net.contains("128.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("198.51.100.1".parse().unwrap())
        );
        assert_eq!(
            Cidr::parse("192.0.2.9").unwrap().to_string(),
            "192.0.2.9/32"
        );
        assert!(
            Cidr::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        assert!(Cidr::parse("::/129").is_err());
    }
}
