//! A writer of fresh qcow2 (version 3) images for VM restore: data
//! clusters are appended as they come (any number of writers, each taking
//! the next host cluster from a shared counter; all-zero clusters are left
//! unallocated and read as zeros), and the metadata — L2 tables, the L1
//! table, refcount blocks and table, then the header — is written once at
//! the end, after the data, since every mapping is known by then. No
//! backing file, no snapshots, no compression; every cluster's refcount
//! is 1 (so the L1/L2 entries carry the COPIED flag). `qemu-img check`
//! verifies the result (`vm_restore`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// 64 KiB clusters, qemu's default.
pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts (refcount_order 4), so many per refcount block.
const RC_ENTRIES: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;

/// An image being written: shared by the writers.
pub struct Writer<'a> {
    f: &'a File,
    size: u64,
    /// The next free host cluster (0 is the header).
    next: AtomicU64,
    /// (guest cluster, host cluster) of every data cluster written.
    map: Mutex<Vec<(u64, u64)>>,
}

impl<'a> Writer<'a> {
    /// A new image of `size` bytes in the empty file `f`.
    pub fn new(f: &'a File, size: u64) -> Writer<'a> {
        Writer {
            f,
            size,
            next: AtomicU64::new(1),
            map: Mutex::new(Vec::new()),
        }
    }

    /// Writes `data` at guest offset `off` (cluster-aligned; `data` whole
    /// clusters except at the disk's end), skipping all-zero clusters;
    /// the bytes written. Each guest cluster is written at most once.
    pub fn put(
        &self,
        off: u64,
        data: &[u8],
        is_zero: impl Fn(&[u8]) -> bool,
    ) -> std::io::Result<u64> {
        if !off.is_multiple_of(CLUSTER) {
            return Err(std::io::Error::other("qcow2 write not cluster-aligned"));
        }
        let mut written = 0;
        let mut local = Vec::new();
        for (i, c) in data.chunks(CLUSTER as usize).enumerate() {
            if is_zero(c) {
                continue;
            }
            let host = self.next.fetch_add(1, Ordering::Relaxed);
            self.f.write_all_at(c, host * CLUSTER)?;
            local.push((off / CLUSTER + i as u64, host));
            written += c.len() as u64;
        }
        self.map
            .lock()
            .map_err(|_| std::io::Error::other("qcow2 map lock poisoned"))?
            .extend(local);
        Ok(written)
    }

    /// Writes the metadata and the header; the image is complete (not yet
    /// synced).
    pub fn finish(self) -> std::io::Result<()> {
        let mut map = self
            .map
            .into_inner()
            .map_err(|_| std::io::Error::other("qcow2 map lock poisoned"))?;
        map.sort_unstable();
        let data_end = self.next.into_inner();
        let l1_size = self.size.div_ceil(CLUSTER * L2_ENTRIES);
        // One L2 table per L1 entry that maps anything.
        let mut l2_of: Vec<Option<u64>> = vec![None; l1_size as usize];
        let mut n = data_end;
        for &(g, _) in &map {
            let slot = &mut l2_of[(g / L2_ENTRIES) as usize];
            if slot.is_none() {
                *slot = Some(n);
                n += 1;
            }
        }
        let l1_at = n;
        let l1_clusters = (l1_size * 8).div_ceil(CLUSTER).max(1);
        n += l1_clusters;
        // Refcount blocks and table cover every cluster, themselves too.
        let (rb, rt) = refcount_clusters(n);
        let rb_at = n;
        let rt_at = rb_at + rb;
        let total = rt_at + rt;
        // L2 tables.
        let mut i = 0;
        while i < map.len() {
            let l1 = map[i].0 / L2_ENTRIES;
            let mut t = vec![0u8; CLUSTER as usize];
            while i < map.len() && map[i].0 / L2_ENTRIES == l1 {
                let (g, h) = map[i];
                let e = (g % L2_ENTRIES) as usize * 8;
                t[e..e + 8].copy_from_slice(&((h * CLUSTER) | COPIED).to_be_bytes());
                i += 1;
            }
            let at = l2_of[l1 as usize].ok_or_else(|| std::io::Error::other("qcow2 L2 lost"))?;
            self.f.write_all_at(&t, at * CLUSTER)?;
        }
        // L1 table.
        let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
        for (k, l2) in l2_of.iter().enumerate() {
            if let Some(c) = l2 {
                l1[k * 8..k * 8 + 8].copy_from_slice(&((c * CLUSTER) | COPIED).to_be_bytes());
            }
        }
        self.f.write_all_at(&l1, l1_at * CLUSTER)?;
        // Refcount blocks: 1 for every cluster in [0, total).
        for b in 0..rb {
            let mut t = vec![0u8; CLUSTER as usize];
            let first = b * RC_ENTRIES;
            for c in first..total.min(first + RC_ENTRIES) {
                let e = ((c - first) * 2) as usize;
                t[e..e + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.f.write_all_at(&t, (rb_at + b) * CLUSTER)?;
        }
        let mut t = vec![0u8; (rt * CLUSTER) as usize];
        for b in 0..rb {
            let e = (b * 8) as usize;
            t[e..e + 8].copy_from_slice(&((rb_at + b) * CLUSTER).to_be_bytes());
        }
        self.f.write_all_at(&t, rt_at * CLUSTER)?;
        self.f.set_len(total * CLUSTER)?;
        // The header last: until it is written the file is no image.
        let mut h = vec![0u8; CLUSTER as usize];
        let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(36, &(l1_size as u32).to_be_bytes());
        put(40, &(l1_at * CLUSTER).to_be_bytes());
        put(48, &(rt_at * CLUSTER).to_be_bytes());
        put(56, &(rt as u32).to_be_bytes());
        put(96, &4u32.to_be_bytes());
        put(100, &104u32.to_be_bytes());
        // Bytes 104..112 stay zero: the end of the header extensions.
        self.f.write_all_at(&h, 0)
    }
}

/// Refcount blocks and refcount table clusters needed for `n` clusters
/// plus themselves.
fn refcount_clusters(n: u64) -> (u64, u64) {
    let (mut rb, mut rt) = (0, 0);
    loop {
        let total = n + rb + rt;
        let rb2 = total.div_ceil(RC_ENTRIES);
        let rt2 = (rb2 * 8).div_ceil(CLUSTER).max(1);
        if (rb2, rt2) == (rb, rt) {
            return (rb, rt);
        }
        (rb, rt) = (rb2, rt2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_cover_themselves() {
        assert_eq!(refcount_clusters(1), (1, 1));
        let (rb, rt) = refcount_clusters(RC_ENTRIES - 2);
        assert_eq!((rb, rt), (1, 1));
        let (rb, rt) = refcount_clusters(RC_ENTRIES - 1);
        assert_eq!((rb, rt), (2, 1));
        let n = 10 * RC_ENTRIES;
        let (rb, rt) = refcount_clusters(n);
        assert!(rb * RC_ENTRIES >= n + rb + rt && rt * L2_ENTRIES >= rb);
    }
}
