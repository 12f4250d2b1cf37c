//! The `_mta-sts.<domain>` TXT record (RFC 8461 §3.1): it says that the domain publishes
//! a policy, and its `id` says which one, so that a sender fetches the policy again only
//! when the id changes (§5.1).
//!
//! ```text
//! sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
//! sts-field       = sts-id / sts-extension
//! sts-field-delim = *WSP ";" *WSP
//! sts-version     = %s"v=STSv1"
//! sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
//! sts-extension   = sts-ext-name "=" sts-ext-value
//! sts-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
//! sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)
//! ```
//!
//! Of all the TXT records at the name, those that do not begin with `v=STSv1` are
//! discarded; if not exactly one remains, or it is malformed, the domain has no usable
//! record (§3.1). That alone never removes a cached policy (§3.1, §5.1): see `cache`.
//!
//! Two leniencies, both of which can only keep a published policy in force: white space
//! after the last field without a `;` after it is accepted, and so is an unknown
//! field's repetition. A second `id` is an error: the record would not say which policy
//! it names.

use std::fmt;

/// The version field every record begins with.
const VERSION: &str = "v=STSv1";

/// Longest `id` (§3.1).
pub const MAX_ID_LEN: usize = 32;

/// Longest extension field name (`sts-ext-name`: 1 + 31 characters).
const MAX_EXT_NAME_LEN: usize = 32;

/// Why the TXT records at `_mta-sts.<domain>` give no usable record. Every variant means
/// the same to delivery (no policy discovered, §3.1); they differ for the logs and for
/// `mailmoat explain`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// More than one record begins with `v=STSv1`.
    #[error("{count} TXT records begin with v=STSv1; exactly one is allowed")]
    MultipleRecords {
        /// How many did.
        count: usize,
    },
    /// The record does not begin with `v=STSv1` followed by a delimiter.
    #[error("the record does not begin with v=STSv1")]
    NotStsV1,
    /// A byte outside US-ASCII (the record MUST be US-ASCII, §3.1).
    #[error("the record is not US-ASCII")]
    NotAscii,
    /// No field follows the version.
    #[error("no field follows v=STSv1")]
    NoFields,
    /// Two delimiters with nothing but white space between them.
    #[error("field {index} is empty")]
    EmptyField {
        /// The field's position after the version, from 1.
        index: usize,
    },
    /// A field that is not `name=value` with the grammar's characters.
    #[error("field {index} is not name=value")]
    MalformedField {
        /// The field's position after the version, from 1.
        index: usize,
    },
    /// The `id` is not 1 to 32 letters and digits.
    #[error("the id is not 1 to {MAX_ID_LEN} letters and digits")]
    InvalidId,
    /// Two `id` fields.
    #[error("the record has two ids")]
    DuplicateId,
    /// No `id` field.
    #[error("the record has no id")]
    MissingId,
}

/// A policy's id (`sts-id`'s value): 1 to 32 letters and digits, compared exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyId(String);

impl PolicyId {
    /// Checks the id's grammar.
    pub fn parse(id: &str) -> Result<PolicyId, Error> {
        if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::InvalidId);
        }
        Ok(PolicyId(id.to_owned()))
    }

    /// The id as published.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid `_mta-sts` record. Extension fields are not kept: none is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The policy's id.
    pub id: PolicyId,
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Whether a TXT string is a candidate: `v=STSv1`, then a delimiter or the end.
fn begins_with_version(txt: &[u8]) -> bool {
    txt.strip_prefix(VERSION.as_bytes())
        .is_some_and(|rest| rest.first().is_none_or(|&b| b == b';' || is_wsp(b)))
}

/// The record among the TXT records of `_mta-sts.<domain>`, each given whole (its
/// character-strings already joined without spaces, §3.1).
///
/// `Ok(None)`: no record begins with `v=STSv1`, the domain publishes no policy. An error:
/// the one candidate is malformed, or there are several. Either way no policy is
/// discovered, but a cached one stays in force (§3.1, §5.1).
pub fn parse_records<T: AsRef<[u8]>>(txts: &[T]) -> Result<Option<Record>, Error> {
    let mut candidates = txts
        .iter()
        .map(AsRef::as_ref)
        .filter(|txt| begins_with_version(txt));
    let Some(first) = candidates.next() else {
        return Ok(None);
    };
    let others = candidates.count();
    if others > 0 {
        return Err(Error::MultipleRecords { count: others + 1 });
    }
    parse_record(first).map(Some)
}

/// One `sts-text-record`.
pub fn parse_record(txt: &[u8]) -> Result<Record, Error> {
    let txt = std::str::from_utf8(txt)
        .ok()
        .filter(|txt| txt.is_ascii())
        .ok_or(Error::NotAscii)?;
    let rest = txt.strip_prefix(VERSION).ok_or(Error::NotStsV1)?;
    let mut pieces = rest.split(';');
    // Between the version and the first `;` only white space may stand.
    if !pieces.next().unwrap_or_default().bytes().all(is_wsp) {
        return Err(Error::NotStsV1);
    }
    let mut fields: Vec<&str> = pieces.map(trim_wsp).collect();
    // `[sts-field-delim]`: the record may end with a delimiter.
    if fields.len() > 1 && fields.last() == Some(&"") {
        fields.pop();
    }
    if fields.is_empty() || fields == [""] {
        return Err(Error::NoFields);
    }
    let mut id = None;
    for (index, field) in (1..).zip(fields) {
        if field.is_empty() {
            return Err(Error::EmptyField { index });
        }
        let (name, value) = field
            .split_once('=')
            .filter(|(name, value)| is_ext_name(name) && is_ext_value(value))
            .ok_or(Error::MalformedField { index })?;
        // Field names are case-sensitive (`%s"id="`): `ID=` is an extension.
        if name == "id" {
            if id.is_some() {
                return Err(Error::DuplicateId);
            }
            id = Some(PolicyId::parse(value)?);
        }
    }
    id.map(|id| Record { id }).ok_or(Error::MissingId)
}

/// `sts-ext-name` (and `sts-policy-ext-name`, the same rule).
pub(super) fn is_ext_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.len() <= MAX_EXT_NAME_LEN
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `sts-ext-value`: visible US-ASCII but `;` and `=`.
fn is_ext_value(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(record: Result<Option<Record>, Error>) -> Option<String> {
        record.unwrap().map(|r| r.id.as_str().to_owned())
    }

    #[test]
    fn the_rfc_8461_example_record() {
        // §3.1: `_mta-sts.example.com.  IN TXT "v=STSv1; id=20160831085700Z;"`
        assert_eq!(
            id(parse_records(&["v=STSv1; id=20160831085700Z;"])),
            Some("20160831085700Z".to_owned())
        );
    }

    #[test]
    fn white_space_and_extensions_follow_the_grammar() {
        for good in [
            "v=STSv1;id=abc",
            "v=STSv1; id=abc",
            "v=STSv1 ; id=abc ;",
            "v=STSv1\t;\tid=abc\t;\t",
            "v=STSv1; id=abc; ext=value",
            "v=STSv1; ext_1.a-b=!\"#$%&'()*+,-./09:<>?@AZ[]^_`az{|}~; id=abc",
            "v=STSv1; ID=not-the-id; id=abc",
            "v=STSv1; v=STSv2; id=abc",
            "v=STSv1; e=1; e=2; id=abc",
            // Trailing white space without a `;`: accepted (see the module doc).
            "v=STSv1; id=abc ",
        ] {
            assert_eq!(
                parse_record(good.as_bytes()).map(|r| r.id),
                Ok(PolicyId("abc".into())),
                "{good:?}"
            );
        }
        let longest = "a".repeat(MAX_ID_LEN);
        assert!(parse_record(format!("v=STSv1; id={longest}").as_bytes()).is_ok());
    }

    #[test]
    fn malformed_records_are_errors() {
        let too_long_id = format!("v=STSv1; id={}", "a".repeat(MAX_ID_LEN + 1));
        let too_long_name = format!("v=STSv1; id=a; {}=b", "n".repeat(MAX_EXT_NAME_LEN + 1));
        let table: &[(&[u8], Error)] = &[
            (b"", Error::NotStsV1),
            (b"v=STSv1", Error::NoFields),
            (b"v=STSv1;", Error::NoFields),
            (b"v=STSv1 ; ", Error::NoFields),
            (b"v=STSv1x; id=a", Error::NotStsV1),
            (b" v=STSv1; id=a", Error::NotStsV1),
            (b"v=stsv1; id=a", Error::NotStsV1),
            (b"v=STSv1 id=a", Error::NotStsV1),
            (b"v=STSv1; id=a;; ", Error::EmptyField { index: 2 }),
            (b"v=STSv1; ; id=a", Error::EmptyField { index: 1 }),
            (b"v=STSv1; id", Error::MalformedField { index: 1 }),
            (b"v=STSv1; id =a", Error::MalformedField { index: 1 }),
            (b"v=STSv1; id= a", Error::MalformedField { index: 1 }),
            (b"v=STSv1; id=a b", Error::MalformedField { index: 1 }),
            (b"v=STSv1; id=a; x=", Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a; x=y=z", Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a; _x=y", Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a; =y", Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a; x=\x7f", Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a\0", Error::MalformedField { index: 1 }),
            (b"v=STSv1; id=a-b", Error::InvalidId),
            (b"v=STSv1; id=a.b", Error::InvalidId),
            (too_long_id.as_bytes(), Error::InvalidId),
            (too_long_name.as_bytes(), Error::MalformedField { index: 2 }),
            (b"v=STSv1; id=a; id=a", Error::DuplicateId),
            (b"v=STSv1; ext=1", Error::MissingId),
            (b"v=STSv1; id=caf\xc3\xa9", Error::NotAscii),
            (b"v=STSv1; id=\xff", Error::NotAscii),
        ];
        for (txt, err) in table {
            assert_eq!(
                parse_record(txt),
                Err(err.clone()),
                "{:?}",
                String::from_utf8_lossy(txt)
            );
        }
    }

    #[test]
    fn only_records_beginning_with_the_version_count_and_only_one_may() {
        let none: [&str; 0] = [];
        assert_eq!(parse_records(&none), Ok(None));
        assert_eq!(
            parse_records(&["v=spf1 -all", "google-site-verification=x"]),
            Ok(None)
        );
        // `v=STSv10` is not `v=STSv1`, and a record with leading space does not begin
        // with it: both are discarded, not errors.
        assert_eq!(
            id(parse_records(&[
                "v=spf1 -all",
                "v=STSv10; id=other",
                " v=STSv1; id=other",
                "v=STSv1; id=abc"
            ])),
            Some("abc".to_owned())
        );
        assert_eq!(
            parse_records(&["v=STSv1; id=abc", "v=STSv1; id=def"]),
            Err(Error::MultipleRecords { count: 2 })
        );
        assert_eq!(
            parse_records(&["v=STSv1; id=abc", "v=STSv1; id=abc", "v=STSv1;bad"]),
            Err(Error::MultipleRecords { count: 3 })
        );
        // The one candidate is malformed: an error, not a fallback to another record.
        assert_eq!(
            parse_records(&["v=STSv1; id=", "v=spf1 -all"]),
            Err(Error::MalformedField { index: 1 })
        );
        assert_eq!(parse_records(&["v=STSv1"]), Err(Error::NoFields));
        // Byte strings as the resolver hands them over.
        assert_eq!(
            id(parse_records(&[b"v=STSv1;id=x1".to_vec()])),
            Some("x1".to_owned())
        );
    }

    proptest! {
        #[test]
        fn the_parser_never_panics(txts in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..80), 0..4)
        ) {
            let _ = parse_records(&txts);
        }

        #[test]
        fn records_that_look_right_never_panic(
            fields in proptest::collection::vec("[ \t]{0,2}[a-zA-Z0-9_=;. -]{0,12}[ \t]{0,2}", 0..6)
        ) {
            let txt = format!("v=STSv1;{}", fields.join(";"));
            let _ = parse_record(txt.as_bytes());
        }

        #[test]
        fn any_valid_id_is_read_back(id in "[a-zA-Z0-9]{1,32}", ext in "x[a-z0-9]{0,7}=[!-:<>-~]{1,8}") {
            let txt = format!("v=STSv1; {ext}; id={id};");
            prop_assert_eq!(parse_record(txt.as_bytes()).map(|r| r.id), Ok(PolicyId(id)));
        }
    }
}
