//! The policy body served at `https://mta-sts.<domain>/.well-known/mta-sts.txt`
//! (RFC 8461 §3.2): the mode, the MX patterns and how long the policy may be cached.
//!
//! ```text
//! sts-policy-record    = sts-policy-field *WSP
//!                        *(sts-policy-term sts-policy-field *WSP) [sts-policy-term]
//! sts-policy-field     = sts-policy-version / sts-policy-mode / sts-policy-max-age
//!                        ; each required once
//!                      / sts-policy-mx         ; at least once unless mode is none
//!                      / sts-policy-extension  ; others, ignored
//! field-delim          = ":" *WSP
//! sts-policy-version   = %s"version" field-delim %s"STSv1"
//! sts-policy-mode      = %s"mode" field-delim (%s"testing" / %s"enforce" / %s"none")
//! sts-policy-mx        = %s"mx" field-delim ["*."] Domain
//! sts-policy-max-age   = %s"max_age" field-delim 1*10(DIGIT)
//! sts-policy-extension = sts-policy-ext-name field-delim sts-policy-ext-value
//! sts-policy-ext-name  = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
//! sts-policy-ext-value = sts-policy-vchar [*(%x20 / sts-policy-vchar) sts-policy-vchar]
//! sts-policy-vchar     = %x21-7E / UTF8-2 / UTF8-3 / UTF8-4
//! sts-policy-term      = LF / CRLF
//! ```
//!
//! Strict where the grammar is: names and values are case-sensitive, `version`, `mode`
//! and `max_age` appear once each (the grammar's "required once"; a second one would
//! leave the policy's meaning to the reader's choice, so it is an error), `max_age` is
//! at most 31557600 seconds (§3.2), control characters are refused. Unknown fields are
//! ignored (§3.2). One leniency: empty lines are skipped, since they carry no field.
//!
//! The body is bounded (64 KiB, the size §3.3 says policies should stay within) before
//! anything else is looked at, and every malformed input is an [`Error`].

use std::fmt;
use std::time::Duration;

use super::name::{self, MxPattern};
use super::record::is_ext_name;

/// Largest policy body accepted (RFC 8461 §3.3: policies should not exceed 64 KiB).
pub const MAX_POLICY_LEN: usize = 64 * 1024;

/// Largest `max_age`, in seconds: about a year (§3.2).
pub const MAX_MAX_AGE_SECS: u64 = 31_557_600;

/// Most digits in a `max_age` value (`1*10(DIGIT)`).
const MAX_MAX_AGE_DIGITS: usize = 10;

/// The only version (§3.2).
const VERSION: &str = "STSv1";

/// Why a policy body is not a valid policy (RFC 8460's `sts-policy-invalid`). `line`s
/// count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Larger than [`MAX_POLICY_LEN`].
    #[error("policy of {len} bytes is larger than {MAX_POLICY_LEN}")]
    TooLarge {
        /// The body's length.
        len: usize,
    },
    /// Not UTF-8.
    #[error("policy is not UTF-8")]
    NotUtf8,
    /// A control character (NUL, a bare CR, ...) other than a tab.
    #[error("control character on line {line}")]
    ControlCharacter {
        /// Where.
        line: usize,
    },
    /// Not `name: value` with a valid name and value.
    #[error("line {line} is not a field")]
    MalformedLine {
        /// Where.
        line: usize,
    },
    /// `version`, `mode` or `max_age` a second time.
    #[error("{field} appears again on line {line}")]
    DuplicateField {
        /// The field's name.
        field: &'static str,
        /// Where it appears again.
        line: usize,
    },
    /// A `version` other than `STSv1`.
    #[error("version on line {line} is not STSv1")]
    UnsupportedVersion {
        /// Where.
        line: usize,
    },
    /// A `mode` other than `enforce`, `testing` or `none`.
    #[error("mode on line {line} is not enforce, testing or none")]
    InvalidMode {
        /// Where.
        line: usize,
    },
    /// A `max_age` that is not 1 to 10 digits.
    #[error("max_age on line {line} is not 1 to {MAX_MAX_AGE_DIGITS} digits")]
    InvalidMaxAge {
        /// Where.
        line: usize,
    },
    /// A `max_age` over a year.
    #[error("max_age {secs} is more than {MAX_MAX_AGE_SECS} seconds")]
    MaxAgeTooLarge {
        /// The value.
        secs: u64,
    },
    /// An `mx` value that is not `["*."] Domain`.
    #[error("mx on line {line}: {source}")]
    InvalidMx {
        /// Where.
        line: usize,
        /// What is wrong with the name.
        source: name::Error,
    },
    /// No `version` field.
    #[error("policy has no version")]
    MissingVersion,
    /// No `mode` field.
    #[error("policy has no mode")]
    MissingMode,
    /// No `max_age` field.
    #[error("policy has no max_age")]
    MissingMaxAge,
    /// No `mx` field while the mode is not `none`.
    #[error("policy in mode {mode} names no mx")]
    MissingMx {
        /// The policy's mode.
        mode: Mode,
    },
}

/// What a sender does when an MX fails the policy (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deliver only to MX hosts the policy names, over PKIX-valid TLS (§5).
    Enforce,
    /// Deliver anyway, and report the failure (RFC 8460).
    Testing,
    /// As if the domain had no policy (§5, §8.3: how a domain withdraws one).
    None,
}

impl Mode {
    /// The value as the policy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }

    fn parse(value: &str) -> Option<Mode> {
        match value {
            "enforce" => Some(Mode::Enforce),
            "testing" => Some(Mode::Testing),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid MTA-STS policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What to do when an MX fails it.
    pub mode: Mode,
    /// How long, after the fetch, the policy may be used from a cache (§3.2, §5.1).
    pub max_age: Duration,
    /// The MX hosts mail may go to; empty only in mode `none`.
    pub mx: Vec<MxPattern>,
}

impl Policy {
    /// Parses a policy body.
    pub fn parse(body: &[u8]) -> Result<Policy, Error> {
        if body.len() > MAX_POLICY_LEN {
            return Err(Error::TooLarge { len: body.len() });
        }
        let text = std::str::from_utf8(body).map_err(|_| Error::NotUtf8)?;
        let mut version = false;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        for (line, raw) in (1..).zip(text.split('\n')) {
            // `sts-policy-term = LF / CRLF`: a CR anywhere else is a control character.
            let content = raw.strip_suffix('\r').unwrap_or(raw);
            if content.is_empty() {
                continue;
            }
            if content
                .bytes()
                .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return Err(Error::ControlCharacter { line });
            }
            let (name, value) = content
                .split_once(':')
                .filter(|(name, _)| is_ext_name(name))
                .ok_or(Error::MalformedLine { line })?;
            // `field-delim = ":" *WSP`, and each field may be followed by `*WSP`.
            let value = value.trim_matches([' ', '\t']);
            match name {
                "version" => {
                    once(version, "version", line)?;
                    if value != VERSION {
                        return Err(Error::UnsupportedVersion { line });
                    }
                    version = true;
                }
                "mode" => {
                    once(mode.is_some(), "mode", line)?;
                    mode = Some(Mode::parse(value).ok_or(Error::InvalidMode { line })?);
                }
                "max_age" => {
                    once(max_age.is_some(), "max_age", line)?;
                    max_age = Some(parse_max_age(value, line)?);
                }
                "mx" => mx.push(
                    MxPattern::parse(value).map_err(|source| Error::InvalidMx { line, source })?,
                ),
                _ if is_ext_value(value) => {}
                _ => return Err(Error::MalformedLine { line }),
            }
        }
        if !version {
            return Err(Error::MissingVersion);
        }
        let mode = mode.ok_or(Error::MissingMode)?;
        let max_age = max_age.ok_or(Error::MissingMaxAge)?;
        if mx.is_empty() && mode != Mode::None {
            return Err(Error::MissingMx { mode });
        }
        Ok(Policy { mode, max_age, mx })
    }

    /// Whether the MX host `host` is one the policy names (§4.1). Mode `none` names no
    /// host of its own; it is not applied at all (§5).
    pub fn allows_mx(&self, host: &str) -> bool {
        self.mx.iter().any(|pattern| pattern.matches(host))
    }
}

/// The policy as a body, CRLF-terminated lines in the order of RFC 8461's example:
/// what [`Policy::parse`] reads back as the same policy.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version: {VERSION}\r\nmode: {}\r\n", self.mode)?;
        for pattern in &self.mx {
            write!(f, "mx: {pattern}\r\n")?;
        }
        write!(f, "max_age: {}\r\n", self.max_age.as_secs())
    }
}

/// Errors on the second occurrence of a field that is required once.
fn once(seen: bool, field: &'static str, line: usize) -> Result<(), Error> {
    if seen {
        return Err(Error::DuplicateField { field, line });
    }
    Ok(())
}

/// `1*10(DIGIT)`, at most [`MAX_MAX_AGE_SECS`].
fn parse_max_age(value: &str, line: usize) -> Result<Duration, Error> {
    if value.is_empty()
        || value.len() > MAX_MAX_AGE_DIGITS
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Error::InvalidMaxAge { line });
    }
    // Ten digits fit in a u64, so this cannot fail.
    let secs: u64 = value.parse().map_err(|_| Error::InvalidMaxAge { line })?;
    if secs > MAX_MAX_AGE_SECS {
        return Err(Error::MaxAgeTooLarge { secs });
    }
    Ok(Duration::from_secs(secs))
}

/// `sts-policy-ext-value`: no leading or trailing space (taken off before this), inner
/// spaces, no tabs; control characters were refused for the whole line.
fn is_ext_value(value: &str) -> bool {
    !value.is_empty() && !value.contains('\t')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn mx(patterns: &[&str]) -> Vec<MxPattern> {
        patterns
            .iter()
            .map(|p| MxPattern::parse(p).unwrap())
            .collect()
    }

    #[test]
    fn the_rfc_8461_example_policy() {
        // §3.2's example, with its mixed line ends: CRLF after the first line, LF after
        // the others.
        let body = "version: STSv1\r\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n";
        let policy = Policy::parse(body.as_bytes()).unwrap();
        assert_eq!(
            policy,
            Policy {
                mode: Mode::Enforce,
                max_age: Duration::from_secs(604_800),
                mx: mx(&["mail.example.com", "*.example.net", "backupmx.example.com"]),
            }
        );
        assert!(policy.allows_mx("mail.example.com."));
        assert!(policy.allows_mx("mx1.example.net"));
        assert!(!policy.allows_mx("example.net"));
        assert!(!policy.allows_mx("mx.attacker.example"));
    }

    #[test]
    fn line_ends_white_space_order_and_unknown_fields() {
        let want = Policy {
            mode: Mode::Testing,
            max_age: Duration::from_secs(86_400),
            mx: mx(&["mx.example.com"]),
        };
        for body in [
            "version: STSv1\r\nmode: testing\r\nmx: mx.example.com\r\nmax_age: 86400\r\n",
            "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400",
            "max_age:86400\nmx:MX.Example.com\nmode:testing\nversion:STSv1\n",
            "version:\t STSv1 \t\r\nmode: testing\t\nmx: mx.example.com  \nmax_age:  86400\n",
            "\n\nversion: STSv1\n\r\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n\n",
            "version: STSv1\nVersion: STSv2\nMode: none\nx_1.a-b: any thing, ünïcode ok\nmode: testing\nfuture: 1\nfuture: 2\nmx: mx.example.com\nmax_age: 86400\n",
            "version: STSv1\nmode: testing\nempty_ok_after_colon:x\nmx: mx.example.com\nmax_age: 0086400\n",
        ] {
            assert_eq!(Policy::parse(body.as_bytes()), Ok(want.clone()), "{body:?}");
        }
    }

    #[test]
    fn mode_none_needs_no_mx_and_max_age_has_its_bounds() {
        let none = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 0\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        assert_eq!(none.max_age, Duration::ZERO);
        assert!(none.mx.is_empty());
        let year = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 31557600\n").unwrap();
        assert_eq!(year.max_age, Duration::from_secs(MAX_MAX_AGE_SECS));
    }

    #[test]
    fn malformed_policies_are_errors() {
        const V: &str = "version: STSv1\n";
        const M: &str = "mode: enforce\n";
        const X: &str = "mx: mail.example.com\n";
        const A: &str = "max_age: 86400\n";
        let table: Vec<(String, Error)> = vec![
            (String::new(), Error::MissingVersion),
            (format!("{M}{X}{A}"), Error::MissingVersion),
            (format!("{V}{X}{A}"), Error::MissingMode),
            (format!("{V}{M}{X}"), Error::MissingMaxAge),
            (
                format!("{V}{M}{A}"),
                Error::MissingMx {
                    mode: Mode::Enforce,
                },
            ),
            (
                format!("{V}mode: testing\n{A}"),
                Error::MissingMx {
                    mode: Mode::Testing,
                },
            ),
            (
                format!("version: STSv2\n{M}{X}{A}"),
                Error::UnsupportedVersion { line: 1 },
            ),
            (
                format!("version: stsv1\n{M}{X}{A}"),
                Error::UnsupportedVersion { line: 1 },
            ),
            (
                format!("{V}mode: Enforce\n{X}{A}"),
                Error::InvalidMode { line: 2 },
            ),
            (
                format!("{V}mode: strict\n{X}{A}"),
                Error::InvalidMode { line: 2 },
            ),
            (format!("{V}mode:\n{X}{A}"), Error::InvalidMode { line: 2 }),
            (
                format!("{V}mode: en force\n{X}{A}"),
                Error::InvalidMode { line: 2 },
            ),
            (
                format!("{V}{M}{X}max_age: -1\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: +1\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: 1.5\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: 1 0\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age:\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: ١٢\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: 00000000001\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: 99999999999999999999999\n"),
                Error::InvalidMaxAge { line: 4 },
            ),
            (
                format!("{V}{M}{X}max_age: 31557601\n"),
                Error::MaxAgeTooLarge { secs: 31_557_601 },
            ),
            (
                format!("{V}{M}{X}max_age: 9999999999\n"),
                Error::MaxAgeTooLarge {
                    secs: 9_999_999_999,
                },
            ),
            (
                format!("{V}{M}mx: mail.example.com.\n{A}"),
                Error::InvalidMx {
                    line: 3,
                    source: name::Error::BadLabel { index: 3 },
                },
            ),
            (
                format!("{V}{M}mx: mail.*.com\n{A}"),
                Error::InvalidMx {
                    line: 3,
                    source: name::Error::BadLabel { index: 1 },
                },
            ),
            (
                format!("{V}{M}mx: mail.example.com mx2.example.com\n{A}"),
                Error::InvalidMx {
                    line: 3,
                    source: name::Error::BadLabel { index: 2 },
                },
            ),
            (
                format!("{V}{M}mx:\n{A}"),
                Error::InvalidMx {
                    line: 3,
                    source: name::Error::Empty,
                },
            ),
            (
                format!("{V}{M}{X}{A}mode: none\n"),
                Error::DuplicateField {
                    field: "mode",
                    line: 5,
                },
            ),
            (
                format!("{V}{V}{M}{X}{A}"),
                Error::DuplicateField {
                    field: "version",
                    line: 2,
                },
            ),
            (
                format!("{V}{M}{X}{A}{A}"),
                Error::DuplicateField {
                    field: "max_age",
                    line: 5,
                },
            ),
            (
                format!("{V}{M}{X}{A}garbage\n"),
                Error::MalformedLine { line: 5 },
            ),
            (format!("{V} {M}{X}{A}"), Error::MalformedLine { line: 2 }),
            (
                format!("{V}mode : enforce\n{X}{A}"),
                Error::MalformedLine { line: 2 },
            ),
            (
                format!("{V}{M}{X}{A}: x\n"),
                Error::MalformedLine { line: 5 },
            ),
            (
                format!("{V}{M}{X}{A}ext:\n"),
                Error::MalformedLine { line: 5 },
            ),
            (
                format!("{V}{M}{X}{A}ext: a\tb\n"),
                Error::MalformedLine { line: 5 },
            ),
            (
                format!("{V}{M}{X}{A}_ext: a\n"),
                Error::MalformedLine { line: 5 },
            ),
            (
                format!("{V}{M}{X}{A}{}: a\n", "n".repeat(33)),
                Error::MalformedLine { line: 5 },
            ),
            (
                format!("{V}mode: enforce\0\n{X}{A}"),
                Error::ControlCharacter { line: 2 },
            ),
            (
                format!("{V}\0{M}{X}{A}"),
                Error::ControlCharacter { line: 2 },
            ),
            (
                format!("{V}mode: enforce\r{X}{A}"),
                Error::ControlCharacter { line: 2 },
            ),
            (
                format!("{V}{M}{X}{A}ext: a\x7f\n"),
                Error::ControlCharacter { line: 5 },
            ),
            (
                format!("{V}{M}{X}{A}\x1b[31m\n"),
                Error::ControlCharacter { line: 5 },
            ),
        ];
        for (body, err) in table {
            assert_eq!(Policy::parse(body.as_bytes()), Err(err), "{body:?}");
        }
    }

    #[test]
    fn bytes_that_are_not_text_and_bodies_that_are_too_long() {
        assert_eq!(
            Policy::parse(b"version: STSv1\nmode: enforce\nmx: m\xffx.example\nmax_age: 1\n"),
            Err(Error::NotUtf8)
        );
        // A UTF-8 sequence cut short.
        assert_eq!(
            Policy::parse(b"version: STSv1\xe2\x82"),
            Err(Error::NotUtf8)
        );

        // One very long line: under the cap it is just an unknown field.
        let base = "version: STSv1\nmode: testing\nmx: mx.example\nmax_age: 60\nlong: ";
        let fill = "y".repeat(MAX_POLICY_LEN - base.len() - 1);
        let at_cap = format!("{base}{fill}\n");
        assert_eq!(at_cap.len(), MAX_POLICY_LEN);
        assert!(Policy::parse(at_cap.as_bytes()).is_ok());
        let over = format!("{base}{fill}y\n");
        assert_eq!(
            Policy::parse(over.as_bytes()),
            Err(Error::TooLarge {
                len: MAX_POLICY_LEN + 1
            })
        );
        // The bound comes first: a huge body is refused without being read.
        assert_eq!(
            Policy::parse(&vec![0xff; 10 * MAX_POLICY_LEN]),
            Err(Error::TooLarge {
                len: 10 * MAX_POLICY_LEN
            })
        );
        // A long mx line without a line end.
        let long_mx = format!(
            "version: STSv1\nmode: enforce\nmax_age: 1\nmx: {}",
            "a.".repeat(30_000)
        );
        assert!(matches!(
            Policy::parse(long_mx.as_bytes()),
            Err(Error::InvalidMx { line: 4, .. })
        ));
    }

    #[test]
    fn a_rendered_policy_is_rfc_8461_text() {
        let policy = Policy {
            mode: Mode::Enforce,
            max_age: Duration::from_secs(604_800),
            mx: mx(&["mail.example.com", "*.example.net"]),
        };
        assert_eq!(
            policy.to_string(),
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"
        );
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
    }

    fn pattern() -> impl Strategy<Value = MxPattern> {
        (any::<bool>(), proptest::collection::vec(label(), 1..4)).prop_map(|(wild, labels)| {
            let name = labels.join(".");
            let text = if wild { format!("*.{name}") } else { name };
            MxPattern::parse(&text).unwrap()
        })
    }

    fn valid_policy() -> impl Strategy<Value = Policy> {
        (
            prop_oneof![Just(Mode::Enforce), Just(Mode::Testing), Just(Mode::None)],
            0..=MAX_MAX_AGE_SECS,
            proptest::collection::vec(pattern(), 0..5),
        )
            .prop_map(|(mode, secs, mut mx)| {
                if mode != Mode::None && mx.is_empty() {
                    mx.push(MxPattern::parse("mx.example").unwrap());
                }
                Policy {
                    mode,
                    max_age: Duration::from_secs(secs),
                    mx,
                }
            })
    }

    /// Lines built from the grammar's pieces and near misses, to reach past the first
    /// check more often than random bytes do.
    fn policy_like() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            Just("version: STSv1".to_owned()),
            Just("mode: enforce".to_owned()),
            Just("mode: none".to_owned()),
            "max_age: [0-9+-]{0,12}",
            "mx: [*a-z0-9.-]{0,20}",
            "[a-z_:. \\t]{0,10}: ?[ -~\\x{80}-\\x{10FFFF}]{0,10}",
            "[\\x00-\\x7f]{0,6}",
        ];
        (
            proptest::collection::vec(line, 0..8),
            proptest::collection::vec(
                prop_oneof![Just("\n"), Just("\r\n"), Just("\r"), Just("")],
                8,
            ),
        )
            .prop_map(|(lines, ends)| {
                lines
                    .iter()
                    .zip(ends)
                    .flat_map(|(line, end)| [line.as_str(), end])
                    .collect::<String>()
                    .into_bytes()
            })
    }

    proptest! {
        #[test]
        fn the_parser_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Policy::parse(&body);
        }

        #[test]
        fn the_parser_never_panics_on_policy_like_text(body in policy_like()) {
            if let Ok(policy) = Policy::parse(&body) {
                // Whatever it accepts, it reads back from its own rendering.
                prop_assert_eq!(Policy::parse(policy.to_string().as_bytes()), Ok(policy));
            }
        }

        #[test]
        fn a_rendered_policy_parses_back_to_itself(policy in valid_policy()) {
            let text = policy.to_string();
            prop_assert_eq!(Policy::parse(text.as_bytes()), Ok(policy.clone()));
            // And with bare LF line ends.
            prop_assert_eq!(Policy::parse(text.replace("\r\n", "\n").as_bytes()), Ok(policy));
        }
    }
}
