//! The scripted IMAP upstream: Dovecot-like (literals, LOGIN, a large FETCH, LOGOUT), or
//! quiet (any LOGIN accepted, every command `OK done`, nothing more).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{Recording, Upstream, listen, read_line};

/// The Dovecot-like upstream's greeting.
pub const GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN] scripted ready\r\n";

/// What the scripted IMAP upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Dovecot-like: reads literals (answering `+ OK` to synchronising ones), a
    /// CAPABILITY that changes after LOGIN, a FETCH with a large literal, LOGOUT.
    Dovecot,
    /// Greets `* OK [CAPABILITY IMAP4rev1 IDLE] quiet ready`, accepts any LOGIN and
    /// answers every command `TAG OK done`, nothing more.
    Quiet,
}

/// The scripted IMAP upstream on 127.0.0.1:0.
pub async fn scripted(behaviour: Behaviour) -> Upstream {
    listen(move |stream, rec| async move {
        match behaviour {
            Behaviour::Dovecot => dovecot(stream, rec).await,
            Behaviour::Quiet => quiet(stream, rec).await,
        }
    })
    .await
}

async fn dovecot(stream: TcpStream, rec: Arc<Mutex<Recording>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write.write_all(GREETING.as_bytes()).await;
    let mut logged_in = false;
    let mut line = Vec::new();
    loop {
        // One command, literals included.
        let mut command = Vec::new();
        loop {
            let Some(text) = read_line(&mut read, &mut line, &rec).await else {
                return;
            };
            command.extend_from_slice(&line);
            let Some(open) = text.rfind('{').filter(|_| text.ends_with('}')) else {
                break;
            };
            let spec = &text[open + 1..text.len() - 1];
            let (len, sync) = match spec.strip_suffix('+') {
                Some(n) => (n.parse::<usize>().unwrap(), false),
                None => (spec.parse::<usize>().unwrap(), true),
            };
            if sync {
                let _ = write.write_all(b"+ OK\r\n").await;
            }
            let mut octets = vec![0; len];
            if read.read_exact(&mut octets).await.is_err() {
                return;
            }
            rec.lock().unwrap().raw.extend_from_slice(&octets);
            command.extend_from_slice(&octets);
        }
        let text = String::from_utf8_lossy(&command).into_owned();
        let mut words = text.split_whitespace();
        let tag = words.next().unwrap_or("*").to_owned();
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let reply = match verb.as_str() {
            "CAPABILITY" if logged_in => {
                format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n")
            }
            "CAPABILITY" => format!(
                "* CAPABILITY IMAP4rev1 SASL-IR ID IDLE LITERAL+ AUTH=PLAIN\r\n{tag} OK done\r\n"
            ),
            "LOGIN" => {
                logged_in = true;
                format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n")
            }
            "FETCH" => {
                // A large literal with protocol-looking lines inside.
                let body = "a STARTTLS\r\n* BYE\r\n".repeat(20_000);
                format!(
                    "* 1 FETCH (BODY[] {{{}}}\r\n{body})\r\n{tag} OK Fetch completed\r\n",
                    body.len()
                )
            }
            "LOGOUT" => {
                let _ = write
                    .write_all(
                        format!("* BYE Logging out\r\n{tag} OK Logout completed\r\n").as_bytes(),
                    )
                    .await;
                return;
            }
            _ => format!("{tag} OK {verb} completed\r\n"),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn quiet(stream: TcpStream, rec: Arc<Mutex<Recording>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write
        .write_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] quiet ready\r\n")
        .await;
    let mut line = Vec::new();
    while let Some(text) = read_line(&mut read, &mut line, &rec).await {
        let tag = text.split_whitespace().next().unwrap_or("*").to_owned();
        let _ = write
            .write_all(format!("{tag} OK done\r\n").as_bytes())
            .await;
    }
}
