//! In-memory allocation bitmap over pool blocks, rebuilt at open from the
//! refcount and catalog trees. One bit per 4 KiB block (32 MiB per TiB).

pub struct Allocator {
    bits: Vec<u64>,
    total: u64,
    first: u64,
    cursor: u64,
    used: u64,
}

impl Allocator {
    /// Blocks `0..first` are reserved and never handed out.
    pub fn new(total: u64, first: u64) -> Allocator {
        let words = total.div_ceil(64) as usize;
        let mut a = Allocator {
            bits: vec![0; words],
            total,
            first,
            cursor: first,
            used: 0,
        };
        // Bits past the end are permanently set so scans never return them.
        for b in total..(words as u64 * 64) {
            a.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        a.mark(0, first.min(total));
        a
    }

    pub fn total(&self) -> u64 {
        self.total
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn is_set(&self, b: u64) -> bool {
        b < self.total && self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks `n` blocks at `addr` in use; returns false if any was already
    /// in use or out of range (overlapping objects: corruption).
    pub fn mark(&mut self, addr: u64, n: u64) -> bool {
        let mut ok = addr.checked_add(n).is_some_and(|e| e <= self.total);
        if !ok {
            return false;
        }
        for b in addr..addr + n {
            let w = &mut self.bits[(b / 64) as usize];
            if *w & (1 << (b % 64)) != 0 {
                ok = false;
            } else {
                *w |= 1 << (b % 64);
                self.used += 1;
            }
        }
        ok
    }

    pub fn free(&mut self, addr: u64, n: u64) {
        for b in addr..(addr + n).min(self.total) {
            let w = &mut self.bits[(b / 64) as usize];
            if *w & (1 << (b % 64)) != 0 {
                *w &= !(1 << (b % 64));
                self.used -= 1;
            }
        }
    }

    /// Allocates `n` contiguous blocks, next-fit from the cursor so that
    /// sequential writes land sequentially on disk.
    pub fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.total - self.used {
            return None;
        }
        let start = self.cursor;
        let found = self
            .scan(start, self.total, n)
            .or_else(|| self.scan(self.first, start.saturating_add(n).min(self.total), n))?;
        self.mark(found, n);
        self.cursor = found + n;
        if self.cursor >= self.total {
            self.cursor = self.first;
        }
        Some(found)
    }

    fn scan(&self, from: u64, to: u64, n: u64) -> Option<u64> {
        let mut b = from;
        let mut run_start = from;
        let mut run = 0u64;
        while b < to {
            let w = self.bits[(b / 64) as usize];
            if b.is_multiple_of(64) && w == u64::MAX {
                run = 0;
                b += 64;
                run_start = b;
                continue;
            }
            if b.is_multiple_of(64) && w == 0 && to - b >= 64 {
                if run == 0 {
                    run_start = b;
                }
                run += 64;
                b += 64;
            } else if w & (1 << (b % 64)) == 0 {
                if run == 0 {
                    run_start = b;
                }
                run += 1;
                b += 1;
            } else {
                run = 0;
                b += 1;
            }
            if run >= n {
                return Some(run_start);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_reuse() {
        let mut a = Allocator::new(1000, 10);
        assert_eq!(a.used(), 10);
        let x = a.alloc(100).unwrap();
        assert_eq!(x, 10);
        let y = a.alloc(64).unwrap();
        assert_eq!(y, 110);
        a.free(x, 100);
        // next-fit continues after the cursor before wrapping
        assert_eq!(a.alloc(50).unwrap(), 174);
        assert!(a.alloc(2000).is_none());
        let big = a.alloc(776).unwrap();
        assert_eq!(big, 224);
        assert_eq!(a.alloc(100), Some(10));
        assert_eq!(a.used(), 1000);
        assert!(a.alloc(1).is_none());
        assert!(!a.mark(5, 1));
        assert!(!a.mark(999, 5));
    }
}
