//! DANE for SMTP (RFC 7672): TLSA records (RFC 6698 §2.1) and the check of an MX host's
//! certificate chain against them.
//!
//! Why: a DNSSEC-secure TLSA RRset at `_25._tcp.<MX host>` is the recipient domain's
//! statement, signed in the DNS and so out of an on-path attacker's reach, that its MX
//! speaks TLS and which certificate or key it uses (RFC 7672 §2.2). It takes precedence
//! over MTA-STS (ARCHITECTURE.md §11). This module does no DNS: the records come from a
//! DNSSEC-validating resolver, and only records from a secure answer may reach [`TlsaSet`].
//!
//! What counts:
//! - **Usable records** (RFC 7672 §3.1): usages DANE-TA(2) and DANE-EE(3) only. PKIX-TA(0)
//!   and PKIX-EE(1) need a CA set that MTAs do not share, so SMTP treats them as unusable
//!   (§3.1.3). Selectors Cert(0) and SPKI(1); matching types Full(0), SHA2-256(1) and
//!   SHA2-512(2); a digest of the wrong length is unusable. Unusable records are ignored,
//!   and an RRset with none usable still makes TLS mandatory, unauthenticated (§2.2):
//!   [`Outcome::Unauthenticated`], never a reason to send in plaintext.
//! - **Digest algorithm agility** (RFC 7671 §9) is implemented: for each usage and selector,
//!   SHA2-256 records are ignored where usable SHA2-512 ones are present, so an attacker who
//!   can break only the weaker digest gains nothing. Full(0) records always count. Records
//!   are classified before agility, so a malformed SHA2-512 record suppresses nothing.
//! - **DANE-EE(3)** (RFC 7672 §3.1.1, RFC 7671 §5.1): the leaf certificate or its key
//!   matches. No name, expiry or chain check: the DNS binds the key to the name.
//! - **DANE-TA(2)** (RFC 7672 §3.1.2, RFC 7671 §5.2): a certificate the server sent above the
//!   leaf matches the record, the leaf chains to it by signature (rustls-webpki, with the
//!   usual validity and server-auth EKU checks), and the leaf carries a reference identifier
//!   (RFC 7672 §3.2.2, [`ReferenceNames`]). A trust anchor the server did not send is
//!   supported for Full(0) records: `2 0 0` is the anchor certificate itself, and `2 1 0`
//!   its key, named by the issuer of the topmost certificate sent (RFC 7671 §5.2.2). A
//!   digest can only name a certificate that was sent. The leaf is never its own anchor.
//! - **Failures** carry RFC 8460 §4.3's result types ([`Failure::rfc8460_result_type`]),
//!   for the delivery event and TLS-RPT.
//!
//! Keys are read from certificates with rustls-webpki, the parser that also checks the
//! handshake signature: a parser differential cannot make the key that matched a record
//! differ from the key that signed the handshake.

use std::collections::HashSet;

use aws_lc_rs::digest;

/// The most RDATA one DNS resource record can carry (RDLENGTH is 16 bits, RFC 1035 §3.2.1).
const MAX_RDATA_LEN: usize = u16::MAX as usize;

/// Why a TLSA record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RDATA shorter than the three one-octet fields (RFC 6698 §2.1).
    #[error("TLSA RDATA of {len} bytes is shorter than its 3 fixed fields")]
    RdataTooShort {
        /// Its length.
        len: usize,
    },
    /// RDATA longer than any DNS record can be.
    #[error("TLSA RDATA of {len} bytes is longer than a DNS record can be")]
    RdataTooLong {
        /// Its length.
        len: usize,
    },
}

/// One TLSA record as published (RFC 6698 §2.1), usable or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// Certificate usage (RFC 6698 §2.1.1).
    pub usage: u8,
    /// Selector (§2.1.2).
    pub selector: u8,
    /// Matching type (§2.1.3).
    pub matching_type: u8,
    /// Certificate association data (§2.1.4).
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Reads a record from its wire-format RDATA: usage, selector and matching type, one
    /// octet each, then the association data (RFC 6698 §2.1).
    pub fn from_rdata(rdata: &[u8]) -> Result<Tlsa, Error> {
        if rdata.len() > MAX_RDATA_LEN {
            return Err(Error::RdataTooLong { len: rdata.len() });
        }
        let [usage, selector, matching_type, data @ ..] = rdata else {
            return Err(Error::RdataTooShort { len: rdata.len() });
        };
        Ok(Tlsa {
            usage: *usage,
            selector: *selector,
            matching_type: *matching_type,
            data: data.to_vec(),
        })
    }

    /// Whether SMTP can use this record (RFC 7672 §3.1), and as what.
    pub fn classify(&self) -> Result<(Usage, Selector, MatchingType), Unusable> {
        let usage = match self.usage {
            2 => Usage::DaneTa,
            3 => Usage::DaneEe,
            0 | 1 => return Err(Unusable::PkixUsage(self.usage)),
            other => return Err(Unusable::UnknownUsage(other)),
        };
        let selector = match self.selector {
            0 => Selector::Cert,
            1 => Selector::Spki,
            other => return Err(Unusable::UnknownSelector(other)),
        };
        let matching_type = match self.matching_type {
            0 => MatchingType::Full,
            1 => MatchingType::Sha256,
            2 => MatchingType::Sha512,
            other => return Err(Unusable::UnknownMatchingType(other)),
        };
        match matching_type.digest_len() {
            None if self.data.is_empty() => Err(Unusable::EmptyData),
            Some(expected) if self.data.len() != expected => Err(Unusable::DigestLength {
                matching_type,
                len: self.data.len(),
            }),
            _ => Ok((usage, selector, matching_type)),
        }
    }
}

/// The certificate usages SMTP can use (RFC 7672 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// DANE-TA(2): the record names a trust anchor the leaf must chain to.
    DaneTa,
    /// DANE-EE(3): the record names the leaf itself.
    DaneEe,
}

/// Which part of a certificate a record matches (RFC 6698 §2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Cert(0): the whole certificate, DER.
    Cert,
    /// SPKI(1): its SubjectPublicKeyInfo, DER.
    Spki,
}

/// How the association data presents the selected bytes (RFC 6698 §2.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchingType {
    /// Full(0): the bytes themselves.
    Full,
    /// SHA2-256(1).
    Sha256,
    /// SHA2-512(2).
    Sha512,
}

impl Usage {
    /// The number in the record.
    pub fn code(self) -> u8 {
        match self {
            Usage::DaneTa => 2,
            Usage::DaneEe => 3,
        }
    }
}

impl Selector {
    /// The number in the record.
    pub fn code(self) -> u8 {
        match self {
            Selector::Cert => 0,
            Selector::Spki => 1,
        }
    }
}

impl MatchingType {
    /// The number in the record.
    pub fn code(self) -> u8 {
        match self {
            MatchingType::Full => 0,
            MatchingType::Sha256 => 1,
            MatchingType::Sha512 => 2,
        }
    }

    fn digest_len(self) -> Option<usize> {
        self.algorithm().map(|algorithm| algorithm.output_len())
    }

    fn algorithm(self) -> Option<&'static digest::Algorithm> {
        match self {
            MatchingType::Full => None,
            MatchingType::Sha256 => Some(&digest::SHA256),
            MatchingType::Sha512 => Some(&digest::SHA512),
        }
    }
}

/// Why a record is ignored (RFC 7672 §3.1; RFC 6698 §4.1 calls such records unusable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// PKIX-TA(0) or PKIX-EE(1), which SMTP does not use (RFC 7672 §3.1.3).
    PkixUsage(u8),
    /// A usage with no definition.
    UnknownUsage(u8),
    /// A selector other than Cert(0) and SPKI(1).
    UnknownSelector(u8),
    /// A matching type other than Full(0), SHA2-256(1) and SHA2-512(2).
    UnknownMatchingType(u8),
    /// A digest whose length is not its algorithm's.
    DigestLength {
        /// The record's matching type.
        matching_type: MatchingType,
        /// The length of its data.
        len: usize,
    },
    /// Full(0) with no data: nothing to match.
    EmptyData,
}

/// A record SMTP can use, checked by [`Tlsa::classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Usable {
    usage: Usage,
    selector: Selector,
    matching_type: MatchingType,
    data: Vec<u8>,
}

/// The usable records of one DNSSEC-secure TLSA RRset, after digest algorithm agility.
#[derive(Debug, Clone, Default)]
pub struct TlsaSet {
    usable: Vec<Usable>,
    unusable: usize,
    weaker_digest: usize,
}

impl TlsaSet {
    /// Classifies an RRset's records and keeps the usable ones. For each usage and selector
    /// with usable SHA2-512 records, its SHA2-256 records are dropped (RFC 7671 §9).
    pub fn new(rrset: impl IntoIterator<Item = Tlsa>) -> TlsaSet {
        let mut set = TlsaSet::default();
        for record in rrset {
            match record.classify() {
                Ok((usage, selector, matching_type)) => set.usable.push(Usable {
                    usage,
                    selector,
                    matching_type,
                    data: record.data,
                }),
                Err(_) => set.unusable += 1,
            }
        }
        let with_sha512: HashSet<(Usage, Selector)> = set
            .usable
            .iter()
            .filter(|r| r.matching_type == MatchingType::Sha512)
            .map(|r| (r.usage, r.selector))
            .collect();
        let before = set.usable.len();
        set.usable.retain(|r| {
            r.matching_type != MatchingType::Sha256 || !with_sha512.contains(&(r.usage, r.selector))
        });
        set.weaker_digest = before - set.usable.len();
        set
    }

    /// Reads an RRset from wire-format RDATA. A malformed record counts as unusable: it is
    /// ignored like a record of unknown usage, and the rest of the RRset still counts.
    pub fn from_rdata<'a>(rrset: impl IntoIterator<Item = &'a [u8]>) -> TlsaSet {
        let mut malformed = 0;
        let records: Vec<Tlsa> = rrset
            .into_iter()
            .filter_map(|rdata| Tlsa::from_rdata(rdata).inspect_err(|_| malformed += 1).ok())
            .collect();
        let mut set = TlsaSet::new(records);
        set.unusable += malformed;
        set
    }

    /// Whether any record is usable. If not, TLS is still mandatory but its certificate is
    /// not checked (RFC 7672 §2.2).
    pub fn authenticates(&self) -> bool {
        !self.usable.is_empty()
    }

    /// How many records are usable.
    pub fn usable_count(&self) -> usize {
        self.usable.len()
    }

    /// How many records were ignored: unusable or malformed.
    pub fn unusable_count(&self) -> usize {
        self.unusable
    }

    /// How many SHA2-256 records were ignored beside SHA2-512 ones (RFC 7671 §9).
    pub fn weaker_digest_count(&self) -> usize {
        self.weaker_digest
    }
}

#[cfg(test)]
mod tests;
