//! The TLS client for one connection to an MX host, for the [`Requirement`] its plan gave
//! it (ARCHITECTURE.md §11), and what the handshake established, for the delivery event
//! and TLS-RPT.
//!
//! Every requirement gets TLS 1.3 or 1.2, no ALPN (SMTP has none), no resumption (each
//! connection's certificate is checked, and its result recorded), and handshake
//! signatures checked with the provider's algorithms. What differs is the certificate
//! check and the SNI:
//! - `Dane`: [`dane::DaneVerifier`], the TLSA records (RFC 7672 §3); SNI the TLSA base
//!   domain (§8.1).
//! - `Pkix`: rustls's WebPKI verifier for the MX host name against the trust anchors
//!   (RFC 8461 §4.2). With `enforce: false` (MTA-STS `testing`) a failure is recorded and
//!   the handshake goes on (§5).
//! - `Encrypt`, `Opportunistic`, `DaneUnauthenticated` (RFC 7672 §2.2): any certificate,
//!   and what PKIX would have said is recorded; SNI the MX host name (the TLSA base
//!   domain for `DaneUnauthenticated`).
//!
//! The [`Verdict`] is the certificate check's record, read after the handshake whether it
//! failed ([`Verdict::failure`], with RFC 8460 §4.3's result type) or not
//! ([`TlsReport::read`]).
//!
//! The trust anchors are Debian's system bundle plus an optional extra CA file
//! ([`trust_anchors`]); DANE does not use them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, ServerName, UnixTime};

use super::dane::{self, DaneVerifier};
use super::plan::Requirement;

/// Debian's bundle of the system's trusted CAs (the `ca-certificates` package).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CA file could not be read, or holds no usable certificate.
    #[error("{path}: {reason}")]
    TrustAnchors { path: PathBuf, reason: String },
    /// No trust anchor at all, where PKIX is to be enforced.
    #[error("no trust anchors for the PKIX check")]
    NoTrustAnchors,
    /// The MX host name cannot be a TLS server name.
    #[error("{0:?} is not a DNS name")]
    HostName(String),
    /// rustls refused the configuration.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The DANE client could not be set up.
    #[error("{0}")]
    Dane(#[from] dane::Error),
}

/// The trust anchors for PKIX checks: every CA certificate in `system_bundle` (normally
/// [`SYSTEM_CA_BUNDLE`]) and in `extra_ca` (PEM). A file that cannot be read, or holds no
/// usable certificate, is an error, and so is no file at all.
pub fn trust_anchors(
    system_bundle: Option<&Path>,
    extra_ca: Option<&Path>,
) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for path in [system_bundle, extra_ca].into_iter().flatten() {
        let problem = |reason: String| Error::TrustAnchors {
            path: path.to_owned(),
            reason,
        };
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|err| problem(err.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| problem(err.to_string()))?;
        let (added, _unparsable) = roots.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(problem("no usable CA certificate".into()));
        }
    }
    if roots.is_empty() {
        return Err(Error::NoTrustAnchors);
    }
    Ok(roots)
}

/// A client for one connection: the configuration, the name to connect to (rustls sends
/// it as SNI), and the verdict its certificate check will leave.
#[derive(Debug, Clone)]
pub struct Client {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub verdict: Verdict,
}

/// The client for one connection to the MX host `mx_host` under `requirement`. Make one
/// per connection: its [`Verdict`] is that connection's.
pub fn client_config(
    requirement: &Requirement,
    mx_host: &str,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Client, Error> {
    let (host, enforce) = match requirement {
        Requirement::Dane { tlsa, names } => {
            let verifier = DaneVerifier::new(tlsa.clone(), names.clone(), &provider);
            return Ok(Client {
                server_name: verifier.server_name(),
                config: dane::client_config(Arc::clone(&verifier), provider)?,
                verdict: Verdict(Check::Dane(verifier)),
            });
        }
        Requirement::DaneUnauthenticated { names } => (names.tlsa_base_domain().clone(), false),
        Requirement::Pkix { host, enforce } => (host.clone(), *enforce),
        Requirement::Encrypt | Requirement::Opportunistic => (
            DnsName::try_from(mx_host.to_owned())
                .map_err(|_| Error::HostName(mx_host.to_owned()))?,
            false,
        ),
    };
    let webpki = if roots.is_empty() {
        if enforce {
            return Err(Error::NoTrustAnchors);
        }
        None
    } else {
        let built = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|err| rustls::Error::General(err.to_string()))?;
        Some(built)
    };
    let verifier = Arc::new(PkixVerifier {
        webpki,
        enforce,
        algorithms: provider.signature_verification_algorithms,
        result: Mutex::new(None),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = true;
    Ok(Client {
        config: Arc::new(config),
        server_name: ServerName::DnsName(host),
        verdict: Verdict(Check::Pkix(verifier)),
    })
}

/// What one connection's certificate check found, readable once the handshake has got
/// past it (or failed on it).
#[derive(Debug, Clone)]
pub struct Verdict(Check);

#[derive(Debug, Clone)]
enum Check {
    Dane(Arc<DaneVerifier>),
    Pkix(Arc<PkixVerifier>),
}

/// A certificate check that failed: enforced (the handshake failed) or only recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// RFC 8460 §4.3's result type: `tlsa-invalid`, `certificate-host-mismatch`...
    pub result_type: &'static str,
    /// Log-safe.
    pub detail: String,
}

impl Verdict {
    /// Whether the certificate check has run.
    pub fn checked(&self) -> bool {
        match &self.0 {
            Check::Dane(verifier) => verifier.outcome().is_some(),
            Check::Pkix(verifier) => verifier.result().is_some(),
        }
    }

    /// Whether the server was authenticated: a usable TLSA record matched, or its
    /// certificate is PKIX-valid for the name (under any requirement but DANE's).
    pub fn verified(&self) -> bool {
        match &self.0 {
            Check::Dane(verifier) => {
                matches!(
                    verifier.outcome(),
                    Some(Ok(dane::Outcome::Authenticated(_)))
                )
            }
            Check::Pkix(verifier) => matches!(verifier.result(), Some(Ok(()))),
        }
    }

    /// The check's failure, if it ran and failed. Under `Encrypt`, `Opportunistic`,
    /// `DaneUnauthenticated` and MTA-STS `testing` it is what PKIX would have said, the
    /// handshake having gone on.
    pub fn failure(&self) -> Option<CheckFailure> {
        match &self.0 {
            Check::Dane(verifier) => match verifier.outcome()? {
                Ok(_) => None,
                Err(failure) => Some(CheckFailure {
                    result_type: failure.rfc8460_result_type(),
                    detail: failure.to_string(),
                }),
            },
            Check::Pkix(verifier) => match verifier.result()? {
                Ok(()) => None,
                Err(err) => Some(CheckFailure {
                    result_type: pkix_result_type(&err),
                    detail: err.to_string(),
                }),
            },
        }
    }
}

/// RFC 8460 §4.3.1's result type of a PKIX failure.
fn pkix_result_type(err: &rustls::Error) -> &'static str {
    let rustls::Error::InvalidCertificate(err) = err else {
        return "validation-failure";
    };
    match err {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "certificate-host-mismatch"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate-expired"
        }
        CertificateError::UnknownIssuer
        | CertificateError::BadSignature
        | CertificateError::Revoked
        | CertificateError::InvalidPurpose
        | CertificateError::InvalidPurposeContext { .. }
        | CertificateError::UnhandledCriticalExtension => "certificate-not-trusted",
        _ => "validation-failure",
    }
}

/// The TLS a connection got, for the delivery event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsReport {
    pub version: rustls::ProtocolVersion,
    pub cipher: rustls::CipherSuite,
    /// [`Verdict::verified`].
    pub verified: bool,
    /// [`Verdict::failure`]'s result type: a recorded failure, the handshake having gone
    /// on.
    pub failure_result_type: Option<&'static str>,
}

impl TlsReport {
    /// Reads a connection (a `ClientConnection` derefs to it) once its handshake is done;
    /// `None` before.
    pub fn read(connection: &CommonState, verdict: &Verdict) -> Option<TlsReport> {
        if connection.is_handshaking() {
            return None;
        }
        Some(TlsReport {
            version: connection.protocol_version()?,
            cipher: connection.negotiated_cipher_suite()?.suite(),
            verified: verdict.verified(),
            failure_result_type: verdict.failure().map(|failure| failure.result_type),
        })
    }
}

/// The PKIX check, enforced or only recorded; the handshake signatures are always
/// checked, so that the server holds the key of the certificate it sent.
#[derive(Debug)]
struct PkixVerifier {
    /// `None` without trust anchors (never when enforced): every certificate is then
    /// untrusted.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    enforce: bool,
    algorithms: WebPkiSupportedAlgorithms,
    result: Mutex<Option<Result<(), rustls::Error>>>,
}

impl PkixVerifier {
    fn result(&self) -> Option<Result<(), rustls::Error>> {
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for PkixVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = match &self.webpki {
            Some(webpki) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ()),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        };
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result.clone());
        match result {
            Err(err) if self.enforce => Err(err),
            _ => Ok(ServerCertVerified::assertion()),
        }
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

#[cfg(test)]
mod tests;
