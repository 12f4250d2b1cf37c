//! A recording TCP forwarder for the upstream leg: put between mailmoat and a real
//! legacy server, it relays every byte both ways unchanged and keeps them, so a test can
//! prove what crossed the local link (the legacy server's own log may not say, and the
//! client's side cannot tell what mailmoat forwarded).
//!
//! It runs on a thread and runtime of its own, so that it relays while the test blocks
//! (in a synchronous test, or in `std::thread::sleep` inside an async one), and stops
//! when dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{STEP, poll_for};

/// One connection through the forwarder.
#[derive(Debug, Clone, Default)]
pub struct Leg {
    /// The port the connection came from: mailmoat's `upstream_port` of the session.
    pub client_port: u16,
    /// The forwarder's own port towards the upstream: the port the upstream's log names.
    pub upstream_port: u16,
    /// Every byte from mailmoat to the upstream, in order.
    pub to_upstream: Vec<u8>,
    /// Every byte from the upstream to mailmoat, in order.
    pub to_client: Vec<u8>,
    /// Both directions have ended.
    pub closed: bool,
}

impl Leg {
    /// The upstream's reply lines, as text.
    pub fn replies(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.to_client)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

pub struct Recorder {
    /// Where mailmoat connects instead of the upstream.
    pub addr: SocketAddr,
    legs: Arc<Mutex<Vec<Leg>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    /// A forwarder on a free loopback port to `upstream`.
    pub fn start(upstream: SocketAddr) -> Recorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let legs = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&legs);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let accept = async {
                    while let Ok((client, peer)) = listener.accept().await {
                        tokio::spawn(forward(client, peer, upstream, Arc::clone(&shared)));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Recorder {
            addr,
            legs,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every connection so far.
    pub fn legs(&self) -> Vec<Leg> {
        self.legs.lock().unwrap().clone()
    }

    /// The connection that came from `client_port`, once both its directions ended
    /// (bounded wait).
    pub fn closed_leg(&self, client_port: u16) -> Leg {
        let leg = || {
            self.legs()
                .into_iter()
                .find(|leg| leg.client_port == client_port)
        };
        poll_for(STEP, || leg().filter(|leg| leg.closed))
            .unwrap_or_else(|| panic!("no closed leg from port {client_port}: {:?}", leg()))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    legs: Arc<Mutex<Vec<Leg>>>,
) {
    let Ok(Ok(upstream)) = tokio::time::timeout(STEP, TcpStream::connect(upstream)).await else {
        return;
    };
    let index = {
        let mut legs = legs.lock().unwrap();
        legs.push(Leg {
            client_port: peer.port(),
            upstream_port: upstream.local_addr().map_or(0, |a| a.port()),
            ..Leg::default()
        });
        legs.len() - 1
    };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = pump(client_read, upstream_write, Arc::clone(&legs), index, true);
    let down = pump(upstream_read, client_write, Arc::clone(&legs), index, false);
    tokio::join!(up, down);
    legs.lock().unwrap()[index].closed = true;
}

/// Copies `from` to `to`, recording, until either side ends; then half-closes `to`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    legs: Arc<Mutex<Vec<Leg>>>,
    index: usize,
    to_upstream: bool,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut legs = legs.lock().unwrap();
            let leg = &mut legs[index];
            let recorded = if to_upstream {
                &mut leg.to_upstream
            } else {
                &mut leg.to_client
            };
            recorded.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
