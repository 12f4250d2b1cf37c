//! The harness of ARCHITECTURE.md §3's canonical rule against a real legacy server, shared by
//! `e2e_canonical.rs` (Dovecot of `scripts/legacy.sh`) and `e2e_mailutils.rs` (GNU
//! Mailutils): a line client, the join of a session to its upstream leg (a
//! [`Recorder`] on that leg, mailmoat's `upstream_port`), mailmoat's log lines per
//! session, the attacks' steps (the attack, then STARTTLS and the real login in the same
//! connection) and what one variant did on mailmoat's side. What differs per server (its
//! users, how its log is read, what it must not have done) the tests pass in.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::recorder::{Leg, Recorder};
use super::{Mailmoat, STEP, poll_for_async, tls_connect, traceable_tcp, wait_for_async};

// ---------------------------------------------------------------- a line client

/// Lines over any stream, each read bounded; bare LF lines kept as they came.
pub struct Lines<S> {
    pub stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    pub fn new(stream: S) -> Self {
        Lines {
            stream: BufReader::new(stream),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let stream = self.stream.get_mut();
        tokio::time::timeout(STEP, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| "write timed out".to_owned())?
        .map_err(|e| format!("write: {e}"))
    }

    /// The next line, its line end included; an error at the end of the stream.
    pub async fn line(&mut self) -> Result<String, String> {
        let mut line = Vec::new();
        let n = tokio::time::timeout(STEP, self.stream.read_until(b'\n', &mut line))
            .await
            .map_err(|_| "no line within the step deadline".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the connection closed".to_owned());
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Lines up to and including the first that `last` accepts (at most 200), or up to
    /// the end of the stream (noted as `<...>`).
    pub async fn until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        while lines.len() < 200 {
            match self.line().await {
                Ok(line) => {
                    let done = last(&line);
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    lines.push(format!("<{e}>"));
                    break;
                }
            }
        }
        lines
    }
}

/// The TLS handshake for mail.example.test over the client's connection, after the
/// go-ahead for STARTTLS/STLS.
pub async fn tls_lines(
    client: Lines<TcpStream>,
) -> std::io::Result<Lines<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tls = tls_connect(client.stream.into_inner(), "mail.example.test", &[]).await?;
    Ok(Lines::new(tls))
}

/// Whether a line is the reply tagged `tag`.
pub fn tagged(tag: &'static str) -> impl Fn(&str) -> bool {
    move |line: &str| line.starts_with(&format!("{tag} "))
}

// ---------------------------------------------------------------- mailmoat's log

/// The port of mailmoat's upstream connection for the session of the client at `client`:
/// the `upstream_port` field of its log lines (ARCHITECTURE.md §7), bounded wait. A session logs
/// it from its first event on (`tls_established`, `session_end`, a refusal).
pub async fn upstream_port(mailmoat: &Mailmoat, client: SocketAddr) -> u16 {
    let tag = format!("client={client}");
    wait_for_async(
        STEP,
        format_args!("an upstream_port for {tag} in mailmoat's log"),
        async || {
            mailmoat.log_text().lines().find_map(|line| {
                if !line.contains(&tag) {
                    return None;
                }
                let at = line.find("upstream_port=")? + "upstream_port=".len();
                let digits: String = line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
        },
    )
    .await
}

/// Whether mailmoat's log holds `event` for the session of the client at `client`.
pub async fn mailmoat_logged(mailmoat: &Mailmoat, client: SocketAddr, event: &str) -> bool {
    let tag = format!("client={client}");
    let event = format!("event=\"{event}\"");
    // The refusal is logged as the command is read, before the replies the client waited
    // for; a short bounded wait covers the log file's write.
    poll_for_async(Duration::from_secs(5), async || {
        mailmoat
            .log_text()
            .lines()
            .any(|l| l.contains(&tag) && l.contains(&event))
            .then_some(())
    })
    .await
    .is_some()
}

/// The leg of `legs` that mailmoat opened for the session of the client at `client`
/// (joined by the `upstream_port` of mailmoat's log).
pub async fn session_leg(mailmoat: &Mailmoat, client: SocketAddr, legs: &[Leg]) -> Leg {
    let from = upstream_port(mailmoat, client).await;
    legs.iter()
        .find(|leg| leg.client_port == from)
        .cloned()
        .unwrap_or_else(|| panic!("no upstream leg from port {from}"))
}

// ---------------------------------------------------------------- the attacks' steps

/// The real user, logged in after TLS.
#[derive(Debug, Clone, Copy)]
pub struct Login {
    pub user: &'static str,
    pub password: &'static str,
}

/// The client's side of one attack.
pub struct Attacked {
    /// The client's address: its session in mailmoat's log.
    pub client: SocketAddr,
    /// Everything the client got before STARTTLS.
    pub replies: Vec<String>,
    /// The upstream legs as they were before STARTTLS.
    pub before_tls: Vec<Leg>,
    /// STARTTLS then the real login in the same connection.
    pub after_tls: Result<(), String>,
}

/// An IMAP attack through mailmoat's listener at `addr`: `capability_first` (a line
/// tagged `x`, whose reply must announce LITERAL+) if any, then `head` (with its line
/// end) and the `hidden` line, then STARTTLS and `login`.
pub async fn imap_attack(
    addr: SocketAddr,
    recorder: &Recorder,
    capability_first: Option<&[u8]>,
    head: &str,
    synchronising: bool,
    hidden: &str,
    login: Login,
) -> Attacked {
    let tcp = traceable_tcp(addr).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("* OK "), "{greeting:?}");
    if let Some(capability_first) = capability_first {
        let _ = client.send(capability_first).await;
        let capability = client.until(tagged("x")).await;
        assert!(
            capability.iter().any(|l| l.contains(" LITERAL+")),
            "{capability:?}"
        );
    }

    // The attack: the octets after the head are a LOGIN line of their own.
    let mut replies = Vec::new();
    client.send(head.as_bytes()).await.unwrap();
    if synchronising {
        // A client waits for `+`; a refusal comes instead, and the octets follow anyway
        // (then they are a LOGIN line, which mailmoat refuses before TLS).
        let first = client.line().await.unwrap_or_else(|e| format!("<{e}>"));
        replies.push(first);
    }
    let _ = client.send(hidden.as_bytes()).await;
    // An empty line ends whatever command mailmoat may think still goes on; then a NOOP
    // of a tag of its own, whose tagged reply closes what the client reads.
    let _ = client.send(b"\r\nc NOOP\r\n").await;
    replies.extend(client.until(tagged("c")).await);
    let before_tls = recorder.legs();

    // STARTTLS and the real login, in the same connection.
    let after_tls = async {
        client.send(b"s STARTTLS\r\n").await?;
        let go = client.until(tagged("s")).await;
        if !go.last().is_some_and(|l| l.starts_with("s OK")) {
            return Err(format!("STARTTLS: {go:?}"));
        }
        let mut tls = tls_lines(client)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let Login { user, password } = login;
        tls.send(format!("l LOGIN {user} {password}\r\n").as_bytes())
            .await?;
        let login = tls.until(tagged("l")).await;
        if !login.last().is_some_and(|l| l.starts_with("l OK")) {
            return Err(format!("LOGIN as {user} after TLS: {login:?}"));
        }
        tls.send(b"z LOGOUT\r\n").await?;
        tls.until(tagged("z")).await;
        Ok(())
    }
    .await;
    Attacked {
        client: client_addr,
        replies,
        before_tls,
        after_tls,
    }
}

/// A POP3 attack through mailmoat's listener at `addr`: the `attack` bytes, then STLS
/// and `login`, whose PASS must be answered with a line starting `pass_ok`.
pub async fn pop3_attack(
    addr: SocketAddr,
    recorder: &Recorder,
    attack: &str,
    login: Login,
    pass_ok: &str,
) -> Attacked {
    let tcp = traceable_tcp(addr).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    let greeting = client.line().await.unwrap();
    assert!(greeting.starts_with("+OK"), "{greeting:?}");

    let mut replies = Vec::new();
    let _ = client.send(attack.as_bytes()).await;
    // STLS closes what the client reads before TLS: mailmoat answers it once every
    // earlier command is answered (POP3 goes one command at a time).
    let _ = client.send(b"STLS\r\n").await;
    replies.extend(client.until(|l| l.starts_with("+OK Begin TLS")).await);
    let before_tls = recorder.legs();

    let go_ahead = replies
        .last()
        .is_some_and(|l| l.starts_with("+OK Begin TLS"));
    let after_tls = async {
        if !go_ahead {
            return Err("no go-ahead for STLS".to_owned());
        }
        let mut tls = tls_lines(client)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let Login { user, password } = login;
        tls.send(format!("USER {user}\r\n").as_bytes()).await?;
        let user_reply = tls.line().await?;
        tls.send(format!("PASS {password}\r\n").as_bytes()).await?;
        let pass = tls.line().await?;
        if !user_reply.starts_with("+OK") || !pass.starts_with(pass_ok) {
            return Err(format!(
                "USER/PASS as {user} after TLS: {user_reply:?} {pass:?}"
            ));
        }
        tls.send(b"QUIT\r\n").await?;
        let _ = tls.line().await;
        Ok(())
    }
    .await;
    Attacked {
        client: client_addr,
        replies,
        before_tls,
        after_tls,
    }
}

// ---------------------------------------------------------------- well-behaved clients

/// A client through TLS: its address (its session in mailmoat's log), the upstream legs
/// as they were before STARTTLS, and the connection after the TLS handshake.
pub struct WellBehaved {
    pub client: SocketAddr,
    pub before_tls: Vec<Leg>,
    pub tls: Lines<tokio_rustls::client::TlsStream<TcpStream>>,
}

/// A well-behaved IMAP client of mailmoat's listener at `addr` up to TLS: `a CAPABILITY`
/// and `b NOOP` (their replies returned), then STARTTLS.
pub async fn imap_well_behaved(
    addr: SocketAddr,
    recorder: &Recorder,
) -> (WellBehaved, Vec<String>) {
    let tcp = traceable_tcp(addr).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    assert!(client.line().await.unwrap().starts_with("* OK "));
    client.send(b"a CAPABILITY\r\nb NOOP\r\n").await.unwrap();
    let replies = client.until(tagged("b")).await;
    assert!(replies.last().unwrap().starts_with("b OK"), "{replies:?}");
    let before_tls = recorder.legs();
    client.send(b"s STARTTLS\r\n").await.unwrap();
    assert!(client.line().await.unwrap().starts_with("s OK"));
    let tls = tls_lines(client).await.unwrap();
    let client = WellBehaved {
        client: client_addr,
        before_tls,
        tls,
    };
    (client, replies)
}

/// A well-behaved POP3 client of mailmoat's listener at `addr` up to TLS: `CAPA` (which
/// must announce STLS), then STLS.
pub async fn pop3_well_behaved(addr: SocketAddr, recorder: &Recorder) -> WellBehaved {
    let tcp = traceable_tcp(addr).await;
    let client_addr = tcp.local_addr().unwrap();
    let mut client = Lines::new(tcp);
    assert!(client.line().await.unwrap().starts_with("+OK"));
    client.send(b"CAPA\r\n").await.unwrap();
    let capa = client.until(|l| l == ".\r\n").await;
    assert!(capa.iter().any(|l| l == "STLS\r\n"), "{capa:?}");
    let before_tls = recorder.legs();
    client.send(b"STLS\r\n").await.unwrap();
    assert!(client.line().await.unwrap().starts_with("+OK"));
    let tls = tls_lines(client).await.unwrap();
    WellBehaved {
        client: client_addr,
        before_tls,
        tls,
    }
}

// ---------------------------------------------------------------- what a variant did

/// What one variant did, on every side; `server` is what the legacy server's log says
/// of the session (each test reads it its own way).
#[derive(Debug)]
pub struct Seen<L> {
    pub variant: String,
    /// Everything the client got before STARTTLS.
    pub replies: Vec<String>,
    /// The upstream leg before STARTTLS, shown and judged by the strict reader.
    pub upstream_before_tls: String,
    pub upstream_verdict: Result<(), String>,
    /// The server's record of the session.
    pub server: L,
    /// Whether mailmoat must log `plaintext_command_refused` for the session.
    pub refusal_expected: bool,
    pub refusal_logged: bool,
    /// STARTTLS then the real login in the same connection.
    pub after_tls: Result<(), String>,
}

impl<L: Default> Seen<L> {
    pub fn new(variant: String) -> Seen<L> {
        Seen {
            variant,
            replies: Vec::new(),
            upstream_before_tls: String::new(),
            upstream_verdict: Err("not judged".into()),
            server: L::default(),
            refusal_expected: true,
            refusal_logged: false,
            after_tls: Err("not tried".into()),
        }
    }
}

impl<L> Seen<L> {
    /// The client's side is over (`attacked`, whose replies it keeps): joins the session
    /// to its upstream leg (mailmoat's `upstream_port`), has `show` show that leg as it
    /// was before TLS and `judge` (the strict reader) judge it; `server` reads the
    /// server's log of the leg's connection (and may find the real login missing in it);
    /// last, reads mailmoat's log.
    pub async fn settle(
        &mut self,
        mailmoat: &Mailmoat,
        attacked: Attacked,
        show: fn(&[u8]) -> String,
        judge: impl FnOnce(&[u8]) -> Result<(), String>,
        server: impl AsyncFnOnce(&Leg, Result<(), String>) -> (Result<(), String>, L),
    ) {
        self.replies = attacked.replies;
        let leg = session_leg(mailmoat, attacked.client, &attacked.before_tls).await;
        self.upstream_before_tls = show(&leg.to_upstream);
        self.upstream_verdict = judge(&leg.to_upstream);
        (self.after_tls, self.server) = server(&leg, attacked.after_tls).await;
        self.refusal_logged =
            mailmoat_logged(mailmoat, attacked.client, "plaintext_command_refused").await;
    }

    /// Whether the client was told it is logged in (a line `logged_in` accepts).
    pub fn told_logged_in(&self, out: &mut Vec<String>, logged_in: impl Fn(&str) -> bool) {
        let told: Vec<&String> = self.replies.iter().filter(|l| logged_in(l)).collect();
        if !told.is_empty() {
            out.push(format!("the client was told it is logged in: {told:?}"));
        }
    }

    /// The checks of mailmoat's side: the strict reader's verdict on the upstream leg
    /// before TLS, none of `words` on it (the leg shown in the message if
    /// `show_leg`), the refusal logged if expected, and STARTTLS and the real login
    /// afterwards.
    pub fn leg_problems(&self, out: &mut Vec<String>, words: &[&str], show_leg: bool) {
        if let Err(e) = &self.upstream_verdict {
            out.push(format!("upstream leg before TLS: {e}"));
        }
        for word in words {
            if self.upstream_before_tls.contains(word) {
                if show_leg {
                    out.push(format!(
                        "{word:?} crossed the upstream leg before TLS: {}",
                        self.upstream_before_tls
                    ));
                } else {
                    out.push(format!("{word:?} crossed the upstream leg before TLS"));
                }
            }
        }
        if self.refusal_expected && !self.refusal_logged {
            out.push("mailmoat logged no plaintext_command_refused for the session".into());
        }
        if let Err(e) = &self.after_tls {
            out.push(format!("STARTTLS and the real login afterwards: {e}"));
        }
    }
}
