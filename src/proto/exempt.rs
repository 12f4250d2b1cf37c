//! A session from one of a listener's `exempt_networks` (DESIGN §3): a named legacy
//! device that cannot do TLS. Nothing is rewritten or refused; the driver relays its
//! bytes unchanged from the first one, and the session is logged and counted.

use crate::policy::UserHasher;
use crate::proto::{Conn, Event, Goodbye, Limits, Phase, Tally};

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
    fn process_client(&mut self) {}
    fn process_upstream(&mut self) {}
    fn goodbye(&self, _why: Goodbye) -> &'static [u8] {
        b""
    }
    fn on_client_eof(&mut self) {}
    fn on_upstream_eof(&mut self) {}
    fn on_timeout(&mut self) {}

    fn phase(&self) -> Phase {
        Phase::Command
    }

    /// Relayed from the start: there is no boundary to wait for.
    fn close_if_idle(&mut self) -> bool {
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
