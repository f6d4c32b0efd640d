//! Content-defined chunking (FastCDC, Xia et al., USENIX ATC 2016 and
//! TPDS 2020): a gear rolling hash with normalized chunking — a stricter
//! mask before the target size and a looser one after it, so chunk sizes
//! cluster around the average.
//!
//! Used for *stream* data (file backups, replication streams): an insert
//! shifts every later byte, and only content-defined boundaries find the
//! old chunks again. Volumes keep fixed-size chunks (their block size),
//! because a block device is addressed in place: a filesystem writes its
//! files on block boundaries, so identical files in an image line up on
//! 4 KiB blocks already (see docs/design.md, "Data reduction").

/// 256 pseudo-random 64-bit gear values (splitmix64 from a fixed seed), so
/// boundaries are stable across versions and machines.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut s: u64 = 0x6364_6d2d_6661_7374; // "cdm-fast"
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// Chunk size bounds of a FastCDC chunker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastCdc {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
    mask_s: u64,
    mask_l: u64,
}

/// A mask of `bits` ones in the high bits (the gear hash shifts left, so
/// high bits depend on the most recent ~64 bytes).
const fn mask(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        (u64::MAX >> (64 - bits)) << (64 - bits)
    }
}

impl FastCdc {
    /// `avg` is rounded to a power of two; `min <= avg <= max`, `min >= 64`.
    pub fn new(min: usize, avg: usize, max: usize) -> Option<FastCdc> {
        if !(64 <= min && min <= avg && avg <= max && max <= 1 << 30) {
            return None;
        }
        let bits = avg.next_power_of_two().trailing_zeros();
        Some(FastCdc {
            min,
            avg,
            max,
            // Normalization level 2: two bits harder before avg, two easier after.
            mask_s: mask(bits + 2),
            mask_l: mask(bits.saturating_sub(2)),
        })
    }

    /// The default for file and stream backups: 16 KiB / 64 KiB / 256 KiB.
    pub fn default_stream() -> FastCdc {
        FastCdc {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
            mask_s: mask(18),
            mask_l: mask(14),
        }
    }

    /// Length of the first chunk of `data`. With `eof` false, `None` means
    /// more data is needed to decide (no cut point yet and fewer than
    /// `max` bytes); with `eof` true the rest is one chunk at most `max`.
    pub fn cut(&self, data: &[u8], eof: bool) -> Option<usize> {
        let n = data.len();
        if n <= self.min {
            return if eof || n == self.min && n == self.max {
                Some(n)
            } else {
                None
            };
        }
        let end = n.min(self.max);
        let normal = self.avg.min(end);
        let mut h: u64 = 0;
        let mut i = self.min;
        while i < normal {
            h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
            if h & self.mask_s == 0 {
                return Some(i + 1);
            }
            i += 1;
        }
        while i < end {
            h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
            if h & self.mask_l == 0 {
                return Some(i + 1);
            }
            i += 1;
        }
        if end == self.max || eof {
            Some(end)
        } else {
            None
        }
    }

    /// Splits a whole buffer into chunks.
    pub fn chunks<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let c = *self;
        let mut rest = data;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let n = c.cut(rest, true).unwrap_or(rest.len()).max(1);
            let (a, b) = rest.split_at(n);
            rest = b;
            Some(a)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = vec![0u8; n];
        r.fill(&mut v[..]);
        v
    }

    #[test]
    fn sizes_are_bounded_and_average_is_near_target() {
        let c = FastCdc::default_stream();
        let data = noise(32 << 20, 1);
        let sizes: Vec<usize> = c.chunks(&data).map(|x| x.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), data.len());
        let (last, body) = sizes.split_last().unwrap();
        assert!(*last <= c.max);
        assert!(body.iter().all(|&s| s >= c.min && s <= c.max), "{sizes:?}");
        let avg = data.len() / sizes.len();
        assert!((40 << 10..=96 << 10).contains(&avg), "average {avg}");
    }

    #[test]
    fn boundaries_resynchronise_after_an_insert() {
        let c = FastCdc::new(2048, 8192, 65536).unwrap();
        let a = noise(4 << 20, 2);
        let mut b = a.clone();
        // Insert 100 bytes near the start: only the chunks around it change.
        b.splice(5000..5000, noise(100, 3));
        let ha: std::collections::HashSet<&[u8]> = c.chunks(&a).collect();
        let hb: Vec<&[u8]> = c.chunks(&b).collect();
        let shared = hb.iter().filter(|x| ha.contains(*x)).count();
        assert!(
            shared + 3 >= hb.len(),
            "{shared} of {} chunks found again",
            hb.len()
        );
        // Fixed-size chunks would find none of them again.
        let fa: std::collections::HashSet<&[u8]> = a.chunks(8192).collect();
        assert!(b.chunks(8192).skip(1).all(|x| !fa.contains(x)));
    }

    #[test]
    fn streaming_cut_agrees_with_whole_buffer() {
        let c = FastCdc::new(1024, 4096, 16384).unwrap();
        let data = noise(1 << 20, 4);
        let whole: Vec<usize> = c.chunks(&data).map(|x| x.len()).collect();
        // Feed in small pieces, as a stream reader would.
        let mut buf: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        for piece in data.chunks(3000) {
            buf.extend_from_slice(piece);
            while let Some(n) = c.cut(&buf, false) {
                got.push(n);
                buf.drain(..n);
            }
        }
        while !buf.is_empty() {
            let n = c.cut(&buf, true).unwrap();
            got.push(n);
            buf.drain(..n);
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn degenerate_inputs() {
        let c = FastCdc::new(64, 256, 1024).unwrap();
        assert_eq!(c.chunks(&[]).count(), 0);
        assert_eq!(
            c.chunks(&[1; 10]).map(|x| x.len()).collect::<Vec<_>>(),
            vec![10]
        );
        // All zeros never hit a mask: chunks of max size.
        let z = vec![0u8; 4000];
        assert!(c
            .chunks(&z)
            .all(|x| x.len() == 1024 || x.len() == 4000 % 1024));
        assert!(FastCdc::new(10, 5, 100).is_none());
    }
}
