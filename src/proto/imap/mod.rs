//! IMAP4 (RFC 9051, RFC 3501) with STARTTLS, LITERAL+/LITERAL- (RFC 7888) and SASL-IR (RFC 4959), as the proxy sees it before login.

pub mod parse;
mod session;

pub use session::{Config, Session};

/// The reply when the upstream cannot be reached (ARCHITECTURE.md §1.2).
pub const UNAVAILABLE: &[u8] =
    b"* BYE [UNAVAILABLE] Service temporarily unavailable, try again later\r\n";
