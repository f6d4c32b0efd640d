//! `Pool::diff`: the ranges it reports cover every byte that differs
//! between two snapshots (checked by reading both), whatever the writes,
//! trims, pieces, growths and commits in between; trees of different shapes
//! are compared by content; and its cost follows the change, not the volume.

use std::sync::Arc;

use cdmfs::{DataPolicy, Error, FormatOptions, GateDev, MemDev, OpenOptions, Pool, Target};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u32,
        len: u32,
        seed: u8,
    },
    /// A 4 KiB-aligned page write (pieces over mapped blocks).
    Page {
        page: u16,
        pages: u8,
        seed: u8,
    },
    Zero {
        off: u32,
        len: u32,
    },
    Grow {
        add_kib: u16,
    },
    Flush,
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u32>(), 1u32..150_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        6 => (0u16..100, 1u8..4, any::<u8>()).prop_map(|(page, pages, seed)| Op::Page { page, pages, seed }),
        2 => (any::<u32>(), 1u32..200_000).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => (1u16..64).prop_map(|add_kib| Op::Grow { add_kib }),
        2 => Just(Op::Flush),
        1 => Just(Op::Commit),
    ]
}

/// Bytes that are never all zero (so a write never turns into a hole by
/// accident) and differ by seed and offset.
fn data(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i).wrapping_mul(0x9e37_79b9) ^ (seed as u64).wrapping_mul(0x85eb_ca6b);
            (x >> 7) as u8 | 1
        })
        .collect()
}

fn apply(p: &Pool, vol: u64, op: &Op) {
    let (size, _) = p.geometry(Target::Volume(vol)).unwrap();
    match *op {
        Op::Write { off, len, seed } => {
            let off = off as u64 % size;
            let len = (len as u64).min(size - off);
            p.write(vol, off, &data(seed, off, len as usize)).unwrap();
        }
        Op::Page { page, pages, seed } => {
            let off = page as u64 * 4096;
            if off < size {
                let len = (pages as u64 * 4096).min(size - off);
                p.write(vol, off, &data(seed, off, len as usize)).unwrap();
            }
        }
        Op::Zero { off, len } => {
            let off = off as u64 % size;
            let len = (len as u64).min(size - off);
            p.write_zeroes(vol, off, len).unwrap();
        }
        Op::Grow { add_kib } => {
            p.grow_volume("v", size + add_kib as u64 * 1024).unwrap();
        }
        Op::Flush => p.flush().unwrap(),
        Op::Commit => p.commit().unwrap(),
    }
}

fn read_snapshot(p: &Pool, id: u64) -> Vec<u8> {
    let (size, _) = p.geometry(Target::Snapshot(id)).unwrap();
    let mut buf = vec![0u8; size as usize];
    p.read(Target::Snapshot(id), 0, &mut buf).unwrap();
    buf
}

/// Checks the shape of a diff (sorted, merged, block-aligned, inside the
/// size) and that it covers every byte where `old` and `new` differ
/// (`old` shorter: past its end it reads as zeros).
fn check_covers(ranges: &[(u64, u64)], bs: u64, old: &[u8], new: &[u8]) {
    let size = new.len() as u64;
    let mut end = 0;
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert!(l > 0, "empty range in {ranges:?}");
        assert!(o % bs == 0, "range {o}+{l} not block-aligned");
        assert!(
            (o + l) % bs == 0 || o + l == size,
            "range {o}+{l} not whole blocks"
        );
        assert!(o + l <= size, "range {o}+{l} past the size {size}");
        assert!(
            i == 0 || o > end,
            "ranges not sorted and merged: {ranges:?}"
        );
        end = o + l;
    }
    let covered = |b: u64| ranges.iter().any(|&(o, l)| b >= o && b < o + l);
    for (i, &x) in new.iter().enumerate() {
        let was = old.get(i).copied().unwrap_or(0);
        if x != was {
            assert!(
                covered(i as u64),
                "byte {i} changed ({was} -> {x}) outside the diff {ranges:?}"
            );
        }
    }
}

fn run(before: &[Op], after: &[Op], bs_shift: u8, fanout: u32, dedup: bool) {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: fanout }).unwrap();
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    let bs = 4096u32 << (bs_shift % 3 * 2);
    let policy = DataPolicy {
        dedup,
        ..DataPolicy::default()
    };
    let v = p.create_volume_with("v", 400 << 10, bs, policy).unwrap();
    for op in before {
        apply(&p, v.id, op);
    }
    let s1 = p
        .create_snapshot("v", "s1", serde_json::json!({}))
        .unwrap()
        .id;
    for op in after {
        apply(&p, v.id, op);
    }
    let s2 = p
        .create_snapshot("v", "s2", serde_json::json!({}))
        .unwrap()
        .id;
    let (a, b) = (read_snapshot(&p, s1), read_snapshot(&p, s2));
    let d = p.diff(Some(s1), s2).unwrap();
    check_covers(&d, bs as u64, &a, &b);
    // Nothing differs from itself; everything mapped differs from nothing.
    assert!(p.diff(Some(s2), s2).unwrap().is_empty());
    check_covers(&p.diff(None, s2).unwrap(), bs as u64, &[], &b);
    // Backwards too (the older snapshot as the new one).
    check_covers(
        &p.diff(Some(s2), s1).unwrap(),
        bs as u64,
        &b[..b.len().min(a.len())],
        &a,
    );
    // The same answer once both trees are committed (walked a slice at a
    // time) as while the newest was not.
    p.commit().unwrap();
    assert_eq!(p.diff(Some(s1), s2).unwrap(), d);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn diff_covers_every_changed_byte(
        before in prop::collection::vec(op(), 0..40),
        after in prop::collection::vec(op(), 0..25),
        bs_shift in any::<u8>(),
        deep in any::<bool>(),
        dedup in any::<bool>(),
    ) {
        run(&before, &after, bs_shift, if deep { 4 } else { 0 }, dedup);
    }
}

/// Two volumes with the same contents written in opposite orders have
/// trees of different shapes and no node in common; with dedup their
/// blocks share extents, so the diff must find exactly the blocks whose
/// contents differ, comparing leaf entries across unequal splits.
#[test]
fn trees_of_different_shapes_are_compared_by_content() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 5 }).unwrap();
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    let bs = 4096u64;
    let blocks = 300u64;
    let policy = DataPolicy {
        dedup: true,
        ..DataPolicy::default()
    };
    let a = p
        .create_volume_with("a", blocks * bs, 4096, policy)
        .unwrap();
    let b = p
        .create_volume_with("b", blocks * bs, 4096, policy)
        .unwrap();
    let block = |k: u64| data((k % 251) as u8, k * 7, bs as usize);
    for k in 0..blocks {
        p.write(a.id, k * bs, &block(k)).unwrap();
    }
    let changed = [3u64, 4, 150, 299];
    for k in (0..blocks).rev() {
        let d = if changed.contains(&k) {
            data(9, k, bs as usize)
        } else {
            block(k)
        };
        p.write(b.id, k * bs, &d).unwrap();
    }
    p.commit().unwrap();
    let sa = p
        .create_snapshot("a", "", serde_json::json!({}))
        .unwrap()
        .id;
    let sb = p
        .create_snapshot("b", "", serde_json::json!({}))
        .unwrap()
        .id;
    let (d, stats) = p.diff_with_stats(Some(sa), sb).unwrap();
    assert_eq!(
        d,
        vec![(3 * bs, 2 * bs), (150 * bs, bs), (299 * bs, bs)],
        "{stats:?}"
    );
    check_covers(&d, bs, &read_snapshot(&p, sa), &read_snapshot(&p, sb));
}

/// A 1 GiB volume of 4 KiB blocks (262,144 entries, every block mapped:
/// one deduplicated chunk, so the test stores almost nothing) with 10
/// blocks changed: the diff reads a few dozen nodes of the thousands the
/// trees have.
#[test]
fn cost_follows_the_change_not_the_volume() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    let size = 1u64 << 30;
    let policy = DataPolicy {
        dedup: true,
        ..DataPolicy::default()
    };
    let v = p.create_volume_with("big", size, 4096, policy).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(chunk.len()) {
        p.write(v.id, off, &chunk).unwrap();
    }
    p.commit().unwrap();
    let s1 = p
        .create_snapshot("big", "", serde_json::json!({}))
        .unwrap()
        .id;
    let touched: Vec<u64> = (0..10u64).map(|i| i * 26_000 + 17).collect();
    for &b in &touched {
        p.write(v.id, b * 4096, &[b as u8 | 1; 4096]).unwrap();
    }
    p.commit().unwrap();
    let s2 = p
        .create_snapshot("big", "", serde_json::json!({}))
        .unwrap()
        .id;
    let (d, stats) = p.diff_with_stats(Some(s1), s2).unwrap();
    let want: Vec<(u64, u64)> = touched.iter().map(|b| (b * 4096, 4096)).collect();
    assert_eq!(d, want);
    let (all, full) = p.diff_with_stats(None, s2).unwrap();
    assert_eq!(all, vec![(0, size)]);
    eprintln!("10 blocks changed: {stats:?}; everything: {full:?}");
    assert!(full.nodes_visited > 1000, "{full:?}");
    // Ten root-to-leaf paths on each side, at most.
    assert!(stats.nodes_visited <= 2 * 10 * 4, "{stats:?}");
}

#[test]
fn a_clone_diffs_against_its_origin_and_block_sizes_must_match() {
    let dev = Arc::new(MemDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions::default()).unwrap();
    let p = Pool::open(dev, &OpenOptions::default()).unwrap();
    let v = p.create_volume("v", 1 << 20, 65536).unwrap();
    p.write(v.id, 0, &data(1, 0, 1 << 20)).unwrap();
    let s = p
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    let c = p.clone_snapshot(s, "c").unwrap();
    p.write(c.id, 65536 * 3 + 4096, &data(2, 0, 8192)).unwrap();
    let sc = p
        .create_snapshot("c", "", serde_json::json!({}))
        .unwrap()
        .id;
    assert_eq!(p.diff(Some(s), sc).unwrap(), vec![(65536 * 3, 65536)]);
    let w = p.create_volume("w", 1 << 20, 4096).unwrap();
    p.write(w.id, 0, &[1; 4096]).unwrap();
    let sw = p
        .create_snapshot("w", "", serde_json::json!({}))
        .unwrap()
        .id;
    assert!(matches!(p.diff(Some(s), sw), Err(Error::Invalid(_))));
    assert!(matches!(p.diff(Some(s), 9999), Err(Error::NotFound(_))));
    assert!(matches!(p.diff(Some(9999), sc), Err(Error::NotFound(_))));
    // An empty snapshot against nothing: nothing.
    p.create_volume("e", 1 << 20, 4096).unwrap();
    let se = p
        .create_snapshot("e", "", serde_json::json!({}))
        .unwrap()
        .id;
    assert!(p.diff(None, se).unwrap().is_empty());
}

/// A pool on a [`GateDev`] with volume `v` (4 MiB written) and its
/// snapshot whose nodes are evicted from the small cache, the device armed
/// so that the next read (a diff's node read, outside the pool lock) stops.
fn gated_pool_with_evicted_snapshot() -> (Arc<GateDev>, Arc<Pool>, u64, u64) {
    gated_pool(false)
}

/// The same; `scattered` writes `v` block by block from the end, so every
/// block is a run of its own (defragmentation has work).
fn gated_pool(scattered: bool) -> (Arc<GateDev>, Arc<Pool>, u64, u64) {
    let dev = Arc::new(GateDev::new(64 << 20));
    Pool::format(&*dev, &FormatOptions { max_fanout: 4 }).unwrap();
    let opts = OpenOptions {
        cache_nodes: 16,
        ..OpenOptions::default()
    };
    let p = Arc::new(Pool::open(dev.clone(), &opts).unwrap());
    let v = p.create_volume("v", 4 << 20, 4096).unwrap();
    let d = data(1, 0, 4 << 20);
    if scattered {
        for b in (0..1024).rev() {
            p.write(v.id, b * 4096, &d[b as usize * 4096..][..4096])
                .unwrap();
        }
    } else {
        p.write(v.id, 0, &d).unwrap();
    }
    p.commit().unwrap();
    let s = p
        .create_snapshot("v", "", serde_json::json!({}))
        .unwrap()
        .id;
    p.commit().unwrap();
    let want = p.diff(None, s).unwrap();
    assert_eq!(want, vec![(0, 4 << 20)]);
    // Evict the snapshot's nodes from the small cache.
    let w = p.create_volume("w", 4 << 20, 4096).unwrap();
    p.write(w.id, 0, &data(2, 0, 4 << 20)).unwrap();
    p.commit().unwrap();
    let _ = p.diff(
        None,
        p.create_snapshot("w", "", serde_json::json!({}))
            .unwrap()
            .id,
    );
    dev.arm();
    (dev, p, v.id, s)
}

/// A snapshot deleted while a diff reads its nodes (outside the pool lock)
/// ends the diff with NotFound, not with an answer from freed nodes.
#[test]
fn a_snapshot_deleted_during_a_diff_ends_it_with_an_error() {
    let (dev, p, v, s) = gated_pool_with_evicted_snapshot();
    let q = p.clone();
    let walker = std::thread::spawn(move || q.diff(None, s));
    dev.wait_reached();
    // The walker waits in a node read without the pool lock.
    p.delete_snapshot(s).unwrap();
    for _ in 0..3 {
        p.write(v, 0, &data(3, 0, 1 << 20)).unwrap();
        p.commit().unwrap();
    }
    dev.release();
    match walker.join().unwrap() {
        Err(Error::NotFound(m)) => assert!(m.contains("deleted"), "{m}"),
        other => panic!("a diff of a deleted snapshot gave {other:?}"),
    }
}

/// Defragmentation relocating a snapshot's extents (its tree replaced,
/// the old nodes freed) while a diff reads that snapshot's old nodes
/// outside the pool lock: the diff's pin keeps them readable, and its
/// answer is the same.
#[test]
fn a_relocation_during_a_diff_keeps_its_answer() {
    let (dev, p, v, s) = gated_pool(true);
    let q = p.clone();
    let walker = std::thread::spawn(move || q.diff(None, s));
    dev.wait_reached();
    // (The gate stops one read: the walker's. The rest go on.)
    let root0 = p.physical_map(Target::Snapshot(s)).unwrap().nodes;
    let mut next = 0;
    let mut moved = 0;
    loop {
        let st = p.defragment_step(v, next, 1 << 20).unwrap();
        moved += st.bytes_moved;
        next = st.next_block;
        if st.done {
            break;
        }
    }
    assert!(moved >= 2 << 20, "moved {moved}");
    // The snapshot's tree was replaced.
    assert_ne!(p.physical_map(Target::Snapshot(s)).unwrap().nodes, root0);
    for _ in 0..4 {
        p.write(v, 0, &data(3, 0, 1 << 20)).unwrap();
        p.commit().unwrap();
    }
    // The old nodes are not reusable while the diff runs, however many
    // commits pass...
    for _ in 0..4 {
        p.commit().unwrap();
    }
    assert!(p.space().unwrap().freeing_bytes > 0, "frees did not wait");
    dev.release();
    assert_eq!(walker.join().unwrap().unwrap(), vec![(0, 4 << 20)]);
    // ... and are once it ended.
    for _ in 0..4 {
        p.commit().unwrap();
    }
    assert_eq!(p.space().unwrap().freeing_bytes, 0);
    assert!(p.fsck().unwrap().is_clean());
}

/// A reload of the pool (after a failed sync) while a diff reads a node
/// outside the lock ends the diff with NotFound: a snapshot or node that
/// was not durable may be gone, and its id or address reused, after it.
#[test]
fn a_reload_during_a_diff_ends_it_with_an_error() {
    let (dev, p, v, s) = gated_pool_with_evicted_snapshot();
    let q = p.clone();
    let walker = std::thread::spawn(move || q.diff(None, s));
    dev.wait_reached();
    // The walker waits in a node read without the pool lock; a sync fails
    // and the pool reloads from the device (ids and addresses not yet
    // durable may be reused after that).
    p.write(v, 0, &data(3, 0, 1 << 20)).unwrap();
    dev.set_fail_sync(true);
    assert!(p.flush().is_err());
    dev.set_fail_sync(false);
    p.commit().unwrap();
    dev.release();
    match walker.join().unwrap() {
        Err(Error::NotFound(m)) => assert!(m.contains("reload"), "{m}"),
        other => panic!("a diff across a reload gave {other:?}"),
    }
}
