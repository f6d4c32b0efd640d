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

    /// Makes blocks `total..new_total` allocatable (a grown pool).
    /// Refuses to shrink (false); an error if the bitmap cannot get the
    /// memory it needs (a size from outside must not abort the process).
    pub fn grow(&mut self, new_total: u64) -> Result<bool, std::collections::TryReserveError> {
        if new_total < self.total {
            return Ok(false);
        }
        let words = new_total.div_ceil(64) as usize;
        self.bits
            .try_reserve_exact(words.saturating_sub(self.bits.len()))?;
        // The old last word's bits past the end were set; the new words
        // start set too, and what lies inside the new total is cleared.
        self.bits.resize(words, u64::MAX);
        let mut b = self.total;
        while b < new_total {
            let w = &mut self.bits[(b / 64) as usize];
            if b.is_multiple_of(64) && new_total - b >= 64 {
                *w = 0;
                b += 64;
            } else {
                *w &= !(1 << (b % 64));
                b += 1;
            }
        }
        self.total = new_total;
        Ok(true)
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

    /// Whether blocks `addr..addr+n` are all free and allocatable.
    pub fn is_free(&self, addr: u64, n: u64) -> bool {
        addr >= self.first
            && addr.checked_add(n).is_some_and(|e| e <= self.total)
            && (addr..addr + n).all(|b| !self.is_set(b))
    }

    /// Allocates exactly `n` blocks at `addr` if they are free (a placement
    /// next to a logical neighbour); the cursor moves only if they cover it.
    pub fn alloc_at(&mut self, addr: u64, n: u64) -> bool {
        if n == 0 || !self.is_free(addr, n) {
            return false;
        }
        self.mark(addr, n);
        // Taken at the cursor (the common case: a volume written in
        // order): next-fit goes on after it.
        if (addr..addr + n).contains(&self.cursor) {
            self.cursor = addr + n;
            if self.cursor >= self.total {
                self.cursor = self.first;
            }
        }
        true
    }

    /// Allocates `n` blocks starting in `addr..=addr+slack` (the first
    /// free run there: a placement that steps over a metadata block).
    pub fn alloc_near(&mut self, addr: u64, n: u64, slack: u64) -> Option<u64> {
        let to = addr.saturating_add(slack).saturating_add(n).min(self.total);
        let at = self.scan(addr.max(self.first), to, n)?;
        self.alloc_at(at, n).then_some(at)
    }

    /// Allocates `n` blocks at `offset` into a free region of `region`
    /// blocks found next-fit, and moves the cursor past the region: the
    /// rest of the region stays free for the logical neighbours of what
    /// lands there (see `Inner::place`). None if no region is free.
    pub fn alloc_in_region(&mut self, n: u64, region: u64, offset: u64) -> Option<u64> {
        if n == 0 || offset + n > region || region > self.total - self.used {
            return None;
        }
        let start = self.cursor;
        let found = self.scan(start, self.total, region).or_else(|| {
            self.scan(
                self.first,
                start.saturating_add(region).min(self.total),
                region,
            )
        })?;
        self.mark(found + offset, n);
        self.cursor = found + region;
        if self.cursor >= self.total {
            self.cursor = self.first;
        }
        Some(found + offset)
    }

    /// The longest free run, capped at `max` blocks: the first run of
    /// `max` from the cursor on (wrapping), else the longest of the pool.
    /// Nothing is taken. For placements that can use less than they asked
    /// for when free space is fragmented (defragmentation).
    pub fn longest_free(&self, max: u64) -> Option<(u64, u64)> {
        if max == 0 {
            return None;
        }
        let mut best: Option<(u64, u64)> = None;
        for (from, to) in [(self.cursor, self.total), (self.first, self.cursor)] {
            let (mut b, mut start, mut run) = (from, from, 0u64);
            while b < to {
                let w = self.bits[(b / 64) as usize];
                let step = if b.is_multiple_of(64) && to - b >= 64 && (w == 0 || w == u64::MAX) {
                    64
                } else {
                    1
                };
                if w & (1 << (b % 64)) == 0 {
                    if run == 0 {
                        start = b;
                    }
                    run += step;
                    if run >= max {
                        return Some((start, max));
                    }
                    if best.is_none_or(|(_, l)| run > l) {
                        best = Some((start, run));
                    }
                } else {
                    run = 0;
                }
                b += step;
            }
        }
        best
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
    fn longest_free_finds_the_first_long_enough_or_the_longest() {
        let mut a = Allocator::new(1000, 10);
        assert!(a.mark(10, 990));
        a.free(100, 5);
        a.free(300, 200);
        a.free(700, 40);
        // Long enough: the first from the cursor (at 10), capped.
        assert_eq!(a.longest_free(30), Some((300, 30)));
        // None long enough: the longest.
        assert_eq!(a.longest_free(500), Some((300, 200)));
        // From the cursor on, wrapping: past 300's run the 40 comes first.
        assert_eq!(a.alloc(200), Some(300));
        assert_eq!(a.longest_free(30), Some((700, 30)));
        assert_eq!(a.longest_free(1000), Some((700, 40)));
        assert!(a.mark(700, 40));
        assert_eq!(a.longest_free(10), Some((100, 5)));
        assert!(a.mark(100, 5));
        assert_eq!(a.longest_free(1), None);
    }

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

    #[test]
    fn placement_at_an_address_and_in_a_region() {
        let mut a = Allocator::new(1000, 10);
        assert!(a.alloc_at(100, 16));
        assert!(!a.alloc_at(110, 16), "overlaps");
        assert!(!a.alloc_at(5, 1), "reserved");
        assert!(!a.alloc_at(990, 16), "past the end");
        assert!(a.is_free(116, 16) && !a.is_free(99, 2));
        assert_eq!(a.alloc_near(116, 4, 2), Some(116));
        a.free(116, 4);
        assert!(a.alloc_at(116, 1));
        assert_eq!(a.alloc_near(116, 4, 2), Some(117), "steps over one");
        assert_eq!(a.alloc_near(100, 4, 2), None, "not within the slack");
        a.free(116, 5);
        // The cursor did not move: next-fit still starts at the front.
        assert_eq!(a.alloc(16), Some(10));
        // Taken at the cursor, it moves past them.
        assert!(a.alloc_at(26, 2));
        a.free(26, 2);
        // A region of 64 from the cursor (28): 28..92 is free; the blocks
        // go 32 into it and the cursor passes the region.
        assert_eq!(a.alloc_in_region(16, 64, 32), Some(60));
        assert!(a.is_free(26, 34) && a.is_free(76, 16));
        assert_eq!(a.alloc(4), Some(92));
        // 100..116 is taken, so the next region starts after it.
        assert_eq!(a.alloc_in_region(8, 64, 0), Some(116));
        assert_eq!(
            a.alloc_in_region(8, 64, 60),
            None,
            "does not fit the region"
        );
        assert_eq!(a.used(), 10 + 16 + 16 + 16 + 4 + 8);
    }

    #[test]
    fn grow_frees_exactly_the_new_blocks() {
        // 100 → 1000 crosses partial and whole words; 1000 → 1000 and a
        // shrink change nothing.
        let mut a = Allocator::new(100, 10);
        assert_eq!(a.alloc(90), Some(10));
        assert!(a.alloc(1).is_none());
        assert_eq!(a.grow(1000), Ok(true));
        assert_eq!((a.total(), a.used()), (1000, 100));
        assert!(!a.is_set(100) && !a.is_set(999) && a.is_set(99));
        // Every new block is allocatable, and not one more.
        assert_eq!(a.alloc(900), Some(100));
        assert!(a.alloc(1).is_none());
        assert!(!a.mark(999, 2));
        assert_eq!(a.grow(1000), Ok(true));
        assert_eq!(a.grow(999), Ok(false));
        assert_eq!(a.total(), 1000);
        // Growth whose new end is inside the old last word.
        let mut b = Allocator::new(65, 1);
        assert_eq!(b.grow(70), Ok(true));
        assert_eq!(b.alloc(69), Some(1));
        assert!(b.alloc(1).is_none());
    }
}
