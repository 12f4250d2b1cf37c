//! The checks behind mailmoat's fuzz targets (`fuzz_targets/`), kept in modules that
//! depend only on `mailmoat`, `bytes` and `std` so that `tests/fuzz_regressions.rs` in the main
//! package can include them and replay a crashing input through the same code.
//!
//! - [`framing`]: `line_framer` and `smtp_body`.
//! - [`mta_sts`]: `mta_sts_policy`, the MTA-STS policy and TXT record parsers.
//! - [`session_script`]: `smtp_session`, `imap_session`, `pop3_session`.
//! - [`outbound_script`]: `outbound_session`, the outbound relay's session between a
//!   legacy MTA and its recipients' MXes.
//! - [`canonical`]: the strict reader of ARCHITECTURE.md §3's canonical rule that the session
//!   targets check with (also used by `tests/canonical_rule.rs`).

pub mod canonical;
pub mod framing;
pub mod mta_sts;
pub mod outbound_script;
pub mod session_script;
