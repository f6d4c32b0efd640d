//! The binary bodies of the transfer protocol (`docs/replication.md`,
//! "Transfer protocol"): a batch's fingerprint list, the target's bitmap
//! of the blocks it lacks, and the compressed bytes of those blocks.
//!
//! Every body starts with a 4-byte magic naming the body and its version;
//! integers are little-endian. Decoding takes bytes from another appliance
//! (or anyone who reaches the listener): it checks every count and length
//! against the bytes present and against fixed caps *before* allocating,
//! and never panics (`fuzz/fuzz_targets/repl_wire.rs`).
//!
//! This file uses only std, `blake3`, `zstd` and `thiserror`, so the fuzz
//! crate compiles it as it is.

/// Blocks per batch at most.
pub const MAX_BATCH_BLOCKS: usize = 256;
/// Plain bytes of one batch at most: 256 blocks of 64 KiB. Volumes with
/// larger blocks send fewer blocks per batch ([`blocks_per_batch`]), so a
/// batch held in memory on either side stays this small.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 1 << 20;

const FP_MAGIC: &[u8; 4] = b"CRF1";
const MAP_MAGIC: &[u8; 4] = b"CRB1";
const DATA_MAGIC: &[u8; 4] = b"CRD1";
const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a replication body of this version (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("body truncated: {0}")]
    Truncated(&'static str),
    #[error("{0} trailing byte(s) after the body")]
    Trailing(usize),
    #[error("invalid body: {0}")]
    Invalid(String),
    #[error("block at offset {offset} does not match its fingerprint")]
    BadChecksum { offset: u64 },
}

/// What a block of a batch holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// All zeros: the target writes zeros (a hole), no bytes cross.
    Zero,
    /// Data with the blake3 of its plain bytes.
    Data([u8; 32]),
}

/// One block of a batch: its logical offset and length (a whole block,
/// but the volume's last one may be short).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u32,
    pub kind: Kind,
}

/// A batch's fingerprint list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprints {
    pub block_size: u32,
    pub entries: Vec<Entry>,
}

/// Blocks per batch for a volume's block size.
pub fn blocks_per_batch(block_size: u32) -> usize {
    (MAX_BATCH_BYTES / block_size.max(1) as usize).clamp(1, MAX_BATCH_BLOCKS)
}

pub fn check_block_size(bs: u32) -> Result<(), WireError> {
    if bs.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
        Ok(())
    } else {
        Err(WireError::Invalid(format!(
            "block size {bs} is not a power of two from 4 KiB to 1 MiB"
        )))
    }
}

/// A cursor over outside bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn magic(&mut self, want: &[u8; 4]) -> Result<(), WireError> {
        let mut m = [0u8; 4];
        m.copy_from_slice(self.take(4, "magic")?);
        if &m != want {
            return Err(WireError::Magic(m));
        }
        Ok(())
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.b.len()))
        }
    }
}

impl Fingerprints {
    /// `magic | block_size u32 | count u32 | count × (offset u64 | len u32
    /// | kind u8 | blake3 [32] if kind is data)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.entries.len() * 45);
        out.extend_from_slice(FP_MAGIC);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            match &e.kind {
                Kind::Zero => out.push(KIND_ZERO),
                Kind::Data(fp) => {
                    out.push(KIND_DATA);
                    out.extend_from_slice(fp);
                }
            }
        }
        out
    }

    /// Refuses anything [`Fingerprints::encode`] would not write for a
    /// valid batch: a bad block size, more than a batch of blocks, blocks
    /// not aligned, not whole (but the last), not in increasing order.
    pub fn decode(b: &[u8]) -> Result<Fingerprints, WireError> {
        let mut r = Reader { b };
        r.magic(FP_MAGIC)?;
        let block_size = r.u32("block size")?;
        check_block_size(block_size)?;
        let count = r.u32("count")? as usize;
        if count > blocks_per_batch(block_size) {
            return Err(WireError::Invalid(format!(
                "{count} blocks in one batch (at most {})",
                blocks_per_batch(block_size)
            )));
        }
        // Each entry is at least 13 bytes: a count the body cannot hold is
        // refused before anything is allocated for it.
        if r.b.len() < count * 13 {
            return Err(WireError::Truncated("entries"));
        }
        let mut entries = Vec::with_capacity(count);
        let mut next = 0u64;
        for i in 0..count {
            let offset = r.u64("offset")?;
            let len = r.u32("length")?;
            let kind = match r.u8("kind")? {
                KIND_ZERO => Kind::Zero,
                KIND_DATA => {
                    let mut fp = [0u8; 32];
                    fp.copy_from_slice(r.take(32, "fingerprint")?);
                    Kind::Data(fp)
                }
                k => return Err(WireError::Invalid(format!("block kind {k}"))),
            };
            if offset % block_size as u64 != 0 || offset < next {
                return Err(WireError::Invalid(format!(
                    "block offset {offset} is not aligned or not in order"
                )));
            }
            if len == 0 || len > block_size || (len < block_size && i + 1 != count) {
                return Err(WireError::Invalid(format!(
                    "block at {offset} has length {len} (block size {block_size})"
                )));
            }
            next = offset
                .checked_add(block_size as u64)
                .ok_or_else(|| WireError::Invalid(format!("block offset {offset}")))?;
            entries.push(Entry { offset, len, kind });
        }
        r.end()?;
        Ok(Fingerprints {
            block_size,
            entries,
        })
    }
}

/// The target's answer to a fingerprint list: which of its blocks it
/// lacks (`true`), in the list's order.
pub fn encode_lacking(lacking: &[bool]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + lacking.len().div_ceil(8));
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&(lacking.len() as u32).to_le_bytes());
    let mut bytes = vec![0u8; lacking.len().div_ceil(8)];
    for (i, l) in lacking.iter().enumerate() {
        if *l {
            bytes[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bytes);
    out
}

/// Decodes a bitmap that must describe exactly `count` blocks.
pub fn decode_lacking(b: &[u8], count: usize) -> Result<Vec<bool>, WireError> {
    let mut r = Reader { b };
    r.magic(MAP_MAGIC)?;
    let n = r.u32("count")? as usize;
    if n != count {
        return Err(WireError::Invalid(format!(
            "a bitmap of {n} blocks for a batch of {count}"
        )));
    }
    let bytes = r.take(n.div_ceil(8), "bitmap")?;
    r.end()?;
    if !n.is_multiple_of(8) && bytes[n / 8] >> (n % 8) != 0 {
        return Err(WireError::Invalid("bits set past the last block".into()));
    }
    Ok((0..n).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect())
}

/// `magic | plain length u32 | zstd frame of the blocks' bytes in order`.
pub fn encode_data(blocks: &[&[u8]], level: i32) -> std::io::Result<Vec<u8>> {
    let plain: Vec<u8> = blocks.concat();
    let z = zstd::bulk::compress(&plain, level)?;
    let mut out = Vec::with_capacity(8 + z.len());
    out.extend_from_slice(DATA_MAGIC);
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    out.extend_from_slice(&z);
    Ok(out)
}

/// Decodes the bytes of the lacking blocks `want` (in order) and checks
/// each against its fingerprint; nothing is returned unless all match.
/// The plain length must be exactly theirs, so decompression is bounded
/// by what the batch may hold.
pub fn decode_data(b: &[u8], want: &[Entry]) -> Result<Vec<u8>, WireError> {
    let mut r = Reader { b };
    r.magic(DATA_MAGIC)?;
    let n = r.u32("length")? as usize;
    let expect: usize = want.iter().map(|e| e.len as usize).sum();
    if n != expect || n > MAX_BATCH_BYTES {
        return Err(WireError::Invalid(format!(
            "{n} bytes of data for blocks holding {expect}"
        )));
    }
    if want.iter().any(|e| e.kind == Kind::Zero) {
        return Err(WireError::Invalid("data for a zero block".into()));
    }
    let plain = zstd::bulk::decompress(r.b, n)
        .map_err(|e| WireError::Invalid(format!("compressed data: {e}")))?;
    if plain.len() != n {
        return Err(WireError::Invalid(format!(
            "{} bytes of data for blocks holding {n}",
            plain.len()
        )));
    }
    let mut at = 0;
    for e in want {
        let blk = &plain[at..at + e.len as usize];
        if let Kind::Data(fp) = e.kind {
            if blake3::hash(blk).as_bytes() != &fp {
                return Err(WireError::BadChecksum { offset: e.offset });
            }
        }
        at += e.len as usize;
    }
    Ok(plain)
}

/// A block as the sender describes it.
pub fn entry_of(offset: u64, block: &[u8]) -> Entry {
    let kind = if block.iter().all(|b| *b == 0) {
        Kind::Zero
    } else {
        Kind::Data(*blake3::hash(block).as_bytes())
    };
    Entry {
        offset,
        len: block.len() as u32,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> (Fingerprints, Vec<Vec<u8>>) {
        let blocks: Vec<Vec<u8>> = vec![
            vec![7u8; 4096],
            vec![0u8; 4096],
            (0..4096u32).map(|i| (i * 31) as u8).collect(),
            vec![9u8; 100],
        ];
        let offs = [0u64, 4096, 3 * 4096, 7 * 4096];
        let entries = offs
            .iter()
            .zip(&blocks)
            .map(|(o, b)| entry_of(*o, b))
            .collect();
        (
            Fingerprints {
                block_size: 4096,
                entries,
            },
            blocks,
        )
    }

    #[test]
    fn round_trips() {
        let (f, blocks) = batch();
        assert_eq!(f.entries[1].kind, Kind::Zero);
        let b = f.encode();
        assert_eq!(Fingerprints::decode(&b).unwrap(), f);
        let lacking = vec![true, false, true, true, false, false, false, false, true];
        assert_eq!(
            decode_lacking(&encode_lacking(&lacking), 9).unwrap(),
            lacking
        );
        assert!(decode_lacking(&encode_lacking(&[]), 0).unwrap().is_empty());
        let want = [f.entries[0], f.entries[2], f.entries[3]];
        let data = encode_data(&[&blocks[0], &blocks[2], &blocks[3]], 3).unwrap();
        let plain = decode_data(&data, &want).unwrap();
        assert_eq!(plain, [&blocks[0][..], &blocks[2], &blocks[3]].concat());
        assert!(data.len() < 4096, "compressed: {}", data.len());
        assert!(decode_data(&encode_data(&[], 1).unwrap(), &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn refusals() {
        let (f, blocks) = batch();
        let b = f.encode();
        // Every truncation, and a trailing byte.
        for n in 0..b.len() {
            assert!(Fingerprints::decode(&b[..n]).is_err(), "{n}");
        }
        let mut t = b.clone();
        t.push(0);
        assert_eq!(Fingerprints::decode(&t), Err(WireError::Trailing(1)));
        let mut m = b.clone();
        m[3] = b'2';
        assert!(matches!(Fingerprints::decode(&m), Err(WireError::Magic(_))));
        // A huge count with no bytes behind it allocates nothing.
        let mut huge = b[..8].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Fingerprints::decode(&huge).is_err());
        let mut many = b[..8].to_vec();
        many.extend_from_slice(&257u32.to_le_bytes());
        many.extend(std::iter::repeat_n(0u8, 257 * 13));
        assert!(matches!(
            Fingerprints::decode(&many),
            Err(WireError::Invalid(_))
        ));
        let bad = |mutate: &dyn Fn(&mut Fingerprints)| {
            let mut g = f.clone();
            mutate(&mut g);
            Fingerprints::decode(&g.encode()).unwrap_err()
        };
        bad(&|g| g.block_size = 3000);
        bad(&|g| g.entries[1].offset = 100);
        bad(&|g| g.entries.swap(0, 2));
        bad(&|g| g.entries[0].len = 100);
        bad(&|g| g.entries[0].len = 0);
        bad(&|g| g.entries[0].len = 8192);
        bad(&|g| g.entries[3].offset = u64::MAX - 4095);
        // Bitmaps: wrong count, stray bits, truncation.
        let map = encode_lacking(&[true, true, true]);
        assert!(decode_lacking(&map, 4).is_err());
        let mut stray = map.clone();
        stray[8] |= 0x80;
        assert!(decode_lacking(&stray, 3).is_err());
        assert!(decode_lacking(&map[..8], 3).is_err());
        // Data: a changed byte is a bad checksum, named by its block; a
        // length other than the blocks' is refused before decompressing.
        let want = [f.entries[0], f.entries[2]];
        let mut other = blocks[2].clone();
        other[5] ^= 1;
        let data = encode_data(&[&blocks[0], &other], 3).unwrap();
        assert_eq!(
            decode_data(&data, &want),
            Err(WireError::BadChecksum { offset: 3 * 4096 })
        );
        let short = encode_data(&[&blocks[0]], 3).unwrap();
        assert!(matches!(
            decode_data(&short, &want),
            Err(WireError::Invalid(_))
        ));
        let good = encode_data(&[&blocks[0], &blocks[2]], 3).unwrap();
        for n in 0..good.len() {
            assert!(decode_data(&good[..n], &want).is_err(), "{n}");
        }
        // A zstd frame that claims more than the header says.
        let mut lie = good.clone();
        lie[4..8].copy_from_slice(&4096u32.to_le_bytes());
        assert!(decode_data(&lie, &want[..1]).is_err());
        assert!(decode_data(&good, &[f.entries[1]]).is_err(), "zero block");
    }

    #[test]
    fn batch_sizes_follow_the_block_size() {
        assert_eq!(blocks_per_batch(4096), 256);
        assert_eq!(blocks_per_batch(65536), 256);
        assert_eq!(blocks_per_batch(1 << 20), 16);
    }
}
