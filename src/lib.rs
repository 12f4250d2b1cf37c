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
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz` endpoint.
//! - [`relay`]: the blind byte splice after an IMAP or POP3 login.
//! - [`telemetry`]: logging set-up and the security events.
//! - [`probe`]: probes an upstream: protocol, capabilities, the open-relay trap.
//! - [`check`]: `mailmoat check`: configuration, certificates, upstreams, all at once.
//! - [`explain`]: `mailmoat explain`: the dialogue a client sees, before and after TLS.
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod driver;
pub mod explain;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod proto;
pub mod relay;
pub mod scratch;
pub mod telemetry;
pub mod tls;
pub mod upstream;
