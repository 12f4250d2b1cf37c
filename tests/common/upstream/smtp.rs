//! The scripted SMTP upstream: a modern ESMTP server (PIPELINING, CHUNKING, AUTH, its
//! own STARTTLS), a silent one, or a HELO-only one; it records command lines, DATA and
//! BDAT messages, and bodies cut short.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Recording, Upstream, listen, listen_unix, read_line, silent};

/// What the scripted upstream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// A modern ESMTP server with PIPELINING, CHUNKING, AUTH and its own STARTTLS.
    Esmtp,
    /// Accepts and never says anything.
    Silent,
    /// Answers EHLO with 502, like a HELO-only legacy server.
    HeloOnly,
}

/// The scripted SMTP upstream on 127.0.0.1:0.
pub async fn scripted_upstream(behaviour: Behaviour) -> Upstream {
    listen(move |stream, rec| serve_scripted(stream, behaviour, rec)).await
}

/// The scripted SMTP upstream (`Esmtp`) on a unix socket at `path`.
pub async fn scripted_unix_upstream(path: &Path) -> Arc<Mutex<Recording>> {
    listen_unix(path, |stream, rec| {
        serve_scripted(stream, Behaviour::Esmtp, rec)
    })
    .await
}

async fn serve_scripted<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    behaviour: Behaviour,
    rec: Arc<Mutex<Recording>>,
) {
    if behaviour == Behaviour::Silent {
        return silent(stream).await;
    }
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let _ = write.write_all(b"220 scripted.upstream ESMTP\r\n").await;
    let mut line = Vec::new();
    let mut chunks = Vec::new();
    loop {
        let Some(text) = read_line(&mut read, &mut line, &rec).await else {
            return;
        };
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: Vec<u8> = match verb.as_str() {
            "EHLO" if behaviour == Behaviour::HeloOnly => {
                b"502 5.5.2 Error: command not recognized\r\n".to_vec()
            }
            "EHLO" => {
                b"250-scripted.upstream\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n\
250-AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS\r\n250-XCLIENT ADDR NAME\r\n250 8BITMIME\r\n"
                    .to_vec()
            }
            "HELO" => b"250 scripted.upstream\r\n".to_vec(),
            "AUTH" => b"235 2.7.0 Authentication successful\r\n".to_vec(),
            "QUIT" => {
                let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            "DATA" => {
                let _ = write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await;
                let mut body = Vec::new();
                loop {
                    line.clear();
                    match read.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => {
                            rec.lock().unwrap().aborted_bodies += 1;
                            return;
                        }
                        Ok(_) => {}
                    }
                    rec.lock().unwrap().raw.extend_from_slice(&line);
                    if line == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(&line);
                }
                rec.lock().unwrap().messages.push(body);
                b"250 2.0.0 Ok: queued\r\n".to_vec()
            }
            "BDAT" => {
                let mut words = text.split_whitespace().skip(1);
                let size: usize = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                let mut chunk = vec![0; size];
                if read.read_exact(&mut chunk).await.is_err() {
                    rec.lock().unwrap().aborted_bodies += 1;
                    return;
                }
                rec.lock().unwrap().raw.extend_from_slice(&chunk);
                chunks.extend_from_slice(&chunk);
                if last {
                    rec.lock()
                        .unwrap()
                        .messages
                        .push(std::mem::take(&mut chunks));
                }
                format!("250 2.0.0 {size} octets received\r\n").into_bytes()
            }
            _ => b"250 2.0.0 Ok\r\n".to_vec(),
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}
