//! `check` for the `outbound` section (ARCHITECTURE.md §11): who the relay relays for,
//! whether MTA-STS is applied, and whether the resolver validates DNSSEC. DANE rests on
//! the resolver's AD bit: a resolver that does not validate answers without it, and
//! DANE then silently never applies, so that is said loudly.

use crate::config::{OutboundConfig, Positions};
use crate::outbound::dns::{self, Resolver};

use super::{Finding, Severity};

/// Every finding for the `outbound` section; the resolver is asked only when `online`.
pub async fn check(outbound: &OutboundConfig, positions: &Positions, online: bool) -> Vec<Finding> {
    let mut findings = Vec::new();
    let finding = |severity, path: &str, message: String, detail: Vec<String>| Finding {
        severity,
        line: positions.line(path),
        subject: path.to_owned(),
        message,
        detail,
    };
    let wide: Vec<String> = outbound
        .relay_networks
        .iter()
        .filter(|network| !network.is_loopback())
        .map(ToString::to_string)
        .collect();
    if !wide.is_empty() {
        findings.push(finding(
            Severity::Warning,
            "outbound.relay_networks",
            format!(
                "mailmoat relays mail to any domain for every client in {}",
                wide.join(", ")
            ),
            vec![
                "only the legacy MTA's own address belongs here: any other host in these \
                 networks can send mail through mailmoat as if it were the legacy MTA"
                    .into(),
            ],
        ));
    }
    if outbound.mta_sts_cache_dir.is_none() {
        findings.push(finding(
            Severity::Warning,
            "outbound",
            "MTA-STS is not applied: no mta_sts_cache_dir".into(),
            vec![
                "domains that publish an MTA-STS policy (Gmail, Outlook, Yahoo) then get \
                 only the TLS floor; set mta_sts_cache_dir to a directory mailmoat may write"
                    .into(),
            ],
        ));
    }
    if online {
        let resolver = Resolver::new(outbound.resolver);
        let (severity, message, detail) = judge_resolver(
            &resolver,
            &outbound.dnssec_check_signed,
            &outbound.dnssec_check_bogus,
        )
        .await;
        findings.push(finding(severity, "outbound.resolver", message, detail));
    }
    findings
}

/// Asks `resolver` for a signed name (expecting the AD bit) and a bogus one (expecting
/// SERVFAIL, RFC 4035 §5.5).
async fn judge_resolver(
    resolver: &Resolver,
    signed: &str,
    bogus: &str,
) -> (Severity, String, Vec<String>) {
    let server = resolver.server();
    let not_validating = |what: String| {
        (
            Severity::Warning,
            format!("the resolver {server} does not validate DNSSEC: {what}"),
            vec![
                "!!! DANE is then never applied and no delivery is checked against TLSA \
                 records: mail to DANE domains goes out with only the TLS floor !!!"
                    .into(),
                "run a validating resolver on loopback (unbound: README, \"Outbound relay\") \
                 and name it in outbound.resolver"
                    .into(),
            ],
        )
    };
    match resolver.lookup_ip(signed).await {
        Err(err) => {
            return (
                Severity::Error,
                format!("the resolver {server} did not answer for {signed}: {err}"),
                vec![
                    "no delivery can be planned without DNS: every message would be deferred"
                        .into(),
                ],
            );
        }
        Ok(answer) if !answer.secure => {
            return not_validating(format!(
                "the answer for {signed}, a signed name, is not authenticated (no AD bit)"
            ));
        }
        Ok(_) => {}
    }
    match resolver.lookup_ip(bogus).await {
        Err(dns::Error::ServFail { .. }) => (
            Severity::Ok,
            format!(
                "the resolver {server} validates DNSSEC ({signed} authenticated, {bogus} refused)"
            ),
            Vec::new(),
        ),
        Err(err) => (
            Severity::Error,
            format!("the resolver {server} did not answer for {bogus}: {err}"),
            Vec::new(),
        ),
        Ok(_) => not_validating(format!(
            "it answered for {bogus}, whose signatures do not validate"
        )),
    }
}
