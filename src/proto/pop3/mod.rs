//! POP3 (RFC 1939) with STLS (RFC 2595), CAPA (RFC 2449), AUTH (RFC 5034), as the proxy sees it.

pub mod parse;
mod session;

pub use session::{Config, Session};

/// The reply when the upstream cannot be reached (ARCHITECTURE.md §1.2).
pub const UNAVAILABLE: &[u8] =
    b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n";
