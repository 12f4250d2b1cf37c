//! Binds every listener, accepts connections, caps how many are open, and runs each in
//! its own task inside a span that carries the session id.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, ListenerConfig, Protocol, TlsMode};
use crate::driver::{self, ConnectionSettings};
use crate::policy::UserHasher;
use crate::proto::smtp;
use crate::tls;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] tls::Error),
    /// A listen address could not be bound.
    #[error("listener {name}: cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// One bound listener and what its connections share.
struct Bound {
    config: ListenerConfig,
    socket: TcpListener,
    settings: ConnectionSettings,
    smtp: smtp::Config,
}

/// Every listener bound, ready to serve.
pub struct Server {
    listeners: Vec<Bound>,
    connections: Arc<Semaphore>,
}

impl Server {
    /// Loads certificates and binds every listener of a validated config.
    pub async fn bind(config: &Config) -> Result<Server, Error> {
        let provider = tls::provider();
        let resolver = Arc::new(tls::SniResolver::load(&config.tls, &provider)?);
        let user_hasher = config
            .user_hash_key
            .as_deref()
            .map_or_else(UserHasher::random, |key| UserHasher::new(key.as_bytes()));
        let mut listeners = Vec::new();
        for listener in &config.listeners {
            let server_config = tls::server_config(
                &config.tls,
                listener.protocol,
                Arc::clone(&resolver),
                Arc::clone(&provider),
            )?;
            let socket =
                TcpListener::bind(listener.listen)
                    .await
                    .map_err(|source| Error::Bind {
                        name: listener.name.clone(),
                        addr: listener.listen,
                        source,
                    })?;
            listeners.push(Bound {
                config: listener.clone(),
                socket,
                settings: ConnectionSettings {
                    tls_mode: listener.tls,
                    tls: server_config,
                    alpn: listener.protocol.alpn_id(),
                    timeouts: config.timeouts.clone(),
                },
                smtp: smtp::Config {
                    policy: listener.policy,
                    bare_newlines: listener.bare_newlines,
                    max_line_len: config.limits.max_line_len,
                    max_held_bytes: 64 * 1024,
                    user_hasher: user_hasher.clone(),
                },
            });
        }
        Ok(Server {
            listeners,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
        })
    }

    /// The address each listener is bound to, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.socket.local_addr().ok()?)))
            .collect()
    }

    /// Accepts on every listener until `shutdown` turns true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for bound in self.listeners {
            let connections = Arc::clone(&self.connections);
            let shutdown = shutdown.clone();
            tasks.spawn(accept_loop(Arc::new(bound), connections, shutdown));
        }
        while tasks.join_next().await.is_some() {}
    }
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(0);

/// A session id unique in this process and unlikely to repeat across restarts.
fn session_id() -> String {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let mut seed = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut seed);
        u64::from_le_bytes(seed) & 0xffff_ffff_0000_0000
    });
    format!(
        "{:016x}",
        base.wrapping_add(NEXT_SESSION.fetch_add(1, Ordering::Relaxed))
    )
}

async fn accept_loop(
    bound: Arc<Bound>,
    connections: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = bound.socket.local_addr().ok();
    info!(listener = %bound.config.name, addr = ?local, protocol = ?bound.config.protocol, tls = ?bound.config.tls, "listening");
    loop {
        let accepted = tokio::select! {
            accepted = bound.socket.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                error!(%err, listener = %bound.config.name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            warn!(event = "limit_exceeded", limit = "max_connections", client = %peer, "connection refused");
            tokio::spawn(refuse_busy(client, bound.config.tls));
            continue;
        };
        let span = info_span!(
            "session",
            id = %session_id(),
            listener = %bound.config.name,
            client = %peer,
            upstream_port = tracing::field::Empty,
        );
        let bound = Arc::clone(&bound);
        tokio::spawn(
            async move {
                let _permit = permit;
                match bound.config.protocol {
                    Protocol::Smtp => {
                        let session = smtp::Session::new(bound.smtp.clone(), false);
                        driver::serve(
                            client,
                            &bound.config.upstream,
                            &bound.settings,
                            session,
                            SMTP_UNAVAILABLE,
                        )
                        .await
                    }
                }
            }
            .instrument(span),
        );
    }
}

const SMTP_UNAVAILABLE: &[u8] = b"421 4.3.0 Service temporarily unavailable, try again later\r\n";

/// Over the connection cap: a plaintext client gets the protocol's temporary failure.
async fn refuse_busy(mut client: TcpStream, tls: TlsMode) {
    if tls == TlsMode::Starttls {
        let _ = client
            .write_all(b"421 4.3.2 Too many connections, try again later\r\n")
            .await;
    }
    let _ = client.shutdown().await;
}
