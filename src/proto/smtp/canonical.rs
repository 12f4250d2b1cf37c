//! The SMTP commands the proxy writes to the upstream before TLS, rebuilt from its own
//! parse (ARCHITECTURE.md §3, canonical forwarding; ARCHITECTURE.md, "before TLS the upstream
//! hears only canonical commands").
//!
//! mailmoat's model of a legacy parser is never exact, so before TLS it does not forward
//! the client's line: it reads the command strictly enough to know every part of it,
//! then writes `VERB SP arguments CRLF` itself, in one spelling. A line it cannot read
//! whole is answered locally and never reaches the upstream. Reading is liberal where
//! real clients are (letter case, white space around the verb, `FROM: <a@b>`, an address
//! without angle brackets); writing is always the RFC 5321 §4.1 form.

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::{Command, Verb};

/// Why a command could not be rebuilt: the reply the client gets instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub &'static [u8]);

mod reply {
    pub const HELO_SYNTAX: &[u8] = b"501 5.5.4 Syntax: EHLO/HELO hostname\r\n";
    pub const MAIL_SYNTAX: &[u8] = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
    pub const RCPT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n";
    pub const NO_PARAMS: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
    pub const ARGUMENT_SYNTAX: &[u8] = b"501 5.5.4 Syntax error in parameters\r\n";
    pub const ETRN_SYNTAX: &[u8] = b"501 5.5.4 Syntax: ETRN domain\r\n";
}

/// The line the upstream gets for `command`, CRLF included, or the local refusal.
/// Only verbs the plaintext policy lets through are passed here; anything else is
/// refused as a syntax error.
pub fn line(command: &Command<'_>) -> Result<Bytes, Refusal> {
    let args = command.args;
    let mut out = BytesMut::with_capacity(args.len() + 16);
    match command.verb {
        Verb::Ehlo | Verb::Helo => {
            let domain = domain_or_literal(args).ok_or(Refusal(reply::HELO_SYNTAX))?;
            out.put_slice(if command.verb == Verb::Ehlo {
                b"EHLO "
            } else {
                b"HELO "
            });
            out.put_slice(domain);
        }
        Verb::Mail => envelope(&mut out, Envelope::Mail, args)?,
        Verb::Rcpt => envelope(&mut out, Envelope::Rcpt, args)?,
        Verb::Data | Verb::Rset | Verb::Quit => {
            if !args.is_empty() {
                return Err(Refusal(reply::NO_PARAMS));
            }
            out.put_slice(verb_name(command.verb));
        }
        // RFC 5321 §4.1.1.9: NOOP's argument "has no effect"; it is not passed on.
        Verb::Noop => out.put_slice(b"NOOP"),
        // `vrfy = "VRFY" SP String`, `expn = "EXPN" SP String`, `help = "HELP" [ SP
        // String ]` (RFC 5321 §4.1.1.6-8).
        Verb::Vrfy | Verb::Expn | Verb::Help => {
            out.put_slice(verb_name(command.verb));
            if !args.is_empty() || command.verb != Verb::Help {
                if !is_smtp_string(args) {
                    return Err(Refusal(reply::ARGUMENT_SYNTAX));
                }
                out.put_u8(b' ');
                out.put_slice(args);
            }
        }
        Verb::Etrn => {
            // RFC 1985 §3: `ETRN [@|#]domain`.
            let (prefix, domain) = match args.first() {
                Some(b'@' | b'#') => args.split_at(1),
                _ => (&args[..0], args),
            };
            let domain = domain_or_literal(domain).ok_or(Refusal(reply::ETRN_SYNTAX))?;
            out.put_slice(b"ETRN ");
            out.put_slice(prefix);
            out.put_slice(domain);
        }
        _ => return Err(Refusal(reply::ARGUMENT_SYNTAX)),
    }
    out.put_slice(b"\r\n");
    Ok(out.freeze())
}

fn verb_name(verb: Verb) -> &'static [u8] {
    match verb {
        Verb::Data => b"DATA",
        Verb::Rset => b"RSET",
        Verb::Quit => b"QUIT",
        Verb::Vrfy => b"VRFY",
        Verb::Expn => b"EXPN",
        Verb::Help => b"HELP",
        _ => b"",
    }
}

/// `Domain / address-literal` (RFC 5321 §4.1.2), read as hosts name themselves: labels
/// of letters, digits, `-` and `_` (Windows host names) and UTF-8 (RFC 6531), or
/// `[...]` holding `dcontent`. Returns the whole argument, which is then safe to write as
/// it is.
pub fn domain_or_literal(arg: &[u8]) -> Option<&[u8]> {
    ((is_domain(arg) && is_utf8(arg)) || is_address_literal(arg)).then_some(arg)
}

/// Bytes above ASCII pass only as UTF-8 (RFC 6531 §3.3): an upstream may read any other
/// sequence its own way.
fn is_utf8(text: &[u8]) -> bool {
    std::str::from_utf8(text).is_ok()
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`, with `_`
/// and UTF-8 allowed as real host names have them.
fn is_domain(text: &[u8]) -> bool {
    let label_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80;
    !text.is_empty()
        && text.len() <= 255
        && text.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.iter().all(|&b| label_char(b))
                && label[0] != b'-'
                && label[label.len() - 1] != b'-'
        })
}

/// `address-literal = "[" ... "]"`, its inside read as `1*dcontent`, `dcontent =
/// %d33-90 / %d94-126` (RFC 5321 §4.1.3).
fn is_address_literal(text: &[u8]) -> bool {
    text.strip_prefix(b"[")
        .and_then(|t| t.strip_suffix(b"]"))
        .is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| (33..=90).contains(&b) || (94..=126).contains(&b))
        })
}

/// `atext` (RFC 5322 §3.2.3), UTF-8 allowed (RFC 6531 §3.3).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`, `qtextSMTP = %d32-33 / %d35-91 /
/// %d93-126`, `quoted-pairSMTP = %d92 %d32-126` (RFC 5321 §4.1.2), UTF-8 allowed.
fn is_quoted_string(text: &[u8]) -> bool {
    let Some(inner) = text.strip_prefix(b"\"").and_then(|t| t.strip_suffix(b"\"")) else {
        return false;
    };
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        let ok = match b {
            b'\\' => bytes.next().is_some_and(|b| (32..=126).contains(b)),
            b'"' => false,
            _ => b >= 32 && b != 127,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `String = Atom / Quoted-string` (RFC 5321 §4.1.2).
fn is_smtp_string(text: &[u8]) -> bool {
    ((!text.is_empty() && text.iter().all(|&b| is_atext(b))) || is_quoted_string(text))
        && is_utf8(text)
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`, `Local-part = Dot-string /
/// Quoted-string`, `Dot-string = Atom *("." Atom)`.
fn is_mailbox(text: &[u8]) -> bool {
    let Some(at) = text.iter().rposition(|&b| b == b'@') else {
        return false;
    };
    let (local, domain) = (&text[..at], &text[at + 1..]);
    let dot_string = local
        .split(|&b| b == b'.')
        .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)));
    (dot_string || is_quoted_string(local)) && is_utf8(local) && domain_or_literal(domain).is_some()
}

/// Which envelope command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    Mail,
    Rcpt,
}

impl Envelope {
    /// The line's start as written: `MAIL FROM:` / `RCPT TO:`.
    fn prefix(self) -> &'static [u8] {
        match self {
            Envelope::Mail => b"MAIL FROM:",
            Envelope::Rcpt => b"RCPT TO:",
        }
    }
}

/// The arguments of `MAIL FROM:<path> [SP params]` / `RCPT TO:<path> [SP params]`
/// (RFC 5321 §4.1.1.2-3), each part checked against its grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeArgs<'a> {
    /// The address inside the brackets: empty for the null reverse-path `<>`.
    pub address: &'a [u8],
    /// The ESMTP parameters, in the client's order.
    pub params: Vec<Param<'a>>,
}

/// One ESMTP parameter of an envelope command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    /// As the client spelled it: compare ignoring case.
    pub keyword: &'a [u8],
    pub value: Option<&'a [u8]>,
}

impl Param<'_> {
    /// Whether this is the parameter `name` (ASCII, any case).
    pub fn is(&self, name: &str) -> bool {
        self.keyword.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Reads the arguments of a `MAIL` or `RCPT` command, or the syntax reply.
pub fn envelope_args(which: Envelope, args: &[u8]) -> Result<EnvelopeArgs<'_>, Refusal> {
    let (keyword, refuse) = match which {
        Envelope::Mail => (&b"FROM:"[..], Refusal(reply::MAIL_SYNTAX)),
        Envelope::Rcpt => (&b"TO:"[..], Refusal(reply::RCPT_SYNTAX)),
    };
    let rest = strip_prefix_ignore_case(args, keyword).ok_or(refuse)?;
    let (address, rest) = path(rest.trim_ascii_start()).ok_or(refuse)?;
    let address_ok = match which {
        // `Reverse-path = Path / "<>"`.
        Envelope::Mail => address.is_empty() || is_mailbox(address),
        // `Forward-path = Path`, and `<Postmaster>` (RFC 5321 §4.1.1.3).
        Envelope::Rcpt => address.eq_ignore_ascii_case(b"Postmaster") || is_mailbox(address),
    };
    if !address_ok || (!rest.is_empty() && rest[0] != b' ') {
        return Err(refuse);
    }
    let params = rest
        .split(|&b| b == b' ')
        .filter(|p| !p.is_empty())
        .map(esmtp_param)
        .collect::<Option<Vec<_>>>()
        .ok_or(refuse)?;
    Ok(EnvelopeArgs { address, params })
}

impl EnvelopeArgs<'_> {
    /// Writes `MAIL FROM:<address>` / `RCPT TO:<address>` and each parameter `keep`
    /// lets through after one SP, its keyword in upper case; no CRLF.
    pub fn write(&self, which: Envelope, out: &mut BytesMut, keep: impl Fn(&Param<'_>) -> bool) {
        out.put_slice(which.prefix());
        out.put_u8(b'<');
        out.put_slice(self.address);
        out.put_u8(b'>');
        for param in self.params.iter().filter(|p| keep(p)) {
            out.put_u8(b' ');
            out.put_slice(&param.keyword.to_ascii_uppercase());
            if let Some(value) = param.value {
                out.put_u8(b'=');
                out.put_slice(value);
            }
        }
    }
}

/// The canonical line of an envelope command: every parameter, as read.
fn envelope(out: &mut BytesMut, which: Envelope, args: &[u8]) -> Result<(), Refusal> {
    envelope_args(which, args)?.write(which, out, |_| true);
    Ok(())
}

fn strip_prefix_ignore_case<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &text[prefix.len()..])
}

/// A path: `<address>`, `<>`, or an address without brackets (as Postfix accepts by
/// default). A source route (`<@relay:user@host>`) is dropped, as RFC 5321 §4.1.1.3 lets
/// a server do. Returns the address (its grammar is checked by the caller) and what
/// follows the path.
fn path(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let (address, rest) = match text.strip_prefix(b"<") {
        Some(inner) => {
            // The closing bracket outside a quoted local part.
            let mut in_quotes = false;
            let mut escaped = false;
            let close = inner.iter().position(|&b| {
                let close = b == b'>' && !in_quotes;
                if escaped {
                    escaped = false;
                } else if b == b'\\' && in_quotes {
                    escaped = true;
                } else if b == b'"' {
                    in_quotes = !in_quotes;
                }
                close
            })?;
            (&inner[..close], &inner[close + 1..])
        }
        None => {
            let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
            if end == 0 {
                return None;
            }
            (&text[..end], &text[end..])
        }
    };
    let address = match address.first() {
        Some(b'@') => &address[address.iter().position(|&b| b == b':')? + 1..],
        _ => address,
    };
    Some((address, rest))
}

/// `esmtp-param = esmtp-keyword ["=" esmtp-value]`, `esmtp-keyword = (ALPHA / DIGIT)
/// *(ALPHA / DIGIT / "-")`, `esmtp-value = 1*(%d33-60 / %d62-126)` (RFC 5321 §4.1.2),
/// UTF-8 allowed in the value (RFC 6531 §3.3).
fn esmtp_param(parameter: &[u8]) -> Option<Param<'_>> {
    let (keyword, value) = match parameter.iter().position(|&b| b == b'=') {
        Some(i) => (&parameter[..i], Some(&parameter[i + 1..])),
        None => (parameter, None),
    };
    let keyword_ok = keyword.first().is_some_and(u8::is_ascii_alphanumeric)
        && keyword
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
    let value_ok = value.is_none_or(|v| {
        !v.is_empty()
            && is_utf8(v)
            && v.iter()
                .all(|&b| ((0x21..=0x7e).contains(&b) && b != b'=') || b >= 0x80)
    });
    (keyword_ok && value_ok).then_some(Param { keyword, value })
}

#[cfg(test)]
mod tests {
    use super::line as line_of;
    use super::*;
    use crate::proto::smtp::parse::command;

    fn canonical(line_text: &str) -> Result<String, String> {
        let command = command(line_text.as_bytes()).unwrap();
        line(&command)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|r| String::from_utf8_lossy(r.0).into_owned())
    }

    #[test]
    fn commands_are_rewritten_in_one_spelling() {
        let table = [
            ("ehlo client.example", "EHLO client.example\r\n"),
            ("  EhLo   [192.0.2.1]  ", "EHLO [192.0.2.1]\r\n"),
            ("EHLO [IPv6:2001:db8::1]", "EHLO [IPv6:2001:db8::1]\r\n"),
            ("HELO DESKTOP_01", "HELO DESKTOP_01\r\n"),
            ("mail from:<a@b.example>", "MAIL FROM:<a@b.example>\r\n"),
            ("MAIL FROM:<\"a>b\"@c>", "MAIL FROM:<\"a>b\"@c>\r\n"),
            ("MAIL FROM: <a@b.example>", "MAIL FROM:<a@b.example>\r\n"),
            ("MAIL FROM:a@b.example", "MAIL FROM:<a@b.example>\r\n"),
            ("MAIL FROM:<>", "MAIL FROM:<>\r\n"),
            (
                "MAIL FROM:<a@b> size=100  body=8BITMIME",
                "MAIL FROM:<a@b> SIZE=100 BODY=8BITMIME\r\n",
            ),
            (
                "MAIL FROM:<\"john doe\"@b> SMTPUTF8",
                "MAIL FROM:<\"john doe\"@b> SMTPUTF8\r\n",
            ),
            ("rcpt to:<Postmaster>", "RCPT TO:<Postmaster>\r\n"),
            (
                "RCPT TO:<x@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y",
                "RCPT TO:<x@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y\r\n",
            ),
            ("data", "DATA\r\n"),
            ("rset", "RSET\r\n"),
            ("quit", "QUIT\r\n"),
            ("noop anything at all", "NOOP\r\n"),
            ("vrfy  alice", "VRFY alice\r\n"),
            ("EXPN \"staff list\"", "EXPN \"staff list\"\r\n"),
            (
                "MAIL FROM:<@relay.example:a@b.example>",
                "MAIL FROM:<a@b.example>\r\n",
            ),
            ("help", "HELP\r\n"),
            ("etrn @example.org", "ETRN @example.org\r\n"),
        ];
        for (input, expected) in table {
            assert_eq!(canonical(input), Ok(expected.to_owned()), "{input:?}");
        }
    }

    #[test]
    fn what_cannot_be_read_whole_is_refused() {
        for input in [
            "EHLO",
            "EHLO two words",
            "EHLO a{5+}",
            "EHLO .x",
            "HELO x\"y",
            "MAIL FROM",
            "MAIL FROM:",
            "MAIL TO:<a@b>",
            "MAIL FROM:<a@b",
            "MAIL FROM:<a@b>x",
            "MAIL FROM:<a b@c>",
            "MAIL FROM:<a@b> =x",
            "MAIL FROM:<a@b> SIZE=",
            "MAIL FROM:<a@b> SIZE==1",
            "MAIL FROM:<a<b@c>",
            "RCPT TO:<\"unterminated@b>",
            "RCPT TO:<>",
            "MAIL FROM:!",
            "MAIL FROM:<a..b@c>",
            "MAIL FROM:<a@-b>",
            "MAIL FROM:<@relay>",
            "VRFY a b",
            "HELP a b",
            "DATA now",
            "RSET x",
            "QUIT bye",
            "VRFY",
            "ETRN",
            "ETRN #",
        ] {
            assert!(canonical(input).is_err(), "{input:?}");
        }
    }

    #[test]
    fn bytes_above_ascii_pass_only_as_utf8() {
        // Found by the smtp_session fuzz target: `EHLO c.exa\xff\xffle`.
        for line in [
            &b"EHLO c.exa\xff\xffle"[..],
            b"MAIL FROM:<a\xc3@b>",
            b"MAIL FROM:<a@b> X=\xff",
            b"VRFY \xfe",
        ] {
            let command = command(line).unwrap();
            assert!(line_of(&command).is_err(), "{line:?}");
        }
        for line in [
            &b"EHLO b\xc3\xbccher.example"[..],
            "MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8".as_bytes(),
        ] {
            let command = command(line).unwrap();
            assert!(line_of(&command).is_ok(), "{line:?}");
        }
    }

    #[test]
    fn nothing_written_holds_a_control_character_or_a_second_line() {
        // The parser refuses control characters before this module sees them; the
        // writer adds exactly one CRLF.
        for input in ["MAIL FROM:<a@b> X=1", "EHLO a", "VRFY x"] {
            let out = canonical(input).unwrap();
            assert_eq!(out.matches("\r\n").count(), 1);
            assert!(out.ends_with("\r\n"));
            assert!(!out[..out.len() - 2].bytes().any(|b| b < 0x20 || b == 0x7f));
        }
    }
}
