//! nom parsers for the parts of POP3 the proxy must understand (RFC 1939 §3, RFC 2449
//! §9, RFC 5034 §4). Each parser takes one whole line from the framer, without its line
//! end, never the socket.

use crate::proto::command::{self, SplitError, Verbs, is_wsp};
use nom::{
    IResult, Parser,
    branch::alt,
    bytes::complete::{tag, tag_no_case, take_till1, take_while, take_while1},
    combinator::{all_consuming, eof, map, opt, rest},
    sequence::preceded,
};

/// Why a line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A command line holds a control character (NUL, bare CR, ...) that POP3
    /// implementations split differently; forwarding it could desynchronise them.
    #[error("control character in command line")]
    ControlCharacter,
    /// The line is empty or holds only white space.
    #[error("empty command line")]
    Empty,
    /// Arguments that do not follow the command's grammar.
    #[error("bad arguments")]
    BadArguments,
    /// An upstream line that is neither `+OK`, `-ERR` nor an AUTH continuation.
    #[error("malformed status line")]
    MalformedStatus,
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

/// The commands the proxy tells apart (RFC 1939, RFC 2449 `CAPA`, RFC 2595 `STLS`,
/// RFC 5034 `AUTH`, RFC 6856 `UTF8`/`LANG`, Dovecot's `XCLIENT`). Everything else is
/// `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    Capa,
    Stls,
    User,
    Pass,
    Apop,
    Auth,
    Stat,
    List,
    Uidl,
    Retr,
    Top,
    Dele,
    Rset,
    Noop,
    Lang,
    Utf8,
    Quit,
    XClient,
    Other,
}

impl Keyword {
    /// The keyword's name for logs, or `unknown`: never the client's own text.
    pub fn label(self) -> &'static str {
        KEYWORDS.label(self)
    }
}

/// The keywords the proxy knows, by name; everything else is `Other`.
const KEYWORDS: Verbs<Keyword> = Verbs {
    names: &[
        ("CAPA", Keyword::Capa),
        ("STLS", Keyword::Stls),
        ("USER", Keyword::User),
        ("PASS", Keyword::Pass),
        ("APOP", Keyword::Apop),
        ("AUTH", Keyword::Auth),
        ("STAT", Keyword::Stat),
        ("LIST", Keyword::List),
        ("UIDL", Keyword::Uidl),
        ("RETR", Keyword::Retr),
        ("TOP", Keyword::Top),
        ("DELE", Keyword::Dele),
        ("RSET", Keyword::Rset),
        ("NOOP", Keyword::Noop),
        ("LANG", Keyword::Lang),
        ("UTF8", Keyword::Utf8),
        ("QUIT", Keyword::Quit),
        ("XCLIENT", Keyword::XClient),
    ],
    other: Keyword::Other,
};

/// One client command line, split into its keyword and the rest.
pub type Command<'a> = command::Command<'a, Keyword>;

/// `command = keyword *(SP param)`, `keyword = 3*4VCHAR`, `param = 1*pchar` (RFC 2449
/// §9; RFC 1939 §3: "a case-insensitive keyword, possibly followed by one or more
/// arguments"), made liberal in white space and keyword length so that the proxy
/// classifies a line the way lenient upstreams read it.
///
/// Lines holding control characters other than HTAB are refused: implementations differ
/// on whether a bare CR or a NUL ends a command.
pub fn command(line: &[u8]) -> Result<Command<'_>, Error> {
    Ok(KEYWORDS.command(line)?)
}

/// The first word of an upstream line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `+OK`
    Ok,
    /// `-ERR`
    Err,
    /// `+` SP: an AUTH challenge (RFC 5034 §4); only valid while AUTH is running.
    Continue,
}

/// One upstream status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine<'a> {
    /// Which kind of line.
    pub status: Status,
    /// The text after the status and its separator (response codes included).
    pub text: &'a [u8],
}

/// `single-line = status [SP text]`, `status = "+OK" / "-ERR"` (RFC 2449 §9, RFC 1939
/// §3), or `continue-req = "+" SP [base64]` (RFC 5034 §4).
///
/// Liberal with upstreams (ARCHITECTURE.md §10): any letter case, HTAB as a separator, a lone
/// `+` as a continuation with nothing after it.
pub fn status_line(line: &[u8]) -> Result<StatusLine<'_>, Error> {
    let separator = || alt((map(take_while1(is_wsp), |_| ()), map(eof, |_| ())));
    let parsed: IResult<&[u8], Status> = alt((
        map((tag_no_case("+OK"), separator()), |_| Status::Ok),
        map((tag_no_case("-ERR"), separator()), |_| Status::Err),
        map((tag("+"), separator()), |_| Status::Continue),
    ))
    .parse(line);
    match parsed {
        Ok((text, status)) => Ok(StatusLine { status, text }),
        Err(_) => Err(Error::MalformedStatus),
    }
}

/// One line of a CAPA reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability<'a> {
    /// The capability's name; empty for an empty line (relayed as is).
    pub tag: &'a [u8],
    /// The parameters as sent, after the white space that follows the tag.
    pub params: &'a [u8],
}

/// `capability = capa-tag *(SP param)`, `capa-tag = 1*cchar`, `param = 1*pchar`
/// (RFC 2449 §9). Liberal: any white space separates, and any line is accepted, since
/// capability lines are only ever relayed, filtered or extended.
pub fn capability(line: &[u8]) -> Capability<'_> {
    let parsed: IResult<&[u8], (&[u8], &[u8])> = (
        take_while(|b| !is_wsp(b)),
        preceded(take_while(is_wsp), rest),
    )
        .parse(line);
    match parsed {
        Ok((_, (tag, params))) => Capability { tag, params },
        Err(_) => Capability {
            tag: &[],
            params: line,
        },
    }
}

/// The words of a parameter list (`SASL PLAIN LOGIN`'s mechanisms, RFC 2449 §6.3).
pub fn params(params: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    params.split(|&b| is_wsp(b)).filter(|word| !word.is_empty())
}

/// `APOP name digest` (RFC 1939 §7); `args` is what follows the keyword. Returns the
/// name and the digest.
pub fn apop_args(args: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    all_consuming((
        take_till1(is_wsp),
        preceded(take_while1(is_wsp), take_till1(is_wsp)),
    ))
    .parse(args)
    .map(|(_, name_digest)| name_digest)
    .map_err(|_: nom::Err<nom::error::Error<&[u8]>>| Error::BadArguments)
}

/// `auth = "AUTH" SP sasl-mech [SP initial-response]` (RFC 5034 §4); `args` is what
/// follows the keyword. Returns the mechanism and the initial response, if any (`=` is
/// an empty one).
pub fn auth_args(args: &[u8]) -> Result<(&[u8], Option<&[u8]>), Error> {
    type MechanismAndResponse<'a> = (&'a [u8], Option<&'a [u8]>);
    let parsed: IResult<&[u8], MechanismAndResponse<'_>> =
        (take_till1(is_wsp), opt(preceded(take_while1(is_wsp), rest))).parse(args);
    match parsed {
        Ok((_, (mech, ir))) => Ok((mech, ir.filter(|ir| !ir.is_empty()))),
        Err(_) => Err(Error::BadArguments),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_classified_in_any_letter_case_and_spacing() {
        let table: &[(&[u8], Keyword, &[u8])] = &[
            (b"CAPA", Keyword::Capa, b""),
            (b"capa", Keyword::Capa, b""),
            (b"STLS", Keyword::Stls, b""),
            (b"stls ", Keyword::Stls, b""),
            (b"STLS now", Keyword::Stls, b"now"),
            (b"USER alice", Keyword::User, b"alice"),
            (b"uSeR\talice", Keyword::User, b"alice"),
            (b"  USER   alice  ", Keyword::User, b"alice"),
            (b"PASS pass word", Keyword::Pass, b"pass word"),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fb",
                Keyword::Apop,
                b"mrose c4c9334bac560ecc979e58001b3e22fb",
            ),
            (b"AUTH PLAIN AGEAYg==", Keyword::Auth, b"PLAIN AGEAYg=="),
            (b"AUTH", Keyword::Auth, b""),
            (b"LIST", Keyword::List, b""),
            (b"LIST 1", Keyword::List, b"1"),
            (b"UIDL", Keyword::Uidl, b""),
            (b"RETR 1", Keyword::Retr, b"1"),
            (b"TOP 1 10", Keyword::Top, b"1 10"),
            (b"top 1 10", Keyword::Top, b"1 10"),
            (b"STAT", Keyword::Stat, b""),
            (b"DELE 1", Keyword::Dele, b"1"),
            (b"RSET", Keyword::Rset, b""),
            (b"NOOP", Keyword::Noop, b""),
            (b"QUIT", Keyword::Quit, b""),
            (b"LANG", Keyword::Lang, b""),
            (b"UTF8", Keyword::Utf8, b""),
            (b"XCLIENT ADDR=1.2.3.4", Keyword::XClient, b"ADDR=1.2.3.4"),
            (b"XXXX", Keyword::Other, b""),
            (b"STLX", Keyword::Other, b""),
            (b"QUITS", Keyword::Other, b""),
            (b"USER:", Keyword::Other, b""),
            (b"US\xc3\x89R x", Keyword::Other, b"x"),
        ];
        for (line, keyword, args) in table {
            let cmd = command(line).unwrap();
            assert_eq!(
                (cmd.verb, cmd.args),
                (*keyword, *args),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn the_keyword_text_is_kept_as_sent() {
        let cmd = command(b"  list \t").unwrap();
        assert_eq!(cmd.verb_text, b"list");
        assert_eq!(cmd.args, b"");
    }

    #[test]
    fn control_characters_and_empty_lines_are_refused() {
        assert_eq!(command(b""), Err(Error::Empty));
        assert_eq!(command(b" \t "), Err(Error::Empty));
        assert_eq!(command(b"NOOP\rUSER x"), Err(Error::ControlCharacter));
        assert_eq!(command(b"USER a\0b"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\x0b"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\x1b[2J"), Err(Error::ControlCharacter));
        assert_eq!(command(b"NOOP\x7f"), Err(Error::ControlCharacter));
    }

    #[test]
    fn labels_are_the_proxys_names_never_the_clients_text() {
        assert_eq!(command(b"uSeR x").unwrap().verb.label(), "USER");
        assert_eq!(command(b"xclient").unwrap().verb.label(), "XCLIENT");
        assert_eq!(
            command(b"EVIL\x1b").map(|c| c.verb),
            Err(Error::ControlCharacter)
        );
        assert_eq!(command(b"EVIL x").unwrap().verb.label(), "unknown");
    }

    #[test]
    fn status_lines_table() {
        let table: &[(&[u8], Status, &[u8])] = &[
            (b"+OK", Status::Ok, b""),
            (b"+OK ", Status::Ok, b""),
            (
                b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>",
                Status::Ok,
                b"Dovecot ready. <1896.697170952@dbc.mtview.ca.us>",
            ),
            (b"+ok lower case", Status::Ok, b"lower case"),
            (b"+OK\tTAB", Status::Ok, b"TAB"),
            (b"-ERR", Status::Err, b""),
            (
                b"-ERR [AUTH] Authentication failed.",
                Status::Err,
                b"[AUTH] Authentication failed.",
            ),
            (b"-err no", Status::Err, b"no"),
            (b"+ ", Status::Continue, b""),
            (b"+", Status::Continue, b""),
            (b"+ dXNlcg==", Status::Continue, b"dXNlcg=="),
            (b"+ GO AHEAD", Status::Continue, b"GO AHEAD"),
            (b"+ OK", Status::Continue, b"OK"),
        ];
        for (line, status, text) in table {
            assert_eq!(
                status_line(line),
                Ok(StatusLine {
                    status: *status,
                    text
                }),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        for bad in [
            &b""[..],
            b"OK",
            b"+OKAY",
            b"-ERROR x",
            b"+dXNlcg==",
            b" +OK",
            b"220 smtp",
            b"* OK imap",
            b".",
        ] {
            assert_eq!(status_line(bad), Err(Error::MalformedStatus), "{bad:?}");
        }
    }

    #[test]
    fn capability_lines_table() {
        let table: &[(&[u8], &[u8], &[u8])] = &[
            (b"TOP", b"TOP", b""),
            (b"SASL PLAIN LOGIN", b"SASL", b"PLAIN LOGIN"),
            (b"sasl\tPLAIN", b"sasl", b"PLAIN"),
            (b"EXPIRE 60 USER", b"EXPIRE", b"60 USER"),
            (b"IMPLEMENTATION Dovecot", b"IMPLEMENTATION", b"Dovecot"),
            (b"", b"", b""),
        ];
        for (line, tag, params) in table {
            assert_eq!(capability(line), Capability { tag, params });
        }
        let mechanisms: Vec<&[u8]> = params(b"PLAIN  LOGIN\tSCRAM-SHA-256-PLUS").collect();
        assert_eq!(
            mechanisms,
            vec![&b"PLAIN"[..], b"LOGIN", b"SCRAM-SHA-256-PLUS"]
        );
    }

    #[test]
    fn apop_args_table() {
        assert_eq!(
            apop_args(b"mrose c4c9334bac560ecc979e58001b3e22fb"),
            Ok((&b"mrose"[..], &b"c4c9334bac560ecc979e58001b3e22fb"[..]))
        );
        assert_eq!(
            apop_args(b"mrose\t\tdigest"),
            Ok((&b"mrose"[..], &b"digest"[..]))
        );
        assert_eq!(apop_args(b"mrose"), Err(Error::BadArguments));
        assert_eq!(apop_args(b""), Err(Error::BadArguments));
        assert_eq!(apop_args(b"a b c"), Err(Error::BadArguments));
    }

    #[test]
    fn auth_args_table() {
        assert_eq!(auth_args(b"PLAIN"), Ok((&b"PLAIN"[..], None)));
        assert_eq!(
            auth_args(b"PLAIN AGEAYg=="),
            Ok((&b"PLAIN"[..], Some(&b"AGEAYg=="[..])))
        );
        assert_eq!(auth_args(b"PLAIN ="), Ok((&b"PLAIN"[..], Some(&b"="[..]))));
        assert_eq!(
            auth_args(b"LOGIN\tdXNlcg=="),
            Ok((&b"LOGIN"[..], Some(&b"dXNlcg=="[..])))
        );
        assert_eq!(auth_args(b""), Err(Error::BadArguments));
    }
}
