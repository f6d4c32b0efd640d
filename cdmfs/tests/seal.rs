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
        b.write_sealed(vol, off, &buf, seal).unwrap();
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

    // Without the seal key: no plain reads or writes, and the error says
    // which key to load (not the pool's own).
    let id = seal.id();
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::SealKeyRequired(s)) if s == id
    ));
    let e = b.write(rep.id, 0, &[1; 4096]).unwrap_err();
    assert!(matches!(&e, Error::SealKeyRequired(s) if *s == id));
    let text = e.to_string();
    assert!(
        text.contains(&id) && text.contains("cdmctl volume load-key"),
        "{text}"
    );
    assert!(!text.contains("--key-file"), "{text}");
    let e = b
        .load_seal_key(&seal, &KeySource::Key(vec![8; 32]))
        .unwrap_err();
    assert!(
        matches!(&e, Error::WrongKey(m) if m.contains("sealed this volume")
            && m.contains("source appliance")),
        "{e}"
    );
    assert!(matches!(
        b.load_seal_key(&seal, &KeySource::Passphrase("pw".into())),
        Err(Error::WrongKey(m)) if m.contains("sealed this volume") && m.contains("key file")
    ));
    assert!(!b.seal_key_loaded(&seal.id()));
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::SealKeyRequired(_))
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
        Err(Error::SealKeyRequired(_))
    ));
    b.load_seal_key(&seal, &key()).unwrap();
    assert_eq!(read_all(&b, Target::Volume(clone.id)).unwrap(), model);
    b.unload_seal_key(&seal.id());
    assert!(matches!(
        read_all(&b, Target::Volume(rep.id)),
        Err(Error::SealKeyRequired(_))
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
                b.write_sealed(rep.id, o, &buf, &seal).unwrap();
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
        a.write_sealed(p.id, 0, &[1; 4096], &seal),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.write_unsealing(s.id, 0, &[1; 4096], &seal),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.write_sealed(s.id, 512, &[1; 4096], &seal),
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
    /// `v` picks one of the volumes (the sealed volume and its clones).
    Write {
        v: u8,
        off: u32,
        len: u32,
        seed: u8,
    },
    Zero {
        v: u8,
        off: u32,
        len: u32,
    },
    ZeroAllocated {
        v: u8,
        off: u32,
        len: u32,
    },
    Read {
        v: u8,
        off: u32,
        len: u32,
    },
    Snapshot {
        v: u8,
    },
    /// Clones one of the snapshots (`s` picks it): a sealed volume of
    /// the same seal.
    Clone {
        s: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let v = any::<u8>();
    prop_oneof![
        4 => (v, 0u32..1 << 20, 1u32..100_000, any::<u8>())
            .prop_map(|(v, off, len, seed)| Op::Write { v, off, len, seed }),
        1 => (v, 0u32..1 << 20, 1u32..200_000).prop_map(|(v, off, len)| Op::Zero { v, off, len }),
        1 => (v, 0u32..1 << 20, 1u32..50_000)
            .prop_map(|(v, off, len)| Op::ZeroAllocated { v, off, len }),
        2 => (v, 0u32..1 << 20, 1u32..100_000).prop_map(|(v, off, len)| Op::Read { v, off, len }),
        1 => v.prop_map(|v| Op::Snapshot { v }),
        1 => any::<u8>().prop_map(|s| Op::Clone { s }),
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

/// A sealed volume and its clones against byte vectors.
struct Model {
    /// (volume id, its contents) of the sealed volume and its clones.
    vols: Vec<(u64, Vec<u8>)>,
    /// (snapshot id, its contents).
    snaps: Vec<(u64, Vec<u8>)>,
    size: u64,
}

impl Model {
    fn clip(&self, off: u32, len: u32) -> (u64, u64) {
        let off = (off as u64).min(self.size - 1);
        (off, (len as u64).min(self.size - off))
    }

    fn vol(&mut self, v: u8) -> (u64, &mut Vec<u8>) {
        let n = self.vols.len();
        let (id, m) = &mut self.vols[v as usize % n];
        (*id, m)
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
        block_size: bs,
    };
    let (dev, mut p) = pool(None);
    let v = p
        .create_volume_sealed("v", size, bs, SEALED_POLICY, seal.clone())
        .unwrap()
        .id;
    p.load_seal_key(&seal, &src).unwrap();
    let mut m = Model {
        vols: vec![(v, vec![0u8; size as usize])],
        snaps: Vec::new(),
        size,
    };
    for op in ops {
        match *op {
            Op::Write { v, off, len, seed } => {
                let (off, len) = m.clip(off, len);
                let d = content(seed, len as usize);
                let (id, model) = m.vol(v);
                p.write(id, off, &d).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Zero { v, off, len } => {
                let (off, len) = m.clip(off, len);
                let (id, model) = m.vol(v);
                p.write_zeroes(id, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::ZeroAllocated { v, off, len } => {
                let (off, len) = m.clip(off, len);
                let (id, model) = m.vol(v);
                p.write_zeroes_allocated(id, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { v, off, len } => {
                let (off, len) = m.clip(off, len);
                let (id, model) = m.vol(v);
                let mut got = vec![0u8; len as usize];
                p.read(Target::Volume(id), off, &mut got).unwrap();
                assert_eq!(got, &model[off as usize..(off + len) as usize]);
            }
            Op::Snapshot { v } => {
                let (id, model) = m.vol(v);
                let model = model.clone();
                let name = p
                    .list_volumes()
                    .unwrap()
                    .into_iter()
                    .find(|x| x.id == id)
                    .unwrap()
                    .name;
                let s = p.create_snapshot(&name, "", serde_json::json!({})).unwrap();
                assert_eq!(s.seal.as_ref(), Some(&seal));
                m.snaps.push((s.id, model));
            }
            Op::Clone { s } => {
                if m.snaps.is_empty() {
                    continue;
                }
                let (sid, model) = m.snaps[s as usize % m.snaps.len()].clone();
                let c = p
                    .clone_snapshot(sid, &format!("c{}", m.vols.len()))
                    .unwrap();
                assert_eq!(c.seal.as_ref(), Some(&seal));
                m.vols.push((c.id, model));
            }
            Op::Reopen => {
                p.flush().unwrap();
                drop(p);
                p = open(&dev, None);
                p.load_seal_key(&seal, &src).unwrap();
            }
        }
    }
    for (id, want) in &m.vols {
        assert_eq!(&read_all(&p, Target::Volume(*id)).unwrap(), want);
    }
    for (id, want) in &m.snaps {
        assert_eq!(&read_all(&p, Target::Snapshot(*id)).unwrap(), want);
    }
    assert!(p.fsck().unwrap().is_clean());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Writes, partial writes, zeroing and reads of a sealed volume and
    /// of clones of its snapshots, with the keys loaded, agree with byte
    /// vectors, through snapshots and reopens.
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

/// Cases of the model test: what runs in about 10 s in a debug build.
const CASES: u32 = 384;

/// The fixed seal of the golden vectors: a key-file key of 32 bytes 0x11.
fn golden_seal() -> (SealRec, Keys) {
    let src = KeySource::Key(vec![0x11; 32]);
    let (crypto, _) = Keys::create(&src).unwrap();
    let keys = Keys::unlock_seal(&crypto, &src).unwrap();
    let seal = SealRec {
        version: 1,
        crypto,
        cipher: Cipher::Aes256Xts,
        nonce: 0x0123_4567_89ab_cdef,
        block_size: 4096,
    };
    (seal, keys)
}

/// 4 KiB of text (compressed form) and 4 KiB of blake3 output (full form).
fn golden_blocks() -> (Vec<u8>, Vec<u8>) {
    let text: Vec<u8> = (0..4096u32)
        .map(|i| b"cdm golden sealed block "[(i % 24) as usize] ^ (i / 512) as u8)
        .collect();
    let mut noise = vec![0u8; 4096];
    blake3::Hasher::new()
        .update(b"cdm seal golden noise")
        .finalize_xof()
        .fill(&mut noise);
    (text, noise)
}

/// Known answers: the seal id, the nonce derivation and the sealed bytes
/// of a fixed block in both forms, from the fixed inputs above. A change
/// here is a format change: sealed replicas made before it stop lining up
/// with incremental sends after it. (The compressed form holds a zstd
/// level-1 frame: a zstd that compresses differently changes it too.)
#[test]
fn golden_seal_vectors() {
    let (seal, keys) = golden_seal();
    assert_eq!(
        seal.crypto.check,
        "8d596dc0f718dafeea0dc7a43d99ed4b396478e635777cffe679dfe036f40ad9"
    );
    // The id is the documented encoding.
    let mut h = blake3::Hasher::new();
    h.update(b"cdm seal id v1");
    h.update(&64u64.to_le_bytes());
    h.update(seal.crypto.check.as_bytes());
    h.update(&[Cipher::Aes256Xts.id() as u8]);
    h.update(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    h.update(&4096u32.to_le_bytes());
    assert_eq!(seal.id(), hex::encode(&h.finalize().as_bytes()[..16]));
    assert_eq!(seal.id(), "0569cde17258fa74826db076149ad5e9");

    let uuid: [u8; 16] = std::array::from_fn(|i| i as u8);
    let nonce = pipeline::seal_nonce(&uuid, 7, 0x1122_3344_5566_7788);
    let mut h = blake3::Hasher::new();
    h.update(b"cdm seal nonce v1");
    h.update(&uuid);
    h.update(&7u64.to_le_bytes());
    h.update(&0x1122_3344_5566_7788u64.to_le_bytes());
    let d = h.finalize();
    assert_eq!(
        nonce,
        u64::from_le_bytes(d.as_bytes()[..8].try_into().unwrap())
    );
    assert_eq!(nonce, 0x8c93_3985_52fa_5831);

    // Block 3 of a volume of 1 MiB.
    let (text, noise) = golden_blocks();
    let want = [
        (
            &text,
            "5ea1ed7c930bd426e84f1ab7000200002cb8d19986c86674dc769215cab56be5",
            3568,
            "bca30caa625f61754302a0eb6b899d84c682e82f0ad1ff3d0b189e33be05a741",
        ),
        (
            &noise,
            "ffb0b471cb3a785ffe2dab6d076d4b2bcdbf997e37d1d08a311dac7e68d705b2",
            0,
            "8a0df0cf59bf498509693821821ffad9cfb7efee3736a37a6c0d7057e5c245ca",
        ),
    ];
    for (plain, head, zeros, hash) in want {
        let s = pipeline::seal_range(&keys, &seal, 4096, 1 << 20, 3 * 4096, plain, true).unwrap();
        assert_eq!(hex::encode(&s[..32]), head);
        assert_eq!(s.iter().rev().take_while(|&&b| b == 0).count(), zeros);
        assert_eq!(blake3::hash(&s).to_hex().as_str(), hash);
        let back = pipeline::seal_range(&keys, &seal, 4096, 1 << 20, 3 * 4096, &s, false).unwrap();
        assert_eq!(&back, plain);
    }
}

fn enc(cipher: Cipher) -> DataPolicy {
    DataPolicy {
        dedup: true,
        compression: 8,
        encryption: Some(cipher),
    }
}

fn text_volume(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for (k, blk) in d.chunks_mut(4096).enumerate() {
        let line = format!("{}{k:06} ", std::str::from_utf8(MARKER).unwrap());
        for (i, b) in blk.iter_mut().enumerate() {
            *b = line.as_bytes()[i % line.len()];
        }
    }
    d
}

/// The sealed bytes of all of `t`.
fn sealed_of(p: &Pool, t: Target, seal: &SealRec) -> Vec<u8> {
    let (size, _) = p.geometry(t).unwrap();
    let mut buf = vec![0u8; size as usize];
    p.read_sealed(t, 0, &mut buf, seal).unwrap();
    buf
}

/// Finding 2a and 2c: unsealing needs the sealed data's block size and an
/// encrypted target; sealed volumes take their seal's block size.
#[test]
fn unsealing_checks_block_size_and_encryption() {
    let (_, a) = pool(Some(key()));
    let size = 1u64 << 20;
    let src = a
        .create_volume_with("src", size, 4096, enc(Cipher::Aes256Xts))
        .unwrap();
    let plain = text_volume(size as usize);
    a.write(src.id, 0, &plain).unwrap();
    let seal = a.seal_for_send(Target::Volume(src.id)).unwrap();
    assert_eq!(seal.block_size, 4096);
    let sealed = sealed_of(&a, Target::Volume(src.id), &seal);

    let (_, b) = pool(None);
    assert!(matches!(
        b.create_volume_sealed("r", size, 8192, SEALED_POLICY, seal.clone()),
        Err(Error::Invalid(m)) if m.contains("4096") && m.contains("8192")
    ));
    b.create_volume_sealed("r", size, 4096, SEALED_POLICY, seal.clone())
        .unwrap();

    // Another block size: refused, naming both.
    let wide = a
        .create_volume_with("wide", size, 8192, enc(Cipher::Aes256Xts))
        .unwrap();
    let e = a
        .write_unsealing(wide.id, 0, &sealed[..65536], &seal)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("4096") && m.contains("8192")),
        "{e}"
    );
    // No encryption: the plain text would be at rest in the clear.
    let clear = a.create_volume("clear", size, 4096).unwrap();
    let e = a
        .write_unsealing(clear.id, 0, &sealed[..65536], &seal)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("not encrypted")),
        "{e}"
    );
    for v in [wide.id, clear.id] {
        let runs = a.block_status(Target::Volume(v), 0, size).unwrap();
        assert!(runs.iter().all(|r| !r.allocated), "written: {runs:?}");
    }
    // The volume it fits.
    let ret = a
        .create_volume_with("ret", size, 4096, enc(Cipher::Sm4Xts))
        .unwrap();
    a.write_unsealing(ret.id, 0, &sealed, &seal).unwrap();
    assert_eq!(read_all(&a, Target::Volume(ret.id)).unwrap(), plain);
}

/// Finding 2b: sealed bytes go only into the volume of their seal.
#[test]
fn write_sealed_checks_the_seal() {
    let (_, a) = pool(Some(key()));
    let size = 256u64 << 10;
    let x = a
        .create_volume_with("x", size, 4096, enc(Cipher::Aes256Xts))
        .unwrap();
    let y = a
        .create_volume_with("y", size, 4096, enc(Cipher::Aes256Xts))
        .unwrap();
    let plain = text_volume(size as usize);
    a.write(x.id, 0, &plain).unwrap();
    a.write(y.id, 0, &plain).unwrap();
    let sx = a.seal_for_send(Target::Volume(x.id)).unwrap();
    let sy = a.seal_for_send(Target::Volume(y.id)).unwrap();
    assert_ne!(sx.id(), sy.id());
    let bx = sealed_of(&a, Target::Volume(x.id), &sx);
    let by = sealed_of(&a, Target::Volume(y.id), &sy);
    assert_ne!(bx, by, "two lineages seal alike");
    // read_sealed of an encrypted volume: only the seal it is sent with.
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        a.read_sealed(Target::Volume(x.id), 0, &mut buf, &sy),
        Err(Error::Invalid(_))
    ));

    let (_, b) = pool(None);
    let r = b
        .create_volume_sealed("r", size, 4096, SEALED_POLICY, sx.clone())
        .unwrap();
    let e = b.write_sealed(r.id, 0, &by[..4096], &sy).unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(m) if m.contains("another key/nonce")
            && m.contains(&sx.id()) && m.contains(&sy.id())),
        "{e}"
    );
    let runs = b.block_status(Target::Volume(r.id), 0, size).unwrap();
    assert!(runs.iter().all(|r| !r.allocated), "written: {runs:?}");
    b.write_sealed(r.id, 0, &bx, &sx).unwrap();
    b.load_seal_key(&sx, &key()).unwrap();
    assert_eq!(read_all(&b, Target::Volume(r.id)).unwrap(), plain);
}

/// Finding 3: a volume id used again after a crash (the volume that had
/// it was never committed) seals with another nonce; snapshots seal as
/// their volume, clones as a lineage of their own, after a reopen too.
#[test]
fn a_volume_id_used_again_after_a_crash_seals_with_another_nonce() {
    let (dev, a) = pool(Some(key()));
    a.flush().unwrap();
    let policy = enc(Cipher::Aes128Xts);
    let x = a.create_volume_with("x", 1 << 20, 4096, policy).unwrap();
    let sx = a.seal_for_send(Target::Volume(x.id)).unwrap();
    // Power cut before a commit: no flush.
    drop(a);
    let a = open(&dev, Some(key()));
    assert!(matches!(a.volume("x"), Err(Error::NotFound(_))));
    let y = a.create_volume_with("y", 1 << 20, 4096, policy).unwrap();
    assert_eq!(y.id, x.id, "the test needs the id used again");
    let sy = a.seal_for_send(Target::Volume(y.id)).unwrap();
    assert_ne!(sy.nonce, sx.nonce, "two volumes share (key, nonce)");
    assert_ne!(sy.id(), sx.id());

    let snap = a.create_snapshot("y", "s", serde_json::json!({})).unwrap();
    let c = a.clone_snapshot(snap.id, "c").unwrap();
    let sc = a.seal_for_send(Target::Volume(c.id)).unwrap();
    assert_eq!(a.seal_for_send(Target::Snapshot(snap.id)).unwrap(), sy);
    assert_ne!(sc.nonce, sy.nonce, "a clone seals as its origin");
    a.flush().unwrap();
    drop(a);
    let a = open(&dev, Some(key()));
    assert_eq!(a.seal_for_send(Target::Volume(y.id)).unwrap(), sy);
    assert_eq!(a.seal_for_send(Target::Snapshot(snap.id)).unwrap(), sy);
    assert_eq!(a.seal_for_send(Target::Volume(c.id)).unwrap(), sc);
}

/// A seal record with Argon2id costs (from a peer) above what a seal may
/// ask, refused wherever one comes in: before any Argon2 run.
fn costly_seal(m_kib: u32, t: u32, p: u32) -> SealRec {
    let (crypto, _) = Keys::create(&key()).unwrap();
    let mut seal = SealRec {
        version: 1,
        crypto,
        cipher: Cipher::Aes256Xts,
        nonce: 9,
        block_size: 4096,
    };
    seal.crypto.kdf = "argon2id".into();
    seal.crypto.salt = "ab".repeat(16);
    (seal.crypto.m_kib, seal.crypto.t_cost, seal.crypto.p_cost) = (m_kib, t, p);
    seal
}

/// Finding 5.
#[test]
fn seals_with_costs_above_the_cap_are_refused_where_they_come_in() {
    let (_, a) = pool(Some(key()));
    let e = a
        .create_volume_with("e", 1 << 20, 4096, enc(Cipher::Aes256Xts))
        .unwrap();
    // Cheap to run if the cap were missing (the test must not need 4 GiB
    // to fail), but above it.
    for (m, t, p) in [(64, 9, 1), (64, 1, 5), (64, 64, 1)] {
        let seal = costly_seal(m, t, p);
        let is_cap = |r: Result<(), Error>| matches!(r, Err(Error::Invalid(ref s)) if s.contains("Argon2id cost"));
        assert!(is_cap(
            a.load_seal_key(&seal, &KeySource::Passphrase("pw".into()))
        ));
        assert!(is_cap(
            a.create_volume_sealed("s", 1 << 20, 4096, SEALED_POLICY, seal.clone())
                .map(|_| ())
        ));
        assert!(is_cap(a.write_unsealing(e.id, 0, &[1; 4096], &seal)));
        let mut buf = vec![0u8; 4096];
        assert!(is_cap(a.read_sealed(
            Target::Volume(e.id),
            0,
            &mut buf,
            &seal
        )));
    }
    // At the cap, a load runs (and the key is wrong).
    let seal = costly_seal(64, 8, 4);
    assert!(matches!(
        a.load_seal_key(&seal, &KeySource::Passphrase("pw".into())),
        Err(Error::WrongKey(_))
    ));
}

/// Finding 6: an unlocked pool counts the keys of its own seals as
/// loaded, by id: the seals it sends its encrypted volumes with, and those
/// it was shown, even once their volume is gone.
#[test]
fn an_unlocked_pool_holds_the_keys_of_its_own_seals() {
    let (dev, a) = pool(Some(key()));
    let e = a
        .create_volume_with("e", 1 << 20, 4096, enc(Cipher::Aes256Xts))
        .unwrap();
    let snap = a.create_snapshot("e", "s", serde_json::json!({})).unwrap();
    let c = a.clone_snapshot(snap.id, "c").unwrap();
    let seal = a.seal_for_send(Target::Snapshot(snap.id)).unwrap();
    assert!(a.seal_key_loaded(&seal.id()));
    let sc = a.seal_for_send(Target::Volume(c.id)).unwrap();
    a.delete_volume("c", false).unwrap();
    assert!(a.seal_key_loaded(&sc.id()), "a seal it sent with");
    assert!(!a.seal_key_loaded("00000000000000000000000000000000"));
    a.flush().unwrap();
    assert!(a.seal_key_loaded(&a.seal_for_send(Target::Volume(e.id)).unwrap().id()));

    // Another pool (with another key, or none) does not hold them.
    let (_, b) = pool(Some(KeySource::Key(vec![9; 32])));
    b.create_volume_sealed("r", 1 << 20, 4096, SEALED_POLICY, seal.clone())
        .unwrap();
    assert!(!b.seal_key_loaded(&seal.id()));
    b.load_seal_key(&seal, &key()).unwrap();
    assert!(b.seal_key_loaded(&seal.id()));

    // Without its key, the pool holds none.
    drop(a);
    let a = open(&dev, None);
    assert!(!a.seal_key_loaded(&seal.id()));
    drop(a);
    let a = open(&dev, Some(key()));
    assert!(a.seal_key_loaded(&seal.id()));
}
