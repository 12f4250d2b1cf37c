//! `smtp_body`: see `mailmoat_fuzz::framing::smtp_body` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailmoat_fuzz::framing::smtp_body(data));
