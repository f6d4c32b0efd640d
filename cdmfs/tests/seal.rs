//! Sealed volumes (docs/design.md, "Sealed volumes"): an encrypted
//! volume sent raw to a pool without its key, stored there as ciphertext,
//! readable once the source pool's key is loaded, and sent back.

use std::sync::Arc;

use cdmfs::pipeline::{self, Keys};
use cdmfs::{
    BlockDev, Cipher, DataPolicy, Error, FormatOptions, KeySource, MemDev, OpenOptions, Pool,
    SealRec, Target,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const BS: u32 = 65536;
/// 20 whole blocks and a short last one of 8.5 KiB.
const SIZE: u64 = 20 * BS as u64 + 8704;
const MARKER: &[u8] = b"SEAL-TEST-PLAINTEXT-MARKER:";

fn key() -> KeySource {
    KeySource::Key(vec![7; 32])
}

fn pool(key: Option<KeySource>) -> (Arc<MemDev>, Pool) {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let p = open(&dev, key);
    (dev, p)
}

fn open(dev: &Arc<MemDev>, key: Option<KeySource>) -> Pool {
    let d: Arc<dyn BlockDev> = dev.clone();
    Pool::open(
        d,
        &OpenOptions {
            key,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// Compressible blocks holding the marker, random blocks, zero blocks,
/// and a compressible short last block.
fn source_data() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut d = vec![0u8; SIZE as usize];
    for (k, blk) in d.chunks_mut(BS as usize).enumerate() {
        match k % 4 {
            0 | 3 => {
                let line = format!("{}{k:06} ", std::str::from_utf8(MARKER).unwrap());
                for (i, b) in blk.iter_mut().enumerate() {
                    *b = line.as_bytes()[i % line.len()];
                }
            }
            1 => rng.fill(blk),
            _ => {} // zeros
        }
    }
    d
}

fn read_all(p: &Pool, t: Target) -> Result<Vec<u8>, Error> {
    let (size, _) = p.geometry(t)?;
    let mut buf = vec![0u8; size as usize];
    p.read(t, 0, &mut buf).map(|()| buf)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Copies `from` of pool `a` block by block, sealed with `seal`, into
/// volume `vol` of pool `b` as it is.
fn copy_sealed(a: &Pool, from: Target, seal: &SealRec, b: &Pool, vol: u64) -> Vec<u8> {
    let (size, bs) = a.geometry(from).unwrap();
    let mut all = Vec::new();
    let mut off = 0;
    while off < size {
        let n = (bs as u64).min(size - off) as usize;
        let mut buf = vec![0u8; n];
        a.read_sealed(from, off, &mut buf, seal).unwrap();
        b.write_sealed(vol, off, &buf).unwrap();
        all.extend_from_slice(&buf);
        off += n as u64;
    }
    all
}

const SEALED_POLICY: DataPolicy = DataPolicy {
    dedup: true,
    compression: 8,
    encryption: None,
};

#[test]
fn an_encrypted_volume_sent_raw_is_ciphertext_without_the_key_and_plain_with_it() {
    let (_, a) = pool(Some(key()));
    let enc = DataPolicy {
        dedup: true,
        compression: 8,
        encryption: Some(Cipher::Aes256Xts),
    };
    let src = a.create_volume_with("src", SIZE, BS, enc).unwrap();
    let plain = source_data();
    a.write(src.id, 0, &plain).unwrap();
    let s1 = a
        .create_snapshot("src", "s1", serde_json::json!({}))
        .unwrap();
    let seal = a.seal_for_send(Target::Snapshot(s1.id)).unwrap();
    // Every point of one volume seals the same way.
    assert_eq!(seal, a.seal_for_send(Target::Volume(src.id)).unwrap());
    assert_eq!(seal.cipher, Cipher::Aes256Xts);

    // Pool B has no key at all.
    let (bdev, b) = pool(None);
    let rep = b
        .create_volume_sealed("rep", SIZE, BS, SEALED_POLICY, seal.clone())
        .unwrap();
    assert_eq!(rep.seal.as_ref(), Some(&seal));
    assert!(!rep.seal_key_loaded);
    let sent = copy_sealed(&a, Target::Snapshot(s1.id), &seal, &b, rep.id);
    assert!(
        !contains(&sent, MARKER),
        "the sealed stream holds plain text"
    );
    // Zero blocks stay holes.
    let runs = b.block_status(Target::Volume(rep.id), 0, SIZE).unwrap();
    assert!(runs
        .iter()
        .any(|r| !r.allocated && r.offset == 2 * BS as u64));
    // B gives back the sealed bytes as they are, without keys.
    let mut back = vec![0u8; SIZE as usize];
    b.read_sealed(Target::Volume(rep.id), 0, &mut back, &seal)
        .unwrap();
    assert_eq!(back, sent);
    b.flush().unwrap();
    assert!(!contains(&bdev.image(), MARKER), "pool B holds plain text");

    // Without the seal key: no plain reads or writes.
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::KeyRequired)
    ));
    assert!(matches!(
        b.write(rep.id, 0, &[1; 4096]),
        Err(Error::KeyRequired)
    ));
    assert!(matches!(
        b.load_seal_key(&seal, &KeySource::Key(vec![8; 32])),
        Err(Error::WrongKey(_))
    ));
    assert!(!b.seal_key_loaded(&seal.id()));
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::KeyRequired)
    ));

    // With A's key.
    b.load_seal_key(&seal, &key()).unwrap();
    assert!(b.seal_key_loaded(&seal.id()));
    assert!(b.volume("rep").unwrap().seal_key_loaded);
    assert_eq!(read_all(&b, Target::Volume(rep.id)).unwrap(), plain);

    // Snapshots and clones inherit the seal.
    let bs1 = b
        .create_snapshot("rep", "s1", serde_json::json!({}))
        .unwrap();
    assert_eq!(bs1.seal.as_ref(), Some(&seal));
    assert!(bs1.seal_key_loaded);
    let clone = b.clone_snapshot(bs1.id, "c").unwrap();
    assert_eq!(clone.seal.as_ref(), Some(&seal));
    assert_eq!(read_all(&b, Target::Snapshot(bs1.id)).unwrap(), plain);
    assert_eq!(read_all(&b, Target::Volume(clone.id)).unwrap(), plain);

    // A write through the clone seals: unaligned, across blocks, and into
    // the short last block.
    let mut model = plain.clone();
    let mut w = |off: usize, data: &[u8]| {
        b.write(clone.id, off as u64, data).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    };
    w(BS as usize - 100, &[0xab; 300]);
    w(2 * BS as usize + 4096, &[0xcd; 8192]);
    w(SIZE as usize - 1000, MARKER);
    assert_eq!(read_all(&b, Target::Volume(clone.id)).unwrap(), model);
    assert_eq!(read_all(&b, Target::Snapshot(bs1.id)).unwrap(), plain);
    // Its sealed bytes decode with the keys.
    let keys = Keys::unlock_seal(&seal.crypto, &key()).unwrap();
    let mut raw = vec![0u8; SIZE as usize];
    b.read_sealed(Target::Volume(clone.id), 0, &mut raw, &seal)
        .unwrap();
    assert!(!contains(&raw, MARKER));
    let unsealed = pipeline::seal_range(&keys, &seal, BS as u64, SIZE, 0, &raw, false).unwrap();
    assert_eq!(unsealed, model);

    // Back to A: unsealed into an encrypted volume with A's own keys
    // (nothing loaded there).
    let ret = a.create_volume_with("ret", SIZE, BS, enc).unwrap();
    let mut off = 0;
    while off < SIZE {
        let n = (BS as u64).min(SIZE - off) as usize;
        a.write_unsealing(ret.id, off, &raw[off as usize..off as usize + n], &seal)
            .unwrap();
        off += n as u64;
    }
    assert_eq!(read_all(&a, Target::Volume(ret.id)).unwrap(), model);

    // Reopened from disk, B keeps the seal records; the key is loaded again.
    b.flush().unwrap();
    drop(b);
    let b = open(&bdev, None);
    let info = b.volume("c").unwrap();
    assert_eq!(info.seal.as_ref(), Some(&seal));
    assert!(!info.seal_key_loaded);
    assert_eq!(b.snapshot(bs1.id).unwrap().seal.as_ref(), Some(&seal));
    assert!(matches!(
        read_all(&b, Target::Volume(clone.id)),
        Err(Error::KeyRequired)
    ));
    b.load_seal_key(&seal, &key()).unwrap();
    assert_eq!(read_all(&b, Target::Volume(clone.id)).unwrap(), model);
    b.unload_seal_key(&seal.id());
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::KeyRequired)
    ));
    assert!(b.fsck().unwrap().is_clean());
    assert!(a.fsck().unwrap().is_clean());
}

/// An incremental raw send: the diff between two snapshots of the source,
/// sealed; blocks the target already holds map by the plain blake3 of
/// their sealed bytes (`write_known`), since every point of a volume
/// seals the same way.
#[test]
fn incremental_raw_sends_line_up() {
    let (_, a) = pool(Some(key()));
    // No dedup at the source, so the rewrite of block 0 is a new extent
    // that the diff reports.
    let enc = DataPolicy {
        dedup: false,
        compression: 0,
        encryption: Some(Cipher::Aes128Xts),
    };
    let src = a.create_volume_with("src", SIZE, BS, enc).unwrap();
    let mut plain = source_data();
    a.write(src.id, 0, &plain).unwrap();
    let s1 = a
        .create_snapshot("src", "s1", serde_json::json!({}))
        .unwrap();
    let seal = a.seal_for_send(Target::Snapshot(s1.id)).unwrap();
    let (_, b) = pool(None);
    let rep = b
        .create_volume_sealed("rep", SIZE, BS, SEALED_POLICY, seal.clone())
        .unwrap();
    copy_sealed(&a, Target::Snapshot(s1.id), &seal, &b, rep.id);
    b.create_snapshot("rep", "s1", serde_json::json!({}))
        .unwrap();

    // Block 0 rewritten with what it held, block 1 changed, part of block
    // 5 changed.
    let bs = BS as usize;
    a.write(src.id, 0, &plain[..bs]).unwrap();
    plain[bs..2 * bs].fill(0x11);
    plain[5 * bs + 100..5 * bs + 200].fill(0x22);
    a.write(src.id, bs as u64, &plain[bs..2 * bs]).unwrap();
    a.write(
        src.id,
        5 * BS as u64 + 100,
        &plain[5 * bs + 100..5 * bs + 200],
    )
    .unwrap();
    let s2 = a
        .create_snapshot("src", "s2", serde_json::json!({}))
        .unwrap();
    assert_eq!(a.seal_for_send(Target::Snapshot(s2.id)).unwrap(), seal);
    let (mut known, mut sent) = (0, 0);
    for (off, len) in a.diff(Some(s1.id), s2.id).unwrap() {
        let mut o = off;
        while o < off + len {
            let n = (BS as u64).min(SIZE - o) as usize;
            let mut buf = vec![0u8; n];
            a.read_sealed(Target::Snapshot(s2.id), o, &mut buf, &seal)
                .unwrap();
            let fp = *blake3::hash(&buf).as_bytes();
            if n == bs && b.write_known(rep.id, o, &fp).unwrap() {
                known += 1;
            } else {
                b.write_sealed(rep.id, o, &buf).unwrap();
                sent += 1;
            }
            o += n as u64;
        }
    }
    assert_eq!((known, sent), (1, 2), "block 0 maps by fingerprint");
    b.load_seal_key(&seal, &key()).unwrap();
    assert_eq!(read_all(&b, Target::Volume(rep.id)).unwrap(), plain);
    assert!(b.fsck().unwrap().is_clean());
}

#[test]
fn seals_refuse_what_they_cannot_do() {
    let (adev, a) = pool(Some(key()));
    let enc = DataPolicy {
        encryption: Some(Cipher::Sm4Xts),
        ..DataPolicy::default()
    };
    let e = a.create_volume_with("e", 8 * 4096, 4096, enc).unwrap();
    let p = a.create_volume("p", 8 * 4096, 4096).unwrap();
    assert!(matches!(
        a.seal_for_send(Target::Volume(p.id)),
        Err(Error::Invalid(m)) if m.starts_with("volume p is not encrypted")
    ));
    let odd = a.create_volume_with("odd", 4096 + 100, 4096, enc).unwrap();
    assert!(matches!(
        a.seal_for_send(Target::Volume(odd.id)),
        Err(Error::Invalid(_))
    ));
    let seal = a.seal_for_send(Target::Volume(e.id)).unwrap();
    // Another volume's lineage seals with another nonce.
    let e2 = a.create_volume_with("e2", 8 * 4096, 4096, enc).unwrap();
    assert_ne!(
        a.seal_for_send(Target::Volume(e2.id)).unwrap().nonce,
        seal.nonce
    );
    assert!(matches!(
        a.create_volume_sealed("s", 8 * 4096, 4096, enc, seal.clone()),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.create_volume_sealed(
            "s",
            8 * 4096 + 100,
            4096,
            DataPolicy::default(),
            seal.clone()
        ),
        Err(Error::Invalid(_))
    ));
    // This pool sealed it: its own keys count as loaded.
    let s = a
        .create_volume_sealed(
            "s",
            8 * 4096 + 512,
            4096,
            DataPolicy::default(),
            seal.clone(),
        )
        .unwrap();
    assert!(s.seal_key_loaded && a.seal_key_loaded(&seal.id()));
    a.write(s.id, 1000, &[5; 10000]).unwrap();
    let mut got = vec![0u8; 10000];
    a.read(Target::Volume(s.id), 1000, &mut got).unwrap();
    assert_eq!(got, vec![5; 10000]);
    // Sealed bytes only into sealed volumes, plain ones only elsewhere,
    // whole blocks only, the right seal only.
    assert!(matches!(
        a.write_sealed(p.id, 0, &[1; 4096]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.write_unsealing(s.id, 0, &[1; 4096], &seal),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.write_sealed(s.id, 512, &[1; 4096]),
        Err(Error::Invalid(_))
    ));
    let mut buf = vec![0u8; 4096];
    let other = a.seal_for_send(Target::Volume(e2.id)).unwrap();
    assert!(matches!(
        a.read_sealed(Target::Volume(s.id), 0, &mut buf, &other),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.read_sealed(Target::Volume(p.id), 0, &mut buf, &seal),
        Err(Error::Invalid(_))
    ));
    // A sealed volume with a short last block cannot grow.
    assert!(matches!(
        a.grow_volume("s", 16 * 4096),
        Err(Error::Invalid(_))
    ));
    a.flush().unwrap();
    drop(a);

    // Without the pool's key: no seal to send, and the sealed volume is
    // closed; whole blocks still trim (zeros seal to zeros), parts do not.
    let a = open(&adev, None);
    assert!(matches!(
        a.seal_for_send(Target::Volume(e.id)),
        Err(Error::KeyRequired)
    ));
    assert!(matches!(
        a.read_sealed(Target::Volume(e.id), 0, &mut buf, &seal),
        Err(Error::KeyRequired)
    ));
    assert!(!a.seal_key_loaded(&seal.id()));
    assert!(matches!(
        a.read(Target::Volume(s.id), 0, &mut buf),
        Err(Error::KeyRequired)
    ));
    assert!(matches!(
        a.write_zeroes(s.id, 100, 4096),
        Err(Error::KeyRequired)
    ));
    a.trim(s.id, 0, 4096).unwrap();
    a.write_zeroes(s.id, 8 * 4096, 512).unwrap();
    a.load_seal_key(&seal, &key()).unwrap();
    let mut got = vec![9u8; 8 * 4096 + 512];
    a.read(Target::Volume(s.id), 0, &mut got).unwrap();
    let mut want = vec![0u8; 8 * 4096 + 512];
    want[4096..11000].fill(5);
    assert_eq!(got, want);
    assert!(a.fsck().unwrap().is_clean());
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u32, len: u32, seed: u8 },
    Zero { off: u32, len: u32 },
    ZeroAllocated { off: u32, len: u32 },
    Read { off: u32, len: u32 },
    Snapshot,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..1 << 20, 1u32..100_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (0u32..1 << 20, 1u32..200_000).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => (0u32..1 << 20, 1u32..50_000).prop_map(|(off, len)| Op::ZeroAllocated { off, len }),
        2 => (0u32..1 << 20, 1u32..100_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
    ]
}

/// Half compressible, half random bytes: both sealed forms.
fn content(seed: u8, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
    if seed.is_multiple_of(2) {
        (0..len).map(|i| b"abcdefgh"[(i / 7) % 8] ^ seed).collect()
    } else {
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    }
}

fn run_model(ops: &[Op], bs: u32, size: u64, cipher: Cipher) {
    let src = KeySource::Key(vec![3; 32]);
    let (crypto, _) = Keys::create(&src).unwrap();
    let seal = SealRec {
        version: 1,
        crypto,
        cipher,
        nonce: 42,
    };
    let (dev, mut p) = pool(None);
    let v = p
        .create_volume_sealed("v", size, bs, SEALED_POLICY, seal.clone())
        .unwrap()
        .id;
    p.load_seal_key(&seal, &src).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut snaps: Vec<(u64, Vec<u8>)> = Vec::new();
    let clip = |off: u32, len: u32| {
        let off = (off as u64).min(size - 1);
        (off, (len as u64).min(size - off))
    };
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let (off, len) = clip(off, len);
                let d = content(seed, len as usize);
                p.write(v, off, &d).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Zero { off, len } => {
                let (off, len) = clip(off, len);
                p.write_zeroes(v, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::ZeroAllocated { off, len } => {
                let (off, len) = clip(off, len);
                p.write_zeroes_allocated(v, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let (off, len) = clip(off, len);
                let mut got = vec![0u8; len as usize];
                p.read(Target::Volume(v), off, &mut got).unwrap();
                assert_eq!(got, &model[off as usize..(off + len) as usize]);
            }
            Op::Snapshot => {
                let s = p.create_snapshot("v", "", serde_json::json!({})).unwrap();
                snaps.push((s.id, model.clone()));
            }
            Op::Reopen => {
                p.flush().unwrap();
                drop(p);
                p = open(&dev, None);
                p.load_seal_key(&seal, &src).unwrap();
            }
        }
    }
    assert_eq!(read_all(&p, Target::Volume(v)).unwrap(), model);
    for (id, want) in &snaps {
        assert_eq!(&read_all(&p, Target::Snapshot(*id)).unwrap(), want);
    }
    assert!(p.fsck().unwrap().is_clean());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Writes, partial writes, zeroing and reads of a sealed volume with
    /// its keys loaded agree with a byte vector, through snapshots and
    /// reopens.
    #[test]
    fn sealed_volume_matches_model(
        ops in prop::collection::vec(op(), 1..40),
        bs_shift in 12u32..=16,
        tail_sectors in 0u64..8,
        cipher in prop_oneof![Just(Cipher::Aes256Xts), Just(Cipher::Aes128Xts), Just(Cipher::Sm4Xts)],
    ) {
        let bs = 1u32 << bs_shift;
        let size = (1u64 << 20) + tail_sectors * 512;
        run_model(&ops, bs, size, cipher);
    }
}
