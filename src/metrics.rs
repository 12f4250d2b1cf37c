//! Prometheus metrics (DESIGN §8) and the small HTTP endpoint that serves them.
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

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{Protocol, TlsMode};

/// Every event name of DESIGN §8, plus the session events of [`crate::proto::Event`]
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
        Metrics {
            registry,
            ..metrics
        }
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

/// The longest request head read; anything longer gets 431.
const MAX_REQUEST_LEN: usize = 8 * 1024;
/// Time a scraper has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a scraper has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; more connections are closed at once.
const MAX_CONCURRENT: usize = 32;

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
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
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
        tokio::spawn(async move {
            let _slot = slot;
            serve_http(stream, metrics).await;
        });
    }
}

async fn serve_http(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(1024);
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut head)).await
    {
        Ok(Ok(())) => answer(&head, metrics.is_ready(), |format| {
            metrics.render(format).ok()
        }),
        // The scraper went away: nobody to answer.
        Ok(Err(_)) => return,
        Err(_) => Response::text(408, "request timeout\n"),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads until the end of the request head, end of stream or `MAX_REQUEST_LEN` bytes.
async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 1024];
    while head.len() < MAX_REQUEST_LEN {
        let room = (MAX_REQUEST_LEN - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(());
        }
        // Search only where the new bytes could complete "\r\n\r\n".
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if memchr::memmem::find(&head[from..], b"\r\n\r\n").is_some() {
            return Ok(());
        }
    }
    Ok(())
}

/// One HTTP response; always `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// HEAD: headers as for GET, no body.
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            head_only: false,
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// The response to a request head (RFC 9112 §3). `render` produces the exposition
/// text; `None` when it failed.
fn answer(head: &[u8], ready: bool, render: impl FnOnce(Format) -> Option<String>) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if head.len() >= MAX_REQUEST_LEN => {
            return Response::text(431, "request head too large\n");
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Response::text(431, "too many header fields\n");
        }
        Ok(httparse::Status::Partial) | Err(_) => return Response::text(400, "bad request\n"),
    }
    let head_only = match request.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Response::text(405, "method not allowed\n"),
    };
    let path = request.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let mut response = match path {
        "/metrics" => {
            let format = if request.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("accept")
                    && memchr::memmem::find(h.value, b"application/openmetrics-text").is_some()
            }) {
                Format::OpenMetrics
            } else {
                Format::Prometheus
            };
            match render(format) {
                Some(body) => Response {
                    status: 200,
                    content_type: format.content_type(),
                    body,
                    head_only: false,
                },
                None => Response::text(500, "cannot encode metrics\n"),
            }
        }
        "/healthz" if ready => Response::text(200, "ok\n"),
        "/healthz" => Response::text(503, "not ready\n"),
        _ => Response::text(404, "not found\n"),
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(head: &str) -> Response {
        answer(head.as_bytes(), true, |format| {
            Some(format!("metrics as {format:?}\n"))
        })
    }

    #[test]
    fn metrics_and_healthz_are_served() {
        let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "metrics as Prometheus\n");
        assert_eq!(
            response.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let response = get("GET /healthz HTTP/1.0\r\n\r\n");
        assert_eq!((response.status, response.body.as_str()), (200, "ok\n"));
        let not_ready = answer(b"GET /healthz HTTP/1.1\r\n\r\n", false, |_| None);
        assert_eq!(not_ready.status, 503);
    }

    #[test]
    fn openmetrics_is_served_when_asked_for() {
        let response = get(
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        );
        assert_eq!(response.body, "metrics as OpenMetrics\n");
        assert!(
            response
                .content_type
                .starts_with("application/openmetrics-text")
        );
    }

    #[test]
    fn query_strings_are_ignored_and_unknown_paths_are_404() {
        assert_eq!(get("GET /metrics?x=1 HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(get("GET /metricsx HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(get("GET http://x/metrics HTTP/1.1\r\n\r\n").status, 404);
    }

    #[test]
    fn only_get_and_head_are_allowed() {
        let response = get("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(response.status, 405);
        assert!(
            String::from_utf8(response.to_bytes())
                .unwrap()
                .contains("\r\nAllow: GET, HEAD\r\n")
        );
        let head = get("HEAD /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(
            String::from_utf8(head.to_bytes()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\
             Connection: close\r\n\r\n"
        );
    }

    #[test]
    fn garbage_truncated_and_oversized_requests_are_refused() {
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(answer(tls_hello, true, |_| None).status, 400);
        assert_eq!(get("GET /metrics HTTP/1.1\r\nHost: x\r\n").status, 400);
        assert_eq!(get("").status, 400);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LEN));
        assert_eq!(get(&long[..MAX_REQUEST_LEN]).status, 431);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            get(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n")).status,
            431
        );
    }

    #[test]
    fn a_failed_encoding_is_500() {
        let response = answer(b"GET /metrics HTTP/1.1\r\n\r\n", true, |_| None);
        assert_eq!(response.status, 500);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let bytes = get("GET /nope HTTP/1.1\r\n\r\n").to_bytes();
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
