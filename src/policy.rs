//! What may happen before TLS, and what the logs may say about a user. Pure.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

/// The listener's rule for plaintext clients (ARCHITECTURE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Only the upgrade dialogue before TLS (submission, IMAP, POP3).
    #[default]
    RequireTls,
    /// Mail may flow in plaintext, but no authentication (public MX on port 25, where
    /// RFC 3207 §4 forbids requiring TLS).
    AuthRequiresTls,
}

/// What to do with bare CR / LF in an SMTP message body (ARCHITECTURE.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareNewlines {
    /// Rewrite them to CRLF (Postfix 3.9 `smtpd_forbid_bare_newline = normalize`).
    #[default]
    Normalize,
    /// Refuse the message and drop the upstream transaction.
    Reject,
}

/// SASL mechanisms that bind to the TLS channel (`SCRAM-SHA-256-PLUS`, RFC 5802 §6)
/// cannot work through a TLS-terminating proxy: the upstream sees no TLS channel.
pub fn is_channel_binding_mechanism(mechanism: &[u8]) -> bool {
    mechanism.len() >= 5 && mechanism[mechanism.len() - 5..].eq_ignore_ascii_case(b"-PLUS")
}

/// A capability's mechanism list as the client may see it through the proxy.
#[derive(Debug, PartialEq, Eq)]
pub enum Mechanisms {
    /// No channel-binding mechanism was in it: the line goes as it was.
    Unchanged,
    /// The keyword and the mechanisms that remain, space-separated, without a line end.
    Without(bytes::BytesMut),
    /// Only channel-binding mechanisms were in it: the line goes away.
    Empty,
}

/// `keyword` followed by `mechanisms` minus the channel-binding ones (SMTP's `AUTH`
/// EHLO keyword, POP3's `SASL` CAPA tag).
pub fn without_channel_binding<'a>(
    keyword: &[u8],
    mechanisms: impl Iterator<Item = &'a [u8]> + Clone,
) -> Mechanisms {
    if !mechanisms.clone().any(is_channel_binding_mechanism) {
        return Mechanisms::Unchanged;
    }
    let mut out = bytes::BytesMut::from(keyword);
    let mut kept = 0;
    for mechanism in mechanisms.filter(|m| !is_channel_binding_mechanism(m)) {
        out.extend_from_slice(b" ");
        out.extend_from_slice(mechanism);
        kept += 1;
    }
    if kept == 0 {
        Mechanisms::Empty
    } else {
        Mechanisms::Without(out)
    }
}

/// `XXXXXXXX`, `STARTTLX`, `XXXX`, `STLX`...: what in-path boxes that strip the upgrade
/// command leave behind: as long as `upgrade`, and all `X` or one letter off.
pub fn is_mangled_upgrade_verb(verb: &[u8], upgrade: &[u8]) -> bool {
    if verb.len() != upgrade.len() {
        return false;
    }
    let all_x = verb.iter().all(|b| b.eq_ignore_ascii_case(&b'X'));
    let differing = verb
        .iter()
        .zip(upgrade)
        .filter(|(a, b)| !a.eq_ignore_ascii_case(b))
        .count();
    all_x || differing == 1
}

/// Turns user names into keyed hashes for logs, so that sessions of the same user can be
/// joined without the name (or anything else the client typed) being written down.
#[derive(Clone)]
pub struct UserHasher {
    key: Arc<aws_lc_rs::hmac::Key>,
}

impl UserHasher {
    /// A hasher with the given key (from the config, so hashes are stable across
    /// restarts and instances).
    pub fn new(key: &[u8]) -> Self {
        UserHasher {
            key: Arc::new(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key)),
        }
    }

    /// A hasher with a random key: hashes are stable for this process only.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).expect("the system random generator works");
        Self::new(&key)
    }

    /// The first 64 bits of HMAC-SHA256(key, lower-cased user), in hex.
    pub fn hash(&self, user: &str) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.key, user.to_lowercase().as_bytes());
        tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for UserHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserHasher(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_mechanisms() {
        assert!(is_channel_binding_mechanism(b"SCRAM-SHA-256-PLUS"));
        assert!(is_channel_binding_mechanism(b"scram-sha-1-plus"));
        assert!(!is_channel_binding_mechanism(b"SCRAM-SHA-256"));
        assert!(!is_channel_binding_mechanism(b"PLUS"));
        assert!(!is_channel_binding_mechanism(b"PLAIN"));
    }

    #[test]
    fn mangled_upgrade_verbs() {
        for verb in [&b"XXXXXXXX"[..], b"xxxxxxxx", b"STARTTLX", b"STARXTLS"] {
            assert!(is_mangled_upgrade_verb(verb, b"STARTTLS"), "{verb:?}");
        }
        for verb in [
            &b"STARTTLS"[..],
            b"STARTTL",
            b"XXXXXXX",
            b"STARTXXX",
            b"NOOP",
        ] {
            assert!(!is_mangled_upgrade_verb(verb, b"STARTTLS"), "{verb:?}");
        }
        assert!(is_mangled_upgrade_verb(b"XXXX", b"STLS"));
        assert!(is_mangled_upgrade_verb(b"STLX", b"STLS"));
        assert!(!is_mangled_upgrade_verb(b"STLS", b"STLS"));
    }

    #[test]
    fn user_hashes_are_keyed_stable_and_hide_the_name() {
        let a = UserHasher::new(b"key one");
        let b = UserHasher::new(b"key two");
        assert_eq!(a.hash("alice@example.test"), a.hash("Alice@Example.test"));
        assert_ne!(a.hash("alice@example.test"), b.hash("alice@example.test"));
        assert_eq!(a.hash("alice").len(), 16);
        assert!(!a.hash("alice").contains("alice"));
    }
}
