//! A buffered, bounded line reader and writer over any stream, plus the TLS client.
//!
//! Everything the peer sends is input: nothing here panics on it. Every read and write
//! is bounded by the step timeout, every line by [`MAX_LINE_LEN`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest reply line accepted from the peer (a literal's bytes are not a line).
pub const MAX_LINE_LEN: usize = 64 * 1024;
/// Bytes asked of the stream per read (a TLS record's worth).
const READ_CHUNK: usize = 16 * 1024;

/// A stream the generator can speak over: plain TCP or TLS on TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Line-oriented connection with its own read buffer.
pub struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    start: usize,
    step: Duration,
}

impl<S: Io> Conn<S> {
    /// Wraps a stream; `step` bounds each read and write.
    pub fn new(io: S, step: Duration) -> Self {
        Conn {
            io,
            buf: Vec::new(),
            start: 0,
            step,
        }
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Gives back the read buffer's memory (a session about to sit idle for long).
    pub fn shrink(&mut self) {
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.shrink_to_fit();
    }

    /// The stream, once nothing is left in the buffer (STARTTLS: anything the peer
    /// sent after its go-ahead would be an injection).
    pub fn into_inner(self) -> Result<S> {
        if self.buffered() != 0 {
            bail!(
                "{} unexpected bytes after the STARTTLS go-ahead",
                self.buffered()
            );
        }
        Ok(self.io)
    }

    async fn fill(&mut self) -> Result<()> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > READ_CHUNK {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let read = tokio::time::timeout(self.step, self.io.read(&mut self.buf[old..])).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                self.buf.truncate(old);
                return Err(anyhow!(e).context("read"));
            }
            Err(_) => {
                self.buf.truncate(old);
                bail!("no data from the peer within {:?}", self.step);
            }
        };
        self.buf.truncate(old + n);
        if n == 0 {
            bail!("connection closed by the peer");
        }
        Ok(())
    }

    /// The next line, without its CRLF (a bare LF is accepted, as from any peer).
    pub async fn line(&mut self) -> Result<Vec<u8>> {
        let mut scanned = 0;
        loop {
            let pending = &self.buf[self.start..];
            if let Some(i) = memchr::memchr(b'\n', &pending[scanned..]) {
                let end = scanned + i;
                let mut line = pending[..end].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.start += end + 1;
                return Ok(line);
            }
            scanned = pending.len();
            if scanned > MAX_LINE_LEN {
                bail!("reply line longer than {MAX_LINE_LEN} bytes");
            }
            self.fill().await?;
        }
    }

    /// Exactly `n` bytes (an IMAP literal), discarded; returns how many were read.
    pub async fn skip_exact(&mut self, n: u64) -> Result<u64> {
        let mut left = n;
        while left > 0 {
            if self.buffered() == 0 {
                self.fill().await?;
            }
            let take = (self.buffered() as u64).min(left) as usize;
            self.start += take;
            left -= take as u64;
        }
        Ok(n)
    }

    /// Writes all of `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let io = &mut self.io;
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        match tokio::time::timeout(self.step, write).await {
            Ok(result) => result.context("write"),
            Err(_) => bail!("write not accepted within {:?}", self.step),
        }
    }

    /// Sends close_notify (TLS) or FIN, bounded; errors do not matter any more.
    pub async fn shutdown(mut self) {
        let _ = tokio::time::timeout(self.step, self.io.shutdown()).await;
    }
}

/// Connects over TCP with TCP_NODELAY, bounded by `step`.
pub async fn tcp(addr: std::net::SocketAddr, step: Duration) -> Result<TcpStream> {
    let stream = match tokio::time::timeout(step, TcpStream::connect(addr)).await {
        Ok(result) => result.with_context(|| format!("connect {addr}"))?,
        Err(_) => bail!("connect {addr}: no answer within {step:?}"),
    };
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(stream)
}

/// What the TLS client trusts and offers.
#[derive(Clone)]
pub struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

/// Key exchange groups the client offers (the server picks among them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kx {
    /// X25519 only: what most mail clients negotiate today.
    X25519,
    /// NIST P-256 only.
    Secp256r1,
    /// The hybrid post-quantum group X25519MLKEM768 only.
    X25519mlkem768,
}

impl Tls {
    /// A client for `sni`, trusting the PEM certificates in `ca` or, with `ca` absent,
    /// any certificate ([`AcceptAnyCertificate`]). `resume` keeps a session cache so
    /// later sessions present tickets; without it every handshake is a full one.
    pub fn new(ca: Option<&std::path::Path>, sni: &str, kx: Kx, resume: bool) -> Result<Tls> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        use rustls::crypto::aws_lc_rs::kx_group;
        provider.kx_groups = vec![match kx {
            Kx::X25519 => kx_group::X25519,
            Kx::Secp256r1 => kx_group::SECP256R1,
            Kx::X25519mlkem768 => kx_group::X25519MLKEM768,
        }];
        let algorithms = provider.signature_verification_algorithms;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?;
        let mut config = match ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("read {}", path.display()))?
                {
                    let cert = cert.with_context(|| format!("parse {}", path.display()))?;
                    roots.add(cert).context("add CA certificate")?;
                }
                if roots.is_empty() {
                    bail!("no certificate in {}", path.display());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { algorithms }))
                .with_no_client_auth(),
        };
        config.resumption = if resume {
            rustls::client::Resumption::in_memory_sessions(1024)
        } else {
            rustls::client::Resumption::disabled()
        };
        let name = ServerName::try_from(sni.to_owned()).context("--sni")?;
        Ok(Tls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The client handshake on `stream`, bounded by `step`.
    pub async fn handshake<S: Io>(
        &self,
        stream: S,
        step: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<S>> {
        match tokio::time::timeout(step, self.connector.connect(self.name.clone(), stream)).await {
            Ok(result) => result.context("TLS handshake"),
            Err(_) => bail!("TLS handshake not finished within {step:?}"),
        }
    }
}

/// The negotiated protocol version and cipher suite, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384`.
pub fn suite<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Option<String> {
    let connection = tls.get_ref().1;
    let version = connection.protocol_version()?;
    let suite = connection.negotiated_cipher_suite()?;
    Some(format!("{version:?} {:?}", suite.suite()))
}

/// Whether the handshake of `tls` resumed an earlier session.
pub fn resumed<S>(tls: &tokio_rustls::client::TlsStream<S>) -> bool {
    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// `--insecure`: accepts any certificate chain for any name, for benchmarks against
/// throw-away certificates only. The handshake signature is still checked, so the
/// client does the same work as a verifying one apart from the chain.
#[derive(Debug)]
pub struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
