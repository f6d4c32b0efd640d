//! The agent's state files, one codec: the block fingerprints and the
//! file-tree fingerprints kept in the state directory ([`crate::block`],
//! [`crate::merge`]), and the latter's hash kept on the stage disk.
//!
//! Both are `MAGIC` (8 bytes), little-endian fields, then the BLAKE3 hash
//! of everything before it. The hash makes a half-written or damaged file
//! one that is not trusted, never one that is misread: both files are
//! outside bytes (anyone could have touched them).

/// A block's fingerprint: the first 128 bits of its BLAKE3 hash.
pub type Hash = [u8; 16];

/// The fingerprint of `b`.
pub fn hash(b: &[u8]) -> Hash {
    let mut o = [0u8; 16];
    o.copy_from_slice(&blake3::hash(b).as_bytes()[..16]);
    o
}

use std::path::Path;

const SUM: usize = 32;

/// Why a state file cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Wrong magic or too short to hold the header: `what` names the kind
    /// of file that was expected.
    #[error("not a {0}")]
    NotOurs(&'static str),
    #[error("checksum mismatch (half-written or damaged)")]
    Checksum,
    #[error("truncated")]
    Truncated,
    #[error("length overflow")]
    Overflow,
    #[error("trailing bytes")]
    Trailing,
    #[error("{0}")]
    Invalid(&'static str),
}

/// Builds a state file: the magic, fields, and the checksum at
/// [`Writer::finish`].
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn new(magic: &[u8; 8], capacity: usize) -> Writer {
        let mut b = Vec::with_capacity(capacity + 8 + SUM);
        b.extend_from_slice(magic);
        Writer(b)
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes; the caller writes their length first.
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub fn hashes(&mut self, h: &[Hash]) {
        for x in h {
            self.0.extend_from_slice(x);
        }
    }
    /// The file's bytes, checksum appended.
    pub fn finish(mut self) -> Vec<u8> {
        let sum = blake3::hash(&self.0);
        self.0.extend_from_slice(sum.as_bytes());
        self.0
    }
}

/// Reads the fields of a state file whose magic and checksum held.
pub struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks `b`: at least `min_fields` bytes of fields after `magic`, and
    /// the checksum. `what` names the file in the error ("block
    /// fingerprint file").
    pub fn open(
        b: &'a [u8],
        magic: &[u8; 8],
        min_fields: usize,
        what: &'static str,
    ) -> Result<Reader<'a>, DecodeError> {
        if b.len() < 8 + min_fields + SUM || &b[..8] != magic {
            return Err(DecodeError::NotOurs(what));
        }
        let (body, sum) = b.split_at(b.len() - SUM);
        if blake3::hash(body).as_bytes() != sum {
            return Err(DecodeError::Checksum);
        }
        Ok(Reader { body, pos: 8 })
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Overflow)?;
        let s = self.body.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut o = [0u8; N];
        o.copy_from_slice(self.take(N)?);
        Ok(o)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_le_bytes)
    }
    /// `n` hashes; a count that cannot fit is an error before any
    /// allocation.
    pub fn hashes(&mut self, n: u64) -> Result<Vec<Hash>, DecodeError> {
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(16))
            .ok_or(DecodeError::Overflow)?;
        Ok(self
            .take(len)?
            .chunks_exact(16)
            .map(|c| {
                let mut o = [0u8; 16];
                o.copy_from_slice(c);
                o
            })
            .collect())
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }
    /// Ends reading: every byte must have been read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

/// Why the last run's fingerprints are not used (the run then compares
/// with the stage's own bytes instead).
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error("the last run did not finish")]
    Unfinished,
    #[error("first run")]
    FirstRun,
    #[error("{0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("made for another block size or source size")]
    OtherGeometry,
    #[error("made with {0}-byte blocks")]
    OtherBlockSize(u32),
    #[error("not on this host (the last run was made from another host, or the state directory was lost)")]
    NotOnThisHost,
    #[error("this host's copy is not the last run's (the stage disk records another)")]
    NotTheLastRun,
    #[error("they describe snapshot {have} and the stage's newest is {latest:?}")]
    OtherSnapshot { have: u64, latest: Option<u64> },
}

/// The bytes of the fingerprint file `file`, unless the in-progress
/// `marker` says the run that wrote it was cut.
pub fn read_unless_cut(marker: &Path, file: &Path) -> Result<Vec<u8>, Untrusted> {
    if marker.exists() {
        return Err(Untrusted::Unfinished);
    }
    std::fs::read(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Untrusted::FirstRun
        } else {
            Untrusted::Io(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut w = Writer::new(b"TESTFILE", 0);
        w.u8(7);
        w.u32(1);
        w.u64(2);
        w.i64(-3);
        w.bytes(b"ab");
        w.hashes(&[hash(b"x")]);
        let b = w.finish();
        let mut r = Reader::open(&b, b"TESTFILE", 1, "test file").unwrap();
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 1);
        assert_eq!(r.u64().unwrap(), 2);
        assert_eq!(r.i64().unwrap(), -3);
        assert_eq!(r.take(2).unwrap(), b"ab");
        assert_eq!(r.hashes(1).unwrap(), vec![hash(b"x")]);
        r.finish().unwrap();

        assert_eq!(
            Reader::open(&b, b"OTHERONE", 1, "test file").err(),
            Some(DecodeError::NotOurs("test file"))
        );
        let mut bad = b.clone();
        bad[9] ^= 1;
        assert_eq!(
            Reader::open(&bad, b"TESTFILE", 1, "x").err(),
            Some(DecodeError::Checksum)
        );
        let mut r = Reader::open(&b, b"TESTFILE", 1, "x").unwrap();
        assert_eq!(r.hashes(u64::MAX).err(), Some(DecodeError::Overflow));
        assert_eq!(r.take(1000).err(), Some(DecodeError::Truncated));
        assert_eq!(r.finish().err(), Some(DecodeError::Trailing));
    }
}
