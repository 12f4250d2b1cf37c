//! From a recipient domain to the MX hosts a transaction may go to, in order, each with
//! the TLS it must get (ARCHITECTURE.md §11): RFC 7672 DANE before RFC 8461 MTA-STS
//! before the configured [`Floor`].
//!
//! [`plan`] does the lookups: the MX set, each MX host's addresses and TLSA records (the
//! hosts at once), and the MTA-STS policy (TXT record, cache, fetch) when a host without
//! DANE is left for it. What the answers mean is decided by pure functions of them
//! (`mx_set`, `addresses`, `tlsa_step`, [`select`]), so that each rule is a unit test.
//!
//! The rules, in order:
//! - **MX** (RFC 5321 §5.1): hosts by preference. SERVFAIL or a timeout (a bogus DNSSEC
//!   answer is a SERVFAIL) defers, `451 4.4.3`: a validating resolver that cannot say is
//!   no proof that the domain is gone. NXDOMAIN is permanent, `550 5.1.2`. A null MX
//!   (RFC 7505 §4.1) is `556 5.1.10`. No MX records (NODATA) means the domain itself is
//!   the one MX host, preference 0 (the implicit MX).
//! - **Addresses**: A and AAAA of each host, at most [`MAX_ADDRS_PER_HOST`]; a host whose
//!   lookup fails or finds none is skipped. At most [`MAX_MX_HOSTS`] hosts are looked up.
//! - **DANE** (RFC 7672 §2.2): only where the MX answer (the MX RRset, or the denial
//!   behind an implicit MX) and the host's address answer are both DNSSEC-secure. The
//!   TLSA records of `_<port>._tcp.<host>`; where the host is a secure CNAME alias, at
//!   its expansion first and then at the name itself (§2.2.2). A secure RRset makes the
//!   host DANE: [`Requirement::Dane`], or [`Requirement::DaneUnauthenticated`] when no
//!   record is usable (§2.2: TLS still mandatory). A secure denial, or an insecure
//!   answer, is no DANE for that host. A failed TLSA lookup makes the host unusable
//!   (§2.1.1: it could be an attacker hiding the records), never a downgrade. §2.2.1
//!   lets a client use DANE for hosts from an insecure MX RRset too; mailmoat does not:
//!   it applies DANE where DNSSEC covers the whole path from the domain to the host.
//! - **MTA-STS** (RFC 8461), for the hosts without DANE (§2: it never overrides DANE):
//!   the policy as [`mta_sts::decide`] says (cached, fetched, or none). `enforce`: only
//!   hosts the policy names (§4.1), with a PKIX-valid certificate for that name (§4.2);
//!   `testing`: every host, failures recorded but not enforced (§5); `none` or no policy:
//!   the floor.
//! - **Floor**: the domain's own in [`Settings::per_domain`], else [`Settings::floor`].
//!
//! Whatever is left of the hosts is the [`Plan`]; nothing left is a [`PlanFailure`], a
//! temporary one for anything but a domain that does not exist or takes no mail:
//! `4.4.3` when no host has an address, `4.7.5` when DANE or MTA-STS ruled them all out.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use rustls_pki_types::DnsName;
use tokio::task::JoinSet;
use tracing::warn;

use super::dane::{self, ReferenceNames, TlsaSet};
use super::dns::{self, Answer, Mx, Outcome, Resolver};
use super::mta_sts::cache::OnFetchFailure;
use super::mta_sts::{self, Cached, Decision, Fetcher, Mode, PolicyDomain, Store, TxtLookup};
use crate::proto::outbound::envelope::Domain;

/// MX hosts looked up per domain, the most preferred; the rest are ignored.
pub const MAX_MX_HOSTS: usize = 10;

/// Addresses kept per MX host, in the resolver's order (A before AAAA).
pub const MAX_ADDRS_PER_HOST: usize = 4;

/// SMTP's port (IANA's `smtp`): where MX hosts listen, and under which their TLSA records
/// are published (`_25._tcp`, RFC 7672 §2.2.2).
pub const SMTP_PORT: u16 = 25;

/// The MTA-STS policy host's port (RFC 8461 §3.3: HTTPS).
pub const HTTPS_PORT: u16 = 443;

/// The reply when DNS cannot say where the domain's mail goes (SERVFAIL, bogus DNSSEC,
/// no answer in time; RFC 3463 4.4.3).
pub const DNS_FAILURE: &[u8] =
    b"451 4.4.3 Temporary DNS failure looking up the recipient domain's mail servers\r\n";

/// The other replies of a plan that found no MX host to try.
mod reply {
    pub use super::DNS_FAILURE;
    pub const NO_ADDRESS: &[u8] =
        b"451 4.4.3 No address found for any mail server of the recipient domain\r\n";
    pub const TLSA_FAILURE: &[u8] =
        b"451 4.7.5 DANE TLSA lookup failed for every mail server of the recipient domain\r\n";
    pub const MTA_STS_NO_MX: &[u8] =
        b"451 4.7.5 No mail server of the recipient domain is allowed by its MTA-STS policy\r\n";
    pub const NULL_MX: &[u8] = b"556 5.1.10 Recipient domain accepts no mail (null MX)\r\n";
    pub const NO_SUCH_DOMAIN: &[u8] = b"550 5.1.2 Recipient domain not found (no such domain)\r\n";
}

/// The TLS a domain without DANE or MTA-STS gets, like Postfix's
/// `smtp_tls_security_level`; the configuration's `tls_floor` (snake_case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Floor {
    /// Postfix `may`: TLS when the MX offers STARTTLS, with any certificate; plaintext
    /// when it does not (a downgrade event). The default (ARCHITECTURE.md §11).
    #[default]
    Opportunistic,
    /// Postfix `encrypt`: TLS mandatory, any certificate.
    Encrypt,
    /// Postfix `verify`: TLS mandatory, and a certificate PKIX-valid for the MX host
    /// name. Without DNSSEC that name is only as good as the DNS answer that gave it.
    Verify,
}

impl Floor {
    /// The name, as the configuration and the delivery event spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Floor::Opportunistic => "opportunistic",
            Floor::Encrypt => "encrypt",
            Floor::Verify => "verify",
        }
    }

    /// What a host gets under this floor alone.
    fn requirement(self, host: &DnsName<'static>) -> Requirement {
        match self {
            Floor::Opportunistic => Requirement::Opportunistic,
            Floor::Encrypt => Requirement::Encrypt,
            Floor::Verify => Requirement::Pkix {
                host: host.clone(),
                enforce: true,
            },
        }
    }
}

impl fmt::Display for Floor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// MTA-STS, when configured: the policy cache on disk and the HTTPS fetcher.
#[derive(Debug, Clone)]
pub struct MtaSts {
    pub store: Store,
    pub fetcher: Fetcher,
}

/// What a plan needs beyond the DNS.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The floor for domains not in `per_domain`.
    pub floor: Floor,
    /// Floors of their own, by recipient domain as [`Domain`] spells it (lower-case
    /// A-labels, no final dot).
    pub per_domain: HashMap<String, Floor>,
    /// The MX hosts' port, also the TLSA records' (`_<port>._tcp`): [`SMTP_PORT`], other
    /// only in tests.
    pub smtp_port: u16,
    /// MTA-STS; `None`: not applied.
    pub mta_sts: Option<MtaSts>,
}

impl Default for Settings {
    /// The opportunistic floor, port 25, no MTA-STS.
    fn default() -> Settings {
        Settings {
            floor: Floor::default(),
            per_domain: HashMap::new(),
            smtp_port: SMTP_PORT,
            mta_sts: None,
        }
    }
}

impl Settings {
    /// The floor for `domain`.
    pub fn floor_for(&self, domain: &Domain) -> Floor {
        self.per_domain
            .get(domain.as_str())
            .copied()
            .unwrap_or(self.floor)
    }
}

/// Which policy decided a host's requirement, for the delivery event and TLS-RPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// DANE (RFC 7672): the host has DNSSEC-secure TLSA records.
    Dane,
    /// MTA-STS (RFC 8461) in mode `enforce` or `testing`; a policy in mode `none` is
    /// the floor's.
    MtaSts { mode: Mode },
    /// Neither: the configured floor.
    Floor(Floor),
}

/// `dane`, `mta-sts enforce`, `mta-sts testing`, or the floor's name.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Dane => f.write_str("dane"),
            Policy::MtaSts { mode } => write!(f, "mta-sts {mode}"),
            Policy::Floor(floor) => f.write_str(floor.as_str()),
        }
    }
}

/// The TLS one MX host must get; `mx_tls::client_config` makes the client for it.
#[derive(Debug, Clone)]
pub enum Requirement {
    /// STARTTLS mandatory, the certificate checked against the TLSA records (RFC 7672
    /// §3), SNI the TLSA base domain (§8.1).
    Dane {
        tlsa: TlsaSet,
        names: ReferenceNames,
    },
    /// DNSSEC-secure TLSA records, none usable: STARTTLS mandatory, the certificate
    /// unchecked (RFC 7672 §2.2), SNI the TLSA base domain.
    DaneUnauthenticated { names: ReferenceNames },
    /// A certificate PKIX-valid for `host`, the MX host name (RFC 8461 §4.2). `enforce:
    /// false` is MTA-STS `testing`: failures, a missing STARTTLS included, are recorded
    /// and the delivery goes on (§5).
    Pkix {
        host: DnsName<'static>,
        enforce: bool,
    },
    /// STARTTLS mandatory, any certificate.
    Encrypt,
    /// STARTTLS when offered, any certificate.
    Opportunistic,
}

impl Requirement {
    /// Whether an MX without STARTTLS, or a failed handshake, rules the host out (rather
    /// than leaving plaintext, for the delivery's downgrade event).
    pub fn tls_required(&self) -> bool {
        match self {
            Requirement::Dane { .. }
            | Requirement::DaneUnauthenticated { .. }
            | Requirement::Encrypt => true,
            Requirement::Pkix { enforce, .. } => *enforce,
            Requirement::Opportunistic => false,
        }
    }
}

/// One MX host to try.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The MX host name as the MX record gives it (for an implicit MX, the domain).
    pub host: String,
    /// Its MX preference (0 for an implicit MX).
    pub preference: u16,
    /// Its addresses with the SMTP port, in the order to try.
    pub addrs: Vec<SocketAddr>,
    pub requirement: Requirement,
    pub policy: Policy,
}

/// The MX hosts of a domain to try, in order, each with its TLS.
#[derive(Debug, Clone)]
pub struct Plan {
    pub domain: Domain,
    /// Whether the MX answer was DNSSEC-secure.
    pub mx_secure: bool,
    /// In MX preference order. Hosts of equal preference are shuffled (RFC 5321 §5.1:
    /// pick one at random to spread the load), so each plan may order them differently.
    pub candidates: Vec<Candidate>,
    /// Log-safe details of what was left out or failed on the way: hosts skipped, a
    /// failed MTA-STS lookup or fetch.
    pub notes: Vec<String>,
    /// The RFC 8460 result type of a failed MTA-STS policy fetch (`sts-policy-fetch-error`,
    /// `sts-policy-invalid`, `sts-webpki-invalid`), for TLS-RPT; the plan went on with the
    /// cached policy or none, as RFC 8461 §3.3 says.
    pub mta_sts_fetch_failure: Option<&'static str>,
}

/// Why no MX host can be tried: the reply for the legacy MTA, and what to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct PlanFailure {
    /// The SMTP reply, CRLF included: `4xx` unless the domain does not exist or takes
    /// no mail.
    pub reply: &'static [u8],
    /// The RFC 8460 result type, where the failure is a TLS policy's.
    pub result_type: Option<&'static str>,
    /// Log-safe: names and DNS errors, no message data.
    pub detail: String,
}

/// Looks up `domain`'s MX hosts and decides what each must get. `now` is for the MTA-STS
/// cache.
pub async fn plan(
    domain: &Domain,
    resolver: &Resolver,
    settings: &Settings,
    now: SystemTime,
) -> Result<Plan, PlanFailure> {
    let mut mx = mx_set(domain, resolver.lookup_mx(domain.as_str()).await)?;
    shuffle_equal_preferences(&mut mx.hosts, random_below);
    if mx.hosts.len() > MAX_MX_HOSTS {
        mx.notes.push(format!(
            "{domain}: only the first {MAX_MX_HOSTS} of {} MX hosts are tried",
            mx.hosts.len()
        ));
        mx.hosts.truncate(MAX_MX_HOSTS);
    }
    let hosts = lookup_hosts(resolver, &mx, settings.smtp_port).await;
    let mut notes = mx.notes;

    // RFC 8461 §2: MTA-STS is for the hosts DANE does not cover; none, no fetch.
    let without_dane = hosts
        .iter()
        .any(|host| matches!(&host.outcome, Ok(usable) if usable.dane.is_none()));
    let mut mta_sts_fetch_failure = None;
    let sts_policy = match &settings.mta_sts {
        Some(sts) if without_dane => {
            let discovered = discover_mta_sts(domain, resolver, sts, now).await;
            notes.extend(discovered.notes);
            mta_sts_fetch_failure = discovered.fetch_failure;
            discovered.policy
        }
        _ => None,
    };
    let candidates = select(
        domain,
        hosts,
        sts_policy.as_ref(),
        settings.floor_for(domain),
        &mut notes,
    )?;
    Ok(Plan {
        domain: domain.clone(),
        mx_secure: mx.secure,
        candidates,
        notes,
        mta_sts_fetch_failure,
    })
}

/// One MX host as the MX lookup named it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MxHost {
    preference: u16,
    name: String,
}

/// What the MX lookup gave: the hosts by preference, and whether the answer was secure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MxSet {
    secure: bool,
    hosts: Vec<MxHost>,
    notes: Vec<String>,
}

/// The MX answer's meaning (RFC 5321 §5.1, RFC 7505): the hosts sorted by preference
/// (equal ones in the DNS order), each once; or the failure.
fn mx_set(
    domain: &Domain,
    answer: Result<Answer<Vec<Mx>>, dns::Error>,
) -> Result<MxSet, PlanFailure> {
    let answer = answer.map_err(|err| PlanFailure {
        reply: reply::DNS_FAILURE,
        // RFC 8460 §4.3.2.2: no valid records from the resolver. Only when it says that
        // DNSSEC is why; a timeout is the DNS's failure, not a TLS policy's.
        result_type: is_dnssec_failure(&err).then_some("dnssec-invalid"),
        detail: format!("MX lookup for {domain} failed: {err}"),
    })?;
    let mut notes = Vec::new();
    let mut hosts = match answer.outcome {
        Outcome::NxDomain => {
            return Err(PlanFailure {
                reply: reply::NO_SUCH_DOMAIN,
                result_type: None,
                detail: format!("{domain} does not exist (NXDOMAIN at {})", answer.name),
            });
        }
        // RFC 5321 §5.1: "If an empty list of MXs is returned, the address is treated as
        // if it was associated with an implicit MX RR, with a preference of 0, pointing
        // to that host." The domain's own name: its address lookup follows any CNAME.
        Outcome::NoData => vec![MxHost {
            preference: 0,
            name: domain.as_str().to_owned(),
        }],
        Outcome::Found(records) => {
            let (null, real): (Vec<Mx>, Vec<Mx>) = records.into_iter().partition(Mx::is_null);
            if real.is_empty() {
                // RFC 7505 §4.1: no delivery, 556 5.1.10.
                return Err(PlanFailure {
                    reply: reply::NULL_MX,
                    result_type: None,
                    detail: format!("{domain} publishes a null MX"),
                });
            }
            if !null.is_empty() {
                // RFC 7505 §3 forbids it; the hosts it names are the ones that take mail.
                notes.push(format!(
                    "{domain}: a null MX beside other MX records is ignored"
                ));
            }
            real.into_iter()
                .map(|mx| MxHost {
                    preference: mx.preference,
                    name: mx.exchange,
                })
                .collect()
        }
    };
    hosts.sort_by_key(|host| host.preference);
    let mut seen = HashSet::new();
    hosts.retain(|host| seen.insert(host.name.clone()));
    Ok(MxSet {
        secure: answer.secure,
        hosts,
        notes,
    })
}

/// Whether a failed lookup failed for DNSSEC's sake: a SERVFAIL whose Extended DNS Error
/// (RFC 8914 §4) is one of the DNSSEC ones (1, 2 and 5 to 12), as `dns` renders it:
/// `"DNSSEC Bogus (6): ..."`.
fn is_dnssec_failure(err: &dns::Error) -> bool {
    let dns::Error::ServFail {
        extended: Some(text),
        ..
    } = err
    else {
        return false;
    };
    let code = text
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(code, _)| code.parse::<u16>().ok());
    matches!(code, Some(1 | 2 | 5..=12))
}

/// Shuffles each run of hosts of equal preference (RFC 5321 §5.1: "If there are multiple
/// destinations with the same preference and there is no clear reason to favor one
/// ... the SMTP client SHOULD pick one at random"). `random_below(n)` is in `0..n`.
fn shuffle_equal_preferences(hosts: &mut [MxHost], mut random_below: impl FnMut(usize) -> usize) {
    for run in hosts.chunk_by_mut(|a, b| a.preference == b.preference) {
        // Fisher-Yates.
        for i in (1..run.len()).rev() {
            run.swap(i, random_below(i + 1));
        }
    }
}

/// A number in `0..n` from the system's generator; 0 if it fails (no shuffle).
fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() || n == 0 {
        return 0;
    }
    // The bias of the modulo is below 2^-50 for the few hosts there are.
    (u64::from_le_bytes(bytes) % n as u64) as usize
}

/// What one MX host's lookups gave, as [`select`] takes it.
#[derive(Debug, Clone)]
pub struct HostLookup {
    /// The MX host name.
    pub host: String,
    pub preference: u16,
    /// Its addresses and DANE status, or why it cannot be used.
    pub outcome: Result<Usable, Skipped>,
}

/// An MX host that can be tried.
#[derive(Debug, Clone)]
pub struct Usable {
    /// The host name, checked as a DNS name (for SNI and the PKIX check).
    pub name: DnsName<'static>,
    /// At most [`MAX_ADDRS_PER_HOST`], with the SMTP port.
    pub addrs: Vec<SocketAddr>,
    /// Its DNSSEC-secure TLSA records, if it has any.
    pub dane: Option<DaneRecords>,
}

/// A host's TLSA records from a secure answer, and the names they apply to.
#[derive(Debug, Clone)]
pub struct DaneRecords {
    pub tlsa: TlsaSet,
    pub names: ReferenceNames,
}

/// An MX host left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub why: SkipReason,
    /// Log-safe.
    pub detail: String,
}

/// Why an MX host is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Its name is no host name, or its address lookup failed or found none.
    NoAddress,
    /// Its TLSA lookup failed where DANE applies (RFC 7672 §2.1.1).
    TlsaLookupFailed,
}

/// Looks up every host at once; the result is in the hosts' order.
async fn lookup_hosts(resolver: &Resolver, mx: &MxSet, port: u16) -> Vec<HostLookup> {
    let mut tasks = JoinSet::new();
    for (index, host) in mx.hosts.iter().cloned().enumerate() {
        let resolver = resolver.clone();
        let mx_secure = mx.secure;
        tasks.spawn(async move { (index, lookup_host(&resolver, host, mx_secure, port).await) });
    }
    let mut looked_up = Vec::with_capacity(mx.hosts.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(done) => looked_up.push(done),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Cancelled: only when the runtime shuts down, which ends the plan anyway.
            Err(_) => {}
        }
    }
    looked_up.sort_by_key(|(index, _)| *index);
    looked_up.into_iter().map(|(_, host)| host).collect()
}

/// One host's addresses and, where DANE can apply, its TLSA records.
async fn lookup_host(resolver: &Resolver, mx: MxHost, mx_secure: bool, port: u16) -> HostLookup {
    let outcome = async {
        let skip = |why, detail| Skipped { why, detail };
        let name = DnsName::try_from(mx.name.clone()).map_err(|_| {
            skip(
                SkipReason::NoAddress,
                format!("{:?} is not a host name", mx.name),
            )
        })?;
        let found = addresses(&mx.name, resolver.lookup_ip(&mx.name).await, port)
            .map_err(|detail| skip(SkipReason::NoAddress, detail))?;
        let mut usable = Usable {
            name,
            addrs: found.addrs,
            dane: None,
        };
        // RFC 7672 §2.2.1, §2.2.2: DANE needs a secure MX answer and secure addresses.
        if !(mx_secure && found.secure) {
            return Ok(usable);
        }
        for (base, names) in tlsa_bases(&usable.name, &found.name) {
            match tlsa_step(&base, resolver.lookup_tlsa(port, &base).await) {
                TlsaStep::Found(tlsa) => {
                    usable.dane = Some(DaneRecords { tlsa, names });
                    break;
                }
                TlsaStep::NotHere => {}
                TlsaStep::Failed(detail) => {
                    return Err(skip(SkipReason::TlsaLookupFailed, detail));
                }
            }
        }
        Ok(usable)
    }
    .await;
    HostLookup {
        host: mx.name,
        preference: mx.preference,
        outcome,
    }
}

/// A host's addresses, and how they were found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addresses {
    addrs: Vec<SocketAddr>,
    /// The answer's AD bit.
    secure: bool,
    /// Where the CNAME chain from the host name ended: the name itself without one.
    name: String,
}

/// The usable addresses of an address answer: no unspecified, multicast or broadcast
/// ones, each once, at most [`MAX_ADDRS_PER_HOST`]. `Err`: why there are none.
fn addresses(
    host: &str,
    answer: Result<Answer<Vec<IpAddr>>, dns::Error>,
    port: u16,
) -> Result<Addresses, String> {
    let answer = answer.map_err(|err| format!("{host}: address lookup failed: {err}"))?;
    let ips = match answer.outcome {
        Outcome::Found(ips) => ips,
        Outcome::NoData => return Err(format!("{host}: no address (NODATA)")),
        Outcome::NxDomain => return Err(format!("{host}: no address (NXDOMAIN)")),
    };
    let mut seen = HashSet::new();
    let addrs: Vec<SocketAddr> = ips
        .into_iter()
        .filter(|ip| {
            !ip.is_unspecified()
                && !ip.is_multicast()
                && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
        })
        .filter(|ip| seen.insert(*ip))
        .take(MAX_ADDRS_PER_HOST)
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host}: no usable address"));
    }
    Ok(Addresses {
        addrs,
        secure: answer.secure,
        name: answer.name,
    })
}

/// The names to look TLSA records up at, in order, each with the reference identifiers
/// records found there give (RFC 7672 §2.2.2, §3.2.2): a secure CNAME expansion first,
/// then the host name itself.
fn tlsa_bases(host: &DnsName<'static>, expanded: &str) -> Vec<(String, ReferenceNames)> {
    let mut bases = Vec::with_capacity(2);
    if !expanded.eq_ignore_ascii_case(host.as_ref())
        && let Ok(expanded) = DnsName::try_from(expanded.to_owned())
    {
        bases.push((
            expanded.as_ref().to_owned(),
            ReferenceNames::cname_expanded(host.clone(), expanded),
        ));
    }
    bases.push((
        host.as_ref().to_owned(),
        ReferenceNames::mx_host(host.clone()),
    ));
    bases
}

/// What one TLSA lookup means for DANE.
#[derive(Debug)]
enum TlsaStep {
    /// A secure RRset: DANE applies.
    Found(TlsaSet),
    /// A secure denial, or an insecure answer: no DANE here (RFC 7672 §2.2).
    NotHere,
    /// The lookup failed: the host is not usable (§2.1.1).
    Failed(String),
}

fn tlsa_step(base: &str, answer: Result<Answer<Vec<dns::Tlsa>>, dns::Error>) -> TlsaStep {
    match answer {
        Err(err) => TlsaStep::Failed(format!("{base}: TLSA lookup failed: {err}")),
        Ok(Answer {
            secure: true,
            outcome: Outcome::Found(records),
            ..
        }) => TlsaStep::Found(TlsaSet::new(records.into_iter().map(|record| dane::Tlsa {
            usage: record.usage,
            selector: record.selector,
            matching_type: record.matching,
            data: record.data,
        }))),
        Ok(_) => TlsaStep::NotHere,
    }
}

/// What [`discover_mta_sts`] found.
#[derive(Debug, Default)]
struct Discovered {
    policy: Option<mta_sts::Policy>,
    notes: Vec<String>,
    fetch_failure: Option<&'static str>,
}

/// The MTA-STS policy that applies to `domain` now (RFC 8461 §3, §5.1): its TXT record
/// and the cached policy weighed by [`mta_sts::decide`], a fetch when it says so, the
/// cache updated.
async fn discover_mta_sts(
    domain: &Domain,
    resolver: &Resolver,
    sts: &MtaSts,
    now: SystemTime,
) -> Discovered {
    let mut found = Discovered::default();
    let policy_domain = match PolicyDomain::parse(domain.as_str()) {
        Ok(policy_domain) => policy_domain,
        Err(err) => {
            found
                .notes
                .push(format!("{domain}: no MTA-STS for this name: {err}"));
            return found;
        }
    };
    let txt = match resolver.lookup_txt(&policy_domain.txt_name()).await {
        Ok(answer) => match answer.found() {
            Some(txts) => TxtLookup::from_records(mta_sts::parse_records(txts)),
            None => TxtLookup::NoRecord,
        },
        Err(err) => {
            found
                .notes
                .push(format!("MTA-STS TXT lookup failed: {err}"));
            TxtLookup::Failed
        }
    };
    let cached = sts.store.load(&policy_domain);
    let forget = |forget_cached: bool| {
        if forget_cached && let Err(err) = sts.store.remove(&policy_domain) {
            warn!(domain = %policy_domain, %err, "cannot remove an expired mta-sts policy");
        }
    };
    let (on_failure, id) = match (mta_sts::decide(cached.as_ref(), &txt, now), &txt) {
        (Decision::UseCached, _) => {
            found.policy = cached.map(|c| c.policy);
            return found;
        }
        (Decision::NoPolicy { forget_cached }, _) => {
            forget(forget_cached);
            return found;
        }
        (Decision::Fetch { on_failure, .. }, TxtLookup::Found(id)) => (on_failure, id.clone()),
        // `decide` fetches only for a record it was given.
        (Decision::Fetch { on_failure, .. }, _) => {
            if on_failure == OnFetchFailure::UseCached {
                found.policy = cached.map(|c| c.policy);
            }
            return found;
        }
    };
    match fetch_policy(&policy_domain, resolver, &sts.fetcher).await {
        Ok(policy) => {
            let entry = Cached {
                id,
                fetched_at: now,
                policy: policy.clone(),
            };
            // The save syncs the file and its directory: off the runtime's threads.
            let (store, saved_domain) = (sts.store.clone(), policy_domain.clone());
            let saved =
                tokio::task::spawn_blocking(move || store.save(&saved_domain, &entry)).await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!(domain = %policy_domain, %err, "cannot cache the mta-sts policy")
                }
                Err(err) => warn!(domain = %policy_domain, %err, "mta-sts cache write failed"),
            }
            found.policy = Some(policy);
        }
        Err(err) => {
            found.notes.push(format!(
                "MTA-STS policy fetch for {policy_domain} failed: {err}"
            ));
            found.fetch_failure = Some(err.result_type());
            match on_failure {
                OnFetchFailure::UseCached => found.policy = cached.map(|c| c.policy),
                OnFetchFailure::NoPolicy { forget_cached } => forget(forget_cached),
            }
        }
    }
    found
}

/// Fetches the policy from `mta-sts.<domain>` at the addresses the resolver gives.
async fn fetch_policy(
    domain: &PolicyDomain,
    resolver: &Resolver,
    fetcher: &Fetcher,
) -> Result<mta_sts::Policy, mta_sts::fetch::Error> {
    let addrs: Vec<SocketAddr> = match resolver.lookup_ip(&domain.policy_host()).await {
        Ok(answer) => answer
            .found()
            .into_iter()
            .flatten()
            .take(MAX_ADDRS_PER_HOST)
            .map(|ip| SocketAddr::new(*ip, HTTPS_PORT))
            .collect(),
        // No address is the fetch's own error (sts-policy-fetch-error).
        Err(_) => Vec::new(),
    };
    fetcher.fetch(domain, &addrs).await
}

/// The candidates, from each host's lookups, the MTA-STS policy that applies (if any)
/// and the domain's floor; the pure end of [`plan`]. Each host left out adds a note;
/// none left is the failure that names why, with `notes` as its detail.
pub fn select(
    domain: &Domain,
    hosts: Vec<HostLookup>,
    mta_sts: Option<&mta_sts::Policy>,
    floor: Floor,
    notes: &mut Vec<String>,
) -> Result<Vec<Candidate>, PlanFailure> {
    let mut candidates = Vec::with_capacity(hosts.len());
    let (mut tlsa_failed, mut not_in_policy) = (false, false);
    for HostLookup {
        host,
        preference,
        outcome,
    } in hosts
    {
        let usable = match outcome {
            Ok(usable) => usable,
            Err(skipped) => {
                tlsa_failed |= skipped.why == SkipReason::TlsaLookupFailed;
                notes.push(skipped.detail);
                continue;
            }
        };
        let (requirement, policy) = match (usable.dane, mta_sts.map(|p| (p, p.mode))) {
            // RFC 7672 §2.2; RFC 8461 §2: MTA-STS does not apply where DANE does.
            (Some(dane), _) if dane.tlsa.authenticates() => (
                Requirement::Dane {
                    tlsa: dane.tlsa,
                    names: dane.names,
                },
                Policy::Dane,
            ),
            // No usable record: TLS without authentication, unless the operator asked
            // this domain for more.
            (Some(dane), _) => match floor {
                Floor::Verify => (floor.requirement(&usable.name), Policy::Floor(floor)),
                _ => (
                    Requirement::DaneUnauthenticated { names: dane.names },
                    Policy::Dane,
                ),
            },
            // RFC 8461 §4.1: only the hosts the policy names; §4.2: PKIX for that name.
            (None, Some((policy, Mode::Enforce))) => {
                if !policy.allows_mx(&host) {
                    not_in_policy = true;
                    notes.push(format!(
                        "{host}: not an MX host the MTA-STS policy of {domain} names"
                    ));
                    continue;
                }
                (
                    Requirement::Pkix {
                        host: usable.name.clone(),
                        enforce: true,
                    },
                    Policy::MtaSts {
                        mode: Mode::Enforce,
                    },
                )
            }
            // §5: deliver as without a policy, and report what fails. A stricter floor
            // still holds: testing must not weaken what the operator asked for.
            (None, Some((_, Mode::Testing))) => (
                match floor {
                    Floor::Opportunistic => Requirement::Pkix {
                        host: usable.name.clone(),
                        enforce: false,
                    },
                    _ => floor.requirement(&usable.name),
                },
                Policy::MtaSts {
                    mode: Mode::Testing,
                },
            ),
            (None, Some((_, Mode::None)) | None) => {
                (floor.requirement(&usable.name), Policy::Floor(floor))
            }
        };
        candidates.push(Candidate {
            host,
            preference,
            addrs: usable.addrs,
            requirement,
            policy,
        });
    }
    if !candidates.is_empty() {
        return Ok(candidates);
    }
    let (reply, result_type) = if not_in_policy {
        // RFC 8460 §4.3.1: a general failure of the policy's validation.
        (reply::MTA_STS_NO_MX, Some("validation-failure"))
    } else if tlsa_failed {
        // RFC 8460 §4.3.2.2: no valid records from the resolver.
        (reply::TLSA_FAILURE, Some("dnssec-invalid"))
    } else {
        (reply::NO_ADDRESS, None)
    };
    Err(PlanFailure {
        reply,
        result_type,
        detail: format!("no usable MX host for {domain}: {}", notes.join("; ")),
    })
}

#[cfg(test)]
mod tests;
