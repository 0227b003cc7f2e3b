//! The kernel command line: `[key=value ...] program [key=value ...]`.
//!
//! The program is the first word without `=`, so a VMM may put its own
//! `key=value` parameters (`console=ttyS0`, `reboot=k`, ...) anywhere.
//! Numbers are decimal or `0x`-prefixed hexadecimal. The last occurrence of
//! a key wins.

use core::fmt;

/// Why an argument could not be used.
pub enum ArgError<'a> {
    Missing(&'a str),
    NotANumber(&'a str, &'a str),
    OutOfRange(&'a str, u64),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(key) => write!(f, "missing argument {key}="),
            Self::NotANumber(key, value) => write!(f, "{key}={value} is not a number"),
            Self::OutOfRange(key, value) => write!(f, "{key}={value:#x} is out of range"),
        }
    }
}

/// A parsed view of the command line (no allocation: it re-scans the text).
pub struct CommandLine<'a> {
    text: &'a str,
}

impl<'a> CommandLine<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// The whole command line.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The program to run: the first word that is not `key=value`.
    pub fn program(&self) -> Option<&'a str> {
        self.words().find(|w| !w.contains('='))
    }

    /// Words that are neither the program nor `key=value` (ignored).
    pub fn stray_words(&self) -> impl Iterator<Item = &'a str> {
        self.words().filter(|w| !w.contains('=')).skip(1)
    }

    /// Keys not in `known` (ignored: they may be meant for someone else).
    pub fn unknown_keys<'k>(&self, known: &'k [&'k str]) -> impl Iterator<Item = &'a str> + 'k
    where
        'a: 'k,
    {
        self.pairs()
            .map(|(k, _)| k)
            .filter(move |k| !known.contains(k))
    }

    /// The value of `key`, if given.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.pairs()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// Every value of `key`, in order (for keys that may repeat, such as
    /// `virtio_mmio.device=`).
    pub fn values<'k>(&self, key: &'k str) -> impl Iterator<Item = &'a str> + 'k
    where
        'a: 'k,
    {
        self.pairs().filter(move |(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The number `key=N`, if given.
    pub fn number(&self, key: &'a str) -> Result<Option<u64>, ArgError<'a>> {
        match self.value(key) {
            None => Ok(None),
            Some(value) => parse_number(value)
                .map(Some)
                .ok_or(ArgError::NotANumber(key, value)),
        }
    }

    /// The number `key=N`, which must be given.
    pub fn required_number(&self, key: &'a str) -> Result<u64, ArgError<'a>> {
        self.number(key)?.ok_or(ArgError::Missing(key))
    }

    fn words(&self) -> impl Iterator<Item = &'a str> {
        self.text.split_ascii_whitespace()
    }

    fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.words().filter_map(|w| w.split_once('='))
    }
}

/// Parses `123` or `0x7b`.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
