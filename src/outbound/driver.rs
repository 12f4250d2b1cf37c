//! Runs the outbound relay's session ([`session::Session`]) on real streams: the legacy
//! MTA's connection, the domain's delivery plan ([`plan`]: DNS, DANE, MTA-STS), the MX
//! connection and its client TLS ([`mx_tls`]). Never parses: every byte either way is
//! the session's (ARCHITECTURE.md §11).
//!
//! The I/O the session asks for (find an MX, start TLS with it, give it up for the next)
//! is awaited where the action is carried out: the session waits for its result anyway,
//! and the legacy MTA waits for the reply that depends on it.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;
use tracing::info;

use crate::config::StrippingResponse;
use crate::inbound::driver::{within, write_parts};
use crate::inbound::read_buffers;
use crate::metrics::ListenerMetrics;
use crate::outbound::dns::Resolver;
use crate::outbound::mta_sts::Mode;
use crate::outbound::mx_tls::{self, TlsReport};
use crate::outbound::plan::{self, Candidate, Policy};
use crate::proto::Event;
use crate::proto::outbound::session::{
    self, Action, MxAttempt, MxFailure, MxTlsFailure, Phase, Session, TlsDetail, TlsRequirement,
};
use crate::telemetry::{self, security_event};

/// What every session of the outbound listener shares.
pub struct Context {
    /// The session's settings.
    pub session: session::Config,
    /// The validating resolver.
    pub resolver: Resolver,
    /// The TLS policy's settings (floors, MTA-STS, the MX port).
    pub plan: plan::Settings,
    /// Trust anchors for PKIX checks.
    pub roots: Arc<RootCertStore>,
    /// The process's crypto provider.
    pub provider: Arc<CryptoProvider>,
    /// The local address connections to MXes come from.
    pub source_address: Option<IpAddr>,
    /// Deadlines on the legacy MTA's side.
    pub client_idle: Duration,
    /// Deadline inside a message body from the legacy MTA.
    pub client_data: Duration,
    /// The listener's metrics.
    pub metrics: ListenerMetrics,
    /// What a suspected STARTTLS stripping gets.
    pub starttls_stripping: StrippingResponse,
    /// The MX hosts seen offering STARTTLS.
    pub offered_starttls: StarttlsMemory,
}

/// The MX hosts that offered STARTTLS, so that one that stops offering it is noticed
/// (a suspected stripping attack, ARCHITECTURE.md §11). In memory, for the process's
/// life; bounded: when full it starts over, which forgets rather than grows.
#[derive(Debug, Default)]
pub struct StarttlsMemory(std::sync::Mutex<std::collections::HashSet<String>>);

/// Most MX hosts remembered.
const MAX_REMEMBERED_MX_HOSTS: usize = 100_000;

impl StarttlsMemory {
    /// `host` offered STARTTLS.
    pub fn remember(&self, host: &str) {
        let mut hosts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.len() >= MAX_REMEMBERED_MX_HOSTS && !hosts.contains(host) {
            hosts.clear();
        }
        hosts.insert(host.to_ascii_lowercase());
    }

    /// Whether `host` was seen offering STARTTLS.
    pub fn offered_before(&self, host: &str) -> bool {
        let hosts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        hosts.contains(&host.to_ascii_lowercase())
    }
}

/// What a connection to an MX must get: its policy's requirement, raised to `Required`
/// for an MX that offered STARTTLS before when stripping is to be deferred.
fn tls_requirement(
    policy_requires: bool,
    offered_before: bool,
    stripping: StrippingResponse,
) -> TlsRequirement {
    if policy_requires || (offered_before && stripping == StrippingResponse::Defer) {
        TlsRequirement::Required
    } else {
        TlsRequirement::Opportunistic
    }
}

/// How long a TCP connection to one MX address may take before the next is tried.
const MX_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The TLS handshake with an MX.
const MX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// An MX's reply to a command: RFC 5321 §4.5.3.2 asks at least 5 minutes of a client
/// (2 for the 354 to DATA); one value keeps the legacy MTA's own timeouts in front.
const MX_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The MX's reply to the end of data: §4.5.3.2.6, 10 minutes.
const MX_FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the whole search for an MX (DNS, MTA-STS fetch, connections) may take.
const PLAN_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes to either side: a peer that takes nothing for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(300);

type MxStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The MX side of a session: what is left to try, and the connection in use.
#[derive(Default)]
struct MxSide {
    /// Addresses still to try, with their host.
    to_try: VecDeque<(Arc<Candidate>, SocketAddr)>,
    /// The host of the current connection.
    current: Option<Arc<Candidate>>,
    stream: Option<MxStream>,
    /// The TLS the current connection got, for the delivery event.
    tls: Option<TlsReport>,
    /// Queued for the MX.
    out: Vec<Bytes>,
    /// The recipient domain, for events about the search.
    domain: String,
    /// Why the last MX given up was given up.
    last_failure: Option<MxFailure>,
}

/// Serves one connection of the legacy MTA, start to end.
pub async fn serve(mut client: TcpStream, ctx: &Context) {
    let _ = client.set_nodelay(true);
    let mut session = Session::new(ctx.session.clone());
    let mut mx = MxSide::default();
    if let Err(err) = run(&mut session, &mut client, &mut mx, ctx).await {
        info!(%err, "outbound session ended with an i/o error");
    }
    if let Some(stream) = mx.stream.as_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
    }
    security_event!(
        ctx.metrics,
        info,
        "session_end",
        commands = %session.summary(),
        "outbound session end"
    );
}

async fn run(
    session: &mut Session,
    client: &mut TcpStream,
    mx: &mut MxSide,
    ctx: &Context,
) -> io::Result<()> {
    let mut client_out: Vec<Bytes> = Vec::new();
    loop {
        while let Some(action) = session.next_action() {
            match action {
                Action::ToClient(bytes) => client_out.push(bytes),
                Action::ToMx(bytes) => mx.out.push(bytes),
                Action::Event(event) => record(event, mx, ctx),
                Action::OpenMx { domain } => {
                    write_all(client, &mut client_out).await?;
                    mx.domain = domain.to_string();
                    open(session, mx, &domain, ctx).await;
                }
                Action::StartMxTls => {
                    if let Some(candidate) = &mx.current {
                        ctx.offered_starttls.remember(&candidate.host);
                    }
                    start_tls(session, mx, ctx).await;
                }
                Action::NextMx { failure } => {
                    // The session logged it (`outbound_mx_failed`).
                    if failure == MxFailure::StarttlsNotOffered {
                        suspect_stripping(mx, ctx);
                    }
                    close_mx(mx).await;
                    mx.last_failure = Some(failure);
                    connect_next(session, mx, ctx).await;
                }
                Action::CloseMx => {
                    close_mx(mx).await;
                    mx.to_try.clear();
                }
                Action::Close => {
                    write_all(client, &mut client_out).await?;
                    let _ = client.shutdown().await;
                    return Ok(());
                }
            }
        }
        write_all(client, &mut client_out).await?;
        if let Some(stream) = mx.stream.as_mut()
            && let Err(err) = write_all(stream, &mut mx.out).await
        {
            info!(%err, "mx write failed");
            mx.out.clear();
            session.on_mx_eof();
            continue;
        }
        mx.out.clear();
        if session.on_output_written() {
            continue;
        }
        wait(session, client, mx, ctx).await;
    }
}

/// Waits for the next input (a read from either side, or the phase's deadline) and
/// hands it to the session. Reads go through the thread's read buffer and are handed on
/// within the same poll, as the inbound driver's are: a waiting session holds no buffer.
async fn wait(session: &mut Session, client: &mut TcpStream, mx: &mut MxSide, ctx: &Context) {
    let deadline = match session.phase() {
        Phase::Command => ctx.client_idle,
        Phase::Data => ctx.client_data,
        Phase::MxFinalReply => MX_FINAL_REPLY_TIMEOUT,
        Phase::MxReply | Phase::MxConnect | Phase::MxHandshake => MX_REPLY_TIMEOUT,
    };
    let wants_client = session.wants_client_data();
    let mut sleep = std::pin::pin!(tokio::time::sleep(deadline));
    std::future::poll_fn(|cx| {
        if wants_client
            && read_buffers::poll_read(client, cx, |_, read| match read {
                Ok([]) | Err(_) => session.on_client_eof(),
                Ok(data) => session.on_client_data(data),
            })
            .is_ready()
        {
            return Poll::Ready(());
        }
        if let Some(stream) = mx.stream.as_mut()
            && read_buffers::poll_read(stream, cx, |_, read| match read {
                Ok([]) | Err(_) => session.on_mx_eof(),
                Ok(data) => session.on_mx_data(data),
            })
            .is_ready()
        {
            return Poll::Ready(());
        }
        if sleep.as_mut().poll(cx).is_ready() {
            let limit = session.phase().timeout_limit();
            telemetry::record(&Event::LimitExceeded { limit }, &ctx.metrics);
            session.on_timeout();
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}

/// Plans the delivery to `domain` and connects to its first reachable MX.
async fn open(
    session: &mut Session,
    mx: &mut MxSide,
    domain: &crate::proto::outbound::envelope::Domain,
    ctx: &Context,
) {
    let planned = tokio::time::timeout(
        PLAN_TIMEOUT,
        plan::plan(domain, &ctx.resolver, &ctx.plan, SystemTime::now()),
    )
    .await;
    let plan = match planned {
        Ok(Ok(plan)) => plan,
        Ok(Err(failure)) => {
            security_event!(
                ctx.metrics,
                warn,
                "outbound_plan_failed",
                domain = %domain,
                result_type = failure.result_type.unwrap_or(""),
                detail = %failure.detail,
                "no usable mx"
            );
            return session.on_mx_unavailable(failure.reply);
        }
        Err(_) => return session.on_mx_unavailable(plan::DNS_FAILURE),
    };
    for note in &plan.notes {
        info!(domain = %domain, note = %note, "outbound plan");
    }
    mx.last_failure = None;
    mx.to_try = plan
        .candidates
        .into_iter()
        .flat_map(|candidate| {
            let candidate = Arc::new(candidate);
            let addrs = candidate.addrs.clone();
            addrs
                .into_iter()
                .map(move |addr| (Arc::clone(&candidate), addr))
        })
        .collect();
    connect_next(session, mx, ctx).await;
}

/// Connects to the next address left to try, or tells the session there is none.
async fn connect_next(session: &mut Session, mx: &mut MxSide, ctx: &Context) {
    while let Some((candidate, addr)) = mx.to_try.pop_front() {
        match tokio::time::timeout(MX_CONNECT_TIMEOUT, connect(addr, ctx.source_address)).await {
            Ok(Ok(stream)) => {
                let attempt = MxAttempt {
                    host: candidate.host.clone(),
                    tls: tls_requirement(
                        candidate.requirement.tls_required(),
                        ctx.offered_starttls.offered_before(&candidate.host),
                        ctx.starttls_stripping,
                    ),
                    policy: policy_name(candidate.policy),
                };
                mx.stream = Some(Either::Left(stream));
                mx.current = Some(candidate);
                mx.tls = None;
                return session.on_mx_connected(attempt);
            }
            Ok(Err(err)) => info!(mx = %candidate.host, %addr, %err, "mx connect failed"),
            Err(_) => info!(mx = %candidate.host, %addr, "mx connect timed out"),
        }
    }
    let last_was_tls = mx
        .last_failure
        .as_ref()
        .is_some_and(|failure| failure.rfc8460_result_type().is_some());
    session.on_mx_unavailable(no_mx_left(last_was_tls));
}

/// The reply when every address was tried and none took the transaction: the TLS
/// policy's when the last MX given up failed on TLS, else "unreachable" (an MX that
/// could not be reached at all says nothing about TLS). `explain --domain` says the same.
pub(crate) fn no_mx_left(last_was_tls: bool) -> &'static [u8] {
    if last_was_tls {
        session::MX_TLS_POLICY
    } else {
        session::MX_UNREACHABLE
    }
}

/// Connects to an MX address: from `source` when it is of the same family, Nagle off.
/// `explain --domain` connects the same way.
pub(crate) async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source
        && source.is_ipv4() == addr.is_ipv4()
    {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The TLS handshake with the MX, with the verifier its requirement names.
async fn start_tls(session: &mut Session, mx: &mut MxSide, ctx: &Context) {
    let failure = |detail: String| MxTlsFailure {
        result_type: "validation-failure",
        detail,
    };
    let (Some(Either::Left(tcp)), Some(candidate)) = (mx.stream.take(), mx.current.clone()) else {
        return session.on_mx_tls(Err(failure("no plaintext connection to upgrade".into())));
    };
    let client = match mx_tls::client_config(
        &candidate.requirement,
        &candidate.host,
        Arc::clone(&ctx.roots),
        Arc::clone(&ctx.provider),
    ) {
        Ok(client) => client,
        Err(err) => return session.on_mx_tls(Err(failure(err.to_string()))),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client.config));
    let handshake = connector.connect(client.server_name.clone(), tcp);
    match tokio::time::timeout(MX_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => {
            mx.tls = TlsReport::read(tls.get_ref().1, &client.verdict);
            mx.stream = Some(Either::Right(Box::new(tls)));
            session.on_mx_tls(Ok(()));
        }
        Ok(Err(err)) => {
            let result_type = client
                .verdict
                .failure()
                .map_or("validation-failure", |f| f.result_type);
            session.on_mx_tls(Err(MxTlsFailure {
                result_type,
                detail: err.to_string(),
            }));
        }
        Err(_) => session.on_mx_tls(Err(failure("handshake timed out".into()))),
    }
}

/// Writes what is queued for the MX (its QUIT) and closes the connection.
async fn close_mx(mx: &mut MxSide) {
    if let Some(mut stream) = mx.stream.take() {
        let _ = write_all(&mut stream, &mut mx.out).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
    }
    mx.out.clear();
    mx.tls = None;
}

/// The policy's name in events: a fixed set.
fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Dane => "dane",
        Policy::MtaSts {
            mode: Mode::Testing,
        } => "mta-sts-testing",
        Policy::MtaSts { .. } => "mta-sts",
        Policy::Floor(floor) => floor.as_str(),
    }
}

/// An MX without STARTTLS that offered it before: logged as a suspected stripping
/// attack (RFC 3207 §6, RFC 8460's `starttls-not-supported`).
fn suspect_stripping(mx: &MxSide, ctx: &Context) {
    let Some(candidate) = &mx.current else { return };
    if !ctx.offered_starttls.offered_before(&candidate.host) {
        return;
    }
    let response = match ctx.starttls_stripping {
        StrippingResponse::Log => "delivered as the policy allows",
        StrippingResponse::Defer => "deferred",
    };
    security_event!(
        ctx.metrics,
        warn,
        "starttls_stripping_suspected",
        domain = %mx.domain,
        mx = %candidate.host,
        response,
        "mx offered starttls before and no longer does"
    );
}

/// Logs and counts a session event; a delivery also names the TLS it crossed.
fn record(mut event: Event, mx: &MxSide, ctx: &Context) {
    if let Event::OutboundPlaintext(plaintext) = &event
        && plaintext.reason == "starttls_not_offered"
    {
        suspect_stripping(mx, ctx);
    }
    if let Event::OutboundDelivery(delivery) = &mut event
        && delivery.tls
    {
        delivery.tls_detail = mx.tls.as_ref().map(|tls| TlsDetail {
            version: format!("{:?}", tls.version),
            cipher: format!("{:?}", tls.cipher),
            verified: tls.verified,
            failure: tls.failure_result_type,
        });
    }
    telemetry::record(&event, &ctx.metrics);
}

/// Writes `parts` in order, in as few system calls as the stream takes them, and
/// flushes (through TLS, the records leave then), within [`WRITE_TIMEOUT`]; empties
/// `parts` either way.
async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    parts: &mut Vec<Bytes>,
) -> io::Result<()> {
    if parts.is_empty() {
        return Ok(());
    }
    let written = within(WRITE_TIMEOUT, async {
        write_parts(stream, parts).await?;
        stream.flush().await
    })
    .await;
    parts.clear();
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mx_that_offered_starttls_before_must_offer_it_again_when_stripping_is_deferred() {
        use StrippingResponse::{Defer, Log};
        use TlsRequirement::{Opportunistic, Required};
        let table = [
            // (policy requires TLS, offered before, response) -> requirement
            ((true, false, Log), Required),
            ((true, true, Defer), Required),
            ((false, false, Defer), Opportunistic),
            ((false, true, Log), Opportunistic),
            ((false, true, Defer), Required),
        ];
        for ((requires, before, response), expected) in table {
            assert_eq!(
                tls_requirement(requires, before, response),
                expected,
                "{requires} {before} {response:?}"
            );
        }
    }

    #[test]
    fn the_starttls_memory_ignores_case_and_stays_bounded() {
        let memory = StarttlsMemory::default();
        assert!(!memory.offered_before("mx.example.test"));
        memory.remember("MX.Example.test");
        assert!(memory.offered_before("mx.example.TEST"));
        for i in 0..MAX_REMEMBERED_MX_HOSTS {
            memory.remember(&format!("mx{i}.example.test"));
        }
        let held = memory.0.lock().unwrap().len();
        assert!(held <= MAX_REMEMBERED_MX_HOSTS, "{held}");
    }
}
