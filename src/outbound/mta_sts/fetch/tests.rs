//! The fetch against an HTTPS server in this process on 127.0.0.1 (hyper and
//! tokio-rustls, certificates from rcgen): one test per check of RFC 8461 §3.3.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::channel::Channel;
use http_body_util::{Either, Full};
use hyper::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
use rustls::CertificateError;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::outbound::mta_sts::policy::Mode;
use crate::outbound::test_pki::{Leaf, TestCa};

const POLICY: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 86400\r\n";

/// A generous limit for the tests that must not time out; the one that must uses its own.
const LIMIT: Duration = Duration::from_secs(20);

type Body = Either<Full<Bytes>, Channel<Bytes>>;

/// A test CA of a name of its own: two of one name would differ only in their keys.
fn new_ca() -> TestCa {
    static CAS: AtomicUsize = AtomicUsize::new(0);
    let n = CAS.fetch_add(1, Ordering::Relaxed);
    TestCa::new(&format!("mta-sts test CA {n}"))
}

fn domain() -> PolicyDomain {
    PolicyDomain::parse("example.test").unwrap()
}

/// What the server saw of each request: path and Host.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A policy host on 127.0.0.1 serving `reply` over TLS with `cert`, until the test ends.
async fn policy_host(
    cert: Leaf,
    reply: impl Fn() -> Response<Body> + Send + Sync + 'static,
) -> (SocketAddr, Seen) {
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.clone()], cert.private_key())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let reply = Arc::new(reply);
    let seen_by_server = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, reply, seen) = (acceptor.clone(), reply.clone(), seen_by_server.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let host = request
                        .headers()
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned);
                    seen.lock().unwrap().push((request.uri().to_string(), host));
                    let response = reply();
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn respond(status: u16, content_type: Option<&str>, body: &str) -> Response<Body> {
    let mut response = Response::builder().status(status);
    if let Some(content_type) = content_type {
        response = response.header(CONTENT_TYPE, content_type);
    }
    response
        .body(Either::Left(Full::new(Bytes::from(body.to_owned()))))
        .unwrap()
}

/// Fetches from a host serving `reply` with a certificate for the right name from the
/// trusted CA.
async fn fetch_from(
    reply: impl Fn() -> Response<Body> + Send + Sync + 'static,
) -> Result<Policy, Error> {
    let ca = new_ca();
    let (addr, _) = policy_host(ca.leaf("mta-sts.example.test", false), reply).await;
    Fetcher::new(ca.roots(), LIMIT)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
}

#[tokio::test]
async fn a_good_policy_is_fetched_from_the_well_known_path() {
    let ca = new_ca();
    let (addr, seen) = policy_host(ca.leaf("mta-sts.example.test", false), || {
        respond(200, Some("text/plain"), POLICY)
    })
    .await;
    let policy = Fetcher::new(ca.roots(), LIMIT)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
        .unwrap();
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.max_age, Duration::from_secs(86_400));
    assert!(policy.allows_mx("mail.example.test"));
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            WELL_KNOWN_PATH.to_owned(),
            Some("mta-sts.example.test".to_owned())
        )]
    );
}

#[tokio::test]
async fn media_type_parameters_and_case_do_not_matter() {
    for content_type in [
        "text/plain; charset=utf-8",
        "TEXT/Plain",
        "text/plain ;charset=\"us-ascii\"",
    ] {
        let owned = content_type.to_owned();
        let fetched = fetch_from(move || respond(200, Some(&owned), POLICY)).await;
        assert!(fetched.is_ok(), "{content_type}: {fetched:?}");
    }
}

#[tokio::test]
async fn a_certificate_for_another_name_is_rejected() {
    let ca = new_ca();
    let (addr, seen) = policy_host(ca.leaf("mta-sts.other.test", false), || {
        respond(200, Some("text/plain"), POLICY)
    })
    .await;
    let err = Fetcher::new(ca.roots(), LIMIT)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Certificate(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err:?}"
    );
    assert_eq!(err.result_type(), "sts-webpki-invalid");
    assert!(
        seen.lock().unwrap().is_empty(),
        "no request after a failed check"
    );
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_rejected() {
    let trusted = new_ca();
    let other = new_ca();
    let (addr, seen) = policy_host(other.leaf("mta-sts.example.test", false), || {
        respond(200, Some("text/plain"), POLICY)
    })
    .await;
    let err = Fetcher::new(trusted.roots(), LIMIT)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Certificate(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
    assert_eq!(err.result_type(), "sts-webpki-invalid");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_redirect_is_refused_not_followed() {
    let ca = new_ca();
    let (addr, seen) = policy_host(ca.leaf("mta-sts.example.test", false), || {
        let mut response = respond(301, Some("text/plain"), POLICY);
        response.headers_mut().insert(
            hyper::header::LOCATION,
            HeaderValue::from_static("https://mta-sts.example.test/.well-known/mta-sts.txt"),
        );
        response
    })
    .await;
    let err = Fetcher::new(ca.roots(), LIMIT)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Redirect { status: 301 }), "{err:?}");
    assert_eq!(err.result_type(), "sts-policy-fetch-error");
    assert_eq!(seen.lock().unwrap().len(), 1, "one request, not followed");
}

#[tokio::test]
async fn only_status_200_is_a_policy() {
    for status in [204, 304, 404, 500] {
        let err = fetch_from(move || respond(status, Some("text/plain"), POLICY))
            .await
            .unwrap_err();
        let want = if status == 304 {
            matches!(err, Error::Redirect { status: 304 })
        } else {
            matches!(err, Error::Status { status: s } if s == status)
        };
        assert!(want, "{status}: {err:?}");
    }
}

#[tokio::test]
async fn a_media_type_other_than_text_plain_is_rejected() {
    for (content_type, found) in [
        (Some("text/html"), Some("text/html")),
        (
            Some("text/html; charset=utf-8"),
            Some("text/html; charset=utf-8"),
        ),
        (Some("text/plainx"), Some("text/plainx")),
        (
            Some("application/octet-stream"),
            Some("application/octet-stream"),
        ),
        (None, None),
    ] {
        let err = fetch_from(move || respond(200, content_type, POLICY))
            .await
            .unwrap_err();
        match &err {
            Error::ContentType { found: sent } => assert_eq!(sent.as_deref(), found),
            other => panic!("{content_type:?}: {other:?}"),
        }
        assert_eq!(err.result_type(), "sts-policy-invalid");
    }
}

#[tokio::test]
async fn an_announced_oversized_body_is_refused_before_it_is_read() {
    let big = format!("{POLICY}{}", "x".repeat(MAX_POLICY_LEN));
    let err = fetch_from(move || respond(200, Some("text/plain"), &big))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge), "{err:?}");
}

/// The server streams a chunked body without end (bounded only so that the test cannot
/// run away): the fetch fails with the size error, long before the end and the time
/// limit, so it refused the body while it streamed rather than after.
#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap() {
    const CHUNK: usize = 16 * 1024;
    const BOUND: usize = 1024 * 1024 * 1024;
    let sent = Arc::new(AtomicUsize::new(0));
    let sent_by_server = sent.clone();
    let reply = move || {
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let sent = sent_by_server.clone();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            while sent.load(Ordering::Relaxed) < BOUND
                && sender.send_data(chunk.clone()).await.is_ok()
            {
                sent.fetch_add(CHUNK, Ordering::Relaxed);
            }
        });
        Response::builder()
            .header(CONTENT_TYPE, "text/plain")
            .body(Either::Right(body))
            .unwrap()
    };
    let err = fetch_from(reply).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge), "{err:?}");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < BOUND / 4, "the server had sent {sent} bytes");
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_time_limit() {
    let ca = new_ca();
    // It accepts the connection and then says nothing, not even its TLS hello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let limit = Duration::from_millis(300);
    let err = Fetcher::new(ca.roots(), limit)
        .unwrap()
        .fetch(&domain(), &[addr])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TimedOut { limit: l } if l == limit),
        "{err:?}"
    );
    assert_eq!(err.result_type(), "sts-policy-fetch-error");
    held.abort();
}

#[tokio::test]
async fn an_invalid_policy_is_a_policy_error() {
    let err = fetch_from(|| {
        respond(
            200,
            Some("text/plain"),
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
        )
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Policy(policy::Error::MissingMx { .. })),
        "{err:?}"
    );
    assert_eq!(err.result_type(), "sts-policy-invalid");
}

#[tokio::test]
async fn addresses_are_tried_in_order_and_none_is_an_error() {
    let ca = new_ca();
    let (good, _) = policy_host(ca.leaf("mta-sts.example.test", false), || {
        respond(200, Some("text/plain"), POLICY)
    })
    .await;
    // An address nothing listens on any more.
    let refused = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let fetcher = Fetcher::new(ca.roots(), LIMIT).unwrap();
    assert!(fetcher.fetch(&domain(), &[refused, good]).await.is_ok());
    let err = fetcher.fetch(&domain(), &[refused]).await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    let err = fetcher.fetch(&domain(), &[]).await.unwrap_err();
    assert!(matches!(err, Error::NoAddress), "{err:?}");
}
