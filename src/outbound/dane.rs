//! DANE for SMTP (RFC 7672): TLSA records (RFC 6698 §2.1) and the check of an MX host's
//! certificate chain against them, done inside the TLS handshake by [`DaneVerifier`].
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

use std::cell::OnceCell;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{
    CertificateDer, DnsName, ServerName, SignatureVerificationAlgorithm, TrustAnchor, UnixTime,
};
use webpki::{EndEntityCert, KeyUsage};

/// The most RDATA one DNS resource record can carry (RDLENGTH is 16 bits, RFC 1035 §3.2.1).
const MAX_RDATA_LEN: usize = u16::MAX as usize;

/// Why a TLSA record could not be read, or the client could not be set up.
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
    /// rustls refused the client configuration.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
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

/// The names the MX's certificate may carry under DANE-TA(2) (RFC 7672 §3.2.2), and the
/// one sent as SNI: the TLSA base domain (RFC 7672 §8.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceNames {
    tlsa_base_domain: DnsName<'static>,
    mx_host_alias: Option<DnsName<'static>>,
}

impl ReferenceNames {
    /// The TLSA records were found at the MX host name itself, the usual case.
    pub fn mx_host(mx_host: DnsName<'static>) -> ReferenceNames {
        ReferenceNames {
            tlsa_base_domain: mx_host,
            mx_host_alias: None,
        }
    }

    /// The MX host name is a CNAME alias and the records were found at its DNSSEC-secure
    /// expansion (RFC 7672 §2.2.2): the expansion is the TLSA base domain, and a certificate
    /// for either name is accepted (§3.2.2).
    pub fn cname_expanded(mx_host: DnsName<'static>, expanded: DnsName<'static>) -> ReferenceNames {
        ReferenceNames {
            tlsa_base_domain: expanded,
            mx_host_alias: Some(mx_host),
        }
    }

    /// The name to send as SNI (RFC 7672 §8.1): the MX host name unless the records came
    /// from its CNAME expansion.
    pub fn tlsa_base_domain(&self) -> &DnsName<'static> {
        &self.tlsa_base_domain
    }

    fn iter(&self) -> impl Iterator<Item = &DnsName<'static>> {
        std::iter::once(&self.tlsa_base_domain).chain(&self.mx_host_alias)
    }
}

/// What a successful check established, for the delivery event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A usable record matched the server's certificate chain.
    Authenticated(Matched),
    /// The RRset held no usable record: TLS was mandatory but its certificate was not
    /// checked (RFC 7672 §2.2). Not a failure, and never a reason for plaintext.
    Unauthenticated,
}

/// The record that authenticated the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// Its usage.
    pub usage: Usage,
    /// Its selector.
    pub selector: Selector,
    /// Its matching type.
    pub matching_type: MatchingType,
    /// Where the certificate it matched sits in the chain as sent (0 is the leaf); `None`
    /// for a trust anchor the server did not send, taken from the record itself.
    pub depth: Option<usize>,
}

impl Matched {
    fn new(record: &Usable, depth: Option<usize>) -> Matched {
        Matched {
            usage: record.usage,
            selector: record.selector,
            matching_type: record.matching_type,
            depth,
        }
    }
}

/// The record's parameters as in its presentation format: `3 1 1`.
impl fmt::Display for Matched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.usage.code(),
            self.selector.code(),
            self.matching_type.code()
        )
    }
}

/// Why the server's certificate chain failed DANE authentication. Not the module's
/// [`Error`]: this is a verdict on the peer, each kind one of RFC 8460 §4.3's result types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server sent no certificate.
    #[error("the server sent no certificate")]
    NoCertificate,
    /// The leaf certificate cannot be parsed, and no record matched its bytes.
    #[error("the server's certificate is malformed")]
    MalformedCertificate,
    /// No usable record matches any certificate the server sent: typically records left
    /// stale by a key or certificate change.
    #[error("no usable TLSA record matches the server's certificate chain")]
    NoMatch,
    /// A DANE-TA(2) record names a certificate or key, but the leaf does not chain to it.
    #[error("the certificate chain does not verify to the DANE-TA trust anchor: {0}")]
    NotTrusted(webpki::Error),
    /// The leaf, or a certificate between it and the DANE-TA(2) trust anchor, has expired.
    #[error("a certificate in the chain to the DANE-TA trust anchor has expired")]
    Expired,
    /// The leaf chains to a DANE-TA(2) trust anchor but carries no reference identifier.
    #[error("the server's certificate is not valid for the MX host name")]
    HostMismatch,
    /// The sender requires DANE for the domain, and an MX host has no usable TLSA record
    /// from a DNSSEC-secure answer. For the policy that requires it: never a result of
    /// [`TlsaSet::verify`], which accepts an RRset without usable records.
    #[error("DANE is required but the MX host has no usable TLSA records")]
    DaneRequired,
}

impl Failure {
    /// The RFC 8460 §4.3 result type, for the delivery event and TLS-RPT.
    pub fn rfc8460_result_type(&self) -> &'static str {
        match self {
            // §4.3.2.1: "None of the records in the RRset were found to be valid."
            Failure::NoMatch => "tlsa-invalid",
            Failure::DaneRequired => "dane-required",
            // §4.3.1, the negotiation failures.
            Failure::HostMismatch => "certificate-host-mismatch",
            Failure::Expired => "certificate-expired",
            Failure::NotTrusted(_) => "certificate-not-trusted",
            Failure::NoCertificate | Failure::MalformedCertificate => "validation-failure",
        }
    }

    /// How close to success the failure came: of several DANE-TA(2) attempts, the closest
    /// is reported.
    fn closeness(&self) -> u8 {
        match self {
            Failure::HostMismatch => 3,
            Failure::Expired => 2,
            Failure::NotTrusted(_) => 1,
            _ => 0,
        }
    }
}

impl TlsaSet {
    /// Checks a certificate chain (leaf first, as the server sent it) against the usable
    /// records: DANE-EE(3) first, then DANE-TA(2). `now` is only for DANE-TA(2)'s validity
    /// checks, `algorithms` for its signatures. With no usable record, any chain passes as
    /// [`Outcome::Unauthenticated`].
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        names: &ReferenceNames,
        now: UnixTime,
        algorithms: &[&dyn SignatureVerificationAlgorithm],
    ) -> Result<Outcome, Failure> {
        if !self.authenticates() {
            return Ok(Outcome::Unauthenticated);
        }
        let presented: Vec<Presented<'_>> = chain.iter().map(Presented::new).collect();
        let Some((leaf, _)) = presented.split_first() else {
            return Err(Failure::NoCertificate);
        };
        let records = |usage| self.usable.iter().filter(move |r| r.usage == usage);
        if let Some(record) = records(Usage::DaneEe).find(|r| leaf.matches(r)) {
            return Ok(Outcome::Authenticated(Matched::new(record, Some(0))));
        }
        let Ok(leaf_cert) = EndEntityCert::try_from(leaf.der) else {
            return Err(Failure::MalformedCertificate);
        };
        let trust = TrustCheck {
            leaf: &leaf_cert,
            chain,
            names,
            now,
            algorithms,
        };
        let mut closest: Option<Failure> = None;
        let mut keep_closest = |failure: Failure| {
            if closest
                .as_ref()
                .is_none_or(|c| failure.closeness() > c.closeness())
            {
                closest = Some(failure);
            }
        };
        let mut tried_depths = HashSet::new();
        for record in records(Usage::DaneTa) {
            // The leaf is never its own trust anchor: webpki does not verify self-signed
            // end entities, and a key meant for the leaf alone is DANE-EE's.
            if leaf.matches(record) {
                continue;
            }
            let mut sent = false;
            for (depth, cert) in presented.iter().enumerate().skip(1) {
                if !cert.matches(record) {
                    continue;
                }
                sent = true;
                if !tried_depths.insert(depth) {
                    continue;
                }
                match trust.anchored_in_chain(depth) {
                    Ok(()) => {
                        return Ok(Outcome::Authenticated(Matched::new(record, Some(depth))));
                    }
                    Err(failure) => keep_closest(failure),
                }
            }
            // Not sent: only a Full(0) record carries the anchor itself (RFC 7671 §5.2.2).
            if !sent && record.matching_type == MatchingType::Full {
                match trust.anchored_in_record(record) {
                    Ok(()) => return Ok(Outcome::Authenticated(Matched::new(record, None))),
                    Err(failure) => keep_closest(failure),
                }
            }
        }
        Err(closest.unwrap_or(Failure::NoMatch))
    }
}

/// One certificate as sent, with what a record can select from it.
struct Presented<'c> {
    der: &'c CertificateDer<'c>,
    /// Its SubjectPublicKeyInfo (DER, with its SEQUENCE header) as webpki reads it;
    /// `None` if webpki cannot parse the certificate.
    spki: Option<Vec<u8>>,
    /// Digests, computed when first asked for: [selector][SHA2-256, SHA2-512].
    digests: [[OnceCell<digest::Digest>; 2]; 2],
}

impl<'c> Presented<'c> {
    fn new(der: &'c CertificateDer<'c>) -> Presented<'c> {
        let spki = EndEntityCert::try_from(der)
            .ok()
            .map(|cert| cert.subject_public_key_info().as_ref().to_vec());
        Presented {
            der,
            spki,
            digests: Default::default(),
        }
    }

    fn selected(&self, selector: Selector) -> Option<&[u8]> {
        match selector {
            Selector::Cert => Some(self.der.as_ref()),
            Selector::Spki => self.spki.as_deref(),
        }
    }

    fn matches(&self, record: &Usable) -> bool {
        let Some(selected) = self.selected(record.selector) else {
            return false;
        };
        let Some(algorithm) = record.matching_type.algorithm() else {
            return selected == record.data.as_slice();
        };
        let slot = match record.matching_type {
            MatchingType::Sha512 => 1,
            _ => 0,
        };
        let computed = self.digests[usize::from(record.selector.code())][slot]
            .get_or_init(|| digest::digest(algorithm, selected));
        computed.as_ref() == record.data.as_slice()
    }
}

/// The DANE-TA(2) check of one leaf against one trust anchor at a time.
struct TrustCheck<'a> {
    leaf: &'a EndEntityCert<'a>,
    chain: &'a [CertificateDer<'a>],
    names: &'a ReferenceNames,
    now: UnixTime,
    algorithms: &'a [&'a dyn SignatureVerificationAlgorithm],
}

impl TrustCheck<'_> {
    /// The anchor is the certificate sent at `depth`.
    fn anchored_in_chain(&self, depth: usize) -> Result<(), Failure> {
        let cert = self.chain.get(depth).ok_or(Failure::NoMatch)?;
        let anchor = webpki::anchor_from_trusted_cert(cert).map_err(Failure::NotTrusted)?;
        self.check(anchor, Some(depth))
    }

    /// The anchor is in the record itself (RFC 7671 §5.2.2): a certificate (`2 0 0`), or a
    /// key (`2 1 0`) named by the issuer of the topmost certificate sent.
    fn anchored_in_record(&self, record: &Usable) -> Result<(), Failure> {
        match record.selector {
            Selector::Cert => {
                let cert = CertificateDer::from(record.data.as_slice());
                let anchor =
                    webpki::anchor_from_trusted_cert(&cert).map_err(Failure::NotTrusted)?;
                self.check(anchor, None)
            }
            Selector::Spki => {
                let top = self.chain.last().ok_or(Failure::NoCertificate)?;
                let top = EndEntityCert::try_from(top).map_err(Failure::NotTrusted)?;
                let spki = sequence_contents(&record.data)
                    .ok_or(Failure::NotTrusted(webpki::Error::BadDer))?;
                let anchor = TrustAnchor {
                    subject: top.issuer().into(),
                    subject_public_key_info: spki.into(),
                    name_constraints: None,
                };
                self.check(anchor, None)
            }
        }
    }

    /// The leaf chains to `anchor` through the other certificates sent (in any order, as
    /// servers send them), and carries a reference identifier.
    fn check(&self, anchor: TrustAnchor<'_>, anchor_depth: Option<usize>) -> Result<(), Failure> {
        let intermediates: Vec<CertificateDer<'_>> = self
            .chain
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(depth, _)| Some(*depth) != anchor_depth)
            .map(|(_, cert)| CertificateDer::from(cert.as_ref()))
            .collect();
        self.leaf
            .verify_for_usage(
                self.algorithms,
                &[anchor],
                &intermediates,
                self.now,
                KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|err| match err {
                webpki::Error::CertExpired { .. } => Failure::Expired,
                other => Failure::NotTrusted(other),
            })?;
        let valid_for = |name: &DnsName<'_>| {
            self.leaf
                .verify_is_valid_for_subject_name(&ServerName::DnsName(name.borrow()))
                .is_ok()
        };
        if self.names.iter().any(valid_for) {
            Ok(())
        } else {
            Err(Failure::HostMismatch)
        }
    }
}

/// The contents of a DER SEQUENCE that spans all of `der`: what webpki's trust anchor holds
/// of a SubjectPublicKeyInfo. `None` for anything else.
fn sequence_contents(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (len, contents) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length octets; more than 3 would exceed any
        // DNS record.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 3 {
            return None;
        }
        let (octets, contents) = rest.split_at_checked(count)?;
        let len = octets
            .iter()
            .fold(0usize, |len, &octet| (len << 8) | usize::from(octet));
        (len, contents)
    };
    (contents.len() == len).then_some(contents)
}

/// A rustls verifier that authenticates an MX host by its TLSA records, as
/// [`TlsaSet::verify`] does, and checks the handshake's signatures with the provider's
/// algorithms.
///
/// Make one per connection attempt. It keeps the result of the certificate check, which
/// the caller reads with [`DaneVerifier::outcome`] after the handshake, whether it
/// succeeded (the record that matched) or failed (the [`Failure`], which the handshake's
/// error also carries as `CertificateError::Other`).
#[derive(Debug)]
pub struct DaneVerifier {
    tlsa: TlsaSet,
    names: ReferenceNames,
    algorithms: WebPkiSupportedAlgorithms,
    result: Mutex<Option<Result<Outcome, Failure>>>,
}

impl DaneVerifier {
    /// A verifier for one MX host's TLSA records.
    pub fn new(tlsa: TlsaSet, names: ReferenceNames, provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(DaneVerifier {
            tlsa,
            names,
            algorithms: provider.signature_verification_algorithms,
            result: Mutex::new(None),
        })
    }

    /// The name to connect to, which rustls sends as SNI: the TLSA base domain (RFC 7672
    /// §8.1).
    pub fn server_name(&self) -> ServerName<'static> {
        ServerName::DnsName(self.names.tlsa_base_domain.clone())
    }

    /// The result of the certificate check, once the handshake has reached it.
    pub fn outcome(&self) -> Option<Result<Outcome, Failure>> {
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for DaneVerifier {
    /// The reference identifiers are the verifier's own ([`ReferenceNames`]), not rustls's
    /// `server_name`: that is only the SNI, without the MX host name behind a CNAME.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|cert| CertificateDer::from(cert.as_ref()))
            .collect();
        let result = self
            .tlsa
            .verify(&chain, &self.names, now, self.algorithms.all);
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result.clone());
        match result {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(failure) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(failure))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client configuration for one connection to an MX host under DANE: TLS 1.3 or 1.2,
/// the server checked by `verifier`, no ALPN (SMTP has none), and no session resumption,
/// so every connection's certificate is checked against the current records and its
/// outcome recorded. Connect to [`DaneVerifier::server_name`], which rustls sends as SNI.
pub fn client_config(
    verifier: Arc<DaneVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = true;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
