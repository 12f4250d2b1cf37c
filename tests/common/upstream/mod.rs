//! Scripted upstreams: a legacy server per protocol ([`smtp`], [`imap`], [`pop3`]) on
//! 127.0.0.1:0 or a unix socket, answering from a script and recording every byte it
//! receives, every line, and when each connection ends.

pub mod imap;
pub mod pop3;
pub mod smtp;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::TcpListener;

use super::{STEP, wait_until_async};

/// Everything a scripted upstream received, over all its connections.
#[derive(Debug, Default)]
pub struct Recording {
    /// Every byte, every connection, in order.
    pub raw: Vec<u8>,
    /// Lines (commands and SASL responses), without their line end.
    pub commands: Vec<String>,
    /// SMTP: complete messages (DATA bodies without the final dot line, BDAT chunks
    /// joined).
    pub messages: Vec<Vec<u8>>,
    /// Connections accepted.
    pub connections: usize,
    /// The address each connection came from, in order.
    pub peers: Vec<SocketAddr>,
    /// PROXY headers received, whole, for a script that reads them.
    pub headers: Vec<Vec<u8>>,
    /// Connections whose session has ended: all the proxy wrote on them was read.
    pub closed: usize,
    /// SMTP: connections that ended while a DATA body was incomplete.
    pub aborted_bodies: usize,
    /// POP3: times bytes were already waiting when the reply to PASS/AUTH was due:
    /// Courier drops those (ARCHITECTURE.md §10), so the proxy must hold them.
    pub early_input: usize,
}

/// A scripted upstream listening on TCP.
pub struct Upstream {
    pub addr: SocketAddr,
    pub recording: Arc<Mutex<Recording>>,
}

impl Upstream {
    pub fn commands(&self) -> Vec<String> {
        self.recording.lock().unwrap().commands.clone()
    }

    pub fn raw(&self) -> Vec<u8> {
        self.recording.lock().unwrap().raw.clone()
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.recording.lock().unwrap().peers.clone()
    }

    pub fn headers(&self) -> Vec<Vec<u8>> {
        self.recording.lock().unwrap().headers.clone()
    }

    /// [`Upstream::raw`] as text, invalid UTF-8 replaced.
    pub fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.recording.lock().unwrap().raw).into_owned()
    }

    /// Waits (bounded) until every connection the upstream accepted has ended, so that
    /// the recording holds all the proxy ever sent on them.
    pub async fn wait_closed(&self) {
        wait_until_closed(&self.recording).await;
    }
}

/// Waits (bounded) until every connection recorded in `recording` has ended.
pub async fn wait_until_closed(recording: &Mutex<Recording>) {
    wait_until_async(STEP, "every upstream connection to end", || {
        let recording = recording.lock().unwrap();
        recording.closed == recording.connections
    })
    .await;
}

/// Accepts on 127.0.0.1:0 and runs `session` (a script) for each connection, recording
/// connections as they come and as they end.
pub async fn listen<Session, Fut>(session: Session) -> Upstream
where
    Session: Fn(tokio::net::TcpStream, Arc<Mutex<Recording>>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recording = Arc::new(Mutex::new(Recording::default()));
    let shared = Arc::clone(&recording);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            shared.lock().unwrap().peers.push(peer);
            spawn_counted(session(stream, Arc::clone(&shared)), &shared);
        }
    });
    Upstream { addr, recording }
}

/// [`listen`] on a unix socket at `path`.
async fn listen_unix<Session, Fut>(path: &Path, session: Session) -> Arc<Mutex<Recording>>
where
    Session: Fn(tokio::net::UnixStream, Arc<Mutex<Recording>>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let recording = Arc::new(Mutex::new(Recording::default()));
    let shared = Arc::clone(&recording);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            spawn_counted(session(stream, Arc::clone(&shared)), &shared);
        }
    });
    recording
}

fn spawn_counted(session: impl Future<Output = ()> + Send + 'static, rec: &Arc<Mutex<Recording>>) {
    rec.lock().unwrap().connections += 1;
    let rec = Arc::clone(rec);
    tokio::spawn(async move {
        session.await;
        rec.lock().unwrap().closed += 1;
    });
}

/// An upstream that accepts and never says anything: reads to the end, records nothing.
async fn silent<S: AsyncRead + Unpin>(mut stream: S) {
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink).await;
}

/// One line from the proxy, recorded (bytes and text without its line end); None at the
/// end of the stream.
pub async fn read_line<R: AsyncRead + Unpin>(
    read: &mut BufReader<R>,
    line: &mut Vec<u8>,
    rec: &Mutex<Recording>,
) -> Option<String> {
    line.clear();
    match read.read_until(b'\n', line).await {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(line).trim_end().to_owned();
    let mut r = rec.lock().unwrap();
    r.raw.extend_from_slice(line);
    r.commands.push(text.clone());
    Some(text)
}
