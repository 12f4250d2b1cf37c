//! The EHLO reply as the client sees it (ARCHITECTURE.md §2): the upstream's own
//! keywords in its order, minus what must not cross the proxy, plus STARTTLS before TLS.

use bytes::{BufMut, Bytes, BytesMut};

use super::parse;
use crate::policy::{Mechanisms, without_channel_binding};
use crate::proto::line::Line;

/// What the client is shown of an upstream's positive EHLO reply.
pub struct Keywords {
    /// The greeting text, then each keyword line kept, without code or separator.
    pub kept: Vec<Bytes>,
    /// The upstream announced PIPELINING (RFC 2920).
    pub pipelining: bool,
}

/// The keyword lines of `lines` a client may see through the proxy.
pub fn keywords(lines: &[Line], tls_active: bool) -> Keywords {
    let mut keywords = Keywords {
        kept: Vec::with_capacity(lines.len() + 1),
        pipelining: false,
    };
    for (index, line) in lines.iter().enumerate() {
        let text = parse::reply_line(&line.text).map_or(&b""[..], |r| r.text);
        let text = line.text.slice_ref(text);
        if index == 0 {
            keywords.kept.push(text); // the domain and greeting
            continue;
        }
        let keyword = parse::ehlo_keyword(&text);
        let is = |name: &[u8]| keyword.eq_ignore_ascii_case(name);
        keywords.pipelining |= is(b"PIPELINING");
        // The proxy owns TLS and speaks alone for the local link; CHUNKING (and
        // BINARYMIME, which needs it) never cross: BDAT is never forwarded (§5).
        if is(b"STARTTLS")
            || is(b"XCLIENT")
            || is(b"XFORWARD")
            || is(b"PIPECONNECT")
            || is(b"CHUNKING")
            || is(b"BINARYMIME")
        {
            continue;
        }
        if is(b"AUTH") {
            // No login option before TLS (§3); after it, no channel binding (RFC 5802
            // §6), which cannot cross a TLS-terminating proxy.
            if tls_active && let Some(auth) = auth_without_channel_binding(&text) {
                keywords.kept.push(auth);
            }
            continue;
        }
        keywords.kept.push(text);
    }
    keywords
}

/// `AUTH` keyword line minus channel-binding mechanisms; `None` when nothing remains.
fn auth_without_channel_binding(text: &Bytes) -> Option<Bytes> {
    let keyword = parse::ehlo_keyword(text);
    let mechanisms = text[keyword.len()..]
        .split(|&b| b == b' ' || b == b'\t' || b == b'=')
        .filter(|m| !m.is_empty());
    match without_channel_binding(keyword, mechanisms) {
        Mechanisms::Unchanged => Some(text.clone()),
        Mechanisms::Without(line) => Some(line.freeze()),
        Mechanisms::Empty => None,
    }
}

/// A multi-line 250 reply of `lines` (RFC 5321 §4.1.1.1), with STARTTLS last when
/// `offer_starttls`.
pub fn reply(lines: &[Bytes], offer_starttls: bool) -> BytesMut {
    let starttls: &[Bytes] = if offer_starttls {
        &[Bytes::from_static(b"STARTTLS")]
    } else {
        &[]
    };
    let all = lines.len() + starttls.len();
    let mut out = BytesMut::new();
    for (index, text) in lines.iter().chain(starttls).enumerate() {
        out.put_slice(if index + 1 == all { b"250 " } else { b"250-" });
        out.put_slice(text);
        out.put_slice(b"\r\n");
    }
    out
}
