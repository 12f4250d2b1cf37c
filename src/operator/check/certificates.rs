//! Certificate checks for `mailmoat check`: every chain loads, its key matches the leaf,
//! every certificate of the chain is valid now and for a while, the chain is in order,
//! the leaf names the host names clients will ask for, and no one but mailmoat can read
//! the private key. Every problem is reported, not just the first.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
        if let Some(exposure) = key_exposure(&pair.key) {
            findings.push(Finding {
                severity: Severity::Warning,
                line: positions.line(&format!("{subject}.key")),
                subject,
                message: format!("{}: {exposure}", pair.key.display()),
                detail: Vec::new(),
            });
        }
    }
    findings
}

/// A private key that others than mailmoat can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExposure {
    /// The file's permission bits.
    pub mode: u32,
    /// Who can read it: `others`, `group ssl-cert`, or both.
    pub readers: String,
}

impl fmt::Display for KeyExposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the private key is readable by {} (mode {:04o}); {KEY_ADVICE}",
            self.readers, self.mode
        )
    }
}

/// The fix, as config/mailmoat.service installs keys.
pub const KEY_ADVICE: &str =
    "chmod 600 it, or chmod 640 with owner root and group mailmoat (chown root:mailmoat)";

/// Who besides mailmoat can read the private key at `path`, if anyone: others, or a group
/// that is neither the one mailmoat runs as nor `mailmoat` (the unit's `Group=`; `check`
/// usually runs as root). A reader must also reach the file: a key readable by all in a
/// directory only root may enter (certbot's `archive/`) is private.
pub fn key_exposure(path: &Path) -> Option<KeyExposure> {
    let path = std::fs::canonicalize(path).ok()?;
    let file = std::fs::metadata(&path).ok()?;
    let dirs: Vec<(u32, u32)> = path
        .ancestors()
        .skip(1)
        .filter_map(|dir| std::fs::metadata(dir).ok())
        .map(|dir| (dir.permissions().mode(), dir.gid()))
        .collect();
    let mut own_groups = Vec::new();
    own_groups.extend(effective_gid());
    own_groups.extend(group_id("mailmoat"));
    let readers = readers(file.permissions().mode(), file.gid(), &dirs, &own_groups)?;
    let group = || group_name(file.gid()).unwrap_or_else(|| file.gid().to_string());
    Some(KeyExposure {
        mode: file.permissions().mode() & 0o7777,
        readers: match readers {
            Readers::Group => format!("group {}", group()),
            Readers::Others => "others".to_owned(),
            Readers::GroupAndOthers => format!("group {} and others", group()),
        },
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readers {
    Group,
    Others,
    GroupAndOthers,
}

/// Who, besides the owner and `own_groups`, can read a file of `mode` and group `gid`
/// whose directories, from the nearest up, have these modes and groups.
fn readers(mode: u32, gid: u32, dirs: &[(u32, u32)], own_groups: &[u32]) -> Option<Readers> {
    let others = mode & 0o004 != 0 && dirs.iter().all(|(dir, _)| dir & 0o001 != 0);
    let group = mode & 0o040 != 0
        && !own_groups.contains(&gid)
        && dirs.iter().all(|&(dir, dir_gid)| {
            let bit = if dir_gid == gid { 0o010 } else { 0o001 };
            dir & bit != 0
        });
    match (group, others) {
        (true, true) => Some(Readers::GroupAndOthers),
        (true, false) => Some(Readers::Group),
        (false, true) => Some(Readers::Others),
        (false, false) => None,
    }
}

/// The group this process runs as (`Gid:` real, effective, ...).
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Gid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// /etc/group's entries: (name, gid).
fn groups() -> Vec<(String, u32)> {
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            Some((name.to_owned(), gid))
        })
        .collect()
}

fn group_id(name: &str) -> Option<u32> {
    groups()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, gid)| gid)
}

fn group_name(gid: u32) -> Option<String> {
    groups()
        .into_iter()
        .find(|(_, g)| *g == gid)
        .map(|(n, _)| n)
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
pub(crate) fn leaf_names(cert: &X509Certificate<'_>) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_besides_mailmoat_can_read_a_key() {
        // From the nearest directory up: a private one, then /etc-like and /.
        let open_dirs = [(0o40755, 0), (0o40755, 0)];
        let mailmoat = 997;
        let cases = [
            (0o100600, 0, &open_dirs[..], None),
            (0o100640, mailmoat, &open_dirs[..], None),
            (0o100640, 0, &open_dirs[..], None),
            (0o100644, mailmoat, &open_dirs[..], Some(Readers::Others)),
            (0o100640, 111, &open_dirs[..], Some(Readers::Group)),
            (0o100644, 111, &open_dirs[..], Some(Readers::GroupAndOthers)),
            (0o100604, 0, &open_dirs[..], Some(Readers::Others)),
            // certbot's archive/: nobody but root enters.
            (0o100644, 0, &[(0o40700, 0), (0o40755, 0)][..], None),
            // A directory only its group enters: the group reads, others cannot reach.
            (
                0o100644,
                111,
                &[(0o40750, 111), (0o40755, 0)][..],
                Some(Readers::Group),
            ),
            (0o100644, 111, &[(0o40750, 222), (0o40755, 0)][..], None),
        ];
        for (mode, gid, dirs, expected) in cases {
            assert_eq!(
                readers(mode, gid, dirs, &[0, mailmoat]),
                expected,
                "{mode:o} {gid} {dirs:?}"
            );
        }
        let exposure = KeyExposure {
            mode: 0o644,
            readers: "others".into(),
        };
        assert_eq!(
            exposure.to_string(),
            "the private key is readable by others (mode 0644); chmod 600 it, or chmod 640 \
             with owner root and group mailmoat (chown root:mailmoat)"
        );
    }
}
