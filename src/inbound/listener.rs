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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, ListenerConfig, Protocol, TlsMode};
use crate::inbound::driver::{self, ConnectionSettings};
use crate::inbound::identity::{self, Origin};
use crate::inbound::upstream;
use crate::metrics::ListenerMetrics;
use crate::policy::UserHasher;
use crate::proto::{self, imap, pop3, smtp};
use crate::{telemetry, tls};

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
pub enum SessionConfig {
    Smtp(smtp::Config),
    Imap(imap::Config),
    Pop3(pop3::Config),
}

impl SessionConfig {
    /// The protocol's temporary failure when the upstream cannot be reached.
    fn unavailable(&self) -> &'static [u8] {
        match self {
            SessionConfig::Smtp(_) => smtp::UNAVAILABLE,
            SessionConfig::Imap(_) => imap::UNAVAILABLE,
            SessionConfig::Pop3(_) => pop3::UNAVAILABLE,
        }
    }
}

/// What a listener's new connections are served with; replaced whole on reload, while
/// sessions in flight keep the one they started with.
struct ListenerState {
    config: ListenerConfig,
    settings: ConnectionSettings,
    session: SessionConfig,
}

/// A listener accepting in its own task.
struct Running {
    name: String,
    local: SocketAddr,
    state: watch::Sender<Arc<ListenerState>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What every listener's connections share, across reloads.
struct Shared {
    connections: Arc<Semaphore>,
    cap: Mutex<ConnectionCap>,
    per_client: Arc<PerClient>,
    /// Every session task, so that shutdown can wait for them.
    sessions: TaskTracker,
}

/// `limits.max_connections`, and how many permits `connections` holds in all (free or
/// in use): more than `max` after a reload lowered it while sessions were open.
struct ConnectionCap {
    max: usize,
    permits: usize,
}

/// Every listener bound and accepting.
pub struct Server {
    listeners: Vec<Running>,
    shared: Arc<Shared>,
    draining: watch::Sender<bool>,
    user_hasher: UserHasher,
    user_hash_key: Option<String>,
    shutdown_grace: Duration,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Listeners that started accepting, by name.
    pub added: Vec<String>,
    /// Listeners that stopped accepting (their sessions carry on), by name.
    pub removed: Vec<String>,
    /// Listeners whose new connections now get the new settings and certificates.
    pub updated: Vec<String>,
}

/// Connections open per client address, all listeners together.
#[derive(Debug)]
struct PerClient {
    max: AtomicUsize,
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
        if *count >= self.max.load(Ordering::Relaxed) {
            if *count == 0 {
                open.remove(&key);
            }
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

/// Builds what each listener of `config` serves new connections with: certificates are
/// loaded here, so a bad one fails before anything changes.
fn prepare(
    config: &Config,
    user_hasher: &UserHasher,
    draining: &watch::Receiver<bool>,
) -> Result<Vec<ListenerState>, Error> {
    let provider = tls::provider();
    let resolver = Arc::new(tls::SniResolver::load(&config.tls, &provider)?);
    let mut states = Vec::new();
    for listener in &config.listeners {
        let server_config = tls::server_config(
            &config.tls,
            listener.protocol,
            Arc::clone(&resolver),
            Arc::clone(&provider),
        )?;
        states.push(ListenerState {
            config: listener.clone(),
            settings: ConnectionSettings {
                tls_mode: listener.tls,
                tls: server_config,
                alpn: listener.protocol.alpn_id(),
                timeouts: config.timeouts.clone(),
                draining: draining.clone(),
                metrics: ListenerMetrics::new(&listener.name, listener.protocol),
            },
            session: session_config(config, listener, user_hasher),
        });
    }
    Ok(states)
}

/// The session settings of `listener`: also what `mailmoat explain` runs.
pub fn session_config(
    config: &Config,
    listener: &ListenerConfig,
    user_hasher: &UserHasher,
) -> SessionConfig {
    let limits = &config.limits;
    let shared = proto::Limits {
        max_line_len: limits.max_line_len,
        max_held_bytes: MAX_HELD_BYTES,
        max_plaintext_commands: limits.max_plaintext_commands,
        max_errors: limits.max_errors,
    };
    let user_hasher = user_hasher.clone();
    match listener.protocol {
        Protocol::Smtp => SessionConfig::Smtp(smtp::Config {
            policy: listener.policy,
            bare_newlines: listener.bare_newlines.unwrap_or_default(),
            limits: shared,
            user_hasher,
        }),
        Protocol::Imap => SessionConfig::Imap(imap::Config {
            max_literal_len: limits.max_literal_len,
            limits: shared,
            user_hasher,
        }),
        Protocol::Pop3 => SessionConfig::Pop3(pop3::Config {
            limits: shared,
            user_hasher,
        }),
    }
}

/// Connections the kernel may queue before `accept`. Linux's usual cap (somaxconn) is
/// 4096; tokio's default of 1024 overflowed under a burst of 1,000 concurrent clients,
/// and a full queue with SYN cookies loses connections silently.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind_socket(listener: &ListenerConfig) -> Result<TcpListener, Error> {
    let bind = || -> io::Result<TcpListener> {
        let socket = match listener.listen {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // A restart must not wait for the old connections' TIME_WAIT.
        socket.set_reuseaddr(true)?;
        if listener.reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(listener.listen)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| Error::Bind {
        name: listener.name.clone(),
        addr: listener.listen,
        source,
    })
}

impl Server {
    /// Loads certificates, binds every listener of a validated config and starts
    /// accepting.
    pub async fn bind(config: &Config) -> Result<Server, Error> {
        let user_hasher = hasher_for(config.user_hash_key.as_deref());
        let (draining, draining_rx) = watch::channel(false);
        let states = prepare(config, &user_hasher, &draining_rx)?;
        let mut sockets = Vec::new();
        for state in &states {
            sockets.push(bind_socket(&state.config).await?);
        }
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            cap: Mutex::new(ConnectionCap {
                max: config.limits.max_connections,
                permits: config.limits.max_connections,
            }),
            per_client: Arc::new(PerClient {
                max: AtomicUsize::new(config.limits.max_connections_per_client),
                open: Mutex::new(HashMap::new()),
            }),
            sessions: TaskTracker::new(),
        });
        let listeners = states
            .into_iter()
            .zip(sockets)
            .map(|(state, socket)| start(state, socket, &shared))
            .collect();
        Ok(Server {
            listeners,
            shared,
            draining,
            user_hasher,
            user_hash_key: config.user_hash_key.clone(),
            shutdown_grace: config.timeouts.shutdown_grace,
        })
    }

    /// The address each listener is bound to, by name (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.name.clone(), l.local))
            .collect()
    }

    /// Swaps in a new validated config (SIGHUP): certificates, settings and limits for new
    /// connections; listeners added or removed, matched by listen address. Everything is
    /// prepared (certificates loaded, new ports bound) before anything changes, so on an
    /// error the running config stays whole. Sessions in flight are untouched.
    pub async fn reload(&mut self, config: &Config) -> Result<Reloaded, Error> {
        // A random key (no key configured) is kept, so hashes still join; the new one is
        // taken only if the whole reload goes through.
        let user_hasher = if config.user_hash_key == self.user_hash_key {
            self.user_hasher.clone()
        } else {
            hasher_for(config.user_hash_key.as_deref())
        };
        let states = prepare(config, &user_hasher, &self.draining.subscribe())?;
        let mut fresh = Vec::new();
        for state in &states {
            if !self
                .listeners
                .iter()
                .any(|l| l.local == state.config.listen)
                && !fresh.iter().any(|(addr, _)| *addr == state.config.listen)
            {
                fresh.push((state.config.listen, bind_socket(&state.config).await?));
            }
        }

        // Nothing can fail from here on.
        self.user_hasher = user_hasher;
        self.user_hash_key = config.user_hash_key.clone();
        let mut reloaded = Reloaded::default();
        let mut kept = Vec::new();
        for state in states {
            let listen = state.config.listen;
            let name = state.config.name.clone();
            if let Some(index) = self.listeners.iter().position(|l| l.local == listen) {
                let running = self.listeners.swap_remove(index);
                running.state.send_replace(Arc::new(state));
                kept.push(Running {
                    name: name.clone(),
                    ..running
                });
                reloaded.updated.push(name);
            } else if let Some(index) = fresh.iter().position(|(addr, _)| *addr == listen) {
                let (_, socket) = fresh.swap_remove(index);
                kept.push(start(state, socket, &self.shared));
                reloaded.added.push(name);
            }
        }
        for running in std::mem::replace(&mut self.listeners, kept) {
            reloaded.removed.push(running.name.clone());
            running.stop_accepting().await;
        }
        self.resize_limits(&config.limits);
        self.shutdown_grace = config.timeouts.shutdown_grace;
        Ok(reloaded)
    }

    fn resize_limits(&self, limits: &crate::config::Limits) {
        let shared = &self.shared;
        shared
            .per_client
            .max
            .store(limits.max_connections_per_client, Ordering::Relaxed);
        let mut cap = shared.cap.lock().unwrap_or_else(|e| e.into_inner());
        cap.max = limits.max_connections;
        if cap.max > cap.permits {
            shared.connections.add_permits(cap.max - cap.permits);
            cap.permits = cap.max;
        } else {
            // Only free places can be withdrawn now; the others are withdrawn as the
            // sessions holding them end (see `release`).
            cap.permits -= shared.connections.forget_permits(cap.permits - cap.max);
            if cap.permits > cap.max {
                warn!(
                    over = cap.permits - cap.max,
                    "max_connections lowered below the sessions open: it takes effect as they end"
                );
            }
        }
    }

    /// Accepts until `shutdown` turns true, then shuts down (see [`Server::shut_down`]).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let _ = shutdown.wait_for(|stop| *stop).await;
        self.shut_down().await;
    }

    /// SIGTERM (ARCHITECTURE.md §8): stops accepting, tells every session to say its protocol's
    /// goodbye at its next command boundary, and waits for them for the grace period.
    pub async fn shut_down(self) {
        for running in self.listeners {
            running.stop_accepting().await;
        }
        let _ = self.draining.send(true);
        let sessions = &self.shared.sessions;
        sessions.close();
        info!(sessions = sessions.len(), grace = ?self.shutdown_grace, "draining");
        if tokio::time::timeout(self.shutdown_grace, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = sessions.len(),
                "grace period over: closing the sessions still open"
            );
        } else {
            info!("drained");
        }
    }
}

fn hasher_for(key: Option<&str>) -> UserHasher {
    key.map_or_else(UserHasher::random, |key| UserHasher::new(key.as_bytes()))
}

impl Running {
    /// Stops the accept loop and closes the listening socket.
    async fn stop_accepting(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        info!(listener = %self.name, addr = %self.local, "stopped listening");
    }
}

/// Starts accepting on `socket`.
fn start(state: ListenerState, socket: TcpListener, shared: &Arc<Shared>) -> Running {
    let name = state.config.name.clone();
    let local = socket.local_addr().unwrap_or(state.config.listen);
    let (state, state_rx) = watch::channel(Arc::new(state));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(socket, state_rx, Arc::clone(shared), stop_rx));
    Running {
        name,
        local,
        state,
        stop,
        task,
    }
}

/// Client bytes a session may hold unprocessed (pipelined behind a command whose reply
/// is awaited) before the driver stops reading the client.
pub(crate) const MAX_HELD_BYTES: usize = 64 * 1024;

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
    socket: TcpListener,
    state: watch::Receiver<Arc<ListenerState>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    {
        let current = state.borrow();
        info!(listener = %current.config.name, addr = ?socket.local_addr().ok(), protocol = ?current.config.protocol, tls = ?current.config.tls, "listening");
    }
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let current = Arc::clone(&state.borrow());
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                error!(%err, listener = %current.config.name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = &current.settings.metrics;
        metrics.connection_accepted();
        let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
            refuse(client, peer, "max_connections", &current);
            continue;
        };
        // Behind a load balancer every connection comes from the balancer's address:
        // such clients are counted by the address their PROXY header names, once read.
        let from_balancer = current.config.is_balancer(peer.ip());
        let client_permit = if from_balancer {
            None
        } else {
            let Some(client_permit) = shared.per_client.try_acquire(peer.ip()) else {
                refuse(client, peer, "max_connections_per_client", &current);
                continue;
            };
            Some(client_permit)
        };
        let span = info_span!(
            "session",
            id = %session_id(),
            listener = %current.config.name,
            client = tracing::field::Empty,
            via = tracing::field::Empty,
            upstream_port = tracing::field::Empty,
        );
        if !from_balancer {
            span.record("client", tracing::field::display(peer));
        }
        let shared_by_session = Arc::clone(&shared);
        shared.sessions.spawn(
            async move {
                let identified =
                    identify(client, peer, client_permit, &current, &shared_by_session).await;
                if let Some((client, origin, client_permit)) = identified {
                    serve(client, peer, &origin, &current).await;
                    drop(client_permit);
                }
                release(permit, &shared_by_session);
            }
            .instrument(span),
        );
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
    state: &ListenerState,
    shared: &Shared,
) -> Option<(TcpStream, Origin, ClientPermit)> {
    let local = client.local_addr().unwrap_or(state.config.listen);
    let direct = Origin::direct(peer, local);
    if let Some(permit) = client_permit {
        return Some((client, direct, permit));
    }
    let deadline = state.settings.timeouts.tls_handshake;
    let origin = match identity::read_header(&mut client, direct, deadline).await {
        Ok(origin) => origin,
        Err(err) => {
            tracing::Span::current().record("client", tracing::field::display(peer));
            telemetry::security_event!(
                &state.settings.metrics,
                warn,
                "proxy_protocol_error",
                reason = err.reason(),
                %err,
                "connection closed"
            );
            return None;
        }
    };
    let span = tracing::Span::current();
    span.record("client", tracing::field::display(origin.client));
    span.record("via", tracing::field::display(peer));
    let Some(permit) = shared.per_client.try_acquire(origin.client.ip()) else {
        telemetry::connection_refused(
            &state.settings.metrics,
            "max_connections_per_client",
            origin.client,
        );
        refuse_busy(client, state.config.tls, state.config.protocol).await;
        return None;
    };
    Some((client, origin, permit))
}

/// Returns a connection place, unless a reload lowered the cap below the sessions open:
/// then the place is withdrawn instead.
fn release(permit: tokio::sync::OwnedSemaphorePermit, shared: &Shared) {
    let mut cap = shared.cap.lock().unwrap_or_else(|e| e.into_inner());
    if cap.permits > cap.max {
        permit.forget();
        cap.permits -= 1;
    }
}

async fn serve(client: TcpStream, peer: SocketAddr, origin: &Origin, state: &ListenerState) {
    // A balancer's health check (PROXY LOCAL or UNKNOWN) names no client: it is never
    // exempt, even if an exempt network covers the balancer.
    let config = &state.config;
    let unnamed = origin.client.ip() == peer.ip().to_canonical() && config.is_balancer(peer.ip());
    let upstream = &upstream::Route::for_listener(config, origin);
    let settings = &state.settings;
    let unavailable = state.session.unavailable();
    if !unnamed && config.is_exempt(origin.client.ip()) {
        let session = crate::proto::exempt::Session::new();
        return driver::serve(client, upstream, settings, session, unavailable).await;
    }
    match &state.session {
        SessionConfig::Smtp(smtp_config) => {
            let mut session = smtp::Session::new(smtp_config.clone(), false);
            if config.xclient {
                session = session.with_xclient(smtp::xclient::Identity {
                    client: origin.client,
                    destination: origin.destination,
                });
            }
            driver::serve(client, upstream, settings, session, unavailable).await
        }
        SessionConfig::Imap(imap_config) => {
            let session = imap::Session::new(imap_config.clone());
            driver::serve(client, upstream, settings, session, unavailable).await
        }
        SessionConfig::Pop3(pop3_config) => {
            let session = pop3::Session::new(pop3_config.clone());
            driver::serve(client, upstream, settings, session, unavailable).await
        }
    }
}

/// Logs and counts a connection over a cap, and refuses it in the background.
fn refuse(client: TcpStream, peer: SocketAddr, limit: &'static str, state: &ListenerState) {
    telemetry::connection_refused(&state.settings.metrics, limit, peer);
    tokio::spawn(refuse_busy(client, state.config.tls, state.config.protocol));
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

    /// Every session's task holds this future for its whole life, idle or not: its size
    /// is part of the 12 KiB an idle TLS session may cost (issue 7, `scripts/bench.sh`
    /// measures 11.7). 2,344 bytes in a debug build, 2,272 in a release build. Keeping
    /// a 256-byte array across an await once made it 2,768 and an idle session 0.45 KiB
    /// larger; look for what the change keeps alive across an `.await`.
    #[test]
    fn a_session_task_stays_small_enough_for_the_idle_memory_target() {
        fn future_size<Fut>(
            _: impl FnOnce(TcpStream, SocketAddr, &'static Origin, &'static ListenerState) -> Fut,
        ) -> usize {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(serve);
        assert!(size <= 2_560, "a session's future is {size} bytes");
    }

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
            max: AtomicUsize::new(2),
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
