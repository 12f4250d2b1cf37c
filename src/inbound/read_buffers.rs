//! The thread-local read buffers: one read buffer per thread, shared by every session
//! on it, plus one read-ahead buffer under TLS streams. A read lands here and is handed
//! on within the same poll, so an idle connection holds no read buffer of its own
//! (thousands of idle sessions cost only their TLS state).

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

/// Size of the read-ahead buffer under a TLS stream. Also the most a session whose
/// reader has stalled keeps of it (`driver::Prefixed`).
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
