//! The operator's tools: the `mailmoat check` and `mailmoat explain` commands and the
//! upstream probe they share. None of this runs on the data path: each tool reads the
//! configuration, talks to the upstreams once as a client would, reports, and exits;
//! nothing here binds a listener.
//!
//! - [`check`]: configuration, certificates and upstreams, every problem at once.
//! - [`explain`]: the dialogue a client sees, before and after TLS, per listener.
//! - [`explain_domain`]: `explain --domain`: what the outbound relay would do with mail
//!   for one recipient domain (MX, TLSA, MTA-STS, its policy), and a live STARTTLS probe
//!   of the MX hosts.
//! - [`probe`]: probes one upstream: protocol, capabilities, the open-relay trap.

pub mod check;
pub mod explain;
pub mod explain_domain;
pub mod probe;
