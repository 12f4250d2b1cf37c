//! The outbound relay (ARCHITECTURE.md §11): mailmoat as the legacy MTA's relayhost,
//! delivering each transaction live to the recipient domain's MX over TLS that DANE
//! (RFC 7672) or MTA-STS (RFC 8461) lets it verify. It is the counterpart of
//! [`crate::inbound`], beside it rather than inside it: here mailmoat connects out, as a
//! TLS client, to hosts it chooses itself.
//!
//! - [`dane`]: TLSA records and the check of an MX's certificate against them (RFC 7672),
//!   as a rustls client verifier.
//! - [`dns`]: MX, TLSA, TXT and address lookups through a DNSSEC-validating resolver,
//!   with the resolver's AD bit as each answer's `secure`.
//! - [`mta_sts`]: the MTA-STS policy layer: the `_mta-sts` TXT record, the policy, which
//!   MX hosts it allows, when a cached policy applies, the cache on disk, and the HTTPS
//!   fetch.
//! - [`plan`]: from a recipient domain to the MX hosts to try, in order, each with the TLS
//!   it must get: DANE before MTA-STS before the configured floor.
//! - [`mx_tls`]: the TLS client for each of those requirements, and what a handshake
//!   established.
//! - [`listener`]: the relayhost port the legacy MTA connects to, open to
//!   `relay_networks` only; [`driver`] runs each connection's session
//!   ([`crate::proto::outbound::session`]) on the sockets, the plan and the MX's TLS.

pub mod dane;
pub mod dns;
pub mod driver;
pub mod listener;
pub mod mta_sts;
pub mod mx_tls;
pub mod plan;
#[cfg(test)]
mod test_pki;
