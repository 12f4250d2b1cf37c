//! The thread-local read buffers: one per thread, shared by every session on it. A read
//! lands here and is handed on within the same poll, so an idle connection holds no
//! read buffer of its own (thousands of idle sessions cost only their TLS state). Below
//! TLS streams a second one reads ahead of rustls' small reads ([`poll_read_ahead`]). A
//! session streaming a body reads into its own buffer instead ([`poll_read_into`]), and
//! so does a TLS stream while bytes keep flowing (`driver::Prefixed`).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Large enough for a whole socket buffer's worth in one system call.
const READ_BUFFER_LEN: usize = 64 * 1024;

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUFFER_LEN].into_boxed_slice());
}

/// Most a TLS stream's reader reads ahead of what rustls takes (`driver::Prefixed`).
pub const READ_AHEAD_LEN: usize = 32 * 1024;

thread_local! {
    /// Under a TLS stream, while the stream above reads into [`READ_BUFFER`].
    static READ_AHEAD: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_AHEAD_LEN].into_boxed_slice());
}

/// Polls one read of `stream` (of up to [`READ_AHEAD_LEN`] bytes) for a reader below a
/// TLS stream; `consume` gets the bytes (or the error) within the same poll.
pub fn poll_read_ahead<S, R>(
    stream: &mut S,
    cx: &mut Context<'_>,
    consume: impl FnOnce(io::Result<&[u8]>) -> R,
) -> Poll<R>
where
    S: AsyncRead + Unpin + ?Sized,
{
    with_buffer(&READ_AHEAD, READ_AHEAD_LEN, |buffer| {
        read_into(buffer, stream, cx, |_, read| consume(read))
    })
}

/// Polls one read of `stream` and hands the result to `consume` within the same poll (an
/// empty slice is the end of the stream). `consume` gets the context back, to write on.
pub fn poll_read<S, R>(
    stream: &mut S,
    cx: &mut Context<'_>,
    consume: impl FnOnce(&mut Context<'_>, io::Result<&[u8]>) -> R,
) -> Poll<R>
where
    S: AsyncRead + Unpin + ?Sized,
{
    with_buffer(&READ_BUFFER, READ_BUFFER_LEN, |buffer| {
        read_into(buffer, stream, cx, consume)
    })
}

/// Most a streamed read ([`poll_read_into`]) gathers before the session sees it: four
/// full TLS records, so that a body leaves for the upstream in few, large writes.
pub const STREAM_READ_LEN: usize = 64 * 1024;

/// Polls reads of `stream` straight into `buffer` (a session's own, while it streams a
/// body: no copy through the thread's buffer), as many as are ready, up to
/// [`STREAM_READ_LEN`] bytes in all. `Ok(0)` is the end of the stream; an end or an
/// error after some bytes is left for the next poll to find.
pub fn poll_read_into<S>(
    stream: &mut S,
    cx: &mut Context<'_>,
    buffer: &mut bytes::BytesMut,
) -> Poll<io::Result<usize>>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut total = 0;
    while total < STREAM_READ_LEN {
        buffer.reserve(STREAM_READ_LEN - total);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buffer) {
            Poll::Ready(Ok(0)) => break,
            Poll::Ready(Ok(n)) => total += n,
            Poll::Ready(Err(err)) if total == 0 => return Poll::Ready(Err(err)),
            Poll::Pending if total == 0 => return Poll::Pending,
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
    Poll::Ready(Ok(total))
}

/// Runs `f` on the thread's buffer `key`, or on a fresh one of `len` bytes if it is in
/// use (only if a `consume` ever read again itself: correct, if slower).
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Box<[u8]>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => f(&mut buffer),
        Err(_) => f(&mut vec![0; len]),
    })
}

fn read_into<S, R>(
    buffer: &mut [u8],
    stream: &mut S,
    cx: &mut Context<'_>,
    consume: impl FnOnce(&mut Context<'_>, io::Result<&[u8]>) -> R,
) -> Poll<R>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut buf = ReadBuf::new(buffer);
    match Pin::new(stream).poll_read(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(())) => Poll::Ready(consume(cx, Ok(buf.filled()))),
        Poll::Ready(Err(err)) => Poll::Ready(consume(cx, Err(err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of `chunks`, each ready at once, then Pending (not the end).
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return Poll::Pending;
            }
            let chunk = self.0.remove(0);
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.insert(0, chunk[n..].to_vec());
            }
            Poll::Ready(Ok(()))
        }
    }

    fn poll_once(stream: &mut Chunks, buffer: &mut bytes::BytesMut) -> Poll<io::Result<usize>> {
        let waker = std::task::Waker::noop();
        poll_read_into(stream, &mut Context::from_waker(waker), buffer)
    }

    #[test]
    fn a_streamed_read_gathers_what_is_ready_up_to_its_bound() {
        // Four TLS records' worth ready: one wake takes them all, in order.
        let mut stream = Chunks(vec![vec![1; 16_000], vec![2; 16_000], vec![3; 16_000]]);
        let mut buffer = bytes::BytesMut::new();
        assert!(matches!(
            poll_once(&mut stream, &mut buffer),
            Poll::Ready(Ok(48_000))
        ));
        assert_eq!((buffer[0], buffer[16_000], buffer[47_999]), (1, 2, 3));
        // More than the bound ready: the bound, the rest at the next wake.
        let mut stream = Chunks(vec![vec![7; STREAM_READ_LEN + 10]]);
        let mut buffer = bytes::BytesMut::new();
        assert!(matches!(
            poll_once(&mut stream, &mut buffer),
            Poll::Ready(Ok(STREAM_READ_LEN))
        ));
        buffer.clear();
        assert!(matches!(
            poll_once(&mut stream, &mut buffer),
            Poll::Ready(Ok(10))
        ));
        // Nothing ready: pending, nothing read.
        assert!(poll_once(&mut stream, &mut buffer).is_pending());
    }

    #[test]
    fn a_streamed_read_of_a_closed_stream_is_its_end() {
        let mut buffer = bytes::BytesMut::new();
        let waker = std::task::Waker::noop();
        let mut empty: &[u8] = &[];
        let read = poll_read_into(&mut empty, &mut Context::from_waker(waker), &mut buffer);
        assert!(matches!(read, Poll::Ready(Ok(0))));
    }
}
