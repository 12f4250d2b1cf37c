//! Fetching a policy: `GET https://mta-sts.<domain>/.well-known/mta-sts.txt` (RFC 8461
//! §3.3), with every check the RFC asks for and the bounds it suggests.
//!
//! - The policy host's certificate is checked by PKIX against the caller's roots (the
//!   system store or a configured CA file) for the name `mta-sts.<domain>`, sent as SNI
//!   (§3.3): rustls and webpki do the checking. Revocation is not checked (a MAY).
//! - Only `200` is a policy; any `3xx` is refused, never followed (§3.3).
//! - The media type must be `text/plain`; parameters such as `charset` are ignored
//!   (§3.3).
//! - The body is capped at 64 KiB while it streams: the fetch stops reading at the first
//!   byte past the cap, and at once when `Content-Length` announces more (§3.3 suggests
//!   the cap and a time limit).
//! - One time limit covers connect, handshake, request and the whole body.
//! - The addresses to connect to are the caller's: it resolves `mta-sts.<domain>`
//!   through mailmoat's own resolver, and the tests through none.
//!
//! No HTTP cache exists to be used (§3.3 forbids one); the caller caches policies by id
//! (`cache`, `store`). Each failure is its own [`Error`] variant, and
//! [`Error::result_type`] names the RFC 8460 failure type it reports as.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::name::PolicyDomain;
use super::policy::{self, MAX_POLICY_LEN, Policy};

/// The policy's path on the policy host (§3.2).
pub const WELL_KNOWN_PATH: &str = "/.well-known/mta-sts.txt";

/// The time limit §3.3 suggests for a fetch.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Most characters of a foreign `Content-Type` kept for the error.
const MAX_REPORTED_CONTENT_TYPE: usize = 64;

/// Why no policy was fetched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS client could not be configured.
    #[error("cannot configure tls for policy fetches: {0}")]
    Config(#[source] rustls::Error),
    /// `mta-sts.<domain>` is not usable as a TLS server name or Host header.
    #[error("{0} cannot be a tls server name")]
    HostName(String),
    /// The caller gave no address.
    #[error("no address to connect to")]
    NoAddress,
    /// No address accepted a connection; the last one's error.
    #[error("cannot connect to the policy host: {0}")]
    Connect(#[source] io::Error),
    /// The certificate is not valid for `mta-sts.<domain>` under the caller's roots
    /// (RFC 8460 `sts-webpki-invalid`).
    #[error("the policy host's certificate is not valid: {0}")]
    Certificate(#[source] rustls::Error),
    /// The TLS handshake failed otherwise.
    #[error("tls handshake with the policy host failed: {0}")]
    Tls(#[source] io::Error),
    /// The HTTP exchange failed (a malformed response, the connection closed).
    #[error("http exchange with the policy host failed: {0}")]
    Http(#[source] hyper::Error),
    /// A redirect, which must not be followed (§3.3).
    #[error("the policy host redirects ({status}), which must not be followed")]
    Redirect {
        /// The status code.
        status: u16,
    },
    /// A status other than 200 (§3.3).
    #[error("the policy host answered {status}, not 200")]
    Status {
        /// The status code.
        status: u16,
    },
    /// The media type is not `text/plain` (§3.3).
    #[error("the policy's content type is {found:?}, not text/plain")]
    ContentType {
        /// The `Content-Type` sent, shortened; `None` if there was none (or not text).
        found: Option<String>,
    },
    /// The body is larger than [`MAX_POLICY_LEN`]; reading stopped there.
    #[error("the policy is larger than {MAX_POLICY_LEN} bytes")]
    TooLarge,
    /// The time limit ran out.
    #[error("no complete policy within {limit:?}")]
    TimedOut {
        /// The limit.
        limit: Duration,
    },
    /// The body is not a valid policy.
    #[error("invalid policy: {0}")]
    Policy(#[from] policy::Error),
}

impl Error {
    /// The RFC 8460 §4.3.2.2 result type this failure reports as.
    pub fn result_type(&self) -> &'static str {
        match self {
            Error::Certificate(_) => "sts-webpki-invalid",
            Error::ContentType { .. } | Error::TooLarge | Error::Policy(_) => "sts-policy-invalid",
            Error::Config(_)
            | Error::HostName(_)
            | Error::NoAddress
            | Error::Connect(_)
            | Error::Tls(_)
            | Error::Http(_)
            | Error::Redirect { .. }
            | Error::Status { .. }
            | Error::TimedOut { .. } => "sts-policy-fetch-error",
        }
    }
}

/// Fetches policies over one TLS client configuration.
#[derive(Clone)]
pub struct Fetcher {
    connector: TlsConnector,
    time_limit: Duration,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("time_limit", &self.time_limit)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher that trusts `roots` and gives each fetch `time_limit` in all.
    pub fn new(roots: RootCertStore, time_limit: Duration) -> Result<Fetcher, Error> {
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(Error::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Fetcher {
            connector: TlsConnector::from(Arc::new(config)),
            time_limit,
        })
    }

    /// Fetches and parses `domain`'s policy from the policy host at `addrs`, tried in
    /// order.
    pub async fn fetch(
        &self,
        domain: &PolicyDomain,
        addrs: &[SocketAddr],
    ) -> Result<Policy, Error> {
        let body = self.fetch_body(domain, addrs).await?;
        Ok(Policy::parse(&body)?)
    }

    /// The policy body, with every check but the policy's own grammar.
    pub async fn fetch_body(
        &self,
        domain: &PolicyDomain,
        addrs: &[SocketAddr],
    ) -> Result<Vec<u8>, Error> {
        tokio::time::timeout(self.time_limit, self.exchange(domain, addrs))
            .await
            .unwrap_or(Err(Error::TimedOut {
                limit: self.time_limit,
            }))
    }

    async fn exchange(
        &self,
        domain: &PolicyDomain,
        addrs: &[SocketAddr],
    ) -> Result<Vec<u8>, Error> {
        let host = domain.policy_host();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| Error::HostName(host.clone()))?;
        let host_header =
            HeaderValue::from_str(&host).map_err(|_| Error::HostName(host.clone()))?;

        let tcp = connect(addrs).await?;
        let tls = self
            .connector
            .connect(server_name, tcp)
            .await
            .map_err(handshake_error)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(Error::Http)?;

        let mut request = Request::new(Empty::<Bytes>::new());
        *request.uri_mut() = hyper::Uri::from_static(WELL_KNOWN_PATH);
        request.headers_mut().insert(HOST, host_header);
        let exchange = async move {
            let response = sender.send_request(request).await.map_err(Error::Http)?;
            check_head(&response)?;
            read_capped(response.into_body()).await
        };
        // The connection runs beside the exchange, in this task, so that it ends with
        // the fetch (on success, error or time-out) and nothing outlives it.
        tokio::pin!(exchange, connection);
        tokio::select! {
            result = &mut exchange => result,
            closed = &mut connection => {
                closed.map_err(Error::Http)?;
                exchange.await
            }
        }
    }
}

/// Connects to the first address that accepts.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, Error> {
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // A request is one write; waiting for more only delays it.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.map_or(Error::NoAddress, Error::Connect))
}

/// A certificate rejected by the verifier is `sts-webpki-invalid`; anything else that
/// fails the handshake is a fetch error.
fn handshake_error(err: io::Error) -> Error {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(
            rejected @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented),
        ) => Error::Certificate(rejected.clone()),
        _ => Error::Tls(err),
    }
}

/// Status and media type (§3.3), and a `Content-Length` over the cap.
fn check_head<B>(response: &hyper::Response<B>) -> Result<(), Error> {
    let status = response.status();
    if status.is_redirection() {
        return Err(Error::Redirect {
            status: status.as_u16(),
        });
    }
    if status != StatusCode::OK {
        return Err(Error::Status {
            status: status.as_u16(),
        });
    }
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let media_type = content_type.and_then(|value| value.split(';').next());
    if !media_type.is_some_and(|t| t.trim().eq_ignore_ascii_case("text/plain")) {
        return Err(Error::ContentType {
            found: content_type
                .map(|value| value.chars().take(MAX_REPORTED_CONTENT_TYPE).collect()),
        });
    }
    let announced = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|len| len > MAX_POLICY_LEN as u64) {
        return Err(Error::TooLarge);
    }
    Ok(())
}

/// The body, refused as soon as it passes [`MAX_POLICY_LEN`].
async fn read_capped(mut body: hyper::body::Incoming) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Error::Http)?;
        if let Ok(data) = frame.into_data() {
            if data.len() > MAX_POLICY_LEN - out.len() {
                return Err(Error::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
