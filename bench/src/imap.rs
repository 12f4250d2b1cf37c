//! IMAP sessions: greeting, STARTTLS (or implicit TLS, or none), LOGIN, SELECT, M times
//! `FETCH n (RFC822.SIZE BODY.PEEK[])`, LOGOUT. Every command must end in a tagged OK;
//! every FETCH must carry exactly one literal whose size is the RFC822.SIZE it states.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::conn::{self, Conn, Io, Tls};
use crate::{Outcome, TlsMode, show};

/// Most lines (untagged and literal continuations) in one response.
const MAX_RESPONSE_LINES: usize = 100_000;

/// What came before a tagged OK.
#[derive(Default)]
pub struct Response {
    /// Untagged lines, literal bytes left out (a literal's `{n}` stays in the text).
    pub untagged: Vec<Vec<u8>>,
    /// Sizes of the literals received, in order.
    pub literals: Vec<u64>,
}

/// `{123}` or `{123+}` at the end of a line: the literal's size.
fn trailing_literal(line: &[u8]) -> Option<u64> {
    let inner = line.strip_suffix(b"}")?;
    let open = memchr::memrchr(b'{', inner)?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Reads until the tagged response for `tag`, which must be OK.
pub async fn tagged<S: Io>(c: &mut Conn<S>, tag: &str) -> Result<Response> {
    let mut out = Response::default();
    let prefix = format!("{tag} ");
    for _ in 0..MAX_RESPONSE_LINES {
        let line = c
            .line()
            .await
            .with_context(|| format!("{tag}: awaiting response"))?;
        if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
            if rest.len() >= 2 && rest[..2].eq_ignore_ascii_case(b"OK") {
                return Ok(out);
            }
            bail!("{tag}: expected OK, got {}", show(&line));
        }
        if !line.starts_with(b"* ") {
            bail!("{tag}: unexpected line {}", show(&line));
        }
        let mut text = line;
        // An untagged response may carry literals: `... {n}` CRLF, n bytes, more text.
        while let Some(size) = trailing_literal(&text) {
            out.literals.push(c.skip_exact(size).await?);
            let more = c.line().await?;
            text.extend_from_slice(b" ");
            text.extend_from_slice(&more);
            if text.len() > conn::MAX_LINE_LEN {
                bail!("{tag}: untagged response too long");
            }
        }
        out.untagged.push(text);
    }
    bail!("{tag}: more than {MAX_RESPONSE_LINES} lines without a tagged response")
}

/// `* n EXISTS` in a SELECT response.
fn exists(response: &Response) -> Option<u64> {
    response.untagged.iter().find_map(|line| {
        let mut words = line.split(|&b| b == b' ').skip(1);
        let n = std::str::from_utf8(words.next()?).ok()?.parse().ok()?;
        words
            .next()
            .filter(|w| w.eq_ignore_ascii_case(b"EXISTS"))
            .map(|_| n)
    })
}

/// The number after `RFC822.SIZE` in a FETCH response line.
fn rfc822_size(line: &[u8]) -> Option<u64> {
    let upper = line.to_ascii_uppercase();
    let at = memchr::memmem::find(&upper, b"RFC822.SIZE ")? + b"RFC822.SIZE ".len();
    let digits: Vec<u8> = upper[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// An IMAP quoted string (RFC 9051 §4.3) for LOGIN.
fn quoted(s: &str) -> Result<String> {
    if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        bail!("credentials must not contain CR, LF or NUL");
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// What every session does.
pub struct Plan {
    pub tls_mode: TlsMode,
    pub tls: Option<Tls>,
    pub step: Duration,
    pub user: String,
    pub password: String,
    pub mailbox: String,
    /// Sequence number of the message to fetch.
    pub message: u64,
    /// FETCHes per session.
    pub fetches: u32,
}

/// One full session; `out` collects what it measured.
pub async fn session(addr: std::net::SocketAddr, plan: &Plan, out: &mut Outcome) -> Result<()> {
    let tcp = conn::tcp(addr, plan.step).await?;
    let mut c: Conn<Box<dyn Io>> = match (plan.tls_mode, &plan.tls) {
        (TlsMode::None, _) => {
            let mut c: Conn<Box<dyn Io>> = Conn::new(Box::new(tcp), plan.step);
            greeting(&mut c).await?;
            c
        }
        (TlsMode::Implicit, Some(tls)) => {
            let stream = tls.handshake(tcp, plan.step).await?;
            out.resumed = conn::resumed(&stream);
            out.suite = conn::suite(&stream);
            let mut c: Conn<Box<dyn Io>> = Conn::new(Box::new(stream), plan.step);
            greeting(&mut c).await?;
            c
        }
        (TlsMode::Starttls, Some(tls)) => {
            let mut plain = Conn::new(tcp, plan.step);
            greeting(&mut plain).await?;
            plain.send(b"s1 STARTTLS\r\n").await?;
            tagged(&mut plain, "s1").await?;
            let stream = tls.handshake(plain.into_inner()?, plan.step).await?;
            out.resumed = conn::resumed(&stream);
            out.suite = conn::suite(&stream);
            Conn::new(Box::new(stream), plan.step)
        }
        (_, None) => bail!("TLS requested without a TLS client"),
    };
    let login = format!(
        "a1 LOGIN {} {}\r\n",
        quoted(&plan.user)?,
        quoted(&plan.password)?
    );
    c.send(login.as_bytes()).await?;
    tagged(&mut c, "a1").await?;
    c.send(format!("a2 SELECT {}\r\n", quoted(&plan.mailbox)?).as_bytes())
        .await?;
    let selected = tagged(&mut c, "a2").await?;
    match exists(&selected) {
        Some(n) if n >= plan.message => {}
        other => bail!(
            "mailbox holds {} messages, message {} asked for",
            other.map_or("an unknown number of".into(), |n| n.to_string()),
            plan.message
        ),
    }
    for i in 0..plan.fetches {
        let started = Instant::now();
        let tag = format!("f{i}");
        c.send(format!("{tag} FETCH {} (RFC822.SIZE BODY.PEEK[])\r\n", plan.message).as_bytes())
            .await?;
        let fetched = tagged(&mut c, &tag).await?;
        let [size] = fetched.literals[..] else {
            bail!(
                "FETCH: expected one literal, got {}",
                fetched.literals.len()
            );
        };
        let stated = fetched.untagged.iter().find_map(|l| rfc822_size(l));
        if stated != Some(size) {
            bail!("FETCH: literal of {size} bytes, RFC822.SIZE says {stated:?}");
        }
        out.payload += size;
        out.transactions.push(started.elapsed());
    }
    c.send(b"z LOGOUT\r\n").await?;
    let bye = tagged(&mut c, "z").await?;
    if !bye.untagged.iter().any(|l| l.starts_with(b"* BYE")) {
        bail!("LOGOUT: no * BYE");
    }
    c.shutdown().await;
    Ok(())
}

async fn greeting<S: Io>(c: &mut Conn<S>) -> Result<()> {
    let line = c.line().await.context("greeting: awaiting it")?;
    if !line.starts_with(b"* OK") {
        bail!("greeting: expected * OK, got {}", show(&line));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_sizes_and_counts_are_read_from_lines() {
        assert_eq!(trailing_literal(b"* 1 FETCH (BODY[] {42}"), Some(42));
        assert_eq!(trailing_literal(b"a LOGIN {5+}"), Some(5));
        assert_eq!(trailing_literal(b"* OK {x}"), None);
        assert_eq!(trailing_literal(b"* OK }"), None);
        assert_eq!(
            rfc822_size(b"* 1 FETCH (RFC822.SIZE 1234 BODY[] {1234}"),
            Some(1234)
        );
        let response = Response {
            untagged: vec![b"* FLAGS ()".to_vec(), b"* 7 EXISTS".to_vec()],
            literals: vec![],
        };
        assert_eq!(exists(&response), Some(7));
        assert_eq!(quoted("a\"b").unwrap(), "\"a\\\"b\"");
        assert!(quoted("a\r\nb").is_err());
    }
}
