//! TLS for clients: rustls with the aws-lc-rs provider, certificates from PEM files,
//! chosen by SNI (the first serves clients without SNI), strict ALPN (ALPACA).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{Protocol, TlsConfig, TlsVersion};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the key or the configuration.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider, aws-lc-rs, with its default suites: AEAD and forward-secret only,
/// hybrid post-quantum key exchange (X25519MLKEM768) preferred where the client offers it.
///
/// The suites are reordered so that SHA-256 ones come first (the server's order wins,
/// see [`server_config`]): CPUs have SHA-256 instructions but none for SHA-384, which
/// cost 7% of a whole STARTTLS session's CPU in `scripts/bench.sh`. AES-128-GCM is
/// mandatory for every TLS 1.3 client (RFC 8446 §9.1).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            && suite.suite() != rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            && suite.suite() != rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    });
    Arc::new(provider)
}

/// Picks the certificate whose names match the client's SNI, else the first one.
#[derive(Debug)]
pub struct SniResolver {
    certificates: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Loads every certificate chain and key pair of the `tls` section.
    pub fn load(tls: &TlsConfig, provider: &CryptoProvider) -> Result<Self, Error> {
        let certificates = tls
            .certificates
            .iter()
            .map(|pair| load_certified_key(&pair.cert, &pair.key, provider).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if certificates.is_empty() {
            return Err(Error::Pem {
                path: PathBuf::new(),
                reason: "no certificate configured".into(),
            });
        }
        Ok(SniResolver { certificates })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name).ok())
            .and_then(|name| {
                self.certificates.iter().find(|key| {
                    key.end_entity_cert().is_ok_and(|der| {
                        webpki::EndEntityCert::try_from(der)
                            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
                    })
                })
            });
        // Many MTAs send no SNI (ARCHITECTURE.md §6): they get the first certificate.
        Some(Arc::clone(by_name.unwrap_or(&self.certificates[0])))
    }
}

fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let pem_error = |path: &Path, reason: String| Error::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|err| pem_error(cert_path, err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(cert_path, err.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(cert_path, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|err| pem_error(key_path, err.to_string()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| pem_error(key_path, err.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|err| {
        pem_error(
            key_path,
            format!("does not match {}: {err}", cert_path.display()),
        )
    })?;
    Ok(certified)
}

/// The server configuration for one protocol's listeners.
pub fn server_config(
    tls: &TlsConfig,
    protocol: Protocol,
    resolver: Arc<SniResolver>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, Error> {
    let versions: &[&SupportedProtocolVersion] = match tls.min_tls_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // ALPACA: rustls answers a client whose ALPN list lacks this id with a fatal
    // no_application_protocol alert (RFC 7301 §3.2); a client without ALPN is served.
    config.alpn_protocols = vec![protocol.alpn_id().to_vec()];
    // The provider's order: SHA-256 suites first (see `provider`).
    config.ignore_client_order = true;
    // Stateless resumption; 0-RTT stays off (max_early_data_size = 0, the default). One
    // ticket per handshake: a mail client resumes one connection at a time, and each
    // ticket costs an encryption and a record.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}
