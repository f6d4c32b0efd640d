//! A sparse export in memory, for tests and fuzzing: the server without an
//! engine behind it. Data lives in 4 KiB blocks allocated on first write;
//! trimming a whole block frees it, so block status reports holes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nbd_proto::codec::EINVAL;

use super::{
    BlockSize, Export, ExportCatalog, ExportEntry, ExportError, ExportResult, Extent, ZeroFlags,
};

const BLOCK: u64 = 4096;

/// A sparse in-memory disk.
pub struct MemExport {
    size: u64,
    read_only: bool,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Deleted ([`MemCatalog::remove`]): every operation fails as `Gone`.
    gone: AtomicBool,
}

impl MemExport {
    /// An export of `size` bytes reading as zeroes.
    pub fn new(size: u64) -> MemExport {
        MemExport {
            size,
            read_only: false,
            blocks: Mutex::new(BTreeMap::new()),
            gone: AtomicBool::new(false),
        }
    }

    /// The same, refusing writes.
    pub fn read_only(size: u64) -> MemExport {
        MemExport {
            read_only: true,
            ..MemExport::new(size)
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of blocks allocated (for tests of sparseness).
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().len() as u64 * BLOCK
    }

    fn alive(&self) -> ExportResult<()> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(ExportError::Gone("export deleted".into()));
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> ExportResult<()> {
        self.alive()?;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::failed(EINVAL, "range past the end")),
        }
    }

    /// Calls `f(block, start in block, range of the caller's buffer)` for
    /// each block the byte range touches.
    fn each_block(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let (b, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = (BLOCK - within as u64).min(len - done);
            f(b, within, done as usize..(done + n) as usize);
            done += n;
        }
    }

    /// Zeroes a range, freeing whole blocks when `free` is set.
    fn zero(&self, offset: u64, len: u64, free: bool) {
        let mut g = self.lock();
        Self::each_block(offset, len, |b, within, r| {
            if free && r.len() as u64 == BLOCK {
                g.remove(&b);
            } else if let Some(blk) = g.get_mut(&b) {
                blk[within..within + r.len()].fill(0);
            } else if !free {
                g.insert(b, vec![0u8; BLOCK as usize].into_boxed_slice());
            }
        });
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One store behind every connection, and nothing to make durable.
        true
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            preferred: BLOCK as u32,
            ..BlockSize::default()
        }
    }

    fn description(&self) -> String {
        "in-memory export".to_string()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> ExportResult<()> {
        self.check(offset, buf.len() as u64)?;
        let g = self.lock();
        Self::each_block(offset, buf.len() as u64, |b, within, r| {
            let n = r.len();
            match g.get(&b) {
                Some(blk) => buf[r].copy_from_slice(&blk[within..within + n]),
                None => buf[r].fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> ExportResult<()> {
        self.check(offset, data.len() as u64)?;
        let mut g = self.lock();
        Self::each_block(offset, data.len() as u64, |b, within, r| {
            let n = r.len();
            let blk = g
                .entry(b)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            blk[within..within + n].copy_from_slice(&data[r]);
        });
        Ok(())
    }

    fn flush(&self) -> ExportResult<()> {
        self.alive()
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> ExportResult<()> {
        self.check(offset, len)?;
        self.zero(offset, len, true);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> ExportResult<()> {
        self.check(offset, len)?;
        self.zero(offset, len, flags.may_trim);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> ExportResult<Vec<Extent>> {
        self.check(offset, len)?;
        let g = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        Self::each_block(offset, len, |b, _, r| {
            let e = if g.contains_key(&b) {
                Extent::allocated(r.len() as u64)
            } else {
                Extent::hole(r.len() as u64)
            };
            match out.last_mut() {
                Some(last) if last.state == e.state => last.len += e.len,
                _ => out.push(e),
            }
        });
        Ok(out)
    }
}

/// Named in-memory exports; every connection to a name shares its data.
#[derive(Default)]
pub struct MemCatalog {
    exports: Mutex<HashMap<String, Arc<MemExport>>>,
}

impl MemCatalog {
    pub fn new() -> MemCatalog {
        MemCatalog::default()
    }

    /// Adds (or replaces) an export; returns it for inspection.
    pub fn insert(&self, name: &str, export: MemExport) -> Arc<MemExport> {
        let e = Arc::new(export);
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), e.clone());
        e
    }

    /// Deletes an export: open connections to it see it gone.
    pub fn remove(&self, name: &str) {
        let e = self
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(e) = e {
            e.gone.store(true, Ordering::SeqCst);
        }
    }
}

impl ExportCatalog for MemCatalog {
    fn open(&self, name: &str) -> ExportResult<Arc<dyn Export>> {
        let g = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(name) {
            Some(e) => Ok(e.clone()),
            None => Err(ExportError::failed(
                EINVAL,
                format!("no export named {name:?}"),
            )),
        }
    }

    fn list(&self) -> Vec<ExportEntry> {
        let g = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<ExportEntry> = g
            .iter()
            .map(|(n, e)| ExportEntry {
                name: n.clone(),
                description: format!("in-memory, {} bytes", e.size),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip() {
        let m = MemExport::new(64 << 10);
        m.write(4000, &[7u8; 200], false).unwrap();
        let mut b = vec![1u8; 300];
        m.read(3950, &mut b).unwrap();
        assert!(b[..50].iter().all(|&x| x == 0));
        assert!(b[50..250].iter().all(|&x| x == 7));
        assert!(b[250..].iter().all(|&x| x == 0));
        assert_eq!(m.allocated_bytes(), 2 * BLOCK);
        assert_eq!(
            m.block_status(0, 16384).unwrap(),
            vec![Extent::allocated(8192), Extent::hole(8192)]
        );
        m.trim(0, 8192, false).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
        let trim = ZeroFlags {
            may_trim: true,
            ..ZeroFlags::default()
        };
        m.write_zeroes(0, 100, trim).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
        // NO_HOLE: the zeroes are allocated.
        m.write_zeroes(0, 100, ZeroFlags::default()).unwrap();
        assert_eq!(m.allocated_bytes(), BLOCK);
        assert!(m.read(65530, &mut [0u8; 10]).is_err());
    }
}
