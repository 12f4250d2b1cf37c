//! A client command line cut into its verb and the rest (SMTP and POP3 commands; IMAP
//! lines start with a tag and are read by `imap::parse`), and the table of the verbs a
//! protocol tells apart.

/// Why a command line could not be split into its first word and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitError {
    /// A control character other than HTAB: implementations differ on whether a bare
    /// CR or a NUL ends a command, so such a line is never classified.
    ControlCharacter,
    /// No word at all.
    Empty,
}

/// A client command line split into its verb (POP3's keyword) and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a, V> {
    /// The recognised verb.
    pub verb: V,
    /// The verb as sent (for forwarding after TLS and the stripping heuristic).
    pub verb_text: &'a [u8],
    /// Everything after the white space that follows the verb, trailing white space
    /// removed. Empty when there are no arguments.
    pub args: &'a [u8],
}

/// White space between the words of a command (SP and HTAB, liberally).
pub fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// A command line's first word and the rest, white space around the rest removed:
/// liberal in white space, so that the proxy classifies a line the way lenient
/// upstreams read it.
pub fn split(line: &[u8]) -> Result<(&[u8], &[u8]), SplitError> {
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(SplitError::ControlCharacter);
    }
    let start = line
        .iter()
        .position(|&b| !is_wsp(b))
        .ok_or(SplitError::Empty)?;
    let line = &line[start..];
    let word_end = line.iter().position(|&b| is_wsp(b)).unwrap_or(line.len());
    let (word, rest) = line.split_at(word_end);
    Ok((word, rest.trim_ascii()))
}

/// The verbs a protocol tells apart, by name; every other word is `other`.
#[derive(Debug)]
pub struct Verbs<V: 'static> {
    /// Each verb's name, upper case.
    pub names: &'static [(&'static str, V)],
    /// What any other word is.
    pub other: V,
}

impl<V: Copy + PartialEq> Verbs<V> {
    /// The verb `word` names, letter case ignored.
    pub fn classify(&self, word: &[u8]) -> V {
        self.names
            .iter()
            .find(|(name, _)| name.as_bytes().eq_ignore_ascii_case(word))
            .map_or(self.other, |&(_, verb)| verb)
    }

    /// The verb's name for logs, or `unknown`: never the client's own text.
    pub fn label(&self, verb: V) -> &'static str {
        self.names
            .iter()
            .find(|(_, known)| *known == verb)
            .map_or("unknown", |&(name, _)| name)
    }

    /// `line` split ([`split`]), its verb classified.
    pub fn command<'a>(&self, line: &'a [u8]) -> Result<Command<'a, V>, SplitError> {
        let (verb_text, args) = split(line)?;
        Ok(Command {
            verb: self.classify(verb_text),
            verb_text,
            args,
        })
    }
}
