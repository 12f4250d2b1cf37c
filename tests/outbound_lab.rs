//! The outbound relay's lab (`scripts/outbound-lab.sh`, issue 15) and `outbound::dns`
//! through its validating resolver: what the relay's end-to-end tests will stand on.
//! DNSSEC status as the resolver's AD bit reports it, TLSA records that are the lab
//! certificates' own digests, the MXes' STARTTLS (or its absence) and certificates, the
//! MTA-STS policy host, a delivery that records its TLS, and the legacy sender's queue
//! waiting for a relayhost that is not there yet.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::outbound_lab::{LAB_SCRIPT_LIMIT, Lab, lab_command};
use mailmoat::outbound::dns::{Error, Mx, Outcome, Resolver, Tlsa};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The shared lab, or return: the tests skip (outside CI) when its packages are missing.
macro_rules! lab {
    () => {
        match Lab::shared() {
            Some(lab) => lab,
            None => return,
        }
    };
}

fn resolver(lab: &Lab) -> Resolver {
    Resolver::new(lab.resolver)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// The first certificate in a PEM file (the leaf of a chain).
fn certificate(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

/// A TLSA record as lab.env writes it: "3 1 1 <hex>".
fn presented(tlsa: &Tlsa) -> String {
    format!(
        "{} {} {} {}",
        tlsa.usage,
        tlsa.selector,
        tlsa.matching,
        hex(&tlsa.data)
    )
}

#[tokio::test]
async fn the_mx_set_of_a_signed_domain_is_secure() {
    let lab = lab!();
    let answer = resolver(lab).lookup_mx("dane.test").await.unwrap();
    assert!(answer.secure, "{answer:?}");
    assert_eq!(answer.name, "dane.test");
    let mut mxes = answer.found().unwrap().clone();
    mxes.sort_by_key(|mx| mx.preference);
    let mx = |preference, exchange: &str| Mx {
        preference,
        exchange: exchange.into(),
    };
    assert_eq!(mxes, [mx(10, "mx1.dane.test"), mx(20, "mx2.dane.test")]);
}

#[tokio::test]
async fn tlsa_records_are_secure_and_are_the_lab_certificates_digests() {
    let lab = lab!();
    let certs = Path::new(lab.var("LAB_CERTS"));
    let resolver = resolver(lab);
    // Computed here from the certificates, independently of the script's openssl.
    let mx1 = certificate(&certs.join("mx1.pem"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&mx1).unwrap();
    let mx1_spki = hex(&sha256(parsed.tbs_certificate.subject_pki.raw));
    let ca = hex(&sha256(&certificate(&lab.ca)));
    for (host, env, expected) in [
        ("mx1.dane.test", "LAB_TLSA_MX1", format!("3 1 1 {mx1_spki}")),
        ("mx2.dane.test", "LAB_TLSA_MX2", format!("2 0 1 {ca}")),
    ] {
        let answer = resolver.lookup_tlsa(25, host).await.unwrap();
        assert!(answer.secure, "{host}: {answer:?}");
        assert_eq!(answer.name, format!("_25._tcp.{host}"));
        let records: Vec<String> = answer.found().unwrap().iter().map(presented).collect();
        assert_eq!(lab.var(env), expected, "{host}");
        assert_eq!(records, [expected], "{host}");
    }
    // mx3's record is the lab's deliberate mismatch: a key mx3 does not have.
    let answer = resolver.lookup_tlsa(25, "mx3.dane.test").await.unwrap();
    assert!(answer.secure);
    let records: Vec<String> = answer.found().unwrap().iter().map(presented).collect();
    assert_eq!(records, [lab.var("LAB_TLSA_MX3")]);
    let mx3 = certificate(&certs.join("mx3.pem"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&mx3).unwrap();
    let mx3_spki = hex(&sha256(parsed.tbs_certificate.subject_pki.raw));
    assert_ne!(records[0], format!("3 1 1 {mx3_spki}"));
}

#[tokio::test]
async fn an_unsigned_zone_answers_insecure() {
    let lab = lab!();
    let resolver = resolver(lab);
    let answer = resolver.lookup_mx("plain.test").await.unwrap();
    assert!(!answer.secure, "{answer:?}");
    let exchanges: Vec<&str> = answer
        .found()
        .unwrap()
        .iter()
        .map(|mx| mx.exchange.as_str())
        .collect();
    assert_eq!(exchanges, ["mx.plain.test"]);
    // Its denials are insecure too: no authenticated "no DANE".
    let answer = resolver.lookup_tlsa(25, "mx.plain.test").await.unwrap();
    assert_eq!((answer.secure, answer.outcome), (false, Outcome::NxDomain));
}

#[tokio::test]
async fn a_bogus_zone_is_a_servfail_error() {
    let lab = lab!();
    let resolver = resolver(lab);
    for name in ["bogus.test", "mx1.bogus.test"] {
        let error = resolver.lookup_mx(name).await.unwrap_err();
        let Error::ServFail { extended, .. } = &error else {
            panic!("{name}: {error}");
        };
        // unbound says why (ede: yes), with its reason once it has one (val-log-level 2).
        let extended = extended.as_deref().unwrap_or_default();
        assert!(extended.starts_with("DNSSEC Bogus (6)"), "{error}");
    }
    let error = resolver
        .lookup_tlsa(25, "mx1.bogus.test")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ServFail { .. }), "{error}");
}

#[tokio::test]
async fn denials_in_a_signed_zone_are_authenticated() {
    let lab = lab!();
    let resolver = resolver(lab);
    // No such name.
    let answer = resolver.lookup_mx("nonexistent.dane.test").await.unwrap();
    assert_eq!((answer.secure, &answer.outcome), (true, &Outcome::NxDomain));
    assert_eq!(answer.name, "nonexistent.dane.test");
    // No TLSA for an MTA-STS domain's MX: RFC 7672 §2.2's authenticated "no DANE".
    let answer = resolver.lookup_tlsa(25, "mx.sts.test").await.unwrap();
    assert_eq!((answer.secure, answer.outcome), (true, Outcome::NxDomain));
    // The name exists, the type does not.
    let answer = resolver.lookup_txt("mx1.dane.test").await.unwrap();
    assert_eq!((answer.secure, answer.outcome), (true, Outcome::NoData));
}

#[tokio::test]
async fn addresses_follow_a_cname_to_the_final_name() {
    let lab = lab!();
    let resolver = resolver(lab);
    let answer = resolver.lookup_ip("alias.dane.test").await.unwrap();
    assert!(answer.secure, "{answer:?}");
    assert_eq!(answer.name, "mx1.dane.test");
    assert_eq!(answer.found(), Some(&vec![lab.ip("MX1")]));
    let answer = resolver.lookup_ip("mx-wrongname.sts.test").await.unwrap();
    assert_eq!(answer.found(), Some(&vec![lab.ip("MX_WRONGNAME")]));
}

#[tokio::test]
async fn the_mta_sts_records_are_secure() {
    let lab = lab!();
    let resolver = resolver(lab);
    let expected = format!("v=STSv1; id={}", lab.var("LAB_STS_ID"));
    for domain in ["sts.test", "testing.sts.test"] {
        let answer = resolver
            .lookup_txt(&format!("_mta-sts.{domain}"))
            .await
            .unwrap();
        assert!(answer.secure, "{domain}: {answer:?}");
        assert_eq!(answer.found(), Some(&vec![expected.clone().into_bytes()]));
        let host = resolver
            .lookup_ip(&format!("mta-sts.{domain}"))
            .await
            .unwrap();
        let policy_host: std::net::SocketAddr = lab.var("LAB_STS_HOST").parse().unwrap();
        assert_eq!(host.found(), Some(&vec![policy_host.ip()]));
    }
}

/// `openssl s_client -starttls smtp` to `mx`, verifying against the lab CA for `name`.
fn starttls_probe(lab: &Lab, mx: &str, name: &str) -> common::Ran {
    common::run_bounded(
        Command::new("openssl")
            .args(["s_client", "-brief", "-starttls", "smtp", "-connect"])
            .arg(lab.mx(mx).to_string())
            .args(["-servername", name, "-verify_hostname", name])
            .arg("-CAfile")
            .arg(&lab.ca)
            .arg("-verify_return_error"),
        Duration::from_secs(60),
    )
}

#[test]
fn the_good_mx_offers_starttls_with_a_certificate_the_lab_ca_verifies() {
    let lab = lab!();
    for (mx, name) in [
        ("MX1", "mx1.dane.test"),
        ("MX1", "mx.sts.test"),
        ("MX2", "mx2.dane.test"),
    ] {
        let probe = starttls_probe(lab, mx, name);
        assert_eq!(probe.code, Some(0), "{mx} {name}: {}", probe.both());
        assert!(
            probe.stderr.contains("Verification: OK"),
            "{}",
            probe.both()
        );
        assert!(
            probe.stderr.contains(&format!("Verified peername: {name}")),
            "{}",
            probe.both()
        );
    }
}

#[test]
fn the_wrong_name_mx_has_a_certificate_for_another_name() {
    let lab = lab!();
    let probe = starttls_probe(lab, "MX_WRONGNAME", "mx-wrongname.sts.test");
    assert_ne!(probe.code, Some(0), "{}", probe.both());
    assert!(
        probe.both().contains("hostname mismatch"),
        "{}",
        probe.both()
    );
    // The chain itself is the lab CA's.
    let probe = starttls_probe(lab, "MX_WRONGNAME", "wrong-name.test");
    assert_eq!(probe.code, Some(0), "{}", probe.both());
}

#[test]
fn the_no_tls_mx_offers_no_starttls() {
    let lab = lab!();
    let (code, stdout, stderr) = common::run_program(
        "swaks",
        &[
            "--server",
            &lab.mx("MX_NOTLS").to_string(),
            "--quit-after",
            "EHLO",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let ehlo: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("<-  250"))
        .collect();
    assert!(!ehlo.is_empty(), "{stdout}");
    assert!(!stdout.contains("STARTTLS"), "{stdout}");
    // The good one's EHLO, for contrast.
    let (_, good, _) = common::run_program(
        "swaks",
        &[
            "--server",
            &lab.mx("MX1").to_string(),
            "--quit-after",
            "EHLO",
        ],
    );
    assert!(good.contains("250-STARTTLS"), "{good}");
}

#[test]
fn the_policy_host_serves_mta_sts_policies_as_text_plain() {
    let lab = lab!();
    let policy_host: std::net::SocketAddr = lab.var("LAB_STS_HOST").parse().unwrap();
    for (domain, mode, mx) in [
        ("sts.test", "enforce", "mx.sts.test"),
        ("testing.sts.test", "testing", "mx-wrongname.sts.test"),
    ] {
        let host = format!("mta-sts.{domain}");
        let (code, stdout, stderr) = common::run_program(
            "curl",
            &[
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                "20",
                "--cacert",
                lab.ca.to_str().unwrap(),
                "--resolve",
                &format!("{host}:443:{}", policy_host.ip()),
                "--write-out",
                "\ncontent-type: %{content_type}",
                &format!("https://{host}/.well-known/mta-sts.txt"),
            ],
        );
        assert_eq!(code, 0, "{domain}: {stdout}{stderr}");
        assert!(
            stdout.ends_with("\ncontent-type: text/plain"),
            "{domain}: {stdout}"
        );
        for line in [
            "version: STSv1\r\n".to_owned(),
            format!("mode: {mode}\r\n"),
            format!("mx: {mx}\r\n"),
        ] {
            assert!(stdout.contains(&line), "{domain}: {stdout}");
        }
    }
}

#[test]
fn mail_through_the_good_mx_arrives_with_a_tls_received_header() {
    let lab = lab!();
    let tag = common::unique("lab-delivery");
    let (code, stdout, stderr) = common::run_program(
        "swaks",
        &[
            "--server",
            &lab.mx("MX1").to_string(),
            "--tls",
            "--from",
            "sender@legacy.example",
            "--to",
            "someone@dane.test",
            "--header",
            &format!("Subject: {tag}"),
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let message = lab.wait_for_delivery("MX1", &tag);
    assert!(
        message.contains("X-Original-To: someone@dane.test"),
        "{message}"
    );
    assert!(message.contains("(using TLSv1."), "{message}");
    assert!(
        message.contains("by mx1.dane.test (Postfix) with ESMTPS"),
        "{message}"
    );
}

#[test]
fn the_legacy_sender_defers_mail_for_its_absent_relayhost() {
    let lab = lab!();
    assert_eq!(
        lab.var("LAB_RELAYHOST"),
        format!("[127.0.0.1]:{}", lab.relay_port)
    );
    let by_sendmail = format!("{}@dane.test", common::unique("sendmail"));
    lab.sendmail(
        &["-f", "legacy@legacy.example", &by_sendmail],
        "Subject: to the relayhost\n\nhello\n",
    );
    let by_smtp = format!("{}@plain.test", common::unique("smtp"));
    let (code, stdout, stderr) = common::run_program(
        "swaks",
        &[
            "--server",
            lab.var("LAB_SENDER_SMTP"),
            "--from",
            "legacy@legacy.example",
            "--to",
            &by_smtp,
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("STARTTLS"), "a legacy sender: {stdout}");

    let refused = format!("127.0.0.1[127.0.0.1]:{}", lab.relay_port);
    for recipient in [by_sendmail, by_smtp] {
        let deferred = common::poll_for(Duration::from_secs(60), || {
            lab.sender_queue().into_iter().find(|message| {
                message["queue_name"] == "deferred"
                    && message["recipients"][0]["address"] == recipient.as_str()
            })
        })
        .unwrap_or_else(|| panic!("{recipient} not deferred: {:?}", lab.sender_queue()));
        let reason = deferred["recipients"][0]["delay_reason"].as_str().unwrap();
        assert!(reason.contains(&refused), "{reason}");
    }
}

/// Live processes of the lab in `dir`: those naming it on their command line, Postfix's
/// (by MAIL_CONFIG), and those holding a file under it open (nginx's workers, whose
/// command line names nothing).
fn lab_processes(dir: &Path) -> Vec<(u32, String)> {
    let configs = [
        format!("MAIL_CONFIG={}", dir.join("mx/postfix").display()),
        format!("MAIL_CONFIG={}", dir.join("sender/postfix").display()),
    ];
    let holds_a_file = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir)))
    };
    let dir_text = dir.display().to_string();
    common::processes()
        .into_iter()
        .filter(|process| process.state() != "Z")
        .filter(|process| {
            process.cmdline().contains(&dir_text)
                || configs.iter().any(|c| process.started_with(c))
                || holds_a_file(process.pid)
        })
        .map(|process| (process.pid, process.cmdline()))
        .collect()
}

#[test]
fn a_restart_replaces_every_process_and_stop_leaves_none() {
    let Some(lab) = Lab::private() else {
        return;
    };
    let first = lab_processes(lab.dir());
    let names: String = first.iter().map(|(_, c)| format!("{c}\n")).collect();
    for daemon in [
        "knotd",
        "unbound",
        "nginx: master",
        "nginx: worker",
        "sbin/master",
    ] {
        assert!(names.contains(daemon), "no {daemon} among:\n{names}");
    }
    let restarted = common::run_bounded(
        lab_command("start", lab.dir())
            .arg("--watch")
            .arg(std::process::id().to_string())
            .env("OUTBOUND_LAB_NET", lab.var("LAB_NET"))
            .env("OUTBOUND_LAB_RELAY_PORT", lab.relay_port.to_string()),
        LAB_SCRIPT_LIMIT,
    );
    assert_eq!(restarted.code, Some(0), "{}", restarted.both());
    let first: HashSet<u32> = first.into_iter().map(|(pid, _)| pid).collect();
    let second = lab_processes(lab.dir());
    let survivors: Vec<_> = second
        .iter()
        .filter(|(pid, _)| first.contains(pid))
        .collect();
    assert!(survivors.is_empty(), "{survivors:?}");

    for _ in 0..2 {
        let stopped = common::run_bounded(&mut lab_command("stop", lab.dir()), LAB_SCRIPT_LIMIT);
        assert_eq!(stopped.code, Some(0), "{}", stopped.both());
        assert_eq!(lab_processes(lab.dir()), []);
    }
}
