//! Prometheus metrics (ARCHITECTURE.md §8) and the small HTTP endpoint that serves them.
//!
//! One process-wide registry ([`global`]). Each listener resolves its label sets once, at
//! bind time, into a [`ListenerMetrics`] handle: the hot path is an atomic add, never a
//! map look-up. Every series a listener can have is created at 0 then, so dashboards and
//! `rate()` see it before the first event.
//!
//! Labels are bounded: listener names come from the config, everything else from fixed
//! lists in the code. Client addresses, user names and anything a client typed never
//! become a label.
//!
//! The endpoint (`metrics: { listen: ... }`) answers `GET /metrics` in the Prometheus
//! text format 0.0.4, or in OpenMetrics when the scraper asks for it (`Accept`), and
//! `GET /healthz` with `200 ok` while the listeners are bound and serving.
//!
//! It is hyper's HTTP/1.1 server, one request per connection. A connection gets
//! `HEADER_READ_TIMEOUT` (2 s) from accept for its request head, then 408, and
//! `CONNECTION_TIMEOUT` (10 s) in all, so an idle or slow socket ties up nothing for
//! long and takes no turn from the next request. The cap of `MAX_CONNECTIONS` (1024)
//! is not a queue: it keeps this endpoint from using up file descriptors the mail
//! listeners share. Filling it takes over 500 new connections a second held 2 s each, a
//! flood, not the stray idle sockets of a load balancer or a stuck scraper, which were
//! enough to fill the 32 slots of the hand-written server before hyper.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{Protocol, TlsMode};

/// Every event name of ARCHITECTURE.md §8, plus the session events of [`crate::proto::Event`]
/// that §8 does not list. Each gets a series per listener, created at 0.
pub const EVENTS: &[&str] = &[
    "tls_established",
    "tls_handshake_failed",
    "plaintext_command_refused",
    "credentials_exposed",
    "starttls_injection",
    "starttls_stripping_suspected",
    "exempt_plaintext_session",
    "bare_newline_normalized",
    "smuggling_neutralized",
    "limit_exceeded",
    "upstream_unavailable",
    "session_end",
    "forbidden_command",
    "upstream_protocol_error",
    "upstream_preauth",
    "proxy_protocol_error",
    "xclient_unavailable",
    "outbound_delivery",
    "outbound_plaintext",
    "outbound_mx_failed",
];

/// The limits every listener can hit (`limit_exceeded`'s `limit` field).
const LIMITS: &[&str] = &[
    "line_length",
    "plaintext_commands",
    "errors",
    "max_connections",
    "max_connections_per_client",
    "greeting_timeout",
    "handshake_timeout",
    "idle_timeout",
    "data_timeout",
    "idle_after_login_timeout",
];

/// Handshake-time buckets in seconds, 1 ms to 10 s (the default handshake deadline).
const HANDSHAKE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    listener: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    listener: String,
    protocol: &'static str,
    tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    listener: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    listener: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    listener: String,
    direction: &'static str,
}

/// Outbound deliveries: the policy that applied (a fixed set: `dane`, `mta-sts`,
/// `mta-sts-testing`, `opportunistic`, `encrypt`, `verify`), the result (`delivered`,
/// `deferred`, `rejected`, `unknown`) and whether TLS carried it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    policy: &'static str,
    result: &'static str,
    tls: &'static str,
}

type HistogramFamily = Family<ListenerLabels, Histogram, fn() -> Histogram>;

fn handshake_histogram() -> Histogram {
    Histogram::new(HANDSHAKE_BUCKETS)
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections_accepted: Family<ListenerLabels, Counter>,
    sessions: Family<SessionLabels, Counter>,
    sessions_active: Family<ProtocolLabels, Gauge>,
    security_events: Family<EventLabels, Counter>,
    limits_exceeded: Family<LimitLabels, Counter>,
    tls_handshake_duration: HistogramFamily,
    relayed_bytes: Family<DirectionLabels, Counter>,
    outbound_deliveries: Family<DeliveryLabels, Counter>,
    ready: AtomicBool,
}

/// The process-wide metrics, created on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("mailmoat"),
            connections_accepted: Family::default(),
            sessions: Family::default(),
            sessions_active: Family::default(),
            security_events: Family::default(),
            limits_exceeded: Family::default(),
            tls_handshake_duration: Family::new_with_constructor(handshake_histogram),
            relayed_bytes: Family::default(),
            outbound_deliveries: Family::default(),
            ready: AtomicBool::new(false),
        };
        let mut registry = Registry::with_prefix("mailmoat");
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "connections_accepted",
            "TCP connections accepted, including those refused by a connection limit",
            metrics.connections_accepted.clone(),
        );
        registry.register(
            "sessions",
            "Sessions ended, by the TLS state they ended in (starttls, implicit, none)",
            metrics.sessions.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions open now",
            metrics.sessions_active.clone(),
        );
        registry.register(
            "security_events",
            "Security events of DESIGN section 8, by event name",
            metrics.security_events.clone(),
        );
        registry.register(
            "limits_exceeded",
            "Configured bounds hit, by limit",
            metrics.limits_exceeded.clone(),
        );
        registry.register_with_unit(
            "tls_handshake_duration",
            "Time of successful TLS handshakes with clients",
            Unit::Seconds,
            metrics.tls_handshake_duration.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Plaintext bytes received from clients (client_to_upstream) and sent to them \
             (upstream_to_client)",
            metrics.relayed_bytes.clone(),
        );
        registry.register(
            "outbound_deliveries",
            "Outbound relay transactions that reached the end of data, by the TLS policy \
             that applied, the MX's answer and whether TLS carried the message",
            metrics.outbound_deliveries.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts one outbound delivery.
    pub fn outbound_delivery(&self, policy: &'static str, result: &'static str, tls: bool) {
        self.outbound_deliveries
            .get_or_create(&DeliveryLabels {
                policy,
                result,
                tls: if tls { "yes" } else { "no" },
            })
            .inc();
    }

    /// Whether `/healthz` answers 200: set once the listeners are bound, cleared when
    /// the process stops accepting.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The exposition text in `format`.
    pub fn render(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }
}

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, what `curl` gets.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Bytes counted in both directions, shared by the command loop and the blind relay.
#[derive(Debug, Clone, Default)]
pub struct RelayedBytes {
    /// Plaintext bytes received from the client.
    pub client_to_upstream: Counter,
    /// Plaintext bytes sent to the client.
    pub upstream_to_client: Counter,
}

/// One listener's series, resolved once; cheap to clone.
#[derive(Debug, Clone)]
pub struct ListenerMetrics(Arc<Resolved>);

#[derive(Debug)]
struct Resolved {
    listener: String,
    connections_accepted: Counter,
    sessions_active: Gauge,
    /// By final TLS state: starttls, implicit, none.
    sessions: [Counter; 3],
    events: Vec<(&'static str, Counter)>,
    limits: Vec<(&'static str, Counter)>,
    tls_handshake_duration: Histogram,
    bytes: RelayedBytes,
}

impl ListenerMetrics {
    /// The series of the listener `name`, in the global registry, all created at 0.
    pub fn new(name: &str, protocol: Protocol) -> ListenerMetrics {
        ListenerMetrics::in_registry(global(), name, protocol)
    }

    fn in_registry(metrics: &Metrics, name: &str, protocol: Protocol) -> ListenerMetrics {
        let listener = name.to_owned();
        let protocol = protocol_label(protocol);
        let session = |tls| {
            metrics.sessions.get_or_create_owned(&SessionLabels {
                listener: listener.clone(),
                protocol,
                tls,
            })
        };
        let limits = LIMITS.iter().copied().chain(
            match protocol {
                // `control_line`: a message line of control bytes only, longer than a text
                // line may be (the body cannot be written safely).
                "smtp" => &["chunk_size", "control_line"][..],
                "imap" => &["literal_size"][..],
                _ => &[][..],
            }
            .iter()
            .copied(),
        );
        let direction = |direction| {
            metrics.relayed_bytes.get_or_create_owned(&DirectionLabels {
                listener: listener.clone(),
                direction,
            })
        };
        ListenerMetrics(Arc::new(Resolved {
            connections_accepted: metrics.connections_accepted.get_or_create_owned(
                &ListenerLabels {
                    listener: listener.clone(),
                },
            ),
            sessions_active: metrics
                .sessions_active
                .get_or_create_owned(&ProtocolLabels {
                    listener: listener.clone(),
                    protocol,
                }),
            sessions: [session("starttls"), session("implicit"), session("none")],
            events: EVENTS
                .iter()
                .map(|&event| (event, event_counter(metrics, &listener, event)))
                .collect(),
            limits: limits
                .map(|limit| (limit, limit_counter(metrics, &listener, limit)))
                .collect(),
            tls_handshake_duration: metrics.tls_handshake_duration.get_or_create_owned(
                &ListenerLabels {
                    listener: listener.clone(),
                },
            ),
            bytes: RelayedBytes {
                client_to_upstream: direction("client_to_upstream"),
                upstream_to_client: direction("upstream_to_client"),
            },
            listener,
        }))
    }

    /// A TCP connection was accepted (before any connection limit).
    pub fn connection_accepted(&self) {
        self.0.connections_accepted.inc();
    }

    /// A session starts; it counts as active until the guard is dropped.
    pub fn session_started(&self) -> ActiveSession {
        self.0.sessions_active.inc();
        ActiveSession(self.0.sessions_active.clone())
    }

    /// A session ended; `tls` is how TLS was on at its end, `None` for plaintext only.
    pub fn session_ended(&self, tls: Option<TlsMode>) {
        let index = match tls {
            Some(TlsMode::Starttls) => 0,
            Some(TlsMode::Implicit) => 1,
            None => 2,
        };
        self.0.sessions[index].inc();
    }

    /// The listener's name.
    pub fn listener(&self) -> &str {
        &self.0.listener
    }

    /// Counts one security event. Use [`crate::telemetry`], which also logs it.
    pub fn event(&self, name: &'static str) {
        match self.0.events.iter().find(|(event, _)| *event == name) {
            Some((_, counter)) => counter.inc(),
            // Not in EVENTS: still a fixed name from the code, so still bounded.
            None => event_counter(global(), &self.0.listener, name).inc(),
        };
    }

    /// Counts one `limit_exceeded` by limit. Use [`crate::telemetry`], which also logs.
    pub fn limit_exceeded(&self, limit: &'static str) {
        match self.0.limits.iter().find(|(name, _)| *name == limit) {
            Some((_, counter)) => counter.inc(),
            None => limit_counter(global(), &self.0.listener, limit).inc(),
        };
    }

    /// A successful TLS handshake took `elapsed`.
    pub fn tls_handshake(&self, elapsed: Duration) {
        self.0.tls_handshake_duration.observe(elapsed.as_secs_f64());
    }

    /// The byte counters of this listener.
    pub fn bytes(&self) -> &RelayedBytes {
        &self.0.bytes
    }
}

fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Smtp => "smtp",
        Protocol::Imap => "imap",
        Protocol::Pop3 => "pop3",
    }
}

fn event_counter(metrics: &Metrics, listener: &str, event: &'static str) -> Counter {
    metrics.security_events.get_or_create_owned(&EventLabels {
        listener: listener.to_owned(),
        event,
    })
}

fn limit_counter(metrics: &Metrics, listener: &str, limit: &'static str) -> Counter {
    metrics.limits_exceeded.get_or_create_owned(&LimitLabels {
        listener: listener.to_owned(),
        limit,
    })
}

/// An open session; dropping it (also on a panic or an aborted task) lowers the gauge.
#[derive(Debug)]
pub struct ActiveSession(Gauge);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---- the HTTP endpoint ----

/// The longest request head read (also the smallest buffer hyper allows); a longer one
/// gets 431.
const MAX_REQUEST_LEN: usize = 8 * 1024;
/// Header fields in a request head; more get 431.
const MAX_HEADERS: usize = 32;
/// Time from accept to a complete request head; then 408 and close. It is also all the
/// idle time a connection gets: every response closes its connection, so there is no
/// keep-alive wait after one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection's whole life, request and response: bounds a scraper that does not
/// take its response.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; more are closed at once (see the module doc).
const MAX_CONNECTIONS: usize = 1024;

/// What a connection whose head is late gets. hyper closes it without an answer; a 408
/// (as this endpoint always sent) lets a scraper or load balancer log a timeout rather
/// than a reset.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\
    Connection: close\r\n\r\nrequest timeout\n";

const TEXT: &str = "text/plain; charset=utf-8";

/// Binds `addr` and serves `/metrics` and `/healthz` on it in a background task.
/// Returns the bound address (useful with port 0).
pub async fn start(addr: SocketAddr) -> io::Result<SocketAddr> {
    let socket = TcpListener::bind(addr).await?;
    let local = socket.local_addr()?;
    tracing::info!(addr = %local, "metrics endpoint listening");
    tokio::spawn(accept_loop(socket, global()));
    Ok(local)
}

async fn accept_loop(socket: TcpListener, metrics: &'static Metrics) {
    let http = http_builder();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::error!(%err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap the connection is simply closed: scrapes are retried.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let http = http.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, &http, |request| {
                answer(request, metrics.is_ready(), |format| {
                    metrics.render(format).ok()
                })
            })
            .await;
        });
    }
}

/// hyper's HTTP/1.1 server with this endpoint's bounds.
fn http_builder() -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // One request per connection, as `Connection: close` in every response says.
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_LEN)
        .max_headers(MAX_HEADERS)
        // The header names as this endpoint has always written them (`Content-Type`).
        .title_case_headers(true)
        .auto_date_header(false);
    http
}

/// Serves one connection, within [`CONNECTION_TIMEOUT`] whatever the client does.
async fn serve_connection<S>(
    mut stream: S,
    http: &http1::Builder,
    respond: impl Fn(&Request<Incoming>) -> Response<Full<Bytes>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let served = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        let service =
            service_fn(|request| std::future::ready(Ok::<_, Infallible>(respond(&request))));
        match http
            .serve_connection(TokioIo::new(&mut stream), service)
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if err.is_timeout() => {
                stream.write_all(REQUEST_TIMEOUT).await?;
                stream.shutdown().await
            }
            // Refused heads were answered by hyper (400, 431); the rest went away.
            Err(err) => {
                tracing::debug!(%err, "metrics endpoint: connection failed");
                Ok(())
            }
        }
    })
    .await;
    if served.is_err() {
        tracing::debug!("metrics endpoint: connection timed out");
    }
}

/// The response to a request (RFC 9110 §9.3.1, §9.3.2): `render` produces the
/// exposition text, `None` when it failed. Every response closes its connection.
fn answer<B>(
    request: &Request<B>,
    ready: bool,
    render: impl FnOnce(Format) -> Option<String>,
) -> Response<Full<Bytes>> {
    let head_only = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "method not allowed\n",
                false,
            );
        }
    };
    // Origin form only: an absolute URI (`GET http://x/metrics`) is not ours to serve.
    let path = match request.uri().authority() {
        None => request.uri().path(),
        Some(_) => "",
    };
    match path {
        "/metrics" => {
            let format = if request.headers().get_all(ACCEPT).iter().any(|value| {
                memchr::memmem::find(value.as_bytes(), b"application/openmetrics-text").is_some()
            }) {
                Format::OpenMetrics
            } else {
                Format::Prometheus
            };
            match render(format) {
                Some(body) => reply(StatusCode::OK, format.content_type(), body, head_only),
                None => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "cannot encode metrics\n",
                    head_only,
                ),
            }
        }
        "/healthz" if ready => reply(StatusCode::OK, TEXT, "ok\n", head_only),
        "/healthz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready\n",
            head_only,
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n", head_only),
    }
}

/// A response with its length and `Connection: close`; for HEAD the same head, no body.
fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
    head_only: bool,
) -> Response<Full<Bytes>> {
    let body = body.into();
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(Full::new(if head_only { Bytes::new() } else { body }));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, length);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A response as read off the connection.
    struct Reply {
        status: u16,
        content_type: String,
        body: String,
        raw: Vec<u8>,
    }

    impl Reply {
        fn to_bytes(&self) -> Vec<u8> {
            self.raw.clone()
        }
    }

    /// Sends `request` to the endpoint over an in-memory stream and reads to its close.
    async fn exchange(request: &[u8], ready: bool, render: fn(Format) -> Option<String>) -> Reply {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(async move {
            serve_connection(server, &http_builder(), |request| {
                answer(request, ready, render)
            })
            .await
        });
        client.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).await.unwrap();
        served.await.unwrap();
        let text = String::from_utf8(raw.clone()).unwrap();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Reply {
                status: 0,
                content_type: String::new(),
                body: text,
                raw,
            };
        };
        let status = head
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let content_type = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Type: "))
            .unwrap_or_default()
            .to_owned();
        Reply {
            status,
            content_type,
            body: body.to_owned(),
            raw,
        }
    }

    async fn get(head: &str) -> Reply {
        exchange(head.as_bytes(), true, |format| {
            Some(format!("metrics as {format:?}\n"))
        })
        .await
    }

    #[tokio::test]
    async fn metrics_and_healthz_are_served() {
        let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "metrics as Prometheus\n");
        assert_eq!(
            response.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let response = get("GET /healthz HTTP/1.0\r\n\r\n").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok\n"));
        let not_ready = exchange(b"GET /healthz HTTP/1.1\r\n\r\n", false, |_| None).await;
        assert_eq!(not_ready.status, 503);
    }

    #[tokio::test]
    async fn openmetrics_is_served_when_asked_for() {
        let response = get(
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert_eq!(response.body, "metrics as OpenMetrics\n");
        assert!(
            response
                .content_type
                .starts_with("application/openmetrics-text")
        );
    }

    #[tokio::test]
    async fn query_strings_are_ignored_and_unknown_paths_are_404() {
        assert_eq!(get("GET /metrics?x=1 HTTP/1.1\r\n\r\n").await.status, 200);
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n").await.status, 404);
        assert_eq!(get("GET /metricsx HTTP/1.1\r\n\r\n").await.status, 404);
        assert_eq!(
            get("GET http://x/metrics HTTP/1.1\r\n\r\n").await.status,
            404
        );
    }

    #[tokio::test]
    async fn only_get_and_head_are_allowed() {
        let response = get("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(response.status, 405);
        assert!(
            String::from_utf8(response.to_bytes())
                .unwrap()
                .contains("\r\nAllow: GET, HEAD\r\n")
        );
        let head = get("HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            String::from_utf8(head.to_bytes()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\
             Connection: close\r\n\r\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_truncated_and_oversized_requests_are_refused() {
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(exchange(tls_hello, true, |_| None).await.status, 400);
        // A head that never ends is timed out (hyper's header timer, on paused time).
        assert_eq!(
            get("GET /metrics HTTP/1.1\r\nHost: x\r\n").await.status,
            408
        );
        assert_eq!(get("").await.status, 408);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LEN));
        assert_eq!(get(&long[..MAX_REQUEST_LEN]).await.status, 431);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            get(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n"))
                .await
                .status,
            431
        );
    }

    #[tokio::test]
    async fn a_failed_encoding_is_500() {
        let response = exchange(b"GET /metrics HTTP/1.1\r\n\r\n", true, |_| None).await;
        assert_eq!(response.status, 500);
    }

    #[tokio::test]
    async fn responses_carry_length_and_close() {
        let bytes = get("GET /nope HTTP/1.1\r\n\r\n").await.to_bytes();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
        );
    }

    #[test]
    fn every_series_of_a_listener_exists_at_zero() {
        let metrics = Metrics::new();
        let mx = ListenerMetrics::in_registry(&metrics, "mx", Protocol::Smtp);
        let text = metrics.render(Format::Prometheus).unwrap();
        for event in EVENTS {
            let line =
                format!("mailmoat_security_events_total{{listener=\"mx\",event=\"{event}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        for line in [
            "mailmoat_sessions_total{listener=\"mx\",protocol=\"smtp\",tls=\"none\"} 0",
            "mailmoat_sessions_active{listener=\"mx\",protocol=\"smtp\"} 0",
            "mailmoat_limits_exceeded_total{listener=\"mx\",limit=\"chunk_size\"} 0",
            "mailmoat_connections_accepted_total{listener=\"mx\"} 0",
            "mailmoat_tls_handshake_duration_seconds_count{listener=\"mx\"} 0",
            "mailmoat_relayed_bytes_total{listener=\"mx\",direction=\"upstream_to_client\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("literal_size"), "imap only");

        let session = mx.session_started();
        mx.event("plaintext_command_refused");
        mx.limit_exceeded("line_length");
        mx.tls_handshake(Duration::from_millis(3));
        mx.bytes().client_to_upstream.inc_by(42);
        let text = metrics.render(Format::Prometheus).unwrap();
        for line in [
            "mailmoat_sessions_active{listener=\"mx\",protocol=\"smtp\"} 1",
            "mailmoat_security_events_total{listener=\"mx\",event=\"plaintext_command_refused\"} 1",
            "mailmoat_limits_exceeded_total{listener=\"mx\",limit=\"line_length\"} 1",
            "mailmoat_tls_handshake_duration_seconds_bucket{listener=\"mx\",le=\"0.005\"} 1",
            "mailmoat_tls_handshake_duration_seconds_bucket{listener=\"mx\",le=\"0.0025\"} 0",
            "mailmoat_relayed_bytes_total{listener=\"mx\",direction=\"client_to_upstream\"} 42",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        drop(session);
        mx.session_ended(Some(TlsMode::Starttls));
        let text = metrics.render(Format::Prometheus).unwrap();
        for line in [
            "mailmoat_sessions_active{listener=\"mx\",protocol=\"smtp\"} 0",
            "mailmoat_sessions_total{listener=\"mx\",protocol=\"smtp\",tls=\"starttls\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
