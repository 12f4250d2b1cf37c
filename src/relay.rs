//! The blind byte relay after an IMAP or POP3 login (DESIGN §1.7): both directions
//! copied unchanged and concurrently (IDLE, COMPRESS, large FETCH and APPEND work), until
//! both sides have closed or nothing moved in either direction for the idle deadline.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::RelayedBytes;

/// Milliseconds since `epoch` of the last byte read on either side.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A stream that records when it last delivered bytes, and counts them.
struct Watched<'a, S> {
    inner: &'a mut S,
    activity: Arc<Activity>,
    read_bytes: &'a Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.activity.touch();
            this.read_bytes.inc_by(read as u64);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed; bytes copied client->upstream and upstream->client.
    Closed { from_client: u64, to_client: u64 },
    /// Nothing moved for the idle deadline.
    Idle,
}

/// Copies both ways until both sides close or `idle` passes without a byte; `bytes`
/// counts what is read from each side as it arrives (a relay can last hours).
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    bytes: &RelayedBytes,
) -> io::Result<End>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let mut client = Watched {
        inner: client,
        activity: Arc::clone(&activity),
        read_bytes: &bytes.client_to_upstream,
    };
    let mut upstream = Watched {
        inner: upstream,
        activity: Arc::clone(&activity),
        read_bytes: &bytes.upstream_to_client,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let wait = idle.saturating_sub(activity.idle_for());
        tokio::select! {
            result = &mut copy => {
                let (from_client, to_client) = result?;
                return Ok(End::Closed { from_client, to_client });
            }
            () = tokio::time::sleep(wait) => {
                if activity.idle_for() >= idle {
                    return Ok(End::Idle);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn bytes_cross_unchanged_both_ways_until_both_close() {
        let (mut client_far, mut client_near) = duplex(64);
        let (mut upstream_near, mut upstream_far) = duplex(64);
        let bytes = RelayedBytes::default();
        let counted = bytes.clone();
        let relay = tokio::spawn(async move {
            splice(
                &mut client_near,
                &mut upstream_near,
                Duration::from_secs(60),
                &counted,
            )
            .await
        });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            client_far.write_all(&payload).await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_far.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        upstream_far.write_all(b"* BYE\r\n").await.unwrap();
        upstream_far.shutdown().await.unwrap();
        drop(upstream_far);
        assert_eq!(writer.await.unwrap(), b"* BYE\r\n");
        assert_eq!(
            relay.await.unwrap().unwrap(),
            End::Closed {
                from_client: 100_000,
                to_client: 7
            }
        );
        assert_eq!(bytes.client_to_upstream.get(), 100_000);
        assert_eq!(bytes.upstream_to_client.get(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_in_both_directions_ends_the_relay_and_traffic_keeps_it_alive() {
        let (mut client_far, mut client_near) = duplex(64);
        let (mut upstream_near, mut upstream_far) = duplex(64);
        let relay = tokio::spawn(async move {
            splice(
                &mut client_near,
                &mut upstream_near,
                Duration::from_secs(60),
                &RelayedBytes::default(),
            )
            .await
        });
        // A keep-alive from the upstream every 40 s keeps an IDLE-ing client connected.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            upstream_far
                .write_all(b"* OK Still here\r\n")
                .await
                .unwrap();
            let mut line = [0u8; 17];
            client_far.read_exact(&mut line).await.unwrap();
        }
        assert!(!relay.is_finished());
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(relay.await.unwrap().unwrap(), End::Idle);
    }
}
