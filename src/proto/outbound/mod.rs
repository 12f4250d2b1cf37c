//! The outbound relay's protocol role (ARCHITECTURE.md §11): the legacy MTA hands each
//! transaction to mailmoat as its relayhost, which delivers it live to the recipient
//! domain's MX. Pure: DNS, policy and the MX connection are the I/O side's.

pub mod envelope;
pub mod session;
