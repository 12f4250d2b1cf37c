//! TLSA records: RDATA parsing, which records SMTP can use (RFC 7672 §3.1), digest
//! algorithm agility (RFC 7671 §9), and a proptest that no RDATA panics.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

fn tlsa(usage: u8, selector: u8, matching_type: u8, data: Vec<u8>) -> Tlsa {
    Tlsa {
        usage,
        selector,
        matching_type,
        data,
    }
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

/// RDATA with known usages, selectors and matching types more often than uniform bytes.
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
    }
}
