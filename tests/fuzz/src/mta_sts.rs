//! `mta_sts_policy`: the MTA-STS parsers of `mailmoat::outbound::mta_sts` on arbitrary
//! bytes. The whole input is one policy body (RFC 8461 §3.2); its lines (cut at LF) are
//! also the TXT strings of one `_mta-sts` name (§3.1), candidate policy domains and MX
//! host names.
//!
//! Checks, besides never panicking: a body over the cap is refused for its size; an
//! accepted policy is within the RFC's bounds and reads back from its own rendering; each
//! of its patterns matches the hosts RFC 8461 §4.1 says it does; an accepted record
//! came from the only candidate string and has a valid id; an accepted policy domain is a
//! name that cannot leave the cache directory.
//!
//! This file depends on nothing but `mailmoat` and `std`, so `tests/fuzz_regressions.rs`
//! includes it with `#[path]` and replays the seeds through it.

use mailmoat::outbound::mta_sts::policy::{self, MAX_MAX_AGE_SECS, MAX_POLICY_LEN, Mode, Policy};
use mailmoat::outbound::mta_sts::{MxPattern, PolicyDomain, parse_records};

/// The target's entry point.
pub fn mta_sts_policy(data: &[u8]) {
    check_policy(data);
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    check_records(&lines);
    for line in &lines {
        if let Ok(text) = std::str::from_utf8(line) {
            check_domain(text);
            if let Ok(pattern) = MxPattern::parse(text) {
                check_pattern(&pattern);
            }
        }
    }
}

fn check_policy(data: &[u8]) {
    match Policy::parse(data) {
        Ok(policy) => {
            assert!(data.len() <= MAX_POLICY_LEN);
            assert!(policy.max_age.as_secs() <= MAX_MAX_AGE_SECS);
            assert!(
                policy.mode == Mode::None || !policy.mx.is_empty(),
                "mode {} without mx",
                policy.mode
            );
            let rendered = policy.to_string();
            assert_eq!(
                Policy::parse(rendered.as_bytes()).as_ref(),
                Ok(&policy),
                "{rendered:?}"
            );
            for pattern in &policy.mx {
                check_pattern(pattern);
            }
        }
        Err(policy::Error::TooLarge { len }) => assert_eq!(len, data.len()),
        Err(_) => assert!(
            data.len() <= MAX_POLICY_LEN,
            "an oversized body read further"
        ),
    }
}

/// A pattern reads back from its text and matches as §4.1 says.
fn check_pattern(pattern: &MxPattern) {
    let text = pattern.to_string();
    assert_eq!(MxPattern::parse(&text).as_ref(), Ok(pattern));
    assert_eq!(text, text.to_ascii_lowercase());
    match text.strip_prefix("*.") {
        Some(domain) => {
            assert!(pattern.matches(&format!("mx.{domain}")));
            assert!(pattern.matches(&format!("MX.{}.", domain.to_ascii_uppercase())));
            assert!(!pattern.matches(domain), "zero labels for the wildcard");
            assert!(!pattern.matches(&format!("a.b.{domain}")), "two labels");
        }
        None => {
            assert!(pattern.matches(&text));
            assert!(pattern.matches(&format!("{}.", text.to_ascii_uppercase())));
            assert!(!pattern.matches(&format!("a.{text}")));
        }
    }
}

fn check_records(txts: &[&[u8]]) {
    if let Ok(Some(record)) = parse_records(txts) {
        // A candidate begins with `v=STSv1`, then a delimiter, white space or the end.
        let candidates: Vec<&&[u8]> = txts
            .iter()
            .filter(|t| {
                t.strip_prefix(b"v=STSv1")
                    .is_some_and(|rest| matches!(rest.first(), None | Some(b';' | b' ' | b'\t')))
            })
            .collect();
        assert_eq!(
            candidates.len(),
            1,
            "a record from one of several candidates"
        );
        let id = record.id.as_str();
        assert!((1..=32).contains(&id.len()));
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
        let field = format!("id={id}");
        let text = String::from_utf8_lossy(candidates[0]);
        assert!(text.contains(&field), "{id} not in {text:?}");
    }
}

/// An accepted policy domain is a lower-case LDH name: a safe file name.
fn check_domain(text: &str) {
    if let Ok(domain) = PolicyDomain::parse(text) {
        let name = domain.as_str();
        assert!(!name.is_empty() && name.len() <= 244);
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        );
        assert!(!name.starts_with('.') && !name.ends_with('.') && !name.contains(".."));
        assert_eq!(PolicyDomain::parse(name).as_ref(), Ok(&domain));
    }
}
