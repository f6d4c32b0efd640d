//! Writing a block the pool already holds, by fingerprint alone: the
//! receiving side of replication maps every block whose chunk it has (from
//! any volume) without the data crossing the wire
//! (`docs/replication.md`, "Engine support").
//!
//! It is the dedup hit of the write path without the data: the index
//! lookup and the reference are taken exactly as `take_dedup_hits` takes
//! them (logged as `Action::Take` before the block is mapped, so replay
//! after a crash never double-frees the reference; a concurrent flush can
//! log the Take in a record before the mapping is logged, and a crash
//! between the two leaks the reference — space only, as in the dedup write
//! path, see `docs/replication.md`), and the
//! block is mapped by `map_blocks` like any whole-block write (replacing
//! whatever was mapped, pieces included), under the write's range lock.

use crate::error::{Error, Result};

use super::write::Written;
use super::{Pool, Target};

impl Pool {
    /// Maps the block at `offset` of volume `vol` (block-aligned: the
    /// whole block) to the chunk the dedup index holds for `fp` (the plain
    /// blake3 of the block's bytes) and takes a reference on it. Ok(false),
    /// with nothing changed, when the index has no such chunk, or the
    /// volume has no dedup or is encrypted (its fingerprints are keyed, so
    /// a plain fingerprint names nothing it could map).
    pub fn write_known(&self, vol: u64, offset: u64, fp: &[u8; 32]) -> Result<bool> {
        let policy = self.policy_of(vol)?;
        if !policy.dedup || policy.encryption.is_some() {
            return Ok(false);
        }
        let (size, bs) = self.geometry(Target::Volume(vol))?;
        let bs64 = bs as u64;
        if offset >= size {
            return Err(Error::OutOfRange {
                offset,
                len: bs64,
                size,
            });
        }
        if !offset.is_multiple_of(bs64) {
            return Err(Error::Invalid(format!(
                "offset {offset} is not a multiple of the block size {bs}"
            )));
        }
        // The last block of a volume whose size is not a multiple of the
        // block size is still a whole block in the tree.
        let len = bs64.min(size - offset);
        // `begin_write` checks the range again under the range lock (a
        // revert may have shrunk the volume meanwhile) and returns the block
        // size that holds while the lock does.
        let Some((_range, bs_now)) = self.begin_write(vol, offset, len)? else {
            return Ok(false);
        };
        if bs_now != bs {
            return Err(Error::Busy(format!(
                "volume {vol} changed block size during a write"
            )));
        }
        let hits = self.take_dedup_hits(&[Some(*fp)])?;
        let Some(e) = hits.into_iter().next().flatten() else {
            return Ok(false);
        };
        let w = Written {
            exts: vec![(offset / bs64, Some(e))],
            objects: Vec::new(),
            index: Vec::new(),
            io: Ok(()),
        };
        self.map_blocks(vol, w, vec![e])?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::pipeline::{Cipher, DataPolicy, KeySource};
    use crate::testdev::MemDev;
    use crate::{FormatOptions, OpenOptions};

    use super::*;

    fn pool(key: bool) -> Pool {
        let dev = Arc::new(MemDev::new(32 << 20));
        Pool::format(&*dev, &FormatOptions::default()).unwrap();
        let opts = OpenOptions {
            key: key.then(|| KeySource::Key(vec![7; 32])),
            ..OpenOptions::default()
        };
        Pool::open(dev, &opts).unwrap()
    }

    const DEDUP: DataPolicy = DataPolicy {
        dedup: true,
        compression: 0,
        encryption: None,
    };

    #[test]
    fn a_known_block_is_mapped_and_an_unknown_one_is_not() {
        let p = pool(false);
        let a = p.create_volume_with("a", 1 << 20, 65536, DEDUP).unwrap();
        let b = p.create_volume_with("b", 1 << 20, 65536, DEDUP).unwrap();
        let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
        p.write(a.id, 0, &block).unwrap();
        let fp = *blake3::hash(&block).as_bytes();
        assert!(p.write_known(b.id, 3 * 65536, &fp).unwrap());
        let mut got = vec![0u8; 65536];
        p.read(Target::Volume(b.id), 3 * 65536, &mut got).unwrap();
        assert_eq!(got, block);
        assert_eq!(p.volume("b").unwrap().allocated_bytes, 65536);
        // Unknown: nothing changes.
        let before = p.changes().unwrap();
        assert!(!p.write_known(b.id, 0, &[9; 32]).unwrap());
        assert_eq!(p.changes().unwrap(), before);
        assert!(matches!(
            p.write_known(b.id, 100, &fp),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            p.write_known(b.id, 1 << 20, &fp),
            Err(Error::OutOfRange { .. })
        ));
        p.commit().unwrap();
        assert!(p.fsck().unwrap().is_clean());
    }

    #[test]
    fn volumes_without_dedup_or_with_encryption_map_nothing() {
        let p = pool(true);
        let a = p.create_volume_with("a", 1 << 20, 4096, DEDUP).unwrap();
        p.write(a.id, 0, &[5; 4096]).unwrap();
        let fp = *blake3::hash(&[5; 4096]).as_bytes();
        let plain = p.create_volume("plain", 1 << 20, 4096).unwrap();
        let enc = DataPolicy {
            encryption: Some(Cipher::Aes256Xts),
            ..DEDUP
        };
        let e = p.create_volume_with("enc", 1 << 20, 4096, enc).unwrap();
        assert!(!p.write_known(plain.id, 0, &fp).unwrap());
        assert!(!p.write_known(e.id, 0, &fp).unwrap());
        // An encrypted volume's chunks are indexed under keyed fingerprints.
        p.write(e.id, 0, &[6; 4096]).unwrap();
        let d = p.create_volume_with("d", 1 << 20, 4096, DEDUP).unwrap();
        assert!(!p
            .write_known(d.id, 0, blake3::hash(&[6; 4096]).as_bytes())
            .unwrap());
        assert!(p.write_known(d.id, 0, &fp).unwrap());
    }
}
