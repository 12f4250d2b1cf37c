//! `mailmoat check` on the `outbound` section against the outbound lab
//! (`scripts/outbound-lab.sh`): a validating resolver passes, a server that answers
//! without validating (the lab's authoritative knot) is called out loudly, and the
//! static warnings (relaying for a wide network, MTA-STS off) name their lines.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::outbound_lab::Lab;
use common::{Ran, config_file, listener, run_bounded};

fn check(path: &Path) -> Ran {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .arg("check")
            .arg("-c")
            .arg(path),
        Duration::from_secs(120),
    )
}

/// A configuration whose one listener is in front of the project's real legacy Postfix
/// (not an open relay, so the listener's own probe passes), with `outbound` as given.
fn config(dir: &Path, outbound: &str) -> std::path::PathBuf {
    let upstream = common::legacy().smtp.to_string();
    let listeners = [listener("mx", "smtp", "starttls", "require_tls", &upstream)];
    config_file(dir, &listeners, &format!("outbound:\n{outbound}"))
}

#[test]
fn a_validating_resolver_passes_and_one_that_does_not_validate_is_called_out() {
    let Some(lab) = Lab::shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("mta-sts");
    let names = "  dnssec_check_signed: mx1.dane.test\n  dnssec_check_bogus: mx1.bogus.test\n";

    let good = config(
        dir.path(),
        &format!(
            "  listen: \"127.0.0.1:0\"\n  hostname: relay.example.test\n  resolver: \"{}\"\n  \
             mta_sts_cache_dir: {}\n{names}",
            lab.resolver,
            cache.display()
        ),
    );
    let checked = check(&good);
    assert_eq!(checked.code, Some(0), "{}", checked.both());
    let expected = format!(
        "ok: outbound.resolver: the resolver {} validates DNSSEC (mx1.dane.test \
         authenticated, mx1.bogus.test refused)",
        lab.resolver
    );
    assert!(
        checked.stdout.lines().any(|l| l == expected),
        "{}",
        checked.both()
    );
    assert!(!checked.stderr.contains("outbound"), "{}", checked.both());

    // The authoritative server answers for both names, never with the AD bit; relaying
    // for 10.0.0.0/8 and no MTA-STS cache are warned about at their lines.
    let knot = lab.var("LAB_AUTH_DNS");
    let bad = config(
        dir.path(),
        &format!(
            "  listen: \"127.0.0.1:0\"\n  hostname: relay.example.test\n  resolver: \"{knot}\"\n  \
             relay_networks: [127.0.0.0/8, 10.0.0.0/8]\n{names}"
        ),
    );
    let checked = check(&bad);
    assert_eq!(checked.code, Some(0), "warnings only: {}", checked.both());
    let origin = bad.display();
    let stderr = &checked.stderr;
    for expected in [
        format!(
            "warning: {origin}:10: outbound.relay_networks: mailmoat relays mail to any domain \
             for every client in 10.0.0.0/8"
        ),
        format!("warning: {origin}:6: outbound: MTA-STS is not applied: no mta_sts_cache_dir"),
        format!(
            "warning: {origin}:9: outbound.resolver: the resolver {knot} does not validate \
             DNSSEC: the answer for mx1.dane.test, a signed name, is not authenticated (no AD bit)"
        ),
        "  !!! DANE is then never applied".to_owned(),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&expected)),
            "missing {expected:?} in\n{}",
            checked.both()
        );
    }
}
