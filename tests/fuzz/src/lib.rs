//! The checks behind mailmoat's fuzz targets (`fuzz_targets/`), kept in modules that
//! depend only on `mailmoat` and `bytes` so that `tests/fuzz_regressions.rs` in the main
//! package can include them and replay a crashing input through the same code.
//!
//! - [`framing`]: `line_framer` and `smtp_body`.
//! - [`session_script`]: `smtp_session`, `imap_session`, `pop3_session`.

pub mod framing;
pub mod session_script;
