//! `scripts/install-deps.sh`, the first thing CI runs on a fresh machine. There Postfix
//! comes without `/etc/postfix/main.cf`, and `postconf -h mail_version` says only
//! `postconf: fatal: open /etc/postfix/main.cf`: the versions line named no Postfix. A
//! configuration directory without main.cf (`MAIL_CONFIG`) is the same for postconf.
//! Idempotent: with everything installed (as check.sh has done before the tests), the
//! script installs nothing and takes seconds.

mod common;

use std::time::Duration;

#[test]
fn the_versions_line_names_postfix_dovecot_exim_and_mailutils_even_without_a_main_cf() {
    let empty = tempfile::tempdir().unwrap();
    let ran = common::run_bounded(
        std::process::Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/install-deps.sh"
            ))
            .env("MAIL_CONFIG", empty.path()),
        Duration::from_secs(900),
    );
    assert_eq!(ran.code, Some(0), "{}", ran.both());
    assert!(!ran.stderr.contains("fatal"), "{}", ran.both());
    let versions = ran
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("install-deps: versions: "))
        .unwrap_or_else(|| panic!("no versions line:\n{}", ran.both()));
    let version_of = |name: &str| {
        versions
            .split(", ")
            .find_map(|part| part.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {versions:?}"))
            .to_owned()
    };
    assert!(version_of("postfix").starts_with("3."), "{versions}");
    assert!(version_of("dovecot").starts_with("2."), "{versions}");
    // The unpacked Debian 12 package, pinned to upstream 4.96.
    assert!(version_of("exim").starts_with("4.96 (4.96-"), "{versions}");
    // Debian 12's mailutils-imap4d and mailutils-pop3d (tests/e2e_mailutils.rs).
    assert_eq!(version_of("mailutils"), "3.15", "{versions}");
}
