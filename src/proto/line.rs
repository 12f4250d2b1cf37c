//! The one line framer: cuts complete lines out of a byte buffer with a hard length cap.
//!
//! Both directions use it. Lines end at LF; a CR before the LF is part of the terminator.
//! A line that ends in a bare LF is still a line (RFC 5321 §2.3.8 forbids it, but real
//! clients and legacy upstreams send it), and the framer says so, so that callers can
//! canonicalise what they forward. Nothing here parses: nom runs on whole lines only.

use bytes::{Bytes, BytesMut};

/// A complete line, without its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line's bytes, without the CRLF or LF that ended it.
    pub text: Bytes,
    /// The line as it arrived, terminator included (for verbatim relaying).
    pub raw: Bytes,
    /// The line ended in a bare LF instead of CRLF.
    pub bare_lf: bool,
}

/// Why no line could be cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The buffer holds more than the cap without a line end.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The cap in force.
        max: usize,
    },
}

/// Cuts lines of at most `max_len` bytes (terminator included) out of a buffer.
#[derive(Debug, Clone)]
pub struct Framer {
    max_len: usize,
    /// How far the buffer was already searched for LF, so a slow trickle of bytes is
    /// scanned once, not once per read.
    scanned: usize,
}

impl Framer {
    /// A framer whose lines may be at most `max_len` bytes long, terminator included.
    pub fn new(max_len: usize) -> Self {
        Framer {
            max_len,
            scanned: 0,
        }
    }

    /// Takes the next complete line off the front of `buf`, if there is one.
    ///
    /// Returns `Ok(None)` when more bytes are needed, and `LineTooLong` once the buffer
    /// holds `max_len` bytes without a line end; the caller decides what to do with them.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, Error> {
        let search_end = buf.len().min(self.max_len);
        match memchr::memchr(b'\n', &buf[self.scanned.min(search_end)..search_end]) {
            Some(offset) => {
                let lf = self.scanned.min(search_end) + offset;
                self.scanned = 0;
                let raw = buf.split_to(lf + 1).freeze();
                let bare_lf = lf == 0 || raw[lf - 1] != b'\r';
                let text_len = if bare_lf { lf } else { lf - 1 };
                Ok(Some(Line {
                    text: raw.slice(..text_len),
                    raw,
                    bare_lf,
                }))
            }
            None if buf.len() >= self.max_len => Err(Error::LineTooLong { max: self.max_len }),
            None => {
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    /// Forgets scan progress; call when the buffer was taken away or replaced.
    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(framer: &mut Framer, buf: &mut BytesMut) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        while let Some(line) = framer.next_line(buf).unwrap() {
            out.push((line.text.to_vec(), line.bare_lf));
        }
        out
    }

    #[test]
    fn cuts_crlf_and_bare_lf_lines_and_keeps_the_remainder() {
        let mut framer = Framer::new(64);
        let mut buf = BytesMut::from(&b"EHLO a\r\nNOOP\nRSET\r"[..]);
        assert_eq!(
            lines(&mut framer, &mut buf),
            vec![(b"EHLO a".to_vec(), false), (b"NOOP".to_vec(), true)]
        );
        assert_eq!(&buf[..], b"RSET\r");
        buf.extend_from_slice(b"\n");
        assert_eq!(
            lines(&mut framer, &mut buf),
            vec![(b"RSET".to_vec(), false)]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn raw_keeps_the_terminator() {
        let mut framer = Framer::new(64);
        let mut buf = BytesMut::from(&b"250 ok\n"[..]);
        let line = framer.next_line(&mut buf).unwrap().unwrap();
        assert_eq!(&line.raw[..], b"250 ok\n");
    }

    #[test]
    fn empty_lines_are_lines() {
        let mut framer = Framer::new(8);
        let mut buf = BytesMut::from(&b"\r\n\n"[..]);
        assert_eq!(
            lines(&mut framer, &mut buf),
            vec![(vec![], false), (vec![], true)]
        );
    }

    #[test]
    fn a_line_of_exactly_the_cap_passes_and_one_more_byte_fails() {
        let mut framer = Framer::new(6);
        let mut buf = BytesMut::from(&b"NOOP\r\n"[..]);
        assert_eq!(
            lines(&mut framer, &mut buf),
            vec![(b"NOOP".to_vec(), false)]
        );
        let mut buf = BytesMut::from(&b"NOOPS\r\n"[..]);
        assert_eq!(
            framer.next_line(&mut buf),
            Err(Error::LineTooLong { max: 6 })
        );
    }

    #[test]
    fn an_endless_line_fails_once_the_cap_is_reached_not_before() {
        let mut framer = Framer::new(100);
        let mut buf = BytesMut::new();
        for _ in 0..99 {
            buf.extend_from_slice(b"x");
            assert_eq!(framer.next_line(&mut buf), Ok(None));
        }
        buf.extend_from_slice(b"x");
        assert_eq!(
            framer.next_line(&mut buf),
            Err(Error::LineTooLong { max: 100 })
        );
    }

    proptest! {
        /// Every chunking of the same stream yields the same lines.
        #[test]
        fn chunking_does_not_change_the_lines(
            stream in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a')], 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let mut whole = Framer::new(1000);
            let mut buf = BytesMut::from(&stream[..]);
            let expected = lines(&mut whole, &mut buf);

            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            let mut framer = Framer::new(1000);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain(std::iter::once(stream.len())) {
                buf.extend_from_slice(&stream[start..cut]);
                start = cut;
                got.extend(lines(&mut framer, &mut buf));
            }
            prop_assert_eq!(got, expected);
        }
    }
}
