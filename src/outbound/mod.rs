//! The outbound relay (ARCHITECTURE.md §11): the legacy MTA's relayhost, delivering each
//! transaction live to the recipient domain's MX over TLS that DANE or MTA-STS says to
//! verify. Its I/O lives here, beside [`crate::inbound`].
//!
//! - [`dns`]: MX, TLSA, TXT and address lookups through a DNSSEC-validating resolver,
//!   with the resolver's AD bit as each answer's `secure`.

pub mod dns;
