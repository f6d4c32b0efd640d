//! Sealed blocks: the logical encryption layer of raw encrypted
//! replication (docs/design.md, "Sealed volumes").
//!
//! A stored extent of an encrypted volume is XTS-encrypted with the tweak
//! = its pool address, so stored ciphertext cannot move to another pool.
//! A *sealed* volume instead holds blocks that are already ciphertext
//! under the seal keys of the pool that sealed them (derived from that
//! pool's master key); its own pool stores those bytes as ordinary data.
//! The tweak of a sealed block is its logical place (nonce, block index),
//! so sealed bytes copy between pools as they are.
//!
//! Format of a block of `n` bytes (the volume's block size, or less for
//! a volume's short last block; `n >= 512`):
//! - an all-zero plain block is an all-zero sealed block (holes stay holes);
//! - a block that zstd shrinks enough is `MAGIC | L (u32 LE) |
//!   XTS(tweak_c, zstd frame zero-padded to L) | zeros to n`, so the
//!   pool's own compression stores little more than the frame;
//! - any other block is `XTS(tweak_f, plain)`, length-preserving.

use serde::{Deserialize, Serialize};

use super::codec::{compress, decompress_frame, CryptoRec, Keys};
use super::Cipher;
use crate::error::{Error, Result};

/// The seal format this program writes and reads.
pub const SEAL_VERSION: u32 = 1;

/// Marks the compressed form: a fixed random constant. A full-form block
/// is XTS ciphertext, which starts with these 12 bytes with probability
/// 2^-96 and cannot be steered there by anyone without the seal keys; the
/// decoder also needs a valid length and zeros after it before it takes a
/// block for the compressed form.
pub const SEAL_MAGIC: [u8; 12] = [
    0x5e, 0xa1, 0xed, 0x7c, 0x93, 0x0b, 0xd4, 0x26, 0xe8, 0x4f, 0x1a, 0xb7,
];

/// Smallest sealed block (a sector): a volume is sealed only when its
/// size is a multiple of it.
pub const MIN_SEALED_BLOCK: usize = 512;

/// Smallest padded length of the compressed payload (XTS needs at least
/// one 16-byte block; 32 keeps ciphertext stealing out of tiny frames).
const MIN_PAYLOAD: usize = 32;
/// Header of the compressed form: magic and length.
const HEADER: usize = 16;
/// cdm compression level of sealing: 8 = zstd 1, fast.
const SEAL_LEVEL: u8 = 8;

/// How a sealed volume's blocks were sealed. No secret in it: `crypto` is
/// the sealing pool's key record (KDF, salt, costs, check value), so the
/// same key file or passphrase unlocks the seal keys anywhere.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SealRec {
    /// [`SEAL_VERSION`].
    pub version: u32,
    /// The key record of the pool that sealed the blocks.
    pub crypto: CryptoRec,
    pub cipher: Cipher,
    /// Separates the tweaks of different volume lineages under one key.
    pub nonce: u64,
}

impl SealRec {
    /// Names the seal: hex of the first 16 bytes of blake3 over the
    /// canonical encoding (`"cdm seal id v1"`, the check value's length as
    /// u64 LE and its bytes, the cipher id as one byte, the nonce as u64
    /// LE). Volumes with the same seal id share keys.
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"cdm seal id v1");
        h.update(&(self.crypto.check.len() as u64).to_le_bytes());
        h.update(self.crypto.check.as_bytes());
        h.update(&[self.cipher.id() as u8]);
        h.update(&self.nonce.to_le_bytes());
        hex::encode(&h.finalize().as_bytes()[..16])
    }

    /// Rejects a record this program cannot read.
    pub fn check(&self) -> Result<()> {
        if self.version != SEAL_VERSION {
            return Err(Error::Invalid(format!(
                "seal version {} is not supported (this program reads version {SEAL_VERSION})",
                self.version
            )));
        }
        Ok(())
    }

    /// XTS tweak of the full form of block `index`.
    fn tweak_full(&self, index: u64) -> u128 {
        debug_assert!(index < 1 << 63);
        ((self.nonce as u128) << 64) | index as u128
    }

    /// XTS tweak of the compressed form of block `index` (never equal to
    /// a full-form tweak).
    fn tweak_compressed(&self, index: u64) -> u128 {
        self.tweak_full(index) | 1 << 63
    }
}

fn check_len(n: usize, out: usize) -> Result<()> {
    if n < 16 || n != out {
        return Err(Error::Invalid(format!(
            "a sealed block of {n} bytes into {out}: blocks must be at least 16 bytes and \
             sealed into a buffer of their size"
        )));
    }
    Ok(())
}

/// Seals `plain` (block `index` of its volume) into `out` (as long).
pub fn seal_block(
    keys: &Keys,
    seal: &SealRec,
    index: u64,
    plain: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let n = plain.len();
    check_len(n, out.len())?;
    if plain.iter().all(|&b| b == 0) {
        out.fill(0);
        return Ok(());
    }
    let limit = n - n / 8;
    if let Some(c) = compress(SEAL_LEVEL, plain) {
        let l = c.len().max(MIN_PAYLOAD);
        if HEADER + l <= limit {
            out.fill(0);
            out[..12].copy_from_slice(&SEAL_MAGIC);
            out[12..16].copy_from_slice(&(l as u32).to_le_bytes());
            let payload = &mut out[HEADER..HEADER + l];
            payload[..c.len()].copy_from_slice(&c);
            keys.crypt(seal.cipher, payload, seal.tweak_compressed(index), true);
            return Ok(());
        }
    }
    out.copy_from_slice(plain);
    keys.crypt(seal.cipher, out, seal.tweak_full(index), true);
    Ok(())
}

/// Unseals `sealed` (block `index` of its volume) into `out` (as long).
/// Bytes that are no sealed block of these keys give garbage or
/// `Error::Corrupt`, never a panic.
pub fn unseal_block(
    keys: &Keys,
    seal: &SealRec,
    index: u64,
    sealed: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let n = sealed.len();
    check_len(n, out.len())?;
    if sealed.iter().all(|&b| b == 0) {
        out.fill(0);
        return Ok(());
    }
    if let Some(l) = compressed_len(sealed) {
        let mut payload = sealed[HEADER..HEADER + l].to_vec();
        keys.crypt(
            seal.cipher,
            &mut payload,
            seal.tweak_compressed(index),
            false,
        );
        let plain = decompress_frame(&payload, n).map_err(|why| {
            Error::Corrupt(format!("sealed block {index} (seal {}): {why}", seal.id()))
        })?;
        if plain.len() != n {
            return Err(Error::Corrupt(format!(
                "sealed block {index} (seal {}) unsealed to {} bytes, expected {n}",
                seal.id(),
                plain.len()
            )));
        }
        out.copy_from_slice(&plain);
        return Ok(());
    }
    out.copy_from_slice(sealed);
    keys.crypt(seal.cipher, out, seal.tweak_full(index), false);
    Ok(())
}

/// The payload length of a block in the compressed form, or None for the
/// full form: the magic, a length from 32 to n-16, zeros after it.
fn compressed_len(sealed: &[u8]) -> Option<usize> {
    let n = sealed.len();
    if n < HEADER + MIN_PAYLOAD || sealed[..12] != SEAL_MAGIC {
        return None;
    }
    let l = u32::from_le_bytes(sealed[12..16].try_into().ok()?) as usize;
    if !(MIN_PAYLOAD..=n - HEADER).contains(&l) || sealed[HEADER + l..].iter().any(|&b| b != 0) {
        return None;
    }
    Some(l)
}

/// Seals (or with `seal` false unseals) consecutive blocks of a volume:
/// `data` holds the bytes at `offset` of a volume of `size` bytes and
/// block size `bs` (`offset` block-aligned, `data` whole blocks except a
/// short last block at the end of the volume). Returns the result.
pub fn seal_range(
    keys: &Keys,
    rec: &SealRec,
    bs: u64,
    size: u64,
    offset: u64,
    data: &[u8],
    seal: bool,
) -> Result<Vec<u8>> {
    check_aligned(bs, size, offset, data.len() as u64)?;
    let mut out = vec![0u8; data.len()];
    let mut pos = 0usize;
    while pos < data.len() {
        let off = offset + pos as u64;
        let n = bs.min(size - off) as usize;
        let (src, dst) = (&data[pos..pos + n], &mut out[pos..pos + n]);
        if seal {
            seal_block(keys, rec, off / bs, src, dst)?;
        } else {
            unseal_block(keys, rec, off / bs, src, dst)?;
        }
        pos += n;
    }
    Ok(out)
}

/// Checks that `len` bytes at `offset` are whole blocks of a volume of
/// `size` bytes and block size `bs` (the last may end at the volume's end).
pub fn check_aligned(bs: u64, size: u64, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len).filter(|&e| e <= size);
    let Some(end) = end else {
        return Err(Error::OutOfRange { offset, len, size });
    };
    if !offset.is_multiple_of(bs) || !(end.is_multiple_of(bs) || end == size) {
        return Err(Error::Invalid(format!(
            "sealed I/O of {len} bytes at {offset} is not whole blocks of {bs} bytes \
             (the last block may end at the volume's end, {size})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::KeySource;
    use rand::{Rng, SeedableRng};

    fn keys(k: u8) -> (CryptoRec, Keys) {
        let src = KeySource::Key(vec![k; 32]);
        let (rec, _) = Keys::create(&src).unwrap();
        let keys = Keys::unlock_seal(&rec, &src).unwrap();
        (rec, keys)
    }

    fn rec(crypto: &CryptoRec, nonce: u64, cipher: Cipher) -> SealRec {
        SealRec {
            version: SEAL_VERSION,
            crypto: crypto.clone(),
            cipher,
            nonce,
        }
    }

    fn text(n: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog "
            .iter()
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
        v
    }

    fn seal(k: &Keys, r: &SealRec, i: u64, p: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; p.len()];
        seal_block(k, r, i, p, &mut out).unwrap();
        out
    }

    fn unseal(k: &Keys, r: &SealRec, i: u64, s: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; s.len()];
        unseal_block(k, r, i, s, &mut out).map(|()| out)
    }

    #[test]
    fn round_trips_at_several_sizes() {
        let (crypto, k) = keys(1);
        for cipher in Cipher::ALL {
            let r = rec(&crypto, 77, cipher);
            for n in [512, 1536, 4096, 7680, 65536, 1 << 20] {
                let mut half = text(n);
                half[n / 2..].copy_from_slice(&noise(n - n / 2, n as u64));
                for (what, p) in [
                    ("text", text(n)),
                    ("noise", noise(n, 1)),
                    ("half", half),
                    ("zero", vec![0u8; n]),
                ] {
                    let s = seal(&k, &r, 3, &p);
                    assert_eq!(unseal(&k, &r, 3, &s).unwrap(), p, "{what} {n} {cipher:?}");
                    match what {
                        "zero" => assert!(s.iter().all(|&b| b == 0)),
                        "text" | "half" => {
                            assert_eq!(s[..12], SEAL_MAGIC, "{what} {n}");
                            // Zero padding: the pool compresses it away.
                            let tail = s.iter().rev().take_while(|&&b| b == 0).count();
                            assert!(tail > n / 4, "{what} {n}: {tail}");
                        }
                        _ => {
                            assert_ne!(s[..12], SEAL_MAGIC);
                            assert_ne!(s, p);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_corrupt_compressed_block_is_an_error_not_a_panic() {
        let (crypto, k) = keys(1);
        let r = rec(&crypto, 5, Cipher::Aes256Xts);
        let p = text(4096);
        let s = seal(&k, &r, 0, &p);
        let l = u32::from_le_bytes(s[12..16].try_into().unwrap()) as usize;
        let mut bad = s.clone();
        bad[HEADER + 3] ^= 0x40;
        assert!(matches!(unseal(&k, &r, 0, &bad), Err(Error::Corrupt(_))));
        // Another block index (tweak) decrypts the payload to garbage.
        assert!(matches!(unseal(&k, &r, 1, &s), Err(Error::Corrupt(_))));
        // A length that is no compressed form: read as the full form.
        let mut long = s.clone();
        long[12..16].copy_from_slice(&(4096u32 - 15).to_le_bytes());
        assert_ne!(unseal(&k, &r, 0, &long).unwrap(), p);
        // A byte after the payload: the full form too.
        let mut tail = s.clone();
        tail[HEADER + l + 1] = 1;
        assert_ne!(unseal(&k, &r, 0, &tail).unwrap(), p);
        // Buffers of the wrong size and tiny blocks are refused.
        assert!(matches!(
            unseal_block(&k, &r, 0, &s, &mut [0u8; 10]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            seal_block(&k, &r, 0, &[1; 8], &mut [0u8; 8]),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn a_wrong_key_or_nonce_gives_other_bytes() {
        let (crypto, k) = keys(1);
        let (_, other) = keys(2);
        let r = rec(&crypto, 5, Cipher::Aes256Xts);
        for p in [text(65536), noise(65536, 9)] {
            let s = seal(&k, &r, 2, &p);
            match unseal(&other, &r, 2, &s) {
                Ok(g) => assert_ne!(g, p),
                Err(e) => assert!(matches!(e, Error::Corrupt(_))),
            }
            let s2 = seal(&k, &rec(&crypto, 6, Cipher::Aes256Xts), 2, &p);
            assert_ne!(s, s2, "two nonces seal the same way");
            // Deterministic: the same block seals to the same bytes (so
            // incremental sends and dedup line up).
            assert_eq!(s, seal(&k, &r, 2, &p));
        }
    }

    #[test]
    fn seal_ids_name_key_cipher_and_nonce() {
        let (a, _) = keys(1);
        let (b, _) = keys(2);
        let id = rec(&a, 1, Cipher::Aes256Xts).id();
        assert_eq!(id.len(), 32);
        assert_eq!(id, rec(&a, 1, Cipher::Aes256Xts).id());
        assert_ne!(id, rec(&a, 2, Cipher::Aes256Xts).id());
        assert_ne!(id, rec(&a, 1, Cipher::Sm4Xts).id());
        assert_ne!(id, rec(&b, 1, Cipher::Aes256Xts).id());
        let json = serde_json::to_string(&rec(&a, 1, Cipher::Aes256Xts)).unwrap();
        let back: SealRec = serde_json::from_str(&json).unwrap();
        assert_eq!(back.id(), id);
    }

    #[test]
    fn ranges_seal_blocks_with_a_short_last_one() {
        let (crypto, k) = keys(1);
        let r = rec(&crypto, 5, Cipher::Aes128Xts);
        let (bs, size) = (4096u64, 3 * 4096 + 1024);
        let mut plain = text(size as usize);
        plain[4096..8192].fill(0);
        plain[8192..12288].copy_from_slice(&noise(4096, 3));
        let s = seal_range(&k, &r, bs, size, 0, &plain, true).unwrap();
        assert!(s[4096..8192].iter().all(|&b| b == 0));
        // Block by block equals the range.
        let last = seal_range(&k, &r, bs, size, 3 * 4096, &plain[3 * 4096..], true).unwrap();
        assert_eq!(last, s[3 * 4096..]);
        assert_eq!(seal_range(&k, &r, bs, size, 0, &s, false).unwrap(), plain);
        assert!(matches!(
            seal_range(&k, &r, bs, size, 100, &plain[..4096], true),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            seal_range(&k, &r, bs, size, 0, &plain[..5000], true),
            Err(Error::Invalid(_))
        ));
    }
}
