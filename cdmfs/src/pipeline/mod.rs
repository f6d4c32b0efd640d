//! The data pipeline of a volume: fingerprint (dedup), compress, encrypt.
//!
//! Order on write: the plain block is fingerprinted (blake3; keyed with a
//! pool secret for encrypted volumes), looked up in the dedup index, and
//! only if new compressed (zstd, kept only when it saves at least 1/8) and
//! encrypted (XTS, tweak = where the bytes live in the pool). The extent's
//! crc32c covers the stored bytes, so scrub verifies without keys. Reads
//! undo it in reverse. See docs/design.md "Data reduction".

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod codec;
mod seal;

// The codec is the engine's own; tests, benches and fuzzers reach it
// with the `test-utils` feature.
pub use codec::CryptoRec;
#[cfg(feature = "test-utils")]
pub use codec::*;
#[cfg(not(feature = "test-utils"))]
pub(crate) use codec::*;
pub use seal::SealRec;
#[cfg(feature = "test-utils")]
pub use seal::*;
#[cfg(not(feature = "test-utils"))]
pub(crate) use seal::*;

/// Highest compression level: 1 = fastest … 8 = balanced … 29 = smallest.
pub const MAX_LEVEL: u8 = 29;

/// Maps a cdm compression level (1–29) to a zstd level: 1–7 are zstd's
/// fast levels −7…−1, 8–29 are zstd 1…22.
pub fn zstd_level(level: u8) -> i32 {
    let l = level.clamp(1, MAX_LEVEL) as i32;
    if l <= 7 {
        l - 8
    } else {
        l - 7
    }
}

/// Block ciphers for encryption at rest, all in XTS mode (IEEE 1619).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    #[serde(rename = "aes-256-xts")]
    Aes256Xts,
    #[serde(rename = "aes-128-xts")]
    Aes128Xts,
    #[serde(rename = "sm4-xts")]
    Sm4Xts,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [Cipher::Aes256Xts, Cipher::Aes128Xts, Cipher::Sm4Xts];

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Xts => "aes-256-xts",
            Cipher::Aes128Xts => "aes-128-xts",
            Cipher::Sm4Xts => "sm4-xts",
        }
    }

    pub fn parse(s: &str) -> Result<Cipher> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown cipher {s:?}: use aes-256-xts, aes-128-xts or sm4-xts"
                ))
            })
    }

    /// The id stored in extent flags (bits 8–9).
    pub fn id(self) -> u16 {
        match self {
            Cipher::Aes256Xts => 0,
            Cipher::Aes128Xts => 1,
            Cipher::Sm4Xts => 2,
        }
    }

    pub fn from_id(id: u16) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.id() == id)
    }
}

/// A volume's data-reduction and encryption policy. Snapshots and clones
/// keep the policy of the volume they come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPolicy {
    #[serde(default)]
    pub dedup: bool,
    /// 0 = off, 1–29 (see [`zstd_level`]).
    #[serde(default)]
    pub compression: u8,
    #[serde(default)]
    pub encryption: Option<Cipher>,
}

impl DataPolicy {
    pub fn is_plain(&self) -> bool {
        *self == DataPolicy::default()
    }
    pub fn check(&self) -> Result<()> {
        if self.compression > MAX_LEVEL {
            return Err(Error::Invalid(format!(
                "compression level {} must be 0 (off) or 1-{MAX_LEVEL}",
                self.compression
            )));
        }
        Ok(())
    }
}

/// `dedup,zstd-8,aes-256-xts`, or `-` for none.
impl std::fmt::Display for DataPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.dedup {
            parts.push("dedup".into());
        }
        if self.compression > 0 {
            parts.push(format!("zstd-{}", self.compression));
        }
        if let Some(c) = self.encryption {
            parts.push(c.name().into());
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// Where the key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// Raw key material (a key file: 32 or 64 bytes, or as many in hex).
    Key(Vec<u8>),
    /// A passphrase, stretched with Argon2id and a per-pool salt.
    Passphrase(String),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Key(_) => "KeySource::Key(..)",
            KeySource::Passphrase(_) => "KeySource::Passphrase(..)",
        })
    }
}

impl KeySource {
    /// Reads a key file (see [`KeySource::from_key_file_bytes`]).
    pub fn from_key_file(path: &std::path::Path) -> Result<KeySource> {
        let b = std::fs::read(path)
            .map_err(|e| Error::Invalid(format!("cannot read key file {}: {e}", path.display())))?;
        Self::from_key_file_bytes(&b)
            .map_err(|e| Error::Invalid(format!("key file {}: {e}", path.display())))
    }

    /// Reads a key file: 32 or 64 raw bytes, or 64/128 hex digits (with
    /// optional surrounding whitespace).
    pub fn from_key_file_bytes(b: &[u8]) -> Result<KeySource> {
        let text = std::str::from_utf8(b).ok().map(str::trim);
        if let Some(t) = text {
            if (t.len() == 64 || t.len() == 128) && t.bytes().all(|c| c.is_ascii_hexdigit()) {
                let k = hex::decode(t).map_err(|e| Error::Invalid(format!("key file: {e}")))?;
                return Ok(KeySource::Key(k));
            }
        }
        if b.len() == 32 || b.len() == 64 {
            return Ok(KeySource::Key(b.to_vec()));
        }
        Err(Error::Invalid(format!(
            "key file holds {} bytes: it must hold 32 or 64 random bytes, or 64/128 hex digits \
             (make one with: head -c 32 /dev/urandom > key)",
            b.len()
        )))
    }
}
