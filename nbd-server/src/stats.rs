//! Per-export I/O statistics for `/metrics`: lock-free counters and latency
//! histograms. A session looks its export's [`ExportStats`] up once; each
//! request then costs a few relaxed atomic adds.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets; the last bucket is +Inf.
pub const BOUNDS: [f64; 15] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

/// Request classes with their own histogram.
pub const CLASSES: [&str; 4] = ["read", "write", "flush", "other"];

/// Operations counted separately.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "trim",
    "write_zeroes",
    "flush",
    "block_status",
    "cache",
];

#[derive(Default)]
struct AtomicHistogram {
    counts: [AtomicU64; 16],
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BOUNDS.iter().position(|b| s <= *b).unwrap_or(BOUNDS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        Histogram {
            bounds: &BOUNDS,
            count: counts.iter().sum(),
            counts,
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// A latency histogram as read.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Per bucket (not cumulative); one more than `bounds` (+Inf).
    pub counts: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

/// Counters of one export.
#[derive(Default)]
pub struct ExportStats {
    ops: [AtomicU64; 7],
    bytes: [AtomicU64; 7],
    errors: AtomicU64,
    latency: [AtomicHistogram; 4],
}

/// Index of an NBD command in [`OPS`], if counted.
pub fn op_index(cmd: u16) -> Option<usize> {
    use nbd_proto::codec::*;
    Some(match cmd {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_TRIM => 2,
        CMD_WRITE_ZEROES => 3,
        CMD_FLUSH => 4,
        CMD_BLOCK_STATUS => 5,
        CMD_CACHE => 6,
        _ => return None,
    })
}

impl ExportStats {
    /// Records one request of command `cmd` over `len` bytes that took `d`.
    pub fn record(&self, cmd: u16, len: u64, d: Duration) {
        let Some(i) = op_index(cmd) else { return };
        self.ops[i].fetch_add(1, Relaxed);
        if matches!(i, 0..=3) {
            self.bytes[i].fetch_add(len, Relaxed);
        }
        let class = match i {
            0 => 0,
            1 => 1,
            4 => 2,
            _ => 3,
        };
        self.latency[class].observe(d);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            ops: OPS
                .iter()
                .zip(&self.ops)
                .map(|(n, c)| (*n, c.load(Relaxed)))
                .collect(),
            bytes: OPS[..4]
                .iter()
                .zip(&self.bytes)
                .map(|(n, c)| (*n, c.load(Relaxed)))
                .collect(),
            errors: self.errors.load(Relaxed),
            latency: CLASSES
                .iter()
                .zip(&self.latency)
                .map(|(n, h)| (*n, h.snapshot()))
                .collect(),
        }
    }
}

/// The counters of one export as read.
#[derive(Clone, Debug)]
pub struct StatsSnapshot {
    /// Requests per operation ([`OPS`]).
    pub ops: Vec<(&'static str, u64)>,
    /// Bytes per data operation (read, write, trim, write_zeroes).
    pub bytes: Vec<(&'static str, u64)>,
    /// Requests answered with an error.
    pub errors: u64,
    /// Latency per class ([`CLASSES`]).
    pub latency: Vec<(&'static str, Histogram)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::codec::*;

    #[test]
    fn buckets_and_counts() {
        let s = ExportStats::default();
        s.record(CMD_READ, 4096, Duration::from_micros(30));
        s.record(CMD_READ, 4096, Duration::from_micros(700));
        s.record(CMD_WRITE, 1 << 20, Duration::from_secs(5));
        s.record(CMD_FLUSH, 0, Duration::from_millis(3));
        s.record(CMD_TRIM, 8192, Duration::from_millis(1));
        s.record(99, 1, Duration::from_millis(1)); // unknown: ignored
        s.error();
        let x = s.snapshot();
        assert_eq!(x.ops[0], ("read", 2));
        assert_eq!(x.bytes[0], ("read", 8192));
        assert_eq!(x.bytes[1], ("write", 1 << 20));
        assert_eq!(x.bytes[2], ("trim", 8192));
        assert_eq!(x.errors, 1);
        let read = &x.latency[0].1;
        assert_eq!(read.count, 2);
        assert_eq!(read.counts[0], 1, "30 us <= 50 us");
        assert_eq!(read.counts[4], 1, "700 us <= 1 ms");
        assert_eq!(read.sum_ns, 730_000);
        let write = &x.latency[1].1;
        assert_eq!(write.counts[15], 1, "5 s lands in +Inf");
        assert_eq!(x.latency[2].1.counts[6], 1, "3 ms <= 5 ms");
        assert_eq!(x.latency[3].1.count, 1, "trim is 'other'");
    }
}
