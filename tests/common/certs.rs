//! The test certificates: a CA of this test binary's own and two server certificates it
//! signed, written to a temporary directory once per binary.

use std::path::PathBuf;
use std::sync::OnceLock;

use rustls_pki_types::CertificateDer;

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
