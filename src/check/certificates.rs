//! Certificate checks for `mailmoat check`: every chain loads, its key matches the leaf,
//! every certificate of the chain is valid now and for a while, the chain is in order,
//! and the leaf names the host names clients will ask for. Every problem is reported,
//! not just the first.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::{Finding, Severity};
use crate::config::{Positions, TlsConfig};

/// A certificate that expires within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

const SECONDS_PER_DAY: i64 = 24 * 60 * 60;

/// Checks every configured certificate and key; `positions` gives their lines.
pub fn check(
    tls: &TlsConfig,
    provider: &CryptoProvider,
    now: SystemTime,
    positions: &Positions,
) -> Vec<Finding> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut findings = Vec::new();
    for (index, pair) in tls.certificates.iter().enumerate() {
        let subject = format!("tls.certificates[{index}]");
        let line = positions.line(&subject);
        let mut push = |severity, message: String| {
            findings.push(Finding {
                severity,
                line,
                subject: subject.clone(),
                message,
                detail: Vec::new(),
            })
        };
        for (severity, message) in check_pair(&pair.cert, &pair.key, provider, now) {
            push(severity, message);
        }
    }
    findings
}

/// The findings for one chain and key, in the order an administrator fixes them.
fn check_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
    now: i64,
) -> Vec<(Severity, String)> {
    let mut out = Vec::new();
    let chain = match read_chain(cert_path) {
        Ok(chain) => chain,
        Err(message) => {
            out.push((Severity::Error, message));
            return out;
        }
    };
    // The key is checked even when the chain is expired: both are reported.
    match PrivateKeyDer::from_pem_file(key_path) {
        Err(err) => out.push((
            Severity::Error,
            format!("{}: cannot load the private key: {err}", key_path.display()),
        )),
        Ok(key) => match provider.key_provider.load_private_key(key) {
            Err(err) => out.push((
                Severity::Error,
                format!("{}: unusable private key: {err}", key_path.display()),
            )),
            Ok(signing_key) => {
                if let Err(err) = CertifiedKey::new(chain.clone(), signing_key).keys_match() {
                    out.push((
                        Severity::Error,
                        format!(
                            "{}: the key does not match the certificate in {} ({err})",
                            key_path.display(),
                            cert_path.display()
                        ),
                    ));
                }
            }
        },
    }
    let mut parsed = Vec::new();
    for (position, der) in chain.iter().enumerate() {
        match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => parsed.push(cert),
            Err(err) => {
                out.push((
                    Severity::Error,
                    format!(
                        "{}: certificate {} of the chain does not parse: {err}",
                        cert_path.display(),
                        position + 1
                    ),
                ));
                return out;
            }
        }
    }
    for (position, cert) in parsed.iter().enumerate() {
        let which = if position == 0 {
            "the certificate".to_owned()
        } else {
            format!("chain certificate {} ({})", position + 1, cert.subject())
        };
        out.extend(validity(cert, &which, cert_path, now));
    }
    // RFC 8446 §4.4.2: each certificate should certify the one before it.
    for (position, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            out.push((
                Severity::Warning,
                format!(
                    "{}: chain certificate {} ({}) did not issue the one before it (issuer {}); \
                     clients may fail to build the chain",
                    cert_path.display(),
                    position + 2,
                    pair[1].subject(),
                    pair[0].issuer()
                ),
            ));
        }
    }
    if let Some(leaf) = parsed.first() {
        let names = leaf_names(leaf);
        if names.is_empty() {
            // webpki, and most clients, ignore the subject CN (RFC 6125 §6.4.4).
            out.push((
                Severity::Warning,
                format!(
                    "{}: the certificate has no subjectAltName DNS names or addresses; \
                     clients will not accept it for any host name",
                    cert_path.display()
                ),
            ));
        }
        let ok = out.iter().all(|(severity, _)| *severity != Severity::Error);
        if ok {
            let days = (leaf.validity().not_after.timestamp() - now) / SECONDS_PER_DAY;
            out.push((
                Severity::Ok,
                format!(
                    "{}: covers {}; valid until {} ({days} days)",
                    cert_path.display(),
                    if names.is_empty() {
                        "no names".into()
                    } else {
                        names.join(", ")
                    },
                    leaf.validity().not_after
                ),
            ));
        }
    }
    out
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|err| {
            format!(
                "{}: cannot load the certificate chain: {err}",
                path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(chain)
}

/// Expired or not yet valid is an error, expiring within 30 days a warning.
fn validity(
    cert: &X509Certificate<'_>,
    which: &str,
    path: &Path,
    now: i64,
) -> Option<(Severity, String)> {
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if now < not_before {
        Some((
            Severity::Error,
            format!(
                "{}: {which} is not valid yet: valid from {}",
                path.display(),
                validity.not_before
            ),
        ))
    } else if now > not_after {
        Some((
            Severity::Error,
            format!(
                "{}: {which} expired on {}",
                path.display(),
                validity.not_after
            ),
        ))
    } else if not_after - now < EXPIRY_WARNING_DAYS * SECONDS_PER_DAY {
        Some((
            Severity::Warning,
            format!(
                "{}: {which} expires in {} days, on {}",
                path.display(),
                (not_after - now) / SECONDS_PER_DAY,
                validity.not_after
            ),
        ))
    } else {
        None
    }
}

/// The DNS names and IP addresses of the subjectAltName extension.
fn leaf_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
