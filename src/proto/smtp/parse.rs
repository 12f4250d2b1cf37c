//! nom parsers for the parts of SMTP the proxy must understand (RFC 5321 §4.1, RFC 3030,
//! RFC 4954). Each parser takes one whole line from the framer, never the socket.

use crate::proto::command::{self, SplitError, Verbs, is_wsp};
use nom::{
    IResult, Parser,
    branch::alt,
    bytes::complete::{tag, tag_no_case, take_till1, take_while_m_n},
    character::complete::digit1,
    combinator::{all_consuming, eof, map, map_res, opt, rest},
    sequence::preceded,
};

/// Why a line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A command line holds a control character (NUL, bare CR, ...) that SMTP
    /// implementations split differently; forwarding it could desynchronise them.
    #[error("control character in command line")]
    ControlCharacter,
    /// The line is empty or holds only white space.
    #[error("empty command line")]
    Empty,
    /// Parameters that do not follow the command's grammar.
    #[error("bad parameters")]
    BadParameters,
    /// An upstream line that is not `Reply-code [("-" / SP) textstring]`.
    #[error("malformed reply line")]
    MalformedReply,
}

/// The split's refusals are the command parser's.
impl From<SplitError> for Error {
    fn from(error: SplitError) -> Self {
        match error {
            SplitError::ControlCharacter => Error::ControlCharacter,
            SplitError::Empty => Error::Empty,
        }
    }
}

/// The commands the proxy tells apart. Everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    Etrn,
    XClient,
    XForward,
    Other,
}

impl Verb {
    /// The verb's name for logs, or `unknown`: never the client's own text.
    pub fn label(self) -> &'static str {
        VERBS.label(self)
    }
}

/// The verbs by name; everything else is `Other`.
const VERBS: Verbs<Verb> = Verbs {
    names: &[
        ("EHLO", Verb::Ehlo),
        ("HELO", Verb::Helo),
        ("STARTTLS", Verb::StartTls),
        ("AUTH", Verb::Auth),
        ("MAIL", Verb::Mail),
        ("RCPT", Verb::Rcpt),
        ("DATA", Verb::Data),
        ("BDAT", Verb::Bdat),
        ("RSET", Verb::Rset),
        ("NOOP", Verb::Noop),
        ("QUIT", Verb::Quit),
        ("VRFY", Verb::Vrfy),
        ("EXPN", Verb::Expn),
        ("HELP", Verb::Help),
        ("ETRN", Verb::Etrn),
        ("XCLIENT", Verb::XClient),
        ("XFORWARD", Verb::XForward),
    ],
    other: Verb::Other,
};

/// One client command line, split into its verb and the rest.
pub type Command<'a> = command::Command<'a, Verb>;

/// `command = *WSP verb [1*WSP parameters] *WSP` (RFC 5321 §4.1.1, made liberal in white
/// space and letter case the way Postfix and Exim read commands, so that the proxy
/// classifies a line exactly as the upstream will).
///
/// Lines holding control characters other than HTAB are refused: implementations differ
/// on whether a bare CR or a NUL ends a command.
pub fn command(line: &[u8]) -> Result<Command<'_>, Error> {
    Ok(VERBS.command(line)?)
}

/// `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]`, `end-marker = "LAST"`
/// (RFC 3030 §2); `args` is what follows the verb. Returns the chunk size and whether it
/// is the last chunk.
pub fn bdat_args(args: &[u8]) -> Result<(u64, bool), Error> {
    let size = map_res(digit1, |d: &[u8]| {
        std::str::from_utf8(d)
            .map_err(|_| ())
            .and_then(|s| s.parse::<u64>().map_err(|_| ()))
    });
    let last = opt(preceded(
        take_while_m_n(1, usize::MAX, is_wsp),
        tag_no_case("LAST"),
    ));
    all_consuming((size, last))
        .parse(args)
        .map(|(_, (size, last))| (size, last.is_some()))
        .map_err(|_: nom::Err<nom::error::Error<&[u8]>>| Error::BadParameters)
}

/// `auth-command = "AUTH" SP sasl-mech [SP initial-response]` (RFC 4954 §4); `args` is
/// what follows the verb. Returns the mechanism and the initial response, if any.
pub fn auth_args(args: &[u8]) -> Result<(&[u8], Option<&[u8]>), Error> {
    type MechanismAndResponse<'a> = (&'a [u8], Option<&'a [u8]>);
    let parsed: IResult<&[u8], MechanismAndResponse<'_>> = (
        take_till1(is_wsp),
        opt(preceded(take_while_m_n(1, usize::MAX, is_wsp), rest)),
    )
        .parse(args);
    match parsed {
        Ok((_, (mech, ir))) => Ok((mech, ir.filter(|ir| !ir.is_empty()))),
        Err(_) => Err(Error::BadParameters),
    }
}

/// One line of an upstream reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    /// The three-digit reply code.
    pub code: u16,
    /// This is the reply's last line (`SP` or nothing after the code, not `-`).
    pub last: bool,
    /// The text after the code and its separator.
    pub text: &'a [u8],
}

/// `Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF`,
/// `Reply-code = %x32-35 %x30-35 %x30-39` (RFC 5321 §4.2). Liberal: any digits, and a
/// code alone on the line.
pub fn reply_line(line: &[u8]) -> Result<ReplyLine<'_>, Error> {
    let code = map_res(
        take_while_m_n(3, 3, |b: u8| b.is_ascii_digit()),
        |d: &[u8]| {
            std::str::from_utf8(d)
                .map_err(|_| ())
                .and_then(|s| s.parse::<u16>().map_err(|_| ()))
        },
    );
    let separator = alt((
        map(tag("-"), |_| false),
        map(tag(" "), |_| true),
        map(eof, |_| true),
    ));
    let parsed: IResult<&[u8], (u16, bool)> = (code, separator).parse(line);
    match parsed {
        Ok((text, (code, last))) => Ok(ReplyLine { code, last, text }),
        Err(_) => Err(Error::MalformedReply),
    }
}

/// `ehlo-line = ehlo-keyword *( SP / "=" ehlo-param )` (RFC 5321 §4.1.1.1; the `=` form
/// is the pre-RFC 4954 `AUTH=LOGIN` that old servers still send). Returns the keyword.
pub fn ehlo_keyword(text: &[u8]) -> &[u8] {
    let end = text
        .iter()
        .position(|&b| is_wsp(b) || b == b'=')
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_classified_in_any_letter_case_and_spacing() {
        let table: &[(&[u8], Verb, &[u8])] = &[
            (b"EHLO client.example", Verb::Ehlo, b"client.example"),
            (b"ehlo client.example", Verb::Ehlo, b"client.example"),
            (b"AUTH PLAIN AGEAYg==", Verb::Auth, b"PLAIN AGEAYg=="),
            (b"auth plain", Verb::Auth, b"plain"),
            (b"AuTh\tLOGIN", Verb::Auth, b"LOGIN"),
            (b"  AUTH   PLAIN  ", Verb::Auth, b"PLAIN"),
            (b"STARTTLS", Verb::StartTls, b""),
            (b"starttls ", Verb::StartTls, b""),
            (b"STARTTLS now", Verb::StartTls, b"now"),
            (b"MAIL FROM:<a@b>", Verb::Mail, b"FROM:<a@b>"),
            (b"BDAT 10 LAST", Verb::Bdat, b"10 LAST"),
            (b"XCLIENT ADDR=1.2.3.4", Verb::XClient, b"ADDR=1.2.3.4"),
            (b"xforward NAME=x", Verb::XForward, b"NAME=x"),
            (b"STARTTLX", Verb::Other, b""),
            (b"AUTH:", Verb::Other, b""),
            (b"MAIL\xc3\xa9 x", Verb::Other, b"x"),
        ];
        for (line, verb, args) in table {
            let cmd = command(line).unwrap();
            assert_eq!(
                (cmd.verb, cmd.args),
                (*verb, *args),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn control_characters_and_empty_lines_are_refused() {
        assert_eq!(command(b""), Err(Error::Empty));
        assert_eq!(command(b"   "), Err(Error::Empty));
        assert_eq!(command(b"NOOP\rAUTH PLAIN x"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\0"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\x0b"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\x7f"), Err(Error::ControlCharacter));
    }

    #[test]
    fn bdat_args_table() {
        assert_eq!(bdat_args(b"0"), Ok((0, false)));
        assert_eq!(bdat_args(b"1024 LAST"), Ok((1024, true)));
        assert_eq!(bdat_args(b"7 last"), Ok((7, true)));
        assert_eq!(bdat_args(b"7  LAST"), Ok((7, true)));
        assert_eq!(bdat_args(b""), Err(Error::BadParameters));
        assert_eq!(bdat_args(b"-1"), Err(Error::BadParameters));
        assert_eq!(bdat_args(b"10 LASTX"), Err(Error::BadParameters));
        assert_eq!(bdat_args(b"10 FIRST"), Err(Error::BadParameters));
        assert_eq!(
            bdat_args(b"99999999999999999999999"),
            Err(Error::BadParameters)
        );
    }

    #[test]
    fn auth_args_table() {
        assert_eq!(auth_args(b"PLAIN"), Ok((&b"PLAIN"[..], None)));
        assert_eq!(
            auth_args(b"PLAIN AGEAYg=="),
            Ok((&b"PLAIN"[..], Some(&b"AGEAYg=="[..])))
        );
        assert_eq!(
            auth_args(b"LOGIN\tdXNlcg=="),
            Ok((&b"LOGIN"[..], Some(&b"dXNlcg=="[..])))
        );
        assert_eq!(auth_args(b""), Err(Error::BadParameters));
    }

    #[test]
    fn reply_lines_table() {
        let table: &[(&[u8], u16, bool, &[u8])] = &[
            (
                b"250-legacy.example.test",
                250,
                false,
                b"legacy.example.test",
            ),
            (b"250 PIPELINING", 250, true, b"PIPELINING"),
            (b"250", 250, true, b""),
            (
                b"354 End data with <CR><LF>.<CR><LF>",
                354,
                true,
                b"End data with <CR><LF>.<CR><LF>",
            ),
            (
                b"502 5.5.2 Error: command not recognized",
                502,
                true,
                b"5.5.2 Error: command not recognized",
            ),
            (b"220-", 220, false, b""),
        ];
        for (line, code, last, text) in table {
            assert_eq!(
                reply_line(line),
                Ok(ReplyLine {
                    code: *code,
                    last: *last,
                    text
                })
            );
        }
        for bad in [&b"25 ok"[..], b"abc", b"2500 x", b"250x", b""] {
            assert_eq!(reply_line(bad), Err(Error::MalformedReply), "{bad:?}");
        }
    }

    #[test]
    fn ehlo_keywords() {
        assert_eq!(ehlo_keyword(b"AUTH PLAIN LOGIN"), b"AUTH");
        assert_eq!(ehlo_keyword(b"AUTH=LOGIN PLAIN"), b"AUTH");
        assert_eq!(ehlo_keyword(b"PIPELINING"), b"PIPELINING");
        assert_eq!(ehlo_keyword(b"SIZE 10240000"), b"SIZE");
    }
}
