//! The inbound proxy's I/O: mail clients connect in, and each session is carried to the
//! legacy server behind mailmoat (the upstream). Everything here touches sockets, tasks
//! or clocks, and nothing here parses a mail protocol or decides what to forward: the
//! sans-I/O sessions in [`crate::proto`] decide, and this folder reads, writes and keeps
//! the deadlines.
//!
//! One connection passes through, in order:
//! - [`listener`]: binds, accepts, caps connections, one task and span each, and picks
//!   the session for the listener.
//! - [`identity`]: the PROXY protocol header from a trusted balancer (in) and to the
//!   upstream (out), and the networks a header is accepted from.
//! - [`upstream`]: connects to the legacy server (loopback TCP or a unix socket).
//! - [`driver`]: runs a protocol session on the client and upstream streams, with the
//!   TLS upgrade and the phase deadlines.
//! - [`relay`]: the blind byte splice after an IMAP or POP3 login.
//! - [`read_buffers`]: the per-thread read buffers every read above lands in, so that an
//!   idle session holds none.
//!
//! The outbound relay (issue 15: the legacy MTA's relayhost, ARCHITECTURE.md §11) will be its
//! counterpart, `crate::outbound`, beside this module rather than inside it: it connects
//! out to MXs it chooses itself, as a TLS client.

pub mod driver;
pub mod identity;
pub mod listener;
pub mod read_buffers;
pub mod relay;
pub mod upstream;
