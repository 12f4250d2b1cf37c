//! `mailmoat explain --domain` (issue 15) against the outbound lab: the real binary with
//! an `outbound` section pointing at the lab's validating resolver, the lab CA as extra
//! trust anchor and a cache directory of its own. Each test asserts the key lines of the
//! output: the MX set and its DNSSEC status, the TLSA records, the MTA-STS policy, the
//! policy the relay applies, the probe's TLS and verdict, and the exit code. The probes
//! never send MAIL: the lab MXes log every session's commands, and none has a `mail=`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::outbound_lab::Lab;
use common::{config_file, free_port, listener, poll_for};

/// What one run printed, cut into sections.
#[derive(Debug)]
struct Explained {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Explained {
    /// The content lines of the section titled `title` (without the indentation).
    fn section(&self, title: &str) -> Vec<&str> {
        let heading = format!("  {title}:");
        let mut lines = self.stdout.lines().skip_while(|line| *line != heading);
        assert!(
            lines.next().is_some(),
            "no section {title:?} in\n{}",
            self.stdout
        );
        lines.map_while(|line| line.strip_prefix("    ")).collect()
    }

    /// Asserts that the section `title` has the line `expected`.
    fn has(&self, title: &str, expected: &str) {
        assert!(
            self.section(title).contains(&expected),
            "no line {expected:?} in section {title:?} of\n{}",
            self.stdout
        );
    }

    /// The section's line that starts with `prefix`.
    fn starting(&self, title: &str, prefix: &str) -> String {
        self.section(title)
            .into_iter()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no line starting {prefix:?} in section {title:?} of\n{}",
                    self.stdout
                )
            })
            .to_owned()
    }

    /// The last line, `  result: ...`.
    fn result(&self) -> &str {
        let last = self.stdout.lines().last().unwrap_or_default();
        last.strip_prefix("  result: ")
            .unwrap_or_else(|| panic!("no final result line in\n{}", self.stdout))
    }
}

/// A configuration whose `outbound` section uses the lab, its MTA-STS cache in `cache`.
fn lab_config(dir: &Path, lab: &Lab, cache: &Path) -> std::path::PathBuf {
    let outbound = format!(
        "outbound:\n  listen: \"127.0.0.1:{}\"\n  hostname: relay.example.test\n  \
         resolver: \"{}\"\n  extra_ca_file: {}\n  mta_sts_cache_dir: {}\n",
        free_port(),
        lab.resolver,
        lab.ca.display(),
        cache.display()
    );
    // One inbound listener, as every configuration has; explain binds nothing.
    let inbound = listener("mx", "smtp", "starttls", "require_tls", "127.0.0.1:9");
    config_file(dir, &[inbound], &outbound)
}

fn run(config: &Path, domain: &str) -> Explained {
    let ran = common::run_bounded(
        Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(["explain", "-c"])
            .arg(config)
            .args(["--domain", domain]),
        Duration::from_secs(180),
    );
    Explained {
        code: ran.code,
        stdout: ran.stdout,
        stderr: ran.stderr,
    }
}

/// Explains `domain` with a fresh, empty cache directory, returned with the output.
fn explain(lab: &Lab, domain: &str) -> (Explained, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("mta-sts");
    std::fs::create_dir(&cache).unwrap();
    let explained = run(&lab_config(dir.path(), lab, &cache), domain);
    (explained, dir)
}

fn probe_title(lab: &Lab, host: &str, mx: &str, policy: &str) -> String {
    format!("probe {host} [{}]:25 ({policy})", lab.ip(mx))
}

#[test]
fn dane_test_is_secure_with_its_tlsa_records_and_verified_over_tls_1_3() {
    let Some(lab) = Lab::shared() else { return };
    let (out, _dir) = explain(lab, "dane.test");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.has("MX", "answer: secure (DNSSEC, the resolver's AD bit)");
    out.has(
        "MX",
        &format!("10 mx1.dane.test: {} (secure)", lab.ip("MX1")),
    );
    out.has(
        "MX",
        &format!("20 mx2.dane.test: {} (secure)", lab.ip("MX2")),
    );
    let tlsa_mx1 = lab.var("LAB_TLSA_MX1");
    assert!(tlsa_mx1.starts_with("3 1 1 "), "{tlsa_mx1}");
    out.has(
        "TLSA",
        &format!("_25._tcp.mx1.dane.test (secure): {tlsa_mx1}"),
    );
    out.has(
        "TLSA",
        &format!(
            "_25._tcp.mx2.dane.test (secure): {}",
            lab.var("LAB_TLSA_MX2")
        ),
    );
    out.has(
        "MTA-STS",
        "TXT _mta-sts.dane.test: none (authenticated denial)",
    );
    let policy = "policy (what mailmoat applies)";
    out.has(policy, "floor: opportunistic");
    out.has(
        policy,
        "mx1.dane.test: policy dane, TLS required, certificate checked against 1 usable \
         TLSA record(s) of _25._tcp.mx1.dane.test (SNI that name)",
    );
    let probe = probe_title(lab, "mx1.dane.test", "MX1", "dane");
    out.has(&probe, "C: EHLO relay.example.test");
    out.has(&probe, "C: STARTTLS");
    out.has(&probe, "SNI: mx1.dane.test");
    assert!(
        out.starting(&probe, "TLS: ")
            .starts_with("TLS: TLSv1.3, TLS13_"),
        "{}",
        out.stdout
    );
    out.has(&probe, "certificate subject: CN=mx1.dane.test");
    // The certificate's key digest is the TLSA record's data.
    let digest = tlsa_mx1.trim_start_matches("3 1 1 ");
    out.has(&probe, &format!("certificate key as TLSA 3 1 1: {digest}"));
    out.has(&probe, "verdict: verified (DANE)");
    out.has(&probe, "C: QUIT");
    out.has(
        &probe,
        "result: would take the mail (dane, TLSv1.3, verified)",
    );
    out.has(
        &probe_title(lab, "mx2.dane.test", "MX2", "dane"),
        "verdict: verified (DANE)",
    );
    assert_eq!(
        out.result(),
        format!(
            "mx1.dane.test [{}] would take the mail (2 of 2 probed addresses would)",
            lab.ip("MX1")
        )
    );
    assert!(
        !out.stdout.contains("MAIL FROM"),
        "a probe sent MAIL:\n{}",
        out.stdout
    );
}

#[test]
fn a_tlsa_mismatch_fails_the_probe_with_tlsa_invalid_and_exit_1() {
    let Some(lab) = Lab::shared() else { return };
    let (out, _dir) = explain(lab, "badtlsa.dane.test");
    assert_eq!(out.code, Some(1), "{out:?}");
    out.has(
        "policy (what mailmoat applies)",
        "mx3.dane.test: policy dane, TLS required, certificate checked against 1 usable \
         TLSA record(s) of _25._tcp.mx3.dane.test (SNI that name)",
    );
    let probe = probe_title(lab, "mx3.dane.test", "MX3", "dane");
    out.has(
        &probe,
        "verdict: failed (DANE): tlsa-invalid: no usable TLSA record matches the server's \
         certificate chain",
    );
    assert!(
        out.starting(&probe, "result: ")
            .starts_with("result: would not take the mail: tlsa-invalid: "),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.result(),
        "no MX would take the mail (every address probed: 1); the legacy MTA gets: 451 \
         4.7.5 The recipient domain's mail servers failed its TLS policy"
    );
}

#[test]
fn sts_test_shows_its_enforce_policy_fetched_live_and_leaves_the_cache_empty() {
    let Some(lab) = Lab::shared() else { return };
    let (out, dir) = explain(lab, "sts.test");
    assert_eq!(out.code, Some(0), "{out:?}");
    let id = lab.var("LAB_STS_ID");
    out.has(
        "MTA-STS",
        &format!("TXT _mta-sts.sts.test (secure): \"v=STSv1; id={id}\" -> id {id}"),
    );
    out.has(
        "MTA-STS",
        &format!(
            "policy: mode enforce, mx mx.sts.test, max_age 86400s, id {id} (fetched now from \
             https://mta-sts.sts.test/.well-known/mta-sts.txt; not written to the cache)"
        ),
    );
    out.has(
        "policy (what mailmoat applies)",
        "mx.sts.test: policy mta-sts enforce, TLS required, certificate PKIX-valid for \
         mx.sts.test",
    );
    let probe = probe_title(lab, "mx.sts.test", "MX1", "mta-sts enforce");
    out.has(&probe, "verdict: verified (PKIX for mx.sts.test)");
    assert!(
        out.starting(&probe, "result: ")
            .starts_with("result: would take the mail (mta-sts enforce, TLSv1."),
        "{}",
        out.stdout
    );
    let cache = dir.path().join("mta-sts");
    let left: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert!(left.is_empty(), "explain wrote to the cache: {left:?}");
}

#[test]
fn a_cached_policy_is_applied_from_the_cache_and_left_as_it_was() {
    let Some(lab) = Lab::shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("mta-sts");
    std::fs::create_dir(&cache).unwrap();
    let id = lab.var("LAB_STS_ID");
    let fetched_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The store's file format (src/outbound/mta_sts/store.rs), under the TXT record's id.
    let entry = serde_json::json!({
        "format": 1,
        "domain": "sts.test",
        "id": id,
        "fetched_at": fetched_at,
        "policy": "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 604800\r\n",
    });
    let file = cache.join("sts.test.json");
    std::fs::write(&file, entry.to_string()).unwrap();
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let out = run(&lab_config(dir.path(), lab, &cache), "sts.test");
    assert_eq!(out.code, Some(0), "{out:?}");
    let line = out.starting("MTA-STS", "policy: ");
    assert!(
        line.starts_with(&format!(
            "policy: mode enforce, mx mx.sts.test, max_age 604800s, id {id} (from the cache, \
             fetched "
        )),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), entry.to_string());
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}

#[test]
fn plain_test_is_insecure_and_gets_the_opportunistic_floor() {
    let Some(lab) = Lab::shared() else { return };
    let (out, _dir) = explain(lab, "plain.test");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.has("MX", "answer: insecure (no AD bit: DANE does not apply)");
    out.has(
        "MX",
        &format!("10 mx.plain.test: {} (insecure)", lab.ip("MX1")),
    );
    let tlsa = out.starting("TLSA", "_25._tcp.mx.plain.test: ");
    assert!(
        tlsa.starts_with("_25._tcp.mx.plain.test: none (") && tlsa.ends_with(", insecure)"),
        "{tlsa}"
    );
    out.has("MTA-STS", "policy: none applies");
    out.has(
        "policy (what mailmoat applies)",
        "mx.plain.test: policy opportunistic, TLS if offered, any certificate; plaintext if \
         STARTTLS is not offered",
    );
    let probe = probe_title(lab, "mx.plain.test", "MX1", "opportunistic");
    out.has(&probe, "verdict: verified (PKIX, not required)");
    assert!(
        out.starting(&probe, "result: ")
            .starts_with("result: would take the mail (opportunistic, TLSv1."),
        "{}",
        out.stdout
    );
}

#[test]
fn bogus_dnssec_is_the_451_4_4_3_the_legacy_mta_would_get() {
    let Some(lab) = Lab::shared() else { return };
    let (out, _dir) = explain(lab, "bogus.test");
    assert_eq!(out.code, Some(1), "{out:?}");
    let mx = out.starting("MX", "lookup failed: ");
    assert!(mx.contains("SERVFAIL"), "{mx}");
    let policy = "policy (what mailmoat applies)";
    out.has(policy, "RFC 8460 result type: dnssec-invalid");
    out.has(
        policy,
        "the legacy MTA gets: 451 4.4.3 Temporary DNS failure looking up the recipient \
         domain's mail servers",
    );
    assert_eq!(
        out.result(),
        "no MX would take the mail: the plan found no MX host to try"
    );
    assert!(!out.stdout.contains("  probe "), "{}", out.stdout);
}

#[test]
fn the_probes_never_send_mail() {
    let Some(lab) = Lab::shared() else { return };
    let (out, _dir) = explain(lab, "fallback.dane.test");
    assert_eq!(out.code, Some(0), "{out:?}");
    let log_path = lab.var("LAB_MX_LOG");
    // Postfix logs each session's commands when it ends: `disconnect from ... ehlo=2
    // starttls=1 quit=1 commands=4`. Every session of this binary is a probe.
    let log = poll_for(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(log_path).ok()?;
        log.lines()
            .any(|line| line.contains("disconnect from") && line.contains("starttls=1"))
            .then_some(log)
    })
    .unwrap_or_else(|| panic!("no probe session in {log_path}"));
    let sessions: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("disconnect from"))
        .collect();
    assert!(
        sessions.iter().all(|line| !line.contains(" mail=")),
        "a probe sent MAIL: {sessions:#?}"
    );
    assert!(!log.contains("from=<"), "a message reached an MX:\n{log}");
    for mx in ["MX1", "MX2", "MX3"] {
        for sub in ["new", "cur"] {
            let dir = lab.maildir(mx).join(sub);
            let count = std::fs::read_dir(&dir).map_or(0, Iterator::count);
            assert_eq!(count, 0, "a message in {}", dir.display());
        }
    }
}

#[test]
fn without_an_outbound_section_or_with_a_bad_domain_it_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let inbound = listener("mx", "smtp", "starttls", "require_tls", "127.0.0.1:9");
    let config = config_file(dir.path(), &[inbound], "");
    let out = run(&config, "dane.test");
    assert_eq!(out.code, Some(64), "{out:?}");
    assert!(out.stderr.contains("no `outbound` section"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");

    let outbound = format!(
        "outbound:\n  listen: \"127.0.0.1:{}\"\n  hostname: relay.example.test\n  \
         resolver: \"127.0.0.1:53\"\n",
        free_port()
    );
    let inbound = listener("mx", "smtp", "starttls", "require_tls", "127.0.0.1:9");
    let config = config_file(dir.path(), &[inbound], &outbound);
    let out = run(&config, "not a domain");
    assert_eq!(out.code, Some(64), "{out:?}");
    assert!(out.stderr.contains("is not a domain"), "{out:?}");
}
