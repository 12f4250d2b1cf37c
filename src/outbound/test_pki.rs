//! Test certificates for the outbound modules' unit tests, made with rcgen: CAs,
//! intermediates, leaves (current or expired since 2000) and self-signed ones.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate and its key (PKCS#8 DER).
pub struct Leaf {
    pub cert: CertificateDer<'static>,
    pub key: Vec<u8>,
}

impl Leaf {
    /// The key, as rustls takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// A certificate authority that signs leaves (and intermediates).
pub struct TestCa {
    pub cert: CertificateDer<'static>,
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A self-signed root named `name`.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let params = authority(name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA named `name`, signed by this one.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let params = authority(name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TestCa {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `name`, signed by this CA; `expired`: valid only in 1999.
    pub fn leaf(&self, name: &str, expired: bool) -> Leaf {
        make_leaf(name, expired, Some(&self.issuer))
    }

    /// Trust anchors holding this CA alone.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }
}

/// A self-signed leaf for `name`; `expired`: valid only in 1999.
pub fn self_signed(name: &str, expired: bool) -> Leaf {
    make_leaf(name, expired, None)
}

fn authority(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params
}

fn make_leaf(name: &str, expired: bool, issuer: Option<&Issuer<'static, KeyPair>>) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(1999, 1, 1);
        params.not_after = rcgen::date_time_ymd(2000, 1, 1);
    }
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer),
        None => params.self_signed(&key),
    };
    Leaf {
        cert: cert.unwrap().der().clone(),
        key: key.serialize_der(),
    }
}
