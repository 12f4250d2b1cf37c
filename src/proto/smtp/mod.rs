//! SMTP (RFC 5321) with STARTTLS (RFC 3207), PIPELINING (RFC 2920), CHUNKING (RFC 3030)
//! and AUTH (RFC 4954), as the proxy sees it.

pub mod body;
pub mod parse;
mod session;

pub use session::{Config, Session};
