//! Runs a sans-I/O session on real streams: reads, feeds, carries out actions, upgrades
//! the client stream to TLS when the session says so, enforces the phase deadlines.
//! Never parses.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::info;

use crate::config::{Timeouts, TlsMode};
use crate::inbound::{read_buffers, upstream};
use crate::metrics::ListenerMetrics;
use crate::proto::{Action, Event, Phase, Session};
use crate::telemetry::{self, security_event};

/// What a connection needs from its listener.
#[derive(Clone)]
pub struct ConnectionSettings {
    /// How TLS starts on this listener.
    pub tls_mode: TlsMode,
    /// The TLS side.
    pub tls: Arc<ServerConfig>,
    /// The listener protocol's ALPN id.
    pub alpn: &'static [u8],
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Turns true when the server shuts down: sessions say goodbye at a command boundary.
    pub draining: watch::Receiver<bool>,
    /// The listener's metrics.
    pub metrics: ListenerMetrics,
}

/// A stream that yields `prefix` before reading from `inner`: the bytes a client sent
/// behind STARTTLS belong to the TLS handshake (ARCHITECTURE.md §4). Below a TLS stream
/// it also reads ahead: rustls asks for 4 KiB at a time, which would be one system call
/// per 4 KiB of a large message.
#[derive(Debug)]
pub struct Prefixed<S> {
    /// Bytes read (or replayed) but not yet taken: the prefix, then what the last read
    /// brought beyond what the reader above took. Its allocation is kept while bytes
    /// flow and given back when the socket is empty, so an idle session holds none.
    ahead: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed {
            ahead: BytesMut::from(&prefix[..]),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            if buf.remaining() >= read_buffers::READ_AHEAD_LEN {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.ahead.capacity() == 0 {
                // Not streaming (a handshake, a command): read through the thread's
                // read-ahead buffer and keep only what the reader above did not take,
                // so that a session allocates nothing for reads that fit.
                return read_buffers::poll_read_ahead(&mut this.inner, cx, |read| {
                    let data = read?;
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    this.ahead.extend_from_slice(&data[n..]);
                    Ok(())
                });
            }
            // Streaming: what was left over last time was served from this buffer; the
            // next read lands in it too, without a copy, until the socket runs dry.
            this.ahead.reserve(read_buffers::READ_AHEAD_LEN);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    this.ahead = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        // Nothing read is the end of the stream, and puts nothing.
        let n = this.ahead.len().min(buf.remaining());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    /// rustls hands over all its pending records at once: the server's first flight
    /// (ServerHello, ChangeCipherSpec, the encrypted rest) leaves in one system call.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Boxed: moved from the handshake to the command loop to the relay, a TLS stream
/// (1.2 KB) would otherwise take room in each of their futures at once.
type ClientTls = Box<TlsStream<Prefixed<TcpStream>>>;

/// How a run of the command loop ended.
enum Outcome<S> {
    Closed,
    StartTls { client: S, early: Bytes },
    Relay { client: S },
}

/// Counters for the session summary.
#[derive(Debug, Default)]
struct Traffic {
    from_client: u64,
    to_client: u64,
    tls: Option<(String, String)>,
}

impl Traffic {
    /// Counts for the session summary and the listener's `relayed_bytes` metric.
    fn read_from_client(&mut self, n: usize, context: &ConnectionSettings) {
        self.from_client += n as u64;
        let bytes = context.metrics.bytes();
        bytes.client_to_upstream.inc_by(n as u64);
    }

    fn sent_to_client(&mut self, n: usize, context: &ConnectionSettings) {
        self.to_client += n as u64;
        let bytes = context.metrics.bytes();
        bytes.upstream_to_client.inc_by(n as u64);
    }
}

/// Serves one client connection end to end.
///
/// `temporary_failure` is the protocol's reply when the upstream cannot be reached
/// (ARCHITECTURE.md §1.2).
pub async fn serve<P: Session>(
    client: TcpStream,
    upstream_addr: &upstream::Route,
    context: &ConnectionSettings,
    mut session: P,
    temporary_failure: &'static [u8],
) {
    let started = Instant::now();
    let _active = context.metrics.session_started();
    let mut traffic = Traffic::default();
    let result = serve_inner(
        client,
        upstream_addr,
        context,
        &mut session,
        temporary_failure,
        &mut traffic,
    )
    .await;
    if let Err(err) = &result {
        info!(%err, "session ended with an i/o error");
    }
    let (tls_version, tls_cipher) = traffic
        .tls
        .clone()
        .unwrap_or_else(|| ("none".into(), "none".into()));
    // Counted by the TLS state the session ended in: a STARTTLS listener's session that
    // never upgraded is `none`, like an implicit one whose handshake failed.
    context
        .metrics
        .session_ended(traffic.tls.is_some().then_some(context.tls_mode));
    security_event!(
        context.metrics,
        info,
        "session_end",
        commands = %session.summary(),
        bytes_in = traffic.from_client,
        bytes_out = traffic.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        tls = %tls_version,
        cipher = %tls_cipher,
        "session end"
    );
}

async fn serve_inner<P: Session>(
    client: TcpStream,
    upstream_addr: &upstream::Route,
    context: &ConnectionSettings,
    session: &mut P,
    temporary_failure: &'static [u8],
    traffic: &mut Traffic,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let upstream = match tokio::time::timeout(
        context.timeouts.upstream_connect,
        upstream::connect(upstream_addr),
    )
    .await
    {
        Ok(Ok(upstream)) => Some(upstream),
        Ok(Err(err)) => {
            security_event!(context.metrics, warn, "upstream_unavailable", upstream = %upstream_addr, %err, "upstream unavailable");
            None
        }
        Err(_) => {
            security_event!(context.metrics, warn, "upstream_unavailable", upstream = %upstream_addr, "upstream connect timed out");
            None
        }
    };
    if let Some(port) = upstream.as_ref().and_then(upstream::Stream::local_port) {
        // Joins this session with the upstream's own log lines.
        tracing::Span::current().record("upstream_port", port);
    }

    match context.tls_mode {
        TlsMode::Implicit => {
            // Boxed (here and after STARTTLS): the handshake's state, 3 KB, is then held
            // only while it runs, not for the whole life of every session's task.
            let Some(mut tls) = Box::pin(handshake(
                Prefixed::new(Bytes::new(), client),
                context,
                traffic,
            ))
            .await
            else {
                return Ok(());
            };
            match upstream {
                Some(mut upstream) => {
                    session.on_tls_established();
                    run_tls(session, tls, &mut upstream, context, traffic).await
                }
                None => say_goodbye(&mut tls, temporary_failure).await,
            }
        }
        TlsMode::Starttls => {
            let Some(mut upstream) = upstream else {
                let mut client = client;
                return say_goodbye(&mut client, temporary_failure).await;
            };
            match run(session, client, &mut upstream, context, traffic).await? {
                Outcome::Closed => Ok(()),
                Outcome::Relay { mut client } => {
                    relay(&mut client, &mut upstream, context, traffic).await
                }
                Outcome::StartTls { client, early } => {
                    let Some(tls) =
                        Box::pin(handshake(Prefixed::new(early, client), context, traffic)).await
                    else {
                        return Ok(());
                    };
                    session.on_tls_established();
                    run_tls(session, tls, &mut upstream, context, traffic).await
                }
            }
        }
    }
}

/// Writes `reply` (possibly empty), flushes and shuts the client down, within
/// [`GOODBYE_DEADLINE`].
async fn say_goodbye<S: AsyncWrite + Unpin>(client: &mut S, reply: &[u8]) -> io::Result<()> {
    within(GOODBYE_DEADLINE, async {
        client.write_all(reply).await?;
        client.flush().await?;
        client.shutdown().await
    })
    .await
}

/// How long a closing session waits for a client to take its last reply.
const GOODBYE_DEADLINE: Duration = Duration::from_secs(5);

/// `io` within `deadline`, else a `TimedOut` error. Every write, flush and shutdown of
/// the client has one: through TLS a write only fills rustls's buffer, so it is the
/// flush that waits for a client that does not read.
pub(crate) async fn within<T>(
    deadline: Duration,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(deadline, io)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn run_tls<P: Session>(
    session: &mut P,
    tls: ClientTls,
    upstream: &mut upstream::Stream,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
) -> io::Result<()> {
    match run(session, tls, upstream, context, traffic).await? {
        Outcome::Closed => Ok(()),
        Outcome::Relay { mut client } => relay(&mut client, upstream, context, traffic).await,
        Outcome::StartTls { .. } => Err(io::Error::other("STARTTLS inside TLS")),
    }
}

/// After login: bytes cross unchanged until both sides close or the idle deadline.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    upstream: &mut upstream::Stream,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
) -> io::Result<()> {
    let idle = context.timeouts.idle_after_login;
    let mut copied = crate::inbound::relay::Copied::default();
    let end =
        crate::inbound::relay::splice(client, upstream, idle, context.metrics.bytes(), &mut copied)
            .await;
    traffic.from_client += copied.from_client;
    traffic.to_client += copied.to_client;
    if let Ok(crate::inbound::relay::End::Idle) = end {
        let limit = "idle_after_login_timeout";
        telemetry::record(&Event::LimitExceeded { limit }, &context.metrics);
    }
    end.map(drop)
}

/// A fatal `no_application_protocol` alert (RFC 7301 §3.2), as a plaintext record.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("deadline expired")]
    Deadline,
    /// Debug-formatted: the ids are the client's bytes and must not inject log lines.
    #[error("client offered only foreign ALPN ids {0:?} (ALPACA)")]
    ForeignAlpn(Vec<String>),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The TLS handshake with its deadline; logs `tls_established` or `tls_handshake_failed`.
async fn handshake(
    stream: Prefixed<TcpStream>,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
) -> Option<ClientTls> {
    let started = Instant::now();
    let result = tokio::time::timeout(context.timeouts.tls_handshake, accept(stream, context))
        .await
        .unwrap_or(Err(HandshakeError::Deadline))
        .map(Box::new);
    match result {
        Ok(tls) => {
            let (_, connection) = tls.get_ref();
            let version = connection
                .protocol_version()
                .map_or("unknown".into(), |v| format!("{v:?}"));
            let cipher = connection
                .negotiated_cipher_suite()
                .map_or("unknown".into(), |s| format!("{:?}", s.suite()));
            let elapsed = started.elapsed();
            context.metrics.tls_handshake(elapsed);
            security_event!(
                context.metrics,
                info,
                "tls_established",
                version = %version,
                cipher = %cipher,
                sni = connection.server_name().unwrap_or(""),
                handshake_us = elapsed.as_micros() as u64,
                "tls established"
            );
            traffic.tls = Some((version, cipher));
            Some(tls)
        }
        Err(err) => {
            if let HandshakeError::Deadline = err {
                let limit = Phase::Handshake.timeout_limit();
                telemetry::record(&Event::LimitExceeded { limit }, &context.metrics);
            }
            security_event!(context.metrics, warn, "tls_handshake_failed", %err, "tls handshake failed");
            None
        }
    }
}

/// Reads the ClientHello, refuses a foreign ALPN list before any ServerHello, then
/// completes the handshake.
async fn accept(
    stream: Prefixed<TcpStream>,
    context: &ConnectionSettings,
) -> Result<TlsStream<Prefixed<TcpStream>>, HandshakeError> {
    let mut start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    // ALPACA: a client that names protocols, none of them ours, is talking to the wrong
    // service (RFC 7301 §3.2). No ALPN at all is fine: most mail clients send none.
    let foreign = start.client_hello().alpn().and_then(|mut offered| {
        let mut names = Vec::new();
        let ours = offered.any(|id| {
            // Enough to recognise the client in a log line, bounded whatever it sends.
            if names.len() < 8 {
                names.push(String::from_utf8_lossy(&id[..id.len().min(32)]).into_owned());
            }
            id == context.alpn
        });
        (!ours).then_some(names)
    });
    if let Some(offered) = foreign {
        let _ = start.io.write_all(&ALERT_NO_APPLICATION_PROTOCOL).await;
        let _ = start.io.shutdown().await;
        return Err(HandshakeError::ForeignAlpn(offered));
    }
    Ok(start.into_stream(Arc::clone(&context.tls)).await?)
}

fn deadline(phase: Phase, timeouts: &Timeouts) -> Duration {
    match phase {
        Phase::Greeting => timeouts.greeting,
        Phase::Command => timeouts.idle,
        Phase::Data => timeouts.data,
        Phase::Handshake => timeouts.tls_handshake,
    }
}

/// The client side of the command loop: the TCP stream before STARTTLS, TLS after.
trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    /// Puts as much of `bytes` as fits into the stream's own send buffer, without a
    /// system call, and says how much; the next flush sends it. Plain TCP has none.
    fn buffer(&mut self, _bytes: &[u8]) -> usize {
        0
    }

    /// Queues the end of the stream behind what is buffered (TLS: close_notify).
    fn buffer_close(&mut self) {}
}

impl ClientStream for TcpStream {}

/// Generic over the stream under TLS for the tests; the driver's is [`ClientTls`].
impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream for Box<TlsStream<S>> {
    fn buffer(&mut self, bytes: &[u8]) -> usize {
        // rustls takes what fits under its buffer limit; a write error cannot happen
        // before the flush, and would then show there.
        io::Write::write(&mut self.get_mut().1.writer(), bytes).unwrap_or(0)
    }

    fn buffer_close(&mut self) {
        self.get_mut().1.send_close_notify();
    }
}

/// Writes `parts` in order, as few system calls as the stream takes them in, and
/// empties it.
pub(crate) async fn write_parts<S: AsyncWrite + Unpin>(
    stream: &mut S,
    parts: &mut Vec<Bytes>,
) -> io::Result<()> {
    // An empty part (an IMAP literal of zero bytes) is no write: a vectored write of
    // nothing returns 0, which would read as a stream that takes nothing.
    parts.retain(|part| !part.is_empty());
    let mut first = 0;
    // Polled by hand so that the slices live only within a poll: kept across the wait,
    // they would make every session's task, idle ones too, larger by their size.
    std::future::poll_fn(|cx| {
        while first < parts.len() {
            let mut slices = [io::IoSlice::new(&[]); 16];
            let n = parts[first..]
                .iter()
                .zip(&mut slices)
                .map(|(part, slice)| *slice = io::IoSlice::new(part))
                .count();
            let mut written =
                std::task::ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
            }
            while written > 0 {
                let part = &mut parts[first];
                let taken = written.min(part.len());
                part.advance(taken);
                written -= taken;
                if part.is_empty() {
                    first += 1;
                }
            }
        }
        Poll::Ready(Ok::<(), io::Error>(()))
    })
    .await?;
    parts.clear();
    Ok(())
}

/// The command loop on one client stream, until the session closes or asks for TLS or
/// the relay. Each pass: carry out the session's actions, flush, then wait for the next
/// input (a read from either side, the shutdown signal, or the phase deadline) and hand
/// it to the session.
async fn run<P: Session, S: ClientStream>(
    session: &mut P,
    mut client: S,
    upstream: &mut upstream::Stream,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
) -> io::Result<Outcome<S>> {
    let mut waits = Waits::new(session.phase(), context);
    loop {
        if waits.drain.is_draining() {
            session.close_if_idle();
        }
        let Batch {
            to_upstream,
            moved,
            next,
        } = carry_out(session, &mut client, context, traffic).await?;
        match next {
            Next::Input => flush(&mut client, upstream, to_upstream, context).await?,
            Next::StartTls { early } => {
                flush(&mut client, upstream, to_upstream, context).await?;
                return Ok(Outcome::StartTls { client, early });
            }
            Next::Relay => {
                flush(&mut client, upstream, to_upstream, context).await?;
                within(context.timeouts.idle, upstream.flush()).await?;
                return Ok(Outcome::Relay { client });
            }
            Next::Close => {
                close(&mut client, upstream, to_upstream, context).await;
                return Ok(Outcome::Closed);
            }
        }
        waits.restart_deadline_if(moved, session.phase(), &context.timeouts);
        // Everything is written: a session that held input back for want of room for
        // its replies goes on with it before anything more is read.
        if session.on_output_written() {
            continue;
        }
        // Between commands a client may stay silent for long; inside a message body the
        // buffers are refilled at once, and giving them back would cost an allocation
        // per read.
        if waits.phase == Phase::Command {
            session.release_idle_memory();
        }
        match wait(session, &mut client, upstream, context, traffic, &mut waits).await {
            Woke::Read => {}
            Woke::Drain(true) => waits.drain = Drain::Draining,
            Woke::Drain(false) => waits.drain = Drain::Gone,
            Woke::Deadline => {
                let limit = session.phase().timeout_limit();
                telemetry::record(&Event::LimitExceeded { limit }, &context.metrics);
                session.on_timeout();
            }
        }
    }
}

/// What one batch of the session's actions left to do.
struct Batch {
    /// What the upstream gets from the batch, written in one system call: a pipelining
    /// client's commands (RFC 2920) as they came, not one per command.
    to_upstream: Vec<Bytes>,
    /// Whether the session moved something (a reply, a forwarded command or body
    /// bytes), which restarts the phase deadline.
    moved: bool,
    /// How the batch ended.
    next: Next,
}

/// How a batch of actions ended: with nothing more to do (wait for input), or with the
/// action that ends the loop on this stream (actions behind it are left queued).
enum Next {
    Input,
    StartTls { early: Bytes },
    Relay,
    Close,
}

/// Takes the session's actions until there are none or one ends the loop. Replies to
/// the client are written as they come (through TLS, into rustls's buffer, for the
/// flush); bytes for the upstream are gathered; events are logged.
async fn carry_out<P: Session, S: ClientStream>(
    session: &mut P,
    client: &mut S,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
) -> io::Result<Batch> {
    let mut batch = Batch {
        to_upstream: Vec::new(),
        moved: false,
        next: Next::Input,
    };
    while let Some(action) = session.next_action() {
        match action {
            Action::ToClient(bytes) => {
                // Through TLS, replies wait in rustls's buffer for the flush: one system
                // call for all of them. A client that never reads its replies is cut
                // off after the idle deadline.
                let buffered = client.buffer(&bytes);
                if buffered < bytes.len() {
                    within(context.timeouts.idle, client.write_all(&bytes[buffered..])).await?;
                }
                traffic.sent_to_client(bytes.len(), context);
                batch.moved = true;
            }
            Action::ToUpstream(bytes) => {
                batch.to_upstream.push(bytes);
                batch.moved = true;
            }
            Action::Event(event) => telemetry::record(&event, &context.metrics),
            Action::StartTls { early } => {
                batch.next = Next::StartTls { early };
                break;
            }
            Action::Relay => {
                batch.next = Next::Relay;
                break;
            }
            Action::Close => {
                batch.next = Next::Close;
                break;
            }
        }
    }
    Ok(batch)
}

/// The one flush after a batch, within the idle deadline (the write deadline). The
/// client's replies first: an upstream that fails or is slow to take its bytes does
/// not hold back, or lose, what is already answered. Then the upstream's bytes, in as
/// few system calls as it takes them.
///
/// The client is flushed on every pass, not only after replies: rustls may queue
/// records while reading (the alert that refuses a renegotiation, a KeyUpdate), and
/// only a flush sends them. With nothing queued a flush makes no system call.
async fn flush<S: ClientStream>(
    client: &mut S,
    upstream: &mut upstream::Stream,
    mut to_upstream: Vec<Bytes>,
    context: &ConnectionSettings,
) -> io::Result<()> {
    let write_deadline = context.timeouts.idle;
    within(write_deadline, client.flush()).await?;
    if !to_upstream.is_empty() {
        within(write_deadline, write_parts(upstream, &mut to_upstream)).await?;
    }
    // `to_upstream` is dropped here, not kept across the wait for input: an idle
    // session holds no buffer of its own.
    Ok(())
}

/// The session closes: the upstream gets what the last batch had for it, and the client
/// its goodbye even if the upstream cannot take those bytes. The session's last reply
/// was written by [`carry_out`]; through TLS it leaves with the close_notify behind it,
/// in one system call.
async fn close<S: ClientStream>(
    client: &mut S,
    upstream: &mut upstream::Stream,
    mut to_upstream: Vec<Bytes>,
    context: &ConnectionSettings,
) {
    let write_deadline = context.timeouts.idle;
    if let Err(err) = within(write_deadline, write_parts(upstream, &mut to_upstream)).await {
        info!(%err, "upstream write failed at close");
    }
    client.buffer_close();
    let _ = say_goodbye(client, &[]).await;
}

/// What the command loop waits on between batches.
struct Waits {
    /// The phase the deadline runs for, and when it passes. It restarts when the session
    /// moves something or changes phase, not on every read: a client trickling a command
    /// line byte by byte (slowloris) is cut off like a silent one.
    phase: Phase,
    deadline_at: tokio::time::Instant,
    drain: Drain,
    /// Which side is read first alternates, so that neither can starve the other.
    client_first: bool,
}

impl Waits {
    fn new(phase: Phase, context: &ConnectionSettings) -> Self {
        Waits {
            phase,
            deadline_at: tokio::time::Instant::now() + deadline(phase, &context.timeouts),
            drain: Drain::Listening(context.draining.clone()),
            client_first: false,
        }
    }

    fn restart_deadline_if(&mut self, moved: bool, phase: Phase, timeouts: &Timeouts) {
        if moved || phase != self.phase {
            self.phase = phase;
            self.deadline_at = tokio::time::Instant::now() + deadline(phase, timeouts);
        }
    }

    /// The two sides in the order this wait reads them.
    fn read_order(&mut self) -> [Side; 2] {
        self.client_first = !self.client_first;
        if self.client_first {
            [Side::Client, Side::Upstream]
        } else {
            [Side::Upstream, Side::Client]
        }
    }
}

/// What the session has heard of a shutdown.
enum Drain {
    /// Nothing yet: the loop listens for the signal.
    Listening(watch::Receiver<bool>),
    /// The server is shutting down: the session says its goodbye at the next command
    /// boundary (`close_if_idle`).
    Draining,
    /// The server is gone without a shutdown: nothing to wait for.
    Gone,
}

impl Drain {
    fn is_draining(&self) -> bool {
        matches!(self, Drain::Draining)
    }
}

/// Waits for the next input and hands it to the session: bytes or the end of stream
/// from either side (read into the thread's read buffer and handed on within the same
/// poll, so no buffer is held across the wait), the shutdown signal, or the deadline.
/// Hands one client read to the session: `n` bytes, in `data` or, when `None`, already in
/// its stream buffer; none is the end of the stream.
fn on_client_read<P: Session>(
    session: &mut P,
    read: io::Result<(usize, Option<&[u8]>)>,
    traffic: &mut Traffic,
    context: &ConnectionSettings,
) {
    match read {
        Ok((0, _)) => session.on_client_eof(),
        Ok((n, data)) => {
            traffic.read_from_client(n, context);
            match data {
                Some(data) => session.on_client_data(data),
                None => session.on_client_stream_data(),
            }
        }
        // A TLS stream cut without close_notify, a reset: the client is gone.
        Err(err) => {
            info!(%err, "client read failed");
            session.on_client_eof();
        }
    }
}

async fn wait<P: Session, S: ClientStream>(
    session: &mut P,
    client: &mut S,
    upstream: &mut upstream::Stream,
    context: &ConnectionSettings,
    traffic: &mut Traffic,
    waits: &mut Waits,
) -> Woke {
    let wants_client = session.wants_client_data();
    let order = waits.read_order();
    let mut stop = std::pin::pin!(match &mut waits.drain {
        Drain::Listening(signal) => Some(signal.wait_for(|stop| *stop)),
        Drain::Draining | Drain::Gone => None,
    });
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(waits.deadline_at));
    std::future::poll_fn(|cx| {
        for side in order {
            let read = match side {
                Side::Client if wants_client => match session.client_stream_buffer() {
                    Some(buffer) => read_buffers::poll_read_into(client, cx, buffer).map(|read| {
                        on_client_read(session, read.map(|n| (n, None)), traffic, context)
                    }),
                    None => read_buffers::poll_read(client, cx, |_, read| {
                        let read = read.map(|data| (data.len(), Some(data)));
                        on_client_read(session, read, traffic, context)
                    }),
                },
                Side::Client => Poll::Pending,
                Side::Upstream => read_buffers::poll_read(upstream, cx, |_, read| match read {
                    Ok([]) | Err(_) => session.on_upstream_eof(),
                    Ok(data) => session.on_upstream_data(data),
                }),
            };
            if read.is_ready() {
                return Poll::Ready(Woke::Read);
            }
        }
        if let Some(stop) = stop.as_mut().as_pin_mut()
            && let Poll::Ready(stop) = stop.poll(cx)
        {
            return Poll::Ready(Woke::Drain(stop.is_ok()));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woke::Deadline);
        }
        Poll::Pending
    })
    .await
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

/// What ended a wait of the command loop.
enum Woke {
    /// A read from either side, already handed to the session.
    Read,
    /// The shutdown signal (true), or its sender gone (false).
    Drain(bool),
    Deadline,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_replays_its_prefix_then_reads_ahead_and_holds_nothing_when_idle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (mut far, _) = accepted.unwrap();
        let mut near = Prefixed::new(Bytes::from_static(b"early"), client.unwrap());
        far.write_all(&[9; 20_000]).await.unwrap();
        let mut small = [0; 4096];
        // The prefix first, alone.
        assert_eq!(near.read(&mut small).await.unwrap(), 5);
        assert_eq!(&small[..5], b"early");
        // Then one read of the socket serves the small reads rustls makes: what is left
        // waits in the read-ahead.
        let mut got = 0;
        while got < 20_000 {
            let n = near.read(&mut small).await.unwrap();
            assert!(n > 0 && small[..n].iter().all(|&b| b == 9));
            got += n;
        }
        assert_eq!(got, 20_000);
        // The socket is empty: a read waits, and the read-ahead's memory is given back.
        let waker = std::task::Waker::noop();
        let mut buf = ReadBuf::new(&mut small);
        let read = Pin::new(&mut near).poll_read(&mut Context::from_waker(waker), &mut buf);
        assert!(read.is_pending());
        assert_eq!(near.ahead.capacity(), 0);
        // A read that fits what the reader above asks (a handshake message, a command)
        // goes through the thread's buffer: the session allocates nothing for it.
        far.write_all(b"EHLO client.example\r\n").await.unwrap();
        assert_eq!(near.read(&mut small).await.unwrap(), 21);
        assert_eq!(near.ahead.capacity(), 0);
        drop(far);
        assert_eq!(
            near.read(&mut small).await.unwrap(),
            0,
            "the end of the stream"
        );
    }

    #[tokio::test]
    async fn prefixed_writes_all_of_a_vectored_write_in_one_call() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (mut far, _) = accepted.unwrap();
        let mut near = Prefixed::new(Bytes::new(), client.unwrap());
        assert!(near.is_write_vectored());
        // A handshake flight: ServerHello, ChangeCipherSpec, the encrypted rest. The
        // default (unvectored) write would take only the first.
        let flight = [&b"hello"[..], b"ccs", b"encrypted"].map(io::IoSlice::new);
        assert_eq!(near.write_vectored(&flight).await.unwrap(), 17);
        drop(near);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"helloccsencrypted");
    }

    /// Writes through to `inner` and keeps each call's bytes: at most `per_call` bytes
    /// a call, and with `busy_first` the first write finds the stream full (Pending).
    struct CallRecorder<S> {
        inner: S,
        per_call: usize,
        busy_first: bool,
        calls: Vec<Vec<u8>>,
    }

    /// A [`CallRecorder`] over a stream that takes everything.
    fn recorder(per_call: usize) -> CallRecorder<tokio::io::Sink> {
        CallRecorder {
            inner: tokio::io::sink(),
            per_call,
            busy_first: false,
            calls: Vec::new(),
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for CallRecorder<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for CallRecorder<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if std::mem::take(&mut this.busy_first) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let call: Vec<u8> = bufs
                .iter()
                .flat_map(|b| b.iter().copied())
                .take(this.per_call)
                .collect();
            // In one call to `inner`, whose own writes may take one slice only.
            let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &call))?;
            this.calls.push(call[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    fn pipelined_commands() -> Vec<Bytes> {
        let commands: [&'static [u8]; 4] = [
            b"MAIL FROM:<a@x>\r\n",
            b"",
            b"RCPT TO:<b@y>\r\n",
            b"DATA\r\n",
        ];
        commands.map(Bytes::from_static).to_vec()
    }

    #[tokio::test]
    async fn gathered_upstream_bytes_leave_in_one_call_in_order() {
        let mut upstream = recorder(usize::MAX);
        let mut parts = pipelined_commands();
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert!(parts.is_empty());
        assert_eq!(
            upstream.calls,
            [b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n".to_vec()]
        );
        // Nothing gathered: no call at all.
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert_eq!(upstream.calls.len(), 1);
    }

    #[tokio::test]
    async fn gathered_upstream_bytes_survive_short_writes() {
        let mut upstream = recorder(5);
        let mut parts = pipelined_commands();
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert!(parts.is_empty());
        assert_eq!(
            upstream.calls.concat(),
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
        );
        // Each call took all it could, across the parts' boundaries: 38 bytes in 8.
        let lengths: Vec<usize> = upstream.calls.iter().map(Vec::len).collect();
        assert_eq!(lengths, [5, 5, 5, 5, 5, 5, 5, 3]);
    }

    #[tokio::test]
    async fn gathered_upstream_bytes_wait_for_a_full_stream_and_resume() {
        let mut upstream = recorder(20);
        upstream.busy_first = true;
        let mut parts = pipelined_commands();
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert_eq!(
            upstream.calls.concat(),
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
        );
        assert_eq!(upstream.calls.len(), 2);
    }

    #[tokio::test]
    async fn empty_parts_are_no_write_even_last() {
        let mut upstream = recorder(usize::MAX);
        // An IMAP literal of zero bytes gives an empty part, possibly last in a batch.
        let mut parts = vec![Bytes::from_static(b"DATA\r\n"), Bytes::new()];
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert_eq!(upstream.calls, [b"DATA\r\n".to_vec()]);
        let mut parts = vec![Bytes::new(), Bytes::new()];
        write_parts(&mut upstream, &mut parts).await.unwrap();
        assert!(parts.is_empty());
        assert_eq!(upstream.calls.len(), 1);
    }

    #[tokio::test]
    async fn under_tls_the_last_reply_and_close_notify_leave_in_one_write() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certified = rcgen::generate_simple_self_signed(["mx.example".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key.into())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (near, far) = tokio::io::duplex(64 * 1024);
        let counted = CallRecorder {
            inner: near,
            per_call: usize::MAX,
            busy_first: false,
            calls: Vec::new(),
        };
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(counted);
        let name = rustls::pki_types::ServerName::try_from("mx.example").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, far);
        let (accepted, connected) = tokio::join!(accept, connect);
        let mut server_side = Box::new(accepted.unwrap());
        let mut client_side = connected.unwrap();

        let writes_before = server_side.get_ref().0.calls.len();
        let reply = b"221 2.0.0 Bye\r\n";
        assert_eq!(server_side.buffer(reply), reply.len());
        assert_eq!(
            server_side.get_ref().0.calls.len(),
            writes_before,
            "buffered, not written"
        );
        server_side.buffer_close();
        say_goodbye(&mut server_side, &[]).await.unwrap();
        assert_eq!(server_side.get_ref().0.calls.len(), writes_before + 1);
        // The client gets the reply, then a clean end (close_notify), not a cut stream.
        let mut got = Vec::new();
        client_side.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, reply);
    }

    #[tokio::test]
    async fn a_stream_that_takes_nothing_is_an_error_not_a_loop() {
        let mut upstream = recorder(0);
        let err = write_parts(&mut upstream, &mut pipelined_commands())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
