//! SMTP sessions: greeting, EHLO, STARTTLS (or implicit TLS, or none), EHLO, optional
//! AUTH PLAIN, M transactions, QUIT. Every reply is read whole (multiline) and its code
//! checked; the capability lists are checked where mailmoat's rewriting must show.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::conn::{self, Conn, Io, Tls};
use crate::{Outcome, TlsMode, show};

/// One reply: its code and the text of each line (after the code and separator).
pub struct Reply {
    pub code: u16,
    pub lines: Vec<Vec<u8>>,
}

impl Reply {
    /// The EHLO keywords (every line but the first), upper-cased.
    fn keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .map(|l| String::from_utf8_lossy(l).to_ascii_uppercase())
            .collect()
    }

    fn has_keyword(&self, word: &str) -> bool {
        self.keywords()
            .iter()
            .any(|k| k.split(' ').next() == Some(word))
    }
}

/// Most lines in one reply (a generous bound on a hostile peer).
const MAX_REPLY_LINES: usize = 1000;

/// Reads one complete reply (RFC 5321 §4.2: `code-text` lines, then `code text`).
pub async fn reply<S: Io>(c: &mut Conn<S>) -> Result<Reply> {
    let mut out = Reply {
        code: 0,
        lines: Vec::new(),
    };
    loop {
        let line = c.line().await?;
        let code = match line.get(..3) {
            Some(digits) if digits.iter().all(u8::is_ascii_digit) => {
                u16::from(digits[0] - b'0') * 100
                    + u16::from(digits[1] - b'0') * 10
                    + u16::from(digits[2] - b'0')
            }
            _ => bail!("not an SMTP reply line: {}", show(&line)),
        };
        if out.code != 0 && code != out.code {
            bail!(
                "reply code changed inside a multiline reply: {} then {}",
                out.code,
                show(&line)
            );
        }
        out.code = code;
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => bail!("bad separator in reply line: {}", show(&line)),
        };
        out.lines.push(line.get(4..).unwrap_or_default().to_vec());
        if last {
            return Ok(out);
        }
        if out.lines.len() >= MAX_REPLY_LINES {
            bail!("reply longer than {MAX_REPLY_LINES} lines");
        }
    }
}

/// Sends `command` (CRLF added) and checks the reply's code.
pub async fn cmd<S: Io>(c: &mut Conn<S>, command: &str, want: u16) -> Result<Reply> {
    c.send(format!("{command}\r\n").as_bytes()).await?;
    expect(c, command, want).await
}

async fn expect<S: Io>(c: &mut Conn<S>, what: &str, want: u16) -> Result<Reply> {
    let verb = what.split(' ').next().unwrap_or(what);
    let reply = reply(c)
        .await
        .with_context(|| format!("{verb}: awaiting reply"))?;
    if reply.code != want {
        bail!(
            "{verb}: expected {want}, got {} {}",
            reply.code,
            show(reply.lines.first().map(Vec::as_slice).unwrap_or_default())
        );
    }
    Ok(reply)
}

/// What the TLS handshake gave, if there was one.
#[derive(Default)]
pub struct Negotiated {
    pub resumed: bool,
    pub suite: Option<String>,
}

impl Negotiated {
    fn of<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Self {
        Negotiated {
            resumed: conn::resumed(tls),
            suite: conn::suite(tls),
        }
    }
}

/// What every session does.
pub struct Plan {
    pub tls_mode: TlsMode,
    pub tls: Option<Tls>,
    pub step: Duration,
    /// `(user, password)` for AUTH PLAIN after TLS.
    pub auth: Option<(String, String)>,
    /// The message, dot line excluded, CRLF line ends, no line starting with `.`.
    pub body: Arc<Vec<u8>>,
    pub messages: u32,
    pub from: String,
    pub to: String,
    /// Latency mode: RSET after each transaction and time each one.
    pub rset: bool,
    /// MAIL, RCPT and DATA in one write (RFC 2920).
    pub pipelining: bool,
}

/// A message of exactly `size` bytes (at least its header): short CRLF lines, none
/// starting with a dot, so the bytes on the wire are the bytes counted.
pub fn body(size: usize) -> Vec<u8> {
    let mut out = b"Subject: mailmoat-bench\r\n\r\n".to_vec();
    const LINE: usize = 78;
    while size >= out.len() + LINE {
        out.extend(std::iter::repeat_n(b'x', LINE - 2));
        out.extend_from_slice(b"\r\n");
    }
    let rest = size.saturating_sub(out.len());
    if rest >= 2 {
        out.extend(std::iter::repeat_n(b'y', rest - 2));
        out.extend_from_slice(b"\r\n");
    } else if rest == 1 {
        // Lengthen the subject by one byte (it ends at offset 23).
        out.insert(23, b'-');
    }
    out
}

/// Connects and gets as far as a session ready for EHLO with TLS in place as planned.
/// Returns the connection (boxed, TLS or not) and what TLS negotiated.
pub async fn open(
    addr: std::net::SocketAddr,
    plan: &Plan,
) -> Result<(Conn<Box<dyn Io>>, Negotiated)> {
    let tcp = conn::tcp(addr, plan.step).await?;
    match (plan.tls_mode, &plan.tls) {
        (TlsMode::None, _) => {
            let mut c: Conn<Box<dyn Io>> = Conn::new(Box::new(tcp), plan.step);
            expect(&mut c, "greeting", 220).await?;
            Ok((c, Negotiated::default()))
        }
        (TlsMode::Implicit, Some(tls)) => {
            let stream = tls.handshake(tcp, plan.step).await?;
            let negotiated = Negotiated::of(&stream);
            let mut c: Conn<Box<dyn Io>> = Conn::new(Box::new(stream), plan.step);
            expect(&mut c, "greeting", 220).await?;
            Ok((c, negotiated))
        }
        (TlsMode::Starttls, Some(tls)) => {
            let mut plain = Conn::new(tcp, plan.step);
            expect(&mut plain, "greeting", 220).await?;
            let ehlo = cmd(&mut plain, "EHLO bench.mailmoat.test", 250).await?;
            if !ehlo.has_keyword("STARTTLS") {
                bail!("EHLO before TLS does not offer STARTTLS");
            }
            cmd(&mut plain, "STARTTLS", 220).await?;
            let stream = tls.handshake(plain.into_inner()?, plan.step).await?;
            let negotiated = Negotiated::of(&stream);
            Ok((Conn::new(Box::new(stream), plan.step), negotiated))
        }
        (_, None) => bail!("TLS requested without a TLS client"),
    }
}

/// EHLO (checking the capability view for the TLS state) and AUTH if planned.
pub async fn hello<S: Io>(c: &mut Conn<S>, plan: &Plan) -> Result<()> {
    let ehlo = cmd(c, "EHLO bench.mailmoat.test", 250).await?;
    if plan.tls_mode != TlsMode::None && ehlo.has_keyword("STARTTLS") {
        bail!("EHLO after TLS still offers STARTTLS");
    }
    if plan.pipelining && !ehlo.has_keyword("PIPELINING") {
        bail!("--pipelining, but EHLO does not offer PIPELINING");
    }
    if let Some((user, password)) = &plan.auth {
        let offers_plain = ehlo.keywords().iter().any(|k| {
            let mut words = k.split(' ');
            words.next() == Some("AUTH") && words.any(|w| w == "PLAIN")
        });
        if !offers_plain {
            bail!("EHLO does not offer AUTH PLAIN");
        }
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{user}\0{password}").as_bytes());
        c.send(format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
        expect(c, "AUTH", 235).await?;
    }
    Ok(())
}

/// One full session; `out` collects what it measured.
pub async fn session(addr: std::net::SocketAddr, plan: &Plan, out: &mut Outcome) -> Result<()> {
    let (mut c, negotiated) = open(addr, plan).await?;
    out.resumed = negotiated.resumed;
    out.suite = negotiated.suite;
    hello(&mut c, plan).await?;
    for _ in 0..plan.messages {
        let started = Instant::now();
        let (mail, rcpt) = (
            format!("MAIL FROM:<{}>", plan.from),
            format!("RCPT TO:<{}>", plan.to),
        );
        if plan.pipelining {
            // RFC 2920 §3.1: DATA may end a group; each reply is still checked, in order.
            c.send(format!("{mail}\r\n{rcpt}\r\nDATA\r\n").as_bytes())
                .await?;
            expect(&mut c, &mail, 250).await?;
            expect(&mut c, &rcpt, 250).await?;
            expect(&mut c, "DATA", 354).await?;
        } else {
            cmd(&mut c, &mail, 250).await?;
            cmd(&mut c, &rcpt, 250).await?;
            cmd(&mut c, "DATA", 354).await?;
        }
        c.send(&plan.body).await?;
        c.send(b".\r\n").await?;
        expect(&mut c, "end of data", 250).await?;
        if plan.rset {
            cmd(&mut c, "RSET", 250).await?;
        }
        out.payload += plan.body.len() as u64;
        out.transactions.push(started.elapsed());
    }
    cmd(&mut c, "QUIT", 221).await?;
    c.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_exactly_the_asked_size_and_no_leading_dot() {
        for size in [0, 27, 28, 29, 100, 1000, 1_000_000] {
            let b = body(size);
            assert_eq!(b.len(), size.max(27), "size {size}");
            assert!(b.ends_with(b"\r\n"));
            assert!(!b.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
        }
    }
}
