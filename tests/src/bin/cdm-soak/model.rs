//! What the soak knows was written: per 512-byte sector of each volume,
//! the generation last flushed, last acknowledged and last issued, and
//! for each snapshot the range of generations it may hold. Every sector is
//! a stamp (`cdm_e2e::stamp`) naming volume, offset and generation, so a
//! read is checked exactly: it must be a stamp of this volume and offset
//! whose generation lies in the allowed range (zeros only where nothing
//! was ever acknowledged).

use std::sync::Mutex;

use cdm_e2e::stamp;

pub const SECTOR: u64 = stamp::SECTOR as u64;

/// Generations of one volume's sectors (0: never written, reads zeros).
pub struct Gens {
    /// Made durable by a FLUSH (or found on disk after a restart).
    pub flushed: Vec<u32>,
    /// Acknowledged by the server, flushed or not.
    pub acked: Vec<u32>,
    /// Sent: a write whose answer was lost or an error may still have
    /// landed, so reads may show it.
    pub issued: Vec<u32>,
    next: u32,
}

/// One writer volume: its name, stamp tag and model. Exactly one writer
/// thread writes it, so `acked` only changes between that thread's
/// requests.
pub struct Volume {
    pub name: String,
    pub tag: u64,
    pub size: u64,
    pub gens: Mutex<Gens>,
}

impl Volume {
    pub fn new(name: &str, size: u64) -> Volume {
        let n = (size / SECTOR) as usize;
        Volume {
            name: name.to_string(),
            tag: stamp::tag(name),
            size,
            gens: Mutex::new(Gens {
                flushed: vec![0; n],
                acked: vec![0; n],
                issued: vec![0; n],
                next: 0,
            }),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Gens> {
        self.gens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next generation for a write of `len` bytes at `off` and
    /// marks its sectors issued; returns the generation.
    pub fn issue(&self, off: u64, len: u64) -> u32 {
        let mut g = self.lock();
        g.next += 1;
        let gen = g.next;
        let (a, b) = range(off, len);
        g.issued[a..b].fill(gen);
        gen
    }

    pub fn ack(&self, off: u64, len: u64, gen: u32) {
        let (a, b) = range(off, len);
        self.lock().acked[a..b].fill(gen);
    }

    /// A FLUSH succeeded: everything acknowledged before it is durable.
    pub fn flushed(&self) {
        let mut g = self.lock();
        let Gens { flushed, acked, .. } = &mut *g;
        flushed.copy_from_slice(acked);
    }

    /// After a restart the pool holds `seen`: that is the new truth.
    pub fn reset_to(&self, seen: &[u32]) {
        let mut g = self.lock();
        g.flushed.copy_from_slice(seen);
        g.acked.copy_from_slice(seen);
        g.issued.copy_from_slice(seen);
    }

    /// Copies of (lower, upper) bounds for sectors `[a, b)`.
    pub fn bounds(&self, a: usize, b: usize, lower: Lower) -> (Vec<u32>, Vec<u32>) {
        let g = self.lock();
        let lo = match lower {
            Lower::Flushed => g.flushed[a..b].to_vec(),
            Lower::Acked => g.acked[a..b].to_vec(),
        };
        (lo, g.issued[a..b].to_vec())
    }
}

/// Which generation a read must at least show.
#[derive(Clone, Copy)]
pub enum Lower {
    /// After a crash: flushed writes must be there.
    Flushed,
    /// On a running server (or after a clean stop): every acknowledged write.
    Acked,
}

/// Sector indexes `[a, b)` of a byte range.
pub fn range(off: u64, len: u64) -> (usize, usize) {
    ((off / SECTOR) as usize, ((off + len) / SECTOR) as usize)
}

/// A snapshot the API acknowledged: which generations each sector may hold
/// (at least what was acknowledged when the request was sent, at most what
/// was issued when the answer came).
pub struct Snapshot {
    pub volume: usize,
    pub id: u64,
    pub lo: Vec<u32>,
    pub hi: Vec<u32>,
}

impl Snapshot {
    pub fn export(&self, vols: &[std::sync::Arc<Volume>]) -> String {
        format!("{}@{}", vols[self.volume].name, self.id)
    }
}

/// Checks `buf`, read at byte `off` of the volume tagged `tag`, against
/// per-sector bounds `lo`/`hi` (as long as the buffer in sectors). Returns
/// the generation each sector holds, or the first bad sector described.
pub fn check(buf: &[u8], tag: u64, off: u64, lo: &[u32], hi: &[u32]) -> Result<Vec<u32>, String> {
    let mut seen = Vec::with_capacity(lo.len());
    for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
        let at = off + i as u64 * SECTOR;
        let got = match stamp::decode(s) {
            None if s.iter().all(|&b| b == 0) => 0,
            None => {
                return Err(format!(
                    "sector at byte {at}: no stamp (starts {:02x?})",
                    &s[..16]
                ))
            }
            Some((t, o, g)) => {
                if t != tag || o != at {
                    return Err(format!(
                        "sector at byte {at}: holds the stamp of tag {t:#x} offset {o} generation {g} (wanted tag {tag:#x} offset {at})"
                    ));
                }
                if stamp::verify(s, tag, at, g).is_err() {
                    return Err(format!(
                        "sector at byte {at}: generation {g} with a damaged body"
                    ));
                }
                u32::try_from(g).map_err(|_| format!("sector at byte {at}: generation {g}"))?
            }
        };
        if got < lo[i] || got > hi[i] {
            let what = if got == 0 {
                "zeros".to_string()
            } else {
                format!("generation {got}")
            };
            return Err(format!(
                "sector at byte {at}: {what}, expected a generation from {} to {}",
                lo[i], hi[i]
            ));
        }
        seen.push(got);
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_lost_foreign_and_unwritten_sectors_are_refused() {
        let v = Volume::new("v", 64 << 10);
        let g1 = v.issue(0, 8192);
        v.ack(0, 8192, g1);
        v.flushed();
        let g2 = v.issue(4096, 4096);
        v.ack(4096, 4096, g2);
        let mut buf = stamp::random(v.tag, 0, 8192, g1 as u64);
        let (lo, hi) = v.bounds(0, 16, Lower::Flushed);
        // After a crash the unflushed write may be missing...
        assert!(check(&buf, v.tag, 0, &lo, &hi).is_ok());
        // ...but not on a running server, which acknowledged it.
        let (alo, ahi) = v.bounds(0, 16, Lower::Acked);
        let e = check(&buf, v.tag, 0, &alo, &ahi).unwrap_err();
        assert!(e.contains("byte 4096") && e.contains("generation 1"), "{e}");
        buf[4096..].copy_from_slice(&stamp::random(v.tag, 4096, 4096, g2 as u64));
        assert_eq!(check(&buf, v.tag, 0, &alo, &ahi).unwrap()[8], g2);
        // A flushed sector read as zeros, another volume's or offset's data.
        let e = check(&[0u8; 512], v.tag, 0, &lo[..1], &hi[..1]).unwrap_err();
        assert!(e.contains("zeros"), "{e}");
        let other = stamp::random(stamp::tag("w"), 0, 512, 1);
        assert!(check(&other, v.tag, 0, &lo[..1], &hi[..1]).is_err());
        let moved = stamp::random(v.tag, 512, 512, 1);
        assert!(check(&moved, v.tag, 0, &lo[..1], &hi[..1]).is_err());
        // Never written: zeros are right.
        let (zlo, zhi) = v.bounds(32, 33, Lower::Flushed);
        assert!(check(&[0u8; 512], v.tag, 32 * 512, &zlo, &zhi).is_ok());
    }
}
