//! Each requirement's client in real rustls handshakes in memory, against a test PKI made
//! with rcgen: what it enforces, what it only records, the SNI it sends, and the trust
//! anchors read from PEM files.

use std::io::Write;
use std::sync::OnceLock;

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::outbound::dane::{ReferenceNames, Tlsa, TlsaSet};
use crate::outbound::test_pki::{self, Leaf, TestCa};

const MX: &str = "mx.example.test";

struct Pki {
    ca: CertificateDer<'static>,
    ca_pem: String,
    /// `mx.example.test`, signed by the CA.
    mx: Leaf,
    /// `mx.example.test`, signed by the CA, expired since 2000.
    expired: Leaf,
    /// `mx.example.test`, self-signed.
    self_signed: Leaf,
    /// `other.example.test`, signed by the CA.
    other: Leaf,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = TestCa::new("mailmoat mx_tls test CA");
        Pki {
            mx: ca.leaf(MX, false),
            expired: ca.leaf(MX, true),
            self_signed: test_pki::self_signed(MX, false),
            other: ca.leaf("other.example.test", false),
            ca_pem: ca.pem,
            ca: ca.cert,
        }
    })
}

fn roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(pki().ca.clone()).unwrap();
    Arc::new(roots)
}

fn dns_name(name: &str) -> DnsName<'static> {
    DnsName::try_from(name.to_owned()).unwrap()
}

fn pkix(enforce: bool) -> Requirement {
    Requirement::Pkix {
        host: dns_name(MX),
        enforce,
    }
}

/// What a handshake gave: the client's report (or error), its verdict, and the SNI the
/// server saw.
struct Handshake {
    result: std::io::Result<TlsReport>,
    verdict: Verdict,
    sni: Option<String>,
}

/// A handshake in memory: a server sending `leaf` (and the CA above it) and signing with
/// `key`, and the client for `requirement`.
async fn handshake(
    requirement: &Requirement,
    leaf: &Leaf,
    key: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
    roots: Arc<RootCertStore>,
) -> Handshake {
    let provider = crate::tls::provider();
    let chain = vec![leaf.cert.clone(), pki().ca.clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let certified = rustls::sign::CertifiedKey::new(
        chain,
        provider.key_provider.load_private_key(key).unwrap(),
    );
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    let client = client_config(requirement, MX, roots, provider).unwrap();
    let (near, far) = tokio::io::duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(near);
    let connect = tokio_rustls::TlsConnector::from(client.config).connect(client.server_name, far);
    let (accepted, connected) = tokio::join!(accept, connect);
    let sni = accepted
        .ok()
        .and_then(|stream| stream.get_ref().1.server_name().map(str::to_owned));
    let verdict = client.verdict;
    let result = connected.map(|stream| TlsReport::read(stream.get_ref().1, &verdict).unwrap());
    Handshake {
        result,
        verdict,
        sni,
    }
}

/// Serves one certificate and key, whether or not they belong together.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

#[tokio::test]
async fn pkix_with_a_valid_certificate_is_verified() {
    let p = pki();
    for versions in [TLS13, TLS12] {
        let done = handshake(&pkix(true), &p.mx, &p.mx.key, versions, roots()).await;
        let report = done.result.unwrap();
        assert!(report.verified);
        assert_eq!(report.failure_result_type, None);
        assert_eq!(report.version, versions[0].version);
        assert_eq!(done.sni.as_deref(), Some(MX));
        assert!(done.verdict.checked());
    }
}

#[tokio::test]
async fn enforced_pkix_fails_the_handshake_and_says_why() {
    let p = pki();
    for (leaf, result_type) in [
        (&p.other, "certificate-host-mismatch"),
        (&p.expired, "certificate-expired"),
        (&p.self_signed, "certificate-not-trusted"),
    ] {
        let done = handshake(&pkix(true), leaf, &leaf.key, TLS13, roots()).await;
        assert!(done.result.is_err(), "{result_type}");
        assert!(!done.verdict.verified());
        let failure = done.verdict.failure().unwrap();
        assert_eq!(failure.result_type, result_type, "{failure:?}");
        assert!(!failure.detail.is_empty());
    }
}

#[tokio::test]
async fn mta_sts_testing_records_the_failure_and_goes_on() {
    let p = pki();
    let done = handshake(&pkix(false), &p.other, &p.other.key, TLS13, roots()).await;
    let report = done.result.unwrap();
    assert!(!report.verified);
    assert_eq!(
        report.failure_result_type,
        Some("certificate-host-mismatch")
    );
}

#[tokio::test]
async fn encrypt_and_opportunistic_take_any_certificate_and_record_pkix() {
    let p = pki();
    for requirement in [Requirement::Encrypt, Requirement::Opportunistic] {
        let done = handshake(
            &requirement,
            &p.self_signed,
            &p.self_signed.key,
            TLS12,
            roots(),
        )
        .await;
        let report = done.result.unwrap();
        assert!(!report.verified);
        assert_eq!(report.failure_result_type, Some("certificate-not-trusted"));
        assert_eq!(report.version, rustls::ProtocolVersion::TLSv1_2);
        assert_eq!(done.sni.as_deref(), Some(MX), "SNI is the MX host name");

        // A good certificate is still noticed.
        let done = handshake(&requirement, &p.mx, &p.mx.key, TLS13, roots()).await;
        let report = done.result.unwrap();
        assert!(report.verified);
        assert_eq!(report.failure_result_type, None);
    }
    // Without trust anchors nothing is trusted, and nothing fails for it.
    let empty = Arc::new(RootCertStore::empty());
    let done = handshake(&Requirement::Encrypt, &p.mx, &p.mx.key, TLS13, empty).await;
    let report = done.result.unwrap();
    assert!(!report.verified);
    assert_eq!(report.failure_result_type, Some("certificate-not-trusted"));
}

#[tokio::test]
async fn any_certificate_still_needs_its_key() {
    // The server sends the MX certificate but signs with another key.
    let p = pki();
    for requirement in [Requirement::Opportunistic, pkix(false), pkix(true)] {
        let done = handshake(&requirement, &p.mx, &p.other.key, TLS13, roots()).await;
        assert!(done.result.is_err(), "{requirement:?}");
    }
}

#[tokio::test]
async fn dane_requirements_use_the_tlsa_records_and_send_the_base_domain() {
    let p = pki();
    let (_, parsed) = x509_parser::parse_x509_certificate(&p.self_signed.cert).unwrap();
    let spki = parsed.tbs_certificate.subject_pki.raw;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
    let names = ReferenceNames::cname_expanded(dns_name("alias.example.test"), dns_name(MX));
    let dane = |usage| Requirement::Dane {
        tlsa: TlsaSet::new([Tlsa {
            usage,
            selector: 1,
            matching_type: 1,
            data: digest.as_ref().to_vec(),
        }]),
        names: names.clone(),
    };
    let done = handshake(&dane(3), &p.self_signed, &p.self_signed.key, TLS13, roots()).await;
    let report = done.result.unwrap();
    assert!(report.verified);
    assert_eq!(report.failure_result_type, None);
    assert_eq!(done.sni.as_deref(), Some(MX), "the TLSA base domain");

    // A record for another key: the handshake fails with the DANE failure.
    let done = handshake(&dane(3), &p.mx, &p.mx.key, TLS13, roots()).await;
    assert!(done.result.is_err());
    let failure = done.verdict.failure().unwrap();
    assert_eq!(failure.result_type, "tlsa-invalid");

    // No usable record: any certificate, PKIX recorded.
    let unauthenticated = Requirement::DaneUnauthenticated { names };
    let done = handshake(&unauthenticated, &p.mx, &p.mx.key, TLS13, roots()).await;
    let report = done.result.unwrap();
    assert!(report.verified, "PKIX-valid for the base domain");
    assert_eq!(done.sni.as_deref(), Some(MX));
}

#[test]
fn before_the_handshake_nothing_is_checked() {
    let client = client_config(&pkix(true), MX, roots(), crate::tls::provider()).unwrap();
    assert!(!client.verdict.checked());
    assert!(!client.verdict.verified());
    assert_eq!(client.verdict.failure(), None);
    assert!(client.config.alpn_protocols.is_empty());
    let connection = rustls::ClientConnection::new(client.config, client.server_name).unwrap();
    assert_eq!(TlsReport::read(&connection, &client.verdict), None);
}

#[test]
fn clients_that_cannot_be_made() {
    let provider = crate::tls::provider;
    let empty = Arc::new(RootCertStore::empty());
    assert!(matches!(
        client_config(&pkix(true), MX, empty, provider()),
        Err(Error::NoTrustAnchors)
    ));
    assert!(matches!(
        client_config(&Requirement::Encrypt, "not a host", roots(), provider()),
        Err(Error::HostName(_))
    ));
}

#[test]
fn trust_anchors_come_from_pem_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&ca, &pki().ca_pem).unwrap();
    let mut file = std::fs::File::create(&bundle).unwrap();
    // A bundle whose certificates are not all parsable keeps the others.
    write!(
        file,
        "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{}",
        pki().ca_pem,
        pki().ca_pem
    )
    .unwrap();
    let roots = trust_anchors(Some(&bundle), Some(&ca)).unwrap();
    assert!(!roots.is_empty());
    assert!(trust_anchors(None, Some(&ca)).is_ok());

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    for path in [empty, dir.path().join("missing.pem")] {
        let err = trust_anchors(Some(&bundle), Some(&path)).unwrap_err();
        assert!(
            matches!(&err, Error::TrustAnchors { path: p, .. } if *p == path),
            "{err}"
        );
    }
    assert!(matches!(
        trust_anchors(None, None),
        Err(Error::NoTrustAnchors)
    ));
}

#[test]
fn pkix_failures_map_to_rfc8460_result_types() {
    use CertificateError::*;
    for (err, result_type) in [
        (NotValidForName, "certificate-host-mismatch"),
        (Expired, "certificate-expired"),
        (UnknownIssuer, "certificate-not-trusted"),
        (Revoked, "certificate-not-trusted"),
        (BadEncoding, "validation-failure"),
        (NotValidYet, "validation-failure"),
    ] {
        assert_eq!(
            pkix_result_type(&rustls::Error::InvalidCertificate(err)),
            result_type
        );
    }
    assert_eq!(
        pkix_result_type(&rustls::Error::NoCertificatesPresented),
        "validation-failure"
    );
}
