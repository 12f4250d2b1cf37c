//! The rule of ARCHITECTURE.md §3 ("How mailmoat forwards before TLS: canonically"), checked from
//! the upstream's side: before TLS the upstream receives only commands that mailmoat
//! serialised itself, for the allow-listed verbs, in canonical form. A strict parser,
//! written here from the RFCs and independent of mailmoat's own parsers, reads every
//! byte a session hands the upstream before TLS and says what is not canonical.
//!
//! Canonical means byte-exact: the verb in upper case, one SP between the verb and each
//! argument, CRLF at the end, and no other byte. Per listener:
//!
//! | dialect | commands |
//! |---|---|
//! | IMAP | `tag SP ("CAPABILITY" / "NOOP" / "LOGOUT") CRLF`, `tag = 1*<any ASTRING-CHAR except "+">` (RFC 9051 §9); never a literal |
//! | POP3 | `CAPA`, `NOOP`, `QUIT`, alone |
//! | SMTP `require_tls` | `EHLO SP domain`, `HELO SP domain`, `NOOP`, `RSET`, `QUIT` |
//! | SMTP `auth_requires_tls` (MX) | the above, and `MAIL FROM:<path>`, `RCPT TO:<path>` with `SP esmtp-param`s, `DATA`, `BDAT size [SP LAST]`, `VRFY SP string`, `EXPN SP string`, `HELP [SP string]`, `ETRN SP node` |
//! | the outbound relay to an MX ([`Canonical::relay`], read as the MX dialect) | `EHLO SP domain`, `HELO SP domain`, `STARTTLS`, `NOOP`, `RSET`, `QUIT`, `MAIL FROM:<path>`, `RCPT TO:<path>` with `SP esmtp-param`s, `DATA`; in plaintext and inside TLS alike |
//!
//! `domain` is RFC 5321's `Domain` or `address-literal` (an EHLO/HELO argument is one of
//! them; HELO is allowed the address literal that clients send anyway); a label may also
//! hold `_` (the name of many a Windows host, which Postfix and Exim accept) and UTF-8
//! (RFC 6531 U-labels). Paths are RFC 5321 `Path`s without the obsolete source route:
//! `<>` (MAIL only), `<Postmaster>` (RCPT only), `<Local-part@domain>`. NOOP goes bare:
//! its optional string (RFC 5321 §4.1.1.9) is nothing the upstream needs.
//!
//! On an MX the body of a message crosses before TLS too. The upstream modelled here is
//! a **lenient** one: it drops NUL and the other C0 controls (except CR, LF and HTAB)
//! and takes a bare LF for a line end, as some legacy servers do. Between the upstream's
//! `354` and the end, such an upstream must see no end of data other than the one
//! mailmoat sends where the client sent its real `CRLF.CRLF`: anything else ends the
//! message early there and smuggles the rest in as commands (SMTP smuggling, ARCHITECTURE.md §5).
//! A BDAT chunk is counted, never scanned.
//!
//! Which reply answers which command (the `354` to DATA) is followed the way an SMTP
//! client follows them: in order, one reply per command, the greeting first
//! ([`Canonical::replied`]).
//!
//! This file depends on nothing but `std`: the fuzz harness (`session_script.rs`) and
//! `tests/canonical_rule.rs` both use it.

use std::collections::VecDeque;

/// Which listener's allow-list applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SMTP with policy `require_tls` (submission).
    SmtpSubmission,
    /// SMTP with policy `auth_requires_tls` (a public MX).
    SmtpMx,
    /// IMAP (always `require_tls` before login).
    Imap,
    /// POP3.
    Pop3,
}

/// What the upstream received, once it is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A canonical command line, without its CRLF.
    Command(Vec<u8>),
    /// The end of a DATA body (`CRLF.CRLF`).
    EndOfData,
    /// The last octet of a BDAT chunk (`last`: it was `BDAT n LAST`).
    ChunkDone {
        /// `BDAT n LAST`.
        last: bool,
    },
}

/// What a reply owed by the upstream answers (SMTP MX only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Greeting,
    Data,
    Other,
}

/// How the upstream reads what comes next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Command lines.
    Commands,
    /// A DATA body, after the upstream's 354.
    Body(BodyScan),
    /// `remaining` octets of a BDAT chunk.
    Chunk { remaining: u64, last: bool },
}

/// Both readings of a DATA body at once: the strict one (`CRLF.CRLF`) and the lenient
/// one (C0 controls dropped, LF ends a line).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BodyScan {
    /// The last five raw octets, the DATA line's CRLF counting as the first two.
    tail: Vec<u8>,
    /// The lenient upstream's current line, controls dropped.
    lenient_line: Vec<u8>,
    /// Raw octets of the body so far (for the message).
    octets: u64,
}

impl BodyScan {
    fn new() -> Self {
        BodyScan {
            tail: b"\r\n".to_vec(),
            lenient_line: Vec::new(),
            octets: 0,
        }
    }
}

/// The strict reader of one upstream connection's plaintext phase.
#[derive(Debug, Clone)]
pub struct Canonical {
    dialect: Dialect,
    mode: Mode,
    /// Client->upstream octets of a command line not yet ended by LF.
    line: Vec<u8>,
    /// SMTP MX: replies the upstream owes, in order.
    owed: VecDeque<Owed>,
    /// SMTP MX: the upstream's reply line being received.
    reply_line: Vec<u8>,
    /// The outbound relay's own verbs instead of an MX's ([`Canonical::relay`]).
    relay: bool,
}

/// Shows bytes as an escaped string, cut to a readable length.
pub fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(200)];
    let mut out = String::from_utf8_lossy(cut).escape_debug().to_string();
    if bytes.len() > cut.len() {
        out.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    format!("\"{out}\"")
}

impl Canonical {
    /// The upstream of a new connection, before its greeting.
    pub fn new(dialect: Dialect) -> Self {
        Canonical {
            dialect,
            mode: Mode::Commands,
            line: Vec::new(),
            owed: VecDeque::from([Owed::Greeting]),
            reply_line: Vec::new(),
            relay: false,
        }
    }

    /// A recipient's MX as the outbound relay (`proto::outbound::session`) speaks to it,
    /// a new connection before its greeting: read as [`Dialect::SmtpMx`] (replies
    /// followed, bodies after a `354`), with the relay's own verbs, STARTTLS among them.
    /// The reading goes on inside TLS: the `220` answered the STARTTLS, nothing is owed.
    pub fn relay() -> Self {
        Canonical {
            relay: true,
            ..Canonical::new(Dialect::SmtpMx)
        }
    }

    /// Octets mailmoat handed the upstream (`Action::ToUpstream`) before TLS. Returns
    /// what became whole, or why the octets are not canonical.
    pub fn forwarded(&mut self, mut bytes: &[u8]) -> Result<Vec<Received>, String> {
        let mut received = Vec::new();
        while !bytes.is_empty() {
            match &mut self.mode {
                Mode::Commands => match bytes.iter().position(|&b| b == b'\n') {
                    Some(lf) => {
                        self.line.extend_from_slice(&bytes[..=lf]);
                        bytes = &bytes[lf + 1..];
                        let line = std::mem::take(&mut self.line);
                        received.push(self.on_line(&line)?);
                    }
                    None => {
                        self.line.extend_from_slice(bytes);
                        bytes = &[];
                    }
                },
                Mode::Chunk { remaining, last } => {
                    let n = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *remaining -= n as u64;
                    bytes = &bytes[n..];
                    if *remaining == 0 {
                        received.push(Received::ChunkDone { last: *last });
                        self.mode = Mode::Commands;
                    }
                }
                Mode::Body(scan) => {
                    let (used, ended) = scan_body(scan, bytes)?;
                    bytes = &bytes[used..];
                    if ended {
                        received.push(Received::EndOfData);
                        self.owed.push_back(Owed::Other);
                        self.mode = Mode::Commands;
                    }
                }
            }
        }
        Ok(received)
    }

    /// Octets the upstream sent the session. Only an MX reads them: they say whether a
    /// DATA was answered `354`, after which the body follows.
    pub fn replied(&mut self, mut bytes: &[u8]) {
        if self.dialect != Dialect::SmtpMx {
            return;
        }
        while let Some(lf) = bytes.iter().position(|&b| b == b'\n') {
            self.reply_line.extend_from_slice(&bytes[..lf]);
            bytes = &bytes[lf + 1..];
            let line = std::mem::take(&mut self.reply_line);
            // `Reply-code ("-" / SP / end)`, as a client reads a reply (RFC 5321 §4.2).
            let code = line
                .get(..3)
                .filter(|d| d.iter().all(u8::is_ascii_digit))
                .map(|d| {
                    u16::from(d[0] - b'0') * 100
                        + u16::from(d[1] - b'0') * 10
                        + u16::from(d[2] - b'0')
                });
            let last = line.get(3) != Some(&b'-');
            if let (Some(code), true) = (code, last) {
                let answered = self.owed.pop_front();
                if answered == Some(Owed::Data) && code == 354 && self.mode == Mode::Commands {
                    self.mode = Mode::Body(BodyScan::new());
                }
            }
        }
        self.reply_line.extend_from_slice(bytes);
    }

    /// The plaintext phase ends (STARTTLS, or the end of the dialogue): bytes of a
    /// command line without its line end were never a canonical command.
    pub fn finish(&self) -> Result<(), String> {
        if self.mode == Mode::Commands && !self.line.is_empty() {
            return Err(format!(
                "{:?}: {} reached the upstream before TLS without a line end",
                self.dialect,
                show(&self.line)
            ));
        }
        Ok(())
    }

    fn on_line(&mut self, raw: &[u8]) -> Result<Received, String> {
        let refuse = |why: &str| {
            Err(format!(
                "{:?}: {} reached the upstream before TLS: {why}",
                self.dialect,
                show(raw)
            ))
        };
        let Some(line) = raw.strip_suffix(b"\r\n") else {
            return refuse("the line does not end in CRLF");
        };
        if line.contains(&b'\r') {
            return refuse("a CR inside the line");
        }
        let verdict = match self.dialect {
            Dialect::Imap => imap_command(line),
            Dialect::Pop3 => match line {
                b"CAPA" | b"NOOP" | b"QUIT" => Ok(()),
                _ => Err("not CAPA, NOOP or QUIT alone".to_owned()),
            },
            Dialect::SmtpSubmission | Dialect::SmtpMx => self.smtp_command(line),
        };
        if let Err(why) = verdict {
            return refuse(&why);
        }
        if self.dialect == Dialect::SmtpMx {
            if line == b"DATA" {
                self.owed.push_back(Owed::Data);
            } else {
                self.owed.push_back(Owed::Other);
            }
            if let Some(args) = line.strip_prefix(b"BDAT ") {
                let (size, last) = match args.strip_suffix(b" LAST") {
                    Some(size) => (size, true),
                    None => (args, false),
                };
                let size: u64 = std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("BDAT size {} is no number", show(size)))?;
                if size > 0 {
                    self.mode = Mode::Chunk {
                        remaining: size,
                        last,
                    };
                }
            }
        }
        Ok(Received::Command(line.to_vec()))
    }

    fn smtp_command(&self, line: &[u8]) -> Result<(), String> {
        if std::str::from_utf8(line).is_err() {
            return Err("not UTF-8".to_owned());
        }
        let (verb, args) = match line.iter().position(|&b| b == b' ') {
            Some(sp) => (&line[..sp], Some(&line[sp + 1..])),
            None => (line, None),
        };
        let envelope = self.dialect == Dialect::SmtpMx;
        let relay = self.relay;
        let mx = envelope && !relay;
        match (verb, args) {
            (b"NOOP" | b"RSET" | b"QUIT", None) => Ok(()),
            (b"STARTTLS", None) if relay => Ok(()),
            (b"EHLO" | b"HELO", Some(domain)) => {
                if is_domain(domain) || is_address_literal(domain) {
                    Ok(())
                } else {
                    Err("the argument is no domain or address literal".to_owned())
                }
            }
            (b"MAIL", Some(args)) if envelope => {
                let rest = args
                    .strip_prefix(b"FROM:")
                    .ok_or("MAIL without FROM: right after its SP")?;
                path_and_params(rest, true)
            }
            (b"RCPT", Some(args)) if envelope => {
                let rest = args
                    .strip_prefix(b"TO:")
                    .ok_or("RCPT without TO: right after its SP")?;
                path_and_params(rest, false)
            }
            (b"DATA", None) if envelope => Ok(()),
            (b"BDAT", Some(args)) if mx => {
                let size = args.strip_suffix(b" LAST").unwrap_or(args);
                let canonical_number = !size.is_empty()
                    && size.iter().all(u8::is_ascii_digit)
                    && (size == b"0" || size[0] != b'0');
                if canonical_number {
                    Ok(())
                } else {
                    Err("not BDAT chunk-size [SP LAST]".to_owned())
                }
            }
            (b"VRFY" | b"EXPN", Some(string)) if mx => {
                if is_smtp_string(string) {
                    Ok(())
                } else {
                    Err("the argument is no RFC 5321 String".to_owned())
                }
            }
            (b"HELP", None) if mx => Ok(()),
            (b"HELP", Some(string)) if mx => {
                if is_smtp_string(string) {
                    Ok(())
                } else {
                    Err("the argument is no RFC 5321 String".to_owned())
                }
            }
            (b"ETRN", Some(node)) if mx => {
                let domain = node
                    .strip_prefix(b"@")
                    .or_else(|| node.strip_prefix(b"#"))
                    .unwrap_or(node);
                if is_domain(domain) {
                    Ok(())
                } else {
                    Err("the argument is no ETRN node (RFC 1985)".to_owned())
                }
            }
            _ => Err(if relay {
                "not a command the outbound relay writes, in canonical form".to_owned()
            } else if mx {
                "not an allowed command of an MX before TLS in canonical form".to_owned()
            } else {
                "not EHLO/HELO domain, NOOP, RSET or QUIT in canonical form".to_owned()
            }),
        }
    }
}

/// Scans body octets; returns how many belong to the body and whether its end was
/// among them. Fails where the lenient upstream would end the message elsewhere.
fn scan_body(scan: &mut BodyScan, bytes: &[u8]) -> Result<(usize, bool), String> {
    for (i, &b) in bytes.iter().enumerate() {
        scan.octets += 1;
        scan.tail.push(b);
        if scan.tail.len() > 5 {
            scan.tail.remove(0);
        }
        if b == b'\n' {
            let strict_end = scan.tail == b"\r\n.\r\n";
            let mut lenient = std::mem::take(&mut scan.lenient_line);
            if lenient.last() == Some(&b'\r') {
                lenient.pop();
            }
            let lenient_end = lenient == b".";
            if lenient_end && !strict_end {
                return Err(format!(
                    "SmtpMx: octet {} of a message body ends the message for an upstream \
                     that drops NUL and other controls or takes a bare LF for a line end, \
                     where the client sent no CRLF.CRLF; the rest would be read as \
                     commands (last octets forwarded: {})",
                    scan.octets,
                    show(&bytes[i.saturating_sub(16)..=i])
                ));
            }
            if strict_end {
                return Ok((i + 1, true));
            }
        } else if b >= 0x20 || b == b'\r' || b == b'\t' {
            scan.lenient_line.push(b);
        }
    }
    Ok((bytes.len(), false))
}

/// `tag SP command CRLF` of the upgrade dialogue (RFC 9051 §9), without the CRLF.
fn imap_command(line: &[u8]) -> Result<(), String> {
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        return Err("no SP after the tag".to_owned());
    };
    let (tag, command) = (&line[..sp], &line[sp + 1..]);
    if !is_imap_tag(tag) {
        return Err(format!(
            "{} is no RFC 9051 tag (1*<any ASTRING-CHAR except \"+\">)",
            show(tag)
        ));
    }
    match command {
        b"CAPABILITY" | b"NOOP" | b"LOGOUT" => Ok(()),
        _ if command.ends_with(b"}") => Err(
            "the line ends in a literal (its octets follow it, never a canonical command)"
                .to_owned(),
        ),
        _ => Err("not CAPABILITY, NOOP or LOGOUT alone after the tag".to_owned()),
    }
}

/// `tag = 1*<any ASTRING-CHAR except "+">`, `ASTRING-CHAR = ATOM-CHAR / resp-specials`,
/// `ATOM-CHAR = <any CHAR except atom-specials>`, `atom-specials = "(" / ")" / "{" / SP /
/// CTL / list-wildcards / quoted-specials / resp-specials` (RFC 9051 §9).
pub fn is_imap_tag(tag: &[u8]) -> bool {
    !tag.is_empty()
        && tag
            .iter()
            .all(|&b| (0x21..0x7f).contains(&b) && !b"(){%*\"\\+".contains(&b))
}

/// A label character: `Let-dig`, `-`, the `_` of real hosts, or a UTF-8 octet.
fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`
/// (RFC 5321 §4.1.2), with `_` and U-labels (RFC 6531) allowed; at most 255 octets.
fn is_domain(domain: &[u8]) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.iter().all(|&b| is_label_char(b))
                && label[0] != b'-'
                && label[label.len() - 1] != b'-'
        })
}

/// `address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
/// General-address-literal ) "]"`, read as `"[" 1*dcontent "]"`, `dcontent = %d33-90 /
/// %d94-126` (RFC 5321 §4.1.3).
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

/// `atext` (RFC 5322 §3.2.3), with UTF-8 (RFC 6531).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// `Atom = 1*atext`.
fn is_atom(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(|&b| is_atext(b))
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`, `qtextSMTP = %d32-33 / %d35-91 /
/// %d93-126`, `quoted-pairSMTP = %d92 %d32-126` (RFC 5321 §4.1.2), with UTF-8.
fn is_quoted_string(text: &[u8]) -> bool {
    let Some(inner) = text.strip_prefix(b"\"").and_then(|t| t.strip_suffix(b"\"")) else {
        return false;
    };
    let mut i = 0;
    while i < inner.len() {
        match inner[i] {
            b'\\' => {
                if !inner.get(i + 1).is_some_and(|&b| (32..=126).contains(&b)) {
                    return false;
                }
                i += 2;
            }
            b'"' => return false,
            b if b == 32 || b == 33 || (35..=126).contains(&b) || b >= 0x80 => i += 1,
            _ => return false,
        }
    }
    true
}

/// `String = Atom / Quoted-string` (RFC 5321 §4.1.2).
fn is_smtp_string(text: &[u8]) -> bool {
    is_atom(text) || is_quoted_string(text)
}

/// `Local-part = Dot-string / Quoted-string`, `Dot-string = Atom *("." Atom)`.
fn is_local_part(text: &[u8]) -> bool {
    is_quoted_string(text) || text.split(|&b| b == b'.').all(is_atom)
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
fn is_mailbox(text: &[u8]) -> bool {
    let Some(at) = text.iter().rposition(|&b| b == b'@') else {
        return false;
    };
    let (local, domain) = (&text[..at], &text[at + 1..]);
    is_local_part(local) && (is_domain(domain) || is_address_literal(domain))
}

/// `Path *(SP esmtp-param)` after `FROM:` or `TO:`; `<>` only for MAIL, `<Postmaster>`
/// only for RCPT (RFC 5321 §4.1.2); no source route.
fn path_and_params(text: &[u8], mail: bool) -> Result<(), String> {
    let Some(close) = text.iter().position(|&b| b == b'>') else {
        return Err("no path in angle brackets".to_owned());
    };
    let (path, params) = (&text[..=close], &text[close + 1..]);
    let inner = path
        .strip_prefix(b"<")
        .and_then(|p| p.strip_suffix(b">"))
        .ok_or("the path does not start with <")?;
    let path_ok = if inner.is_empty() {
        mail
    } else if !mail && inner.eq_ignore_ascii_case(b"Postmaster") {
        true
    } else {
        is_mailbox(inner)
    };
    if !path_ok {
        return Err(format!("{} is no canonical path", show(path)));
    }
    if params.is_empty() {
        return Ok(());
    }
    let Some(params) = params.strip_prefix(b" ") else {
        return Err("no SP between the path and its parameters".to_owned());
    };
    for param in params.split(|&b| b == b' ') {
        let (keyword, value) = match param.iter().position(|&b| b == b'=') {
            Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
            None => (param, None),
        };
        // `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`,
        // `esmtp-value = 1*(%d33-60 / %d62-126)` (RFC 5321 §4.1.2), UTF-8 (RFC 6531).
        let keyword_ok = keyword.first().is_some_and(u8::is_ascii_alphanumeric)
            && keyword
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.iter()
                    .all(|&b| (33..=60).contains(&b) || (62..=126).contains(&b) || b >= 0x80)
        });
        if !keyword_ok || !value_ok {
            return Err(format!("{} is no esmtp-param", show(param)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dialect: Dialect, bytes: &[u8]) -> Result<Vec<Received>, String> {
        Canonical::new(dialect).forwarded(bytes)
    }

    #[test]
    fn canonical_lines_pass_and_their_neighbours_do_not() {
        use Dialect::*;
        let good: &[(Dialect, &[u8])] = &[
            (Imap, b"a1 CAPABILITY\r\n"),
            (Imap, b"x] NOOP\r\n"),
            (Imap, b"A.b-9 LOGOUT\r\n"),
            (Pop3, b"CAPA\r\nNOOP\r\nQUIT\r\n"),
            (SmtpSubmission, b"EHLO client.example\r\n"),
            (SmtpSubmission, b"EHLO my_host\r\n"),
            (SmtpSubmission, b"HELO [192.0.2.1]\r\n"),
            (
                SmtpSubmission,
                b"EHLO [IPv6:2001:db8::1]\r\nRSET\r\nNOOP\r\nQUIT\r\n",
            ),
            (SmtpMx, b"MAIL FROM:<> BODY=8BITMIME SIZE=10\r\n"),
            (SmtpMx, b"MAIL FROM:<\"a b\"@example.test>\r\n"),
            (
                SmtpMx,
                b"RCPT TO:<Postmaster>\r\nRCPT TO:<b@[192.0.2.1]> NOTIFY=NEVER\r\n",
            ),
            (SmtpMx, b"VRFY alice\r\nHELP\r\nETRN @example.test\r\n"),
        ];
        for (dialect, bytes) in good {
            assert!(
                check(*dialect, bytes).is_ok(),
                "{dialect:?} {}",
                show(bytes)
            );
        }
        let bad: &[(Dialect, &[u8])] = &[
            (Imap, b"a NOOP x\r\n"),
            (Imap, b"a noop\r\n"),
            (Imap, b"a  NOOP\r\n"),
            (Imap, b"a NOOP\n"),
            (Imap, b"a+ NOOP\r\n"),
            (Imap, b"a{ NOOP\r\n"),
            (Imap, b"* NOOP\r\n"),
            (Imap, b"a NOOP ~{5+}\r\n"),
            (Imap, b"a NOOP {5}\r\n"),
            (Imap, b"a LOGIN alice secret\r\n"),
            (Imap, b"a ID NIL\r\n"),
            (Pop3, b"CAPA x\r\n"),
            (Pop3, b"capa\r\n"),
            (Pop3, b"USER alice\r\n"),
            (SmtpSubmission, b"EHLO\r\n"),
            (SmtpSubmission, b"EHLO a b\r\n"),
            (SmtpSubmission, b"ehlo a\r\n"),
            (SmtpSubmission, b"EHLO -a\r\n"),
            (SmtpSubmission, b"NOOP x\r\n"),
            (SmtpSubmission, b" NOOP\r\n"),
            (SmtpSubmission, b"NOOP\r\r\n"),
            (SmtpSubmission, b"MAIL FROM:<a@b>\r\n"),
            (SmtpMx, b"MAIL FROM: <a@b>\r\n"),
            (SmtpMx, b"MAIL FROM:<a@b>  SIZE=1\r\n"),
            (SmtpMx, b"MAIL FROM:<@x,@y:a@b>\r\n"),
            (SmtpMx, b"RCPT TO:<>\r\n"),
            (SmtpMx, b"BDAT 01\r\n"),
            (SmtpMx, b"AUTH PLAIN AGFAYg==\r\n"),
            (SmtpMx, b"STARTTLS\r\n"),
            (SmtpMx, b"XCLIENT ADDR=1.2.3.4\r\n"),
        ];
        for (dialect, bytes) in bad {
            assert!(
                check(*dialect, bytes).is_err(),
                "{dialect:?} {}",
                show(bytes)
            );
        }
    }

    #[test]
    fn the_relay_writes_its_own_verbs_and_none_of_an_mx_clients() {
        let good: &[&[u8]] = &[
            b"EHLO relay.example\r\nSTARTTLS\r\nEHLO relay.example\r\n",
            b"MAIL FROM:<a@b.example> SIZE=1\r\nRCPT TO:<c@d.example> NOTIFY=NEVER\r\n",
            b"DATA\r\nQUIT\r\nRSET\r\nHELO relay.example\r\n",
        ];
        for bytes in good {
            assert!(
                Canonical::relay().forwarded(bytes).is_ok(),
                "{}",
                show(bytes)
            );
        }
        let bad: &[&[u8]] = &[
            b"STARTTLS now\r\n",
            b"starttls\r\n",
            b"VRFY alice\r\n",
            b"BDAT 1 LAST\r\n",
            b"HELP\r\n",
            b"AUTH PLAIN AGFAYg==\r\n",
            b"MAIL FROM: <a@b>\r\n",
        ];
        for bytes in bad {
            assert!(
                Canonical::relay().forwarded(bytes).is_err(),
                "{}",
                show(bytes)
            );
        }
    }

    #[test]
    fn a_body_that_a_lenient_upstream_ends_early_is_caught() {
        let transaction = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n";
        let run = |body: &[u8]| {
            let mut upstream = Canonical::new(Dialect::SmtpMx);
            upstream.replied(b"220 hi\r\n");
            upstream.forwarded(transaction)?;
            upstream.replied(b"250 ok\r\n250 ok\r\n354 go\r\n");
            upstream.forwarded(body)
        };
        assert_eq!(
            run(b"hello\r\n.\r\nQUIT\r\n").unwrap(),
            [Received::EndOfData, Received::Command(b"QUIT".to_vec())]
        );
        assert_eq!(run(b".\r\n").unwrap(), [Received::EndOfData]);
        for smuggled in [
            &b"hello\r\n.\0\r\nMAIL FROM:<x@y.example>\r\n"[..],
            b"hello\r\n\0.\r\n",
            b"hello\n.\n",
            b"hello\r\n.\x01\n",
        ] {
            assert!(run(smuggled).is_err(), "{}", show(smuggled));
        }
        // Dot-stuffed and bare CRs mid-line are content for both readings.
        assert_eq!(run(b"..\r\na\rb\r\n.\r\n").unwrap(), [Received::EndOfData]);
    }

    #[test]
    fn a_body_follows_only_a_354_and_a_chunk_is_counted() {
        let mut upstream = Canonical::new(Dialect::SmtpMx);
        upstream.replied(b"220 hi\r\n");
        upstream.forwarded(b"DATA\r\n").unwrap();
        upstream.replied(b"554 no\r\n");
        assert!(upstream.forwarded(b"body\r\n").is_err());

        let mut upstream = Canonical::new(Dialect::SmtpMx);
        upstream.replied(b"220 hi\r\n");
        let got = upstream
            .forwarded(b"BDAT 5 LAST\r\n\0.\r\nxQUIT\r\n")
            .unwrap();
        assert_eq!(
            got,
            [
                Received::Command(b"BDAT 5 LAST".to_vec()),
                Received::ChunkDone { last: true },
                Received::Command(b"QUIT".to_vec())
            ]
        );
        assert!(upstream.finish().is_ok());
        upstream.forwarded(b"NOO").unwrap();
        assert!(upstream.finish().is_err());
    }
}
