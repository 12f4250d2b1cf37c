//! `smtp_session`: a script of client bytes, upstream bytes, TLS, ends of stream and deadlines,
//! run on a `smtp::Session`; see `mailmoat_fuzz::session_script` for the format and the
//! invariants.
#![no_main]

use mailmoat_fuzz::session_script::{Protocol, run};

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(Protocol::Smtp, data));
