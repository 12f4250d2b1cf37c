//! The DATA body: streamed through, end-of-data recognised only at `CRLF.CRLF`
//! (RFC 5321 §4.1.1.4), every bare LF and bare CR rewritten to CRLF before it reaches the
//! upstream.
//!
//! Why this shape: SMTP smuggling (CVE-2023-51764/51765/51766) lives in the gap between
//! two implementations that disagree on where a message ends. Here the upstream only
//! ever sees CRLF line ends, so it can only end the message where mailmoat did: a line
//! `.` that was not a true `CRLF.CRLF` from the client (`\n.\n`, `\r.\r`, `\r\n.\n`, ...)
//! is content, and is forwarded dot-stuffed (`..`, RFC 5321 §4.5.2) so that the upstream
//! also reads it as content.
//!
//! Legacy upstreams written around C strings drop NUL bytes (and some other control
//! bytes) before they look at a line, so `\0.` or `.\0` would end their message where
//! mailmoat sees content. mailmoat does not model which bytes an upstream drops: it
//! writes every line so that it is content for a reader that drops any of them. A line
//! whose first byte other than C0 controls and DEL is `.` is stuffed (`\0.` goes as
//! `.\0.`); a client's stuffing dot before nothing but such bytes is taken off (`.\0`
//! goes as `\0`, which is what RFC 5321 §4.5.2 makes of it anyway). A strict upstream
//! reads exactly the client's content either way; each rewrite is counted
//! (`smuggling_neutralized`).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// Most control bytes held at the start of a line while the proxy waits for the byte
/// that decides how to write it: a text line has at most 998 octets (RFC 5321
/// §4.5.3.1.6). A longer run is refused.
const MAX_HELD_PREFIX: usize = 998;

/// A byte some upstream may drop before it reads a line: C0 controls but CR and LF, and
/// DEL.
fn is_droppable(b: u8) -> bool {
    (b < 0x20 && b != b'\r' && b != b'\n') || b == 0x7f
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line; `after_crlf` says the previous line ended in a true CRLF
    /// (the DATA command's own line counts).
    LineStart { after_crlf: bool },
    /// Inside a line whose content is not a lone `.`.
    Mid,
    /// A CR was seen inside a line; the next byte decides whether it was a CRLF.
    Cr,
    /// The line so far is `.`.
    Dot { after_crlf: bool },
    /// The line so far is `.` followed by CR.
    DotCr { after_crlf: bool },
    /// The line so far is droppable bytes only, held.
    Prefix,
    /// The line so far is `.` and droppable bytes, held (without the dot).
    DotPrefix,
}

/// Where [`Body::feed`] writes what the upstream must receive: bytes of its own, and
/// runs of the input that pass unchanged.
pub trait Output {
    /// Bytes the scanner writes (line ends, stuffing dots, held control bytes).
    fn put(&mut self, bytes: &[u8]);
    /// `input[range]` passes unchanged.
    fn pass(&mut self, input: &[u8], range: Range<usize>);
}

/// Everything copied into one buffer.
impl Output for BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.put_slice(bytes);
    }

    fn pass(&mut self, input: &[u8], range: Range<usize>) {
        self.put_slice(&input[range]);
    }
}

/// Runs shorter than this are copied: a part each would cost more than the copy.
const MIN_SHARED_RUN: usize = 512;

/// The body path's output: long unchanged runs stay slices of the input buffer (no
/// copy: they leave in one gathered write), the scanner's own bytes and short runs are
/// collected in between.
#[derive(Debug)]
pub struct Forward {
    input: Bytes,
    parts: Vec<Bytes>,
    pending: BytesMut,
}

impl Forward {
    /// An output for a `feed` of `input`, which must be the very bytes fed.
    pub fn new(input: Bytes) -> Self {
        Forward {
            input,
            parts: Vec::new(),
            pending: BytesMut::new(),
        }
    }

    /// The parts for the upstream, in order.
    pub fn into_parts(mut self) -> Vec<Bytes> {
        self.flush();
        self.parts
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.parts.push(self.pending.split().freeze());
        }
    }
}

impl Output for Forward {
    fn put(&mut self, bytes: &[u8]) {
        self.pending.put_slice(bytes);
    }

    fn pass(&mut self, input: &[u8], range: Range<usize>) {
        debug_assert!(
            std::ptr::eq(input, &self.input[..]),
            "fed bytes are the input"
        );
        if range.len() < MIN_SHARED_RUN {
            return self.pending.put_slice(&input[range]);
        }
        self.flush();
        self.parts.push(self.input.slice(range));
    }
}

/// What one call to [`Body::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input was body; more is expected.
    More,
    /// End-of-data ended after this many input bytes; the rest are commands.
    End { consumed: usize },
    /// A line began with more control bytes than a text line may hold: the message
    /// cannot be written safely and must be dropped.
    Refused,
}

/// The scanner for one message body.
#[derive(Debug, Clone)]
pub struct Body {
    state: State,
    bare_newlines: u64,
    neutralized: u64,
    /// The droppable bytes of `Prefix` / `DotPrefix`.
    held: Vec<u8>,
}

impl Default for Body {
    fn default() -> Self {
        Body {
            state: State::LineStart { after_crlf: true },
            bare_newlines: 0,
            neutralized: 0,
            held: Vec::new(),
        }
    }
}

impl Body {
    /// How many bare CRs and LFs were rewritten so far.
    pub fn bare_newlines(&self) -> u64 {
        self.bare_newlines
    }

    /// How many lines were rewritten so that no upstream can read them as the end.
    pub fn neutralized(&self) -> u64 {
        self.neutralized
    }

    /// Scans `input`, writing what the upstream must receive to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut impl Output) -> Progress {
        let mut i = 0;
        while i < input.len() {
            if let State::Mid | State::LineStart { after_crlf: true } = self.state {
                // Fast path: what needs nothing done passes in one copy.
                let (lines, rest) = self.clean_run(&input[i..]);
                out.pass(input, i..i + lines + rest);
                i += lines + rest;
                if rest > 0 {
                    self.state = State::Mid;
                } else if lines > 0 {
                    self.state = State::LineStart { after_crlf: true };
                }
                if i == input.len() {
                    break;
                }
            }
            let byte = input[i];
            i += 1;
            match (self.state, byte) {
                (State::LineStart { after_crlf }, b'.') => self.state = State::Dot { after_crlf },
                (State::LineStart { .. } | State::Mid, b'\r') => self.state = State::Cr,
                (State::LineStart { .. } | State::Mid, b'\n') => self.bare_line_end(out),
                (State::LineStart { .. }, other) if is_droppable(other) => {
                    self.held.push(other);
                    self.state = State::Prefix;
                }
                (State::LineStart { .. } | State::Mid, other) => {
                    out.put(&[other]);
                    self.state = State::Mid;
                }
                (State::Cr, b'\n') => {
                    out.put(b"\r\n");
                    self.state = State::LineStart { after_crlf: true };
                }
                (State::Cr, _) => {
                    self.bare_line_end(out);
                    i -= 1; // the byte starts the next line
                }
                (State::Dot { after_crlf }, b'\r') => self.state = State::DotCr { after_crlf },
                (State::Dot { .. }, b'\n') => {
                    out.put(b".");
                    self.bare_line_end_dot(out);
                }
                (State::Dot { .. }, other) if is_droppable(other) => {
                    self.held.push(other);
                    self.state = State::DotPrefix;
                }
                (State::Dot { .. }, other) => {
                    out.put(&[b'.', other]);
                    self.state = State::Mid;
                }
                (State::DotCr { after_crlf: true }, b'\n') => {
                    out.put(b".\r\n");
                    self.state = State::LineStart { after_crlf: true };
                    return Progress::End { consumed: i };
                }
                (State::DotCr { after_crlf: false }, b'\n') => {
                    // `.` CRLF after a bare line end: content, stuffed.
                    out.put(b"..\r\n");
                    self.state = State::LineStart { after_crlf: true };
                }
                (State::DotCr { .. }, _) => {
                    out.put(b".");
                    self.bare_line_end_dot(out);
                    i -= 1;
                }
                (State::Prefix | State::DotPrefix, other) if is_droppable(other) => {
                    if self.held.len() >= MAX_HELD_PREFIX {
                        return Progress::Refused;
                    }
                    self.held.push(other);
                }
                (State::Prefix | State::DotPrefix, b'.') => {
                    // The first byte a dropping reader keeps is a dot: stuffed, so that
                    // it can never stand alone. Already stuffed by the client: as sent.
                    if self.state == State::Prefix {
                        self.neutralized += 1;
                    }
                    out.put(b".");
                    out.put(&self.held);
                    out.put(b".");
                    self.held.clear();
                    self.state = State::Mid;
                }
                (State::Prefix | State::DotPrefix, b'\r' | b'\n') => {
                    // Only droppable bytes on the line: written without a dot, so that a
                    // dropping reader sees an empty line. A client's stuffing dot here
                    // stuffed nothing (RFC 5321 §4.5.2 removes it).
                    if self.state == State::DotPrefix {
                        self.neutralized += 1;
                    }
                    out.put(&self.held);
                    self.held.clear();
                    self.state = State::Mid;
                    i -= 1; // the line end, as inside any line
                }
                (State::Prefix | State::DotPrefix, other) => {
                    if self.state == State::DotPrefix {
                        out.put(b".");
                    }
                    out.put(&self.held);
                    out.put(&[other]);
                    self.held.clear();
                    self.state = State::Mid;
                }
            }
        }
        Progress::More
    }

    /// What of `input` the upstream gets unchanged, as (lines, rest): `lines` bytes of
    /// the current line's rest and whole lines, each ended by CRLF with no other CR or
    /// LF, none but the current one starting with `.` or a droppable byte (which may
    /// stuff or end the data); then `rest` bytes of the next line with no CR or LF, not
    /// starting with either. The byte after them, if any, is a CR, an LF or such a
    /// line-starting byte.
    fn clean_run(&self, input: &[u8]) -> (usize, usize) {
        let mut lines = 0;
        // The current line may start with a dot only if it is already under way.
        let mut at_line_start = self.state != State::Mid;
        loop {
            if at_line_start
                && input
                    .get(lines)
                    .is_some_and(|&b| b == b'.' || is_droppable(b))
            {
                return (lines, 0);
            }
            let Some(n) = memchr::memchr2(b'\r', b'\n', &input[lines..]) else {
                return (lines, input.len() - lines);
            };
            let end = lines + n;
            if input[end] != b'\r' || input.get(end + 1) != Some(&b'\n') {
                return (lines, n);
            }
            lines = end + 2;
            at_line_start = true;
        }
    }

    /// A bare CR or LF ended a line: forward CRLF instead.
    fn bare_line_end(&mut self, out: &mut impl Output) {
        out.put(b"\r\n");
        self.bare_newlines += 1;
        self.state = State::LineStart { after_crlf: false };
    }

    /// A line `.` ended by a bare CR or LF: content. One `.` was written; stuff a second.
    fn bare_line_end_dot(&mut self, out: &mut impl Output) {
        out.put(b".");
        self.bare_line_end(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in one piece: returns what the upstream gets and where the body ended.
    fn scan(input: &[u8]) -> (Vec<u8>, Option<usize>, u64) {
        let mut body = Body::default();
        let mut out = BytesMut::new();
        let end = match body.feed(input, &mut out) {
            Progress::More | Progress::Refused => None,
            Progress::End { consumed } => Some(consumed),
        };
        (out.to_vec(), end, body.bare_newlines())
    }

    /// As [`scan`], fed one byte at a time.
    fn scan_bytewise(input: &[u8]) -> (Vec<u8>, Option<usize>, u64) {
        let mut body = Body::default();
        let mut out = BytesMut::new();
        for (i, byte) in input.iter().enumerate() {
            if let Progress::End { .. } = body.feed(std::slice::from_ref(byte), &mut out) {
                return (out.to_vec(), Some(i + 1), body.bare_newlines());
            }
        }
        (out.to_vec(), None, body.bare_newlines())
    }

    #[test]
    fn a_plain_message_ends_at_crlf_dot_crlf_and_leaves_the_rest() {
        let (out, end, bare) = scan(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n.\r\n");
        assert_eq!(end, Some(24));
        assert_eq!(bare, 0);
    }

    #[test]
    fn an_empty_message_ends_at_the_first_dot_line() {
        assert_eq!(scan(b".\r\n"), (b".\r\n".to_vec(), Some(3), 0));
    }

    #[test]
    fn stuffed_dots_pass_unchanged() {
        let (out, end, _) = scan(b"..\r\n..x\r\n.x\r\n.\r\n");
        assert_eq!(out, b"..\r\n..x\r\n.x\r\n.\r\n");
        assert_eq!(end, Some(16));
    }

    #[test]
    fn smuggling_sequences_are_content_and_never_reach_the_upstream_bare() {
        let table: &[(&[u8], &[u8], u64)] = &[
            (
                b"a\n.\nMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n",
                2,
            ),
            (
                b"a\r.\rMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n",
                2,
            ),
            (
                b"a\r\n.\nMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n",
                1,
            ),
            (
                b"a\n.\r\nMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n",
                1,
            ),
            (b"a\r\n.\rMAIL\r\n", b"a\r\n..\r\nMAIL\r\n", 1),
            (b"a\n\n", b"a\r\n\r\n", 2),
            (b"x\ry", b"x\r\ny", 1),
        ];
        for (input, expected, bare) in table {
            let (out, end, count) = scan(input);
            assert_eq!(
                (String::from_utf8_lossy(&out), end, count),
                (String::from_utf8_lossy(expected), None, *bare),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_genuine_crlf_dot_crlf_ends_even_after_a_bare_cr() {
        // "a" CR, then CRLF "." CRLF: the client did send CRLF.CRLF.
        assert_eq!(
            scan(b"a\r\r\n.\r\nb"),
            (b"a\r\n\r\n.\r\n".to_vec(), Some(7), 1)
        );
    }

    #[test]
    fn a_true_end_after_smuggling_attempts_still_ends() {
        let (out, end, _) = scan(b"a\n.\nb\r\n.\r\n");
        assert_eq!(out, b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(end, Some(10));
    }

    /// Where a reader that drops every C0 control byte but CR and LF, and DEL, before it
    /// looks at a line (a C-string legacy MTA) reads an end of data in `out`, if at all.
    fn dropping_reader_end(out: &[u8]) -> Option<usize> {
        let mut start = 0;
        while let Some(n) = memchr::memchr(b'\n', &out[start..]) {
            let line: Vec<u8> = out[start..start + n]
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && !is_droppable(b))
                .collect();
            start += n + 1;
            if line == b"." {
                return Some(start);
            }
        }
        None
    }

    #[test]
    fn lines_a_dropping_reader_would_end_on_are_content_for_every_reader() {
        let table: &[(&[u8], &[u8], u64)] = &[
            (b"\0.\r\n", b".\0.\r\n", 1),
            (b".\0\r\n", b"\0\r\n", 1),
            (b"\t\x7f.\r\n", b".\t\x7f.\r\n", 1),
            (b".\x01\x02\n", b"\x01\x02\r\n", 1),
            // Nothing a dropping reader could take for the end: as sent.
            (b"\0\r\n", b"\0\r\n", 0),
            (b"\tindented\r\n", b"\tindented\r\n", 0),
            (b".\0.\r\n", b".\0.\r\n", 0),
            (b".\0x\r\n", b".\0x\r\n", 0),
            (b"..\0\r\n", b"..\0\r\n", 0),
            (b"\0x.\r\n", b"\0x.\r\n", 0),
        ];
        for (input, expected, neutralized) in table {
            let mut body = Body::default();
            let mut out = BytesMut::new();
            assert_eq!(body.feed(input, &mut out), Progress::More);
            assert_eq!(
                (String::from_utf8_lossy(&out), body.neutralized()),
                (String::from_utf8_lossy(expected), *neutralized),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(dropping_reader_end(&out), None);
        }
    }

    #[test]
    fn the_nul_dot_smuggling_body_ends_only_at_the_clients_crlf_dot_crlf() {
        let input =
            b"Subject: x\r\n\r\nhi\r\n\0.\r\nAUTH PLAIN AGFAYg==\r\nMAIL FROM:<a@b>\r\n.\r\n";
        let (out, end, _) = scan(input);
        assert_eq!(end, Some(input.len()));
        assert_eq!(dropping_reader_end(&out), Some(out.len()));
    }

    #[test]
    fn a_line_of_control_bytes_longer_than_a_text_line_is_refused() {
        let mut body = Body::default();
        let mut out = BytesMut::new();
        let line = vec![0u8; MAX_HELD_PREFIX];
        assert_eq!(body.feed(&line, &mut out), Progress::More);
        assert_eq!(body.feed(b"\0", &mut out), Progress::Refused);
        // Just within the bound, the line goes on as content.
        let mut body = Body::default();
        let mut out = BytesMut::new();
        assert_eq!(body.feed(&line, &mut out), Progress::More);
        assert_eq!(body.feed(b".\r\n", &mut out), Progress::More);
        assert_eq!(out.len(), MAX_HELD_PREFIX + 4);
        assert_eq!(out[0], b'.');
    }

    /// The body path's output: long clean runs are slices of the input (no copy), and
    /// what the parts add up to is byte for byte what the copying output holds.
    #[test]
    fn long_clean_runs_are_shared_not_copied() {
        let mut input = "x".repeat(2000).into_bytes();
        input.extend_from_slice(b"\r\nbare\nline\r\n");
        input.extend_from_slice(&[b'y'; 3000]);
        let input = Bytes::from(input);
        let mut shared = Forward::new(input.clone());
        let mut copied = BytesMut::new();
        assert_eq!(Body::default().feed(&input, &mut shared), Progress::More);
        assert_eq!(Body::default().feed(&input, &mut copied), Progress::More);
        let parts = shared.into_parts();
        assert_eq!(parts.concat(), copied.to_vec());
        let within_input = |part: &Bytes| {
            let range = input.as_ptr_range();
            range.contains(&part.as_ptr()) && part.len() >= MIN_SHARED_RUN
        };
        assert!(
            within_input(&parts[0]),
            "the 2000-byte run is a slice of the input"
        );
        assert!(
            within_input(parts.last().unwrap()),
            "so is the 3000-byte one"
        );
    }

    proptest! {
        /// Whatever is fed, in any chunking, the sharing output gives the same bytes as
        /// the copying one.
        #[test]
        fn the_sharing_output_writes_what_the_copying_one_does(
            input in proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8),
                Just(b'a'), Just(b'a'), Just(b'a'), Just(b'a'),
            ], 0..3000),
            cut in 0usize..3000,
        ) {
            let cut = cut.min(input.len());
            let (mut copied_body, mut shared_body) = (Body::default(), Body::default());
            let mut copied = BytesMut::new();
            let mut parts = Vec::new();
            for piece in [&input[..cut], &input[cut..]] {
                let piece = Bytes::copy_from_slice(piece);
                let mut shared = Forward::new(piece.clone());
                let a = copied_body.feed(&piece, &mut copied);
                let b = shared_body.feed(&piece, &mut shared);
                prop_assert_eq!(a, b);
                parts.extend(shared.into_parts());
                if a != Progress::More {
                    break;
                }
            }
            prop_assert_eq!(parts.concat(), copied.to_vec());
        }

        /// Whatever the client sends, a reader that drops NUL and other control bytes
        /// ends the message exactly where mailmoat did, and any chunking writes the same.
        #[test]
        fn a_dropping_reader_never_ends_early(
            input in proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), Just(0u8), Just(b'\t'), Just(0x7fu8), Just(0x01u8),
            ], 0..300),
            cut in 0usize..300,
        ) {
            let (out, end, _) = scan(&input);
            match end {
                Some(_) => prop_assert_eq!(dropping_reader_end(&out), Some(out.len())),
                None => prop_assert_eq!(dropping_reader_end(&out), None),
            }
            let cut = cut.min(input.len());
            let mut body = Body::default();
            let mut chunked = BytesMut::new();
            if let Progress::More = body.feed(&input[..cut], &mut chunked) {
                body.feed(&input[cut..], &mut chunked);
            }
            let (bytewise, _, _) = scan_bytewise(&input);
            prop_assert_eq!(&bytewise, &out);
            prop_assert_eq!(chunked.to_vec(), out);
        }

        /// Any chunking gives the same upstream bytes and the same end.
        #[test]
        fn chunking_is_invisible(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..12),
        ) {
            // One byte at a time, no clean line is ever whole in one piece: the run of
            // lines is never taken, only the state machine and single plain bytes.
            let (expected, expected_end, expected_bare) = scan_bytewise(&input);
            let (whole, whole_end, whole_bare) = scan(&input);
            prop_assert_eq!(&whole, &expected);
            prop_assert_eq!(whole_end, expected_end);
            prop_assert_eq!(whole_bare, expected_bare);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            cuts.push(input.len());
            let mut body = Body::default();
            let mut out = BytesMut::new();
            let (mut start, mut end) = (0, None);
            for cut in cuts {
                if end.is_some() { break; }
                if let Progress::End { consumed } = body.feed(&input[start..cut], &mut out) {
                    end = Some(start + consumed);
                }
                start = cut;
            }
            prop_assert_eq!(out.to_vec(), expected);
            prop_assert_eq!(end, expected_end);
            prop_assert_eq!(body.bare_newlines(), expected_bare);
        }

        /// The upstream never sees a bare CR or LF, and never an end-of-data before the end.
        #[test]
        fn output_is_canonical(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..300),
        ) {
            let (out, end, _) = scan(&input);
            for (i, &b) in out.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert!(out.get(i + 1) == Some(&b'\n')); }
            }
            let eod = out.windows(5).position(|w| w == b"\r\n.\r\n");
            let starts_with_eod = out.starts_with(b".\r\n");
            match end {
                None => prop_assert!(eod.is_none() && !starts_with_eod),
                Some(_) => prop_assert!(starts_with_eod || eod == Some(out.len() - 5)),
            }
        }
    }
}
