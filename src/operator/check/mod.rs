//! `mailmoat check`: like `nginx -t`, every problem at once. The configuration is
//! parsed and validated, every certificate is loaded and checked, and every listener's
//! upstream is probed: reachable, speaking the listener's protocol, and for SMTP not an
//! open relay for the address mailmoat connects from (ARCHITECTURE.md §7). The outbound
//! relay's resolver is asked whether it validates DNSSEC ([`outbound`]). Nothing is bound.
//!
//! Output: one `error:`, `warning:` or `ok:` line per finding, prefixed with
//! `FILE:LINE:` where the finding belongs to a line of the file, guidance indented below
//! it, then one summary line. Problems go to stderr, `ok:` lines and the summary to
//! stdout. Exit codes: [`EXIT_OK`], [`EXIT_FAILED`], [`EXIT_CONFIG`].
//!
//! Deadlines: each upstream connect within `timeouts.upstream_connect`, each of its
//! replies within `timeouts.greeting`.

pub mod certificates;
pub mod outbound;

use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use crate::config::{Config, ListenerConfig, Positions, Protocol};
use crate::operator::probe::{
    self, RELAY_PROBE_RECIPIENT, RELAY_PROBE_SENDER, RelayVerdict, quoted,
};

/// Everything checked is fine (warnings allowed).
pub const EXIT_OK: u8 = 0;
/// The configuration is valid, but a certificate or an upstream is not.
pub const EXIT_FAILED: u8 = 1;
/// The configuration file itself is invalid (the code `run` and `explain` exit with,
/// too): 64, sysexits.h's EX_USAGE (its EX_CONFIG is 78).
pub const EXIT_CONFIG: u8 = 64;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Fails the check.
    Error,
    /// Worth fixing; the check still passes.
    Warning,
    /// Checked and fine.
    Ok,
}

/// One result of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// The YAML line it belongs to, when known.
    pub line: Option<usize>,
    /// What it is about: `tls.certificates[0]`, `listeners[1] (submission)`.
    pub subject: String,
    /// What was found.
    pub message: String,
    /// Guidance, one line each, printed indented below.
    pub detail: Vec<String>,
}

impl Finding {
    /// The finding as printed, `origin` naming the file.
    pub fn render(&self, origin: &str) -> String {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Ok => "ok",
        };
        let mut out = match (self.severity, self.line) {
            (Severity::Ok, _) => format!("{label}: {}: {}", self.subject, self.message),
            (_, Some(line)) => format!(
                "{label}: {origin}:{line}: {}: {}",
                self.subject, self.message
            ),
            (_, None) => format!("{label}: {origin}: {}: {}", self.subject, self.message),
        };
        for detail in &self.detail {
            let _ = write!(out, "\n  {detail}");
        }
        out
    }
}

/// What `check` does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Skip the upstream probes (configuration and certificates only).
    pub offline: bool,
}

/// Runs the whole check on the file at `path`, prints the report and returns the exit
/// code.
pub async fn run(path: &Path, options: Options) -> u8 {
    let origin = path.display().to_string();
    let (config, positions) = match Config::load(path) {
        Ok(loaded) => loaded,
        Err(err) => {
            for problem in &err.problems {
                match problem.line {
                    Some(line) => eprintln!("error: {origin}:{line}: {}", problem.message),
                    None => eprintln!("error: {origin}: {}", problem.message),
                }
            }
            println!(
                "check failed: {} configuration error(s), nothing else was checked",
                err.problems.len()
            );
            return EXIT_CONFIG;
        }
    };
    let findings = check_config(&config, &positions, options).await;
    report(&origin, &findings)
}

/// Every finding for a parsed configuration; `positions` gives their lines.
pub async fn check_config(
    config: &Config,
    positions: &Positions,
    options: Options,
) -> Vec<Finding> {
    let provider = crate::tls::provider();
    let mut findings = certificates::check(&config.tls, &provider, SystemTime::now(), positions);
    if let Some(section) = &config.outbound {
        findings.extend(outbound::check(section, positions, !options.offline).await);
    }
    if options.offline {
        return findings;
    }
    for (index, listener) in config.listeners.iter().enumerate() {
        let subject = format!("listeners[{index}] ({})", listener.name);
        let line = positions.line(&format!("listeners[{index}].upstream"));
        let outcome = probe::probe(listener, &config.timeouts).await;
        for (severity, message, detail) in judge(listener, outcome) {
            findings.push(Finding {
                severity,
                line,
                subject: subject.clone(),
                message,
                detail,
            });
        }
    }
    findings
}

/// Prints the findings and the summary; returns the exit code.
pub fn report(origin: &str, findings: &[Finding]) -> u8 {
    let count = |severity| findings.iter().filter(|f| f.severity == severity).count();
    let (errors, warnings) = (count(Severity::Error), count(Severity::Warning));
    for finding in findings {
        let text = finding.render(origin);
        match finding.severity {
            Severity::Ok => println!("{text}"),
            Severity::Error | Severity::Warning => eprintln!("{text}"),
        }
    }
    if errors == 0 {
        println!("check passed: {origin}: 0 errors, {warnings} warning(s)");
        EXIT_OK
    } else {
        println!("check failed: {origin}: {errors} error(s), {warnings} warning(s)");
        EXIT_FAILED
    }
}

type Judgement = (Severity, String, Vec<String>);

/// Turns one listener's probe into findings.
fn judge(
    listener: &ListenerConfig,
    outcome: Result<probe::Findings, probe::Error>,
) -> Vec<Judgement> {
    let upstream = &listener.upstream;
    let protocol = probe::protocol_name(listener.protocol);
    let found = match outcome {
        Ok(found) => found,
        Err(err) => {
            return vec![(
                Severity::Error,
                format!("upstream {upstream} ({protocol}): {err}"),
                Vec::new(),
            )];
        }
    };
    let mut out = vec![(
        Severity::Ok,
        format!(
            "upstream {upstream} speaks {protocol}: {}",
            quoted(&found.greeting.one_line())
        ),
        Vec::new(),
    )];
    for warning in &found.warnings {
        out.push((
            Severity::Warning,
            format!("upstream {upstream}: {warning}"),
            Vec::new(),
        ));
    }
    if listener.protocol == Protocol::Smtp {
        out.push(judge_relay(listener, found.relay, found.source));
    }
    out
}

fn judge_relay(
    listener: &ListenerConfig,
    verdict: Option<RelayVerdict>,
    source: Option<std::net::IpAddr>,
) -> Judgement {
    let upstream = &listener.upstream;
    let from = source.map_or_else(
        || "the address mailmoat connects from".to_owned(),
        |ip| format!("{ip}, the address mailmoat connects from"),
    );
    let rcpt = format!("RCPT TO:<{RELAY_PROBE_RECIPIENT}>");
    match verdict {
        Some(RelayVerdict::Refused(reply)) => (
            Severity::Ok,
            format!(
                "upstream {upstream} refuses to relay for mailmoat: {rcpt} was answered {}",
                quoted(&reply.one_line())
            ),
            Vec::new(),
        ),
        Some(RelayVerdict::WouldRelay(reply)) => (
            Severity::Error,
            format!(
                "upstream {upstream} is an open relay for mailmoat: unauthenticated \
                 MAIL FROM:<{RELAY_PROBE_SENDER}> {rcpt} was answered {}",
                quoted(&reply.one_line())
            ),
            relay_guidance(&from),
        ),
        Some(RelayVerdict::RecipientRefused(reply)) => (
            Severity::Warning,
            format!(
                "upstream {upstream}: {rcpt} was refused, but not as relaying ({}): it may \
                 still relay for {from} to domains that exist; make sure it does not",
                quoted(&reply.one_line())
            ),
            Vec::new(),
        ),
        Some(RelayVerdict::Inconclusive(reply)) => (
            Severity::Warning,
            format!(
                "upstream {upstream}: relay probe inconclusive: {rcpt} was answered {} \
                 (temporary failure); check again",
                quoted(&reply.one_line())
            ),
            Vec::new(),
        ),
        Some(RelayVerdict::SenderRefused(reply)) => (
            Severity::Warning,
            format!(
                "upstream {upstream}: relay probe inconclusive: MAIL FROM:<{RELAY_PROBE_SENDER}> \
                 was answered {}",
                quoted(&reply.one_line())
            ),
            Vec::new(),
        ),
        None => (
            Severity::Warning,
            format!("upstream {upstream}: relay probe not run"),
            Vec::new(),
        ),
    }
}

/// What to do about the open-relay trap (ARCHITECTURE.md §7).
fn relay_guidance(from: &str) -> Vec<String> {
    vec![
        format!("The upstream trusts {from}."),
        "Every client of this listener arrives from there, so anyone who reaches it could relay"
            .into(),
        "mail to any domain. MX (port 25) and submission listeners alike must refuse".into(),
        "unauthenticated mail to foreign domains. Fix one of:".into(),
        "- stop trusting that address upstream (Postfix: take it out of mynetworks, keep".into(),
        "  reject_unauth_destination in smtpd_relay_restrictions);".into(),
        "- connect from a dedicated loopback address the upstream does not trust".into(),
        "  (the listener's source_address);".into(),
        "- hand the client's own address to the upstream: XCLIENT (Postfix".into(),
        "  smtpd_authorized_xclient_hosts) or PROXY protocol (smtpd_upstream_proxy_protocol)."
            .into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_render_with_file_line_and_indented_guidance() {
        let finding = Finding {
            severity: Severity::Error,
            line: Some(7),
            subject: "listeners[0] (mx)".into(),
            message: "bad".into(),
            detail: vec!["fix it".into()],
        };
        assert_eq!(
            finding.render("m.yaml"),
            "error: m.yaml:7: listeners[0] (mx): bad\n  fix it"
        );
        let ok = Finding {
            severity: Severity::Ok,
            line: Some(7),
            detail: Vec::new(),
            ..finding
        };
        assert_eq!(ok.render("m.yaml"), "ok: listeners[0] (mx): bad");
    }
}
