//! The transcript harness the session tests share: bytes in from either side, and what
//! the session asked the driver to do, by kind.

use super::{Action, Event, Limits, Session};
use crate::policy::UserHasher;

/// What one step produced, split by kind.
#[derive(Debug, Default, PartialEq)]
pub struct Out {
    pub client: String,
    pub upstream: String,
    pub events: Vec<Event>,
    pub starttls: Option<Vec<u8>>,
    pub relay: bool,
    pub closed: bool,
}

/// Every action queued so far. Nothing may follow a relay or a close.
pub fn drain(session: &mut impl Session) -> Out {
    let mut out = Out::default();
    while let Some(action) = session.next_action() {
        assert!(!out.relay && !out.closed, "{action:?} after relay/close");
        match action {
            Action::ToClient(b) => out.client.push_str(&String::from_utf8_lossy(&b)),
            Action::ToUpstream(b) => out.upstream.push_str(&String::from_utf8_lossy(&b)),
            Action::Event(e) => out.events.push(e),
            Action::StartTls { early } => out.starttls = Some(early.to_vec()),
            Action::Relay => out.relay = true,
            Action::Close => out.closed = true,
        }
    }
    out
}

/// The client sends `bytes`.
pub fn client(session: &mut impl Session, bytes: &str) -> Out {
    session.on_client_data(bytes.as_bytes());
    drain(session)
}

/// The upstream sends `bytes`.
pub fn upstream(session: &mut impl Session, bytes: &str) -> Out {
    session.on_upstream_data(bytes.as_bytes());
    drain(session)
}

/// The names of `events`, in order.
pub fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::name).collect()
}

/// The limits of the session tests, with lines of at most `max_line_len`.
pub fn limits(max_line_len: usize) -> Limits {
    Limits {
        max_line_len,
        max_held_bytes: 64 * 1024,
        max_plaintext_commands: 20,
        max_errors: 20,
    }
}

/// The hasher of the session tests: `hash(user)` is what their events carry.
pub fn hasher() -> UserHasher {
    UserHasher::new(b"test key")
}

/// The keyed hash an event carries for `user`.
pub fn hash(user: &str) -> Option<String> {
    Some(hasher().hash(user))
}

/// A flood of empty lines, each answered by the proxy with `reply_len` bytes, from a
/// client that never reads: the session answers a budget's worth, then waits until the
/// driver has written them (`on_output_written`), and in the end every line is answered.
pub fn assert_flood_waits_for_the_client(s: &mut impl Session, reply_len: usize) {
    use super::MAX_UNWRITTEN_REPLY_BYTES;
    s.conn_mut().limits.max_errors = u32::MAX;
    assert!(!s.on_output_written());
    let flood = "\n".repeat(64 * 1024);
    let out = client(s, &flood);
    // Each reply costs its bytes and its action's slot in the queue.
    let batch = MAX_UNWRITTEN_REPLY_BYTES.div_ceil(reply_len + super::conn::ACTION_COST);
    assert_eq!(out.client.len(), batch * reply_len);
    let mut total = out.client.len() / reply_len;
    while s.on_output_written() {
        let out = drain(s);
        assert!(out.client.len() < MAX_UNWRITTEN_REPLY_BYTES + reply_len);
        total += out.client.len() / reply_len;
    }
    assert_eq!(total, flood.len());
}
