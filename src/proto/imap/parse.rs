//! nom parsers for the parts of IMAP the proxy must understand before login (RFC 9051
//! §9 formal syntax, RFC 7888 non-synchronising literals). Each takes one whole line
//! from the framer (without its CRLF), never the socket.

use crate::proto::command::Verbs;
use nom::{
    IResult, Parser,
    branch::alt,
    bytes::complete::{tag, tag_no_case, take_while, take_while1},
    character::complete::{char, digit1},
    combinator::{map, map_res, opt, recognize},
    multi::many0,
    sequence::{delimited, preceded, terminated},
};

/// Why a line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No valid tag at the start of the line.
    #[error("missing or invalid tag")]
    BadTag,
    /// A tag but no command name.
    #[error("missing command")]
    MissingCommand,
    /// A control character other than HTAB: implementations split such lines
    /// differently, so forwarding them could desynchronise proxy and upstream.
    #[error("control character in command line")]
    ControlCharacter,
}

/// The commands the proxy tells apart before login. Everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id,
    Login,
    Authenticate,
    Other,
}

/// The verbs by name; everything else is `Other`.
const VERBS: Verbs<Verb> = Verbs {
    names: &[
        ("CAPABILITY", Verb::Capability),
        ("NOOP", Verb::Noop),
        ("LOGOUT", Verb::Logout),
        ("STARTTLS", Verb::StartTls),
        ("ID", Verb::Id),
        ("LOGIN", Verb::Login),
        ("AUTHENTICATE", Verb::Authenticate),
    ],
    other: Verb::Other,
};

impl Verb {
    /// The verb's name for logs, or `unknown`: never the client's own text.
    pub fn label(self) -> &'static str {
        VERBS.label(self)
    }
}

/// A literal announced at the end of a line: `{n}`, `{n+}` or `~{n}` (RFC 9051 §4.3,
/// RFC 7888 §3, RFC 3516 literal8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal {
    /// Octets that follow the line's CRLF.
    pub len: u64,
    /// `{n+}`: the client sends the octets without waiting for a `+` continuation.
    pub non_sync: bool,
}

/// The start of a client command: `tag SP command-name [SP ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandStart<'a> {
    /// The tag, as sent.
    pub tag: &'a [u8],
    /// The recognised command.
    pub verb: Verb,
    /// The command name as sent (for the stripping heuristic).
    pub name: &'a [u8],
    /// Everything after the command name and its space (may be empty).
    pub args: &'a [u8],
}

/// `ATOM-CHAR = <any CHAR except atom-specials>`, `atom-specials = "(" / ")" / "{" /
/// SP / CTL / list-wildcards / quoted-specials / resp-specials` (RFC 9051 §9).
fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !b"(){%*\"\\]".contains(&b)
}

/// `tag = 1*<any ASTRING-CHAR except "+">`, `ASTRING-CHAR = ATOM-CHAR / resp-specials`.
fn is_tag_char(b: u8) -> bool {
    (is_atom_char(b) || b == b']') && b != b'+'
}

/// `command = tag SP (command-any / command-auth / command-nonauth / command-select)`;
/// only the tag and the command name are read here. The name is everything up to the
/// next SP, as the upstream reads it: `NOOP(x)` or `NOOP` glued to a non-ASCII byte is
/// not NOOP (found by the `imap_session` fuzz target).
pub fn command_start(line: &[u8]) -> Result<CommandStart<'_>, Error> {
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Error::ControlCharacter);
    }
    let tag_result: IResult<&[u8], &[u8]> =
        terminated(take_while1(is_tag_char), char(' ')).parse(line);
    let (rest, tag) = tag_result.map_err(|_| Error::BadTag)?;
    let name_result: IResult<&[u8], (&[u8], Option<char>)> =
        (take_while1(|b| b != b' '), opt(char(' '))).parse(rest);
    let (args, (name, _)) = name_result.map_err(|_| Error::MissingCommand)?;
    Ok(CommandStart {
        tag,
        verb: VERBS.classify(name),
        name,
        args,
    })
}

/// The literal a line ends with, if any: `literal = "{" number64 ["+"] "}" CRLF *CHAR8`
/// (RFC 7888 §8), with the `~` of `literal8` allowed in front.
pub fn trailing_literal(line: &[u8]) -> Option<Literal> {
    if line.last() != Some(&b'}') {
        return None;
    }
    let open = line.iter().rposition(|&b| b == b'{')?;
    let number64 = map_res(digit1, |d: &[u8]| {
        std::str::from_utf8(d)
            .map_err(|_| ())
            .and_then(|s| s.parse::<u64>().map_err(|_| ()))
    });
    let parsed: IResult<&[u8], (u64, Option<char>)> =
        delimited(char('{'), (number64, opt(char('+'))), char('}')).parse(&line[open..]);
    match parsed {
        Ok(([], (len, plus))) => Some(Literal {
            len,
            non_sync: plus.is_some(),
        }),
        _ => None,
    }
}

/// How an `astring` argument was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Astring {
    /// An atom or a quoted string, with its value.
    Inline(String),
    /// A literal: the value follows the line.
    Literal(Literal),
}

/// `astring = 1*ASTRING-CHAR / string`, `string = quoted / literal`,
/// `quoted = DQUOTE *QUOTED-CHAR DQUOTE`, `QUOTED-CHAR = <any TEXT-CHAR except
/// quoted-specials> / "\" quoted-specials` (RFC 9051 §9).
fn astring(input: &[u8]) -> IResult<&[u8], Astring> {
    let atom = map(
        take_while1(|b| is_atom_char(b) || b == b']'),
        |a: &[u8]| Astring::Inline(String::from_utf8_lossy(a).into_owned()),
    );
    let quoted_char = alt((
        preceded(char('\\'), alt((tag("\\"), tag("\"")))),
        take_while1(|b: u8| b != b'"' && b != b'\\' && b != b'\r' && b != b'\n'),
    ));
    let quoted = map(
        delimited(char('"'), many0(quoted_char), char('"')),
        |parts: Vec<&[u8]>| Astring::Inline(String::from_utf8_lossy(&parts.concat()).into_owned()),
    );
    let literal = map(
        recognize((opt(char('~')), char('{'), digit1, opt(char('+')), char('}'))),
        |text: &[u8]| match trailing_literal(text.strip_prefix(b"~").unwrap_or(text)) {
            Some(literal) => Astring::Literal(literal),
            None => Astring::Inline(String::new()),
        },
    );
    alt((quoted, literal, atom)).parse(input)
}

/// How far a `LOGIN` command has come after one of its lines, read strictly:
/// `login = "LOGIN" SP userid SP password`, `userid = astring`, `password = astring`
/// (RFC 9051 §9), a literal (`{n}`, or `{n+}` per RFC 7888) only where an astring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginProgress {
    /// Nothing read yet: the next line is the first, its arguments after `LOGIN `.
    Start,
    /// The user id was a literal: its octets, then ` password`, follow.
    UserLiteral,
    /// The password was a literal: its octets, then an empty line end, follow.
    PasswordLiteral,
    /// The command is complete.
    Complete,
    /// The line does not follow the grammar.
    Invalid,
}

/// `"{" number64 ["+"] "}"` at the very end of `input`, and nothing else.
fn literal_header(input: &[u8]) -> IResult<&[u8], ()> {
    map(
        (
            char('{'),
            digit1,
            opt(char('+')),
            char('}'),
            nom::combinator::eof,
        ),
        |_| (),
    )
    .parse(input)
}

/// An astring that is not a literal: an atom or a quoted string.
fn inline_astring(input: &[u8]) -> IResult<&[u8], ()> {
    let quoted_char = alt((
        preceded(char('\\'), alt((tag("\\"), tag("\"")))),
        take_while1(|b: u8| b != b'"' && b != b'\\' && b != b'\r' && b != b'\n'),
    ));
    alt((
        map(delimited(char('"'), many0(quoted_char), char('"')), |_| ()),
        map(take_while1(|b| is_atom_char(b) || b == b']'), |_| ()),
    ))
    .parse(input)
}

/// Reads one line of a LOGIN command: the first line's arguments (after `LOGIN `) when
/// `before` is [`LoginProgress::Start`], or the line that follows a literal's octets.
/// A literal is honoured only where this says one is due, so that the proxy and any
/// upstream agree on which octets are literal data (ARCHITECTURE.md §3, canonical forwarding).
pub fn login_line(before: LoginProgress, line: &[u8]) -> LoginProgress {
    use nom::combinator::eof;
    let complete = |i| (inline_astring, eof).parse(i).is_ok();
    match before {
        LoginProgress::Start => {
            let after_user: IResult<&[u8], ()> = terminated(inline_astring, char(' ')).parse(line);
            if literal_header(line).is_ok() {
                LoginProgress::UserLiteral
            } else if let Ok((rest, ())) = after_user {
                if complete(rest) {
                    LoginProgress::Complete
                } else if literal_header(rest).is_ok() {
                    LoginProgress::PasswordLiteral
                } else {
                    LoginProgress::Invalid
                }
            } else {
                LoginProgress::Invalid
            }
        }
        LoginProgress::UserLiteral => match line.strip_prefix(b" ") {
            Some(rest) if complete(rest) => LoginProgress::Complete,
            Some(rest) if literal_header(rest).is_ok() => LoginProgress::PasswordLiteral,
            _ => LoginProgress::Invalid,
        },
        LoginProgress::PasswordLiteral if line.is_empty() => LoginProgress::Complete,
        LoginProgress::PasswordLiteral | LoginProgress::Complete | LoginProgress::Invalid => {
            LoginProgress::Invalid
        }
    }
}

/// What the arguments of a `LOGIN` line reveal:
/// `login = "LOGIN" SP userid SP password`, `userid = astring`, `password = astring`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginArgs {
    /// The user id, when it is on this line.
    pub user: Option<Astring>,
    /// The password, when its start is on this line.
    pub password: Option<Astring>,
}

/// Reads `userid [SP password]` from the arguments of a LOGIN line.
pub fn login_args(args: &[u8]) -> LoginArgs {
    let parsed: IResult<&[u8], (Astring, Option<Astring>)> =
        (astring, opt(preceded(take_while1(|b| b == b' '), astring))).parse(args);
    match parsed {
        Ok((_, (user, password))) => LoginArgs {
            user: Some(user),
            password,
        },
        Err(_) => LoginArgs {
            user: None,
            password: None,
        },
    }
}

/// `authenticate = "AUTHENTICATE" SP auth-type [SP initial-resp]`,
/// `initial-resp = (base64 / "=")` (RFC 9051 §6.2.2, RFC 4959). Returns the mechanism
/// and the initial response (`=` means an empty one, and is not returned).
pub fn authenticate_args(args: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    type MechanismAndResponse<'a> = (&'a [u8], Option<&'a [u8]>);
    let parsed: IResult<&[u8], MechanismAndResponse<'_>> = (
        take_while1(is_atom_char),
        opt(preceded(char(' '), take_while(|b: u8| b != b' '))),
    )
        .parse(args);
    let (_, (mechanism, response)) = parsed.ok()?;
    Some((mechanism, response.filter(|r| !r.is_empty() && *r != b"=")))
}

/// One upstream response line, as far as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response<'a> {
    /// `* ...`: untagged data or status; `rest` follows `* `.
    Untagged { rest: &'a [u8] },
    /// `+ ...` or a bare `+`: a command continuation request.
    Continuation,
    /// `tag SP (OK / NO / BAD) ...`.
    Tagged {
        tag: &'a [u8],
        status: Status,
        rest: &'a [u8],
    },
}

/// `resp-cond-state = ("OK" / "NO" / "BAD") SP resp-text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

/// `response = *(continue-req / response-data) response-done` (RFC 9051 §9), one line.
/// Liberal: a `+` alone on a line is a continuation (ARCHITECTURE.md §10).
pub fn response(line: &[u8]) -> Option<Response<'_>> {
    if let Some(rest) = line.strip_prefix(b"* ") {
        return Some(Response::Untagged { rest });
    }
    if line.first() == Some(&b'+') {
        return Some(Response::Continuation);
    }
    let status = alt((
        map(tag_no_case("OK"), |_| Status::Ok),
        map(tag_no_case("NO"), |_| Status::No),
        map(tag_no_case("BAD"), |_| Status::Bad),
    ));
    let parsed: IResult<&[u8], (&[u8], Status)> =
        (terminated(take_while1(is_tag_char), char(' ')), status).parse(line);
    let (rest, (tag, status)) = parsed.ok()?;
    Some(Response::Tagged { tag, status, rest })
}

/// The span of a `CAPABILITY` list in a response: after `* CAPABILITY ` (an untagged
/// `capability-data`), or in a `[CAPABILITY ...]` code right after an `OK` status,
/// untagged or tagged (`resp-cond-state`, `resp-text-code`, RFC 9051 §7.1). Text
/// elsewhere (a `BAD` that echoes the client's line) is never read as capabilities.
pub fn capability_span(line: &[u8]) -> Option<std::ops::Range<usize>> {
    const DATA: &[u8] = b"* CAPABILITY ";
    const CODE: &[u8] = b"OK [CAPABILITY ";
    let starts = |at: usize, prefix: &[u8]| {
        line.len() >= at + prefix.len() && line[at..at + prefix.len()].eq_ignore_ascii_case(prefix)
    };
    if starts(0, DATA) {
        return Some(DATA.len()..line.len());
    }
    let status_at = line.iter().position(|&b| b == b' ')? + 1;
    if !starts(status_at, CODE) {
        return None;
    }
    let start = status_at + CODE.len();
    let end = start + line[start..].iter().position(|&b| b == b']')?;
    Some(start..end)
}

#[cfg(test)]
mod tests {
    #[test]
    fn login_lines_take_literals_only_where_an_astring_is() {
        use LoginProgress::*;
        let table: &[(LoginProgress, &[u8], LoginProgress)] = &[
            (Start, b"alice secret", Complete),
            (Start, b"\"alice\" \"se cret\"", Complete),
            (Start, b"{5}", UserLiteral),
            (Start, b"{5+}", UserLiteral),
            (Start, b"alice {6}", PasswordLiteral),
            (Start, b"alice ~{6}", Invalid),
            (Start, b"alice", Invalid),
            (Start, b"alice secret {6}", Invalid),
            (Start, b"a{5}", Invalid),
            (Start, b"alice  {6}", Invalid),
            (UserLiteral, b" secret", Complete),
            (UserLiteral, b" {6+}", PasswordLiteral),
            (UserLiteral, b"secret", Invalid),
            (UserLiteral, b" a b", Invalid),
            (PasswordLiteral, b"", Complete),
            (PasswordLiteral, b" x", Invalid),
            (Complete, b"", Invalid),
        ];
        for (before, line, after) in table {
            assert_eq!(
                login_line(*before, line),
                *after,
                "{before:?} {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    use super::*;

    #[test]
    fn command_starts() {
        type Row<'a> = (&'a [u8], &'a [u8], Verb, &'a [u8]);
        let table: &[Row] = &[
            (b"a1 LOGIN alice pw", b"a1", Verb::Login, b"alice pw"),
            (b"A STARTTLS", b"A", Verb::StartTls, b""),
            (b"x.y capability", b"x.y", Verb::Capability, b""),
            (b"t Authenticate PLAIN", b"t", Verb::Authenticate, b"PLAIN"),
            (b"t ID NIL", b"t", Verb::Id, b"NIL"),
            (b"t SELECT INBOX", b"t", Verb::Other, b"INBOX"),
            (b"] NOOP", b"]", Verb::Noop, b""),
            (b"t LOGOUT", b"t", Verb::Logout, b""),
            (b"t NOOP(x)", b"t", Verb::Other, b""),
            (b"t NOOP\xce", b"t", Verb::Other, b""),
            (b"t CAPABILITY\"x\"", b"t", Verb::Other, b""),
            (b"t LOGIN\xa0alice pw", b"t", Verb::Other, b"pw"),
        ];
        for (line, tag, verb, args) in table {
            let start = command_start(line).unwrap();
            assert_eq!((start.tag, start.verb, start.args), (*tag, *verb, *args));
        }
        assert_eq!(command_start(b"NOOP"), Err(Error::BadTag));
        assert_eq!(command_start(b"+a NOOP"), Err(Error::BadTag));
        assert_eq!(command_start(b"* NOOP"), Err(Error::BadTag));
        assert_eq!(command_start(b"a "), Err(Error::MissingCommand));
        assert_eq!(
            command_start(b"a NOOP\rb LOGIN x y"),
            Err(Error::ControlCharacter)
        );
        assert_eq!(command_start(b"a NO\0OP"), Err(Error::ControlCharacter));
    }

    #[test]
    fn literals_at_the_end_of_a_line() {
        let sync = |len| {
            Some(Literal {
                len,
                non_sync: false,
            })
        };
        let plus = |len| {
            Some(Literal {
                len,
                non_sync: true,
            })
        };
        assert_eq!(trailing_literal(b"a LOGIN alice {8}"), sync(8));
        assert_eq!(trailing_literal(b"a APPEND INBOX {400+}"), plus(400));
        assert_eq!(trailing_literal(b"a APPEND INBOX ~{5}"), sync(5));
        assert_eq!(trailing_literal(b"{0}"), sync(0));
        assert_eq!(trailing_literal(b"a LOGIN alice pw"), None);
        assert_eq!(trailing_literal(b"a LOGIN {8} pw"), None);
        assert_eq!(trailing_literal(b"a X {8-}"), None);
        assert_eq!(trailing_literal(b"a X {}"), None);
        assert_eq!(trailing_literal(b"a X {99999999999999999999999}"), None);
        assert_eq!(trailing_literal(b"a X {1a}"), None);
    }

    #[test]
    fn login_arguments_reveal_whether_a_password_arrived() {
        let inline = |s: &str| Some(Astring::Inline(s.into()));
        let literal = |len, non_sync| Some(Astring::Literal(Literal { len, non_sync }));
        let table: &[(&[u8], LoginArgs)] = &[
            (
                b"alice secret",
                LoginArgs {
                    user: inline("alice"),
                    password: inline("secret"),
                },
            ),
            (
                b"\"alice\" \"se\\\"cret\"",
                LoginArgs {
                    user: inline("alice"),
                    password: inline("se\"cret"),
                },
            ),
            (
                b"alice {6}",
                LoginArgs {
                    user: inline("alice"),
                    password: literal(6, false),
                },
            ),
            (
                b"alice {6+}",
                LoginArgs {
                    user: inline("alice"),
                    password: literal(6, true),
                },
            ),
            (
                b"{5}",
                LoginArgs {
                    user: literal(5, false),
                    password: None,
                },
            ),
            (
                b"alice",
                LoginArgs {
                    user: inline("alice"),
                    password: None,
                },
            ),
            (
                b"",
                LoginArgs {
                    user: None,
                    password: None,
                },
            ),
        ];
        for (args, expected) in table {
            assert_eq!(
                &login_args(args),
                expected,
                "{:?}",
                String::from_utf8_lossy(args)
            );
        }
    }

    #[test]
    fn authenticate_arguments() {
        assert_eq!(authenticate_args(b"PLAIN"), Some((&b"PLAIN"[..], None)));
        assert_eq!(authenticate_args(b"PLAIN ="), Some((&b"PLAIN"[..], None)));
        assert_eq!(
            authenticate_args(b"PLAIN AGEAYg=="),
            Some((&b"PLAIN"[..], Some(&b"AGEAYg=="[..])))
        );
        assert_eq!(authenticate_args(b""), None);
    }

    #[test]
    fn responses() {
        assert_eq!(
            response(b"* OK ready"),
            Some(Response::Untagged { rest: b"OK ready" })
        );
        assert_eq!(response(b"+ go ahead"), Some(Response::Continuation));
        assert_eq!(response(b"+"), Some(Response::Continuation));
        assert_eq!(
            response(b"a1 OK [CAPABILITY IMAP4rev1] Logged in"),
            Some(Response::Tagged {
                tag: b"a1",
                status: Status::Ok,
                rest: b" [CAPABILITY IMAP4rev1] Logged in"
            })
        );
        assert_eq!(
            response(b"a1 no bad password"),
            Some(Response::Tagged {
                tag: b"a1",
                status: Status::No,
                rest: b" bad password"
            })
        );
        assert_eq!(response(b"garbage"), None);
        assert_eq!(response(b"a1 MAYBE"), None);
    }

    #[test]
    fn capability_spans() {
        let line = b"* CAPABILITY IMAP4rev1 STARTTLS";
        assert_eq!(&line[capability_span(line).unwrap()], b"IMAP4rev1 STARTTLS");
        let line = b"* OK [CAPABILITY IMAP4rev1 LITERAL+] Dovecot ready.";
        assert_eq!(&line[capability_span(line).unwrap()], b"IMAP4rev1 LITERAL+");
        let line = b"a OK [capability IMAP4rev1] Logged in";
        assert_eq!(&line[capability_span(line).unwrap()], b"IMAP4rev1");
        assert_eq!(capability_span(b"* OK ready"), None);
        assert_eq!(capability_span(b"a BAD echo [CAPABILITY LITERAL+]"), None);
        assert_eq!(capability_span(b"* NO [CAPABILITY LITERAL+] x"), None);
        assert_eq!(capability_span(b"* OK text [CAPABILITY LITERAL+]"), None);
        assert_eq!(capability_span(b"* OK [CAPABILITY IMAP4rev1"), None);
    }
}
