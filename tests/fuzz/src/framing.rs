//! Checks for the two framers, fed in pieces that the input itself chooses: the line
//! framer (`proto::line::Framer`) and the DATA body scanner (`proto::smtp::body::Body`).
//!
//! This file depends on nothing but `mailmoat` and `bytes`, so a regression test in the
//! main package can include it with `#[path]` and replay a crashing input through exactly
//! the code the fuzz target ran.

use bytes::BytesMut;
use mailmoat::proto::line::{Error, Framer};
use mailmoat::proto::smtp::body::{Body, Progress};

/// Cuts `data` into the pieces a driver would read: a length byte `n`, then the next `n`
/// bytes (fewer at the end of the input). Empty pieces are kept: a framer must cope.
pub fn pieces(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n).min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// What a straightforward reading of the framer's contract cuts out of a whole stream.
#[derive(Debug, PartialEq, Eq)]
struct Reference {
    /// Raw lines, terminator included, up to the first over-long one.
    lines: Vec<Vec<u8>>,
    /// A line without LF in its first `max_len` bytes stopped the framing.
    too_long: bool,
    /// Where the framing stopped (the start of the over-long or incomplete line).
    rest: usize,
}

fn reference_lines(stream: &[u8], max_len: usize) -> Reference {
    let mut lines = Vec::new();
    let mut start = 0;
    loop {
        let rest = &stream[start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(lf) if lf < max_len => {
                lines.push(rest[..=lf].to_vec());
                start += lf + 1;
            }
            _ => {
                return Reference {
                    lines,
                    too_long: rest.len() >= max_len,
                    rest: start,
                };
            }
        }
    }
}

/// `line_framer`: byte 0 picks the cap (1..=96), the rest is cut by [`pieces`].
///
/// Checks, for every chunking: each line is at most the cap, terminator included, and is
/// `text` + CRLF or `text` + LF with `bare_lf` saying which; the raw lines followed by the
/// buffered remainder are exactly the bytes fed; the lines and the over-long verdict are
/// those of the whole stream cut at once; after an over-long line the caller clears the
/// buffer and calls `reset`, and framing starts afresh on what follows.
pub fn line_framer(data: &[u8]) {
    let Some((&cap, rest)) = data.split_first() else {
        return;
    };
    let max_len = 1 + usize::from(cap % 96);
    let pieces = pieces(rest);
    let stream: Vec<u8> = pieces.concat();

    let mut framer = Framer::new(max_len);
    let mut buf = BytesMut::new();
    // The segment framed since the last reset: its start in `stream`, its lines so far.
    let mut segment_start = 0;
    let mut segment_lines: Vec<Vec<u8>> = Vec::new();
    // Bytes of the segment consumed as raw lines.
    let mut consumed = 0;
    let mut fed = 0;
    for piece in &pieces {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match framer.next_line(&mut buf) {
                Ok(Some(line)) => {
                    let raw = &line.raw[..];
                    assert!(
                        raw.len() <= max_len,
                        "line of {} > cap {max_len}",
                        raw.len()
                    );
                    assert_eq!(raw.last(), Some(&b'\n'), "a line ends in LF");
                    let crlf = raw.ends_with(b"\r\n");
                    assert_eq!(line.bare_lf, !crlf, "bare_lf of {raw:?}");
                    let terminator = if crlf { 2 } else { 1 };
                    assert_eq!(&line.text[..], &raw[..raw.len() - terminator]);
                    assert!(!line.text.contains(&b'\n'), "LF inside a line");
                    let at = segment_start + consumed;
                    assert_eq!(raw, &stream[at..at + raw.len()], "raw line is the input");
                    consumed += raw.len();
                    segment_lines.push(raw.to_vec());
                }
                Ok(None) => break,
                Err(Error::LineTooLong { max }) => {
                    assert_eq!(max, max_len);
                    assert!(
                        buf.len() >= max_len,
                        "too long with only {} bytes",
                        buf.len()
                    );
                    assert!(
                        !buf[..max_len].contains(&b'\n'),
                        "too long with a LF in reach"
                    );
                    let expected = reference_lines(&stream[segment_start..], max_len);
                    assert_eq!(segment_lines, expected.lines, "lines before the long one");
                    assert!(expected.too_long, "the whole stream has no over-long line");
                    // What every session does: drop the buffer; then start afresh.
                    buf.clear();
                    framer.reset();
                    segment_start = fed;
                    segment_lines.clear();
                    consumed = 0;
                    break;
                }
            }
        }
        let at = segment_start + consumed;
        assert_eq!(&buf[..], &stream[at..fed], "lines + remainder == input");
    }
    let expected = reference_lines(&stream[segment_start..], max_len);
    assert_eq!(segment_lines, expected.lines, "lines of the whole stream");
    // The stream ended: what is left is an incomplete line shorter than the cap (an
    // over-long one would have been reported as soon as the cap was reached).
    assert!(!expected.too_long, "an over-long line went unreported");
    assert_eq!(&buf[..], &stream[segment_start + expected.rest..]);
}

/// Where a body that starts right after `DATA` CRLF ends, per RFC 5321 §4.1.1.4: after the
/// first `CRLF . CRLF` (the DATA line's CRLF counts, so a body may start with `. CRLF`).
fn reference_end(stream: &[u8]) -> Option<usize> {
    if stream.starts_with(b".\r\n") {
        return Some(3);
    }
    stream
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|at| at + 5)
}

/// What one body feed gave: upstream bytes, end offset, bare count, refused.
type Fed = (Vec<u8>, Option<usize>, u64, bool);

/// Feeds `pieces` until the end of data (or a refusal).
fn feed_body(pieces: &[&[u8]]) -> Fed {
    let mut body = Body::default();
    let mut out = BytesMut::new();
    let mut start = 0;
    for piece in pieces {
        match body.feed(piece, &mut out) {
            Progress::More => start += piece.len(),
            Progress::Refused => return (out.to_vec(), None, body.bare_newlines(), true),
            Progress::End { consumed } => {
                assert!(
                    (1..=piece.len()).contains(&consumed),
                    "consumed {consumed} of a {}-byte piece",
                    piece.len()
                );
                return (
                    out.to_vec(),
                    Some(start + consumed),
                    body.bare_newlines(),
                    false,
                );
            }
        }
    }
    (out.to_vec(), None, body.bare_newlines(), false)
}

/// Where a reader that drops C0 controls but CR and LF, and DEL, before it looks at a
/// line (a C-string legacy MTA) reads the end of data in `out`.
fn dropping_reader_end(out: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(n) = out[start..].iter().position(|&b| b == b'\n') {
        let kept: Vec<u8> = out[start..start + n]
            .iter()
            .copied()
            .filter(|&b| b != b'\r' && !((b < 0x20 && b != b'\n') || b == 0x7f))
            .collect();
        start += n + 1;
        if kept == b"." {
            return Some(start);
        }
    }
    None
}

/// `smtp_body`: the input is cut by [`pieces`] and fed to one `Body` until it ends.
///
/// Checks: the upstream bytes have no bare CR or LF; the end is the first true
/// `CRLF.CRLF` of the stream and lies within it; the upstream sees an end-of-data
/// (`CRLF.CRLF`, or `.CRLF` first) exactly there and nowhere before; neither the
/// chunking nor the fast path over runs of clean lines (against a byte-at-a-time feed) changes
/// anything.
pub fn smtp_body(data: &[u8]) {
    let pieces = pieces(data);
    let stream: Vec<u8> = pieces.concat();
    let (out, end, bare, refused) = feed_body(&pieces);

    if !refused {
        assert_eq!(end, reference_end(&stream), "end of data of {stream:?}");
    }
    if let Some(end) = end {
        assert!(end <= stream.len());
    }
    for (i, &b) in out.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i} of {out:?}");
        }
        if b == b'\r' {
            assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i} of {out:?}");
        }
    }
    let upstream_end = if out.starts_with(b".\r\n") {
        Some(3)
    } else {
        out.windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|at| at + 5)
    };
    match end {
        None => assert_eq!(upstream_end, None, "upstream sees an end the proxy did not"),
        Some(_) => assert_eq!(upstream_end, Some(out.len()), "upstream ends elsewhere"),
    }
    // An upstream that drops NUL and other control bytes ends it at the same place.
    match end {
        None => assert_eq!(
            dropping_reader_end(&out),
            None,
            "a dropping reader ends early"
        ),
        Some(_) => assert_eq!(dropping_reader_end(&out), Some(out.len())),
    }

    // The same stream in one piece.
    let whole = match end {
        Some(end) => &stream[..end],
        None => &stream[..],
    };
    let one_piece = feed_body(&[whole]);
    // One byte at a time: no clean line is ever whole in one piece, so the fast path
    // over runs of lines never runs.
    let bytewise: Vec<&[u8]> = whole.chunks(1).collect();
    assert_eq!(
        feed_body(&bytewise),
        one_piece,
        "the fast path changed the result"
    );
    assert_eq!(
        one_piece,
        (out, end, bare, refused),
        "chunking changed the result"
    );
}
