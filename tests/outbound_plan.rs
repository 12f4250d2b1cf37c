//! `outbound::plan` and `outbound::mx_tls` against the outbound lab
//! (`scripts/outbound-lab.sh`): the plan for each of the lab's domains through its
//! validating resolver (DANE, MTA-STS fetched from its nginx and cached, the floor, and
//! the failures), then, for the candidates, a real `EHLO`/`STARTTLS` exchange with the
//! lab's Postfix MX and a handshake with the client `mx_tls` makes for the requirement.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::outbound_lab::Lab;
use mailmoat::outbound::dane;
use mailmoat::outbound::dns::Resolver;
use mailmoat::outbound::mta_sts::{Cached, Fetcher, Mode, PolicyDomain, PolicyId, Store};
use mailmoat::outbound::mx_tls::{self, TlsReport, Verdict};
use mailmoat::outbound::plan::{
    self, Candidate, Floor, MtaSts, Plan, PlanFailure, Policy, Requirement, Settings,
};
use mailmoat::proto::outbound::envelope::{Domain, recipient_domain};
use rustls::RootCertStore;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The shared lab, or return: the tests skip (outside CI) when its packages are missing.
macro_rules! lab {
    () => {
        match Lab::shared() {
            Some(lab) => lab,
            None => return,
        }
    };
}

/// Longer than any plan or SMTP exchange with the lab takes.
const LIMIT: Duration = Duration::from_secs(120);

fn domain(name: &str) -> Domain {
    recipient_domain(format!("someone@{name}").as_bytes()).unwrap()
}

/// The system's CAs and the lab's.
fn roots(lab: &Lab) -> Arc<RootCertStore> {
    let system = Path::new(mx_tls::SYSTEM_CA_BUNDLE);
    Arc::new(mx_tls::trust_anchors(Some(system), Some(&lab.ca)).unwrap())
}

/// Settings for the lab: its MX port, MTA-STS with a cache of the test's own (in the
/// returned directory) and a fetcher that trusts `roots`.
fn settings(lab: &Lab, floor: Floor, roots: &RootCertStore) -> (Settings, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    let mta_sts = MtaSts {
        store: Store::open(cache.path()).unwrap(),
        fetcher: Fetcher::new(roots.clone(), Duration::from_secs(30)).unwrap(),
    };
    let settings = Settings {
        floor,
        per_domain: HashMap::new(),
        smtp_port: lab.var("LAB_MX_PORT").parse().unwrap(),
        mta_sts: Some(mta_sts),
    };
    (settings, cache)
}

async fn plan_for(lab: &Lab, settings: &Settings, name: &str) -> Result<Plan, PlanFailure> {
    let resolver = Resolver::new(lab.resolver);
    let domain = domain(name);
    let planned = plan::plan(&domain, &resolver, settings, SystemTime::now());
    timeout(LIMIT, planned)
        .await
        .expect("the plan took too long")
}

/// A requirement as the tests state it.
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

/// Each candidate as (host, preference, addresses, requirement, policy).
fn summary(plan: &Plan) -> Vec<(String, u16, Vec<SocketAddr>, String, Policy)> {
    plan.candidates
        .iter()
        .map(|c| {
            (
                c.host.clone(),
                c.preference,
                c.addrs.clone(),
                describe(&c.requirement),
                c.policy,
            )
        })
        .collect()
}

fn row(
    host: &str,
    preference: u16,
    addr: SocketAddr,
    requirement: &str,
    policy: Policy,
) -> (String, u16, Vec<SocketAddr>, String, Policy) {
    (
        host.into(),
        preference,
        vec![addr],
        requirement.into(),
        policy,
    )
}

fn reply_of(failure: &PlanFailure) -> &str {
    std::str::from_utf8(failure.reply).unwrap()
}

/// Reads one SMTP reply (RFC 5321 §4.2.1): its code and each line's text.
async fn read_reply<S: AsyncRead + Unpin>(reader: &mut BufReader<S>) -> (u16, Vec<String>) {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line).await.unwrap();
        assert!(read > 0, "the MX closed the connection after {lines:?}");
        assert!(line.len() >= 4 && line.ends_with("\r\n"), "{line:?}");
        let code = line[..3].parse().unwrap();
        lines.push(line[4..].trim_end().to_owned());
        if line.as_bytes()[3] == b' ' {
            return (code, lines);
        }
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    line: &str,
) -> (u16, Vec<String>) {
    stream
        .get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    read_reply(stream).await
}

/// Connects to the candidate's first address: greeting, `EHLO`, and `STARTTLS` when the
/// MX offers it. The stream is ready for the handshake, or `None` without STARTTLS.
async fn starttls(candidate: &Candidate) -> Option<TcpStream> {
    let tcp = TcpStream::connect(candidate.addrs[0]).await.unwrap();
    let mut smtp = BufReader::new(tcp);
    assert_eq!(read_reply(&mut smtp).await.0, 220);
    let (code, ehlo) = command(&mut smtp, "EHLO client.mailmoat.test").await;
    assert_eq!(code, 250, "{ehlo:?}");
    if !ehlo
        .iter()
        .any(|line| line.eq_ignore_ascii_case("STARTTLS"))
    {
        assert_eq!(command(&mut smtp, "QUIT").await.0, 221);
        return None;
    }
    let (code, text) = command(&mut smtp, "STARTTLS").await;
    assert_eq!(code, 220, "{text:?}");
    // RFC 3207 §4.2: nothing may follow the 220 before the handshake.
    assert!(smtp.buffer().is_empty());
    Some(smtp.into_inner())
}

/// STARTTLS with the candidate's first address and a handshake with the client
/// `mx_tls` makes for its requirement; on success, `EHLO` and `QUIT` inside TLS.
async fn handshake(
    candidate: &Candidate,
    roots: Arc<RootCertStore>,
) -> (Result<TlsReport, std::io::Error>, Verdict) {
    let exchange = async {
        let tcp = starttls(candidate).await.expect("the MX offers STARTTLS");
        let client = mx_tls::client_config(
            &candidate.requirement,
            &candidate.host,
            roots,
            mailmoat::tls::provider(),
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(client.config);
        let tls = match connector.connect(client.server_name, tcp).await {
            Ok(tls) => tls,
            Err(err) => return (Err(err), client.verdict),
        };
        let report = TlsReport::read(tls.get_ref().1, &client.verdict).unwrap();
        let mut smtp = BufReader::new(tls);
        let (code, ehlo) = command(&mut smtp, "EHLO client.mailmoat.test").await;
        assert_eq!(code, 250, "{ehlo:?}");
        assert!(!ehlo.iter().any(|line| line == "STARTTLS"), "{ehlo:?}");
        assert_eq!(command(&mut smtp, "QUIT").await.0, 221);
        (Ok(report), client.verdict)
    };
    timeout(LIMIT, exchange)
        .await
        .expect("the SMTP exchange took too long")
}

/// A handshake that must succeed: its report.
async fn handshake_ok(candidate: &Candidate, roots: Arc<RootCertStore>) -> TlsReport {
    let (result, verdict) = handshake(candidate, roots).await;
    let report = result.unwrap_or_else(|err| {
        panic!(
            "{}: {err} ({:?})",
            candidate.host,
            verdict.failure().map(|f| f.detail)
        )
    });
    assert!(
        [
            rustls::ProtocolVersion::TLSv1_3,
            rustls::ProtocolVersion::TLSv1_2
        ]
        .contains(&report.version),
        "{report:?}"
    );
    report
}

/// A handshake that must fail on the certificate: the RFC 8460 result type.
async fn handshake_refused(candidate: &Candidate, roots: Arc<RootCertStore>) -> &'static str {
    let (result, verdict) = handshake(candidate, roots).await;
    let err = result.expect_err(&candidate.host);
    let failure = verdict
        .failure()
        .unwrap_or_else(|| panic!("{}: {err}, no failure recorded", candidate.host));
    failure.result_type
}

#[tokio::test]
async fn dane_domains_get_their_tlsa_records_for_each_mx() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, cache) = settings(lab, Floor::Opportunistic, &roots);
    let dane = |base: &str| format!("dane {base} (1 usable)");
    for (name, expected) in [
        (
            "dane.test",
            vec![
                row(
                    "mx1.dane.test",
                    10,
                    lab.mx("MX1"),
                    &dane("mx1.dane.test"),
                    Policy::Dane,
                ),
                row(
                    "mx2.dane.test",
                    20,
                    lab.mx("MX2"),
                    &dane("mx2.dane.test"),
                    Policy::Dane,
                ),
            ],
        ),
        (
            "ta.dane.test",
            vec![row(
                "mx2.dane.test",
                10,
                lab.mx("MX2"),
                &dane("mx2.dane.test"),
                Policy::Dane,
            )],
        ),
        (
            "badtlsa.dane.test",
            vec![row(
                "mx3.dane.test",
                10,
                lab.mx("MX3"),
                &dane("mx3.dane.test"),
                Policy::Dane,
            )],
        ),
        (
            "fallback.dane.test",
            vec![
                row(
                    "mx3.dane.test",
                    10,
                    lab.mx("MX3"),
                    &dane("mx3.dane.test"),
                    Policy::Dane,
                ),
                row(
                    "mx1.dane.test",
                    20,
                    lab.mx("MX1"),
                    &dane("mx1.dane.test"),
                    Policy::Dane,
                ),
            ],
        ),
    ] {
        let plan = plan_for(lab, &settings, name).await.unwrap();
        assert!(plan.mx_secure, "{name}");
        assert_eq!(summary(&plan), expected, "{name}: {:?}", plan.notes);
        assert_eq!(plan.mta_sts_fetch_failure, None);
    }
    // Every host had DANE: MTA-STS was not consulted, and nothing was cached.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_dane_handshake_succeeds_on_matching_records_and_fails_on_the_wrong_one() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    // DANE-EE (3 1 1) on mx1, DANE-TA (2 0 1) on mx2.
    for name in ["dane.test", "ta.dane.test"] {
        let plan = plan_for(lab, &settings, name).await.unwrap();
        for candidate in &plan.candidates {
            let report = handshake_ok(candidate, Arc::clone(&roots)).await;
            assert!(report.verified, "{}: {report:?}", candidate.host);
            assert_eq!(report.failure_result_type, None);
        }
    }
    // mx3's record names a key it does not have.
    let plan = plan_for(lab, &settings, "badtlsa.dane.test").await.unwrap();
    let (result, verdict) = handshake(&plan.candidates[0], Arc::clone(&roots)).await;
    let err = result.unwrap_err();
    let dane_failure = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|rustls_error| match rustls_error {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<dane::Failure>().cloned()
            }
            _ => None,
        });
    assert_eq!(dane_failure, Some(dane::Failure::NoMatch), "{err}");
    assert_eq!(verdict.failure().unwrap().result_type, "tlsa-invalid");
    assert!(!verdict.verified());
    // Its fallback MX is mx1, whose record matches.
    let plan = plan_for(lab, &settings, "fallback.dane.test")
        .await
        .unwrap();
    assert_eq!(
        handshake_refused(&plan.candidates[0], Arc::clone(&roots)).await,
        "tlsa-invalid"
    );
    assert!(handshake_ok(&plan.candidates[1], roots).await.verified);
}

#[tokio::test]
async fn a_dane_mx_without_starttls_still_requires_tls() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "notls.dane.test").await.unwrap();
    assert_eq!(
        summary(&plan),
        [row(
            "mx-notls.dane.test",
            10,
            lab.mx("MX_NOTLS"),
            "dane mx-notls.dane.test (1 usable)",
            Policy::Dane
        )]
    );
    let candidate = &plan.candidates[0];
    assert!(candidate.requirement.tls_required());
    assert!(starttls(candidate).await.is_none(), "no STARTTLS offered");
}

#[tokio::test]
async fn a_domain_that_is_a_cname_is_its_own_implicit_mx_with_the_expansions_tlsa() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "alias.dane.test").await.unwrap();
    assert!(plan.mx_secure);
    // RFC 5321 §5.1: no MX, the domain itself at preference 0; RFC 7672 §2.2.2: the
    // TLSA records at the secure CNAME expansion, which is also the SNI.
    assert_eq!(
        summary(&plan),
        [row(
            "alias.dane.test",
            0,
            lab.mx("MX1"),
            "dane mx1.dane.test (1 usable)",
            Policy::Dane
        )]
    );
    let report = handshake_ok(&plan.candidates[0], roots).await;
    assert!(report.verified);
}

#[tokio::test]
async fn a_bogus_domain_defers() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Verify, &roots);
    let failure = plan_for(lab, &settings, "bogus.test").await.unwrap_err();
    // 4.4.3, not 4.7.5: the MX set itself is unknown, as for any DNS failure; the
    // result type says that DNSSEC is why.
    assert!(reply_of(&failure).starts_with("451 4.4.3 "), "{failure:?}");
    assert_eq!(failure.result_type, Some("dnssec-invalid"));
    assert!(
        failure.detail.contains("DNSSEC Bogus"),
        "{}",
        failure.detail
    );
}

#[tokio::test]
async fn a_domain_that_does_not_exist_bounces() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    // Authenticated and unsigned denials alike.
    for name in ["nonexistent.dane.test", "nonexistent.plain.test"] {
        let failure = plan_for(lab, &settings, name).await.unwrap_err();
        assert!(
            reply_of(&failure).starts_with("550 5.1.2 "),
            "{name}: {failure:?}"
        );
        assert_eq!(failure.result_type, None);
    }
}

#[tokio::test]
async fn an_unsigned_domain_without_mta_sts_gets_the_floor() {
    let lab = lab!();
    let roots = roots(lab);
    let (mut settings, cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "plain.test").await.unwrap();
    assert!(!plan.mx_secure);
    let opportunistic = Policy::Floor(Floor::Opportunistic);
    assert_eq!(
        summary(&plan),
        [row(
            "mx.plain.test",
            10,
            lab.mx("MX1"),
            "opportunistic",
            opportunistic
        )]
    );
    assert_eq!(plan.mta_sts_fetch_failure, None);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    // Any certificate is taken; this one happens to be valid, and that is recorded.
    let report = handshake_ok(&plan.candidates[0], Arc::clone(&roots)).await;
    assert!(report.verified);

    // The domain's own floor.
    settings
        .per_domain
        .insert("plain.test".into(), Floor::Verify);
    let plan = plan_for(lab, &settings, "plain.test").await.unwrap();
    assert_eq!(
        summary(&plan),
        [row(
            "mx.plain.test",
            10,
            lab.mx("MX1"),
            "pkix enforce mx.plain.test",
            Policy::Floor(Floor::Verify)
        )]
    );
    assert!(
        handshake_ok(&plan.candidates[0], Arc::clone(&roots))
            .await
            .verified
    );

    // encrypt: a certificate for another name is taken, and the mismatch recorded.
    settings.floor = Floor::Encrypt;
    let plan = plan_for(lab, &settings, "wrongname.plain.test")
        .await
        .unwrap();
    assert_eq!(describe(&plan.candidates[0].requirement), "encrypt");
    let report = handshake_ok(&plan.candidates[0], roots).await;
    assert!(!report.verified);
    assert_eq!(
        report.failure_result_type,
        Some("certificate-host-mismatch")
    );
}

#[tokio::test]
async fn mta_sts_enforce_is_fetched_cached_and_applied() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "sts.test").await.unwrap();
    // Secure, but with an authenticated "no TLSA" for mx.sts.test: MTA-STS applies.
    assert!(plan.mx_secure);
    assert_eq!(
        summary(&plan),
        [row(
            "mx.sts.test",
            10,
            lab.mx("MX1"),
            "pkix enforce mx.sts.test",
            Policy::MtaSts {
                mode: Mode::Enforce
            }
        )]
    );
    assert_eq!(plan.mta_sts_fetch_failure, None, "{:?}", plan.notes);
    let report = handshake_ok(&plan.candidates[0], Arc::clone(&roots)).await;
    assert!(report.verified);

    // The policy is in the cache, under the TXT record's id.
    let store = Store::open(cache.path()).unwrap();
    let sts = PolicyDomain::parse("sts.test").unwrap();
    let cached = store.read(&sts).unwrap().expect("the policy is cached");
    assert_eq!(cached.id.as_str(), lab.var("LAB_STS_ID"));
    assert_eq!(cached.policy.mode, Mode::Enforce);
    assert!(cached.policy.allows_mx("mx.sts.test"));
    assert!(!cached.policy.allows_mx("mx.plain.test"));

    // The next plan applies the cached policy without fetching: one naming another MX
    // host under the same id rules mx.sts.test out.
    let mut other = cached.clone();
    other.policy = mailmoat::outbound::mta_sts::Policy::parse(
        b"version: STSv1\nmode: enforce\nmx: mx.other.test\nmax_age: 86400\n",
    )
    .unwrap();
    other.fetched_at = SystemTime::now();
    store.save(&sts, &other).unwrap();
    let failure = plan_for(lab, &settings, "sts.test").await.unwrap_err();
    assert!(reply_of(&failure).starts_with("451 4.7.5 "), "{failure:?}");
    assert_eq!(failure.result_type, Some("validation-failure"));

    // A new id in the TXT record would fetch again: a cached entry of another id is
    // replaced by the live policy.
    other.id = PolicyId::parse("outdated").unwrap();
    store.save(&sts, &other).unwrap();
    let plan = plan_for(lab, &settings, "sts.test").await.unwrap();
    assert_eq!(plan.candidates.len(), 1);
    let refreshed: Cached = store.read(&sts).unwrap().unwrap();
    assert_eq!(refreshed.id.as_str(), lab.var("LAB_STS_ID"));
    assert!(refreshed.policy.allows_mx("mx.sts.test"));
}

#[tokio::test]
async fn mta_sts_enforce_with_no_listed_mx_defers() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    let failure = plan_for(lab, &settings, "unlisted.sts.test")
        .await
        .unwrap_err();
    assert!(reply_of(&failure).starts_with("451 4.7.5 "), "{failure:?}");
    assert_eq!(failure.result_type, Some("validation-failure"));
    assert!(
        failure.detail.contains("mx.plain.test"),
        "{}",
        failure.detail
    );
}

#[tokio::test]
async fn mta_sts_enforce_refuses_a_certificate_for_another_name() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "badcert.sts.test").await.unwrap();
    let enforce = Policy::MtaSts {
        mode: Mode::Enforce,
    };
    assert_eq!(
        summary(&plan),
        [row(
            "mx-wrongname.sts.test",
            10,
            lab.mx("MX_WRONGNAME"),
            "pkix enforce mx-wrongname.sts.test",
            enforce
        )]
    );
    assert_eq!(
        handshake_refused(&plan.candidates[0], roots).await,
        "certificate-host-mismatch"
    );
}

#[tokio::test]
async fn mta_sts_testing_delivers_and_records_the_failure() {
    let lab = lab!();
    let roots = roots(lab);
    let (settings, _cache) = settings(lab, Floor::Opportunistic, &roots);
    let plan = plan_for(lab, &settings, "testing.sts.test").await.unwrap();
    let testing = Policy::MtaSts {
        mode: Mode::Testing,
    };
    assert_eq!(
        summary(&plan),
        [row(
            "mx-wrongname.sts.test",
            10,
            lab.mx("MX_WRONGNAME"),
            "pkix record mx-wrongname.sts.test",
            testing
        )]
    );
    assert!(!plan.candidates[0].requirement.tls_required());
    let report = handshake_ok(&plan.candidates[0], roots).await;
    assert!(!report.verified);
    assert_eq!(
        report.failure_result_type,
        Some("certificate-host-mismatch")
    );
}

#[tokio::test]
async fn a_failed_policy_fetch_without_a_cache_is_no_policy() {
    let lab = lab!();
    // The fetcher trusts the system's CAs only, not the lab's: the policy host's
    // certificate fails (RFC 8461 §3.3), and the domain is treated as having no policy.
    let system = Path::new(mx_tls::SYSTEM_CA_BUNDLE);
    let system_only = mx_tls::trust_anchors(Some(system), None).unwrap();
    let (settings, cache) = settings(lab, Floor::Opportunistic, &system_only);
    let plan = plan_for(lab, &settings, "sts.test").await.unwrap();
    assert_eq!(plan.mta_sts_fetch_failure, Some("sts-webpki-invalid"));
    let opportunistic = Policy::Floor(Floor::Opportunistic);
    assert_eq!(
        summary(&plan),
        [row(
            "mx.sts.test",
            10,
            lab.mx("MX1"),
            "opportunistic",
            opportunistic
        )]
    );
    assert!(
        plan.notes.iter().any(|n| n.contains("fetch")),
        "{:?}",
        plan.notes
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}
