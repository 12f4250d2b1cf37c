//! POP3 through the proxy on loopback, against a scripted Dovecot-like upstream that
//! records every byte it receives: STLS injection, refusals before TLS, a full session
//! through STLS and through implicit TLS, held bytes behind PASS, upstream failures.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Proxy, assert_no_secret_logged, certs, proxy, tls_connect, within};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};

const GREETING: &str = "+OK Dovecot ready.\r\n";
/// The scripted upstream's own CAPA reply: USER, SASL with a channel-binding mechanism,
/// and its own STLS (it has no TLS; the proxy owns TLS).
const CAPA_UPSTREAM: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256-PLUS\r\nSTLS\r\n.\r\n";
const CAPA_BEFORE_TLS: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nSTLS\r\n.\r\n";
const CAPA_AFTER_TLS: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
const AUTH_REFUSED: &str = "-ERR [AUTH] TLS is required before authentication, use STLS\r\n";
const NOT_BEFORE_STLS: &str = "-ERR Command not allowed before STLS\r\n";
const BEGIN_TLS: &str = "+OK Begin TLS negotiation\r\n";
// "\0alice\0secret"
const PLAIN_IR: &str = "AGFsaWNlAHNlY3JldA==";

/// The one message in alice's maildrop: lines that look like the end of a body, replies
/// and commands, a line longer than any command line, all of them content.
fn message() -> Vec<u8> {
    let mut m = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: pop3 test\r\n\r\n\
.\r\n..\r\n+OK\r\n-ERR\r\nSTLS\r\nUSER mallory\r\n.hidden\r\n"
        .to_vec();
    m.extend_from_slice(&[b'x'; 20_000]);
    m.extend_from_slice(b"\r\nend\r\n");
    m
}

/// RFC 1939 §3: the message byte-stuffed, then the terminating `.` line.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Exactly what the upstream sends for `RETR 1`.
fn retr_reply() -> Vec<u8> {
    let message = message();
    let mut reply = format!("+OK {} octets\r\n", message.len()).into_bytes();
    reply.extend(dot_stuffed(&message));
    reply
}

// ---- the scripted upstream ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Dovecot-like: CAPA, USER/PASS, AUTH PLAIN, STAT/LIST/UIDL/RETR, QUIT.
    Dovecot,
    /// Accepts and never says anything.
    Silent,
}

/// Everything the scripted upstream received.
#[derive(Debug, Default)]
struct Recording {
    /// Every byte, every connection, in order.
    raw: Vec<u8>,
    /// Lines (commands and SASL responses), without their line end.
    commands: Vec<String>,
    /// Connections accepted.
    connections: usize,
    /// Times bytes were already waiting when the reply to PASS/AUTH was due: Courier
    /// drops those (DESIGN §10), so the proxy must hold them.
    early_input: usize,
}

struct Upstream {
    addr: SocketAddr,
    recording: Arc<Mutex<Recording>>,
}

impl Upstream {
    fn commands(&self) -> Vec<String> {
        self.recording.lock().unwrap().commands.clone()
    }
}

async fn scripted_upstream(behaviour: Behaviour) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recording = Arc::new(Mutex::new(Recording::default()));
    let shared = Arc::clone(&recording);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.lock().unwrap().connections += 1;
            tokio::spawn(serve_scripted(stream, behaviour, Arc::clone(&shared)));
        }
    });
    Upstream { addr, recording }
}

async fn serve_scripted(stream: TcpStream, behaviour: Behaviour, rec: Arc<Mutex<Recording>>) {
    if behaviour == Behaviour::Silent {
        let mut stream = stream;
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write.write_all(GREETING.as_bytes()).await;
    let mut user: Option<String> = None;
    let mut logged_in = false;
    let mut line = Vec::new();
    loop {
        let Some(text) = read_line(&mut read, &mut line, &rec).await else {
            return;
        };
        let mut words = text.splitn(2, ' ');
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let arg = words.next().unwrap_or("").to_owned();
        let reply: Vec<u8> = match verb.as_str() {
            "CAPA" => CAPA_UPSTREAM.as_bytes().to_vec(),
            "USER" if !logged_in => {
                user = Some(arg);
                b"+OK\r\n".to_vec()
            }
            "PASS" | "AUTH" if !logged_in => {
                let ok = if verb == "PASS" {
                    user.as_deref() == Some("alice") && arg == "secret"
                } else if arg.eq_ignore_ascii_case("PLAIN") {
                    let _ = write.write_all(b"+ \r\n").await;
                    let Some(response) = read_line(&mut read, &mut line, &rec).await else {
                        return;
                    };
                    response == PLAIN_IR
                } else {
                    arg == format!("PLAIN {PLAIN_IR}")
                };
                // Courier reads with a flush first: anything already sent is lost.
                if !read.buffer().is_empty()
                    || tokio::time::timeout(Duration::from_millis(50), read.fill_buf())
                        .await
                        .is_ok_and(|r| r.is_ok_and(|b| !b.is_empty()))
                {
                    rec.lock().unwrap().early_input += 1;
                }
                logged_in = ok;
                if ok {
                    b"+OK Logged in.\r\n".to_vec()
                } else {
                    b"-ERR [AUTH] Authentication failed.\r\n".to_vec()
                }
            }
            "STAT" if logged_in => format!("+OK 1 {}\r\n", message().len()).into_bytes(),
            "LIST" if logged_in && arg.is_empty() => {
                format!("+OK 1 messages:\r\n1 {}\r\n.\r\n", message().len()).into_bytes()
            }
            "UIDL" if logged_in && arg.is_empty() => b"+OK\r\n1 000000014d9a5e5a\r\n.\r\n".to_vec(),
            "RETR" if logged_in && arg == "1" => retr_reply(),
            "NOOP" => b"+OK\r\n".to_vec(),
            "QUIT" => {
                let _ = write.write_all(b"+OK Logging out.\r\n").await;
                return;
            }
            _ if logged_in => b"-ERR Unknown command.\r\n".to_vec(),
            _ => b"-ERR Unknown command or not logged in.\r\n".to_vec(),
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// One line from the client side of the upstream, recorded.
async fn read_line(
    read: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    rec: &Mutex<Recording>,
) -> Option<String> {
    line.clear();
    match read.read_until(b'\n', line).await {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(line).trim_end().to_owned();
    let mut r = rec.lock().unwrap();
    r.raw.extend_from_slice(line);
    r.commands.push(text.clone());
    Some(text)
}

// ---- a POP3 client ----

struct Pop3<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pop3<S> {
    fn new(stream: S) -> Self {
        Pop3 {
            stream: BufReader::new(stream),
        }
    }

    /// One line, line end included.
    async fn line(&mut self) -> String {
        String::from_utf8(self.raw_line().await).unwrap()
    }

    async fn raw_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let n = within(self.stream.read_until(b'\n', &mut line))
            .await
            .unwrap();
        assert!(n > 0, "connection closed");
        line
    }

    async fn send(&mut self, bytes: &[u8]) {
        within(self.stream.get_mut().write_all(bytes))
            .await
            .unwrap();
        within(self.stream.get_mut().flush()).await.unwrap();
    }

    /// Sends a command line and returns its single-line reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.line().await
    }

    /// Sends a command line and returns its whole reply: the status line and, after a
    /// `+OK`, the body up to and including the `.` line, bytes as received.
    async fn multi(&mut self, line: &str) -> Vec<u8> {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let mut reply = self.raw_line().await;
        if reply.starts_with(b"+OK") {
            loop {
                let line = self.raw_line().await;
                reply.extend_from_slice(&line);
                if line == b".\r\n" {
                    break;
                }
            }
        }
        reply
    }

    /// Everything until the peer closes (bounded by the step deadline).
    async fn rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = within(self.stream.read_to_end(&mut out)).await;
        out
    }

    fn into_inner(self) -> S {
        self.stream.into_inner()
    }
}

async fn connect(addr: SocketAddr) -> Pop3<TcpStream> {
    Pop3::new(within(TcpStream::connect(addr)).await.unwrap())
}

/// A TLS client, verifying the proxy's certificate, offering `pop3` as ALPN.
async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
) -> Pop3<tokio_rustls::client::TlsStream<S>> {
    let tls = tls_connect(stream, "mail.example.test", &[b"pop3"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"pop3"[..]));
    assert_eq!(
        &tls.get_ref().1.peer_certificates().unwrap()[0],
        &certs().default.2
    );
    Pop3::new(tls)
}

fn pop3_listener(name: &str, tls: &str, upstream: SocketAddr) -> String {
    format!(
        "{{ name: {name}, protocol: pop3, listen: \"127.0.0.1:0\", tls: {tls}, upstream: \"{upstream}\" }}"
    )
}

async fn pop3_proxy(upstream: &Upstream) -> Proxy {
    proxy(
        &[
            pop3_listener("pop3", "starttls", upstream.addr),
            pop3_listener("pop3s", "implicit", upstream.addr),
        ],
        "",
    )
    .await
}

/// Connects, reads the greeting, CAPA, STLS, handshake.
async fn stls_client(addr: SocketAddr) -> Pop3<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut plain = connect(addr).await;
    assert_eq!(plain.line().await, GREETING);
    assert_eq!(plain.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
    assert_eq!(plain.cmd("STLS").await, BEGIN_TLS);
    tls(plain.into_inner()).await
}

/// How an attacker's bytes are cut into writes.
#[derive(Debug, Clone, Copy)]
enum Cut {
    OneWrite,
    ByteByByte,
    AtCrlf,
}

/// Writes `payload` cut as asked. Once the proxy has switched to TLS it may close on the
/// garbage, so write errors are expected and ignored: the replies are what count.
async fn send_cut(client: &mut Pop3<TcpStream>, payload: &[u8], cut: Cut) {
    let stream = client.stream.get_mut();
    match cut {
        Cut::OneWrite => {
            let _ = within(stream.write_all(payload)).await;
        }
        Cut::ByteByByte => {
            for byte in payload {
                if within(stream.write_all(std::slice::from_ref(byte)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        Cut::AtCrlf => {
            let first = payload.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            let _ = within(stream.write_all(&payload[..first])).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = within(stream.write_all(&payload[first..])).await;
        }
    }
}

// ---- the tests ----

#[tokio::test]
async fn stls_command_injection_is_never_answered_and_never_forwarded() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    for payload in ["STLS\r\nCAPA\r\n", "STLS\r\nUSER attacker\r\nPASS pw\r\n"] {
        for cut in [Cut::OneWrite, Cut::ByteByByte, Cut::AtCrlf] {
            let before = upstream.commands().len();
            let mut client = connect(proxy.addr("pop3")).await;
            assert_eq!(client.line().await, GREETING);
            assert_eq!(client.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
            send_cut(&mut client, payload.as_bytes(), cut).await;
            assert_eq!(client.line().await, BEGIN_TLS, "{cut:?} {payload:?}");
            // Whatever follows is the TLS engine's alert, never a POP3 reply.
            let rest = client.rest().await;
            assert!(
                rest.is_empty() || rest[0] == 0x15,
                "{cut:?} {payload:?}: got {:?}",
                String::from_utf8_lossy(&rest)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                upstream.commands()[before..],
                ["CAPA"],
                "{cut:?} {payload:?}"
            );
        }
    }
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn credentials_before_tls_are_refused_and_never_reach_the_upstream() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = connect(proxy.addr("pop3")).await;
    assert_eq!(client.line().await, GREETING);
    assert_eq!(client.cmd("USER alice").await, AUTH_REFUSED);
    assert_eq!(client.cmd("PASS secret").await, AUTH_REFUSED);
    assert_eq!(
        client.cmd("APOP alice 0123456789abcdef").await,
        AUTH_REFUSED
    );
    assert_eq!(
        client.cmd(&format!("AUTH PLAIN {PLAIN_IR}")).await,
        AUTH_REFUSED
    );
    for command in ["STAT", "LIST", "RETR 1", "DELE 1", "XXXX"] {
        assert_eq!(client.cmd(command).await, NOT_BEFORE_STLS, "{command}");
    }
    assert_eq!(
        client.cmd("STLS please").await,
        "-ERR Syntax error, STLS takes no arguments\r\n"
    );
    assert_eq!(client.cmd("NOOP").await, "+OK\r\n");
    assert_eq!(client.cmd("QUIT").await, "+OK Logging out.\r\n");
    assert!(client.rest().await.is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(upstream.commands(), ["NOOP", "QUIT"]);
    let raw = String::from_utf8(upstream.recording.lock().unwrap().raw.clone()).unwrap();
    assert!(!raw.contains("alice") && !raw.contains("secret"));
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn a_full_stls_session_reads_mail_through_tls() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    assert_eq!(client.multi("CAPA").await, CAPA_AFTER_TLS.as_bytes());
    assert_eq!(client.cmd("STLS").await, "-ERR TLS already active\r\n");
    assert_eq!(client.cmd("USER alice").await, "+OK\r\n");
    assert_eq!(client.cmd("PASS secret").await, "+OK Logged in.\r\n");
    let size = message().len();
    assert_eq!(client.cmd("STAT").await, format!("+OK 1 {size}\r\n"));
    assert_eq!(
        client.multi("LIST").await,
        format!("+OK 1 messages:\r\n1 {size}\r\n.\r\n").as_bytes()
    );
    assert_eq!(client.multi("RETR 1").await, retr_reply());
    assert_eq!(client.cmd("QUIT").await, "+OK Logging out.\r\n");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "CAPA",
            "USER alice",
            "PASS secret",
            "STAT",
            "LIST",
            "RETR 1",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn commands_pipelined_behind_the_login_reach_the_upstream_after_its_reply() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    client
        .send(b"USER alice\r\nPASS secret\r\nSTAT\r\nUIDL\r\nRETR 1\r\nQUIT\r\n")
        .await;
    assert_eq!(client.line().await, "+OK\r\n");
    assert_eq!(client.line().await, "+OK Logged in.\r\n");
    let rest = client.rest().await;
    let expected = [
        format!("+OK 1 {}\r\n", message().len()).into_bytes(),
        b"+OK\r\n1 000000014d9a5e5a\r\n.\r\n".to_vec(),
        retr_reply(),
        b"+OK Logging out.\r\n".to_vec(),
    ]
    .concat();
    assert_eq!(rest, expected);
    let recording = upstream.recording.lock().unwrap();
    assert_eq!(recording.early_input, 0, "bytes reached the upstream early");
    assert_eq!(
        recording.commands,
        [
            "CAPA",
            "USER alice",
            "PASS secret",
            "STAT",
            "UIDL",
            "RETR 1",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn auth_plain_through_tls_then_blind_relay() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut client = stls_client(proxy.addr("pop3")).await;
    assert_eq!(client.cmd("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(
        client.cmd("*").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(client.cmd("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(client.cmd(PLAIN_IR).await, "+OK Logged in.\r\n");
    assert_eq!(
        client.cmd("STAT").await,
        format!("+OK 1 {}\r\n", message().len())
    );
    assert_eq!(client.cmd("QUIT").await, "+OK Logging out.\r\n");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "AUTH PLAIN",
            "*",
            "AUTH PLAIN",
            PLAIN_IR,
            "STAT",
            "QUIT"
        ]
    );
    assert_no_secret_logged(&["PASS secret", PLAIN_IR]);
}

#[tokio::test]
async fn implicit_tls_serves_the_same_session_with_tls_from_the_start() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let tcp = within(TcpStream::connect(proxy.addr("pop3s")))
        .await
        .unwrap();
    let mut client = tls(tcp).await;
    assert_eq!(client.line().await, GREETING);
    assert_eq!(client.multi("CAPA").await, CAPA_AFTER_TLS.as_bytes());
    assert_eq!(client.cmd("STLS").await, "-ERR TLS already active\r\n");
    assert_eq!(client.cmd("USER alice").await, "+OK\r\n");
    assert_eq!(
        client.cmd("PASS wrong").await,
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(client.cmd("PASS secret").await, "+OK Logged in.\r\n");
    assert_eq!(
        client.cmd("STAT").await,
        format!("+OK 1 {}\r\n", message().len())
    );
    assert_eq!(client.multi("RETR 1").await, retr_reply());
    assert_eq!(client.cmd("QUIT").await, "+OK Logging out.\r\n");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        upstream.commands(),
        [
            "CAPA",
            "USER alice",
            "PASS wrong",
            "PASS secret",
            "STAT",
            "RETR 1",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn upstream_down_gets_sys_temp_on_both_kinds_of_listener() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(
        &[
            pop3_listener("down", "starttls", closed),
            pop3_listener("down-tls", "implicit", closed),
        ],
        "",
    )
    .await;
    let expected = "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
    let mut client = connect(proxy.addr("down")).await;
    assert_eq!(client.line().await, expected);
    assert!(client.rest().await.is_empty());
    let tcp = within(TcpStream::connect(proxy.addr("down-tls")))
        .await
        .unwrap();
    let mut client = tls(tcp).await;
    assert_eq!(client.line().await, expected);
}

#[tokio::test]
async fn a_silent_upstream_times_out_with_sys_temp() {
    let upstream = scripted_upstream(Behaviour::Silent).await;
    let proxy = proxy(
        &[pop3_listener("silent", "starttls", upstream.addr)],
        "timeouts: { greeting: 300ms }\n",
    )
    .await;
    let mut client = connect(proxy.addr("silent")).await;
    // Nothing the client sends before the greeting is forwarded.
    client.send(b"USER early\r\n").await;
    assert_eq!(
        client.line().await,
        "-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"
    );
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn an_over_long_line_gets_an_error_while_other_sessions_carry_on() {
    let upstream = scripted_upstream(Behaviour::Dovecot).await;
    let proxy = pop3_proxy(&upstream).await;
    let mut flooder = connect(proxy.addr("pop3")).await;
    assert_eq!(flooder.line().await, GREETING);
    let mut bystander = connect(proxy.addr("pop3")).await;
    assert_eq!(bystander.line().await, GREETING);
    // The write may fail once the proxy closes; the reply is what counts.
    let _ = flooder
        .stream
        .get_mut()
        .write_all(&vec![b'A'; 100_000])
        .await;
    assert_eq!(flooder.line().await, "-ERR Line too long\r\n");
    assert!(flooder.rest().await.is_empty());
    assert_eq!(bystander.multi("CAPA").await, CAPA_BEFORE_TLS.as_bytes());
    assert!(!upstream.commands().iter().any(|c| c.starts_with("AAAA")));
}
