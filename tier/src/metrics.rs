//! The tier's counters: plain atomics bumped by the store and the cache,
//! rendered as Prometheus text for snapshotd's `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A kind of request to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Head,
    List,
    Delete,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Get, Op::Put, Op::Head, Op::List, Op::Delete];

    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Head => "head",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

#[derive(Debug, Default)]
pub struct TierMetrics {
    requests: [AtomicU64; 5],
    /// Requests that failed for good (after their retries).
    pub errors: AtomicU64,
    /// Attempts made again after a retryable failure.
    pub retries: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Chunks served from the cache.
    pub cache_hits: AtomicU64,
    /// Chunks that had to be fetched.
    pub cache_misses: AtomicU64,
    pub cache_evictions: AtomicU64,
    /// Bytes of chunk files in the cache directory now.
    pub cache_bytes: AtomicU64,
    /// Cache files that failed their checksum (dropped and fetched again).
    pub cache_corrupt: AtomicU64,
    /// Cache writes or reads that failed (a full disk among them); the
    /// read was served all the same.
    pub cache_errors: AtomicU64,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: AtomicU64,
}

impl TierMetrics {
    pub fn request(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op as usize].load(Relaxed)
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Hits over lookups; 0 before any.
    pub fn cache_hit_ratio(&self) -> f64 {
        let h = Self::get(&self.cache_hits) as f64;
        let m = Self::get(&self.cache_misses) as f64;
        if h + m == 0.0 {
            0.0
        } else {
            h / (h + m)
        }
    }

    /// Prometheus text exposition (`# HELP`, `# TYPE` and samples), to be
    /// appended to `/metrics`.
    pub fn prometheus(&self) -> String {
        let mut o = String::with_capacity(2048);
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "cdm_tier_requests_total",
            "counter",
            "Requests sent to the object store, by kind (retries included).",
        );
        for op in Op::ALL {
            let _ = writeln!(
                o,
                "cdm_tier_requests_total{{op=\"{}\"}} {}",
                op.name(),
                self.requests(op)
            );
        }
        let counters: [(&str, &AtomicU64, &str); 9] = [
            (
                "cdm_tier_errors_total",
                &self.errors,
                "Store requests that failed after their retries.",
            ),
            (
                "cdm_tier_retries_total",
                &self.retries,
                "Store requests attempted again after a transient failure.",
            ),
            (
                "cdm_tier_bytes_up_total",
                &self.bytes_up,
                "Bytes uploaded to the object store.",
            ),
            (
                "cdm_tier_bytes_down_total",
                &self.bytes_down,
                "Bytes downloaded from the object store.",
            ),
            (
                "cdm_tier_cache_hits_total",
                &self.cache_hits,
                "Chunks served from the local read cache.",
            ),
            (
                "cdm_tier_cache_misses_total",
                &self.cache_misses,
                "Chunks fetched from the object store on a read.",
            ),
            (
                "cdm_tier_cache_evictions_total",
                &self.cache_evictions,
                "Chunks evicted from the local read cache.",
            ),
            (
                "cdm_tier_cache_corrupt_total",
                &self.cache_corrupt,
                "Cached chunks that failed their checksum and were fetched again.",
            ),
            (
                "cdm_tier_cache_errors_total",
                &self.cache_errors,
                "Local cache reads or writes that failed (reads were served anyway).",
            ),
        ];
        for (name, c, help) in counters {
            head(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", Self::get(c));
        }
        head(
            &mut o,
            "cdm_tier_readahead_chunks_total",
            "counter",
            "Chunks fetched ahead of sequential readers.",
        );
        let _ = writeln!(
            o,
            "cdm_tier_readahead_chunks_total {}",
            Self::get(&self.readahead_chunks)
        );
        head(
            &mut o,
            "cdm_tier_cache_bytes",
            "gauge",
            "Bytes held in the local read cache.",
        );
        let _ = writeln!(o, "cdm_tier_cache_bytes {}", Self::get(&self.cache_bytes));
        head(
            &mut o,
            "cdm_tier_cache_hit_ratio",
            "gauge",
            "Cache hits over lookups since start.",
        );
        let _ = writeln!(o, "cdm_tier_cache_hit_ratio {:.4}", self.cache_hit_ratio());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_counter_with_its_type() {
        let m = TierMetrics::default();
        m.request(Op::Get);
        m.request(Op::Get);
        m.request(Op::Delete);
        TierMetrics::add(&m.cache_hits, 3);
        TierMetrics::add(&m.cache_misses, 1);
        let t = m.prometheus();
        assert!(t.contains("cdm_tier_requests_total{op=\"get\"} 2\n"), "{t}");
        assert!(t.contains("cdm_tier_requests_total{op=\"delete\"} 1\n"));
        assert!(t.contains("cdm_tier_requests_total{op=\"put\"} 0\n"));
        assert!(t.contains("cdm_tier_cache_hit_ratio 0.7500\n"));
        assert!(t.contains("# TYPE cdm_tier_cache_bytes gauge\n"));
        // Every sample's name was declared before it.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(t.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
