//! The outbound listener: where the legacy MTA hands over its mail (its relayhost),
//! plaintext on the local link. Only clients of `relay_networks` may relay; anyone else
//! gets `554` in place of a greeting (RFC 5321 §3.1), so that mailmoat is never an open
//! relay (ARCHITECTURE.md §11).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span};

use crate::config::{Config, OutboundConfig, Protocol};
use crate::metrics::ListenerMetrics;
use crate::outbound::dns::Resolver;
use crate::outbound::driver::{self, Context};
use crate::outbound::mta_sts::{Fetcher, Store, store};
use crate::outbound::{mx_tls, plan};
use crate::proto::outbound::session;
use crate::telemetry::security_event;

/// The reply to a client outside `relay_networks`, in place of a greeting.
const NOT_A_RELAY_CLIENT: &[u8] =
    b"554 5.7.1 This host relays only for its configured networks\r\n";
/// The reply when every session slot is taken.
const TOO_BUSY: &[u8] = b"421 4.3.2 Too many connections, try again later\r\n";
/// How long an MTA-STS policy fetch may take (RFC 8461 §3.3 suggests a minute at most).
const MTA_STS_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the outbound listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("outbound: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("outbound: trust anchors: {0}")]
    TrustAnchors(#[from] mx_tls::Error),
    #[error("outbound: MTA-STS cache: {0}")]
    MtaSts(String),
}

/// The running outbound listener.
pub struct Outbound {
    local: SocketAddr,
    stop: watch::Sender<bool>,
    sessions: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
}

impl Outbound {
    /// Binds the outbound listener of `config` and starts accepting.
    pub async fn bind(outbound: &OutboundConfig, config: &Config) -> Result<Outbound, Error> {
        let context = Arc::new(context(outbound, config)?);
        let socket = TcpListener::bind(outbound.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: outbound.listen,
                source,
            })?;
        let local = socket.local_addr().unwrap_or(outbound.listen);
        let (stop, stop_rx) = watch::channel(false);
        let sessions = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(config.limits.max_connections));
        info!(addr = %local, "outbound relay listening");
        let accept = tokio::spawn(accept_loop(
            socket,
            Arc::clone(&context),
            outbound.relay_networks.clone(),
            slots,
            sessions.clone(),
            stop_rx,
        ));
        Ok(Outbound {
            local,
            stop,
            sessions,
            accept,
        })
    }

    /// The address it is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting and waits up to `grace` for the sessions in flight: each waits
    /// for its MX's reply, so that no message is left half-relayed.
    pub async fn shut_down(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        self.sessions.close();
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("outbound sessions still running at the end of the grace period");
        }
    }
}

/// Everything the sessions share, from the configuration.
fn context(outbound: &OutboundConfig, config: &Config) -> Result<Context, Error> {
    context_with_store(outbound, config, |dir| Store::open(dir))
}

/// [`context`], with the MTA-STS cache that `open_store` gives for
/// `outbound.mta_sts_cache_dir` (when it is set). `mailmoat explain --domain` gives the
/// plan a scratch copy of the domain's cache entry, so that it runs the relay's own
/// settings, trust anchors and fetcher and leaves the real cache as it was.
pub(crate) fn context_with_store(
    outbound: &OutboundConfig,
    config: &Config,
    open_store: impl FnOnce(&Path) -> Result<Store, store::Error>,
) -> Result<Context, Error> {
    let system = Path::new(mx_tls::SYSTEM_CA_BUNDLE);
    let roots = mx_tls::trust_anchors(
        system.exists().then_some(system),
        outbound.extra_ca_file.as_deref(),
    )?;
    let roots = Arc::new(roots);
    let mta_sts = match &outbound.mta_sts_cache_dir {
        None => None,
        Some(dir) => Some(plan::MtaSts {
            store: open_store(dir).map_err(|err| Error::MtaSts(err.to_string()))?,
            fetcher: Fetcher::new((*roots).clone(), MTA_STS_FETCH_TIMEOUT)
                .map_err(|err| Error::MtaSts(err.to_string()))?,
        }),
    };
    Ok(Context {
        session: session::Config {
            hostname: outbound.hostname.clone(),
            max_message_size: outbound.max_message_size,
            limits: crate::proto::Limits {
                max_line_len: config.limits.max_line_len,
                max_held_bytes: crate::inbound::listener::MAX_HELD_BYTES,
                max_plaintext_commands: config.limits.max_plaintext_commands,
                max_errors: config.limits.max_errors,
            },
        },
        resolver: Resolver::new(outbound.resolver),
        plan: plan::Settings {
            floor: outbound.tls_floor,
            per_domain: outbound
                .domain_tls_floor
                .iter()
                .map(|(domain, floor)| (domain.clone(), *floor))
                .collect(),
            smtp_port: outbound.mx_port,
            mta_sts,
        },
        roots,
        provider: crate::tls::provider(),
        source_address: outbound.source_address,
        client_idle: config.timeouts.idle.max(Duration::from_secs(300)),
        client_data: config.timeouts.data,
        metrics: ListenerMetrics::new("outbound", Protocol::Smtp),
        starttls_stripping: outbound.starttls_stripping,
        offered_starttls: driver::StarttlsMemory::default(),
    })
}

async fn accept_loop(
    socket: TcpListener,
    context: Arc<Context>,
    relay_networks: Vec<crate::inbound::identity::Cidr>,
    slots: Arc<Semaphore>,
    sessions: TaskTracker,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                error!(%err, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        context.metrics.connection_accepted();
        if !relay_networks.iter().any(|net| net.contains(peer.ip())) {
            security_event!(
                context.metrics,
                warn,
                "relay_refused",
                client = %peer,
                "client outside relay_networks refused"
            );
            tokio::spawn(refuse(client, NOT_A_RELAY_CLIENT));
            continue;
        }
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(refuse(client, TOO_BUSY));
            continue;
        };
        let context = Arc::clone(&context);
        let span = info_span!("outbound", client = %peer);
        sessions.spawn(
            async move {
                let _active = context.metrics.session_started();
                driver::serve(client, &context).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn refuse(mut client: TcpStream, reply: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = client.write_all(reply).await;
        let _ = client.shutdown().await;
    })
    .await;
}
