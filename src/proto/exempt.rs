//! A session from one of a listener's `exempt_networks` (ARCHITECTURE.md §3): a named legacy
//! device that cannot do TLS. Nothing is rewritten or refused; the driver relays its
//! bytes unchanged from the first one, and the session is logged and counted.

use crate::policy::UserHasher;
use crate::proto::{Conn, Event, Goodbyes, Limits, Tally};

/// Relayed from the start: the proxy never says goodbye itself.
const NO_GOODBYES: Goodbyes = Goodbyes {
    line_too_long: b"",
    too_many_plaintext: b"",
    too_many_errors: b"",
    upstream_unavailable: b"",
    upstream_broken: b"",
    idle_timeout: b"",
    shutting_down: b"",
};

/// Relays blindly from the start, after one `exempt_plaintext_session` event.
#[derive(Debug)]
pub struct Session {
    conn: Conn,
}

impl Session {
    /// The session of an exempt client: the event, then the relay, before any byte.
    pub fn new() -> Self {
        let limits = Limits {
            max_line_len: 0,
            max_held_bytes: 0,
            max_plaintext_commands: 0,
            max_errors: 0,
        };
        let mut conn = Conn::new(limits, UserHasher::new(b""), 0, Tally::new(&[], &[]));
        conn.tally.record("exempt", true);
        conn.event(Event::ExemptPlaintextSession);
        conn.go_blind();
        Session { conn }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

/// Nothing is ever read or said: the session is relayed before it starts.
impl crate::proto::Session for Session {
    fn conn(&self) -> &Conn {
        &self.conn
    }
    fn conn_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
    fn client_step(&mut self) -> bool {
        false
    }
    fn upstream_step(&mut self) -> bool {
        false
    }
    fn goodbyes(&self) -> &'static Goodbyes {
        &NO_GOODBYES
    }
    fn on_client_eof(&mut self) {}
    fn on_upstream_eof(&mut self) {}
    fn awaiting_greeting(&self) -> bool {
        false
    }
    fn at_command_boundary(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Action, Session as _};

    #[test]
    fn an_exempt_session_is_counted_then_relayed_before_any_byte() {
        let mut session = Session::new();
        assert!(!session.wants_client_data());
        assert_eq!(
            session.next_action(),
            Some(Action::Event(Event::ExemptPlaintextSession))
        );
        assert_eq!(session.next_action(), Some(Action::Relay));
        assert_eq!(session.next_action(), None);
    }
}
