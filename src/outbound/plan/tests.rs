//! The plan's rules on answers made here, without a resolver: the MX answer's meaning,
//! the shuffle, addresses, TLSA answers, and the choice between DANE, MTA-STS and the
//! floor. `tests/outbound_plan.rs` runs [`plan`] itself against the lab's DNS.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::*;
use crate::proto::outbound::envelope::recipient_domain;

fn domain(name: &str) -> Domain {
    recipient_domain(format!("someone@{name}").as_bytes()).unwrap()
}

fn resolver_addr() -> SocketAddr {
    "127.0.0.1:53".parse().unwrap()
}

fn servfail(extended: Option<&str>) -> dns::Error {
    dns::Error::ServFail {
        server: resolver_addr(),
        question: "MX x.test".into(),
        extended: extended.map(Into::into),
    }
}

fn timeout() -> dns::Error {
    dns::Error::Timeout {
        server: resolver_addr(),
        question: "MX x.test".into(),
        limit: Duration::from_secs(5),
    }
}

fn answer<T>(name: &str, secure: bool, outcome: Outcome<T>) -> Answer<T> {
    Answer {
        name: name.into(),
        secure,
        outcome,
    }
}

fn mx(preference: u16, exchange: &str) -> Mx {
    Mx {
        preference,
        exchange: exchange.into(),
    }
}

fn host(preference: u16, name: &str) -> MxHost {
    MxHost {
        preference,
        name: name.into(),
    }
}

fn dns_name(name: &str) -> DnsName<'static> {
    DnsName::try_from(name.to_owned()).unwrap()
}

fn reply_of(failure: &PlanFailure) -> &str {
    std::str::from_utf8(failure.reply).unwrap()
}

#[test]
fn mx_lookup_failures_defer_and_nxdomain_bounces() {
    let d = domain("x.test");
    let bogus = mx_set(&d, Err(servfail(Some("DNSSEC Bogus (6): no signatures")))).unwrap_err();
    assert!(reply_of(&bogus).starts_with("451 4.4.3 "), "{bogus:?}");
    assert_eq!(bogus.result_type, Some("dnssec-invalid"));
    assert!(bogus.detail.contains("DNSSEC Bogus"), "{}", bogus.detail);
    // Not DNSSEC's doing: the DNS failed, no TLS policy did.
    for err in [
        servfail(None),
        servfail(Some("No Reachable Authority (22)")),
        timeout(),
    ] {
        let failure = mx_set(&d, Err(err)).unwrap_err();
        assert!(reply_of(&failure).starts_with("451 4.4.3 "), "{failure:?}");
        assert_eq!(failure.result_type, None, "{failure:?}");
    }
    for secure in [true, false] {
        let gone = mx_set(&d, Ok(answer("x.test", secure, Outcome::NxDomain))).unwrap_err();
        assert!(reply_of(&gone).starts_with("550 5.1.2 "), "{gone:?}");
        assert!(reply_of(&gone).ends_with("\r\n"));
        assert_eq!(gone.result_type, None);
    }
}

#[test]
fn the_dnssec_extended_errors_are_codes_1_2_and_5_to_12() {
    let dnssec = |text: &str| is_dnssec_failure(&servfail(Some(text)));
    for code in [1, 2, 5, 6, 7, 8, 9, 10, 11, 12] {
        assert!(dnssec(&format!("Name ({code})")), "{code}");
    }
    for code in [0, 3, 4, 13, 22, 23] {
        assert!(!dnssec(&format!("Name ({code}): text")), "{code}");
    }
    assert!(!dnssec("garbage"));
    assert!(!is_dnssec_failure(&timeout()));
}

#[test]
fn a_null_mx_alone_means_no_mail() {
    let d = domain("nomail.test");
    let null = mx_set(
        &d,
        Ok(answer("nomail.test", true, Outcome::Found(vec![mx(0, "")]))),
    )
    .unwrap_err();
    assert_eq!(
        reply_of(&null),
        "556 5.1.10 Recipient domain accepts no mail (null MX)\r\n"
    );
    // Beside real hosts, the null MX is a mistake, and the hosts take the mail.
    let mixed = mx_set(
        &d,
        Ok(answer(
            "nomail.test",
            false,
            Outcome::Found(vec![mx(0, ""), mx(10, "mx.nomail.test")]),
        )),
    )
    .unwrap();
    assert_eq!(mixed.hosts, [host(10, "mx.nomail.test")]);
    assert_eq!(mixed.notes.len(), 1, "{:?}", mixed.notes);
}

#[test]
fn no_mx_records_is_the_domain_itself_at_preference_0() {
    let d = domain("alias.dane.test");
    for secure in [true, false] {
        // Through a CNAME the denial is at its target; the host is still the domain.
        let set = mx_set(&d, Ok(answer("mx1.dane.test", secure, Outcome::NoData))).unwrap();
        assert_eq!(set.hosts, [host(0, "alias.dane.test")]);
        assert_eq!(set.secure, secure);
    }
}

#[test]
fn hosts_are_sorted_by_preference_stably_and_each_kept_once() {
    let d = domain("x.test");
    let records = vec![
        mx(20, "b.x.test"),
        mx(10, "a.x.test"),
        mx(10, "c.x.test"),
        mx(30, "a.x.test"),
        mx(5, "d.x.test"),
    ];
    let set = mx_set(&d, Ok(answer("x.test", true, Outcome::Found(records)))).unwrap();
    assert_eq!(
        set.hosts,
        [
            host(5, "d.x.test"),
            host(10, "a.x.test"),
            host(10, "c.x.test"),
            host(20, "b.x.test"),
        ]
    );
    assert!(set.secure);
}

#[test]
fn equal_preferences_are_shuffled_and_only_among_themselves() {
    let hosts = vec![
        host(5, "first"),
        host(10, "a"),
        host(10, "b"),
        host(10, "c"),
        host(20, "last"),
    ];
    let mut orders = HashSet::new();
    // Every draw of Fisher-Yates for a run of three: `0..3`, then `0..2`.
    for (first, second) in (0..3).flat_map(|a| (0..2).map(move |b| (a, b))) {
        let mut draws = [first, second].into_iter();
        let mut shuffled = hosts.clone();
        shuffle_equal_preferences(&mut shuffled, |n| {
            let draw = draws.next().unwrap();
            assert!(draw < n);
            draw
        });
        assert_eq!(
            draws.next(),
            None,
            "one draw per swap, none for single hosts"
        );
        assert_eq!(shuffled[0], hosts[0]);
        assert_eq!(shuffled[4], hosts[4]);
        let middle: Vec<&str> = shuffled[1..4].iter().map(|h| h.name.as_str()).collect();
        let mut sorted = middle.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"]);
        orders.insert(middle.join(","));
    }
    assert_eq!(orders.len(), 6, "every order of three is drawn: {orders:?}");
    for n in 1..20 {
        assert!(random_below(n) < n);
    }
    assert_eq!(random_below(0), 0);
}

#[test]
fn addresses_are_filtered_bounded_and_given_the_port() {
    let ips: Vec<IpAddr> = vec![
        Ipv4Addr::new(192, 0, 2, 1).into(),
        Ipv4Addr::UNSPECIFIED.into(),
        Ipv4Addr::BROADCAST.into(),
        Ipv4Addr::new(224, 0, 0, 1).into(),
        Ipv4Addr::new(192, 0, 2, 1).into(),
        Ipv6Addr::UNSPECIFIED.into(),
        "2001:db8::1".parse().unwrap(),
        Ipv4Addr::new(192, 0, 2, 2).into(),
        Ipv4Addr::new(192, 0, 2, 3).into(),
        Ipv4Addr::new(192, 0, 2, 4).into(),
    ];
    let found = addresses(
        "mx.x.test",
        Ok(answer("mx.x.test", true, Outcome::Found(ips))),
        2525,
    )
    .unwrap();
    let expected: Vec<SocketAddr> = [
        "192.0.2.1:2525",
        "[2001:db8::1]:2525",
        "192.0.2.2:2525",
        "192.0.2.3:2525",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    assert_eq!(found.addrs, expected);
    assert_eq!(found.addrs.len(), MAX_ADDRS_PER_HOST);
    assert!(found.secure);
    assert_eq!(found.name, "mx.x.test");

    let err = addresses("mx.x.test", Err(timeout()), 25).unwrap_err();
    assert!(err.contains("mx.x.test: address lookup failed"), "{err}");
    for (outcome, says) in [
        (Outcome::NoData, "NODATA"),
        (Outcome::NxDomain, "NXDOMAIN"),
        (
            Outcome::Found(vec![Ipv4Addr::UNSPECIFIED.into()]),
            "no usable",
        ),
    ] {
        let err = addresses("mx.x.test", Ok(answer("mx.x.test", true, outcome)), 25).unwrap_err();
        assert!(err.contains(says), "{err}");
    }
}

fn tlsa(usage: u8) -> dns::Tlsa {
    dns::Tlsa {
        usage,
        selector: 1,
        matching: 1,
        data: vec![0xab; 32],
    }
}

#[test]
fn tlsa_answers_mean_dane_no_dane_or_an_unusable_host() {
    let base = "_25._tcp.mx.x.test";
    let TlsaStep::Found(set) = tlsa_step(
        "mx.x.test",
        Ok(answer(base, true, Outcome::Found(vec![tlsa(3), tlsa(1)]))),
    ) else {
        panic!()
    };
    assert_eq!((set.usable_count(), set.unusable_count()), (1, 1));
    // Insecure records are no records (RFC 7672 §2.2); denials are no DANE.
    for (secure, outcome) in [
        (false, Outcome::Found(vec![tlsa(3)])),
        (true, Outcome::NxDomain),
        (true, Outcome::NoData),
        (false, Outcome::NxDomain),
    ] {
        let step = tlsa_step("mx.x.test", Ok(answer(base, secure, outcome)));
        assert!(matches!(step, TlsaStep::NotHere), "{step:?}");
    }
    let TlsaStep::Failed(detail) = tlsa_step("mx.x.test", Err(servfail(None))) else {
        panic!()
    };
    assert!(
        detail.starts_with("mx.x.test: TLSA lookup failed"),
        "{detail}"
    );
}

#[test]
fn a_cname_alias_looks_up_tlsa_at_its_expansion_first() {
    let mx = dns_name("mx.x.test");
    let plain = tlsa_bases(&mx, "mx.x.test");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].0, "mx.x.test");
    assert_eq!(plain[0].1, ReferenceNames::mx_host(mx.clone()));

    let aliased = tlsa_bases(&mx, "real.y.test");
    let bases: Vec<&str> = aliased.iter().map(|(base, _)| base.as_str()).collect();
    assert_eq!(bases, ["real.y.test", "mx.x.test"]);
    assert_eq!(
        aliased[0].1,
        ReferenceNames::cname_expanded(mx.clone(), dns_name("real.y.test"))
    );
    assert_eq!(aliased[0].1.tlsa_base_domain().as_ref(), "real.y.test");
    assert_eq!(aliased[1].1, ReferenceNames::mx_host(mx));
}

/// A host with an address, with or without TLSA records (`usage` 3: usable).
fn usable(preference: u16, name: &str, tlsa_usage: Option<u8>) -> HostLookup {
    let dane = tlsa_usage.map(|usage| DaneRecords {
        tlsa: TlsaSet::new([dane::Tlsa {
            usage,
            selector: 1,
            matching_type: 1,
            data: vec![0xab; 32],
        }]),
        names: ReferenceNames::mx_host(dns_name(name)),
    });
    HostLookup {
        host: name.into(),
        preference,
        outcome: Ok(Usable {
            name: dns_name(name),
            addrs: vec![SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 25)],
            dane,
        }),
    }
}

fn skipped(name: &str, why: SkipReason) -> HostLookup {
    HostLookup {
        host: name.into(),
        preference: 10,
        outcome: Err(Skipped {
            why,
            detail: format!("{name}: skipped"),
        }),
    }
}

fn sts(mode: &str, mx: &str) -> mta_sts::Policy {
    let body = format!("version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n");
    mta_sts::Policy::parse(body.as_bytes()).unwrap()
}

/// A requirement as the tables state it.
fn describe(requirement: &Requirement) -> String {
    match requirement {
        Requirement::Dane { tlsa, names } => format!(
            "dane {} ({} usable)",
            names.tlsa_base_domain().as_ref(),
            tlsa.usable_count()
        ),
        Requirement::DaneUnauthenticated { names } => {
            format!("dane-unauthenticated {}", names.tlsa_base_domain().as_ref())
        }
        Requirement::Pkix { host, enforce } => format!(
            "pkix {} {}",
            if *enforce { "enforce" } else { "record" },
            host.as_ref()
        ),
        Requirement::Encrypt => "encrypt".into(),
        Requirement::Opportunistic => "opportunistic".into(),
    }
}

/// `select`'s candidates as (host, requirement, policy).
fn selected(
    hosts: Vec<HostLookup>,
    sts: Option<&mta_sts::Policy>,
    floor: Floor,
) -> Result<Vec<(String, String, String)>, PlanFailure> {
    let mut notes = Vec::new();
    select(&domain("x.test"), hosts, sts, floor, &mut notes).map(|candidates| {
        candidates
            .iter()
            .map(|c| {
                (
                    c.host.clone(),
                    describe(&c.requirement),
                    c.policy.to_string(),
                )
            })
            .collect()
    })
}

fn row(host: &str, requirement: &str, policy: &str) -> (String, String, String) {
    (host.into(), requirement.into(), policy.into())
}

#[test]
fn without_dane_or_mta_sts_the_floor_decides() {
    for (floor, requirement) in [
        (Floor::Opportunistic, "opportunistic"),
        (Floor::Encrypt, "encrypt"),
        (Floor::Verify, "pkix enforce mx.x.test"),
    ] {
        let hosts = vec![usable(10, "mx.x.test", None)];
        assert_eq!(
            selected(hosts.clone(), None, floor).unwrap(),
            [row("mx.x.test", requirement, floor.as_str())]
        );
        // A policy in mode none is no policy (RFC 8461 §5).
        let none = mta_sts::Policy::parse(b"version: STSv1\nmode: none\nmax_age: 60\n").unwrap();
        assert_eq!(
            selected(hosts, Some(&none), floor).unwrap(),
            [row("mx.x.test", requirement, floor.as_str())]
        );
    }
}

#[test]
fn dane_hosts_get_dane_and_mta_sts_is_not_asked_about_them() {
    let policy = sts("enforce", "listed.x.test");
    let hosts = vec![
        usable(10, "dane.x.test", Some(3)),
        usable(20, "unusable.x.test", Some(1)),
        usable(30, "listed.x.test", None),
        usable(40, "unlisted.x.test", None),
    ];
    assert_eq!(
        selected(hosts, Some(&policy), Floor::Opportunistic).unwrap(),
        [
            row("dane.x.test", "dane dane.x.test (1 usable)", "dane"),
            row(
                "unusable.x.test",
                "dane-unauthenticated unusable.x.test",
                "dane"
            ),
            row(
                "listed.x.test",
                "pkix enforce listed.x.test",
                "mta-sts enforce"
            ),
        ]
    );
}

#[test]
fn unusable_tlsa_records_are_unauthenticated_tls_unless_the_domain_asks_verify() {
    let hosts = vec![usable(10, "mx.x.test", Some(0))];
    assert_eq!(
        selected(hosts.clone(), None, Floor::Encrypt).unwrap(),
        [row("mx.x.test", "dane-unauthenticated mx.x.test", "dane")]
    );
    assert_eq!(
        selected(hosts, None, Floor::Verify).unwrap(),
        [row("mx.x.test", "pkix enforce mx.x.test", "verify")]
    );
}

#[test]
fn mta_sts_enforce_keeps_only_the_hosts_it_names() {
    let policy = sts("enforce", "*.x.test");
    let hosts = vec![
        usable(10, "mx1.x.test", None),
        usable(20, "mx.elsewhere.test", None),
        usable(30, "mx2.x.test", None),
    ];
    let mut notes = Vec::new();
    let candidates = select(
        &domain("x.test"),
        hosts,
        Some(&policy),
        Floor::Opportunistic,
        &mut notes,
    )
    .unwrap();
    let names: Vec<&str> = candidates.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(names, ["mx1.x.test", "mx2.x.test"]);
    assert!(
        candidates
            .iter()
            .all(|c| matches!(c.requirement, Requirement::Pkix { enforce: true, .. }))
    );
    assert_eq!(notes.len(), 1);
    assert!(notes[0].starts_with("mx.elsewhere.test: "), "{notes:?}");

    // None named: deferred, as RFC 8460 calls it.
    let policy = sts("enforce", "mx.x.test");
    let failure = selected(
        vec![usable(10, "mx.elsewhere.test", None)],
        Some(&policy),
        Floor::Verify,
    )
    .unwrap_err();
    assert!(reply_of(&failure).starts_with("451 4.7.5 "), "{failure:?}");
    assert_eq!(failure.result_type, Some("validation-failure"));
    assert!(failure.detail.contains("mx.elsewhere.test"), "{failure:?}");
}

#[test]
fn mta_sts_testing_records_pkix_but_never_weakens_the_floor() {
    let policy = sts("testing", "other.x.test");
    let hosts = vec![usable(10, "mx.x.test", None)];
    for (floor, requirement) in [
        (Floor::Opportunistic, "pkix record mx.x.test"),
        (Floor::Encrypt, "encrypt"),
        (Floor::Verify, "pkix enforce mx.x.test"),
    ] {
        assert_eq!(
            selected(hosts.clone(), Some(&policy), floor).unwrap(),
            [row("mx.x.test", requirement, "mta-sts testing")],
            "{floor}"
        );
    }
}

#[test]
fn with_no_host_left_the_reply_says_why() {
    let failure = selected(
        vec![
            skipped("a.x.test", SkipReason::NoAddress),
            skipped("b.x.test", SkipReason::NoAddress),
        ],
        None,
        Floor::Opportunistic,
    )
    .unwrap_err();
    assert!(reply_of(&failure).starts_with("451 4.4.3 "), "{failure:?}");
    assert_eq!(failure.result_type, None);
    assert!(
        failure
            .detail
            .contains("a.x.test: skipped; b.x.test: skipped"),
        "{failure:?}"
    );

    let failure = selected(
        vec![
            skipped("a.x.test", SkipReason::NoAddress),
            skipped("b.x.test", SkipReason::TlsaLookupFailed),
        ],
        None,
        Floor::Opportunistic,
    )
    .unwrap_err();
    assert!(reply_of(&failure).starts_with("451 4.7.5 "), "{failure:?}");
    assert_eq!(failure.result_type, Some("dnssec-invalid"));

    // One host left is enough, and the skipped one is noted.
    let mut notes = vec!["earlier".to_owned()];
    let candidates = select(
        &domain("x.test"),
        vec![
            skipped("a.x.test", SkipReason::TlsaLookupFailed),
            usable(20, "b.x.test", None),
        ],
        None,
        Floor::Opportunistic,
        &mut notes,
    )
    .unwrap();
    assert_eq!(candidates.len(), 1);
    assert_eq!(notes, ["earlier", "a.x.test: skipped"]);
}

#[test]
fn every_reply_is_one_crlf_line_with_an_enhanced_code() {
    for reply in [
        reply::DNS_FAILURE,
        reply::NO_ADDRESS,
        reply::TLSA_FAILURE,
        reply::MTA_STS_NO_MX,
        reply::NULL_MX,
        reply::NO_SUCH_DOMAIN,
    ] {
        let text = std::str::from_utf8(reply).unwrap();
        let line = text.strip_suffix("\r\n").unwrap();
        assert!(!line.contains(['\r', '\n']), "{text:?}");
        let mut words = line.split(' ');
        let code = words.next().unwrap();
        let enhanced = words.next().unwrap();
        assert_eq!(code.len(), 3);
        assert_eq!(code[..1], enhanced[..1], "{text:?}");
        assert_eq!(enhanced.split('.').count(), 3, "{text:?}");
    }
}

#[test]
fn which_requirements_make_tls_mandatory() {
    let names = ReferenceNames::mx_host(dns_name("mx.x.test"));
    let pkix = |enforce| Requirement::Pkix {
        host: dns_name("mx.x.test"),
        enforce,
    };
    for (requirement, required) in [
        (
            Requirement::Dane {
                tlsa: TlsaSet::default(),
                names: names.clone(),
            },
            true,
        ),
        (Requirement::DaneUnauthenticated { names }, true),
        (pkix(true), true),
        (pkix(false), false),
        (Requirement::Encrypt, true),
        (Requirement::Opportunistic, false),
    ] {
        assert_eq!(requirement.tls_required(), required, "{requirement:?}");
    }
}

#[test]
fn a_domain_may_have_its_own_floor() {
    let mut settings = Settings {
        floor: Floor::Encrypt,
        ..Settings::default()
    };
    settings
        .per_domain
        .insert("strict.test".into(), Floor::Verify);
    assert_eq!(settings.floor_for(&domain("strict.test")), Floor::Verify);
    assert_eq!(settings.floor_for(&domain("STRICT.test")), Floor::Verify);
    assert_eq!(settings.floor_for(&domain("other.test")), Floor::Encrypt);
    assert_eq!(Settings::default().floor, Floor::Opportunistic);
    assert_eq!(Settings::default().smtp_port, 25);
}
