//! SASL initial responses (RFC 4422): just enough to name the user in a
//! `credentials_exposed` event. The secret is never returned.

/// The authentication identity in a PLAIN initial response:
/// `message = [authzid] UTF8NUL authcid UTF8NUL passwd` (RFC 4616 §2), base64-encoded.
/// Returns `None` when it does not decode; the password is never returned.
pub fn plain_authcid(initial_response: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(initial_response)
        .ok()?;
    let mut parts = decoded.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let authcid = parts.next()?;
    parts.next()?;
    String::from_utf8(authcid.to_vec()).ok()
}

/// The user name in a LOGIN initial response (base64 of the name).
pub fn login_username(initial_response: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(initial_response)
        .ok()?;
    String::from_utf8(decoded).ok()
}

/// The line the upstream gets for a client's SASL response: the line itself when it is
/// base64 (`base64 = base64-char ... ["="]`) or the cancel `*` (RFC 4954 §4, RFC 9051
/// §6.2.2, RFC 5034 §4), else `*`. A response is data the proxy cannot check, so it must
/// at least be nothing an upstream could read as more than one line: a bare CR or a NUL
/// inside would be a second command to some parsers. Cancelling gets the client the
/// upstream's own refusal of the exchange.
pub fn response_line(line: &[u8]) -> &[u8] {
    let base64 = line
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if base64 || line == b"*" { line } else { b"*" }
}

/// The mechanism name for logs, if it looks like one (RFC 4422 §3.1: upper-case
/// letters, digits, hyphen, underscore, at most 20), else `unknown`: it is client text.
pub fn mechanism_label(mechanism: &[u8]) -> String {
    let looks_right = mechanism.len() <= 20
        && mechanism
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if looks_right {
        String::from_utf8_lossy(mechanism).to_ascii_uppercase()
    } else {
        "unknown".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_labels_carry_no_client_text() {
        assert_eq!(mechanism_label(b"plain"), "PLAIN");
        assert_eq!(mechanism_label(b"SCRAM-SHA-256"), "SCRAM-SHA-256");
        assert_eq!(mechanism_label(b"pass word"), "unknown");
        assert_eq!(mechanism_label(b"AGFsaWNlAHNlY3JldA=="), "unknown");
        assert_eq!(mechanism_label(&[b'A'; 21]), "unknown");
    }

    #[test]
    fn sasl_identities_are_extracted_without_the_secret() {
        // "\0alice@example.test\0alice-secret-pw"
        assert_eq!(
            plain_authcid(b"AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=").as_deref(),
            Some("alice@example.test")
        );
        assert_eq!(plain_authcid(b"not base64!"), None);
        assert_eq!(plain_authcid(b"YWxpY2U="), None);
        assert_eq!(login_username(b"YWxpY2U=").as_deref(), Some("alice"));
    }

    #[test]
    fn a_sasl_response_that_is_not_base64_becomes_a_cancel() {
        for ok in [&b"AGFsaWNlAHNlY3JldA=="[..], b"", b"*", b"dXNlcg=="] {
            assert_eq!(response_line(ok), ok);
        }
        for bad in [
            &b"dXNlcg==\rMAIL FROM:<a@b>"[..],
            b"dXNl\0cg==",
            b"dXNlcg== ",
            b"* ",
            b"a b",
        ] {
            assert_eq!(response_line(bad), b"*", "{bad:?}");
        }
    }
}
