//! Binds every listener, accepts connections, caps how many are open, and runs each in
//! its own task inside a span that carries the session id.
//!
//! Behind a load balancer (`proxy_protocol_from`), the per-client cap counts the client
//! the PROXY header names, not the balancer: a connection from a trusted network is
//! counted only once its header is read (the global cap still applies at accept). The
//! session span's `client` is then the real client and `via` the balancer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, ListenerConfig, Protocol, TlsMode};
use crate::driver::{self, ConnectionSettings};
use crate::identity::{self, Origin};
use crate::policy::UserHasher;
use crate::proto::{imap, pop3, smtp};
use crate::tls;
use crate::upstream;

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

/// How each connection's protocol session is set up.
#[derive(Debug, Clone)]
enum SessionConfig {
    Smtp(smtp::Config),
    Imap(imap::Config),
    Pop3(pop3::Config),
}

/// One bound listener and what its connections share.
struct Bound {
    config: ListenerConfig,
    socket: TcpListener,
    settings: ConnectionSettings,
    session: SessionConfig,
}

/// Every listener bound, ready to serve.
pub struct Server {
    listeners: Vec<Bound>,
    connections: Arc<Semaphore>,
    per_client: Arc<PerClient>,
}

/// Connections open per client address, all listeners together.
#[derive(Debug)]
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a client address; dropping it frees the place.
struct ClientPermit {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientPermit> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientPermit {
            table: Arc::clone(self),
            key,
        })
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a client is counted under: IPv4 as is (also when mapped into IPv6), IPv6
/// by its /64, the smallest block a single subscriber is usually given (RFC 6177).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
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
                session: match listener.protocol {
                    Protocol::Smtp => SessionConfig::Smtp(smtp::Config {
                        policy: listener.policy,
                        bare_newlines: listener.bare_newlines,
                        max_line_len: config.limits.max_line_len,
                        max_held_bytes: MAX_HELD_BYTES,
                        max_plaintext_commands: config.limits.max_plaintext_commands,
                        user_hasher: user_hasher.clone(),
                    }),
                    Protocol::Imap => SessionConfig::Imap(imap::Config {
                        max_line_len: config.limits.max_line_len,
                        max_literal_len: config.limits.max_literal_len,
                        max_held_bytes: MAX_HELD_BYTES,
                        max_plaintext_commands: config.limits.max_plaintext_commands,
                        user_hasher: user_hasher.clone(),
                    }),
                    Protocol::Pop3 => SessionConfig::Pop3(pop3::Config {
                        max_line_len: config.limits.max_line_len,
                        max_held_bytes: MAX_HELD_BYTES,
                        max_plaintext_commands: config.limits.max_plaintext_commands,
                        user_hasher: user_hasher.clone(),
                    }),
                },
            });
        }
        Ok(Server {
            listeners,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_client: Arc::new(PerClient {
                max: config.limits.max_connections_per_client,
                open: Mutex::new(HashMap::new()),
            }),
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
            let per_client = Arc::clone(&self.per_client);
            let shutdown = shutdown.clone();
            tasks.spawn(accept_loop(
                Arc::new(bound),
                connections,
                per_client,
                shutdown,
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Client bytes a session may hold unprocessed (pipelined behind a command whose reply
/// is awaited) before the driver stops reading the client.
const MAX_HELD_BYTES: usize = 64 * 1024;

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
    per_client: Arc<PerClient>,
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
            tokio::spawn(refuse_busy(client, bound.config.tls, bound.config.protocol));
            continue;
        };
        // Behind a load balancer every connection comes from the balancer's address:
        // such clients are counted by the address their PROXY header names, once read.
        let from_balancer = bound
            .config
            .proxy_protocol_from
            .iter()
            .any(|net| net.contains(peer.ip()));
        let client_permit = if from_balancer {
            None
        } else {
            let Some(client_permit) = per_client.try_acquire(peer.ip()) else {
                warn!(event = "limit_exceeded", limit = "max_connections_per_client", client = %peer, "connection refused");
                tokio::spawn(refuse_busy(client, bound.config.tls, bound.config.protocol));
                continue;
            };
            Some(client_permit)
        };
        let span = info_span!(
            "session",
            id = %session_id(),
            listener = %bound.config.name,
            client = tracing::field::Empty,
            via = tracing::field::Empty,
            upstream_port = tracing::field::Empty,
        );
        if !from_balancer {
            span.record("client", tracing::field::display(peer));
        }
        let bound = Arc::clone(&bound);
        let per_client = Arc::clone(&per_client);
        tokio::spawn(
            async move {
                let _permit = permit;
                let Some((client, origin, _client_permit)) =
                    identify(client, peer, client_permit, &bound, &per_client).await
                else {
                    return;
                };
                let (upstream, settings) = (&bound.route(&origin), &bound.settings);
                match &bound.session {
                    SessionConfig::Smtp(config) => {
                        let mut session = smtp::Session::new(config.clone(), false);
                        if bound.config.xclient {
                            session = session.with_xclient(smtp::xclient::Identity {
                                client: origin.client,
                                destination: origin.destination,
                            });
                        }
                        driver::serve(client, upstream, settings, session, smtp::UNAVAILABLE).await
                    }
                    SessionConfig::Imap(config) => {
                        let session = imap::Session::new(config.clone());
                        driver::serve(client, upstream, settings, session, imap::UNAVAILABLE).await
                    }
                    SessionConfig::Pop3(config) => {
                        let session = pop3::Session::new(config.clone());
                        driver::serve(client, upstream, settings, session, pop3::UNAVAILABLE).await
                    }
                }
            }
            .instrument(span),
        );
    }
}

impl Bound {
    /// How this connection reaches the upstream, carrying `origin` in a PROXY header
    /// when configured.
    fn route(&self, origin: &Origin) -> upstream::Route {
        upstream::Route {
            addr: self.config.upstream.clone(),
            source_address: self.config.source_address,
            proxy_header: self
                .config
                .upstream_proxy_protocol
                .map(|version| identity::upstream_header(version, origin)),
        }
    }
}

/// Who the client is. A connection from a trusted balancer (`client_permit` is `None`)
/// must begin with a PROXY header (read within the handshake deadline, else the
/// connection closes with a `proxy_protocol_error` event); its client is then counted by
/// the address the header names. Others are who they connect from.
async fn identify(
    mut client: TcpStream,
    peer: SocketAddr,
    client_permit: Option<ClientPermit>,
    bound: &Bound,
    per_client: &Arc<PerClient>,
) -> Option<(TcpStream, Origin, ClientPermit)> {
    let local = client.local_addr().unwrap_or(bound.config.listen);
    let direct = Origin::direct(peer, local);
    if let Some(permit) = client_permit {
        return Some((client, direct, permit));
    }
    let deadline = bound.settings.timeouts.tls_handshake;
    let origin = match identity::read_header(&mut client, direct, deadline).await {
        Ok(origin) => origin,
        Err(err) => {
            tracing::Span::current().record("client", tracing::field::display(peer));
            warn!(event = "proxy_protocol_error", reason = err.reason(), %err, "connection closed");
            return None;
        }
    };
    let span = tracing::Span::current();
    span.record("client", tracing::field::display(origin.client));
    span.record("via", tracing::field::display(peer));
    let Some(permit) = per_client.try_acquire(origin.client.ip()) else {
        warn!(
            event = "limit_exceeded",
            limit = "max_connections_per_client",
            "connection refused"
        );
        refuse_busy(client, bound.config.tls, bound.config.protocol).await;
        return None;
    };
    Some((client, origin, permit))
}

/// Over the connection cap: a plaintext client gets the protocol's temporary failure.
async fn refuse_busy(mut client: TcpStream, tls: TlsMode, protocol: Protocol) {
    if tls == TlsMode::Starttls {
        let reply: &[u8] = match protocol {
            Protocol::Smtp => b"421 4.3.2 Too many connections, try again later\r\n",
            Protocol::Imap => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
            Protocol::Pop3 => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        };
        let _ = client.write_all(reply).await;
    }
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn per_client_permits_are_capped_and_freed_on_drop() {
        let table = Arc::new(PerClient {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let a = "2001:db8::1".parse().unwrap();
        let b = "2001:db8::2".parse().unwrap();
        let first = table.try_acquire(a).unwrap();
        let _second = table.try_acquire(b).unwrap();
        assert!(table.try_acquire(a).is_none(), "same /64");
        assert!(table.try_acquire("192.0.2.1".parse().unwrap()).is_some());
        drop(first);
        assert!(table.try_acquire(a).is_some());
    }
}
