//! The SMTP commands the proxy writes to the upstream before TLS, rebuilt from its own
//! parse (DESIGN §3, canonical forwarding; ARCHITECTURE.md, "before TLS the upstream
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
        Verb::Mail => envelope(&mut out, b"MAIL FROM:", b"FROM:", args, reply::MAIL_SYNTAX)?,
        Verb::Rcpt => envelope(&mut out, b"RCPT TO:", b"TO:", args, reply::RCPT_SYNTAX)?,
        Verb::Data | Verb::Rset | Verb::Quit => {
            if !args.is_empty() {
                return Err(Refusal(reply::NO_PARAMS));
            }
            out.put_slice(verb_name(command.verb));
        }
        // RFC 5321 §4.1.1.9: NOOP's argument "has no effect"; it is not passed on.
        Verb::Noop => out.put_slice(b"NOOP"),
        Verb::Vrfy | Verb::Expn | Verb::Help => {
            out.put_slice(verb_name(command.verb));
            if !args.is_empty() || command.verb != Verb::Help {
                out.put_u8(b' ');
                words(&mut out, args).ok_or(Refusal(reply::ARGUMENT_SYNTAX))?;
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

/// `Domain / address-literal` (RFC 5321 §4.1.2), read as hosts name themselves: letters,
/// digits, `-`, `.` and `_` (Windows host names), or `[...]` holding an IPv4 or
/// `IPv6:` address. Returns the whole argument, which is then safe to write as it is.
pub fn domain_or_literal(arg: &[u8]) -> Option<&[u8]> {
    let valid = match arg {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b":.-".contains(&b))
        }
        _ => {
            !arg.is_empty()
                && arg[0] != b'.'
                && arg
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        }
    };
    (valid && arg.len() <= 255).then_some(arg)
}

/// `MAIL FROM:<path> [SP params]` / `RCPT TO:<path> [SP params]` (RFC 5321 §4.1.1.2-3),
/// written as `prefix <address>` and each parameter after one SP.
fn envelope(
    out: &mut BytesMut,
    prefix: &[u8],
    keyword: &[u8],
    args: &[u8],
    syntax: &'static [u8],
) -> Result<(), Refusal> {
    let refuse = Refusal(syntax);
    let rest = strip_prefix_ignore_case(args, keyword).ok_or(refuse)?;
    let rest = rest.trim_ascii_start();
    let (address, rest) = path(rest).ok_or(refuse)?;
    out.put_slice(prefix);
    out.put_u8(b'<');
    out.put_slice(address);
    out.put_u8(b'>');
    if !rest.is_empty() && rest[0] != b' ' {
        return Err(refuse);
    }
    for parameter in rest.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
        esmtp_param(out, parameter).ok_or(refuse)?;
    }
    Ok(())
}

fn strip_prefix_ignore_case<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &text[prefix.len()..])
}

/// A reverse- or forward-path: `<>`, `<address>`, or an address without brackets (as
/// Postfix accepts by default). Returns the address and what follows the path.
///
/// The address is read, not interpreted: no control character, DEL, `<` or `>`
/// anywhere, and no space outside a quoted local part (`"john doe"@example.org`, RFC
/// 5321 §4.1.2 `Quoted-string`, with `\` escapes); UTF-8 passes (RFC 6531).
fn path(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let bracketed = text.first() == Some(&b'<');
    let body = if bracketed { &text[1..] } else { text };
    let mut in_quotes = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in body.iter().enumerate() {
        if b < 0x20 || b == 0x7f {
            return None;
        }
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b'>' if !in_quotes && bracketed => {
                end = Some(i);
                break;
            }
            b' ' if !in_quotes && !bracketed => {
                end = Some(i);
                break;
            }
            b'<' | b'>' | b' ' if !in_quotes => return None,
            _ => {}
        }
    }
    let end = match end {
        Some(end) => end,
        None if !bracketed && !in_quotes => body.len(),
        None => return None,
    };
    let address = &body[..end];
    let rest = if bracketed {
        &body[end + 1..]
    } else {
        &body[end..]
    };
    // An address without brackets must be one: `FROM:` alone is no path.
    if !bracketed && address.is_empty() {
        return None;
    }
    Some((address, rest))
}

/// `esmtp-param = esmtp-keyword ["=" esmtp-value]`, `esmtp-keyword = (ALPHA / DIGIT)
/// *(ALPHA / DIGIT / "-")`, `esmtp-value = 1*(%d33-60 / %d62-126)` (RFC 5321 §4.1.2),
/// UTF-8 allowed in the value (RFC 6531 §3.3). Written as ` KEYWORD[=value]`.
fn esmtp_param(out: &mut BytesMut, parameter: &[u8]) -> Option<()> {
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
            && v.iter()
                .all(|&b| (0x21..=0x7e).contains(&b) && b != b'=' || b >= 0x80)
    });
    if !keyword_ok || !value_ok {
        return None;
    }
    out.put_u8(b' ');
    out.put_slice(&keyword.to_ascii_uppercase());
    if let Some(value) = value {
        out.put_u8(b'=');
        out.put_slice(value);
    }
    Some(())
}

/// Words of printable text (VRFY's user, HELP's topic) written with one SP between
/// them; at least one word.
fn words(out: &mut BytesMut, args: &[u8]) -> Option<()> {
    let mut any = false;
    for word in args
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty())
    {
        if word.iter().any(|&b| b < 0x21 || b == 0x7f) {
            return None;
        }
        if any {
            out.put_u8(b' ');
        }
        out.put_slice(word);
        any = true;
    }
    any.then_some(())
}

#[cfg(test)]
mod tests {
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
            ("vrfy  alice  smith", "VRFY alice smith\r\n"),
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
    fn nothing_written_holds_a_control_character_or_a_second_line() {
        // The parser refuses control characters before this module sees them; the
        // writer adds exactly one CRLF.
        for input in ["MAIL FROM:<a@b> X=1", "EHLO a", "VRFY x y"] {
            let out = canonical(input).unwrap();
            assert_eq!(out.matches("\r\n").count(), 1);
            assert!(out.ends_with("\r\n"));
            assert!(!out[..out.len() - 2].bytes().any(|b| b < 0x20 || b == 0x7f));
        }
    }
}
