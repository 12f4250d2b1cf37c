//! The client side of a test: a TLS client that verifies the proxy's certificate, a
//! line client for SMTP, IMAP and POP3 over TCP or TLS, writes cut as an attacker cuts
//! them, connections from addresses of their own, and the Python SMTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{certs, run_program, within};

/// The client configuration: roots of the test CA only, these ALPN protocols.
pub fn tls_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs().ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// A TLS handshake as a client, verifying the proxy's certificate for `name`.
pub async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(alpn));
    let name = ServerName::try_from(name.to_owned()).unwrap();
    within(connector.connect(name, stream)).await
}

/// A line-oriented client (SMTP, IMAP, POP3) over any stream.
pub struct Client<S> {
    pub stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Self {
        Client {
            stream: BufReader::new(stream),
        }
    }

    /// One complete reply (all its lines).
    pub async fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let line = self.line_after(&reply).await;
            reply.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' || line.as_bytes()[3] == b'\r' {
                return reply;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within(self.stream.get_mut().write_all(bytes))
            .await
            .unwrap();
        within(self.stream.get_mut().flush()).await.unwrap();
    }

    /// Sends a command line and returns its reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Everything until the peer closes (bounded by the step deadline).
    pub async fn rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = within(self.stream.read_to_end(&mut out)).await;
        out
    }

    /// One line, line end included.
    pub async fn line(&mut self) -> String {
        String::from_utf8(self.raw_line().await).unwrap()
    }

    /// One line as bytes, line end included.
    pub async fn raw_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let n = within(self.stream.read_until(b'\n', &mut line))
            .await
            .unwrap();
        assert!(n > 0, "connection closed");
        line
    }

    /// Sends a command line and returns its one-line reply (IMAP, POP3).
    pub async fn cmd_line(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.line().await
    }

    /// Sends a POP3 command line and returns its whole reply: the status line and, after
    /// a `+OK`, the body up to and including the `.` line, bytes as received.
    pub async fn multi(&mut self, line: &str) -> Vec<u8> {
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

    /// IMAP: lines up to and including the tagged response for `tag`, or one line when
    /// `tag` is None.
    pub async fn response(&mut self, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => self.lines_until(&format!("{tag} ")).await,
            None => self.lines_until("").await,
        }
    }

    /// Lines up to and including the first that starts with `prefix`.
    pub async fn lines_until(&mut self, prefix: &str) -> String {
        let mut all = String::new();
        loop {
            let line = self.line_after(&all).await;
            all.push_str(&line);
            if line.starts_with(prefix) {
                return all;
            }
        }
    }

    /// One line, line end included; the test fails, naming what came `before` it, if
    /// the peer closes instead.
    async fn line_after(&mut self, before: &str) -> String {
        let mut line = String::new();
        let n = within(self.stream.read_line(&mut line)).await.unwrap();
        assert!(n > 0, "connection closed after {before:?}");
        line
    }

    /// Writes `payload` cut as asked. Once the proxy has switched to TLS it may close on
    /// the garbage, so write errors end the writing and are otherwise ignored: the
    /// replies are what count.
    pub async fn send_cut(&mut self, payload: &[u8], cut: Cut) {
        let stream = self.stream.get_mut();
        let write = async |stream: &mut S, bytes: &[u8]| {
            within(async {
                stream.write_all(bytes).await?;
                stream.flush().await
            })
            .await
            .is_ok()
        };
        match cut {
            Cut::OneWrite => {
                write(stream, payload).await;
            }
            Cut::ByteByByte => {
                for byte in payload {
                    if !write(stream, std::slice::from_ref(byte)).await {
                        break;
                    }
                }
            }
            Cut::AtCrlf => {
                let first = payload.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                if write(stream, &payload[..first]).await {
                    // The behaviour under test: the rest comes in a later read, as from a
                    // client that pauses after the first line.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    write(stream, &payload[first..]).await;
                }
            }
        }
    }

    pub fn into_inner(self) -> S {
        self.stream.into_inner()
    }
}

pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client::new(within(TcpStream::connect(addr)).await.unwrap())
}

/// A connection from a loopback address that no other connection of this test binary
/// uses (127.77.x.y), so that `client=` in the proxy's log lines names this session
/// alone: the ports of 127.0.0.1 are reused by the many connections of tests running
/// side by side, and a log lookup by port once found another test's session.
pub async fn traceable_tcp(addr: SocketAddr) -> TcpStream {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (high, low) = (n / 254, n % 254 + 1);
    let source = std::net::Ipv4Addr::new(127, 77, u8::try_from(high).unwrap(), low as u8);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    within(socket.connect(addr)).await.unwrap()
}

/// [`connect`] from an address of its own: see [`traceable_tcp`].
pub async fn traceable_connect(addr: SocketAddr) -> Client<TcpStream> {
    Client::new(traceable_tcp(addr).await)
}

impl Client<TcpStream> {
    /// This end's address: the `client` field of the session's log lines.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.get_ref().local_addr().unwrap()
    }

    /// SMTP STARTTLS (after EHLO), answered 220, and the handshake for
    /// mail.example.test.
    pub async fn starttls(mut self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        assert_eq!(
            self.cmd("STARTTLS").await,
            "220 2.0.0 Ready to start TLS\r\n"
        );
        let tls = tls_connect(self.into_inner(), "mail.example.test", &[])
            .await
            .unwrap();
        Client::new(tls)
    }
}

/// How an attacker's bytes are cut into writes.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    OneWrite,
    ByteByByte,
    /// The first line alone, then the rest.
    AtCrlf,
}

/// Connects, reads the greeting, EHLO, STARTTLS, handshake, EHLO again.
pub async fn starttls_client(
    addr: SocketAddr,
) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut plain = connect(addr).await;
    assert!(plain.reply().await.starts_with("220 "));
    assert!(
        plain
            .cmd("EHLO client.example")
            .await
            .contains("250 STARTTLS\r\n")
    );
    let mut client = plain.starttls().await;
    assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
    client
}

/// `python3 tests/clients/smtp_client.py ARGS`, parsed.
pub fn smtp_client(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/smtp_client.py");
    let mut all = vec![script];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_program("python3", &all);
    assert_eq!(code, 0, "smtp_client.py {args:?} failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
