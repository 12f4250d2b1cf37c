//! mailmoat: a TLS moat for legacy mail servers.
//!
//! Module map:
//! - [`config`]: YAML → validated, typed [`config::Config`], before any port is bound.
//! - [`tls`]: rustls server configs from PEM, SNI certificate choice, strict ALPN.
//! - [`policy`]: pure rules: what may happen before TLS, user-name hashing.
//! - [`proto`]: sans-I/O protocol sessions and the line framer; no tokio, no clock.
//! - [`inbound`]: the proxy's I/O, from a client's connection to the upstream:
//!   [`inbound::listener`], [`inbound::identity`] (PROXY protocol),
//!   [`inbound::upstream`], [`inbound::driver`] (runs a session on real streams),
//!   [`inbound::relay`] (the blind splice after login), [`inbound::read_buffers`].
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz` endpoint.
//! - [`telemetry`]: logging set-up and the security events.
//! - [`operator`]: the operator's tools, off the data path: [`operator::check`],
//!   [`operator::explain`], and the upstream [`operator::probe`] they share.
//! - [`outbound`]: the outbound relay (ARCHITECTURE.md §11: the legacy MTA's
//!   relayhost), beside `inbound`: [`outbound::listener`] and [`outbound::driver`] (the
//!   I/O), [`outbound::plan`] (which MX, which TLS), [`outbound::dns`] (lookups with
//!   the resolver's AD bit), [`outbound::dane`], [`outbound::mta_sts`],
//!   [`outbound::mx_tls`]. Its protocol role is [`proto::outbound`] (ARCHITECTURE.md,
//!   "A fourth protocol role").
#![forbid(unsafe_code)]

pub mod config;
pub mod inbound;
pub mod metrics;
pub mod operator;
pub mod outbound;
pub mod policy;
pub mod proto;
pub mod telemetry;
pub mod tls;
