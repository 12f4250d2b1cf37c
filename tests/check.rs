//! `mailmoat check` as an administrator runs it: the real binary, real certificates, the
//! real legacy Postfix and Dovecot (a safe one and an open relay), and scripted upstreams
//! for what real servers will not do on demand.

mod common;

use common::{Ran, config_file, listener, run_bounded};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runs `mailmoat check` (bounded: every probe has its own deadlines, so two minutes
/// means it hung).
fn check(path: &Path, extra_args: &[&str]) -> Ran {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .arg("check")
            .args(extra_args)
            .arg("-c")
            .arg(path),
        Duration::from_secs(120),
    )
}

#[test]
fn several_config_mistakes_are_all_reported_with_their_lines() {
    let certs = common::certs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let yaml = format!(
        "tls:
  certificates:
    - {{ cert: {}, key: /nonexistent/key.pem }}
listeners:
  - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:47126\", upstream: \"192.0.2.10:25\" }}
  - {{ name: imap, protocol: imap, listen: \"127.0.0.1:47127\", policy: auth_requires_tls, upstream: \"127.0.0.1:1143\" }}
  - {{ name: imap, protocol: imap, listen: \"127.0.0.1:47128\", upstream: \"127.0.0.1:1143\" }}
limits:
  max_line_len: 100
timeouts:
  greeting: 0s
",
        certs.default.0.display()
    );
    std::fs::write(&path, yaml).unwrap();
    let checked = check(&path, &[]);
    assert_eq!(checked.code, Some(64), "{}", checked.both());
    let origin = path.display();
    let expected = [
        format!("error: {origin}:3: tls.certificates[0].key: /nonexistent/key.pem: "),
        format!("error: {origin}:5: listeners[0] (mx).upstream: 192.0.2.10:25 is neither"),
        format!("error: {origin}:6: listeners[1] (imap).policy: AuthRequiresTls is for SMTP"),
        format!("error: {origin}:7: listeners[2] (imap).name: `imap` is used twice"),
        format!("error: {origin}:9: limits.max_line_len: 100 is outside 512..=16000"),
        format!("error: {origin}:11: timeouts.greeting: must be longer than 0"),
    ];
    let lines: Vec<&str> = checked.stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{}", checked.both());
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(expected.as_str()),
            "{line}\nexpected {expected}"
        );
    }
    assert_eq!(
        checked.stdout,
        "check failed: 6 configuration error(s), nothing else was checked\n"
    );
}

#[test]
fn mistakes_of_every_kind_are_reported_together_each_with_its_exact_line() {
    let certs = common::certs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    // Type errors used to stop the check at the first one ("nothing else was checked").
    // Nothing is bound: the ports need not be free.
    let yaml = format!(
        "tls:
  certificates:
    - {{ cert: {}, key: {} }}
listeners:
  - {{ name: mx, protocol: smtp, listen: \"[::]:47302\", upstream: \"127.0.0.1:2525\", xclient: perhaps }}
  - {{ name: smtps, protocol: smtp, tls: implicit, listen: \"0.0.0.0:47301\", upstream: \"127.0.0.1:47301\" }}
  - {{ name: submission, protocol: smtp, listen: \"127.0.0.1:47302\", upstream: \"127.0.0.1:2587\", reuse_port: true }}
  - name: imap
    protocol: imap
    listen: \"127.0.0.1:0\"
    upstream: \"127.0.0.1:1143\"
    policy: auth_requires_tls
    proxy_protocol_from: [10.0.0.1/8]
    upstraem: \"127.0.0.1:1143\"
timeouts:
  idle: 5 minutes
",
        certs.default.0.display(),
        certs.default.1.display()
    );
    std::fs::write(&path, yaml).unwrap();
    let checked = check(&path, &["--offline"]);
    assert_eq!(checked.code, Some(64), "{}", checked.both());
    let origin = path.display();
    let expected = [
        format!(
            "error: {origin}:5: listeners[0].xclient: invalid type: string \"perhaps\", expected a boolean"
        ),
        // The wildcard takes the connections to its own upstream.
        format!(
            "error: {origin}:6: listeners[1] (smtps).upstream: 127.0.0.1:47301 is this \
             listener's own address (0.0.0.0:47301): each connection would be relayed to \
             mailmoat itself, again and again"
        ),
        // reuse_port on one of the two is not enough.
        format!(
            "error: {origin}:7: listeners[2] (submission).listen: 127.0.0.1:47302 overlaps \
             [::]:47302 of listeners[0] (mx), line 5 ([::] takes IPv4 connections too \
             (net.ipv6.bindv6only is 0)): Linux binds only one of them, so `mailmoat run` \
             would fail (address in use)"
        ),
        format!(
            "error: {origin}:12: listeners[3] (imap).policy: AuthRequiresTls is for SMTP MX \
             listeners; IMAP and POP3 always require TLS before login"
        ),
        format!(
            "error: {origin}:13: listeners[3].proxy_protocol_from: `10.0.0.1/8`: host bits are \
             set (did you mean 10.0.0.0/8?)"
        ),
        format!(
            "error: {origin}:14: listeners[3]: unknown field `upstraem`, expected one of `name`, \
             `protocol`, `listen`, `tls`, `policy`, `upstream`, `bare_newlines`, \
             `proxy_protocol_from`, `upstream_proxy_protocol`, `xclient`, `source_address`, \
             `exempt_networks`, `reuse_port`"
        ),
        format!(
            "error: {origin}:16: timeouts: `5 minutes`: expected a duration such as 500ms, 30s, \
             5m or 1h"
        ),
    ];
    assert_eq!(
        checked.stderr.lines().collect::<Vec<_>>(),
        expected,
        "{}",
        checked.both()
    );
    assert_eq!(
        checked.stdout,
        "check failed: 7 configuration error(s), nothing else was checked\n"
    );
}

/// A copy of the test key with `mode` (and group `gid`), in a directory anyone may enter,
/// as /etc/mailmoat is; and a config file that names it on a line of its own (line 4).
fn config_with_key(dir: &Path, mode: u32, gid: Option<u32>) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let certs = common::certs();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.join("mail.key");
    std::fs::copy(&certs.default.1, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&key, None, gid).unwrap();
    let path = dir.join("mailmoat.yaml");
    std::fs::write(
        &path,
        format!(
            "tls:\n  certificates:\n    - cert: {}\n      key: {}\nlisteners:\n  \
             - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\" }}\n",
            certs.default.0.display(),
            key.display()
        ),
    )
    .unwrap();
    (path, key)
}

#[test]
fn a_private_key_others_can_read_gets_a_warning_with_its_mode() {
    // No entry in /etc/group: named by number.
    const FOREIGN_GROUP: u32 = 54_321;
    let cases = [
        (0o644, None, Some("others (mode 0644)".to_owned())),
        (
            0o640,
            Some(FOREIGN_GROUP),
            Some(format!("group {FOREIGN_GROUP} (mode 0640)")),
        ),
        (
            0o604,
            Some(FOREIGN_GROUP),
            Some("others (mode 0604)".to_owned()),
        ),
        (0o600, Some(FOREIGN_GROUP), None),
        // The group this check runs as (the unit's Group=mailmoat for `run`).
        (0o640, None, None),
    ];
    for (mode, gid, readers) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = config_with_key(dir.path(), mode, gid);
        let checked = check(&path, &["--offline"]);
        // A warning: the check still passes.
        assert_eq!(checked.code, Some(0), "{mode:o}: {}", checked.both());
        let origin = path.display();
        match readers {
            Some(readers) => {
                assert_eq!(
                    checked.stderr,
                    format!(
                        "warning: {origin}:4: tls.certificates[0]: {}: the private key is \
                         readable by {readers}; chmod 600 it, or chmod 640 with owner root and \
                         group mailmoat (chown root:mailmoat)\n",
                        key.display()
                    ),
                    "{mode:o}"
                );
                assert!(
                    checked
                        .stdout
                        .ends_with(&format!("check passed: {origin}: 0 errors, 1 warning(s)\n")),
                    "{}",
                    checked.both()
                );
            }
            None => assert_eq!(checked.stderr, "", "{mode:o}"),
        }
    }
}

/// A self-signed certificate for mail.example.test valid from `not_before` to
/// `not_after` seconds from now, written as (cert, key).
fn dated_certificate(
    dir: &Path,
    name: &str,
    not_before: i64,
    not_after: i64,
) -> (PathBuf, PathBuf) {
    use rcgen::{CertificateParams, KeyPair};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |offset: i64| {
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs((now + offset) as u64)
    };
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["mail.example.test".to_owned()]).unwrap();
    params.not_before = at(not_before);
    params.not_after = at(not_after);
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    common::write_private_key(&key_path, &key.serialize_pem());
    (cert_path, key_path)
}

const DAY: i64 = 86_400;

#[test]
fn every_certificate_problem_is_reported_in_one_run() {
    let certs = common::certs();
    let dir = tempfile::tempdir().unwrap();
    let expired = dated_certificate(dir.path(), "expired", -60 * DAY, -2 * DAY);
    let future = dated_certificate(dir.path(), "future", 3 * DAY, 400 * DAY);
    let expiring = dated_certificate(dir.path(), "expiring", -60 * DAY, 10 * DAY + 3600);
    let yaml = format!(
        "tls:
  certificates:
    - {{ cert: {}, key: {} }}
    - {{ cert: {}, key: {} }}
    - {{ cert: {}, key: {} }}
    - {{ cert: {}, key: {} }}
    - {{ cert: {}, key: {} }}
listeners:
  - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\" }}
",
        certs.default.0.display(),
        certs.other.1.display(),
        expired.0.display(),
        expired.1.display(),
        future.0.display(),
        future.1.display(),
        expiring.0.display(),
        expiring.1.display(),
        certs.other.0.display(),
        certs.other.1.display(),
    );
    let path = dir.path().join("mailmoat.yaml");
    std::fs::write(&path, yaml).unwrap();
    let checked = check(&path, &["--offline"]);
    assert_eq!(checked.code, Some(1), "{}", checked.both());
    let origin = path.display();
    let problems: Vec<&str> = checked.stderr.lines().collect();
    assert_eq!(problems.len(), 4, "{}", checked.both());
    assert!(
        problems[0].starts_with(&format!(
            "error: {origin}:3: tls.certificates[0]: {}: the key does not match the certificate in {}",
            certs.other.1.display(),
            certs.default.0.display()
        )),
        "{}",
        checked.both()
    );
    assert!(
        problems[1].starts_with(&format!(
            "error: {origin}:4: tls.certificates[1]: {}: the certificate expired on ",
            expired.0.display()
        )),
        "{}",
        checked.both()
    );
    assert!(
        problems[2].starts_with(&format!(
            "error: {origin}:5: tls.certificates[2]: {}: the certificate is not valid yet: valid from ",
            future.0.display()
        )),
        "{}",
        checked.both()
    );
    assert!(
        problems[3].starts_with(&format!(
            "warning: {origin}:6: tls.certificates[3]: {}: the certificate expires in 10 days, on ",
            expiring.0.display()
        )),
        "{}",
        checked.both()
    );
    // The good ones are listed with the names they cover.
    assert!(
        checked.stdout.contains(&format!(
            "ok: tls.certificates[4]: {}: covers other.example.test; valid until ",
            certs.other.0.display()
        )),
        "{}",
        checked.both()
    );
    assert!(
        checked.stdout.ends_with(&format!(
            "check failed: {origin}: 3 error(s), 1 warning(s)\n"
        )),
        "{}",
        checked.both()
    );
}

#[test]
fn a_safe_postfix_and_dovecot_pass() {
    let legacy = common::legacy();
    let dir = tempfile::tempdir().unwrap();
    let (smtp, imap, pop3) = (
        legacy.smtp.to_string(),
        legacy.imap.to_string(),
        legacy.pop3.to_string(),
    );
    // A running instance holds the listen port: check binds nothing, so it still passes.
    let running = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = running.local_addr().unwrap().port();
    let path = config_file(
        dir.path(),
        &[
            listener("mx", "smtp", "starttls", "auth_requires_tls", &smtp)
                .replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
            listener("submission", "smtp", "starttls", "require_tls", &smtp),
            listener("smtps", "smtp", "implicit", "require_tls", &smtp),
            listener("imap", "imap", "starttls", "require_tls", &imap),
            listener("imaps", "imap", "implicit", "require_tls", &imap),
            listener("pop3", "pop3", "starttls", "require_tls", &pop3),
        ],
        "",
    );
    let checked = check(&path, &[]);
    assert_eq!(checked.code, Some(0), "{}", checked.both());
    assert_eq!(checked.stderr, "", "no error and no warning");
    let origin = path.display();
    for name in ["mx", "submission", "smtps"] {
        assert!(
            checked.stdout.contains(&format!(
                "ok: listeners[{}] ({name}): upstream {smtp} refuses to relay for mailmoat: \
                 RCPT TO:<relay-probe@relay-test.mailmoat.invalid> was answered \
                 \"554 5.7.1 <relay-probe@relay-test.mailmoat.invalid>: Relay access denied\"",
                ["mx", "submission", "smtps"]
                    .iter()
                    .position(|n| *n == name)
                    .unwrap()
            )),
            "{}",
            checked.both()
        );
    }
    assert!(checked.stdout.contains(&format!(
        "ok: listeners[0] (mx): upstream {smtp} speaks SMTP: \"220 legacy.example.test ESMTP legacy\""
    )));
    assert!(checked.stdout.contains(&format!(
        "ok: listeners[3] (imap): upstream {imap} speaks IMAP: \"* OK [CAPABILITY IMAP4rev1"
    )));
    assert!(checked.stdout.contains(&format!(
        "ok: listeners[5] (pop3): upstream {pop3} speaks POP3: \"+OK"
    )));
    assert!(
        checked
            .stdout
            .ends_with(&format!("check passed: {origin}: 0 errors, 0 warning(s)\n")),
        "{}",
        checked.both()
    );
}

#[test]
fn an_open_relay_postfix_is_caught_with_guidance() {
    // Postfix's own default relay rule (permit_mynetworks first) with loopback trusted:
    // the trap of ARCHITECTURE.md §7. Mail to other domains is discarded, never sent: the probe
    // sends no DATA anyway.
    let open = common::Legacy::start(
        "mynetworks = 127.0.0.1/32\n\
         smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination\n\
         smtpd_authorized_xclient_hosts = 127.0.0.1/32\n\
         default_transport = discard:open relay test",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    let smtp = open.smtp.to_string();
    let path = config_file(
        dir.path(),
        &[
            listener("mx", "smtp", "starttls", "auth_requires_tls", &smtp),
            listener(
                "imap",
                "imap",
                "starttls",
                "require_tls",
                &open.imap.to_string(),
            ),
            listener("submission", "smtp", "starttls", "require_tls", &smtp),
            // The ways out of the trap (ARCHITECTURE.md §7), probed as a session would connect:
            // the client's address by XCLIENT, or a source address the upstream does not
            // trust.
            listener("xclient", "smtp", "starttls", "require_tls", &smtp)
                .replace(" }", ", xclient: true }"),
            listener("source", "smtp", "starttls", "require_tls", &smtp)
                .replace(" }", ", source_address: 127.0.0.2 }"),
        ],
        "",
    );
    let checked = check(&path, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.both());
    for name in ["xclient", "source"] {
        assert!(
            checked
                .stdout
                .lines()
                .any(|line| line.starts_with("ok: listeners[")
                    && line.contains(&format!("({name}): "))
                    && line.contains("refuses to relay")
                    && line.contains("Relay access denied")),
            "{}",
            checked.both()
        );
    }
    let origin = path.display();
    for (index, name, line) in [(0, "mx", 5), (2, "submission", 7)] {
        let expected = format!(
            "error: {origin}:{line}: listeners[{index}] ({name}): upstream {smtp} is an open relay \
             for mailmoat: unauthenticated MAIL FROM:<mailmoat-check@example.org> \
             RCPT TO:<relay-probe@relay-test.mailmoat.invalid> was answered \"250 2.1.5 Ok\"\n  \
             The upstream trusts 127.0.0.1, the address mailmoat connects from.\n"
        );
        assert!(checked.stderr.contains(&expected), "{}", checked.both());
    }
    for guidance in ["mynetworks", "source_address", "XCLIENT", "PROXY protocol"] {
        assert!(checked.stderr.contains(guidance), "{}", checked.both());
    }
    assert!(
        checked.stdout.ends_with(&format!(
            "check failed: {origin}: 2 error(s), 0 warning(s)\n"
        )),
        "{}",
        checked.both()
    );
    // The envelope was reset and no message was queued.
    let log = open.logs();
    assert!(log.contains("rset=1"), "{log}");
    assert!(!log.contains("data="), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_probe_never_sends_data() {
    // The scripted upstream accepts every recipient: an open relay.
    let upstream = common::scripted_upstream(common::Behaviour::Esmtp).await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        dir.path(),
        &[listener(
            "mx",
            "smtp",
            "starttls",
            "auth_requires_tls",
            &upstream.addr.to_string(),
        )],
        "",
    );
    let checked = tokio::task::spawn_blocking(move || check(&path, &[]))
        .await
        .unwrap();
    assert_eq!(checked.code, Some(1), "{}", checked.both());
    assert!(checked.stderr.contains("is an open relay for mailmoat"));
    assert_eq!(
        upstream.commands(),
        [
            "EHLO check.mailmoat.invalid",
            "MAIL FROM:<mailmoat-check@example.org>",
            "RCPT TO:<relay-probe@relay-test.mailmoat.invalid>",
            "RSET",
            "QUIT"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_silent_and_wrong_protocol_upstreams_all_fail_in_one_run() {
    let legacy = common::legacy();
    let silent = common::scripted_upstream(common::Behaviour::Silent).await;
    let closed = format!("127.0.0.1:{}", common::free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        dir.path(),
        &[
            listener("down", "smtp", "starttls", "require_tls", &closed),
            listener(
                "imap-at-postfix",
                "imap",
                "starttls",
                "require_tls",
                &legacy.smtp.to_string(),
            ),
            listener(
                "pop3-at-imap",
                "pop3",
                "starttls",
                "require_tls",
                &legacy.imap.to_string(),
            ),
            listener(
                "smtp-at-pop3",
                "smtp",
                "starttls",
                "require_tls",
                &legacy.pop3.to_string(),
            ),
            listener(
                "silent",
                "imap",
                "starttls",
                "require_tls",
                &silent.addr.to_string(),
            ),
            listener(
                "socket",
                "pop3",
                "starttls",
                "require_tls",
                "unix:/nonexistent/pop3.sock",
            ),
        ],
        "timeouts: { greeting: 1s }\n",
    );
    let checked = tokio::task::spawn_blocking(move || check(&path, &[]))
        .await
        .unwrap();
    assert_eq!(checked.code, Some(1), "{}", checked.both());
    let expected = [
        format!("listeners[0] (down): upstream {closed} (SMTP): cannot connect to {closed}: "),
        format!(
            "listeners[1] (imap-at-postfix): upstream {} (IMAP): the upstream speaks SMTP, not \
             IMAP: it greeted with \"220 legacy.example.test ESMTP legacy\" (is this the right port?)",
            legacy.smtp
        ),
        format!(
            "listeners[2] (pop3-at-imap): upstream {} (POP3): the upstream speaks IMAP, not POP3",
            legacy.imap
        ),
        format!(
            "listeners[3] (smtp-at-pop3): upstream {} (SMTP): the upstream speaks POP3, not SMTP",
            legacy.pop3
        ),
        format!(
            "listeners[4] (silent): upstream {} (IMAP): timed out after 1s waiting for the greeting",
            silent.addr
        ),
        "listeners[5] (socket): upstream unix:/nonexistent/pop3.sock (POP3): cannot connect to \
         unix:/nonexistent/pop3.sock: "
            .to_owned(),
    ];
    let lines: Vec<&str> = checked.stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{}", checked.both());
    for ((line, expected), number) in lines.iter().zip(&expected).zip(5..) {
        let expected = format!(
            "error: {}:{number}: {expected}",
            dir.path().join("mailmoat.yaml").display()
        );
        assert!(line.starts_with(&expected), "{line}\nexpected {expected}");
    }
}
