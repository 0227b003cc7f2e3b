//! The container of Keel's snapshot state files.
//!
//! A state file is a fixed header followed by the payload:
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! | 0      | 8    | magic, `KEELSNAP`                                |
//! | 8      | 4    | format version, little endian ([`FORMAT_VERSION`]) |
//! | 12     | 8    | payload length in bytes, little endian           |
//! | 20     | 4    | CRC-32 (IEEE) of the payload, little endian      |
//! | 24     | 4    | reserved, zero                                   |
//! | 28     | n    | payload: the state, serialized with postcard     |
//!
//! [`decode`] checks the magic, the version, the length (a truncated file
//! and one with bytes after the payload are both refused), the checksum,
//! and only then deserializes, so a damaged file is reported as damaged,
//! never misread. The payload format is postcard's (stable, compact, no
//! self-description): the format version changes whenever the state's
//! types change, and a file of another version is refused by number.
//!
//! Nothing here panics on any input; the `fuzz/` target `snapshot_state`
//! feeds [`decode`] arbitrary bytes.

#![deny(missing_docs)]

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KEELSNAP";

/// The version of the state format this crate reads and writes. It grows
/// with every change to the state's types.
pub const FORMAT_VERSION: u32 = 1;

/// The header's size in bytes.
pub const HEADER_SIZE: usize = 28;

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Shorter than a header.
    #[error("state file is {found} bytes, shorter than the {HEADER_SIZE}-byte header: not a Keel snapshot, or truncated")]
    TooShort {
        /// The file's length.
        found: usize,
    },
    /// The magic is wrong.
    #[error("state file starts with {found:02x?}, not \"KEELSNAP\": not a Keel snapshot")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// Written by another format version.
    #[error("state file has format version {found}; this Keel reads version {supported} only")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this crate reads.
        supported: u32,
    },
    /// The payload is not as long as the header says.
    #[error("state file payload is {found} bytes, but its header says {expected}: the file is truncated or has bytes appended")]
    WrongLength {
        /// The length in the header.
        expected: u64,
        /// The bytes after the header.
        found: u64,
    },
    /// The payload's checksum differs from the header's.
    #[error("state file checksum mismatch: header says {expected:#010x}, payload has {found:#010x}: the file is corrupted")]
    Checksum {
        /// The CRC-32 in the header.
        expected: u32,
        /// The CRC-32 of the payload.
        found: u32,
    },
    /// The payload does not decode as the expected state.
    #[error("state file payload does not decode: {0}")]
    Malformed(String),
    /// The state could not be serialized.
    #[error("cannot serialize the state: {0}")]
    Serialize(String),
}

/// Serializes `state` into a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, Error> {
    let mut out =
        postcard::to_extend(state, vec![0u8; HEADER_SIZE]).map_err(|e| Error::Serialize(e.to_string()))?;
    let payload_len = (out.len() - HEADER_SIZE) as u64;
    let crc = crc32fast::hash(&out[HEADER_SIZE..]);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&payload_len.to_le_bytes());
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A complete state file around an already serialized `payload` (for
/// tools and fuzzing: the fuzz target frames arbitrary bytes with it so
/// that they reach the payload decoder).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_SIZE];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[20..24].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a state file's header, length and checksum; returns its payload.
pub fn payload(bytes: &[u8]) -> Result<&[u8], Error> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_SIZE>() else {
        return Err(Error::TooShort { found: bytes.len() });
    };
    let field = |range: std::ops::Range<usize>| &header[range];
    let magic: [u8; 8] = field(0..8).try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let expected = u64::from_le_bytes(field(12..20).try_into().unwrap_or_default());
    let found = payload.len() as u64;
    if expected != found {
        return Err(Error::WrongLength { expected, found });
    }
    let expected_crc = u32::from_le_bytes(field(20..24).try_into().unwrap_or_default());
    let crc = crc32fast::hash(payload);
    if crc != expected_crc {
        return Err(Error::Checksum {
            expected: expected_crc,
            found: crc,
        });
    }
    Ok(payload)
}

/// Reads a complete state file: checks it ([`payload`]) and deserializes
/// its payload, which must be consumed entirely.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let payload = payload(bytes)?;
    let (state, rest) = postcard::take_from_bytes(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Malformed(format!(
            "{} bytes left over after the state",
            rest.len()
        )));
    }
    Ok(state)
}

/// The README's example, run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct State {
        counter: u64,
        regs: Vec<u32>,
    }

    fn sample() -> Vec<u8> {
        encode(&State {
            counter: 42,
            regs: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn a_state_round_trips() {
        let back: State = decode(&sample()).unwrap();
        assert_eq!(
            back,
            State {
                counter: 42,
                regs: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let good = sample();
        assert_eq!(decode::<State>(&good[..10]), Err(Error::TooShort { found: 10 }));

        let mut other = good.clone();
        other[0] = b'X';
        assert!(matches!(decode::<State>(&other), Err(Error::BadMagic { .. })));
        assert!(decode::<State>(&other)
            .unwrap_err()
            .to_string()
            .contains("not a Keel snapshot"));

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            decode::<State>(&newer).unwrap_err().to_string(),
            "state file has format version 7; this Keel reads version 1 only"
        );

        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            decode::<State>(truncated),
            Err(Error::WrongLength { .. })
        ));
        let mut extended = good.clone();
        extended.push(0);
        assert!(matches!(
            decode::<State>(&extended),
            Err(Error::WrongLength { .. })
        ));

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x10;
        assert!(matches!(decode::<State>(&flipped), Err(Error::Checksum { .. })));
    }

    #[test]
    fn a_payload_of_another_shape_is_malformed_not_misread() {
        // A valid container around a payload that is not a `State`.
        let bytes = encode(&(1u8,)).unwrap();
        let err = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u32;
        for len in 0..200 {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = decode::<State>(&bytes);
            if bytes.len() >= HEADER_SIZE {
                bytes[..8].copy_from_slice(&MAGIC);
                bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                let _ = decode::<State>(&bytes);
            }
        }
    }
}
