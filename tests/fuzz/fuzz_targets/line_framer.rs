//! `line_framer`: see `mailmoat_fuzz::framing::line_framer` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailmoat_fuzz::framing::line_framer(data));
