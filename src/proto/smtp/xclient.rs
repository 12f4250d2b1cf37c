//! XCLIENT, Postfix's extension that lets an authorized SMTP client (mailmoat) tell the
//! upstream who the real client is (Postfix XCLIENT_README).
//!
//! ```text
//! xclient-command = XCLIENT 1*( SP attribute-name"="attribute-value )
//! attribute-value = xtext                                  ; RFC 3461 §4
//! ```
//!
//! Only attributes the upstream announced in its EHLO reply are sent. mailmoat sends
//! what it knows before the client speaks: ADDR and PORT (the client), DESTADDR and
//! DESTPORT (where it connected), and NAME / REVERSE_NAME as `[UNAVAILABLE]` because
//! mailmoat does no DNS look-ups (without them Postfix would keep the name it found for
//! mailmoat's own address, `localhost`). HELO, PROTO and LOGIN are not sent: the
//! client's own EHLO and AUTH reach the upstream after the XCLIENT and set them.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use super::parse;

/// Who the client is, for XCLIENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The real client's address and port.
    pub client: SocketAddr,
    /// The address and port the client connected to.
    pub destination: SocketAddr,
}

/// The attribute names of an `XCLIENT` EHLO keyword line (`XCLIENT NAME ADDR PORT`), or
/// `None` when the line is another keyword.
pub fn announced(ehlo_line: &[u8]) -> Option<Vec<&[u8]>> {
    let keyword = parse::ehlo_keyword(ehlo_line);
    if !keyword.eq_ignore_ascii_case(b"XCLIENT") {
        return None;
    }
    Some(
        ehlo_line[keyword.len()..]
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|name| !name.is_empty())
            .collect(),
    )
}

/// The XCLIENT command line (CRLF included) with the attributes in `announced`, or
/// `None` when the upstream does not accept ADDR (then nothing worth sending remains).
pub fn command(identity: &Identity, announced: &[&[u8]]) -> Option<Bytes> {
    let has = |name: &str| {
        announced
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name.as_bytes()))
    };
    if !has("ADDR") {
        return None;
    }
    let attributes = [
        ("ADDR", address(identity.client.ip())),
        ("PORT", identity.client.port().to_string()),
        ("NAME", "[UNAVAILABLE]".to_owned()),
        ("REVERSE_NAME", "[UNAVAILABLE]".to_owned()),
        ("DESTADDR", address(identity.destination.ip())),
        ("DESTPORT", identity.destination.port().to_string()),
    ];
    let mut line = b"XCLIENT".to_vec();
    for (name, value) in attributes {
        if has(name) {
            line.push(b' ');
            line.extend_from_slice(name.as_bytes());
            line.push(b'=');
            xtext(value.as_bytes(), &mut line);
        }
    }
    line.extend_from_slice(b"\r\n");
    Some(Bytes::from(line))
}

/// XCLIENT_README: an IPv6 address is written with an `IPV6:` prefix.
fn address(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    }
}

/// RFC 3461 §4: `xchar` is `!`..`~` except `+` and `=`; anything else is `+XX`.
fn xtext(value: &[u8], out: &mut Vec<u8>) {
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("+{b:02X}").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(client: &str, destination: &str) -> Identity {
        Identity {
            client: client.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn only_announced_attributes_are_sent() {
        let id = identity("203.0.113.7:51234", "192.0.2.1:25");
        let names = announced(b"XCLIENT NAME ADDR PROTO HELO").unwrap();
        assert_eq!(
            command(&id, &names).unwrap(),
            "XCLIENT ADDR=203.0.113.7 NAME=[UNAVAILABLE]\r\n"
        );
        let names =
            announced(b"xclient NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN DESTADDR DESTPORT")
                .unwrap();
        assert_eq!(
            command(&id, &names).unwrap(),
            "XCLIENT ADDR=203.0.113.7 PORT=51234 NAME=[UNAVAILABLE] \
REVERSE_NAME=[UNAVAILABLE] DESTADDR=192.0.2.1 DESTPORT=25\r\n"
        );
        assert_eq!(
            command(&id, &announced(b"XCLIENT NAME HELO").unwrap()),
            None
        );
        assert_eq!(announced(b"XFORWARD NAME ADDR"), None);
        assert_eq!(announced(b"XCLIENTX ADDR"), None);
    }

    #[test]
    fn ipv6_addresses_are_prefixed_and_mapped_ipv4_is_plain() {
        let id = identity("[2001:db8::7]:1", "[::ffff:192.0.2.1]:587");
        assert_eq!(
            command(&id, &[b"ADDR", b"DESTADDR"]).unwrap(),
            "XCLIENT ADDR=IPV6:2001:db8::7 DESTADDR=192.0.2.1\r\n"
        );
    }

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        let mut out = Vec::new();
        xtext(b"a+b=c d\r\x7f[x]", &mut out);
        assert_eq!(out, b"a+2Bb+3Dc+20d+0D+7F[x]");
    }
}
