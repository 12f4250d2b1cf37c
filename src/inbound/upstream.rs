//! The connection to the legacy server: loopback TCP or a unix socket, made from a
//! chosen local address and begun with a PROXY protocol header when configured
//! (ARCHITECTURE.md §7).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

use crate::config::{ListenerConfig, UpstreamAddr};
use crate::inbound::identity::Origin;

/// A connected upstream.
#[derive(Debug)]
pub enum Stream {
    /// TCP, Nagle off: replies are small and latency-bound.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// The local port of a TCP upstream connection, to join with the upstream's logs.
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Stream::Tcp(tcp) => tcp.local_addr().ok().map(|a| a.port()),
            Stream::Unix(_) => None,
        }
    }
}

/// How one session reaches its upstream.
#[derive(Debug, Clone)]
pub struct Route {
    /// Where.
    pub addr: UpstreamAddr,
    /// The local address to connect from (TCP only; validated in the config).
    pub source_address: Option<IpAddr>,
    /// A PROXY protocol header to send before anything else.
    pub proxy_header: Option<Vec<u8>>,
}

impl Route {
    /// How a session of `listener` reaches its upstream: from its `source_address`,
    /// carrying `origin` in a PROXY header when configured.
    pub fn for_listener(listener: &ListenerConfig, origin: &Origin) -> Route {
        Route {
            addr: listener.upstream.clone(),
            source_address: listener.source_address,
            proxy_header: listener
                .upstream_proxy_protocol
                .map(|version| crate::inbound::identity::upstream_header(version, origin)),
        }
    }

    /// A plain connection to `addr`.
    pub fn to(addr: &UpstreamAddr) -> Route {
        Route {
            addr: addr.clone(),
            source_address: None,
            proxy_header: None,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)
    }
}

/// Connects to the upstream: binds the source address if any, then sends the PROXY
/// header if any, so the upstream reads it before its first command (proxy-protocol.txt
/// §2: the header comes first, in one piece).
pub async fn connect(route: &Route) -> io::Result<Stream> {
    let mut stream = match &route.addr {
        UpstreamAddr::Tcp(addr) => {
            let tcp = match route.source_address {
                Some(source) => {
                    let socket = if addr.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(source, 0))?;
                    socket.connect(*addr).await?
                }
                None => TcpStream::connect(addr).await?,
            };
            tcp.set_nodelay(true)?;
            Stream::Tcp(tcp)
        }
        UpstreamAddr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
    };
    if let Some(header) = &route.proxy_header {
        stream.write_all(header).await?;
    }
    Ok(stream)
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
