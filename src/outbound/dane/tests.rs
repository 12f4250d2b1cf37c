//! The DANE check against a test PKI made with rcgen: a table of TLSA records and chains
//! (RFC 7672 §3), RDATA parsing, proptests that no record or certificate bytes panic, and
//! real rustls handshakes in memory through [`DaneVerifier`].

use std::sync::OnceLock;

use proptest::collection::vec;
use proptest::prelude::*;
use rustls::SupportedProtocolVersion;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::outbound::test_pki::{self, Leaf, TestCa};

const MX: &str = "mx.example.test";

/// A CA, an intermediate it signed, and leaves.
struct Pki {
    ca: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    /// `mx.example.test`, signed by the intermediate.
    mx: Leaf,
    /// `other.example.test`, signed by the intermediate.
    other: Leaf,
    /// `mx.example.test`, signed by the intermediate, expired since 2000.
    expired: Leaf,
    /// `stray.example.test`, self-signed, expired since 2000.
    self_signed: Leaf,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = TestCa::new("mailmoat DANE test CA");
        let intermediate = ca.intermediate("mailmoat DANE test intermediate");
        Pki {
            mx: intermediate.leaf(MX, false),
            other: intermediate.leaf("other.example.test", false),
            expired: intermediate.leaf(MX, true),
            self_signed: test_pki::self_signed("stray.example.test", true),
            ca: ca.cert,
            intermediate: intermediate.cert,
        }
    })
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, bytes).as_ref().to_vec()
}

fn sha512(bytes: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA512, bytes).as_ref().to_vec()
}

/// The SubjectPublicKeyInfo as x509-parser reads it: a second parser, so the tests do not
/// merely repeat the module's webpki reading.
fn spki(cert: &CertificateDer<'_>) -> Vec<u8> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
    parsed.tbs_certificate.subject_pki.raw.to_vec()
}

fn tlsa(usage: u8, selector: u8, matching_type: u8, data: Vec<u8>) -> Tlsa {
    Tlsa {
        usage,
        selector,
        matching_type,
        data,
    }
}

fn dns_name(name: &str) -> DnsName<'static> {
    DnsName::try_from(name).unwrap().to_owned()
}

fn mx_names() -> ReferenceNames {
    ReferenceNames::mx_host(dns_name(MX))
}

fn algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    crate::tls::provider().signature_verification_algorithms.all
}

fn check(
    records: &[Tlsa],
    chain: &[&CertificateDer<'static>],
    names: &ReferenceNames,
) -> Result<Outcome, Failure> {
    let chain: Vec<CertificateDer<'static>> = chain.iter().map(|&cert| cert.clone()).collect();
    TlsaSet::new(records.to_vec()).verify(&chain, names, UnixTime::now(), algorithms())
}

/// A result reduced to what the table states: the record that matched (usage, selector,
/// matching type, depth), `None` for unauthenticated, or the RFC 8460 result type.
type Summary = Result<Option<(u8, u8, u8, Option<usize>)>, &'static str>;

fn summary(result: Result<Outcome, Failure>) -> Summary {
    match result {
        Ok(Outcome::Authenticated(m)) => Ok(Some((
            m.usage.code(),
            m.selector.code(),
            m.matching_type.code(),
            m.depth,
        ))),
        Ok(Outcome::Unauthenticated) => Ok(None),
        Err(failure) => Err(failure.rfc8460_result_type()),
    }
}

#[test]
fn records_against_chains() {
    let p = pki();
    let (mx, other, expired) = (&p.mx.cert, &p.other.cert, &p.expired.cert);
    let (intermediate, ca, stray) = (&p.intermediate, &p.ca, &p.self_signed.cert);
    let full = [mx, intermediate, ca];
    let wrong_sha256 = sha256(b"nothing sent");
    let wrong_sha512 = sha512(b"nothing sent");
    let unusable = || {
        vec![
            tlsa(0, 0, 1, sha256(mx)),
            tlsa(1, 1, 1, sha256(&spki(mx))),
            tlsa(4, 1, 1, sha256(&spki(mx))),
            tlsa(3, 5, 1, sha256(&spki(mx))),
            tlsa(3, 1, 7, sha256(&spki(mx))),
            tlsa(3, 1, 1, sha256(&spki(mx))[..31].to_vec()),
            tlsa(3, 1, 2, sha256(&spki(mx))),
            tlsa(3, 0, 0, Vec::new()),
        ]
    };
    let cases: Vec<(&str, Vec<Tlsa>, Vec<&CertificateDer<'static>>, Summary)> = vec![
        // DANE-EE(3): the leaf alone.
        (
            "3 1 1: the leaf's key, SHA2-256",
            vec![tlsa(3, 1, 1, sha256(&spki(mx)))],
            full.to_vec(),
            Ok(Some((3, 1, 1, Some(0)))),
        ),
        (
            "3 0 1: the leaf certificate, SHA2-256",
            vec![tlsa(3, 0, 1, sha256(mx))],
            full.to_vec(),
            Ok(Some((3, 0, 1, Some(0)))),
        ),
        (
            "3 1 2: the leaf's key, SHA2-512",
            vec![tlsa(3, 1, 2, sha512(&spki(mx)))],
            full.to_vec(),
            Ok(Some((3, 1, 2, Some(0)))),
        ),
        (
            "3 0 0: the leaf certificate itself",
            vec![tlsa(3, 0, 0, mx.to_vec())],
            vec![mx],
            Ok(Some((3, 0, 0, Some(0)))),
        ),
        (
            "3 1 0: the leaf's key itself",
            vec![tlsa(3, 1, 0, spki(mx))],
            vec![mx],
            Ok(Some((3, 1, 0, Some(0)))),
        ),
        (
            "3 1 1 on an expired self-signed leaf for another name: no name, expiry or chain check",
            vec![tlsa(3, 1, 1, sha256(&spki(stray)))],
            vec![stray],
            Ok(Some((3, 1, 1, Some(0)))),
        ),
        (
            "3 1 1 of another leaf's key",
            vec![tlsa(3, 1, 1, sha256(&spki(other)))],
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        (
            "3 0 1 on the intermediate: DANE-EE looks at the leaf only",
            vec![tlsa(3, 0, 1, sha256(intermediate))],
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        // DANE-TA(2): a chain to the named anchor, and the name.
        (
            "2 0 1 on the CA, chain and name right",
            vec![tlsa(2, 0, 1, sha256(ca))],
            full.to_vec(),
            Ok(Some((2, 0, 1, Some(2)))),
        ),
        (
            "2 0 1 on the CA, leaf for another name",
            vec![tlsa(2, 0, 1, sha256(ca))],
            vec![other, intermediate, ca],
            Err("certificate-host-mismatch"),
        ),
        (
            "2 0 1 on the CA, leaf expired",
            vec![tlsa(2, 0, 1, sha256(ca))],
            vec![expired, intermediate, ca],
            Err("certificate-expired"),
        ),
        (
            "2 0 1 on the intermediate",
            vec![tlsa(2, 0, 1, sha256(intermediate))],
            vec![mx, intermediate],
            Ok(Some((2, 0, 1, Some(1)))),
        ),
        (
            "2 1 1 on the intermediate's key",
            vec![tlsa(2, 1, 1, sha256(&spki(intermediate)))],
            vec![mx, intermediate],
            Ok(Some((2, 1, 1, Some(1)))),
        ),
        (
            "2 1 2 on the CA's key",
            vec![tlsa(2, 1, 2, sha512(&spki(ca)))],
            full.to_vec(),
            Ok(Some((2, 1, 2, Some(2)))),
        ),
        (
            "servers send chains in any order",
            vec![tlsa(2, 0, 1, sha256(ca))],
            vec![mx, ca, intermediate],
            Ok(Some((2, 0, 1, Some(1)))),
        ),
        (
            "2 0 1 on a certificate nobody sent",
            vec![tlsa(2, 0, 1, wrong_sha256.clone())],
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        (
            "2 0 1 on the CA, not sent: a digest cannot name it",
            vec![tlsa(2, 0, 1, sha256(ca))],
            vec![mx, intermediate],
            Err("tlsa-invalid"),
        ),
        (
            "2 0 0: the CA, not sent, taken from the record",
            vec![tlsa(2, 0, 0, ca.to_vec())],
            vec![mx, intermediate],
            Ok(Some((2, 0, 0, None))),
        ),
        (
            "2 1 0: the CA's key, not sent, named by the topmost certificate's issuer",
            vec![tlsa(2, 1, 0, spki(ca))],
            vec![mx, intermediate],
            Ok(Some((2, 1, 0, None))),
        ),
        (
            "2 1 0: the CA's key, sent",
            vec![tlsa(2, 1, 0, spki(ca))],
            full.to_vec(),
            Ok(Some((2, 1, 0, Some(2)))),
        ),
        (
            "2 1 0: a key that signed nothing sent",
            vec![tlsa(2, 1, 0, spki(other))],
            vec![mx, intermediate],
            Err("certificate-not-trusted"),
        ),
        (
            "2 0 1 on the CA, the intermediate missing",
            vec![tlsa(2, 0, 1, sha256(ca))],
            vec![mx, ca],
            Err("certificate-not-trusted"),
        ),
        (
            "2 0 1 on the leaf: never its own anchor",
            vec![tlsa(2, 0, 1, sha256(mx))],
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        (
            "2 0 0 of a self-signed leaf: never its own anchor",
            vec![tlsa(2, 0, 0, stray.to_vec())],
            vec![stray],
            Err("tlsa-invalid"),
        ),
        // Several records: any usable one may match.
        (
            "a DANE-TA match beside a DANE-EE mismatch",
            vec![
                tlsa(3, 1, 1, sha256(&spki(other))),
                tlsa(2, 0, 1, sha256(ca)),
            ],
            full.to_vec(),
            Ok(Some((2, 0, 1, Some(2)))),
        ),
        (
            "a DANE-EE match beside a DANE-TA failure",
            vec![
                tlsa(2, 0, 1, sha256(ca)),
                tlsa(3, 1, 1, sha256(&spki(other))),
            ],
            vec![other, intermediate, ca],
            Ok(Some((3, 1, 1, Some(0)))),
        ),
        (
            "of two DANE-TA failures, the closer one is reported",
            vec![tlsa(2, 1, 0, spki(mx)), tlsa(2, 0, 1, sha256(ca))],
            vec![other, intermediate, ca],
            Err("certificate-host-mismatch"),
        ),
        // Unusable records (RFC 7672 §3.1).
        (
            "only unusable records: TLS mandatory, unauthenticated",
            unusable(),
            vec![other],
            Ok(None),
        ),
        (
            "unusable records never rescue a usable mismatch",
            [unusable(), vec![tlsa(3, 1, 1, sha256(&spki(other)))]].concat(),
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        // Digest algorithm agility (RFC 7671 §9).
        (
            "a SHA2-256 match is ignored beside SHA2-512 of the same usage and selector",
            vec![
                tlsa(3, 1, 1, sha256(&spki(mx))),
                tlsa(3, 1, 2, wrong_sha512.clone()),
            ],
            full.to_vec(),
            Err("tlsa-invalid"),
        ),
        (
            "the SHA2-512 record matches",
            vec![
                tlsa(3, 1, 1, wrong_sha256.clone()),
                tlsa(3, 1, 2, sha512(&spki(mx))),
            ],
            full.to_vec(),
            Ok(Some((3, 1, 2, Some(0)))),
        ),
        (
            "agility is per selector",
            vec![
                tlsa(3, 1, 1, sha256(&spki(mx))),
                tlsa(3, 0, 2, wrong_sha512.clone()),
            ],
            full.to_vec(),
            Ok(Some((3, 1, 1, Some(0)))),
        ),
        (
            "agility is per usage",
            vec![
                tlsa(3, 1, 1, sha256(&spki(mx))),
                tlsa(2, 1, 2, wrong_sha512.clone()),
            ],
            full.to_vec(),
            Ok(Some((3, 1, 1, Some(0)))),
        ),
        (
            "agility leaves Full(0) alone",
            vec![tlsa(3, 1, 0, spki(mx)), tlsa(3, 1, 2, wrong_sha512.clone())],
            full.to_vec(),
            Ok(Some((3, 1, 0, Some(0)))),
        ),
        (
            "a SHA2-512 record of the wrong length suppresses nothing",
            vec![tlsa(3, 1, 1, sha256(&spki(mx))), tlsa(3, 1, 2, vec![0; 10])],
            full.to_vec(),
            Ok(Some((3, 1, 1, Some(0)))),
        ),
    ];
    for (name, records, chain, expected) in cases {
        let got = summary(check(&records, &chain, &mx_names()));
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn a_cname_expanded_mx_host_accepts_either_name_and_sends_the_expansion() {
    let p = pki();
    let names = ReferenceNames::cname_expanded(dns_name(MX), dns_name("other.example.test"));
    assert_eq!(names.tlsa_base_domain().as_ref(), "other.example.test");
    let records = [tlsa(2, 0, 1, sha256(&p.intermediate))];
    for leaf in [&p.mx.cert, &p.other.cert] {
        let got = summary(check(&records, &[leaf, &p.intermediate], &names));
        assert_eq!(got, Ok(Some((2, 0, 1, Some(1)))));
    }
    let stray = ReferenceNames::cname_expanded(
        dns_name("alias.example.test"),
        dns_name("target.example.test"),
    );
    let got = check(&records, &[&p.mx.cert, &p.intermediate], &stray);
    assert_eq!(got, Err(Failure::HostMismatch));
}

#[test]
fn certificates_that_cannot_be_read_fail_as_validation_failures() {
    let p = pki();
    let records = [
        tlsa(3, 1, 1, sha256(&spki(&p.mx.cert))),
        tlsa(2, 0, 1, sha256(&p.ca)),
    ];
    assert_eq!(
        check(&records, &[], &mx_names()),
        Err(Failure::NoCertificate)
    );
    let garbage = CertificateDer::from(b"\x30\x03\x02\x01\x00".to_vec());
    let got = check(&records, &[&garbage, &p.intermediate, &p.ca], &mx_names());
    assert_eq!(got, Err(Failure::MalformedCertificate));
    assert_eq!(
        Failure::MalformedCertificate.rfc8460_result_type(),
        "validation-failure"
    );
}

#[test]
fn without_usable_records_any_chain_passes_unauthenticated() {
    let set = TlsaSet::new([tlsa(1, 0, 1, vec![0; 32])]);
    assert!(!set.authenticates());
    let got = set.verify(&[], &mx_names(), UnixTime::now(), algorithms());
    assert_eq!(got, Ok(Outcome::Unauthenticated));
    let empty = TlsaSet::new([]);
    assert_eq!(
        empty.verify(&[], &mx_names(), UnixTime::now(), algorithms()),
        Ok(Outcome::Unauthenticated)
    );
}

#[test]
fn rdata_is_three_octets_then_the_data() {
    let mut rdata = vec![3, 1, 1];
    rdata.extend_from_slice(&[0xab; 32]);
    assert_eq!(
        Tlsa::from_rdata(&rdata).unwrap(),
        tlsa(3, 1, 1, vec![0xab; 32])
    );
    assert_eq!(Tlsa::from_rdata(&[2, 0, 0]).unwrap(), tlsa(2, 0, 0, vec![]));
    for short in [&[][..], &[3], &[3, 1]] {
        assert!(
            matches!(Tlsa::from_rdata(short), Err(Error::RdataTooShort { len }) if len == short.len()),
            "{short:?}"
        );
    }
    let long = vec![3; MAX_RDATA_LEN + 1];
    assert!(matches!(
        Tlsa::from_rdata(&long),
        Err(Error::RdataTooLong { len }) if len == MAX_RDATA_LEN + 1
    ));
    assert!(Tlsa::from_rdata(&long[..MAX_RDATA_LEN]).is_ok());
}

#[test]
fn usable_records_are_dane_ta_and_ee_with_known_selectors_and_digests() {
    let ok = |u, s, m| Ok((u, s, m));
    let cases = [
        (
            tlsa(2, 0, 1, vec![0; 32]),
            ok(Usage::DaneTa, Selector::Cert, MatchingType::Sha256),
        ),
        (
            tlsa(3, 1, 2, vec![0; 64]),
            ok(Usage::DaneEe, Selector::Spki, MatchingType::Sha512),
        ),
        (
            tlsa(3, 1, 0, vec![0; 5]),
            ok(Usage::DaneEe, Selector::Spki, MatchingType::Full),
        ),
        (tlsa(0, 0, 1, vec![0; 32]), Err(Unusable::PkixUsage(0))),
        (tlsa(1, 0, 1, vec![0; 32]), Err(Unusable::PkixUsage(1))),
        (tlsa(4, 0, 1, vec![0; 32]), Err(Unusable::UnknownUsage(4))),
        (
            tlsa(255, 0, 1, vec![0; 32]),
            Err(Unusable::UnknownUsage(255)),
        ),
        (
            tlsa(3, 5, 1, vec![0; 32]),
            Err(Unusable::UnknownSelector(5)),
        ),
        (
            tlsa(3, 1, 7, vec![0; 32]),
            Err(Unusable::UnknownMatchingType(7)),
        ),
        (
            tlsa(3, 1, 1, vec![0; 31]),
            Err(Unusable::DigestLength {
                matching_type: MatchingType::Sha256,
                len: 31,
            }),
        ),
        (
            tlsa(3, 1, 2, vec![0; 32]),
            Err(Unusable::DigestLength {
                matching_type: MatchingType::Sha512,
                len: 32,
            }),
        ),
        (tlsa(3, 0, 0, vec![]), Err(Unusable::EmptyData)),
    ];
    for (record, expected) in cases {
        assert_eq!(record.classify(), expected, "{record:?}");
    }
}

#[test]
fn the_set_counts_what_it_ignored() {
    let set = TlsaSet::from_rdata([
        &[3, 1, 1][..],    // SHA2-256 of the wrong length
        &[3, 1][..],       // malformed
        &[0, 0, 0, 1][..], // PKIX-TA
        &[[3, 1, 1].as_slice(), &[1; 32]].concat(),
        &[[3, 1, 2].as_slice(), &[2; 64]].concat(),
        &[[3, 0, 1].as_slice(), &[3; 32]].concat(),
    ]);
    assert_eq!(set.usable_count(), 2, "3 1 2 and 3 0 1");
    assert_eq!(set.unusable_count(), 3);
    assert_eq!(set.weaker_digest_count(), 1, "3 1 1 beside 3 1 2");
    assert!(set.authenticates());
}

#[test]
fn each_failure_has_its_rfc8460_result_type() {
    let cases = [
        (Failure::NoCertificate, "validation-failure"),
        (Failure::MalformedCertificate, "validation-failure"),
        (Failure::NoMatch, "tlsa-invalid"),
        (
            Failure::NotTrusted(webpki::Error::UnknownIssuer),
            "certificate-not-trusted",
        ),
        (Failure::Expired, "certificate-expired"),
        (Failure::HostMismatch, "certificate-host-mismatch"),
        (Failure::DaneRequired, "dane-required"),
    ];
    for (failure, expected) in cases {
        assert_eq!(failure.rfc8460_result_type(), expected, "{failure:?}");
    }
}

#[test]
fn a_match_reads_as_its_record() {
    let matched = Matched {
        usage: Usage::DaneEe,
        selector: Selector::Spki,
        matching_type: MatchingType::Sha256,
        depth: Some(0),
    };
    assert_eq!(matched.to_string(), "3 1 1");
}

#[test]
fn sequence_contents_takes_one_whole_sequence() {
    assert_eq!(
        sequence_contents(&[0x30, 0x02, 0xaa, 0xbb]),
        Some(&[0xaa, 0xbb][..])
    );
    let mut long = vec![0x30, 0x81, 0x80];
    long.extend_from_slice(&[7; 0x80]);
    assert_eq!(sequence_contents(&long), Some(&[7; 0x80][..]));
    for bad in [
        &[][..],
        &[0x30],
        &[0x31, 0x00],
        &[0x30, 0x02, 0xaa],
        &[0x30, 0x01, 0xaa, 0xbb],
        &[0x30, 0x80, 0x00, 0x00],
        &[0x30, 0x84, 0, 0, 0, 1, 0xaa],
        &[0x30, 0x82, 0x01],
    ] {
        assert_eq!(sequence_contents(bad), None, "{bad:x?}");
    }
    let p = pki();
    assert!(sequence_contents(&spki(&p.ca)).is_some());
}

/// RDATA that reaches the matching code more often than uniform bytes would.
fn rdata() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..80),
        (0u8..5, 0u8..3, 0u8..4, vec(any::<u8>(), 0..700)).prop_map(
            |(usage, selector, matching, data)| [vec![usage, selector, matching], data].concat()
        ),
    ]
}

proptest! {
    #[test]
    fn arbitrary_rdata_never_panics(rrset in vec(rdata(), 0..6)) {
        let set = TlsaSet::from_rdata(rrset.iter().map(Vec::as_slice));
        prop_assert_eq!(
            set.usable_count() + set.unusable_count() + set.weaker_digest_count(),
            rrset.len()
        );
        let p = pki();
        let chains = [
            vec![p.mx.cert.clone(), p.intermediate.clone(), p.ca.clone()],
            vec![p.mx.cert.clone()],
            vec![],
        ];
        for chain in chains {
            let _ = set.verify(&chain, &mx_names(), UnixTime::now(), algorithms());
        }
    }

    #[test]
    fn arbitrary_certificate_bytes_never_panic(
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        extra in vec(vec(any::<u8>(), 0..200), 0..3),
    ) {
        let p = pki();
        let mut leaf = p.mx.cert.to_vec();
        for (at, byte) in flips {
            let at = at.index(leaf.len());
            leaf[at] = byte;
        }
        let mut chain = vec![CertificateDer::from(leaf), p.intermediate.clone()];
        chain.extend(extra.into_iter().map(CertificateDer::from));
        let set = TlsaSet::new([
            tlsa(3, 1, 1, sha256(&spki(&p.mx.cert))),
            tlsa(2, 0, 1, sha256(&p.ca)),
            tlsa(2, 1, 0, spki(&p.ca)),
            tlsa(2, 0, 0, p.ca.to_vec()),
        ]);
        let _ = set.verify(&chain, &mx_names(), UnixTime::now(), algorithms());
    }
}

/// A handshake in memory: a tokio-rustls server sending `chain` and a client with a
/// [`DaneVerifier`] for `records`. Returns the client's result, its verifier, and the SNI
/// and ALPN the server saw if it completed.
async fn handshake(
    chain: Vec<CertificateDer<'static>>,
    key: &[u8],
    versions: &[&'static SupportedProtocolVersion],
    records: Vec<Tlsa>,
) -> (
    std::io::Result<()>,
    Arc<DaneVerifier>,
    Option<(Option<String>, Option<Vec<u8>>)>,
) {
    let provider = crate::tls::provider();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let verifier = DaneVerifier::new(TlsaSet::new(records), mx_names(), &provider);
    let client = client_config(Arc::clone(&verifier), provider).unwrap();
    let (near, far) = tokio::io::duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(near);
    let connect = tokio_rustls::TlsConnector::from(client).connect(verifier.server_name(), far);
    let (accepted, connected) = tokio::join!(accept, connect);
    let seen = accepted.ok().map(|stream| {
        let (_, connection) = stream.get_ref();
        (
            connection.server_name().map(str::to_owned),
            connection.alpn_protocol().map(<[u8]>::to_vec),
        )
    });
    (connected.map(|_| ()), verifier, seen)
}

/// The [`Failure`] inside a failed handshake's error.
fn failure_of(err: &std::io::Error) -> Option<&Failure> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<Failure>()
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_matching_record_lets_the_handshake_through_and_is_recorded() {
    let p = pki();
    let chain = vec![p.mx.cert.clone(), p.intermediate.clone()];
    let records = vec![tlsa(3, 1, 1, sha256(&spki(&p.mx.cert)))];
    let (result, verifier, seen) =
        handshake(chain, &p.mx.key, &[&rustls::version::TLS13], records).await;
    result.unwrap();
    let expected = Matched {
        usage: Usage::DaneEe,
        selector: Selector::Spki,
        matching_type: MatchingType::Sha256,
        depth: Some(0),
    };
    assert_eq!(
        verifier.outcome(),
        Some(Ok(Outcome::Authenticated(expected)))
    );
    assert_eq!(seen, Some((Some(MX.to_owned()), None)), "SNI, no ALPN");
}

#[tokio::test]
async fn dane_ta_over_tls12_checks_the_chain_and_the_signature() {
    let p = pki();
    let chain = vec![p.mx.cert.clone(), p.intermediate.clone()];
    let records = vec![tlsa(2, 1, 0, spki(&p.ca))];
    let (result, verifier, _) =
        handshake(chain, &p.mx.key, &[&rustls::version::TLS12], records).await;
    result.unwrap();
    let Some(Ok(Outcome::Authenticated(matched))) = verifier.outcome() else {
        panic!("{:?}", verifier.outcome());
    };
    assert_eq!(
        (matched.to_string(), matched.depth),
        ("2 1 0".to_owned(), None)
    );
}

#[tokio::test]
async fn a_record_that_matches_nothing_fails_the_handshake_with_the_verifiers_failure() {
    let p = pki();
    let chain = vec![p.mx.cert.clone(), p.intermediate.clone()];
    let records = vec![tlsa(3, 1, 1, sha256(&spki(&p.other.cert)))];
    let (result, verifier, seen) =
        handshake(chain, &p.mx.key, &[&rustls::version::TLS13], records).await;
    let err = result.unwrap_err();
    assert_eq!(failure_of(&err), Some(&Failure::NoMatch), "{err}");
    assert_eq!(verifier.outcome(), Some(Err(Failure::NoMatch)));
    assert_eq!(seen, None, "the server saw the handshake fail");
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

#[tokio::test]
async fn a_server_that_presents_a_key_it_does_not_hold_fails_the_signature_check() {
    // The record matches the certificate sent, but the server signs with another key:
    // the certificate check passes and the handshake signature fails.
    let p = pki();
    let chain = vec![p.mx.cert.clone(), p.intermediate.clone()];
    let records = vec![tlsa(3, 0, 1, sha256(&p.mx.cert))];
    let provider = crate::tls::provider();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.other.key.clone()));
    let certified = rustls::sign::CertifiedKey::new(
        chain,
        provider.key_provider.load_private_key(key).unwrap(),
    );
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    let verifier = DaneVerifier::new(TlsaSet::new(records), mx_names(), &provider);
    let client = client_config(Arc::clone(&verifier), provider).unwrap();
    let (near, far) = tokio::io::duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(near);
    let connect = tokio_rustls::TlsConnector::from(client).connect(verifier.server_name(), far);
    let (_, connected) = tokio::join!(accept, connect);
    assert!(connected.is_err());
    assert!(matches!(
        verifier.outcome(),
        Some(Ok(Outcome::Authenticated(_)))
    ));
}

#[tokio::test]
async fn only_unusable_records_still_mean_tls_with_any_certificate() {
    let p = pki();
    let chain = vec![p.self_signed.cert.clone()];
    let records = vec![tlsa(1, 1, 1, sha256(&spki(&p.mx.cert)))];
    let (result, verifier, _) = handshake(
        chain,
        &p.self_signed.key,
        &[&rustls::version::TLS13],
        records,
    )
    .await;
    result.unwrap();
    assert_eq!(verifier.outcome(), Some(Ok(Outcome::Unauthenticated)));
}
