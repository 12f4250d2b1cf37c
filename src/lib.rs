//! mailmoat: a TLS moat for legacy mail servers.
//!
//! Module map:
//! - [`config`]: YAML → validated, typed [`config::Config`], before any port is bound.
//! - [`listener`]: binds listeners, accepts, caps connections, one task and span each.
//! - [`tls`]: rustls server configs from PEM, SNI certificate choice, strict ALPN.
//! - [`upstream`]: connects to the legacy server over loopback TCP or a unix socket.
//! - [`identity`]: PROXY protocol in and out, trusted networks (client identity).
//! - [`driver`]: runs a protocol session on a client and an upstream stream.
//! - [`policy`]: pure rules: what may happen before TLS, user-name hashing.
//! - [`proto`]: sans-I/O protocol sessions and the line framer.
//! - [`relay`]: the blind byte splice after an IMAP or POP3 login.
//! - [`telemetry`]: logging set-up and the security events.
#![forbid(unsafe_code)]

pub mod config;
pub mod driver;
pub mod identity;
pub mod listener;
pub mod policy;
pub mod proto;
pub mod relay;
pub mod telemetry;
pub mod tls;
pub mod upstream;
