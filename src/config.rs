//! The YAML configuration, checked whole before any port is bound: the text becomes a
//! YAML tree that keeps every node's line, the tree is read key by key (`read`: unknown
//! and missing keys, each value by its type) and then checked across the file
//! ([`Config::parse`]), every problem collected with its own line; only a file without
//! any becomes the typed structs below (serde, unknown fields rejected).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::inbound::identity::{Cidr, ProxyVersion};
use crate::policy::{BareNewlines, Policy};

mod read;
mod sockets;

use read::{Draft, ListenerDraft};
use sockets::{Host, ThisHost};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Certificates and TLS versions.
    pub tls: TlsConfig,
    /// The ports mailmoat listens on.
    pub listeners: Vec<ListenerConfig>,
    /// Bounds on what a client may send.
    #[serde(default)]
    pub limits: Limits,
    /// Per-phase deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint; absent, none is served (metrics are still kept).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Key for the keyed hash of user names in `credentials_exposed` events. Without it a
    /// random key is drawn at start-up (hashes then only join within one process).
    #[serde(default)]
    pub user_hash_key: Option<String>,
    /// Allow plaintext upstreams that are neither loopback nor a unix socket (ARCHITECTURE.md §7).
    #[serde(default)]
    pub allow_remote_plaintext: bool,
    /// The outbound relay; absent, mailmoat relays nothing out.
    #[serde(default)]
    pub outbound: Option<OutboundConfig>,
}

/// The `tls` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chains with their keys; SNI picks one, the first serves clients that
    /// send no SNI.
    pub certificates: Vec<CertificateConfig>,
    /// The oldest TLS version offered: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_tls_version: TlsVersion,
}

/// One certificate chain and its private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

/// Oldest TLS version offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// The mail protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// SMTP, submission and MX.
    Smtp,
    /// IMAP4 (RFC 9051, RFC 3501).
    Imap,
    /// POP3 (RFC 1939).
    Pop3,
}

impl Protocol {
    /// The ALPN id of RFC 7301's registry for this protocol (ALPACA: strict ALPN).
    pub fn alpn_id(self) -> &'static [u8] {
        match self {
            Protocol::Smtp => b"smtp",
            Protocol::Imap => b"imap",
            Protocol::Pop3 => b"pop3",
        }
    }
}

/// How a listener starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plaintext first, upgraded by STARTTLS (ports 25, 587, 143, 110).
    #[default]
    Starttls,
    /// TLS from the first byte (ports 465, 993, 995).
    Implicit,
}

/// Where the legacy server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `host:port`, an IP literal.
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl UpstreamAddr {
    /// Loopback or a unix socket: plaintext never leaves the host.
    pub fn is_local(&self) -> bool {
        match self {
            UpstreamAddr::Tcp(addr) => addr.ip().is_loopback(),
            UpstreamAddr::Unix(_) => true,
        }
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Tcp(addr) => write!(f, "{addr}"),
            UpstreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(serde::de::Error::custom(format!(
                    "upstream `{text}`: a unix socket needs an absolute path (unix:/run/x.sock)"
                )));
            }
            return Ok(UpstreamAddr::Unix(PathBuf::from(path)));
        }
        text.parse().map(UpstreamAddr::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "upstream `{text}`: expected IP:port (127.0.0.1:2525, [::1]:2525) or unix:/path"
            ))
        })
    }
}

/// One listening port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// The mail protocol.
    pub protocol: Protocol,
    /// Address to listen on, `[::]:587` or `0.0.0.0:587`.
    #[serde(deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// `starttls` (default) or `implicit`.
    #[serde(default)]
    pub tls: TlsMode,
    /// `require_tls` (default) or `auth_requires_tls`.
    #[serde(default)]
    pub policy: Policy,
    /// The legacy server behind this listener.
    pub upstream: UpstreamAddr,
    /// SMTP: `normalize` (default) or `reject` bare CR/LF in message bodies. Refused on
    /// IMAP and POP3 listeners, whose bytes pass unchanged.
    #[serde(default)]
    pub bare_newlines: Option<BareNewlines>,
    /// Networks of trusted load balancers (`[10.0.0.0/24, 2001:db8::/64]`). A connection
    /// from one of them must begin with a PROXY protocol v1 or v2 header naming the real
    /// client, or it is closed; from anywhere else no header is read (a `PROXY` line is
    /// then an unknown command). Empty (the default): no PROXY header is accepted.
    #[serde(default)]
    pub proxy_protocol_from: Vec<Cidr>,
    /// `v1` or `v2`: begin every upstream connection with a PROXY protocol header that
    /// names the real client (Postfix `smtpd_upstream_proxy_protocol = haproxy`, Dovecot
    /// `haproxy = yes`). Unset (the default): no header.
    #[serde(default)]
    pub upstream_proxy_protocol: Option<ProxyVersion>,
    /// SMTP: tell a Postfix upstream the real client with XCLIENT (only the attributes it
    /// announces) before the client's dialogue begins (needs
    /// `smtpd_authorized_xclient_hosts` to include mailmoat's address).
    #[serde(default)]
    pub xclient: bool,
    /// Local IP address the upstream TCP connection is made from, e.g. a loopback
    /// address of its own (`127.0.0.2`) that the upstream does not trust.
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// Networks of named legacy devices (a printer, a scanner) that cannot do TLS: their
    /// sessions are relayed unchanged to the upstream, plaintext logins included, each
    /// logged and counted as `exempt_plaintext_session` (ARCHITECTURE.md §3). STARTTLS listeners
    /// only; not with `xclient` (the device's own bytes would reach an upstream that
    /// trusts mailmoat's XCLIENT).
    #[serde(default)]
    pub exempt_networks: Vec<Cidr>,
    /// Let several mailmoat processes listen on the same address (SO_REUSEPORT): the
    /// kernel spreads new connections across them (ARCHITECTURE.md §8, scale-out on one host).
    #[serde(default)]
    pub reuse_port: bool,
}

/// Bounds on client input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line in bytes, CRLF included. At least 512 (RFC 5321 §4.5.3.1.4),
    /// and well below the 16 KiB where legacy servers misbehave (ARCHITECTURE.md §10).
    pub max_line_len: usize,
    /// Most connections open at once, all listeners together.
    pub max_connections: usize,
    /// IMAP: the largest literal accepted before login (login names and passwords are
    /// short; some legacy servers hand out a `+` for 100 MB, ARCHITECTURE.md §10).
    pub max_literal_len: u64,
    /// Commands a client may send before TLS on listeners that require it (the upgrade
    /// dialogue needs two or three); more closes the connection.
    pub max_plaintext_commands: u32,
    /// Connections open at once from one client address (IPv6: one /64).
    pub max_connections_per_client: usize,
    /// Error replies mailmoat gives itself in one session (unknown or malformed
    /// commands, refusals) before it closes the connection, like Postfix's
    /// `smtpd_hard_error_limit`: a session that only draws errors is probing.
    pub max_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_len: 4096,
            max_connections: 10_000,
            max_literal_len: 64 * 1024,
            max_plaintext_commands: 20,
            max_connections_per_client: 200,
            max_errors: 20,
        }
    }
}

/// Per-phase deadlines, written like `30s`, `5m`, `500ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connecting to the upstream.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_connect: Duration,
    /// The upstream's greeting after connect.
    #[serde(deserialize_with = "de_duration")]
    pub greeting: Duration,
    /// A TLS handshake, implicit or after STARTTLS.
    #[serde(deserialize_with = "de_duration")]
    pub tls_handshake: Duration,
    /// Silence between commands.
    #[serde(deserialize_with = "de_duration")]
    pub idle: Duration,
    /// Silence inside a message body.
    #[serde(deserialize_with = "de_duration")]
    pub data: Duration,
    /// Silence in both directions after an IMAP or POP3 login (IMAP IDLE clients renew
    /// within 29 minutes, RFC 2177).
    #[serde(deserialize_with = "de_duration")]
    pub idle_after_login: Duration,
    /// On SIGTERM: how long sessions may take to reach a command boundary (or, relayed,
    /// to finish) before the process exits anyway. `0s` ends them at once.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            upstream_connect: Duration::from_secs(10),
            greeting: Duration::from_secs(30),
            tls_handshake: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            data: Duration::from_secs(600),
            idle_after_login: Duration::from_secs(30 * 60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `mailmoat=debug` (`RUST_LOG` overrides it).
    pub level: Option<String>,
}

/// The `metrics` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics` and `/healthz`, such as
    /// `127.0.0.1:9925`.
    #[serde(deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
}

/// The `outbound` section: the relay the legacy MTA uses as its relayhost, which
/// delivers each transaction live to the recipient's MX (ARCHITECTURE.md §11).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Where the legacy MTA connects, in plaintext: the local link.
    #[serde(deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// The networks whose clients may relay. Default: loopback only; anything wider
    /// relays for everyone in it, which `check` points out.
    #[serde(default = "loopback_networks")]
    pub relay_networks: Vec<Cidr>,
    /// The name mailmoat gives itself: in its greeting, and in the EHLO it sends MXes,
    /// where it must be the name the PTR record of the sending address gives.
    pub hostname: String,
    /// The local address connections to MXes come from.
    #[serde(default)]
    pub source_address: Option<IpAddr>,
    /// The DNSSEC-validating resolver whose AD bit mailmoat trusts (loopback, or a
    /// trusted path): DANE rests on it.
    #[serde(deserialize_with = "de_socket_addr")]
    pub resolver: SocketAddr,
    /// The TLS a delivery gets where neither DANE nor MTA-STS applies.
    #[serde(default)]
    pub tls_floor: TlsFloor,
    /// A floor per recipient domain (lower-case, as DNS names it), like Postfix's
    /// `smtp_tls_policy_maps`.
    #[serde(default)]
    pub domain_tls_floor: BTreeMap<String, TlsFloor>,
    /// Trust anchors added to the system's for PKIX checks (MTA-STS, `verify`).
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    /// Where MTA-STS policies are kept across restarts (RFC 8461 §5.1). Absent, MTA-STS
    /// is not applied, which `check` points out.
    #[serde(default)]
    pub mta_sts_cache_dir: Option<PathBuf>,
    /// The largest message relayed, in bytes: the SIZE offered to the legacy MTA.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// The port MXes are reached on. Always 25 (RFC 5321 §4.5.4); another is for test
    /// labs.
    #[serde(default = "smtp_port")]
    pub mx_port: u16,
    /// What happens when an MX that offered STARTTLS before offers it no longer (a
    /// suspected stripping attack, remembered per MX host): `log` delivers in
    /// plaintext as the floor allows and logs it; `defer` answers `451 4.7.5` instead.
    #[serde(default)]
    pub starttls_stripping: StrippingResponse,
    /// A DNSSEC-signed name `check` asks the resolver for, expecting an authenticated
    /// answer (the AD bit).
    #[serde(default = "dnssec_signed_name")]
    pub dnssec_check_signed: String,
    /// A name signed wrongly on purpose that `check` asks for, expecting SERVFAIL from a
    /// validating resolver.
    #[serde(default = "dnssec_bogus_name")]
    pub dnssec_check_bogus: String,
}

/// The TLS a delivery gets where neither DANE nor MTA-STS applies: the relay's own
/// [`crate::outbound::plan::Floor`] (`opportunistic`, `encrypt`, `verify`).
pub use crate::outbound::plan::Floor as TlsFloor;

/// The answer to a suspected STARTTLS stripping (`outbound.starttls_stripping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrippingResponse {
    /// Log a `starttls_stripping_suspected` event; deliver as the policy allows.
    #[default]
    Log,
    /// Log it and defer: the MX must offer STARTTLS again.
    Defer,
}

fn loopback_networks() -> Vec<Cidr> {
    ["127.0.0.0/8", "::1/128"]
        .into_iter()
        .filter_map(|text| Cidr::parse(text).ok())
        .collect()
}

/// 50 MiB, a common MX limit (Gmail's is 25 MB of attachments, about 35 MB encoded).
fn default_max_message_size() -> u64 {
    50 * 1024 * 1024
}

fn smtp_port() -> u16 {
    25
}

/// Signed since 2010, with DS records in `org.`.
fn dnssec_signed_name() -> String {
    "ietf.org".into()
}

/// Kept deliberately broken for resolver tests (its signatures do not validate).
fn dnssec_bogus_name() -> String {
    "dnssec-failed.org".into()
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn de_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}`: expected IP:port such as \"[::]:587\" or \"127.0.0.1:587\""
        ))
    })
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "`{text}`: expected a duration such as 500ms, 30s, 5m or 1h"
        ))
    })
}

/// `30s`, `500ms`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => number.checked_mul(60).map(Duration::from_secs),
        "h" => number.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the YAML file, when known.
    pub line: Option<usize>,
    /// What is wrong, naming the field.
    pub message: String,
}

/// Everything wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub origin: String,
    /// The problems, in file order where known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            match problem.line {
                Some(line) => write!(f, "{}:{line}: {}", self.origin, problem.message)?,
                None => write!(f, "{}: {}", self.origin, problem.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where each key of a configuration file is: its path (`listeners[1].upstream`, as
/// messages name it) to its 1-based line. A list entry's line is the line of its `-`.
#[derive(Debug, Clone, Default)]
pub struct Positions(BTreeMap<String, usize>);

impl Positions {
    /// The line of `path`, or of the nearest key around it that was in the file (a key left
    /// out has the line of its mapping).
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.0.get(path) {
                return Some(*line);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::load(path).map(|(config, _)| config)
    }

    /// Reads and validates a configuration file, and tells where each key is.
    pub fn load(path: &Path) -> Result<(Config, Positions), ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            origin: origin.clone(),
            problems: vec![Problem {
                line: None,
                message: format!("cannot read: {err}"),
            }],
        })?;
        Config::parse(&text, &origin)
    }

    /// Parses and validates YAML text; `origin` names it in messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse(text, origin).map(|(config, _)| config)
    }

    /// Parses and validates YAML text, and tells where each key is; `origin` names it in
    /// messages.
    ///
    /// The text becomes a YAML tree that keeps every node's line; the tree is read and
    /// checked whole (unknown keys, types, values, then the checks across the file), every
    /// problem collected with its line; only a file without any becomes the typed `Config`,
    /// built by serde from the same text.
    pub fn parse(text: &str, origin: &str) -> Result<(Config, Positions), ConfigError> {
        Config::parse_on(text, origin, &ThisHost::default())
    }

    /// [`Config::parse`] for `host`.
    fn parse_on(
        text: &str,
        origin: &str,
        host: &dyn Host,
    ) -> Result<(Config, Positions), ConfigError> {
        let (draft, reader) = read::read(text);
        let mut problems = reader.problems;
        if let Some(draft) = &draft {
            problems.extend(validate(draft, &reader.positions, host));
        }
        // In file order; at one line, in the order found.
        problems.sort_by_key(|p| p.line);
        let fail = |problems| ConfigError {
            origin: origin.to_owned(),
            problems,
        };
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        // The tree reads every value with its type's own Deserialize, so this only fails
        // if the two disagree; then serde's word is final.
        let config = serde_yaml::from_str(text).map_err(|err| {
            fail(vec![Problem {
                line: err.location().map(|l| l.line()),
                message: strip_location(&err.to_string()),
            }])
        })?;
        Ok((config, reader.positions))
    }
}

/// The checks across the file that no single value shows, on the draft of what could be
/// read, one section at a time (in this order, which is the order of problems found on
/// one line).
fn validate(draft: &Draft, positions: &Positions, host: &dyn Host) -> Vec<Problem> {
    let mut found = Found {
        positions,
        problems: Vec::new(),
    };
    let listeners = draft.listeners.as_deref().unwrap_or_default();
    validate_certificates(draft.certificates.as_deref(), &mut found);
    validate_listeners(draft, host, &mut found);
    upstream_loops(listeners, host, &mut found);
    if let Some(metrics) = &draft.metrics {
        validate_metrics(metrics, listeners, host, &mut found);
    }
    if let Some(outbound) = &draft.outbound {
        validate_outbound(outbound, draft, host, &mut found);
    }
    validate_limits(&draft.limits, &mut found);
    validate_log(&draft.log, &mut found);
    validate_timeouts(&draft.timeouts, &mut found);
    found.problems
}

/// The problems the checks across the file find, each with its line: the line of its
/// key in the YAML tree (`positions`, recorded as the file was read), never a line
/// found by searching the text.
struct Found<'p> {
    positions: &'p Positions,
    problems: Vec<Problem>,
}

impl Found<'_> {
    /// A problem with the key at `path` (`listeners[1].listen`).
    fn add(&mut self, path: &str, message: String) {
        self.problems.push(Problem {
            line: self.positions.line(path),
            message,
        });
    }

    /// `, line N` of the key at `path`, for a message that names a second place.
    fn also_at(&self, path: &str) -> String {
        self.positions
            .line(path)
            .map_or_else(String::new, |line| format!(", line {line}"))
    }
}

/// `tls.certificates`: at least one, and every file there.
fn validate_certificates(certificates: Option<&[Option<CertificateConfig>]>, found: &mut Found) {
    let Some(certificates) = certificates else {
        return;
    };
    if certificates.is_empty() {
        found.add(
            "tls.certificates",
            "tls.certificates: at least one certificate is needed".into(),
        );
    }
    for (index, pair) in certificates.iter().enumerate() {
        let Some(pair) = pair else { continue };
        for (field, path) in [("cert", &pair.cert), ("key", &pair.key)] {
            if let Err(err) = std::fs::metadata(path) {
                found.add(
                    &format!("tls.certificates[{index}].{field}"),
                    format!(
                        "tls.certificates[{index}].{field}: {}: {err}",
                        path.display()
                    ),
                );
            }
        }
    }
}

/// `listeners`: at least one; names and addresses unique across them; each listener's
/// own settings. (Upstreams that lead back to a listener: [`upstream_loops`].)
fn validate_listeners(draft: &Draft, host: &dyn Host, found: &mut Found) {
    let listeners = draft.listeners.as_deref().unwrap_or_default();
    if draft.listeners.as_ref().is_some_and(Vec::is_empty) {
        found.add(
            "listeners",
            "listeners: at least one listener is needed".into(),
        );
    }
    for index in 0..listeners.len() {
        validate_listener_name(listeners, index, found);
        validate_listener_address(listeners, index, host, found);
        if let Some(config) = &listeners[index].config {
            let at = listeners[index].subject(index);
            validate_listener_settings(config, index, &at, draft.allow_remote_plaintext, found);
        }
    }
}

/// A listener's name is not an earlier listener's.
fn validate_listener_name(listeners: &[ListenerDraft], index: usize, found: &mut Found) {
    let listener = &listeners[index];
    let Some(name) = &listener.name else { return };
    let Some(other) = listeners[..index]
        .iter()
        .position(|l| l.name.as_ref() == Some(name))
    else {
        return;
    };
    let message = format!(
        "{}.name: `{name}` is used twice (also listeners[{other}]{})",
        listener.subject(index),
        found.also_at(&format!("listeners[{other}].name"))
    );
    found.add(&format!("listeners[{index}].name"), message);
}

/// What `run` could not bind: the same address as an earlier listener (even with
/// reuse_port, which would split one port's connections between two listeners at
/// random), or one that overlaps it (see `sockets`).
fn validate_listener_address(
    listeners: &[ListenerDraft],
    index: usize,
    host: &dyn Host,
    found: &mut Found,
) {
    let listener = &listeners[index];
    let Some(listen) = listener.listen else {
        return;
    };
    let earlier = listeners[..index].iter().enumerate();
    let mut clashes = earlier.filter_map(|(other_index, other)| {
        let other_listen = other.listen?;
        let twice = listen == other_listen && listen.port() != 0;
        let overlap = sockets::overlap(listen, other_listen, host.ipv6_only())
            && !(listener.reuse_port && other.reuse_port);
        (twice || overlap).then_some((other_index, other, other_listen))
    });
    let Some((other_index, other, other_listen)) = clashes.next() else {
        return;
    };
    let at = listener.subject(index);
    let other_at = other.subject(other_index);
    let other_line = found.also_at(&format!("listeners[{other_index}].listen"));
    let message = if listen == other_listen {
        format!("{at}.listen: {listen} is used twice (also {other_at}{other_line})")
    } else {
        format!(
            "{at}.listen: {listen} overlaps {other_listen} of {other_at}{other_line} \
             ({}): Linux binds only one of them, so `mailmoat run` would fail \
             (address in use)",
            sockets::why_overlap(listen, other_listen)
        )
    };
    found.add(&format!("listeners[{index}].listen"), message);
}

/// One complete listener's settings: its policy, a remote plaintext upstream, and the
/// client-identity keys. `at` names it in messages.
fn validate_listener_settings(
    listener: &ListenerConfig,
    index: usize,
    at: &str,
    allow_remote_plaintext: bool,
    found: &mut Found,
) {
    let path = format!("listeners[{index}]");
    if listener.protocol != Protocol::Smtp && listener.policy != Policy::RequireTls {
        found.add(
            &format!("{path}.policy"),
            format!(
                "{at}.policy: {:?} is for SMTP MX listeners; IMAP and POP3 always \
                 require TLS before login",
                listener.policy
            ),
        );
    }
    if !listener.upstream.is_local() && !allow_remote_plaintext {
        found.add(
            &format!("{path}.upstream"),
            format!(
                "{at}.upstream: {} is neither loopback nor a unix socket; plaintext \
                 would cross the network (set allow_remote_plaintext: true to accept)",
                listener.upstream
            ),
        );
    }
    for (key, message) in listener.identity_problems(allow_remote_plaintext) {
        found.add(&format!("{path}.{key}"), format!("{at}.{key}: {message}"));
    }
}

/// `metrics.listen`: bound after the listeners, without SO_REUSEPORT, so it must not be
/// or overlap a listener's address.
fn validate_metrics(
    metrics: &MetricsConfig,
    listeners: &[ListenerDraft],
    host: &dyn Host,
    found: &mut Found,
) {
    let listen = metrics.listen;
    let clash = listeners.iter().enumerate().find_map(|(index, l)| {
        let other = l.listen?;
        sockets::overlap(listen, other, host.ipv6_only()).then_some((index, l, other))
    });
    let message = match clash {
        None => return,
        Some((_, _, other)) if other == listen => {
            format!("metrics.listen: {listen} is also a listener's address")
        }
        Some((index, l, other)) => format!(
            "metrics.listen: {listen} overlaps {other} of {}{} ({}): Linux binds only \
             one of them, so `mailmoat run` would fail (address in use)",
            l.subject(index),
            found.also_at(&format!("listeners[{index}].listen")),
            sockets::why_overlap(listen, other)
        ),
    };
    found.add("metrics.listen", message);
}

/// `outbound`: its address free of the listeners' and the metrics', a host name mailmoat
/// can say in EHLO, a resolver it can ask, domains as DNS names them, and files there.
fn validate_outbound(outbound: &OutboundConfig, draft: &Draft, host: &dyn Host, found: &mut Found) {
    let listen = outbound.listen;
    let listeners = draft.listeners.as_deref().unwrap_or_default();
    let clash = listeners
        .iter()
        .enumerate()
        .filter_map(|(index, l)| Some((l.subject(index), l.listen?)))
        .chain(
            draft
                .metrics
                .as_ref()
                .map(|m| ("metrics".to_owned(), m.listen)),
        )
        .find(|(_, other)| sockets::overlap(listen, *other, host.ipv6_only()));
    if let Some((other_at, other)) = clash {
        found.add(
            "outbound.listen",
            format!(
                "outbound.listen: {listen} overlaps {other} of {other_at}: Linux binds only \
                 one of them, so `mailmoat run` would fail (address in use)"
            ),
        );
    }
    if outbound.relay_networks.is_empty() {
        found.add(
            "outbound.relay_networks",
            "outbound.relay_networks: empty, so no client could relay; leave it out for \
             loopback only"
                .into(),
        );
    }
    let hostname = outbound.hostname.as_bytes();
    if crate::proto::smtp::canonical::domain_or_literal(hostname).is_none()
        || hostname.starts_with(b"[")
        || !hostname.contains(&b'.')
    {
        found.add(
            "outbound.hostname",
            format!(
                "outbound.hostname: `{}` is not a fully qualified host name (MXes check \
                 the EHLO name against the sending address's PTR record)",
                outbound.hostname
            ),
        );
    }
    if outbound.resolver.ip().is_unspecified() || outbound.resolver.port() == 0 {
        found.add(
            "outbound.resolver",
            format!(
                "outbound.resolver: {} is no address to send queries to",
                outbound.resolver
            ),
        );
    }
    for domain in outbound.domain_tls_floor.keys() {
        let ok =
            crate::proto::outbound::envelope::recipient_domain(format!("@{domain}").as_bytes())
                .is_ok_and(|d| d.as_str() == domain);
        if !ok {
            found.add(
                &format!("outbound.domain_tls_floor.{domain}"),
                format!(
                    "outbound.domain_tls_floor: `{domain}` is not a domain as DNS names it \
                     (lower case, A-labels, no trailing dot)"
                ),
            );
        }
    }
    if !(1024..=(1 << 31)).contains(&outbound.max_message_size) {
        found.add(
            "outbound.max_message_size",
            format!(
                "outbound.max_message_size: {} is outside 1024..=2147483648 bytes",
                outbound.max_message_size
            ),
        );
    }
    if outbound.mx_port == 0 {
        found.add("outbound.mx_port", "outbound.mx_port: 0 is no port".into());
    }
    if let Some(path) = &outbound.extra_ca_file
        && let Err(err) = std::fs::metadata(path)
    {
        found.add(
            "outbound.extra_ca_file",
            format!("outbound.extra_ca_file: {}: {err}", path.display()),
        );
    }
}

/// `limits`: each within its range.
fn validate_limits(limits: &Limits, found: &mut Found) {
    if !(512..=16_000).contains(&limits.max_line_len) {
        found.add(
            "limits.max_line_len",
            format!(
                "limits.max_line_len: {} is outside 512..=16000 (RFC 5321 §4.5.3.1.4; legacy \
                 servers split longer lines)",
                limits.max_line_len
            ),
        );
    }
    if limits.max_errors == 0 {
        found.add(
            "limits.max_errors",
            "limits.max_errors: must be at least 1".into(),
        );
    }
    if limits.max_plaintext_commands == 0 {
        found.add(
            "limits.max_plaintext_commands",
            "limits.max_plaintext_commands: must be at least 1 (STARTTLS itself counts)".into(),
        );
    }
    if limits.max_connections_per_client == 0 {
        found.add(
            "limits.max_connections_per_client",
            "limits.max_connections_per_client: must be at least 1".into(),
        );
    }
    // The upper bound keeps the connection semaphore far from its own limit
    // (usize::MAX >> 3), where tokio would panic, also on a SIGHUP.
    if !(1..=MAX_CONNECTIONS_LIMIT).contains(&limits.max_connections) {
        found.add(
            "limits.max_connections",
            format!("limits.max_connections: must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
        );
    }
    if limits.max_literal_len == 0 {
        found.add(
            "limits.max_literal_len",
            "limits.max_literal_len: must be at least 1".into(),
        );
    }
}

/// `log.level`: a level or a filter `tracing` reads as meant.
fn validate_log(log: &LogConfig, found: &mut Found) {
    if let Some(level) = &log.level
        && let Err(why) = check_log_filter(level)
    {
        found.add(
            "log.level",
            format!("log.level: {level:?} is not a level or filter ({why})"),
        );
    }
}

/// `timeouts`: every phase's deadline longer than 0 (`shutdown_grace` may be 0).
fn validate_timeouts(timeouts: &Timeouts, found: &mut Found) {
    for (name, value) in [
        ("upstream_connect", timeouts.upstream_connect),
        ("greeting", timeouts.greeting),
        ("tls_handshake", timeouts.tls_handshake),
        ("idle", timeouts.idle),
        ("data", timeouts.data),
        ("idle_after_login", timeouts.idle_after_login),
    ] {
        if value.is_zero() {
            found.add(
                &format!("timeouts.{name}"),
                format!("timeouts.{name}: must be longer than 0"),
            );
        }
    }
}

/// Upstreams that lead back to their own listener.
///
/// An upstream that is another listener's address is a chain (an implicit-TLS listener in
/// front of a STARTTLS one on loopback, say), which ends at a real upstream: allowed. A
/// cycle never ends: each client connection would become sessions without end, each a
/// connection from mailmoat to itself (one client made 40 before the review stopped it).
/// Only cycles are refused, the one-listener cycle (an upstream that is the listener's own
/// address, a wildcard's included) among them.
fn upstream_loops(listeners: &[ListenerDraft], host: &dyn Host, found: &mut Found) {
    let listening: Vec<(usize, SocketAddr)> = listeners
        .iter()
        .enumerate()
        .filter_map(|(index, l)| Some((index, l.listen?)))
        .collect();
    // The listener each upstream reaches, if it is one.
    let next: Vec<Option<usize>> = listeners
        .iter()
        .map(|l| match l.upstream {
            Some(UpstreamAddr::Tcp(to)) => sockets::receiver(&listening, to, host),
            _ => None,
        })
        .collect();
    let name = |index: usize| {
        let listener = &listeners[index];
        listener
            .name
            .clone()
            .unwrap_or_else(|| listener.subject(index))
    };
    for (index, listener) in listeners.iter().enumerate() {
        let (Some(listen), Some(upstream)) = (listener.listen, &listener.upstream) else {
            continue;
        };
        let mut cycle = vec![index];
        let mut reached = next[index];
        while let Some(hop) = reached
            && !cycle.contains(&hop)
        {
            cycle.push(hop);
            reached = next[hop];
        }
        if reached != Some(index) {
            continue;
        }
        let at = listener.subject(index);
        let how = if cycle.len() == 1 {
            format!("is this listener's own address ({listen})")
        } else {
            let names: Vec<String> = cycle.iter().chain([&index]).map(|&i| name(i)).collect();
            format!("leads back to this listener ({})", names.join(" -> "))
        };
        found.add(
            &format!("listeners[{index}].upstream"),
            format!(
                "{at}.upstream: {upstream} {how}: each connection would be relayed to \
                 mailmoat itself, again and again"
            ),
        );
    }
}

impl ListenerConfig {
    /// Whether `ip` is one of the trusted balancers of `proxy_protocol_from`.
    pub fn is_balancer(&self, ip: std::net::IpAddr) -> bool {
        self.proxy_protocol_from.iter().any(|net| net.contains(ip))
    }

    /// Whether `ip` is one of the named devices of `exempt_networks`.
    pub fn is_exempt(&self, ip: std::net::IpAddr) -> bool {
        self.exempt_networks.iter().any(|net| net.contains(ip))
    }

    /// What is wrong with the client-identity keys (ARCHITECTURE.md §7), each with the key it is
    /// about.
    fn identity_problems(&self, allow_remote_plaintext: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !self.exempt_networks.is_empty() && self.tls == TlsMode::Implicit {
            problems.push((
                "exempt_networks",
                "an implicit-TLS listener has no plaintext to allow; \
                 exempt devices connect to a STARTTLS listener"
                    .to_owned(),
            ));
        }
        if !self.exempt_networks.is_empty()
            && self.protocol == Protocol::Smtp
            && self.source_address.is_none()
            && self.upstream_proxy_protocol.is_none()
        {
            problems.push((
                "exempt_networks",
                "give exempt SMTP sessions an identity of their own \
                 (source_address or upstream_proxy_protocol): they are relayed unchanged, and \
                 an upstream that trusts mailmoat's address (smtpd_authorized_xclient_hosts \
                 for another listener's xclient, mynetworks) would believe a device's own \
                 XCLIENT"
                    .to_owned(),
            ));
        }
        if !self.exempt_networks.is_empty() && self.xclient {
            problems.push((
                "exempt_networks",
                "not with xclient: an exempt session's bytes reach the \
                 upstream unchanged, and an upstream that trusts mailmoat's XCLIENT would \
                 believe the device's"
                    .to_owned(),
            ));
        }
        if self.bare_newlines.is_some() && self.protocol != Protocol::Smtp {
            problems.push((
                "bare_newlines",
                "applies to SMTP message bodies only; IMAP and POP3 bytes \
                 pass unchanged"
                    .to_owned(),
            ));
        }
        if self.xclient && self.protocol != Protocol::Smtp {
            problems.push((
                "xclient",
                "XCLIENT is an SMTP extension (Postfix); use \
                 upstream_proxy_protocol for IMAP and POP3"
                    .to_owned(),
            ));
        }
        if self.xclient && self.upstream_proxy_protocol.is_some() {
            problems.push((
                "xclient",
                "choose either xclient or upstream_proxy_protocol; both carry the \
                 client's address, and behind PROXY Postfix checks \
                 smtpd_authorized_xclient_hosts against the client, not mailmoat"
                    .to_owned(),
            ));
        }
        if let Some(source) = self.source_address {
            match &self.upstream {
                UpstreamAddr::Unix(_) => problems.push((
                    "source_address",
                    format!(
                        "{source} is meaningless for the unix socket upstream {}",
                        self.upstream
                    ),
                )),
                UpstreamAddr::Tcp(upstream) if upstream.is_ipv4() != source.is_ipv4() => problems
                    .push((
                        "source_address",
                        format!(
                            "{source} and the upstream {upstream} are of different address \
                             families"
                        ),
                    )),
                UpstreamAddr::Tcp(_) => {}
            }
            if !source.is_loopback() && !allow_remote_plaintext {
                problems.push((
                    "source_address",
                    format!(
                        "{source} is not a loopback address; plaintext would cross the \
                         network (set allow_remote_plaintext: true to accept)"
                    ),
                ));
            }
        }
        problems
    }
}

/// Far more than descriptors allow (two per connection).
const MAX_CONNECTIONS_LIMIT: usize = 10_000_000;

/// A level (`info`), or `RUST_LOG`-style directives
/// (`info,mailmoat::inbound::driver=debug`). A lone word that is no level would be read
/// as a target name and silence everything else: refused.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if !filter.contains(['=', ',', '[']) && !LEVELS.contains(&filter.to_ascii_lowercase().as_str())
    {
        return Err(format!("expected one of {}", LEVELS.join(", ")));
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|err| err.to_string())
}

/// serde_yaml appends ` at line L column C`; the line is reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("3d"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
    }

    #[test]
    fn upstream_addresses() {
        let parse = |s: &str| serde_yaml::from_str::<UpstreamAddr>(s);
        assert_eq!(
            parse("127.0.0.1:2525").unwrap(),
            UpstreamAddr::Tcp("127.0.0.1:2525".parse().unwrap())
        );
        assert_eq!(
            parse("unix:/run/legacy/smtp.sock").unwrap(),
            UpstreamAddr::Unix("/run/legacy/smtp.sock".into())
        );
        assert!(parse("unix:relative.sock").is_err());
        assert!(parse("localhost:25").is_err());
        assert!(UpstreamAddr::Tcp("[::1]:25".parse().unwrap()).is_local());
        assert!(!UpstreamAddr::Tcp("192.0.2.1:25".parse().unwrap()).is_local());
    }

    #[test]
    fn max_errors_is_read_and_must_be_at_least_one() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let yaml = |limits: &str| {
            format!(
                "tls: {{ certificates: [{{ cert: {file}, key: {file} }}] }}\nlimits: {{ {limits} }}\n\
                 listeners:\n  - {{ name: l, protocol: smtp, listen: \"127.0.0.1:2587\", \
                 upstream: \"127.0.0.1:2588\" }}\n"
            )
        };
        let (config, _) = Config::parse_on(&yaml("max_errors: 5"), "x", &FakeHost).unwrap();
        assert_eq!(config.limits.max_errors, 5);
        let (default, _) = Config::parse_on(&yaml(""), "x", &FakeHost).unwrap();
        assert_eq!(default.limits.max_errors, 20);
        let err = Config::parse_on(&yaml("max_errors: 0"), "x", &FakeHost).unwrap_err();
        let problems: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(
            problems,
            vec![(Some(2), "limits.max_errors: must be at least 1")]
        );
    }

    #[test]
    fn the_outbound_section_takes_its_defaults_and_each_problem_has_its_line() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let yaml = |outbound: &str| {
            format!(
                "tls: {{ certificates: [{{ cert: {file}, key: {file} }}] }}\n\
                 listeners:\n  - {{ name: l, protocol: smtp, listen: \"127.0.0.1:2587\", \
                 upstream: \"127.0.0.1:2588\" }}\noutbound:\n{outbound}"
            )
        };
        let minimal = "  listen: \"127.0.0.1:10026\"\n  hostname: mail.example.test\n  \
                       resolver: \"127.0.0.1:53\"\n";
        let (config, _) = Config::parse_on(&yaml(minimal), "x", &FakeHost).unwrap();
        let outbound = config.outbound.unwrap();
        assert_eq!(outbound.tls_floor, TlsFloor::Opportunistic);
        assert_eq!(outbound.mx_port, 25);
        assert_eq!(outbound.max_message_size, 50 * 1024 * 1024);
        let networks: Vec<_> = outbound
            .relay_networks
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(networks, ["127.0.0.0/8", "::1/128"]);
        assert!(outbound.relay_networks.iter().all(Cidr::is_loopback));
        let (none, _) = Config::parse_on(&yaml("  null\n"), "x", &FakeHost).unwrap();
        assert!(none.outbound.is_none());

        let bad = "  listen: \"127.0.0.1:2587\"\n  hostname: localhost\n  \
                   resolver: \"0.0.0.0:53\"\n  relay_networks: []\n  \
                   domain_tls_floor: { Example.ORG: verify, \"b\\u00fccher.example\": verify }\n  \
                   max_message_size: 10\n  mx_port: 0\n  extra_ca_file: /nonexistent/ca.pem\n";
        let err = Config::parse_on(&yaml(bad), "x", &FakeHost).unwrap_err();
        let problems: Vec<_> = err
            .problems
            .iter()
            .map(|p| format!("{:?} {}", p.line, p.message))
            .collect();
        assert_eq!(
            problems,
            [
                "Some(5) outbound.listen: 127.0.0.1:2587 overlaps 127.0.0.1:2587 of \
                 listeners[0] (l): Linux binds only one of them, so `mailmoat run` would \
                 fail (address in use)",
                "Some(6) outbound.hostname: `localhost` is not a fully qualified host name \
                 (MXes check the EHLO name against the sending address's PTR record)",
                "Some(7) outbound.resolver: 0.0.0.0:53 is no address to send queries to",
                "Some(8) outbound.relay_networks: empty, so no client could relay; leave it \
                 out for loopback only",
                "Some(9) outbound.domain_tls_floor: `Example.ORG` is not a domain as DNS \
                 names it (lower case, A-labels, no trailing dot)",
                "Some(9) outbound.domain_tls_floor: `bücher.example` is not a domain as DNS \
                 names it (lower case, A-labels, no trailing dot)",
                "Some(10) outbound.max_message_size: 10 is outside 1024..=2147483648 bytes",
                "Some(11) outbound.mx_port: 0 is no port",
                "Some(12) outbound.extra_ca_file: /nonexistent/ca.pem: No such file or \
                 directory (os error 2)",
            ]
        );
    }

    /// A host whose own addresses are loopback and 192.0.2.2; `[::]` takes IPv4.
    struct FakeHost;

    impl Host for FakeHost {
        fn ipv6_only(&self) -> bool {
            false
        }
        fn is_own_address(&self, ip: IpAddr) -> bool {
            ip.is_loopback() || ip.is_unspecified() || ip == IpAddr::from([192, 0, 2, 2])
        }
    }

    /// The messages for these listeners (`listen -> upstream` each) on [`FakeHost`].
    fn loops(listeners: &[(&str, &str)]) -> Vec<String> {
        // Any file that exists stands in for the certificate.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let mut yaml = format!(
            "allow_remote_plaintext: true\ntls: {{ certificates: [{{ cert: {file}, key: {file} }}] }}\nlisteners:\n"
        );
        for (index, (listen, upstream)) in listeners.iter().enumerate() {
            yaml.push_str(&format!(
                "  - {{ name: l{index}, protocol: smtp, listen: \"{listen}\", upstream: \"{upstream}\" }}\n"
            ));
        }
        match Config::parse_on(&yaml, "x", &FakeHost) {
            Ok(_) => Vec::new(),
            Err(err) => err
                .problems
                .into_iter()
                .map(|p| format!("{:?}: {}", p.line, p.message))
                .collect(),
        }
    }

    #[test]
    fn an_upstream_that_leads_back_to_its_listener_is_refused() {
        let own = |line: usize, index: usize, upstream: &str, listen: &str| {
            vec![format!(
                "Some({line}): listeners[{index}] (l{index}).upstream: {upstream} is this \
                 listener's own address ({listen}): each connection would be relayed to \
                 mailmoat itself, again and again"
            )]
        };
        for (listen, upstream) in [
            ("127.0.0.1:2525", "127.0.0.1:2525"),
            ("0.0.0.0:2525", "127.0.0.1:2525"),
            ("0.0.0.0:2525", "127.9.9.9:2525"),
            ("0.0.0.0:2525", "192.0.2.2:2525"),
            ("0.0.0.0:2525", "0.0.0.0:2525"),
            ("[::]:2525", "127.0.0.1:2525"),
            ("[::]:2525", "[::1]:2525"),
            ("[::]:2525", "[::ffff:127.0.0.1]:2525"),
            ("[::ffff:127.0.0.1]:2525", "127.0.0.1:2525"),
        ] {
            assert_eq!(
                loops(&[(listen, upstream)]),
                own(4, 0, upstream, listen),
                "{listen}"
            );
        }
        // Not loops: another host on the same port (the legacy MX elsewhere), another
        // port, and an IPv6 upstream that no IPv4 listener takes (refused, not looped).
        for (listen, upstream) in [
            ("0.0.0.0:25", "192.0.2.9:25"),
            ("0.0.0.0:25", "127.0.0.1:2525"),
            ("0.0.0.0:2525", "[::1]:2525"),
            ("127.0.0.1:2525", "127.0.0.2:2525"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            assert_eq!(
                loops(&[(listen, upstream)]),
                Vec::<String>::new(),
                "{listen}"
            );
        }
        // A chain ends at a real upstream; a cycle does not.
        assert_eq!(
            loops(&[
                ("[::]:465", "127.0.0.1:2587"),
                ("127.0.0.1:2587", "127.0.0.1:2588")
            ]),
            Vec::<String>::new()
        );
        let cycle = loops(&[
            ("[::]:465", "127.0.0.1:2587"),
            ("127.0.0.1:2587", "127.0.0.1:2588"),
            ("127.0.0.1:2588", "127.0.0.1:465"),
        ]);
        assert_eq!(
            cycle,
            [
                "Some(4): listeners[0] (l0).upstream: 127.0.0.1:2587 leads back to this \
                 listener (l0 -> l1 -> l2 -> l0): each connection would be relayed to mailmoat \
                 itself, again and again",
                "Some(5): listeners[1] (l1).upstream: 127.0.0.1:2588 leads back to this \
                 listener (l1 -> l2 -> l0 -> l1): each connection would be relayed to mailmoat \
                 itself, again and again",
                "Some(6): listeners[2] (l2).upstream: 127.0.0.1:465 leads back to this \
                 listener (l2 -> l0 -> l1 -> l2): each connection would be relayed to mailmoat \
                 itself, again and again",
            ]
        );
        // A listener that leads into a cycle it is not part of is a chain.
        assert_eq!(
            loops(&[
                ("127.0.0.1:25", "127.0.0.1:26"),
                ("127.0.0.1:26", "127.0.0.1:26")
            ]),
            own(5, 1, "127.0.0.1:26", "127.0.0.1:26")
        );
    }

    #[test]
    fn a_dual_stack_wildcard_beside_ipv4_is_refused_unless_ipv6_only() {
        struct V6Only;
        impl Host for V6Only {
            fn ipv6_only(&self) -> bool {
                true
            }
            fn is_own_address(&self, ip: IpAddr) -> bool {
                ip.is_loopback()
            }
        }
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let yaml = format!(
            "tls: {{ certificates: [{{ cert: {file}, key: {file} }}] }}\nlisteners:\n  \
             - {{ name: a, protocol: smtp, listen: \"0.0.0.0:25\", upstream: \"127.0.0.1:2525\" }}\n  \
             - {{ name: b, protocol: smtp, listen: \"[::]:25\", upstream: \"127.0.0.1:2525\" }}\n"
        );
        assert!(Config::parse_on(&yaml, "x", &V6Only).is_ok());
        let err = Config::parse_on(&yaml, "x", &FakeHost).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "x:4: listeners[1] (b).listen: [::]:25 overlaps 0.0.0.0:25 of listeners[0] (a), line 3"
            ),
            "{err}"
        );
    }
}
