//! The blind byte relay after an IMAP or POP3 login (ARCHITECTURE.md §1.7): both directions
//! copied unchanged and concurrently (IDLE, COMPRESS, large FETCH and APPEND work), until
//! both sides have closed or nothing moved in either direction for the idle deadline.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::inbound::read_buffers;
use crate::metrics::RelayedBytes;

/// How a relay ended (other than by an i/o error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle deadline.
    Idle,
}

/// Bytes read from the client and written to it so far, as the session summary counts
/// them in every phase; kept up to date as they move, so the summary has them however
/// the relay ends (closed, idle or an i/o error).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub from_client: u64,
    pub to_client: u64,
}

/// When a direction counts its bytes: what the client sends as it is read, what the
/// client is sent as it is written, so bytes that never reached a client that went
/// away are not counted as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountWhen {
    Read,
    Written,
}

/// One direction of the relay. Bytes are read into the thread's read buffer
/// ([`read_buffers`]) and written on at once; only what the far side cannot take yet is
/// kept, so a quiet relay (an IMAP IDLE) holds no buffer at all.
struct Direction {
    /// Read, not yet written: empty, with no capacity, whenever the far side keeps up.
    pending: BytesMut,
    /// Written since the last flush.
    unflushed: bool,
    /// The reading side has closed; its end is passed on once `pending` is written.
    read_closed: bool,
    /// The writing side has been shut down too: this direction is over.
    done: bool,
    count_when: CountWhen,
    counter: Counter,
    copied: u64,
}

impl Direction {
    fn new(count_when: CountWhen, counter: &Counter) -> Direction {
        Direction {
            pending: BytesMut::new(),
            unflushed: false,
            read_closed: false,
            done: false,
            count_when,
            counter: counter.clone(),
            copied: 0,
        }
    }

    fn count(&mut self, when: CountWhen, n: usize) {
        if when == self.count_when {
            self.copied += n as u64;
            self.counter.inc_by(n as u64);
        }
    }

    /// Moves bytes from `from` to `to` until reading would block, an error, or the end.
    /// Ready once both the end of `from` has been passed on and `to` is shut down;
    /// `moved` is set when anything was read.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            if !self.pending.is_empty() {
                ready!(self.poll_write_pending(cx, to))?;
                continue;
            }
            if self.read_closed {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                break;
            }
            let read = read_buffers::poll_read(from, cx, |cx, read| -> io::Result<()> {
                let data = read?;
                if data.is_empty() {
                    self.read_closed = true;
                    return Ok(());
                }
                *moved = true;
                self.count(CountWhen::Read, data.len());
                self.write_through(cx, to, data)
            });
            match read {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    // Nothing more to read for now: what was written goes out.
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `data` straight from the thread's read buffer; the rest waits in `pending`.
    fn write_through<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
        mut data: &[u8],
    ) -> io::Result<()> {
        while !data.is_empty() {
            match Pin::new(&mut *to).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    data = &data[n..];
                    self.unflushed = true;
                    self.count(CountWhen::Written, n);
                }
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {
                    self.pending.extend_from_slice(data);
                    break;
                }
            }
        }
        Ok(())
    }

    fn poll_write_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
            self.unflushed = true;
            self.count(CountWhen::Written, n);
        }
        // Give the memory back: a relay may now sit idle for half an hour.
        self.pending = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

/// Copies both ways until both sides close or `idle` passes without a byte read; `bytes`
/// counts what is read from the client and written to it as it moves (a relay can last
/// hours), and so does `copied`, for this session alone.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    bytes: &RelayedBytes,
    copied: &mut Copied,
) -> io::Result<End>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut to_upstream = Direction::new(CountWhen::Read, &bytes.client_to_upstream);
    let mut to_client = Direction::new(CountWhen::Written, &bytes.upstream_to_client);
    let mut deadline = pin!(tokio::time::sleep(idle));
    poll_fn(|cx| {
        let mut moved = false;
        let up = to_upstream.poll_copy(cx, client, upstream, &mut moved);
        let down = to_client.poll_copy(cx, upstream, client, &mut moved);
        *copied = Copied {
            from_client: to_upstream.copied,
            to_client: to_client.copied,
        };
        let (up, down) = (up?, down?);
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(End::Closed));
        }
        if moved {
            deadline.as_mut().reset(Instant::now() + idle);
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(End::Idle)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
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
            let mut copied = Copied::default();
            let end = splice(
                &mut client_near,
                &mut upstream_near,
                Duration::from_secs(60),
                &counted,
                &mut copied,
            )
            .await;
            (end.unwrap(), copied)
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
        // Far more than the 64-byte pipes hold: most of it waits for the client to read.
        let reply: Vec<u8> = (0..100_003u32).map(|i| (i % 241) as u8).collect();
        upstream_far.write_all(&reply).await.unwrap();
        upstream_far.shutdown().await.unwrap();
        drop(upstream_far);
        assert_eq!(writer.await.unwrap(), reply);
        assert_eq!(
            relay.await.unwrap(),
            (
                End::Closed,
                Copied {
                    from_client: 100_000,
                    to_client: 100_003
                }
            )
        );
        assert_eq!(bytes.client_to_upstream.get(), 100_000);
        assert_eq!(bytes.upstream_to_client.get(), 100_003);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_in_both_directions_ends_the_relay_and_traffic_keeps_it_alive() {
        let (mut client_far, mut client_near) = duplex(64);
        let (mut upstream_near, mut upstream_far) = duplex(64);
        let relay = tokio::spawn(async move {
            let mut copied = Copied::default();
            let end = splice(
                &mut client_near,
                &mut upstream_near,
                Duration::from_secs(60),
                &RelayedBytes::default(),
                &mut copied,
            )
            .await;
            (end.unwrap(), copied)
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
        // The summary of an idle-ended relay still has what crossed.
        assert_eq!(
            relay.await.unwrap(),
            (
                End::Idle,
                Copied {
                    from_client: 0,
                    to_client: 5 * 17
                }
            )
        );
    }

    /// A writer whose every write fails, like a client that reset the connection.
    struct Reset;

    impl AsyncWrite for Reset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Reset {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// Relays until [`Reset`] fails a write: `sent` comes from a pipe on one side, the
    /// other side is the reset one. Returns the session's and the listener's counts.
    async fn relay_into_a_reset(sent: &[u8], reset_is_the_client: bool) -> (Copied, RelayedBytes) {
        let (mut near, mut far) = duplex(64);
        far.write_all(sent).await.unwrap();
        let bytes = RelayedBytes::default();
        let mut copied = Copied::default();
        let idle = Duration::from_secs(60);
        let ended = if reset_is_the_client {
            splice(&mut Reset, &mut near, idle, &bytes, &mut copied).await
        } else {
            splice(&mut near, &mut Reset, idle, &bytes, &mut copied).await
        };
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        (copied, bytes)
    }

    #[tokio::test]
    async fn what_the_client_sent_is_counted_even_when_the_upstream_fails() {
        let (copied, bytes) = relay_into_a_reset(b"a1 NOOP\r\n", false).await;
        let read = Copied {
            from_client: 9,
            to_client: 0,
        };
        assert_eq!(copied, read);
        assert_eq!(bytes.client_to_upstream.get(), 9);
    }

    #[tokio::test]
    async fn what_never_reached_the_client_is_not_counted_as_sent() {
        let (copied, bytes) = relay_into_a_reset(b"* 1 FETCH\r\n", true).await;
        assert_eq!(copied, Copied::default());
        assert_eq!(bytes.upstream_to_client.get(), 0);
    }
}
