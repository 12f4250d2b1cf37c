//! `outbound_session`: a script of legacy-MTA bytes, MX bytes, MX connections, TLS
//! results, ends of stream and deadlines, run on a `proto::outbound::session::Session`;
//! see `mailmoat_fuzz::outbound_script` for the format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailmoat_fuzz::outbound_script::run(data));
