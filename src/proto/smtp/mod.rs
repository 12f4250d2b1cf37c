//! SMTP (RFC 5321) with STARTTLS (RFC 3207), PIPELINING (RFC 2920), CHUNKING (RFC 3030)
//! and AUTH (RFC 4954), as the proxy sees it.

pub mod body;
pub mod canonical;
mod ehlo;
pub mod parse;
mod session;
pub mod xclient;

pub use session::{Config, Session};

/// The reply when the upstream cannot be reached (ARCHITECTURE.md §1.2).
pub const UNAVAILABLE: &[u8] = b"421 4.3.0 Service temporarily unavailable, try again later\r\n";
