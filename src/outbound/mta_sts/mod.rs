//! MTA-STS (RFC 8461): how a recipient domain without DNSSEC says that its mail must
//! arrive over TLS, to MX hosts it names, with certificates valid for them under the
//! public PKI. mailmoat applies it where DANE does not (ARCHITECTURE.md §11; RFC 8461 §2:
//! MTA-STS never overrides a failing DANE check).
//!
//! One delivery to a domain goes through the parts in this order:
//! 1. The caller looks up the TXT records at [`PolicyDomain::txt_name`] and hands them to
//!    [`record::parse_records`] (§3.1).
//! 2. [`cache::decide`] weighs that against the cached policy ([`store::Store`] keeps the
//!    cache on disk across restarts) and the time: apply the cached policy, fetch, or no
//!    policy (§3.3, §5.1, §10.2).
//! 3. [`fetch::Fetcher`] gets the policy from `https://mta-sts.<domain>/.well-known/mta-sts.txt`
//!    with PKIX checks, no redirects, a size cap and a time limit (§3.3), and
//!    [`policy::Policy::parse`] reads it (§3.2).
//! 4. [`policy::Policy::allows_mx`] says which MX hosts may receive the mail (§4.1). That
//!    the MX's certificate is valid for its name is the TLS client's check (rustls and
//!    webpki, §4.2), not this module's.
//!
//! Everything but `fetch` and `store` is pure. Each part has its own `Error`; RFC 8460
//! failure types come from [`fetch::Error::result_type`].

pub mod cache;
pub mod fetch;
pub mod name;
pub mod policy;
pub mod record;
pub mod store;

pub use cache::{Cached, Decision, TxtLookup, decide};
pub use fetch::Fetcher;
pub use name::{MxPattern, PolicyDomain};
pub use policy::{Mode, Policy};
pub use record::{PolicyId, Record, parse_records};
pub use store::Store;
