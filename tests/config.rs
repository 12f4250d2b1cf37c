//! The configuration as an administrator meets it: the example parses, fixtures under
//! `tests/fixtures/config/{valid,invalid}` are accepted or refused with the field and
//! line named, and `mailmoat run`/`check` exit 64 on a bad file before binding anything.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mailmoat::config::Config;
use mailmoat::inbound::listener::Server;

/// Runs the real binary with `args` then the config path (bounded).
fn mailmoat_cli(args: &[&str], path: &Path) -> common::Ran {
    common::run_bounded(
        Command::new(env!("CARGO_BIN_EXE_mailmoat"))
            .args(args)
            .arg(path),
        std::time::Duration::from_secs(60),
    )
}

/// A fixture with CERT and KEY replaced by the test certificate's paths.
fn fixture(kind: &str, name: &str) -> (String, PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind)
        .join(name);
    let certs = common::certs();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("CERT", &certs.default.0.display().to_string())
        .replace("KEY", &certs.default.1.display().to_string());
    (text, path)
}

fn fixtures(kind: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    names
}

#[test]
fn the_example_config_parses_into_the_documented_shape() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The example names certificates that exist only on a real host: every other
    // problem would be reported with them.
    let err = Config::from_yaml(&text, "example.yaml").unwrap_err();
    assert!(
        err.problems
            .iter()
            .all(|p| p.message.starts_with("tls.certificates[0]")),
        "{err}"
    );
    let certs = common::certs();
    let text = text
        .replace(
            "/etc/mailmoat/mail.example.org.pem",
            &certs.default.0.display().to_string(),
        )
        .replace(
            "/etc/mailmoat/mail.example.org.key",
            &certs.default.1.display().to_string(),
        );
    let config = Config::from_yaml(&text, "example.yaml").unwrap();
    let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "mx",
            "submission",
            "smtps",
            "imap",
            "imaps",
            "pop3",
            "pop3s"
        ]
    );
    assert_eq!(
        config.listeners[0].policy,
        mailmoat::policy::Policy::AuthRequiresTls
    );
    assert_eq!(
        config.listeners[1].policy,
        mailmoat::policy::Policy::RequireTls
    );
    assert_eq!(config.listeners[2].tls, mailmoat::config::TlsMode::Implicit);
    assert_eq!(
        config.listeners[3].protocol,
        mailmoat::config::Protocol::Imap
    );
    assert_eq!(
        config.listeners[5].protocol,
        mailmoat::config::Protocol::Pop3
    );
    assert_eq!(config.timeouts.idle, std::time::Duration::from_secs(300));
}

#[test]
fn imap_and_pop3_listeners_always_require_tls() {
    let (text, _) = fixture("valid", "minimal.yaml");
    let text = text.replace(
        "protocol: smtp,",
        "protocol: imap, policy: auth_requires_tls,",
    );
    let err = Config::from_yaml(&text, "imap.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0] (submission).policy: AuthRequiresTls is for SMTP MX listeners"),
        "{err}"
    );
}

#[test]
fn valid_fixtures_are_accepted() {
    for name in fixtures("valid") {
        let (text, _) = fixture("valid", &name);
        Config::from_yaml(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn invalid_fixtures_name_the_field_and_the_line() {
    let expected: &[(&str, &[&str])] = &[
        (
            "bad-duration.yaml",
            &[
                "bad-duration.yaml:7: timeouts: `5 minutes`: expected a duration such as 500ms, 30s, 5m or 1h",
            ],
        ),
        (
            "bad-policy.yaml",
            &["bad-policy.yaml:8: listeners[0].policy: unknown variant `require_ssl`"],
        ),
        (
            "several-mistakes.yaml",
            &[
                "several-mistakes.yaml:3: tls.certificates[0].cert: /nonexistent/cert.pem",
                "several-mistakes.yaml:5: listeners[0] (mx).upstream: 192.0.2.10:25 is neither loopback nor a unix socket",
                "several-mistakes.yaml:6: listeners[1] (mx).name: `mx` is used twice",
                "several-mistakes.yaml:6: listeners[1] (mx).listen: 127.0.0.1:47125 is used twice",
                "several-mistakes.yaml:8: limits.max_line_len: 100 is outside 512..=16000",
            ],
        ),
        (
            "unknown-field.yaml",
            &["unknown-field.yaml:8: listeners[0]: unknown field `upstraem`"],
        ),
    ];
    assert_eq!(
        fixtures("invalid"),
        expected
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<Vec<_>>()
    );
    for (name, messages) in expected {
        let (text, _) = fixture("invalid", name);
        let err = Config::from_yaml(&text, name).unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), messages.len(), "{name}: {err}");
        for (line, message) in lines.iter().zip(*messages) {
            assert!(
                line.starts_with(message),
                "{name}:\n  got      {line}\n  expected {message}"
            );
        }
    }
}

#[test]
fn remote_plaintext_upstreams_need_the_explicit_opt_in() {
    let (text, _) = fixture("valid", "minimal.yaml");
    let remote = text.replace("127.0.0.1:2587", "192.0.2.10:587");
    assert!(Config::from_yaml(&remote, "x").is_err());
    let allowed = format!("{remote}allow_remote_plaintext: true\n");
    Config::from_yaml(&allowed, "x").unwrap();
}

#[test]
fn the_binary_exits_64_on_a_bad_config_and_binds_nothing() {
    let (text, _) = fixture("invalid", "several-mistakes.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    for subcommand in ["run", "check"] {
        let output = mailmoat_cli(&[subcommand, "-c"], &path);
        assert_eq!(output.code, Some(64), "{subcommand}");
        let stderr = output.stderr.as_str();
        assert_eq!(stderr.lines().count(), 5, "{stderr}");
        assert!(
            stderr.contains("bad.yaml:5: listeners[0] (mx).upstream"),
            "{stderr}"
        );
    }
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind("127.0.0.1:47125").unwrap();
}

#[test]
fn check_accepts_a_good_config() {
    let (text, _) = fixture("valid", "minimal.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, text).unwrap();
    // Offline: the fixture's upstream does not exist (tests/check.rs probes real ones).
    let output = mailmoat_cli(&["check", "--offline", "-c"], &path);
    assert_eq!(output.code, Some(0), "{}", output.stderr.as_str());
    let stdout = output.stdout.as_str();
    assert!(
        stdout.ends_with(&format!(
            "check passed: {}: 0 errors, 0 warning(s)\n",
            path.display()
        )),
        "{stdout}"
    );
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let certs = common::certs();
    let (text, _) = fixture("valid", "minimal.yaml");
    let text = text.replace(
        &certs.default.1.display().to_string(),
        &certs.other.1.display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mismatch.yaml");
    std::fs::write(&path, text).unwrap();
    // `run` refuses to start (64); `check` reports a failed check (1).
    for (subcommand, code) in [("run", 64), ("check", 1)] {
        let output = mailmoat_cli(&[subcommand, "-c"], &path);
        assert_eq!(output.code, Some(code), "{subcommand}");
        assert!(output.stderr.as_str().contains("does not match"));
    }
}

#[test]
fn client_identity_keys_are_typed_and_validated_with_their_line() {
    let (text, _) = fixture("valid", "client-identity.yaml");
    let config = Config::from_yaml(&text, "x").unwrap();
    let mx = &config.listeners[0];
    assert_eq!(mx.proxy_protocol_from.len(), 2);
    assert!(mx.proxy_protocol_from[0].contains("10.0.0.77".parse().unwrap()));
    assert_eq!(
        mx.upstream_proxy_protocol,
        Some(mailmoat::inbound::identity::ProxyVersion::V1)
    );
    assert!(config.listeners[1].xclient);
    assert_eq!(
        config.listeners[1].source_address,
        Some("127.0.0.2".parse().unwrap())
    );

    let certs = common::certs();
    let refused = |listener: &str| -> String {
        let yaml = format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  - {{ name: a, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\" }}\n  - {{ name: b, listen: \"127.0.0.1:0\", {listener} }}\n",
            certs.default.0.display(),
            certs.default.1.display()
        );
        Config::from_yaml(&yaml, "id.yaml").unwrap_err().to_string()
    };
    let cases = [
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", proxy_protocol_from: [10.0.0.1/8]",
            "id.yaml:6: listeners[1].proxy_protocol_from: `10.0.0.1/8`: host bits are set (did you mean 10.0.0.0/8?)",
        ),
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", proxy_protocol_from: [example.org/8]",
            "id.yaml:6: listeners[1].proxy_protocol_from: `example.org/8`: expected a network",
        ),
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", upstream_proxy_protocol: v3",
            "id.yaml:6: listeners[1].upstream_proxy_protocol: unknown variant `v3`",
        ),
        (
            "protocol: imap, upstream: \"unix:/run/imap.sock\", source_address: 127.0.0.2",
            "id.yaml:6: listeners[1] (b).source_address: 127.0.0.2 is meaningless for the unix socket upstream",
        ),
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", source_address: 192.0.2.7",
            "id.yaml:6: listeners[1] (b).source_address: 192.0.2.7 is not a loopback address",
        ),
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", source_address: \"::1\"",
            "id.yaml:6: listeners[1] (b).source_address: ::1 and the upstream 127.0.0.1:2525 are of different address families",
        ),
        (
            "protocol: imap, upstream: \"127.0.0.1:1143\", bare_newlines: reject",
            "id.yaml:6: listeners[1] (b).bare_newlines: applies to SMTP message bodies only",
        ),
        (
            "protocol: pop3, upstream: \"127.0.0.1:1110\", xclient: true",
            "id.yaml:6: listeners[1] (b).xclient: XCLIENT is an SMTP extension",
        ),
        (
            "protocol: smtp, upstream: \"127.0.0.1:2525\", xclient: true, upstream_proxy_protocol: v2",
            "id.yaml:6: listeners[1] (b).xclient: choose either xclient or upstream_proxy_protocol",
        ),
    ];
    for (listener, expected) in cases {
        let err = refused(listener);
        assert!(
            err.starts_with(expected),
            "{listener}:\n  got      {err}\n  expected {expected}"
        );
    }
}

#[test]
fn a_log_level_that_is_no_filter_and_a_zero_literal_bound_are_refused_with_their_lines() {
    let (text, _) = fixture("valid", "minimal.yaml");
    let text = format!("{text}log: {{ level: \"loud\" }}\nlimits:\n  max_literal_len: 0\n");
    let err = Config::from_yaml(&text, "m.yaml").unwrap_err();
    let lines = text.lines().count();
    assert_eq!(
        err.problems
            .iter()
            .map(|p| (p.line, p.message.split(" (").next().unwrap().to_owned()))
            .collect::<Vec<_>>(),
        [
            (
                Some(lines - 2),
                "log.level: \"loud\" is not a level or filter".to_owned()
            ),
            (
                Some(lines),
                "limits.max_literal_len: must be at least 1".to_owned()
            ),
        ]
    );
}

#[test]
fn exempt_networks_are_refused_on_implicit_tls_and_with_xclient() {
    let (text, _) = fixture("valid", "minimal.yaml");
    let with = |keys: &str| text.replace("2587\" }", &format!("2587\", {keys} }}"));
    let ok = with("exempt_networks: [192.0.2.0/24], source_address: 127.0.0.2");
    assert!(Config::from_yaml(&ok, "ok.yaml").is_ok(), "{ok}");
    for (edit, expected) in [
        (
            "tls: implicit, exempt_networks: [192.0.2.0/24]",
            "exempt_networks: an implicit-TLS listener has no plaintext to allow",
        ),
        (
            "xclient: true, exempt_networks: [192.0.2.0/24]",
            "exempt_networks: not with xclient",
        ),
        (
            "exempt_networks: [192.0.2.0/24]",
            "exempt_networks: give exempt SMTP sessions an identity of their own",
        ),
    ] {
        let text = with(edit);
        let err = Config::from_yaml(&text, "x.yaml").unwrap_err().to_string();
        assert!(
            err.contains("x.yaml:5: listeners[0] (submission).") && err.contains(expected),
            "{err}"
        );
    }
}

#[test]
fn a_mistake_inside_a_flow_mapping_has_the_line_of_that_mapping() {
    let certs = common::certs();
    let yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  \
         - {{ name: a, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\" }}\n  \
         - {{ name: b, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\", tls: implict }}\n  \
         - {{ name: c, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\",\n      \
         reuse_port: 1 }}\n  \
         - {{ name: d, protocol: pop3,\n      listen: \"127.0.0.1:0\" }}\n",
        certs.default.0.display(),
        certs.default.1.display()
    );
    let err = Config::from_yaml(&yaml, "flow.yaml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "flow.yaml:6: listeners[1].tls: unknown variant `implict`, expected `starttls` or `implicit`\n\
         flow.yaml:8: listeners[2].reuse_port: invalid type: integer `1`, expected a boolean\n\
         flow.yaml:9: listeners[3]: missing field `upstream`"
    );
}

#[tokio::test]
async fn validation_refuses_the_listen_addresses_run_cannot_bind_together() {
    let certs = common::certs();
    let yaml = |listeners: &str| {
        format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n{listeners}",
            certs.default.0.display(),
            certs.default.1.display()
        )
    };
    let addresses = [
        "0.0.0.0",
        "127.0.0.1",
        "127.0.0.2",
        "[::]",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ];
    for first in addresses {
        for second in addresses {
            for reuse_port in [false, true] {
                let port = common::free_port();
                let listener = |name: &str, ip: &str| {
                    format!(
                        "  - {{ name: {name}, protocol: smtp, listen: \"{ip}:{port}\", \
                         upstream: \"127.0.0.1:2525\", reuse_port: {reuse_port} }}\n"
                    )
                };
                // What the kernel says: both bound as `run` binds them (listener.rs).
                let one = Config::from_yaml(&yaml(&listener("a", first)), "a.yaml").unwrap();
                let other = Config::from_yaml(&yaml(&listener("b", second)), "b.yaml").unwrap();
                let running = Server::bind(&one).await.unwrap();
                let second_bind = Server::bind(&other).await;
                let kernel_binds_both = second_bind.is_ok();
                if let Ok(server) = second_bind {
                    server.shut_down().await;
                }
                running.shut_down().await;
                // What validation says of one file with both.
                let both = yaml(&(listener("a", first) + &listener("b", second)));
                let validated = Config::from_yaml(&both, "both.yaml");
                // The one difference, by design: one address twice is refused even where
                // reuse_port lets the kernel bind it twice.
                let expected = kernel_binds_both && first != second;
                assert_eq!(
                    validated.is_ok(),
                    expected,
                    "{first} then {second}, reuse_port: {reuse_port}: kernel binds both: \
                     {kernel_binds_both}; validation: {validated:?}"
                );
                if let Err(err) = validated {
                    assert_eq!(err.problems.len(), 1, "{err}");
                    let message = err.to_string();
                    assert!(
                        message.starts_with(&format!(
                            "both.yaml:6: listeners[1] (b).listen: {second}:{port} "
                        )) && message.contains("listeners[0] (a), line 5"),
                        "{message}"
                    );
                }
            }
        }
    }
}

#[test]
fn check_and_run_refuse_overlapping_listen_addresses_with_the_line_of_each() {
    let certs = common::certs();
    let port = common::free_port();
    let yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  \
         - {{ name: mx, protocol: smtp, listen: \"0.0.0.0:{port}\", upstream: \"127.0.0.1:2525\" }}\n  \
         - {{ name: local, protocol: smtp, listen: \"127.0.0.1:{port}\", upstream: \"127.0.0.1:2525\" }}\n  \
         - {{ name: v6, protocol: smtp, listen: \"[::]:{port}\", upstream: \"127.0.0.1:2525\" }}\n",
        certs.default.0.display(),
        certs.default.1.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlap.yaml");
    std::fs::write(&path, yaml).unwrap();
    let origin = path.display();
    for subcommand in ["check", "run"] {
        let output = mailmoat_cli(&[subcommand, "-c"], &path);
        assert_eq!(output.code, Some(64), "{subcommand}: {}", output.both());
        assert_eq!(
            output.stderr.lines().collect::<Vec<_>>(),
            [
                format!(
                    "{}{origin}:6: listeners[1] (local).listen: 127.0.0.1:{port} overlaps \
                     0.0.0.0:{port} of listeners[0] (mx), line 5 (the wildcard address takes \
                     every address of its family): Linux binds only one of them, so \
                     `mailmoat run` would fail (address in use)",
                    if subcommand == "check" { "error: " } else { "" }
                ),
                format!(
                    "{}{origin}:7: listeners[2] (v6).listen: [::]:{port} overlaps \
                     0.0.0.0:{port} of listeners[0] (mx), line 5 ([::] takes IPv4 connections \
                     too (net.ipv6.bindv6only is 0)): Linux binds only one of them, so \
                     `mailmoat run` would fail (address in use)",
                    if subcommand == "check" { "error: " } else { "" }
                ),
            ],
            "{subcommand}"
        );
    }
}

#[test]
fn an_upstream_that_is_the_listener_itself_is_refused_by_check_and_run() {
    let certs = common::certs();
    let port = common::free_port();
    // The wildcard takes the loopback connection: one client would become sessions
    // without end.
    let yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  \
         - name: mx\n    protocol: smtp\n    listen: \"[::]:{port}\"\n    \
         upstream: \"127.0.0.1:{port}\"\n",
        certs.default.0.display(),
        certs.default.1.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loop.yaml");
    std::fs::write(&path, yaml).unwrap();
    let expected = format!(
        "{}:8: listeners[0] (mx).upstream: 127.0.0.1:{port} is this listener's own address \
         ([::]:{port}): each connection would be relayed to mailmoat itself, again and again\n",
        path.display()
    );
    for subcommand in ["check", "run"] {
        let output = mailmoat_cli(&[subcommand, "-c"], &path);
        assert_eq!(output.code, Some(64), "{subcommand}: {}", output.both());
        let prefix = if subcommand == "check" { "error: " } else { "" };
        assert_eq!(output.stderr, format!("{prefix}{expected}"), "{subcommand}");
    }
}

#[test]
fn run_warns_at_start_of_a_private_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let certs = common::certs();
    let dir = tempfile::tempdir().unwrap();
    // A directory anyone may enter, as /etc/mailmoat is.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("mail.key");
    std::fs::copy(&certs.default.1, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = dir.path().join("mailmoat.yaml");
    std::fs::write(
        &path,
        format!(
            "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\nlisteners:\n  \
             - {{ name: mx, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:2525\" }}\n",
            certs.default.0.display(),
            key.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("mailmoat.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailmoat"))
        .args(["run", "-c"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The warning comes before the ports are bound; it is served all the same.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let text = common::poll_for(common::STEP, || {
        Some(read()).filter(|t| t.contains("listening"))
    })
    .unwrap_or_else(read);
    let _ = child.kill();
    let _ = child.wait();
    let warning = text
        .lines()
        .find(|line| line.contains("private key readable by others than mailmoat"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
    assert!(warning.contains(" WARN "), "{warning}");
    for field in [
        format!("key={}", key.display()),
        "mode=0644".to_owned(),
        "readers=others".to_owned(),
        "advice=\"chmod 600 it".to_owned(),
    ] {
        assert!(warning.contains(&field), "{field}: {warning}");
    }
    assert!(text.contains("listening"), "{text}");
}
