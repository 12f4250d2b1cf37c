//! Reads the configuration file's YAML tree, which keeps the line of every node, into a
//! [`Draft`] of the typed configuration. Every unknown key, missing key and refused value
//! is reported with its own line, and reading goes on past each: serde stops at the first.
//!
//! Each value is checked by its own type's `Deserialize`, through `serde_yaml` on that
//! value alone, so a value is accepted or refused here as in the typed build that follows
//! (see [`super::Config::parse`]), with the same message. Only the structure (which keys,
//! which are required, what is a mapping or a list) is spelt out here; a unit test holds it
//! to the serde structs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use saphyr::{MarkedYaml, ScalarStyle, ScanError, YamlData, YamlLoader};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use std::collections::BTreeMap;

use super::{
    CertificateConfig, Config, Limits, ListenerConfig, LogConfig, LogFormat, MetricsConfig,
    OutboundConfig, Positions, Problem, Protocol, StrippingResponse, Timeouts, TlsConfig, TlsFloor,
    TlsMode, TlsVersion, UpstreamAddr, de_duration, de_socket_addr, strip_location,
};
use crate::inbound::identity::{Cidr, ProxyVersion};
use crate::policy::{BareNewlines, Policy};

/// The configuration as far as it could be read: values that were refused, and entries
/// missing a required key, are left out (refused optional values take their defaults), so
/// that the checks across the file still run on everything else.
#[derive(Debug, Default)]
pub(super) struct Draft {
    /// `tls.certificates`, one per entry (`None`: incomplete); `None` when the list is
    /// missing or no list.
    pub certificates: Option<Vec<Option<CertificateConfig>>>,
    pub min_tls_version: TlsVersion,
    /// `listeners`, one per entry; `None` when the list is missing or no list.
    pub listeners: Option<Vec<ListenerDraft>>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub log: LogConfig,
    pub metrics: Option<MetricsConfig>,
    pub user_hash_key: Option<String>,
    pub allow_remote_plaintext: bool,
    /// `outbound`, when present and its required keys are all there and valid.
    pub outbound: Option<OutboundConfig>,
}

/// One `listeners` entry. The keys that checks across listeners need are kept on their
/// own, so that a listener with another key wrong still takes part in them.
#[derive(Debug, Default)]
pub(super) struct ListenerDraft {
    pub name: Option<String>,
    pub listen: Option<SocketAddr>,
    pub upstream: Option<UpstreamAddr>,
    pub reuse_port: bool,
    /// The whole listener, when its required keys are all there and valid.
    pub config: Option<ListenerConfig>,
}

impl ListenerDraft {
    /// How messages name the listener at `index`: `listeners[1] (submission)`.
    pub fn subject(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("listeners[{index}] ({name})"),
            None => format!("listeners[{index}]"),
        }
    }
}

/// What reading found: the problems, and where every key is.
#[derive(Debug, Default)]
pub(super) struct Reader {
    pub problems: Vec<Problem>,
    pub positions: Positions,
    /// The keys read at each mapping, in order (for the test that holds them to serde).
    #[cfg(test)]
    pub known: std::collections::BTreeMap<String, Vec<&'static str>>,
}

impl Reader {
    fn problem(&mut self, line: Option<usize>, path: &str, message: String) {
        let message = if path.is_empty() {
            message
        } else {
            format!("{path}: {message}")
        };
        self.problems.push(Problem { line, message });
    }
}

/// Reads `text`; the draft is `None` when the text is no YAML mapping at all.
pub(super) fn read(text: &str) -> (Option<Draft>, Reader) {
    let mut r = Reader::default();
    let documents = match load(text) {
        Ok(documents) => documents,
        Err(err) => {
            r.problem(
                Some(err.marker().line()),
                "",
                format!("invalid YAML: {}", err.info()),
            );
            return (None, r);
        }
    };
    if let Some(second) = documents.get(1) {
        r.problem(
            Some(line(second)),
            "",
            "deserializing from YAML containing more than one document is not supported".into(),
        );
    }
    let fields = match documents.first().map(untagged) {
        // An empty file: every required key is missing.
        None => Fields::empty(),
        Some(root) => match &root.data {
            YamlData::BadValue => Fields::empty(),
            YamlData::Mapping(_) => Fields::new(String::new(), root, None),
            _ => {
                if let Err(message) = from_node::<Config>(root) {
                    r.problem(Some(line(root)), "", message);
                }
                return (None, r);
            }
        },
    };
    let draft = config(&mut r, fields);
    (Some(draft), r)
}

/// The documents of `text`, scalars unresolved: each is resolved by the type that reads
/// it, as serde_yaml does (`5` is a string where a string is expected).
fn load(text: &str) -> Result<Vec<MarkedYaml<'_>>, ScanError> {
    let mut loader = YamlLoader::<MarkedYaml>::default();
    loader.early_parse(false);
    let mut parser = saphyr_parser::Parser::new_from_str(text);
    parser.load(&mut loader, true)?;
    if let Some(err) = loader.error() {
        return Err(err.clone());
    }
    Ok(loader.into_documents())
}

fn config(r: &mut Reader, mut f: Fields<'_>) -> Draft {
    let mut draft = Draft::default();
    f.require("tls");
    if let Some(tls) = f.map::<TlsConfig>(r, "tls") {
        (draft.certificates, draft.min_tls_version) = self::tls(r, tls);
    }
    f.require("listeners");
    draft.listeners = f
        .list_of_maps::<ListenerConfig>(r, "listeners")
        .map(|entries| {
            entries
                .into_iter()
                .map(|entry| entry.map_or_else(ListenerDraft::default, |e| listener(r, e)))
                .collect()
        });
    if let Some(limits) = f.map::<Limits>(r, "limits") {
        draft.limits = self::limits(r, limits);
    }
    if let Some(timeouts) = f.map::<Timeouts>(r, "timeouts") {
        draft.timeouts = self::timeouts(r, timeouts);
    }
    if let Some(log) = f.map::<LogConfig>(r, "log") {
        draft.log = self::log(r, log);
    }
    if let Some(mut metrics) = f.map::<Option<MetricsConfig>>(r, "metrics") {
        let listen = metrics.required(r, "listen", parsed::<ListenAddr>);
        metrics.finish(r);
        draft.metrics = listen.map(|ListenAddr(listen)| MetricsConfig { listen });
    }
    draft.user_hash_key = f.get(r, "user_hash_key", typed::<Option<String>>).flatten();
    draft.allow_remote_plaintext = f
        .get(r, "allow_remote_plaintext", typed::<bool>)
        .unwrap_or_default();
    if let Some(outbound) = f.map::<Option<OutboundConfig>>(r, "outbound") {
        draft.outbound = self::outbound(r, outbound);
    }
    f.finish(r);
    draft
}

fn outbound(r: &mut Reader, mut f: Fields<'_>) -> Option<OutboundConfig> {
    let listen = f.required(r, "listen", parsed::<ListenAddr>);
    // An empty list is the operator's own choice (nobody may relay); a missing one is
    // the default, loopback.
    let relay_networks_given = f.has("relay_networks");
    let relay_networks = f.list(r, "relay_networks", parsed::<Cidr>);
    let hostname = f.required(r, "hostname", typed::<String>);
    let source_address = f
        .get(r, "source_address", typed::<Option<IpAddr>>)
        .flatten();
    let resolver = f.required(r, "resolver", parsed::<ListenAddr>);
    let tls_floor = f.get(r, "tls_floor", typed::<TlsFloor>).unwrap_or_default();
    let domain_tls_floor = f
        .map::<BTreeMap<String, TlsFloor>>(r, "domain_tls_floor")
        .map(|floors| floors.entries(r, typed::<TlsFloor>).into_iter().collect())
        .unwrap_or_default();
    let extra_ca_file = f
        .get(r, "extra_ca_file", typed::<Option<PathBuf>>)
        .flatten();
    let mta_sts_cache_dir = f
        .get(r, "mta_sts_cache_dir", typed::<Option<PathBuf>>)
        .flatten();
    let max_message_size = f.get(r, "max_message_size", typed::<u64>);
    let mx_port = f.get(r, "mx_port", typed::<u16>);
    let starttls_stripping = f
        .get(r, "starttls_stripping", typed::<StrippingResponse>)
        .unwrap_or_default();
    let dnssec_check_signed = f.get(r, "dnssec_check_signed", typed::<String>);
    let dnssec_check_bogus = f.get(r, "dnssec_check_bogus", typed::<String>);
    f.finish(r);
    let defaults: OutboundConfig =
        serde_yaml::from_str("{listen: \"127.0.0.1:1\", hostname: x, resolver: \"127.0.0.1:53\"}")
            .ok()?;
    Some(OutboundConfig {
        listen: listen?.0,
        relay_networks: if relay_networks_given {
            relay_networks
        } else {
            defaults.relay_networks
        },
        hostname: hostname?,
        source_address,
        resolver: resolver?.0,
        tls_floor,
        domain_tls_floor,
        extra_ca_file,
        mta_sts_cache_dir,
        max_message_size: max_message_size.unwrap_or(defaults.max_message_size),
        mx_port: mx_port.unwrap_or(defaults.mx_port),
        starttls_stripping,
        dnssec_check_signed: dnssec_check_signed.unwrap_or(defaults.dnssec_check_signed),
        dnssec_check_bogus: dnssec_check_bogus.unwrap_or(defaults.dnssec_check_bogus),
    })
}

type Certificates = Option<Vec<Option<CertificateConfig>>>;

fn tls(r: &mut Reader, mut f: Fields<'_>) -> (Certificates, TlsVersion) {
    f.require("certificates");
    let certificates = f
        .list_of_maps::<CertificateConfig>(r, "certificates")
        .map(|entries| {
            entries
                .into_iter()
                .map(|entry| {
                    let mut f = entry?;
                    let cert = f.required(r, "cert", typed::<PathBuf>);
                    let key = f.required(r, "key", typed::<PathBuf>);
                    f.finish(r);
                    Some(CertificateConfig {
                        cert: cert?,
                        key: key?,
                    })
                })
                .collect()
        });
    let version = f
        .get(r, "min_tls_version", typed::<TlsVersion>)
        .unwrap_or_default();
    f.finish(r);
    (certificates, version)
}

fn listener(r: &mut Reader, mut f: Fields<'_>) -> ListenerDraft {
    let name = f.required(r, "name", typed::<String>);
    let protocol = f.required(r, "protocol", typed::<Protocol>);
    let listen = f
        .required(r, "listen", parsed::<ListenAddr>)
        .map(|ListenAddr(addr)| addr);
    let tls = f.get(r, "tls", typed::<TlsMode>).unwrap_or_default();
    let policy = f.get(r, "policy", typed::<Policy>).unwrap_or_default();
    let upstream = f.required(r, "upstream", parsed::<UpstreamAddr>);
    let bare_newlines = f
        .get(r, "bare_newlines", typed::<Option<BareNewlines>>)
        .flatten();
    let proxy_protocol_from = f.list(r, "proxy_protocol_from", parsed::<Cidr>);
    let upstream_proxy_protocol = f
        .get(r, "upstream_proxy_protocol", typed::<Option<ProxyVersion>>)
        .flatten();
    let xclient = f.get(r, "xclient", typed::<bool>).unwrap_or_default();
    let source_address = f
        .get(r, "source_address", typed::<Option<IpAddr>>)
        .flatten();
    let exempt_networks = f.list(r, "exempt_networks", parsed::<Cidr>);
    let reuse_port = f.get(r, "reuse_port", typed::<bool>).unwrap_or_default();
    f.finish(r);
    let config = match (&name, protocol, listen, &upstream) {
        (Some(name), Some(protocol), Some(listen), Some(upstream)) => Some(ListenerConfig {
            name: name.clone(),
            protocol,
            listen,
            tls,
            policy,
            upstream: upstream.clone(),
            bare_newlines,
            proxy_protocol_from,
            upstream_proxy_protocol,
            xclient,
            source_address,
            exempt_networks,
            reuse_port,
        }),
        _ => None,
    };
    ListenerDraft {
        name,
        listen,
        upstream,
        reuse_port,
        config,
    }
}

fn limits(r: &mut Reader, mut f: Fields<'_>) -> Limits {
    let mut limits = Limits::default();
    if let Some(value) = f.get(r, "max_line_len", typed::<usize>) {
        limits.max_line_len = value;
    }
    if let Some(value) = f.get(r, "max_connections", typed::<usize>) {
        limits.max_connections = value;
    }
    if let Some(value) = f.get(r, "max_literal_len", typed::<u64>) {
        limits.max_literal_len = value;
    }
    if let Some(value) = f.get(r, "max_plaintext_commands", typed::<u32>) {
        limits.max_plaintext_commands = value;
    }
    if let Some(value) = f.get(r, "max_connections_per_client", typed::<usize>) {
        limits.max_connections_per_client = value;
    }
    if let Some(value) = f.get(r, "max_errors", typed::<u32>) {
        limits.max_errors = value;
    }
    f.finish(r);
    limits
}

fn timeouts(r: &mut Reader, mut f: Fields<'_>) -> Timeouts {
    let mut timeouts = Timeouts::default();
    for (key, value) in [
        ("upstream_connect", &mut timeouts.upstream_connect),
        ("greeting", &mut timeouts.greeting),
        ("tls_handshake", &mut timeouts.tls_handshake),
        ("idle", &mut timeouts.idle),
        ("data", &mut timeouts.data),
        ("idle_after_login", &mut timeouts.idle_after_login),
        ("shutdown_grace", &mut timeouts.shutdown_grace),
    ] {
        if let Some(Timeout(duration)) = f.get(r, key, parsed::<Timeout>) {
            *value = duration;
        }
    }
    f.finish(r);
    timeouts
}

fn log(r: &mut Reader, mut f: Fields<'_>) -> LogConfig {
    let format = f.get(r, "format", typed::<LogFormat>).unwrap_or_default();
    let level = f.get(r, "level", typed::<Option<String>>).flatten();
    f.finish(r);
    LogConfig { format, level }
}

/// A `listen` address, read as [`de_socket_addr`] reads it for the typed build.
struct ListenAddr(SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        de_socket_addr(deserializer).map(ListenAddr)
    }
}

/// A timeout, read as [`de_duration`] reads it for the typed build.
struct Timeout(Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        de_duration(deserializer).map(Timeout)
    }
}

/// Whose path a refused value is reported at, as serde_yaml reports it: a value of the
/// wrong type (`listeners[0].policy: unknown variant`) at its key; a string that the
/// type's own parser refused at the mapping or list around it (`timeouts: `5 minutes`:
/// expected a duration`), its message naming the value.
#[derive(Debug, Clone, Copy)]
enum Blame {
    Key,
    Container,
}

/// How one value is read.
type Leaf<T> = fn(&MarkedYaml<'_>) -> Result<T, (Blame, String)>;

/// A value of a type serde reads itself (numbers, booleans, enums, strings).
fn typed<T: DeserializeOwned>(node: &MarkedYaml<'_>) -> Result<T, (Blame, String)> {
    from_node(node).map_err(|message| (Blame::Key, message))
}

/// A string that the type then parses (addresses, durations, networks).
fn parsed<T: DeserializeOwned>(node: &MarkedYaml<'_>) -> Result<T, (Blame, String)> {
    from_node::<String>(node).map_err(|message| (Blame::Key, message))?;
    from_node(node).map_err(|message| (Blame::Container, message))
}

/// `T` read from this node alone, by serde_yaml; its message without serde_yaml's
/// position, which would be the position in the node's own text.
fn from_node<T: DeserializeOwned>(node: &MarkedYaml<'_>) -> Result<T, String> {
    serde_yaml::from_str(&yaml_text(node)).map_err(|err| strip_location(&err.to_string()))
}

/// YAML text that serde_yaml reads as it would read `node` in place. A mapping or list is
/// only ever read here to report that it is not what was expected, so its shape is
/// enough.
fn yaml_text(node: &MarkedYaml<'_>) -> String {
    match &untagged(node).data {
        YamlData::Representation(text, ScalarStyle::Plain, _) if text.is_empty() => "~".into(),
        YamlData::Representation(text, ScalarStyle::Plain, _) => text.to_string(),
        // Quoted or block text: the same characters as one double-quoted scalar (a JSON
        // string is one).
        YamlData::Representation(text, _, _) => {
            serde_json::to_string(text.as_ref()).unwrap_or_default()
        }
        YamlData::Sequence(_) => "[]".into(),
        YamlData::Mapping(_) => "{}".into(),
        _ => "~".into(),
    }
}

/// Tags on mappings and lists are not mailmoat's: the typed build refuses what they
/// change.
fn untagged<'n, 'a>(node: &'n MarkedYaml<'a>) -> &'n MarkedYaml<'a> {
    match &node.data {
        YamlData::Tagged(_, inner) => untagged(inner),
        _ => node,
    }
}

fn line(node: &MarkedYaml<'_>) -> usize {
    node.span.start.line()
}

/// Reads `node` with `leaf`; a refusal is reported at `path` or `container`.
fn check<T>(
    r: &mut Reader,
    container: &str,
    path: &str,
    node: &MarkedYaml<'_>,
    leaf: Leaf<T>,
) -> Option<T> {
    match leaf(node) {
        Ok(value) => Some(value),
        Err((blame, message)) => {
            let at = match blame {
                Blame::Key => path,
                Blame::Container => container,
            };
            r.problem(Some(line(node)), at, message);
            None
        }
    }
}

/// The items of a list; when `node` is no list, `T`'s own refusal of it is reported.
fn items<'n, 'a, T: DeserializeOwned>(
    r: &mut Reader,
    path: &str,
    node: &'n MarkedYaml<'a>,
) -> Option<&'n [MarkedYaml<'a>]> {
    match &untagged(node).data {
        YamlData::Sequence(items) => Some(items),
        _ => {
            if let Err(message) = from_node::<T>(node) {
                r.problem(Some(line(node)), path, message);
            }
            None
        }
    }
}

/// The mapping in `node`; when it is none, `T`'s own refusal of it is reported (and
/// nothing when `T` takes it, as `Option` takes null).
fn mapping<'n, 'a, T: DeserializeOwned>(
    r: &mut Reader,
    path: String,
    node: &'n MarkedYaml<'a>,
    at: usize,
) -> Option<Fields<'n>> {
    let node = untagged(node);
    match &node.data {
        YamlData::Mapping(_) => Some(Fields::new(path, node, Some(at))),
        _ => {
            if let Err(message) = from_node::<T>(node) {
                r.problem(Some(line(node)), &path, message);
            }
            None
        }
    }
}

/// One mapping being read into a struct: each key is taken by name; what is left at the
/// end is unknown.
struct Fields<'n> {
    /// `listeners[0]`; empty for the top level.
    path: String,
    /// Its line: the line of its key, or of its `-` in a list; `None` for the top level.
    line: Option<usize>,
    entries: Vec<Entry<'n>>,
    /// The keys taken so far, in order: what an unknown key is told to be instead.
    known: Vec<&'static str>,
    /// Required keys that are not there.
    missing: Vec<&'static str>,
}

struct Entry<'n> {
    key: String,
    line: usize,
    value: &'n MarkedYaml<'n>,
    taken: bool,
}

impl<'n> Fields<'n> {
    fn empty() -> Fields<'n> {
        Fields {
            path: String::new(),
            line: None,
            entries: Vec::new(),
            known: Vec::new(),
            missing: Vec::new(),
        }
    }

    fn new<'a: 'n>(path: String, node: &'n MarkedYaml<'a>, line: Option<usize>) -> Fields<'n> {
        let entries = match &node.data {
            YamlData::Mapping(map) => map
                .iter()
                .map(|(key, value)| Entry {
                    key: match &key.data {
                        YamlData::Representation(text, _, _) => text.to_string(),
                        _ => yaml_text(key),
                    },
                    line: self::line(key),
                    value,
                    taken: false,
                })
                .collect(),
            _ => Vec::new(),
        };
        Fields {
            path,
            line,
            entries,
            known: Vec::new(),
            missing: Vec::new(),
        }
    }

    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Whether `key` is in the mapping at all.
    fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|e| e.key == key)
    }

    /// Notes `key` as missing when it is (reported by [`Fields::finish`]).
    fn require(&mut self, key: &'static str) {
        if !self.entries.iter().any(|e| e.key == key) {
            self.missing.push(key);
        }
    }

    /// The value of `key`, if there is one; its line is recorded.
    fn take(&mut self, r: &mut Reader, key: &'static str) -> Option<(&'n MarkedYaml<'n>, usize)> {
        self.known.push(key);
        let entry = self.entries.iter_mut().find(|e| e.key == key && !e.taken)?;
        entry.taken = true;
        let (value, at) = (entry.value, entry.line);
        r.positions.0.insert(self.child(key), at);
        Some((value, at))
    }

    /// The value of `key` read with `leaf`; `None` when absent or refused.
    fn get<T>(&mut self, r: &mut Reader, key: &'static str, leaf: Leaf<T>) -> Option<T> {
        let (node, _) = self.take(r, key)?;
        check(r, &self.path, &self.child(key), node, leaf)
    }

    /// [`Fields::get`] for a key that must be there.
    fn required<T>(&mut self, r: &mut Reader, key: &'static str, leaf: Leaf<T>) -> Option<T> {
        self.require(key);
        self.get(r, key, leaf)
    }

    /// A list of values, each read with `leaf`; those refused are left out.
    fn list<T>(&mut self, r: &mut Reader, key: &'static str, leaf: Leaf<T>) -> Vec<T> {
        let Some((node, _)) = self.take(r, key) else {
            return Vec::new();
        };
        let path = self.child(key);
        let Some(items) = items::<Vec<serde_yaml::Value>>(r, &path, node) else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| check(r, &path, &format!("{path}[{index}]"), item, leaf))
            .collect()
    }

    /// The mapping under `key`, for a struct `T`.
    fn map<T: DeserializeOwned>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
    ) -> Option<Fields<'n>> {
        let (node, at) = self.take(r, key)?;
        mapping::<T>(r, self.child(key), node, at)
    }

    /// Every entry of a mapping whose keys are data (domain names), each value read
    /// with `leaf`; those refused are left out.
    fn entries<T>(mut self, r: &mut Reader, leaf: Leaf<T>) -> Vec<(String, T)> {
        let mut read = Vec::new();
        for entry in &mut self.entries {
            entry.taken = true;
            let path = if self.path.is_empty() {
                entry.key.clone()
            } else {
                format!("{}.{}", self.path, entry.key)
            };
            r.positions.0.insert(path.clone(), entry.line);
            if let Some(value) = check(r, &self.path, &path, entry.value, leaf) {
                read.push((entry.key.clone(), value));
            }
        }
        read
    }

    /// The list of mappings under `key`, one per item (`None`: the item is no mapping).
    fn list_of_maps<T: DeserializeOwned>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
    ) -> Option<Vec<Option<Fields<'n>>>> {
        let (node, _) = self.take(r, key)?;
        let path = self.child(key);
        let items = items::<Vec<T>>(r, &path, node)?;
        Some(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    let path = format!("{path}[{index}]");
                    r.positions.0.insert(path.clone(), line(item));
                    mapping::<T>(r, path, item, line(item))
                })
                .collect(),
        )
    }

    /// Reports every key that was not taken, and every required key not there. A key
    /// misspelt is both: it is reported once, as unknown, with the missing key it is
    /// likely to be.
    fn finish(mut self, r: &mut Reader) {
        for entry in self.entries.iter().filter(|e| !e.taken) {
            let message = if self.known.contains(&entry.key.as_str()) {
                format!("duplicate field `{}`", entry.key)
            } else if let Some(index) = self
                .missing
                .iter()
                .position(|missing| looks_like(&entry.key, missing))
            {
                let meant = self.missing.remove(index);
                format!(
                    "unknown field `{}`, {} (did you mean `{meant}`?)",
                    entry.key,
                    expected(&self.known)
                )
            } else {
                format!("unknown field `{}`, {}", entry.key, expected(&self.known))
            };
            r.problem(Some(entry.line), &self.path, message);
        }
        for key in &self.missing {
            r.problem(self.line, &self.path, format!("missing field `{key}`"));
        }
        #[cfg(test)]
        r.known.insert(self.path, self.known);
    }
}

/// Whether `typed` is `key` with at most two letters wrong, left out, added or swapped
/// (optimal string alignment distance).
fn looks_like(typed: &str, key: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (typed.chars().collect(), key.chars().collect());
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    // d[i][j]: the distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()] <= 2
}

/// serde's wording for the keys an unknown one could have been.
fn expected(known: &[&str]) -> String {
    let quoted: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
    match quoted.as_slice() {
        [] => "there are no fields".to_owned(),
        [one] => format!("expected {one}"),
        [one, two] => format!("expected {one} or {two}"),
        all => format!("expected one of {}", all.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys serde's derive knows for a struct: the list it hands to
    /// `deserialize_struct`, caught by a deserializer that does nothing else.
    fn serde_keys<T: DeserializeOwned>() -> Vec<&'static str> {
        struct Catch<'a>(&'a mut Vec<&'static str>);
        impl<'de> Deserializer<'de> for Catch<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _name: &'static str,
                fields: &'static [&'static str],
                _visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend(fields);
                Err(serde::de::Error::custom("caught"))
            }
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _visitor: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut keys = Vec::new();
        let _ = T::deserialize(Catch(&mut keys));
        keys
    }

    /// Every section present, every list with an entry.
    const FULL: &str = "\
tls:
  certificates:
    - { cert: /c.pem, key: /k.pem }
  min_tls_version: \"1.3\"
listeners:
  - { name: a, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:25\" }
limits: { max_line_len: 1000 }
timeouts: { idle: 1m }
log: { format: json }
metrics: { listen: \"127.0.0.1:9925\" }
user_hash_key: k
outbound:
  listen: \"127.0.0.1:10026\"
  relay_networks: [10.0.0.0/8]
  hostname: mail.example.test
  source_address: 192.0.2.1
  resolver: \"127.0.0.1:53\"
  tls_floor: verify
  domain_tls_floor: { example.org: encrypt }
  extra_ca_file: /ca.pem
  mta_sts_cache_dir: /var/lib/mailmoat/mta-sts
  max_message_size: 1048576
  mx_port: 2525
  starttls_stripping: defer
  dnssec_check_signed: dane.test
  dnssec_check_bogus: bogus.test
";

    #[test]
    fn the_keys_read_are_the_keys_of_the_serde_structs() {
        let (_, r) = read(FULL);
        assert_eq!(r.problems, [], "{:?}", r.problems);
        let expected = [
            ("", serde_keys::<Config>()),
            ("tls", serde_keys::<TlsConfig>()),
            ("tls.certificates[0]", serde_keys::<CertificateConfig>()),
            ("listeners[0]", serde_keys::<ListenerConfig>()),
            ("limits", serde_keys::<Limits>()),
            ("timeouts", serde_keys::<Timeouts>()),
            ("log", serde_keys::<LogConfig>()),
            ("metrics", serde_keys::<MetricsConfig>()),
            ("outbound", serde_keys::<OutboundConfig>()),
        ];
        for (path, keys) in expected {
            assert!(!keys.is_empty(), "{path}");
            assert_eq!(r.known[path], keys, "{path}");
        }
        assert_eq!(r.known.len(), 9);
    }

    /// What the draft holds, in the typed build's terms, for comparison.
    fn as_built(draft: &Draft) -> String {
        let certificates: Vec<_> = draft.certificates.iter().flatten().flatten().collect();
        let listeners: Vec<_> = draft
            .listeners
            .iter()
            .flatten()
            .map(|l| l.config.as_ref())
            .collect();
        format!(
            "{certificates:?} {:?} {listeners:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            draft.min_tls_version,
            draft.limits,
            draft.timeouts,
            draft.log,
            draft.metrics,
            draft.user_hash_key,
            draft.allow_remote_plaintext,
            draft.outbound
        )
    }

    fn serde_built(config: &Config) -> String {
        let certificates: Vec<_> = config.tls.certificates.iter().collect();
        let listeners: Vec<_> = config.listeners.iter().map(Some).collect();
        format!(
            "{certificates:?} {:?} {listeners:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            config.tls.min_tls_version,
            config.limits,
            config.timeouts,
            config.log,
            config.metrics,
            config.user_hash_key,
            config.allow_remote_plaintext,
            config.outbound
        )
    }

    #[test]
    fn the_draft_of_a_good_file_holds_what_serde_builds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/config/valid");
        let mut texts = vec![
            FULL.to_owned(),
            include_str!("../../config/example.yaml").to_owned(),
        ];
        for entry in std::fs::read_dir(dir).unwrap() {
            texts.push(std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
        texts.push(
            "tls: { certificates: [{ cert: c, key: k }] }\nlisteners:\n  - name: 25\n    \
             protocol: pop3\n    listen: \"[::1]:0\"\n    upstream: unix:/x\n    \
             exempt_networks: [192.0.2.0/24, \"2001:db8::/32\"]\n    reuse_port: true\n    \
             bare_newlines: ~\nlimits: { max_line_len: 0x200 }\nuser_hash_key: 12\n"
                .to_owned(),
        );
        for text in texts {
            let (draft, r) = read(&text);
            assert_eq!(r.problems, [], "{text}");
            let config: Config = serde_yaml::from_str(&text).unwrap();
            assert_eq!(as_built(&draft.unwrap()), serde_built(&config), "{text}");
        }
    }

    fn problems(text: &str) -> Vec<(Option<usize>, String)> {
        let (_, r) = read(text);
        let mut problems: Vec<_> = r
            .problems
            .into_iter()
            .map(|p| (p.line, p.message))
            .collect();
        problems.sort_by_key(|(line, _)| *line);
        problems
    }

    #[test]
    fn every_problem_is_found_with_its_own_line() {
        let text = "\
tls:
  certificates:
    - { cert: /c.pem }
    - 5
  min_tls_version: 1.4
listeners:
  - { name: a, protocol: smtp, listen: \"127.0.0.1:0\", upstream: \"127.0.0.1:25\", xclient: perhaps }
  - name: b
    protocol: smtps
    listen: localhost:25
    upstream: \"127.0.0.1:25\"
    proxy_protocol_from: [10.0.0.0/8, 10.0.0.1/8, [x]]
    upstraem: x
  - { name: c, protocol: imap, upstream: \"127.0.0.1:143\",
      exempt_networks: 10.0.0.0/8 }
limits:
  max_line_len: lots
timeouts: { idle: 5 minutes, data: [1m] }
log: { level: [3] }
metrics:
extra: 1
";
        let at = |line: usize, message: &str| (Some(line), message.to_owned());
        assert_eq!(
            problems(text),
            [
                at(3, "tls.certificates[0]: missing field `key`"),
                at(
                    4,
                    "tls.certificates[1]: invalid type: integer `5`, expected struct CertificateConfig"
                ),
                at(
                    5,
                    "tls.min_tls_version: unknown variant `1.4`, expected `1.2` or `1.3`"
                ),
                at(
                    7,
                    "listeners[0].xclient: invalid type: string \"perhaps\", expected a boolean"
                ),
                at(
                    9,
                    "listeners[1].protocol: unknown variant `smtps`, expected one of `smtp`, `imap`, `pop3`"
                ),
                at(
                    10,
                    "listeners[1]: `localhost:25`: expected IP:port such as \"[::]:587\" or \"127.0.0.1:587\""
                ),
                at(
                    12,
                    "listeners[1].proxy_protocol_from: `10.0.0.1/8`: host bits are set (did you mean 10.0.0.0/8?)"
                ),
                at(
                    12,
                    "listeners[1].proxy_protocol_from[2]: invalid type: sequence, expected a string"
                ),
                at(
                    13,
                    "listeners[1]: unknown field `upstraem`, expected one of `name`, `protocol`, \
                     `listen`, `tls`, `policy`, `upstream`, `bare_newlines`, `proxy_protocol_from`, \
                     `upstream_proxy_protocol`, `xclient`, `source_address`, `exempt_networks`, \
                     `reuse_port`"
                ),
                at(14, "listeners[2]: missing field `listen`"),
                at(
                    15,
                    "listeners[2].exempt_networks: invalid type: string \"10.0.0.0/8\", expected a sequence"
                ),
                at(
                    17,
                    "limits.max_line_len: invalid type: string \"lots\", expected usize"
                ),
                at(
                    18,
                    "timeouts: `5 minutes`: expected a duration such as 500ms, 30s, 5m or 1h"
                ),
                at(
                    18,
                    "timeouts.data: invalid type: sequence, expected a string"
                ),
                at(19, "log.level: invalid type: sequence, expected a string"),
                at(
                    21,
                    "unknown field `extra`, expected one of `tls`, `listeners`, `limits`, \
                     `timeouts`, `log`, `metrics`, `user_hash_key`, `allow_remote_plaintext`, `outbound`"
                ),
            ]
        );
    }

    #[test]
    fn a_file_that_is_no_mapping_or_no_yaml_is_one_problem() {
        let at = |line: Option<usize>, message: &str| vec![(line, message.to_owned())];
        assert_eq!(
            problems(""),
            [
                (None, "missing field `tls`".to_owned()),
                (None, "missing field `listeners`".to_owned())
            ]
        );
        assert_eq!(problems("# nothing yet\n"), problems(""));
        assert_eq!(
            problems("- a\n"),
            at(Some(1), "invalid type: sequence, expected struct Config")
        );
        assert_eq!(
            problems("tls: {}\nlisteners: [\n"),
            at(
                Some(3),
                "invalid YAML: while parsing a node, did not find expected node content"
            )
        );
        assert_eq!(
            problems("tls: 1\ntls: 2\n"),
            at(Some(2), "invalid YAML: duplicated key in mapping")
        );
        assert!(problems("tls: {}\n---\nlisteners: []\n").contains(&(
            Some(3),
            "deserializing from YAML containing more than one document is not supported".to_owned()
        )));
    }

    #[test]
    fn a_misspelt_required_key_is_reported_once_as_unknown() {
        let text = "listeners:\n  - { name: a, protocl: smtp, lsiten: x, upstream: \"unix:/u\", nmae: b }\n";
        let messages: Vec<String> = problems(text).into_iter().map(|(_, m)| m).collect();
        let expected = |key, meant: &str| {
            let mut message = format!(
                "listeners[0]: unknown field `{key}`, expected one of `name`, `protocol`, \
                 `listen`, `tls`, `policy`, `upstream`, `bare_newlines`, \
                 `proxy_protocol_from`, `upstream_proxy_protocol`, `xclient`, \
                 `source_address`, `exempt_networks`, `reuse_port`"
            );
            if !meant.is_empty() {
                message.push_str(&format!(" (did you mean `{meant}`?)"));
            }
            message
        };
        assert_eq!(
            messages,
            [
                "missing field `tls`".to_owned(),
                expected("protocl", "protocol"),
                expected("lsiten", "listen"),
                // `name` is there: `nmae` is no stand-in for it.
                expected("nmae", ""),
            ]
        );
        assert!(looks_like("upstraem", "upstream"));
        assert!(looks_like("idel", "idle"));
        assert!(!looks_like("xclient", "listen"));
    }

    #[test]
    fn a_key_left_out_has_the_line_of_its_mapping() {
        let (_, r) = read("tls:\n  min_tls_version: \"1.2\"\nlisteners:\n  - name: a\n");
        let positions = &r.positions;
        assert_eq!(positions.line("tls.certificates"), Some(1));
        assert_eq!(positions.line("tls.min_tls_version"), Some(2));
        assert_eq!(positions.line("listeners[0]"), Some(4));
        assert_eq!(positions.line("listeners[0].upstream"), Some(4));
        assert_eq!(positions.line("listeners[1].upstream"), Some(3));
        assert_eq!(positions.line("limits.max_line_len"), None);
    }
}
