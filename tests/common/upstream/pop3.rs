//! The scripted POP3 upstream: Dovecot-like (CAPA, USER/PASS, AUTH PLAIN, one message
//! to STAT, LIST, UIDL and RETR, and a record of bytes sent early behind a login), silent,
//! or quiet (any login, `+OK` to everything).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Recording, Upstream, listen, read_line, silent};
use crate::common::dot_stuffed;

/// The Dovecot-like upstream's greeting.
pub const GREETING: &str = "+OK Dovecot ready.\r\n";
/// The scripted upstream's own CAPA reply: USER, SASL with a channel-binding mechanism,
/// and its own STLS (it has no TLS; the proxy owns TLS).
pub const CAPA_UPSTREAM: &str = "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n\
AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN SCRAM-SHA-256-PLUS\r\nSTLS\r\n.\r\n";
/// The AUTH PLAIN initial response the upstream accepts: "\0alice\0secret".
pub const PLAIN_IR: &str = "AGFsaWNlAHNlY3JldA==";

/// The one message in alice's maildrop: lines that look like the end of a body, replies
/// and commands, a line longer than any command line, all of them content.
pub fn message() -> Vec<u8> {
    let mut m = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: pop3 test\r\n\r\n\
.\r\n..\r\n+OK\r\n-ERR\r\nSTLS\r\nUSER mallory\r\n.hidden\r\n"
        .to_vec();
    m.extend_from_slice(&[b'x'; 20_000]);
    m.extend_from_slice(b"\r\nend\r\n");
    m
}

/// Exactly what the upstream sends for `RETR 1`.
pub fn retr_reply() -> Vec<u8> {
    let message = message();
    let mut reply = format!("+OK {} octets\r\n", message.len()).into_bytes();
    reply.extend(dot_stuffed(&message));
    reply
}

/// What the scripted POP3 upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Dovecot-like: CAPA, USER/PASS, AUTH PLAIN, STAT/LIST/UIDL/RETR, QUIT.
    Dovecot,
    /// Accepts and never says anything.
    Silent,
    /// Greets `+OK quiet ready`, accepts any login, answers everything `+OK`.
    Quiet,
}

/// The scripted POP3 upstream on 127.0.0.1:0.
pub async fn scripted(behaviour: Behaviour) -> Upstream {
    listen(move |stream, rec| async move {
        match behaviour {
            Behaviour::Dovecot => dovecot(stream, rec).await,
            Behaviour::Silent => silent(stream).await,
            Behaviour::Quiet => quiet(stream, rec).await,
        }
    })
    .await
}

async fn dovecot(stream: TcpStream, rec: Arc<Mutex<Recording>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write.write_all(GREETING.as_bytes()).await;
    let mut user: Option<String> = None;
    let mut logged_in = false;
    let mut line = Vec::new();
    loop {
        let Some(text) = read_line(&mut read, &mut line, &rec).await else {
            return;
        };
        let mut words = text.splitn(2, ' ');
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let arg = words.next().unwrap_or("").to_owned();
        let reply: Vec<u8> = match verb.as_str() {
            "CAPA" => CAPA_UPSTREAM.as_bytes().to_vec(),
            "USER" if !logged_in => {
                user = Some(arg);
                b"+OK\r\n".to_vec()
            }
            "PASS" | "AUTH" if !logged_in => {
                let ok = if verb == "PASS" {
                    user.as_deref() == Some("alice") && arg == "secret"
                } else if arg.eq_ignore_ascii_case("PLAIN") {
                    let _ = write.write_all(b"+ \r\n").await;
                    let Some(response) = read_line(&mut read, &mut line, &rec).await else {
                        return;
                    };
                    response == PLAIN_IR
                } else {
                    arg == format!("PLAIN {PLAIN_IR}")
                };
                // Courier reads with a flush first: anything already sent is lost.
                if !read.buffer().is_empty()
                    || tokio::time::timeout(Duration::from_millis(50), read.fill_buf())
                        .await
                        .is_ok_and(|r| r.is_ok_and(|b| !b.is_empty()))
                {
                    rec.lock().unwrap().early_input += 1;
                }
                logged_in = ok;
                if ok {
                    b"+OK Logged in.\r\n".to_vec()
                } else {
                    b"-ERR [AUTH] Authentication failed.\r\n".to_vec()
                }
            }
            "STAT" if logged_in => format!("+OK 1 {}\r\n", message().len()).into_bytes(),
            "LIST" if logged_in && arg.is_empty() => {
                format!("+OK 1 messages:\r\n1 {}\r\n.\r\n", message().len()).into_bytes()
            }
            "UIDL" if logged_in && arg.is_empty() => b"+OK\r\n1 000000014d9a5e5a\r\n.\r\n".to_vec(),
            "RETR" if logged_in && arg == "1" => retr_reply(),
            "NOOP" => b"+OK\r\n".to_vec(),
            "QUIT" => {
                let _ = write.write_all(b"+OK Logging out.\r\n").await;
                return;
            }
            _ if logged_in => b"-ERR Unknown command.\r\n".to_vec(),
            _ => b"-ERR Unknown command or not logged in.\r\n".to_vec(),
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

async fn quiet(stream: TcpStream, rec: Arc<Mutex<Recording>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write.write_all(b"+OK quiet ready\r\n").await;
    let mut line = Vec::new();
    while let Some(text) = read_line(&mut read, &mut line, &rec).await {
        let verb = text.split_whitespace().next().unwrap_or("").to_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "CAPA" => b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n",
            "PASS" => b"+OK logged in\r\n",
            "STAT" => b"+OK 0 0\r\n",
            "QUIT" => b"+OK bye\r\n",
            _ => b"+OK\r\n",
        };
        if write.write_all(reply).await.is_err() || verb == "QUIT" {
            break;
        }
    }
}
