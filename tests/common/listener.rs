//! Configuration for the proxy under test: `listeners:` entries and whole YAML files
//! with the test certificates, one builder for the in-process proxy, the real binary and
//! the tests of `check` and `explain`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::certs;

/// Which test certificates a configuration serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certificates {
    /// mail.example.test only.
    Default,
    /// mail.example.test first, then other.example.test (chosen by SNI).
    Both,
}

/// A whole configuration: `tls:` with `certificates`, these `listeners:` entries (YAML
/// flow maps, one per line) and `extra` top-level YAML.
pub fn config_yaml(certificates: Certificates, listeners: &[String], extra: &str) -> String {
    config_yaml_with(certificates, "", listeners, extra)
}

/// [`config_yaml`] with `top` level YAML between `tls:` and `listeners:`, so that the
/// listeners stay last but for `extra` (a test that appends a listener to the file
/// relies on it).
pub fn config_yaml_with(
    certificates: Certificates,
    top: &str,
    listeners: &[String],
    extra: &str,
) -> String {
    let certs = certs();
    let mut yaml = format!(
        "tls:\n  certificates:\n    - {{ cert: {}, key: {} }}\n",
        certs.default.0.display(),
        certs.default.1.display()
    );
    if certificates == Certificates::Both {
        yaml.push_str(&format!(
            "    - {{ cert: {}, key: {} }}\n",
            certs.other.0.display(),
            certs.other.1.display()
        ));
    }
    yaml.push_str(top);
    yaml.push_str("listeners:\n");
    for listener in listeners {
        yaml.push_str(&format!("  - {listener}\n"));
    }
    yaml.push_str(extra);
    yaml
}

/// Writes `DIR/mailmoat.yaml` with the default test certificate, these `listeners:`
/// entries and `extra` top-level YAML; returns its path.
pub fn config_file(dir: &Path, listeners: &[String], extra: &str) -> PathBuf {
    let path = dir.join("mailmoat.yaml");
    std::fs::write(&path, config_yaml(Certificates::Default, listeners, extra)).unwrap();
    path
}

/// A `listeners:` entry on a free loopback port.
pub fn listener(name: &str, protocol: &str, tls: &str, policy: &str, upstream: &str) -> String {
    listener_at("127.0.0.1:0", name, protocol, tls, policy, upstream)
}

/// A `listeners:` entry on `listen`.
pub fn listener_at(
    listen: &str,
    name: &str,
    protocol: &str,
    tls: &str,
    policy: &str,
    upstream: &str,
) -> String {
    format!(
        "{{ name: {name}, protocol: {protocol}, listen: \"{listen}\", tls: {tls}, \
         policy: {policy}, upstream: \"{upstream}\" }}"
    )
}

/// A `listeners:` entry for an SMTP listener on a free loopback port.
pub fn smtp_listener(name: &str, tls: &str, policy: &str, upstream: SocketAddr) -> String {
    listener(name, "smtp", tls, policy, &upstream.to_string())
}

/// A `listeners:` entry for an IMAP listener (policy `require_tls`, the default).
pub fn imap_listener(name: &str, tls: &str, upstream: SocketAddr) -> String {
    listener(name, "imap", tls, "require_tls", &upstream.to_string())
}

/// A `listeners:` entry for a POP3 listener (policy `require_tls`, the default).
pub fn pop3_listener(name: &str, tls: &str, upstream: SocketAddr) -> String {
    listener(name, "pop3", tls, "require_tls", &upstream.to_string())
}
