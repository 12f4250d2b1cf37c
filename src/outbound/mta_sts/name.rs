//! Domain names as MTA-STS uses them: the policy domain (the recipient's domain, whose
//! `_mta-sts` TXT record and `mta-sts` policy host are looked up, RFC 8461 §3) and a
//! policy's `mx` patterns, which say which MX hosts may receive its mail (§3.2, §4.1).
//!
//! Both are the LDH names of RFC 5321 §4.1.2 (`Domain`), compared without regard to case;
//! internationalised names appear as A-labels (§3.2), so nothing here is Unicode. A
//! policy domain also becomes a cache file name (`store`), which is why it is checked
//! strictly and kept in lower case: a name of letters, digits, inner hyphens and dots
//! cannot climb out of a directory.

use std::fmt;

/// Longest domain name in text form, without a trailing dot: 255 octets on the wire
/// (RFC 1035 §2.3.4) less the length octets.
pub const MAX_DOMAIN_LEN: usize = 253;

/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Longest policy domain: `_mta-sts.` (the TXT name, §3.1) and `mta-sts.` (the policy
/// host, §3.3) put before it must still make a valid name.
pub const MAX_POLICY_DOMAIN_LEN: usize = MAX_DOMAIN_LEN - "_mta-sts.".len();

/// Why a name is not an LDH domain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Nothing, or only a dot.
    #[error("empty domain name")]
    Empty,
    /// Longer than the bound for its use.
    #[error("domain name longer than {max} characters")]
    TooLong {
        /// The bound in force.
        max: usize,
    },
    /// A label is empty, too long, or not `Let-dig [Ldh-str]` (letters, digits and
    /// hyphens, starting and ending with a letter or digit).
    #[error("label {index} of the domain name is not letters, digits and inner hyphens")]
    BadLabel {
        /// The label's position, 0 for the leftmost.
        index: usize,
    },
}

/// `sub-domain = Let-dig [Ldh-str]` (RFC 5321 §4.1.2), at most 63 characters.
fn is_ldh_label(label: &[u8]) -> bool {
    match (label.first(), label.last()) {
        (Some(first), Some(last)) => {
            label.len() <= MAX_LABEL_LEN
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// `Domain = sub-domain *("." sub-domain)`, at most `max` characters, in lower case.
fn ldh_domain(name: &str, max: usize) -> Result<String, Error> {
    if name.is_empty() {
        return Err(Error::Empty);
    }
    if name.len() > max {
        return Err(Error::TooLong { max });
    }
    if let Some(index) = name.split('.').position(|l| !is_ldh_label(l.as_bytes())) {
        return Err(Error::BadLabel { index });
    }
    Ok(name.to_ascii_lowercase())
}

/// The domain whose policy is looked up: the recipient's domain, or the smart host's
/// (RFC 8461 §3.4). Lower case, LDH labels only, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyDomain(String);

impl PolicyDomain {
    /// Checks and lower-cases `name`; one trailing dot (a fully qualified name) is
    /// dropped.
    pub fn parse(name: &str) -> Result<PolicyDomain, Error> {
        let name = name.strip_suffix('.').unwrap_or(name);
        ldh_domain(name, MAX_POLICY_DOMAIN_LEN).map(PolicyDomain)
    }

    /// The name, lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `_mta-sts.<domain>`, the name of the TXT record (§3.1).
    pub fn txt_name(&self) -> String {
        format!("_mta-sts.{}", self.0)
    }

    /// `mta-sts.<domain>`, the policy host (§3.3).
    pub fn policy_host(&self) -> String {
        format!("mta-sts.{}", self.0)
    }
}

impl fmt::Display for PolicyDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `mx` value of a policy: `sts-policy-mx-value = ["*."] Domain` (RFC 8461 §3.2).
///
/// A wildcard stands for exactly one leftmost label (§4.1): `*.example.com` matches
/// `mx1.example.com`, but neither `example.com` nor `a.mx1.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MxPattern {
    wildcard: bool,
    /// The name after `*.`, or the whole name; lower case.
    domain: String,
}

impl MxPattern {
    /// Parses an `mx` value. Names are kept in lower case.
    pub fn parse(value: &str) -> Result<MxPattern, Error> {
        let (wildcard, domain) = match value.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let max = if wildcard {
            MAX_DOMAIN_LEN - "*.".len()
        } else {
            MAX_DOMAIN_LEN
        };
        let domain = ldh_domain(domain, max).map_err(|err| match err {
            // Count the wildcard's own label, so the index points into `value`.
            Error::BadLabel { index } if wildcard => Error::BadLabel { index: index + 1 },
            other => other,
        })?;
        Ok(MxPattern { wildcard, domain })
    }

    /// Whether the pattern starts with `*.`.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether the MX host `host` (from an MX record, with or without its trailing dot)
    /// is one this pattern names (§4.1). Case does not matter.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.domain);
        }
        match host.split_once('.') {
            Some((first, rest)) => !first.is_empty() && rest.eq_ignore_ascii_case(&self.domain),
            None => false,
        }
    }
}

impl fmt::Display for MxPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_patterns_match_as_rfc_8461_section_4_1_says() {
        let table: &[(&str, &str, bool)] = &[
            // Exact names, any case, with or without the MX record's trailing dot.
            ("mail.example.com", "mail.example.com", true),
            ("mail.example.com", "MAIL.Example.COM", true),
            ("mail.example.com", "mail.example.com.", true),
            ("MAIL.example.com", "mail.example.com", true),
            ("mail.example.com", "mail.example.com..", false),
            ("mail.example.com", "mx.example.com", false),
            ("mail.example.com", "example.com", false),
            ("mail.example.com", "a.mail.example.com", false),
            ("mail.example.com", "mail.example.co", false),
            ("mail.example.com", "", false),
            // A wildcard is one leftmost label: not zero, not two.
            ("*.example.com", "mx1.example.com", true),
            ("*.example.com", "MX1.EXAMPLE.COM.", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "example.com.", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "a.mx1.example.com", false),
            ("*.example.com", "mx1.example.net", false),
            ("*.example.com", "mx1example.com", false),
            ("*.example.com", "mx1.xexample.com", false),
            ("*.example.com", ".", false),
            ("*.example.com", "", false),
        ];
        for &(pattern, host, expected) in table {
            let parsed = MxPattern::parse(pattern).unwrap();
            assert_eq!(parsed.matches(host), expected, "{pattern} against {host:?}");
        }
    }

    #[test]
    fn mx_patterns_are_ldh_names_with_an_optional_leading_wildcard() {
        let good = MxPattern::parse("*.Mail.Example.com").unwrap();
        assert!(good.is_wildcard());
        assert_eq!(good.to_string(), "*.mail.example.com");
        assert_eq!(
            MxPattern::parse("xn--bcher-kva.example")
                .unwrap()
                .to_string(),
            "xn--bcher-kva.example"
        );
        for (bad, err) in [
            ("", Error::Empty),
            ("*.", Error::Empty),
            ("*", Error::BadLabel { index: 0 }),
            ("**.example.com", Error::BadLabel { index: 0 }),
            ("mail.*.example.com", Error::BadLabel { index: 1 }),
            ("*.*.example.com", Error::BadLabel { index: 1 }),
            ("mail.example.com.", Error::BadLabel { index: 3 }),
            ("mail..example.com", Error::BadLabel { index: 1 }),
            ("-mail.example.com", Error::BadLabel { index: 0 }),
            ("mail-.example.com", Error::BadLabel { index: 0 }),
            ("mail_x.example.com", Error::BadLabel { index: 0 }),
            ("mail example.com", Error::BadLabel { index: 0 }),
            ("bücher.example", Error::BadLabel { index: 0 }),
            ("mail.example.com\0", Error::BadLabel { index: 2 }),
        ] {
            assert_eq!(MxPattern::parse(bad), Err(err), "{bad:?}");
        }
        let long_label = "a".repeat(MAX_LABEL_LEN + 1);
        assert_eq!(
            MxPattern::parse(&format!("{long_label}.example")),
            Err(Error::BadLabel { index: 0 })
        );
        let long_name = vec!["a".repeat(63); 4].join(".");
        assert_eq!(
            MxPattern::parse(&long_name),
            Err(Error::TooLong {
                max: MAX_DOMAIN_LEN
            })
        );
    }

    #[test]
    fn a_policy_domain_is_lower_case_ldh_and_never_a_path() {
        let domain = PolicyDomain::parse("Example.COM.").unwrap();
        assert_eq!(domain.as_str(), "example.com");
        assert_eq!(domain.txt_name(), "_mta-sts.example.com");
        assert_eq!(domain.policy_host(), "mta-sts.example.com");
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\\b",
            "example.com/",
            ".example.com",
            "example..com",
            "exa mple.com",
            "*.example.com",
            "_mta-sts.example.com",
            "example.com\0",
        ] {
            assert!(PolicyDomain::parse(bad).is_err(), "{bad:?}");
        }
        // With `_mta-sts.` in front, the longest one is still a valid name.
        let longest = format!("{}.{}", "a".repeat(61), vec!["b".repeat(60); 3].join("."));
        assert_eq!(longest.len(), MAX_POLICY_DOMAIN_LEN);
        let parsed = PolicyDomain::parse(&longest).unwrap();
        assert_eq!(parsed.txt_name().len(), MAX_DOMAIN_LEN);
        assert_eq!(
            PolicyDomain::parse(&format!("a{longest}")),
            Err(Error::TooLong {
                max: MAX_POLICY_DOMAIN_LEN
            })
        );
    }
}
