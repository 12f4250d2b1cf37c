//! `mailmoat explain --domain D`, like Postfix's `posttls-finger`: what the outbound relay
//! (ARCHITECTURE.md §11) would do with mail for the recipient domain D, and a live look
//! at its MX hosts, without sending mail.
//!
//! In order: the MX set and its DNSSEC status with each host's addresses; each host's
//! TLSA records; the MTA-STS record and policy; the policy the relay applies to each host
//! and the TLS it requires; a probe of the first [`MAX_PROBES`] addresses the relay would
//! try (greeting, `EHLO` with the configured hostname, `STARTTLS`, the handshake, the
//! certificate and the verdict, `EHLO` again, `QUIT`; never `MAIL`).
//!
//! Nothing here decides anew. The policy is the relay's own [`plan::plan`], run with the
//! relay's own settings, trust anchors and fetcher (`listener::context_with_store`); the
//! handshake uses the client [`mx_tls::client_config`] makes for the host's requirement.
//! The lookups of the first three sections are made again beside the plan's, only to show
//! what the plan does not keep. One thing is not known here: which MX hosts the running
//! daemon has seen offering STARTTLS (`outbound.starttls_stripping`), a memory of its own
//! process; the probe applies the policy's requirement alone.
//!
//! The MTA-STS cache is only read. The plan works on a scratch copy of the domain's entry
//! in a temporary directory, removed at the end: a policy fetched here is shown, not kept,
//! and the daemon's next delivery is decided as if explain had not run.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{Config, OutboundConfig};
use crate::operator::check::EXIT_CONFIG;
use crate::operator::check::certificates::leaf_names;
use crate::operator::explain::printable;
use crate::operator::probe::{self, Conversation, Expect, Reply};
use crate::outbound::dns::{self, Answer, Mx, Outcome, Resolver};
use crate::outbound::driver::Context;
use crate::outbound::listener;
use crate::outbound::mta_sts::{self, Cached, PolicyDomain, Store};
use crate::outbound::mx_tls::{self, CheckFailure};
use crate::outbound::plan::{self, Candidate, Plan, PlanFailure, Policy, Requirement};
use crate::proto::outbound::envelope::{self, Domain, Extensions};

/// Addresses probed, in the order the relay would try them.
pub const MAX_PROBES: usize = 3;
/// The whole plan (DNS, MTA-STS fetch), as the relay bounds it.
const PLAN_TIMEOUT: Duration = Duration::from_secs(60);
/// One TCP connection to an MX address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each MX reply, and each command written.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The TLS handshake with an MX.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Explains `domain` under `config`'s `outbound` section; prints the result and returns
/// the exit code: 0 when a probed MX would take the mail, 1 when none would, 64 when the
/// configuration cannot be used.
pub async fn run(config: &Config, domain: &str) -> u8 {
    let Some(outbound) = &config.outbound else {
        eprintln!(
            "explain --domain: the configuration has no `outbound` section, so mailmoat \
             relays no mail to other domains"
        );
        return EXIT_CONFIG;
    };
    let Ok(domain) = envelope::recipient_domain(format!("@{domain}").as_bytes()) else {
        eprintln!("explain --domain: {domain:?} is not a domain mail can be sent to");
        return EXIT_CONFIG;
    };
    let cache = match CacheView::open(outbound, &domain) {
        Ok(cache) => cache,
        Err(err) => {
            eprintln!("explain --domain: {err}");
            return 1;
        }
    };
    let scratch = cache.as_ref().map(|cache| cache.scratch.clone());
    // Called only when `mta_sts_cache_dir` is set, as the scratch copy is.
    let context = listener::context_with_store(outbound, config, |dir| {
        scratch.ok_or_else(|| mta_sts::store::Error::Directory {
            dir: dir.to_owned(),
            source: std::io::Error::other("explain: no scratch copy of the cache"),
        })
    });
    let context = match context {
        Ok(context) => context,
        Err(err) => {
            eprintln!("{err}");
            return EXIT_CONFIG;
        }
    };
    explain(outbound, &context, &domain, cache.as_ref()).await
}

/// Prints each section as it is found out; the exit code.
async fn explain(
    outbound: &OutboundConfig,
    ctx: &Context,
    domain: &Domain,
    cache: Option<&CacheView>,
) -> u8 {
    let port = ctx.plan.smtp_port;
    emit(&format!(
        "domain {domain} (outbound relay: resolver {}, MX port {port}, EHLO {})\n",
        ctx.resolver.server(),
        ctx.session.hostname
    ));

    let mx_answer = ctx.resolver.lookup_mx(domain.as_str()).await;
    let (mx_lines, hosts) = mx_set_lines(domain, &mx_answer);
    let mut section = mx_lines;
    let mut tlsa_section = Vec::new();
    for (preference, host) in &hosts {
        let answer = ctx.resolver.lookup_ip(host).await;
        section.push(address_line(*preference, host, &answer));
        // The TLSA records of the CNAME's expansion first, as the plan looks them up
        // (RFC 7672 §2.2.2).
        let mut bases = Vec::with_capacity(2);
        if let Ok(answer) = &answer
            && !answer.name.eq_ignore_ascii_case(host)
        {
            bases.push(answer.name.clone());
        }
        bases.push(host.clone());
        for base in bases {
            let tlsa = ctx.resolver.lookup_tlsa(port, &base).await;
            tlsa_section.extend(tlsa_lines(&format!("_{port}._tcp.{base}"), &tlsa));
        }
    }
    if hosts.is_empty() {
        tlsa_section.push("none: no MX host to look up".into());
    }
    emit(&render_section("MX", &section));
    emit(&render_section("TLSA", &tlsa_section));

    let planned = tokio::time::timeout(
        PLAN_TIMEOUT,
        plan::plan(domain, &ctx.resolver, &ctx.plan, SystemTime::now()),
    )
    .await;
    let planned = planned.map_err(|_| None).and_then(|r| r.map_err(Some));
    let sts = mta_sts_lines(domain, &ctx.resolver, outbound, cache, &planned).await;
    emit(&render_section("MTA-STS", &sts));
    emit(&render_section(
        "policy (what mailmoat applies)",
        &policy_lines(ctx, domain, &planned),
    ));
    let plan = match planned {
        Ok(plan) => plan,
        Err(_) => {
            emit("  result: no MX would take the mail: the plan found no MX host to try\n");
            return 1;
        }
    };

    let targets: Vec<(&Candidate, SocketAddr)> = plan
        .candidates
        .iter()
        .flat_map(|candidate| candidate.addrs.iter().map(move |addr| (candidate, *addr)))
        .collect();
    let mut taken = Vec::new();
    let mut last_was_tls = false;
    for (candidate, addr) in targets.iter().take(MAX_PROBES) {
        let probe = probe(ctx, candidate, *addr).await;
        let mut lines = probe.lines;
        lines.push(format!("result: {}", probe.outcome));
        emit(&render_section(
            &format!(
                "probe {} [{}]:{} ({})",
                candidate.host,
                addr.ip(),
                addr.port(),
                candidate.policy
            ),
            &lines,
        ));
        match probe.outcome {
            ProbeOutcome::Takes { .. } => taken.push(format!("{} [{}]", candidate.host, addr.ip())),
            ProbeOutcome::Refuses { result_type, .. } => last_was_tls = result_type.is_some(),
        }
    }
    let probed = targets.len().min(MAX_PROBES);
    emit(&format!(
        "  result: {}\n",
        summary(&taken, probed, targets.len() - probed, last_was_tls)
    ));
    u8::from(taken.is_empty())
}

/// Prints `text` at once: a probe can take a while, and what came before is worth seeing.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// A section: its title, then its lines indented, control characters escaped.
fn render_section(title: &str, lines: &[String]) -> String {
    let mut out = format!("  {}:\n", printable(title));
    for line in lines {
        let _ = writeln!(out, "    {}", printable(line));
    }
    out
}

/// The last line: which probed addresses would take the mail. With none, and every
/// address probed, the reply the legacy MTA gets ([`crate::outbound::driver::no_mx_left`]).
fn summary(taken: &[String], probed: usize, not_probed: usize, last_was_tls: bool) -> String {
    if let Some(first) = taken.first() {
        let more = if not_probed > 0 {
            format!(" ({not_probed} more not probed)")
        } else {
            String::new()
        };
        return format!(
            "{first} would take the mail ({} of {probed} probed addresses would){more}",
            taken.len()
        );
    }
    let reply = crate::outbound::driver::no_mx_left(last_was_tls);
    if not_probed > 0 {
        format!(
            "no probed MX would take the mail ({probed} probed; {not_probed} more not \
             probed, which the relay would try)"
        )
    } else {
        format!(
            "no MX would take the mail (every address probed: {probed}); the legacy MTA \
             gets: {}",
            String::from_utf8_lossy(reply).trim_end()
        )
    }
}

/// The MX answer's lines, and the hosts to look up by preference (each once, at most
/// [`plan::MAX_MX_HOSTS`]).
fn mx_set_lines(
    domain: &Domain,
    answer: &Result<Answer<Vec<Mx>>, dns::Error>,
) -> (Vec<String>, Vec<(u16, String)>) {
    let answer = match answer {
        Ok(answer) => answer,
        Err(err) => return (vec![format!("lookup failed: {err}")], Vec::new()),
    };
    let status = security(answer.secure);
    match &answer.outcome {
        Outcome::NxDomain => (
            vec![format!(
                "none: {domain} does not exist (NXDOMAIN, {status})"
            )],
            Vec::new(),
        ),
        Outcome::NoData => (
            vec![format!(
                "none (NODATA, {status}): the domain itself is the MX host, preference 0 \
                 (RFC 5321 §5.1)"
            )],
            vec![(0, domain.as_str().to_owned())],
        ),
        Outcome::Found(records) => {
            let mut lines = vec![format!(
                "answer: {status}{}",
                if answer.secure {
                    " (DNSSEC, the resolver's AD bit)"
                } else {
                    " (no AD bit: DANE does not apply)"
                }
            )];
            let mut records: Vec<&Mx> = records.iter().collect();
            records.sort_by_key(|mx| mx.preference);
            let mut hosts: Vec<(u16, String)> = Vec::new();
            for mx in records {
                if mx.is_null() {
                    lines.push(format!(
                        "{} . (null MX, RFC 7505: the domain takes no mail)",
                        mx.preference
                    ));
                } else if !hosts.iter().any(|(_, host)| *host == mx.exchange) {
                    hosts.push((mx.preference, mx.exchange.clone()));
                }
            }
            if hosts.len() > plan::MAX_MX_HOSTS {
                lines.push(format!(
                    "only the first {} of {} MX hosts are tried",
                    plan::MAX_MX_HOSTS,
                    hosts.len()
                ));
                hosts.truncate(plan::MAX_MX_HOSTS);
            }
            (lines, hosts)
        }
    }
}

fn security(secure: bool) -> &'static str {
    if secure { "secure" } else { "insecure" }
}

/// One MX host with its addresses.
fn address_line(
    preference: u16,
    host: &str,
    answer: &Result<Answer<Vec<IpAddr>>, dns::Error>,
) -> String {
    let found = match answer {
        Err(err) => format!("address lookup failed: {err}"),
        Ok(answer) => {
            let via = if answer.name.eq_ignore_ascii_case(host) {
                String::new()
            } else {
                format!(", CNAME to {}", answer.name)
            };
            let status = security(answer.secure);
            match &answer.outcome {
                Outcome::Found(ips) => {
                    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                    format!("{} ({status}{via})", ips.join(", "))
                }
                Outcome::NoData => format!("no address (NODATA, {status}{via})"),
                Outcome::NxDomain => format!("no address (NXDOMAIN, {status}{via})"),
            }
        }
    };
    format!("{preference} {host}: {found}")
}

/// The TLSA answer at `name` (`_25._tcp.<host>`): each record in presentation form, or
/// which kind of none.
fn tlsa_lines(name: &str, answer: &Result<Answer<Vec<dns::Tlsa>>, dns::Error>) -> Vec<String> {
    let answer = match answer {
        Ok(answer) => answer,
        Err(err) => return vec![format!("{name}: lookup failed: {err}")],
    };
    match (&answer.outcome, answer.secure) {
        (Outcome::Found(records), secure) => records
            .iter()
            .map(|r| {
                let status = if secure {
                    "secure"
                } else {
                    "insecure, not used for DANE"
                };
                format!(
                    "{name} ({status}): {} {} {} {}",
                    r.usage,
                    r.selector,
                    r.matching,
                    hex(&r.data)
                )
            })
            .collect(),
        (_, true) => vec![format!("{name}: none (authenticated denial)")],
        (Outcome::NoData, false) => vec![format!("{name}: none (NODATA, insecure)")],
        (Outcome::NxDomain, false) => vec![format!("{name}: none (NXDOMAIN, insecure)")],
    }
}

/// Lower-case hexadecimal, as TLSA records are written.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// What the configured MTA-STS cache holds for the domain, read only, and the scratch
/// store the plan writes to instead.
struct CacheView {
    /// The domain's entry in the real cache: `Ok(None)` if there is none, the error if it
    /// cannot be read.
    cached: Result<Option<Cached>, String>,
    /// The policy domain; `None` when the domain cannot have one.
    policy_domain: Option<PolicyDomain>,
    scratch: Store,
    /// Removed on drop.
    _dir: ScratchDir,
}

impl CacheView {
    /// `None` when no `mta_sts_cache_dir` is configured (MTA-STS is not applied).
    fn open(outbound: &OutboundConfig, domain: &Domain) -> Result<Option<CacheView>, String> {
        let Some(dir) = &outbound.mta_sts_cache_dir else {
            return Ok(None);
        };
        let policy_domain = PolicyDomain::parse(domain.as_str()).ok();
        // Only read: `Store::open` would create a missing directory.
        let cached = match &policy_domain {
            Some(policy_domain) if dir.is_dir() => Store::open(dir)
                .and_then(|store| store.read(policy_domain))
                .map_err(|err| err.to_string()),
            _ => Ok(None),
        };
        let scratch_dir = ScratchDir::create()?;
        let scratch = Store::open(scratch_dir.path()).map_err(|err| err.to_string())?;
        if let (Ok(Some(cached)), Some(policy_domain)) = (&cached, &policy_domain) {
            scratch
                .save(policy_domain, cached)
                .map_err(|err| err.to_string())?;
        }
        Ok(Some(CacheView {
            cached,
            policy_domain,
            scratch,
            _dir: scratch_dir,
        }))
    }

    /// The policy the plan applied: the scratch entry, if it has one.
    fn applied(&self) -> Option<Cached> {
        let policy_domain = self.policy_domain.as_ref()?;
        self.scratch.read(policy_domain).ok().flatten()
    }
}

/// A temporary directory of this process's own (mode 0700), removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<ScratchDir, String> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("mailmoat-explain-{}-{nanos:x}", std::process::id()));
        // Fails if the name exists, whatever it is: nobody else's directory is used.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The MTA-STS section: the TXT record, the cache, and the policy the plan applied.
async fn mta_sts_lines(
    domain: &Domain,
    resolver: &Resolver,
    outbound: &OutboundConfig,
    cache: Option<&CacheView>,
    planned: &Result<Plan, Option<PlanFailure>>,
) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(policy_domain) = PolicyDomain::parse(domain.as_str()) else {
        lines.push(format!("none: {domain} cannot publish an MTA-STS policy"));
        return lines;
    };
    let txt_name = policy_domain.txt_name();
    lines.push(match resolver.lookup_txt(&txt_name).await {
        Err(err) => format!("TXT {txt_name}: lookup failed: {err}"),
        Ok(answer) => txt_line(&txt_name, &answer),
    });
    let Some(cache) = cache else {
        lines.push("not applied: outbound.mta_sts_cache_dir is not set".into());
        return lines;
    };
    let cache_dir = outbound
        .mta_sts_cache_dir
        .as_deref()
        .unwrap_or(Path::new(""));
    lines.push(match &cache.cached {
        Ok(None) => format!("cache {}: nothing for {domain}", cache_dir.display()),
        Ok(Some(cached)) => format!(
            "cache {}: {} (id {}, fetched {} ago)",
            cache_dir.display(),
            policy_text(&cached.policy),
            cached.id,
            age(cached.fetched_at)
        ),
        Err(err) => format!("cache {}: unusable: {err}", cache_dir.display()),
    });
    // RFC 8461 §2: MTA-STS is for the hosts DANE does not cover; the plan consults it
    // only for those. A plan that failed on the policy consulted it too.
    let not_consulted = match planned {
        Ok(plan) if plan.candidates.iter().all(|c| c.policy == Policy::Dane) => {
            Some("every MX host to try has DANE, which MTA-STS never overrides (RFC 8461 §2)")
        }
        Ok(_) => None,
        Err(Some(failure)) if failure.result_type == Some("validation-failure") => None,
        Err(_) => Some("the plan found no MX host to try before it"),
    };
    if let Some(why) = not_consulted {
        lines.push(format!("policy: not consulted: {why}"));
        return lines;
    }
    let cached = cache.cached.as_ref().ok().and_then(Option::as_ref);
    lines.push(match cache.applied() {
        None => "policy: none applies".into(),
        Some(applied) => {
            let source = if Some(&applied) == cached {
                format!("from the cache, fetched {} ago", age(applied.fetched_at))
            } else {
                format!(
                    "fetched now from https://{}{}; not written to the cache",
                    policy_domain.policy_host(),
                    mta_sts::fetch::WELL_KNOWN_PATH
                )
            };
            format!(
                "policy: {}, id {} ({source})",
                policy_text(&applied.policy),
                applied.id
            )
        }
    });
    if let Ok(plan) = planned
        && let Some(result_type) = plan.mta_sts_fetch_failure
    {
        lines.push(format!("policy fetch failed: {result_type}"));
    }
    lines
}

/// The TXT answer at `_mta-sts.<domain>`: the records that look like MTA-STS ones, and
/// what the relay reads in them.
fn txt_line(name: &str, answer: &Answer<Vec<Vec<u8>>>) -> String {
    let status = security(answer.secure);
    let Some(txts) = answer.found() else {
        return match (answer.secure, &answer.outcome) {
            (true, _) => format!("TXT {name}: none (authenticated denial)"),
            (false, Outcome::NxDomain) => format!("TXT {name}: none (NXDOMAIN, insecure)"),
            (false, _) => format!("TXT {name}: none (NODATA, insecure)"),
        };
    };
    let shown: Vec<String> = txts
        .iter()
        .filter(|txt| txt.starts_with(b"v=STSv1"))
        .map(|txt| format!("{:?}", String::from_utf8_lossy(txt)))
        .collect();
    let meaning = match mta_sts::parse_records(txts) {
        Ok(Some(record)) => format!("id {}", record.id),
        Ok(None) => "no v=STSv1 record".into(),
        Err(err) => format!("not usable: {err}"),
    };
    if shown.is_empty() {
        format!("TXT {name} ({status}): {meaning}")
    } else {
        format!("TXT {name} ({status}): {} -> {meaning}", shown.join(" "))
    }
}

/// A policy on one line: `mode enforce, mx mx.example.com, max_age 86400s`.
fn policy_text(policy: &mta_sts::Policy) -> String {
    let mx: Vec<String> = policy.mx.iter().map(ToString::to_string).collect();
    format!(
        "mode {}, mx {}, max_age {}s",
        policy.mode,
        if mx.is_empty() {
            "none".into()
        } else {
            mx.join(" ")
        },
        policy.max_age.as_secs()
    )
}

/// How long ago `then` was, roughly.
fn age(then: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(then)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}min", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// The policy section: per host, the policy and the TLS it requires; or why there is no
/// host to try, with the reply the legacy MTA gets.
fn policy_lines(
    ctx: &Context,
    domain: &Domain,
    planned: &Result<Plan, Option<PlanFailure>>,
) -> Vec<String> {
    let floor = ctx.plan.floor_for(domain);
    let mut lines = vec![format!("floor: {}", floor.as_str())];
    match planned {
        Ok(plan) => {
            for candidate in &plan.candidates {
                lines.push(format!(
                    "{}: policy {}, {}",
                    candidate.host,
                    candidate.policy,
                    requirement_text(&candidate.requirement, ctx.plan.smtp_port)
                ));
            }
            lines.extend(plan.notes.iter().map(|note| format!("note: {note}")));
        }
        Err(Some(failure)) => {
            lines.push(format!("no MX host to try: {}", failure.detail));
            if let Some(result_type) = failure.result_type {
                lines.push(format!("RFC 8460 result type: {result_type}"));
            }
            lines.push(format!(
                "the legacy MTA gets: {}",
                String::from_utf8_lossy(failure.reply).trim_end()
            ));
        }
        Err(None) => lines.push(format!(
            "the plan did not finish within {PLAN_TIMEOUT:?}; the legacy MTA gets a 451 4.4.3"
        )),
    }
    lines
}

/// The TLS a requirement asks for, in words.
fn requirement_text(requirement: &Requirement, port: u16) -> String {
    match requirement {
        Requirement::Dane { tlsa, names } => format!(
            "TLS required, certificate checked against {} usable TLSA record(s) of \
             _{port}._tcp.{} (SNI that name)",
            tlsa.usable_count(),
            names.tlsa_base_domain().as_ref()
        ),
        Requirement::DaneUnauthenticated { names } => format!(
            "TLS required, any certificate: no usable TLSA record at _{port}._tcp.{} \
             (RFC 7672 §2.2)",
            names.tlsa_base_domain().as_ref()
        ),
        Requirement::Pkix {
            host,
            enforce: true,
        } => format!("TLS required, certificate PKIX-valid for {}", host.as_ref()),
        Requirement::Pkix {
            host,
            enforce: false,
        } => format!(
            "TLS if offered, PKIX for {} checked and failures only recorded",
            host.as_ref()
        ),
        Requirement::Encrypt => "TLS required, any certificate".into(),
        Requirement::Opportunistic => {
            "TLS if offered, any certificate; plaintext if STARTTLS is not offered".into()
        }
    }
}

/// What one probe found.
struct Probe {
    /// The dialogue (`C:`, `S:`) and what the handshake established.
    lines: Vec<String>,
    outcome: ProbeOutcome,
}

/// Whether the MX would take the mail under the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeOutcome {
    /// Up to `MAIL`, everything went as the relay needs it.
    Takes {
        policy: Policy,
        /// The TLS version, or `None` for plaintext.
        tls: Option<String>,
        verified: bool,
    },
    /// The relay would give this MX up, and why; `result_type` for TLS failures (RFC
    /// 8460 §4.3).
    Refuses {
        result_type: Option<&'static str>,
        why: String,
    },
}

impl std::fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeOutcome::Takes {
                policy,
                tls: Some(version),
                verified,
            } => write!(
                f,
                "would take the mail ({policy}, {version}, {})",
                if *verified {
                    "verified"
                } else {
                    "not verified"
                }
            ),
            ProbeOutcome::Takes {
                policy, tls: None, ..
            } => write!(
                f,
                "would take the mail ({policy}) in plaintext, logged as a downgrade"
            ),
            ProbeOutcome::Refuses {
                result_type: Some(result_type),
                why,
            } => write!(f, "would not take the mail: {result_type}: {why}"),
            ProbeOutcome::Refuses {
                result_type: None,
                why,
            } => write!(f, "would not take the mail: {why}"),
        }
    }
}

/// Probes one address of a candidate as the relay would use it, up to `MAIL`.
async fn probe(ctx: &Context, candidate: &Candidate, addr: SocketAddr) -> Probe {
    let mut lines = Vec::new();
    let outcome = match dialogue(ctx, candidate, addr, &mut lines).await {
        Ok(outcome) | Err(outcome) => outcome,
    };
    Probe { lines, outcome }
}

fn refuses(why: impl Into<String>) -> ProbeOutcome {
    ProbeOutcome::Refuses {
        result_type: None,
        why: why.into(),
    }
}

/// The dialogue; `Err` is a refusal that ends it early.
async fn dialogue(
    ctx: &Context,
    candidate: &Candidate,
    addr: SocketAddr,
    lines: &mut Vec<String>,
) -> Result<ProbeOutcome, ProbeOutcome> {
    let tcp = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        crate::outbound::driver::connect(addr, ctx.source_address),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Err(refuses(format!("cannot connect: {err}"))),
        Err(_) => {
            return Err(refuses(format!(
                "cannot connect: timed out after {CONNECT_TIMEOUT:?}"
            )));
        }
    };
    let mut plain = Conversation::new(tcp, REPLY_TIMEOUT);
    let result = plaintext_part(ctx, &mut plain).await;
    let starttls = match result {
        Ok(starttls) => starttls,
        Err(outcome) => {
            quit(&mut plain).await;
            lines.append(&mut plain.transcript);
            return Err(outcome);
        }
    };
    if !starttls {
        quit(&mut plain).await;
        lines.append(&mut plain.transcript);
        return if candidate.requirement.tls_required() {
            Err(ProbeOutcome::Refuses {
                result_type: Some("starttls-not-supported"),
                why: "STARTTLS is not offered, and the policy requires TLS".into(),
            })
        } else {
            Ok(ProbeOutcome::Takes {
                policy: candidate.policy,
                tls: None,
                verified: false,
            })
        };
    }
    let (tcp, mut transcript) = plain.into_parts().map_err(|err| refuses(mx_error(&err)))?;
    lines.append(&mut transcript);
    lines.push("-- TLS handshake --".into());
    let client = mx_tls::client_config(
        &candidate.requirement,
        &candidate.host,
        Arc::clone(&ctx.roots),
        Arc::clone(&ctx.provider),
    )
    .map_err(|err| ProbeOutcome::Refuses {
        result_type: Some("validation-failure"),
        why: err.to_string(),
    })?;
    lines.push(format!("SNI: {}", server_name_text(&client.server_name)));
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client.config));
    let handshake = connector.connect(client.server_name.clone(), tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let failure = client.verdict.failure();
            lines.push(verdict_line(
                &candidate.requirement,
                Some(&err.to_string()),
                false,
                failure.as_ref(),
            ));
            // The check's own words where it failed, rustls's otherwise.
            return Err(match failure {
                Some(failure) => ProbeOutcome::Refuses {
                    result_type: Some(failure.result_type),
                    why: failure.detail,
                },
                None => ProbeOutcome::Refuses {
                    result_type: Some("validation-failure"),
                    why: format!("the handshake failed: {err}"),
                },
            });
        }
        Err(_) => {
            return Err(ProbeOutcome::Refuses {
                result_type: Some("validation-failure"),
                why: format!("the handshake timed out after {HANDSHAKE_TIMEOUT:?}"),
            });
        }
    };
    let connection = tls.get_ref().1;
    let version = connection
        .protocol_version()
        .map_or_else(|| "unknown".into(), version_text);
    let cipher = connection
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".into(), |suite| format!("{:?}", suite.suite()));
    lines.push(format!("TLS: {version}, {cipher}"));
    match connection
        .peer_certificates()
        .and_then(|chain| chain.first())
    {
        Some(leaf) => lines.extend(certificate_lines(leaf.as_ref())),
        None => lines.push("certificate: none".into()),
    }
    let verified = client.verdict.verified();
    lines.push(verdict_line(
        &candidate.requirement,
        None,
        verified,
        client.verdict.failure().as_ref(),
    ));
    let mut secured = Conversation::new(tls, REPLY_TIMEOUT);
    // RFC 3207 §4.2: what the MX offers is asked again inside TLS.
    let outcome = hello(&mut secured, &ctx.session.hostname)
        .await
        .map(|_| ProbeOutcome::Takes {
            policy: candidate.policy,
            tls: Some(version),
            verified,
        });
    quit(&mut secured).await;
    lines.append(&mut secured.transcript);
    outcome
}

/// Greeting, EHLO (HELO after a 5xx, as the relay does), and STARTTLS if offered; `Ok`:
/// whether the MX said `220` to STARTTLS (`false`: not offered).
async fn plaintext_part<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Context,
    conversation: &mut Conversation<S>,
) -> Result<bool, ProbeOutcome> {
    let fail = |err: probe::Error| refuses(mx_error(&err));
    let greeting = conversation
        .reply(Expect::Smtp, "the greeting")
        .await
        .map_err(fail)?;
    // RFC 5321 §3.1: only 220 opens a session.
    if greeting.smtp_code() != Some(220) {
        return Err(refuses(format!(
            "the greeting is not 220: {}",
            probe::quoted(&greeting.one_line())
        )));
    }
    let extensions = hello(conversation, &ctx.session.hostname).await?;
    // The relay says STARTTLS whenever it is offered, whatever the policy requires.
    if !extensions.starttls {
        return Ok(false);
    }
    let reply = conversation
        .command("STARTTLS", Expect::Smtp, "the reply to STARTTLS")
        .await
        .map_err(fail)?;
    if reply.smtp_code() != Some(220) {
        // The relay gives such an MX up whatever the policy (RFC 3207 §4).
        return Err(ProbeOutcome::Refuses {
            result_type: Some("starttls-not-supported"),
            why: format!("STARTTLS answered {}", probe::quoted(&reply.one_line())),
        });
    }
    Ok(true)
}

/// EHLO, and HELO after a 5xx (RFC 5321 §4.1.4), as the relay says them: what the MX
/// offers (nothing after HELO), or the refusal.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    conversation: &mut Conversation<S>,
    hostname: &str,
) -> Result<Extensions, ProbeOutcome> {
    let fail = |err: probe::Error| refuses(mx_error(&err));
    let ehlo = conversation
        .command(
            &format!("EHLO {hostname}"),
            Expect::Smtp,
            "the reply to EHLO",
        )
        .await
        .map_err(fail)?;
    let (reply, extensions) = if ehlo.smtp_code().is_some_and(|code| code >= 500) {
        let helo = conversation
            .command(
                &format!("HELO {hostname}"),
                Expect::Smtp,
                "the reply to HELO",
            )
            .await
            .map_err(fail)?;
        (helo, Extensions::default())
    } else {
        let offered = Extensions::from_ehlo_reply(ehlo.lines.iter().map(|line| reply_text(line)));
        (ehlo, offered)
    };
    if !is_positive(&reply) {
        return Err(refuses(format!(
            "the MX refused the greeting: {}",
            probe::quoted(&reply.one_line())
        )));
    }
    Ok(extensions)
}

/// A reply line's text, after the code and its separator.
fn reply_text(line: &str) -> &[u8] {
    line.as_bytes().get(4..).unwrap_or_default()
}

fn is_positive(reply: &Reply) -> bool {
    reply
        .smtp_code()
        .is_some_and(|code| (200..300).contains(&code))
}

/// QUIT, its reply read if it comes; the connection ends either way.
async fn quit<S: AsyncRead + AsyncWrite + Unpin>(conversation: &mut Conversation<S>) {
    let _ = conversation
        .command("QUIT", Expect::Smtp, "the reply to QUIT")
        .await;
}

/// A probe error in the MX's terms (`probe` words them for an upstream).
fn mx_error(err: &probe::Error) -> String {
    match err {
        probe::Error::Closed(waiting_for) => {
            format!("the MX closed the connection while mailmoat waited for {waiting_for}")
        }
        probe::Error::TooLarge(what) => format!("the MX sent {what}"),
        other => other.to_string(),
    }
}

fn server_name_text(name: &rustls_pki_types::ServerName<'_>) -> String {
    match name {
        rustls_pki_types::ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        rustls_pki_types::ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// `TLSv1.3`, as Postfix writes it in its `Received` headers.
fn version_text(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

/// The leaf certificate: subject, names, issuer, expiry, and its key's digest in the
/// form of a TLSA `3 1 1` record's data, to compare with the records above.
fn certificate_lines(der: &[u8]) -> Vec<String> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert,
        Err(err) => return vec![format!("certificate: cannot be read: {err}")],
    };
    let names = leaf_names(&cert);
    let spki = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.public_key().raw);
    vec![
        format!("certificate subject: {}", cert.subject()),
        format!(
            "certificate names: {}",
            if names.is_empty() {
                "none (no subjectAltName)".into()
            } else {
                names.join(", ")
            }
        ),
        format!("certificate issuer: {}", cert.issuer()),
        format!("certificate valid until: {}", cert.validity().not_after),
        format!("certificate key as TLSA 3 1 1: {}", hex(spki.as_ref())),
    ]
}

/// What the certificate check said: `verified`, or the failure with its RFC 8460 result
/// type, and whether the policy enforces it. `handshake_error`: the handshake failed so.
fn verdict_line(
    requirement: &Requirement,
    handshake_error: Option<&str>,
    verified: bool,
    failure: Option<&CheckFailure>,
) -> String {
    let how = match requirement {
        Requirement::Dane { .. } => "DANE".to_owned(),
        Requirement::Pkix { host, .. } => format!("PKIX for {}", host.as_ref()),
        Requirement::DaneUnauthenticated { .. }
        | Requirement::Encrypt
        | Requirement::Opportunistic => "PKIX, not required".to_owned(),
    };
    let enforced = matches!(
        requirement,
        Requirement::Dane { .. } | Requirement::Pkix { enforce: true, .. }
    );
    match (handshake_error, failure) {
        (Some(_), Some(failure)) => format!(
            "verdict: failed ({how}): {}: {}",
            failure.result_type, failure.detail
        ),
        (None, Some(failure)) if enforced => format!(
            "verdict: failed ({how}): {}: {}",
            failure.result_type, failure.detail
        ),
        (None, Some(failure)) => format!(
            "verdict: not verified ({how}; recorded only): {}: {}",
            failure.result_type, failure.detail
        ),
        (Some(err), None) => format!("verdict: handshake failed: validation-failure: {err}"),
        (None, None) if verified => format!("verdict: verified ({how})"),
        (None, None) => format!("verdict: not verified ({how}): the certificate was not checked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer<T>(secure: bool, outcome: Outcome<T>) -> Answer<T> {
        Answer {
            name: "x.test".into(),
            secure,
            outcome,
        }
    }

    fn domain(name: &str) -> Domain {
        envelope::recipient_domain(format!("@{name}").as_bytes()).unwrap()
    }

    #[test]
    fn tlsa_records_and_each_kind_of_none() {
        let record = dns::Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![0xab, 0x01],
        };
        let name = "_25._tcp.mx.x.test";
        assert_eq!(
            tlsa_lines(
                name,
                &Ok(answer(true, Outcome::Found(vec![record.clone()])))
            ),
            ["_25._tcp.mx.x.test (secure): 3 1 1 ab01"]
        );
        assert_eq!(
            tlsa_lines(name, &Ok(answer(false, Outcome::Found(vec![record])))),
            ["_25._tcp.mx.x.test (insecure, not used for DANE): 3 1 1 ab01"]
        );
        assert_eq!(
            tlsa_lines(name, &Ok(answer(true, Outcome::NxDomain))),
            ["_25._tcp.mx.x.test: none (authenticated denial)"]
        );
        assert_eq!(
            tlsa_lines(name, &Ok(answer(false, Outcome::NoData))),
            ["_25._tcp.mx.x.test: none (NODATA, insecure)"]
        );
        let err = dns::Error::ServFail {
            server: "127.0.0.1:53".parse().unwrap(),
            question: "TLSA _25._tcp.mx.x.test".into(),
            extended: Some("DNSSEC Bogus (6)".into()),
        };
        let lines = tlsa_lines(name, &Err(err));
        assert!(
            lines[0]
                .starts_with("_25._tcp.mx.x.test: lookup failed: resolver 127.0.0.1:53: SERVFAIL"),
            "{lines:?}"
        );
    }

    #[test]
    fn the_mx_set_is_sorted_deduplicated_and_says_whether_it_is_secure() {
        let mx = |preference, exchange: &str| Mx {
            preference,
            exchange: exchange.into(),
        };
        let found = Ok(answer(
            true,
            Outcome::Found(vec![
                mx(20, "b.x.test"),
                mx(10, "a.x.test"),
                mx(30, "a.x.test"),
            ]),
        ));
        let (lines, hosts) = mx_set_lines(&domain("x.test"), &found);
        assert_eq!(lines, ["answer: secure (DNSSEC, the resolver's AD bit)"]);
        assert_eq!(
            hosts,
            [(10, "a.x.test".to_owned()), (20, "b.x.test".to_owned())]
        );
        let (lines, hosts) = mx_set_lines(&domain("x.test"), &Ok(answer(false, Outcome::NoData)));
        assert!(lines[0].starts_with("none (NODATA, insecure)"), "{lines:?}");
        assert_eq!(hosts, [(0, "x.test".to_owned())]);
        let (lines, hosts) = mx_set_lines(
            &domain("x.test"),
            &Ok(answer(true, Outcome::Found(vec![mx(0, "")]))),
        );
        assert_eq!(
            lines[1],
            "0 . (null MX, RFC 7505: the domain takes no mail)"
        );
        assert!(hosts.is_empty());
    }

    #[test]
    fn an_address_line_names_the_cname_and_the_status() {
        let mut found = answer(
            false,
            Outcome::Found(vec![
                "192.0.2.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ]),
        );
        found.name = "real.x.test".into();
        assert_eq!(
            address_line(10, "mx.x.test", &Ok(found)),
            "10 mx.x.test: 192.0.2.1, 2001:db8::1 (insecure, CNAME to real.x.test)"
        );
    }

    #[test]
    fn the_verdict_says_what_was_enforced() {
        let dane = Requirement::Dane {
            tlsa: crate::outbound::dane::TlsaSet::default(),
            names: crate::outbound::dane::ReferenceNames::mx_host(
                rustls_pki_types::DnsName::try_from("mx.x.test").unwrap(),
            ),
        };
        let mismatch = CheckFailure {
            result_type: "tlsa-invalid",
            detail: "no usable TLSA record matches".into(),
        };
        assert_eq!(
            verdict_line(&dane, None, true, None),
            "verdict: verified (DANE)"
        );
        assert_eq!(
            verdict_line(
                &dane,
                Some("invalid peer certificate"),
                false,
                Some(&mismatch)
            ),
            "verdict: failed (DANE): tlsa-invalid: no usable TLSA record matches"
        );
        let testing = Requirement::Pkix {
            host: rustls_pki_types::DnsName::try_from("mx.x.test").unwrap(),
            enforce: false,
        };
        let host = CheckFailure {
            result_type: "certificate-host-mismatch",
            detail: "not valid for mx.x.test".into(),
        };
        assert_eq!(
            verdict_line(&testing, None, false, Some(&host)),
            "verdict: not verified (PKIX for mx.x.test; recorded only): \
             certificate-host-mismatch: not valid for mx.x.test"
        );
        assert_eq!(
            verdict_line(&Requirement::Opportunistic, None, true, None),
            "verdict: verified (PKIX, not required)"
        );
        assert_eq!(
            verdict_line(&Requirement::Encrypt, Some("peer closed"), false, None),
            "verdict: handshake failed: validation-failure: peer closed"
        );
    }

    #[test]
    fn outcomes_and_the_summary_read_as_sentences() {
        let takes = ProbeOutcome::Takes {
            policy: Policy::Dane,
            tls: Some("TLSv1.3".into()),
            verified: true,
        };
        assert_eq!(
            takes.to_string(),
            "would take the mail (dane, TLSv1.3, verified)"
        );
        let plaintext = ProbeOutcome::Takes {
            policy: Policy::Floor(plan::Floor::Opportunistic),
            tls: None,
            verified: false,
        };
        assert_eq!(
            plaintext.to_string(),
            "would take the mail (opportunistic) in plaintext, logged as a downgrade"
        );
        let refuses = ProbeOutcome::Refuses {
            result_type: Some("starttls-not-supported"),
            why: "STARTTLS is not offered".into(),
        };
        assert_eq!(
            refuses.to_string(),
            "would not take the mail: starttls-not-supported: STARTTLS is not offered"
        );
        assert_eq!(
            summary(&["mx.x.test [192.0.2.1]".into()], 2, 0, true),
            "mx.x.test [192.0.2.1] would take the mail (1 of 2 probed addresses would)"
        );
        assert_eq!(
            summary(&[], 3, 2, true),
            "no probed MX would take the mail (3 probed; 2 more not probed, which the \
             relay would try)"
        );
        assert_eq!(
            summary(&[], 1, 0, true),
            "no MX would take the mail (every address probed: 1); the legacy MTA gets: \
             451 4.7.5 The recipient domain's mail servers failed its TLS policy"
        );
        assert_eq!(
            summary(&[], 2, 0, false),
            "no MX would take the mail (every address probed: 2); the legacy MTA gets: \
             451 4.4.1 No answer from the recipient domain's mail servers"
        );
    }

    #[test]
    fn the_txt_record_is_shown_with_what_it_means() {
        let txt = answer(
            true,
            Outcome::Found(vec![b"v=STSv1; id=20240101".to_vec(), b"other".to_vec()]),
        );
        assert_eq!(
            txt_line("_mta-sts.x.test", &txt),
            "TXT _mta-sts.x.test (secure): \"v=STSv1; id=20240101\" -> id 20240101"
        );
        assert_eq!(
            txt_line("_mta-sts.x.test", &answer(true, Outcome::NxDomain)),
            "TXT _mta-sts.x.test: none (authenticated denial)"
        );
        assert_eq!(
            txt_line("_mta-sts.x.test", &answer(false, Outcome::NoData)),
            "TXT _mta-sts.x.test: none (NODATA, insecure)"
        );
    }

    #[test]
    fn a_certificate_is_shown_with_its_names_and_key_digest() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["mx.x.test".to_owned(), "192.0.2.7".to_owned()])
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mx.x.test");
        let cert = params.self_signed(&key).unwrap();
        let lines = certificate_lines(cert.der());
        assert_eq!(lines[0], "certificate subject: CN=mx.x.test");
        assert_eq!(lines[1], "certificate names: mx.x.test, 192.0.2.7");
        assert_eq!(lines[2], "certificate issuer: CN=mx.x.test");
        let spki = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        );
        assert_eq!(
            lines[4],
            format!("certificate key as TLSA 3 1 1: {}", hex(spki.as_ref()))
        );
        assert_eq!(
            certificate_lines(b"not a certificate")[0].split(':').next(),
            Some("certificate")
        );
    }

    #[test]
    fn probe_errors_speak_of_the_mx() {
        assert_eq!(
            mx_error(&probe::Error::Closed("the greeting")),
            "the MX closed the connection while mailmoat waited for the greeting"
        );
        assert_eq!(
            mx_error(&probe::Error::TooLarge("more than 256 KiB")),
            "the MX sent more than 256 KiB"
        );
    }
}
