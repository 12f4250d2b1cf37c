//! The outbound relay (ARCHITECTURE.md §11): mailmoat as the legacy MTA's relayhost,
//! delivering each transaction live to the recipient domain's MX over TLS that DANE or
//! MTA-STS says to verify. Here mailmoat is the TLS *client*, connecting out to hosts it
//! chose itself, so this lives beside [`crate::inbound`] rather than inside it.
//!
//! - [`dane`]: TLSA records and the check of an MX's certificate against them (RFC 7672),
//!   as a rustls client verifier.

pub mod dane;
