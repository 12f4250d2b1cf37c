//! Shared pieces of the integration tests: test certificates, a scripted SMTP upstream
//! that records every byte it receives, the proxy started in-process on port 0, and a
//! small SMTP client over plain TCP or TLS.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mailmoat::config::Config;
use mailmoat::inbound::listener::Server;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The harness of the canonical rule against a real legacy server.
pub mod canonical_e2e;
/// A real Exim 4.96 upstream (`scripts/exim.sh`).
pub mod exim;
/// Real GNU Mailutils 3.15 imap4d and pop3d upstreams.
pub mod mailutils;
/// A recording forwarder for the upstream leg.
pub mod recorder;

/// Every await in a test is bounded by this: a hung test fails instead of hanging CI.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("step timed out")
}

/// A test CA and two server certificates signed by it.
pub struct TestCerts {
    _dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
    /// mail.example.test, the default (first) certificate.
    pub default: (PathBuf, PathBuf, CertificateDer<'static>),
    /// other.example.test, chosen by SNI.
    pub other: (PathBuf, PathBuf, CertificateDer<'static>),
}

/// A private key file as it should be, readable by its owner only (`mailmoat check` warns
/// about any other).
pub fn write_private_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn certs() -> &'static TestCerts {
    static CERTS: OnceLock<TestCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailmoat test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let cert_path = dir.path().join(format!("{name}.pem"));
            let key_path = dir.path().join(format!("{name}.key"));
            std::fs::write(&cert_path, cert.pem()).unwrap();
            write_private_key(&key_path, &key.serialize_pem());
            (cert_path, key_path, cert.der().clone())
        };
        let default = leaf("mail.example.test");
        let other = leaf("other.example.test");
        TestCerts {
            ca_pem,
            ca_der: ca_cert.der().clone(),
            default,
            other,
            _dir: dir,
        }
    })
}

/// What the scripted upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// A modern ESMTP server with PIPELINING, CHUNKING, AUTH and its own STARTTLS.
    Esmtp,
    /// Accepts and never says anything.
    Silent,
    /// Answers EHLO with 502, like a HELO-only legacy server.
    HeloOnly,
}

/// Everything the scripted upstream received.
#[derive(Debug, Default)]
pub struct Recording {
    /// Every byte, every connection, in order.
    pub raw: Vec<u8>,
    /// Command lines, without CRLF.
    pub commands: Vec<String>,
    /// Complete messages (DATA bodies without the final dot line, BDAT chunks joined).
    pub messages: Vec<Vec<u8>>,
    /// Connections accepted.
    pub connections: usize,
    /// Connections that ended while a DATA body was incomplete.
    pub aborted_bodies: usize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub recording: Arc<Mutex<Recording>>,
}

impl Upstream {
    pub fn commands(&self) -> Vec<String> {
        self.recording.lock().unwrap().commands.clone()
    }
    pub fn raw(&self) -> Vec<u8> {
        self.recording.lock().unwrap().raw.clone()
    }
}

pub async fn scripted_upstream(behaviour: Behaviour) -> Upstream {
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

/// The scripted upstream on a unix socket at `path`.
pub async fn scripted_unix_upstream(path: &std::path::Path) -> Arc<Mutex<Recording>> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let recording = Arc::new(Mutex::new(Recording::default()));
    let shared = Arc::clone(&recording);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.lock().unwrap().connections += 1;
            tokio::spawn(serve_scripted(
                stream,
                Behaviour::Esmtp,
                Arc::clone(&shared),
            ));
        }
    });
    recording
}

async fn serve_scripted<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    behaviour: Behaviour,
    rec: Arc<Mutex<Recording>>,
) {
    if behaviour == Behaviour::Silent {
        let mut stream = stream;
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        return;
    }
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let _ = write.write_all(b"220 scripted.upstream ESMTP\r\n").await;
    let mut line = Vec::new();
    let mut chunks = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        {
            let mut r = rec.lock().unwrap();
            r.raw.extend_from_slice(&line);
            r.commands.push(text.clone());
        }
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: Vec<u8> = match verb.as_str() {
            "EHLO" if behaviour == Behaviour::HeloOnly => {
                b"502 5.5.2 Error: command not recognized\r\n".to_vec()
            }
            "EHLO" => {
                b"250-scripted.upstream\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n\
250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-XCLIENT ADDR NAME\r\n250 8BITMIME\r\n"
                    .to_vec()
            }
            "HELO" => b"250 scripted.upstream\r\n".to_vec(),
            "AUTH" => b"235 2.7.0 Authentication successful\r\n".to_vec(),
            "QUIT" => {
                let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            "DATA" => {
                let _ = write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await;
                let mut body = Vec::new();
                loop {
                    line.clear();
                    match read.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => {
                            rec.lock().unwrap().aborted_bodies += 1;
                            return;
                        }
                        Ok(_) => {}
                    }
                    rec.lock().unwrap().raw.extend_from_slice(&line);
                    if line == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(&line);
                }
                rec.lock().unwrap().messages.push(body);
                b"250 2.0.0 Ok: queued\r\n".to_vec()
            }
            "BDAT" => {
                let mut words = text.split_whitespace().skip(1);
                let size: usize = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                let mut chunk = vec![0; size];
                if read.read_exact(&mut chunk).await.is_err() {
                    rec.lock().unwrap().aborted_bodies += 1;
                    return;
                }
                rec.lock().unwrap().raw.extend_from_slice(&chunk);
                chunks.extend_from_slice(&chunk);
                if last {
                    rec.lock()
                        .unwrap()
                        .messages
                        .push(std::mem::take(&mut chunks));
                }
                format!("250 2.0.0 {size} octets received\r\n").into_bytes()
            }
            _ => b"250 2.0.0 Ok\r\n".to_vec(),
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The proxy, running in-process with its listeners on 127.0.0.1:0.
pub struct Proxy {
    pub addrs: HashMap<String, SocketAddr>,
    _stop: watch::Sender<bool>,
}

impl Proxy {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }
}

/// Starts the proxy with these `listeners:` entries (YAML flow maps, one per line) and
/// any extra top-level YAML.
pub async fn proxy(listeners: &[String], extra: &str) -> Proxy {
    capture_logs();
    let certs = certs();
    let mut yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\n    - {{ cert: {}, key: {} }}\nlisteners:\n",
        certs.default.0.display(),
        certs.default.1.display(),
        certs.other.0.display(),
        certs.other.1.display()
    );
    for listener in listeners {
        yaml.push_str(&format!("  - {listener}\n"));
    }
    yaml.push_str(extra);
    let config = Config::from_yaml(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let server = Server::bind(&config).await.unwrap();
    let addrs = server.local_addrs().into_iter().collect();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(server.run(stopped));
    Proxy { addrs, _stop: stop }
}

/// A `listeners:` entry for an SMTP listener on a free loopback port.
pub fn smtp_listener(name: &str, tls: &str, policy: &str, upstream: SocketAddr) -> String {
    format!(
        "{{ name: {name}, protocol: smtp, listen: \"127.0.0.1:0\", tls: {tls}, policy: {policy}, upstream: \"{upstream}\" }}"
    )
}

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

/// A line-oriented SMTP client over any stream.
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
            let mut line = String::new();
            let n = within(self.stream.read_line(&mut line)).await.unwrap();
            assert!(n > 0, "connection closed; reply so far: {reply:?}");
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
}

/// Waits (bounded) until the in-process proxy has logged, for the session of the client
/// at `client`, a line containing `needle`; returns it. `client` must be unique to the
/// session: connect with [`traceable_connect`] or [`traceable_tcp`].
pub async fn session_log_line(client: SocketAddr, needle: &str) -> String {
    let tag = format!("client={client}");
    within(async {
        loop {
            let found = captured_logs()
                .lines()
                .find(|line| line.contains(&tag) && line.contains(needle))
                .map(str::to_owned);
            match found {
                Some(line) => break line,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
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
    assert_eq!(
        plain.cmd("STARTTLS").await,
        "220 2.0.0 Ready to start TLS\r\n"
    );
    let tls = tls_connect(plain.into_inner(), "mail.example.test", &[])
        .await
        .unwrap();
    let mut client = Client::new(tls);
    assert!(client.cmd("EHLO client.example").await.starts_with("250-"));
    client
}

// ---- the real legacy servers and the real binary ----

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Longer than `scripts/legacy.sh` ever takes on its own: it waits 30 s for the banners
/// and at most 25 s for the daemons to stop.
pub const LEGACY_SCRIPT_LIMIT: Duration = Duration::from_secs(120);

/// `bash scripts/legacy.sh ACTION DIR`.
pub fn legacy_command(action: &str, dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/legacy.sh"))
        .arg(action)
        .arg(dir);
    command
}

/// `legacy.sh start DIR` on `[smtp, imap, pop3]` ports, with extra settings, watched by
/// this process: the instance ends when the test binary does.
pub fn legacy_start(
    dir: &Path,
    [smtp, imap, pop3]: [u16; 3],
    postfix_extra: &str,
    master_extra: &str,
    dovecot_extra: &str,
) -> Ran {
    run_bounded(
        legacy_command("start", dir)
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("LEGACY_SMTP_PORT", smtp.to_string())
            .env("LEGACY_IMAP_PORT", imap.to_string())
            .env("LEGACY_POP3_PORT", pop3.to_string())
            .env("LEGACY_POSTFIX_EXTRA", postfix_extra)
            .env("LEGACY_POSTFIX_MASTER_EXTRA", master_extra)
            .env("LEGACY_DOVECOT_EXTRA", dovecot_extra),
        LEGACY_SCRIPT_LIMIT,
    )
}

/// The real Postfix and Dovecot started by `scripts/legacy.sh`, one instance per test
/// binary, stopped by the script's watcher when this process exits.
pub struct Legacy {
    _dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    pub postfix_log: PathBuf,
    pub dovecot_log: PathBuf,
    pub maildir_alice: PathBuf,
}

pub fn legacy() -> &'static Legacy {
    static LEGACY: OnceLock<Legacy> = OnceLock::new();
    LEGACY.get_or_init(|| Legacy::start("", ""))
}

/// An instance made by [`Legacy::start`] (not the shared one, which lives as long as the
/// test binary) is stopped when dropped, before its directory goes.
impl Drop for Legacy {
    fn drop(&mut self) {
        let stopped = run_within(
            &mut legacy_command("stop", self._dir.path()),
            LEGACY_SCRIPT_LIMIT,
        );
        if let Err(timed_out) = stopped {
            eprintln!("{timed_out}");
        }
    }
}

impl Legacy {
    /// A private instance with `postfix_extra` (`name = value` lines) set in main.cf and
    /// `dovecot_extra` appended to dovecot.conf (e.g. an open-relay `mynetworks`, PROXY
    /// protocol, XCLIENT).
    pub fn start(postfix_extra: &str, dovecot_extra: &str) -> Legacy {
        Legacy::start_with(postfix_extra, "", dovecot_extra)
    }

    /// As [`Legacy::start`], with `master_extra` appended to Postfix's master.cf (another
    /// smtpd service on its own port, say).
    pub fn start_with(postfix_extra: &str, master_extra: &str, dovecot_extra: &str) -> Legacy {
        let dir = tempfile::Builder::new()
            .prefix("mailmoat-legacy-")
            .tempdir()
            .unwrap();
        let (smtp, imap, pop3) = (free_port(), free_port(), free_port());
        let started = legacy_start(
            dir.path(),
            [smtp, imap, pop3],
            postfix_extra,
            master_extra,
            dovecot_extra,
        );
        // A missing Postfix or Dovecot is a failure, never a skip: these tests are the
        // proof that real clients and real legacy servers work through the proxy.
        assert_eq!(
            started.code,
            Some(0),
            "scripts/legacy.sh start failed (install the legacy servers with \
             scripts/install-deps.sh):\n{}",
            started.both()
        );
        let env = std::fs::read_to_string(dir.path().join("legacy.env")).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from legacy.env"))
                .trim_matches('"')
                .to_owned()
        };
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Legacy {
            smtp: addr(smtp),
            imap: addr(imap),
            pop3: addr(pop3),
            postfix_log: var("LEGACY_POSTFIX_LOG").into(),
            dovecot_log: var("LEGACY_DOVECOT_LOG").into(),
            maildir_alice: var("LEGACY_MAILDIR_ALICE").into(),
            _dir: dir,
        }
    }
}

impl Legacy {
    /// The instance's directory: `postfix/main.cf`, `log/`, the queue and the sockets.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Waits (bounded) for a delivered message in alice's Maildir containing `tag`.
    pub fn wait_for_delivery(&self, tag: &str) -> Vec<u8> {
        self.wait_for_deliveries(tag, 1).pop().unwrap()
    }

    /// Waits (bounded) for `count` messages containing `tag`.
    pub fn wait_for_deliveries(&self, tag: &str, count: usize) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut found = Vec::new();
            for sub in ["new", "cur"] {
                let Ok(entries) = std::fs::read_dir(self.maildir_alice.join(sub)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(bytes) = std::fs::read(entry.path()) else {
                        continue;
                    };
                    if memchr::memmem::find(&bytes, tag.as_bytes()).is_some() {
                        found.push(bytes);
                    }
                }
            }
            if found.len() >= count {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {count} messages tagged {tag} delivered",
                found.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        let mut all = std::fs::read_to_string(&self.postfix_log).unwrap_or_default();
        all.push_str(&std::fs::read_to_string(&self.dovecot_log).unwrap_or_default());
        all
    }
}

/// The real `mailmoat` binary, logging at trace level to a file, killed on drop.
pub struct Mailmoat {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub log: PathBuf,
    pub config: PathBuf,
    pub ports: HashMap<String, u16>,
}

impl Mailmoat {
    /// Starts the binary with `(name, protocol, tls, policy, upstream)` listeners on free
    /// ports, and waits until every port accepts.
    pub fn start(listeners: &[(&str, &str, &str, &str, SocketAddr)]) -> Mailmoat {
        Self::start_with(listeners, "")
    }

    /// As `start`, with extra top-level YAML (`limits: ...`).
    pub fn start_with(listeners: &[(&str, &str, &str, &str, SocketAddr)], extra: &str) -> Mailmoat {
        Self::start_with_env(listeners, extra, &[])
    }

    /// As `start_with`, with extra environment variables for the process.
    ///
    /// A port `free_port` found free may be taken before mailmoat binds it (another test's
    /// connection can get it as its local port): a start that fails with "Address already
    /// in use" is tried again on new ports, twice at most.
    pub fn start_with_env(
        listeners: &[(&str, &str, &str, &str, SocketAddr)],
        extra: &str,
        env: &[(&str, &str)],
    ) -> Mailmoat {
        for attempt in 1..=3 {
            match Self::try_start(listeners, extra, env) {
                Ok(mailmoat) => return mailmoat,
                Err(failure) if attempt < 3 && failure.contains("Address already in use") => {}
                Err(failure) => panic!("{failure}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn try_start(
        listeners: &[(&str, &str, &str, &str, SocketAddr)],
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Mailmoat, String> {
        let certs = certs();
        let dir = tempfile::tempdir().unwrap();
        let mut ports = HashMap::new();
        let mut yaml = format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlog: {{ level: trace }}\nlisteners:\n",
            certs.default.0.display(),
            certs.default.1.display()
        );
        for (name, protocol, tls, policy, upstream) in listeners {
            let port = free_port();
            ports.insert(name.to_string(), port);
            yaml.push_str(&format!(
                "  - {{ name: {name}, protocol: {protocol}, listen: \"127.0.0.1:{port}\", tls: {tls}, policy: {policy}, upstream: \"{upstream}\" }}\n"
            ));
        }
        yaml.push_str(extra);
        let config = dir.path().join("mailmoat.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("mailmoat.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["run", "-c"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut mailmoat = Mailmoat {
            child,
            _dir: dir,
            log,
            config,
            ports,
        };
        let ports: Vec<u16> = mailmoat.ports.values().copied().collect();
        for port in ports {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                let exited = mailmoat.child.try_wait().ok().flatten();
                if exited.is_some() || std::time::Instant::now() >= deadline {
                    return Err(format!(
                        "mailmoat did not listen on {port} (exit: {exited:?}); its config:\n{}\nits log:\n{}",
                        std::fs::read_to_string(&mailmoat.config).unwrap_or_default(),
                        std::fs::read_to_string(&mailmoat.log).unwrap_or_default()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(mailmoat)
    }

    pub fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits (bounded) until the log holds `count` lines containing `needle`; returns the
    /// last of them.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= count {
                return lines[count - 1].to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} (x{count}) in the log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mailmoat did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Mailmoat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a program to completion (bounded), returning (exit code, stdout, stderr).
pub fn run_program(program: &str, args: &[&str]) -> (i32, String, String) {
    let ran = run_bounded(
        std::process::Command::new(program).args(args),
        Duration::from_secs(180),
    );
    (ran.code.unwrap_or(-1), ran.stdout, ran.stderr)
}

/// Waits for `child` to exit, for at most `limit`; past it the child is killed and the
/// test fails.
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a program run by [`run_bounded`] left behind.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to completion within `limit`, its stdin empty. Output goes through
/// files, never pipes: a daemon the program leaves behind holding its stdout cannot
/// make the wait endless, and a chatty program cannot block on a full pipe. On timeout
/// the test fails naming what the program's process group was doing, and the group is
/// killed.
pub fn run_bounded(command: &mut std::process::Command, limit: Duration) -> Ran {
    run_within(command, limit).unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// [`run_bounded`], with the timeout as an error (for `Drop`, which must not panic).
pub fn run_within(command: &mut std::process::Command, limit: Duration) -> Result<Ran, String> {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let program = format!("{command:?}");
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} could not start ({e}): run scripts/install-deps.sh as root")
        });
    let read = |path: &std::path::Path| {
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    };
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let group = process_group(child.id());
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            // The program itself, should kill(1) be missing or fail.
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{program} ran longer than {limit:?}; its processes were:\n{group}\
                 stdout:\n{}\nstderr:\n{}",
                read(&out),
                read(&err)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Ran {
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
    })
}

/// A live process, as /proc shows it.
pub struct Process {
    pub pid: u32,
    /// The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...
    stat: Vec<String>,
    dir: PathBuf,
}

impl Process {
    /// `R`, `S`, `D`, `T`, `Z`...
    pub fn state(&self) -> &str {
        &self.stat[0]
    }

    pub fn group(&self) -> Option<u32> {
        self.stat.get(2)?.parse().ok()
    }

    /// The arguments, joined by spaces (empty for a zombie).
    pub fn cmdline(&self) -> String {
        std::fs::read(self.dir.join("cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether it was started with `variable` (`NAME=value`) in its environment.
    pub fn started_with(&self, variable: &str) -> bool {
        std::fs::read(self.dir.join("environ"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|entry| entry == variable.as_bytes())
    }

    /// A /proc/PID file such as `comm` or `wchan`, trimmed (empty if unreadable).
    pub fn read(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.trim().to_owned()
    }
}

/// Every process on the machine, zombies included.
pub fn processes() -> Vec<Process> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": the fields after the last ')'.
        let stat: Vec<String> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if !stat.is_empty() {
            found.push(Process { pid, stat, dir });
        }
    }
    found
}

/// Every process of process group `group`, one per line: pid, state, what it waits in
/// and its command line.
fn process_group(group: u32) -> String {
    let mut lines = String::new();
    for process in processes() {
        if process.group() == Some(group) {
            lines.push_str(&format!(
                "  {} {} {} {}\n",
                process.pid,
                process.state(),
                process.read("wchan"),
                process.cmdline()
            ));
        }
    }
    lines
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

/// A tag unique to this test run, for finding our messages and log lines.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}-{n}", std::process::id())
}

// ---- log capture: every line the in-process proxy logs, at trace level ----

/// Everything logged by the in-process proxy of this test binary, at trace level.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a trace-level subscriber that keeps every log line in memory.
pub fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// Every log line the in-process proxy wrote so far.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Fails if any of `secrets` appears in any log line captured so far.
pub fn assert_no_secret_logged(secrets: &[&str]) {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        !logs.is_empty(),
        "no log line was captured: is capture_logs() called?"
    );
    let text = String::from_utf8_lossy(&logs);
    for secret in secrets {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect();
        assert!(
            lines.is_empty(),
            "{secret:?} appears in log lines: {lines:#?}"
        );
    }
}

/// Writes `DIR/mailmoat.yaml` with the default test certificate, these `listeners:`
/// entries and `extra` top-level YAML; returns its path.
pub fn config_file(dir: &std::path::Path, listeners: &[String], extra: &str) -> PathBuf {
    let certs = certs();
    let mut yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n",
        certs.default.0.display(),
        certs.default.1.display()
    );
    for listener in listeners {
        yaml.push_str(&format!("  - {listener}\n"));
    }
    yaml.push_str(extra);
    let path = dir.join("mailmoat.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A `listeners:` entry on a free loopback port.
pub fn listener(name: &str, protocol: &str, tls: &str, policy: &str, upstream: &str) -> String {
    format!(
        "{{ name: {name}, protocol: {protocol}, listen: \"127.0.0.1:0\", tls: {tls}, \
         policy: {policy}, upstream: \"{upstream}\" }}"
    )
}
