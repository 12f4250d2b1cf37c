//! `mta_sts_policy`: see `mailmoat_fuzz::mta_sts` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailmoat_fuzz::mta_sts::mta_sts_policy(data));
