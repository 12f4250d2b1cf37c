//! The envelope between the legacy MTA and the recipient's MX (ARCHITECTURE.md §11):
//! which ESMTP parameters the relay takes from the legacy MTA, which recipient domain a
//! transaction goes to, and the `MAIL`/`RCPT` lines the MX gets.
//!
//! Why this shape: the relay keeps no queue, so it can neither convert a message nor
//! send a delivery notification of its own. A parameter the MX does not offer is
//! therefore dropped only where RFC 3461/1870 let a relay drop it; where dropping would
//! change what the MX does with the message (`BODY=8BITMIME`, `SMTPUTF8`), the relay
//! refuses, and the legacy MTA bounces as it would for any MX without the extension.
//! Like the inbound side, the MX hears only lines mailmoat wrote itself.

use bytes::{Bytes, BytesMut};

use crate::proto::smtp::canonical::{Envelope, EnvelopeArgs, Param};
use crate::proto::smtp::parse::ehlo_keyword;

/// Why the relay answers a command itself: the reply, CRLF included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub &'static [u8]);

mod reply {
    pub const UNKNOWN_PARAMETER: &[u8] = b"555 5.5.4 Unsupported parameter\r\n";
    pub const BAD_PARAMETER: &[u8] = b"501 5.5.4 Bad parameter value\r\n";
    pub const DUPLICATE_PARAMETER: &[u8] = b"501 5.5.4 Parameter given twice\r\n";
    pub const NO_DOMAIN: &[u8] = b"550 5.1.3 Recipient without a domain is not relayed\r\n";
    pub const ADDRESS_LITERAL: &[u8] =
        b"550 5.1.2 Recipient at an address literal is not relayed\r\n";
    pub const BAD_DOMAIN: &[u8] = b"553 5.1.2 Recipient domain is not a valid host name\r\n";
    pub const TOO_BIG: &[u8] = b"552 5.3.4 Message size exceeds the recipient's limit\r\n";
    pub const NO_8BITMIME: &[u8] =
        b"554 5.6.3 Recipient's server does not accept 8-bit MIME; the relay does not convert\r\n";
    pub const NO_SMTPUTF8: &[u8] =
        b"553 5.6.7 Recipient's server does not accept internationalized addresses\r\n";
}

/// What an MX's EHLO reply offers (RFC 5321 §4.1.1.1), as far as the relay uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `SIZE [limit]` (RFC 1870): `Some(0)` means offered without a limit.
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `DSN` (RFC 3461).
    pub dsn: bool,
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
}

impl Extensions {
    /// Reads the text of each line of an EHLO reply (after the code and separator). The
    /// first line is the greeting and names no extension.
    pub fn from_ehlo_reply<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut offered = Extensions::default();
        for text in lines.into_iter().skip(1) {
            let keyword = ehlo_keyword(text);
            let argument = text[keyword.len()..].trim_ascii();
            match keyword.to_ascii_uppercase().as_slice() {
                // A limit that does not parse is read as none: the MX then judges the
                // size itself, at the end of data.
                b"SIZE" => {
                    offered.size = Some(
                        std::str::from_utf8(argument)
                            .ok()
                            .and_then(|text| text.parse().ok())
                            .unwrap_or(0),
                    )
                }
                b"8BITMIME" => offered.eight_bit_mime = true,
                b"SMTPUTF8" => offered.smtputf8 = true,
                b"DSN" => offered.dsn = true,
                b"PIPELINING" => offered.pipelining = true,
                b"STARTTLS" => offered.starttls = true,
                _ => {}
            }
        }
        offered
    }
}

/// What the legacy MTA's `MAIL` command asks of the message, checked against what the
/// relay offers it: `SIZE`, `BODY` (7BIT, 8BITMIME), `SMTPUTF8`, and DSN's `RET` and
/// `ENVID`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailRequirements {
    /// The size the client declared.
    pub size: Option<u64>,
    /// `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// `SMTPUTF8`: the envelope or headers hold UTF-8 addresses.
    pub smtputf8: bool,
}

/// Checks the parameters of the legacy MTA's `MAIL` against those the relay offers in
/// its own EHLO reply (RFC 5321 §4.1.1.2: an unoffered one gets `555`).
pub fn mail_requirements(args: &EnvelopeArgs<'_>) -> Result<MailRequirements, Refusal> {
    let mut wants = MailRequirements::default();
    check_once(&args.params)?;
    for param in &args.params {
        match (param.keyword.to_ascii_uppercase().as_slice(), param.value) {
            (b"SIZE", Some(value)) => wants.size = Some(digits(value)?),
            (b"BODY", Some(value)) if value.eq_ignore_ascii_case(b"7BIT") => {}
            (b"BODY", Some(value)) if value.eq_ignore_ascii_case(b"8BITMIME") => {
                wants.eight_bit = true
            }
            (b"SMTPUTF8", None) => wants.smtputf8 = true,
            // RFC 3461 §4.3, §4.4.
            (b"RET", Some(value))
                if value.eq_ignore_ascii_case(b"FULL") || value.eq_ignore_ascii_case(b"HDRS") => {}
            (b"ENVID", Some(value)) if is_xtext(value) && value.len() <= 100 => {}
            (b"SIZE" | b"BODY" | b"RET" | b"ENVID" | b"SMTPUTF8", _) => {
                return Err(Refusal(reply::BAD_PARAMETER));
            }
            _ => return Err(Refusal(reply::UNKNOWN_PARAMETER)),
        }
    }
    Ok(wants)
}

/// Checks the parameters of the legacy MTA's `RCPT`: DSN's `NOTIFY` and `ORCPT` (RFC
/// 3461 §4.1, §4.2) are the only ones offered.
pub fn check_rcpt_params(args: &EnvelopeArgs<'_>) -> Result<(), Refusal> {
    check_once(&args.params)?;
    for param in &args.params {
        match (param.keyword.to_ascii_uppercase().as_slice(), param.value) {
            (b"NOTIFY", Some(value)) if is_notify(value) => {}
            (b"ORCPT", Some(value)) if is_orcpt(value) => {}
            (b"NOTIFY" | b"ORCPT", _) => return Err(Refusal(reply::BAD_PARAMETER)),
            _ => return Err(Refusal(reply::UNKNOWN_PARAMETER)),
        }
    }
    Ok(())
}

/// A recipient domain as DNS knows it: lower-case ASCII, internationalized labels as
/// A-labels (RFC 5890), no trailing dot. The key of a transaction: one per
/// transaction (ARCHITECTURE.md §11).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    /// The domain as DNS names it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The domain of a forward-path's mailbox (after its last `@`, outside any quoted local
/// part, which the canonical parse already checked).
pub fn recipient_domain(address: &[u8]) -> Result<Domain, Refusal> {
    let Some(at) = address.iter().rposition(|&b| b == b'@') else {
        // `<Postmaster>` alone names the relay's own postmaster, not a remote one.
        return Err(Refusal(reply::NO_DOMAIN));
    };
    let domain = &address[at + 1..];
    if domain.starts_with(b"[") {
        return Err(Refusal(reply::ADDRESS_LITERAL));
    }
    let text = std::str::from_utf8(domain).map_err(|_| Refusal(reply::BAD_DOMAIN))?;
    let text = text.strip_suffix('.').unwrap_or(text);
    // UTS #46 processing turns U-labels into A-labels and folds case; it refuses what
    // no resolver could look up.
    let ascii = idna::domain_to_ascii_strict(text).map_err(|_| Refusal(reply::BAD_DOMAIN))?;
    let host_name = !ascii.is_empty()
        && ascii.len() <= 253
        && ascii.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && ascii.contains('.');
    if !host_name {
        return Err(Refusal(reply::BAD_DOMAIN));
    }
    Ok(Domain(ascii))
}

/// The `MAIL` line for an MX offering `mx`, CRLF included: each parameter the MX
/// offers, DSN's dropped where it offers none (RFC 3461 §4.1: a relay without DSN
/// downstream may), or the refusal where the message needs what the MX lacks.
pub fn mail_line(
    args: &EnvelopeArgs<'_>,
    wants: &MailRequirements,
    mx: &Extensions,
) -> Result<Bytes, Refusal> {
    if wants.eight_bit && !mx.eight_bit_mime {
        // RFC 6152 §3: 8-bit data goes only to a server that offers 8BITMIME; the
        // alternative, conversion, would break signatures (ARCHITECTURE.md §11).
        return Err(Refusal(reply::NO_8BITMIME));
    }
    if wants.smtputf8 && !mx.smtputf8 {
        // RFC 6531 §3.2 (no downgrade).
        return Err(Refusal(reply::NO_SMTPUTF8));
    }
    if let (Some(size), Some(limit)) = (wants.size, mx.size)
        && limit > 0
        && size > limit
    {
        return Err(Refusal(reply::TOO_BIG));
    }
    let keep = |param: &Param<'_>| {
        if param.is("SIZE") {
            mx.size.is_some()
        } else if param.is("BODY") {
            mx.eight_bit_mime
        } else if param.is("RET") || param.is("ENVID") {
            mx.dsn
        } else {
            // SMTPUTF8, checked above.
            true
        }
    };
    Ok(line(Envelope::Mail, args, keep))
}

/// The `RCPT` line for an MX offering `mx`, CRLF included: DSN's parameters only when
/// it offers DSN.
pub fn rcpt_line(args: &EnvelopeArgs<'_>, mx: &Extensions) -> Bytes {
    line(Envelope::Rcpt, args, |_| mx.dsn)
}

fn line(which: Envelope, args: &EnvelopeArgs<'_>, keep: impl Fn(&Param<'_>) -> bool) -> Bytes {
    let mut out = BytesMut::with_capacity(args.address.len() + 64);
    args.write(which, &mut out, keep);
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// RFC 5321 §4.1.2 names each parameter once per command.
fn check_once(params: &[Param<'_>]) -> Result<(), Refusal> {
    for (i, param) in params.iter().enumerate() {
        if params[..i]
            .iter()
            .any(|earlier| earlier.keyword.eq_ignore_ascii_case(param.keyword))
        {
            return Err(Refusal(reply::DUPLICATE_PARAMETER));
        }
    }
    Ok(())
}

/// `size-value = 1*20DIGIT` (RFC 1870 §3).
fn digits(value: &[u8]) -> Result<u64, Refusal> {
    if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return Err(Refusal(reply::BAD_PARAMETER));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(Refusal(reply::BAD_PARAMETER))
}

/// `xtext = *( xchar / hexchar )`, `xchar` = `!`..`~` but `+` and `=`, `hexchar = "+"
/// 2(%x30-39 / %x41-46)` (RFC 3461 §4).
fn is_xtext(value: &[u8]) -> bool {
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        let ok = match b {
            b'+' => (0..2).all(|_| {
                bytes
                    .next()
                    .is_some_and(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
            }),
            b'=' => false,
            _ => (0x21..=0x7e).contains(&b),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `NOTIFY=NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY` (RFC 3461 §4.1).
fn is_notify(value: &[u8]) -> bool {
    if value.eq_ignore_ascii_case(b"NEVER") {
        return true;
    }
    value.split(|&b| b == b',').all(|word| {
        [&b"SUCCESS"[..], b"FAILURE", b"DELAY"]
            .iter()
            .any(|known| word.eq_ignore_ascii_case(known))
    })
}

/// `ORCPT=addr-type ";" xtext` (RFC 3461 §4.2), `addr-type` an atom.
fn is_orcpt(value: &[u8]) -> bool {
    let Some(semicolon) = value.iter().position(|&b| b == b';') else {
        return false;
    };
    let (kind, address) = (&value[..semicolon], &value[semicolon + 1..]);
    !kind.is_empty()
        && kind.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
        && !address.is_empty()
        && value.len() <= 500
        && is_xtext(address)
}

#[cfg(test)]
mod tests;
