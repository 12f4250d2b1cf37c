//! A session from one of a listener's `exempt_networks` (DESIGN §3): a named legacy
//! device that cannot do TLS. Nothing is rewritten or refused; the driver relays its
//! bytes unchanged from the first one, and the session is logged and counted.

use std::collections::VecDeque;

use crate::proto::{Action, Event, Phase};

/// Relays blindly from the start, after one `exempt_plaintext_session` event.
#[derive(Debug)]
pub struct Session {
    actions: VecDeque<Action>,
}

impl Session {
    /// The session of an exempt client.
    pub fn new() -> Self {
        Session {
            actions: VecDeque::from([Action::Event(Event::ExemptPlaintextSession), Action::Relay]),
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl crate::proto::Session for Session {
    fn on_client_data(&mut self, _data: &[u8]) {}
    fn on_upstream_data(&mut self, _data: &[u8]) {}
    fn on_client_eof(&mut self) {}
    fn on_upstream_eof(&mut self) {}
    fn on_tls_established(&mut self) {}
    fn on_timeout(&mut self) {}
    /// Holds nothing: it goes straight to the relay.
    fn release_idle_memory(&mut self) {}
    fn on_output_written(&mut self) -> bool {
        false
    }

    fn phase(&self) -> Phase {
        Phase::Command
    }

    fn wants_client_data(&self) -> bool {
        false
    }

    fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn summary(&self) -> String {
        "exempt=1".to_owned()
    }

    /// Relayed from the start: there is no boundary to wait for.
    fn close_if_idle(&mut self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Session as _;

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
