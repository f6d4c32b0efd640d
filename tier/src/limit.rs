//! Request-rate and bandwidth limits: token buckets shared by every thread
//! of one store (the engine reads from many NBD/FUSE threads, tiering
//! uploads from others, and the limit is the store's, not a thread's).
//!
//! A caller takes its tokens before the request and may leave the bucket
//! in debt; it then sleeps until the debt is paid, and so do the callers
//! queued behind it. A request larger than the burst (a 16 MiB pack over
//! a 1 MiB/s limit) therefore waits its full share instead of being
//! refused. The agent's and replication's throttles pace one stream each
//! and have time-of-day windows; this one is shared and has none.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cdm_common::lock::lock;

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` tokens per second, at most `burst` saved up; starts full.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Takes `n` tokens at `now` and says how long the caller must wait
    /// before using them (the bucket's arithmetic alone, for tests with
    /// made-up instants).
    pub fn reserve_at(&self, n: f64, now: Instant) -> Duration {
        let mut s = lock(&self.state);
        let (tokens, last) = &mut *s;
        if now > *last {
            let refill = now.duration_since(*last).as_secs_f64() * self.rate;
            *tokens = (*tokens + refill).min(self.burst);
            *last = now;
        }
        *tokens -= n;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }

    /// Takes `n` tokens, sleeping as long as the limit needs.
    pub fn take(&self, n: f64) -> Duration {
        let d = self.reserve_at(n, Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        d
    }
}

/// The store's two limits; either may be absent.
#[derive(Debug, Default)]
pub struct Limits {
    pub requests: Option<TokenBucket>,
    pub bytes: Option<TokenBucket>,
}

impl Limits {
    /// A request rate bucket holds one second's worth of requests (a burst
    /// of `rate`, at least 1); the bandwidth bucket a quarter second's.
    pub fn new(requests_per_sec: Option<u32>, bytes_per_sec: Option<u64>) -> Limits {
        Limits {
            requests: requests_per_sec.map(|r| TokenBucket::new(r as f64, (r as f64).max(1.0))),
            bytes: bytes_per_sec.map(|b| TokenBucket::new(b as f64, (b as f64 / 4.0).max(1.0))),
        }
    }

    /// Waits for one request carrying `bytes` (either way).
    pub fn admit(&self, bytes: u64) {
        if let Some(r) = &self.requests {
            r.take(1.0);
        }
        self.transfer(bytes);
    }

    /// Waits for `bytes` more of a transfer under way.
    pub fn transfer(&self, bytes: u64) {
        if let (Some(b), true) = (&self.bytes, bytes > 0) {
            b.take(bytes as f64);
        }
    }
}

/// The pause before attempt `attempt + 1`: exponential from 100 ms,
/// capped at 10 s, with "full jitter" (a uniform draw below the cap) so
/// many readers failing together do not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let cap = backoff_cap(attempt);
    let ms = rand::thread_rng().gen_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

fn backoff_cap(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(10)).min(10_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate_after_the_burst() {
        let b = TokenBucket::new(10.0, 5.0);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.reserve_at(1.0, t0), Duration::ZERO);
        }
        // The sixth at the same instant waits 1/10 s, the seventh 2/10.
        let d6 = b.reserve_at(1.0, t0);
        let d7 = b.reserve_at(1.0, t0);
        assert!((d6.as_secs_f64() - 0.1).abs() < 1e-9, "{d6:?}");
        assert!((d7.as_secs_f64() - 0.2).abs() < 1e-9, "{d7:?}");
        // A second later the debt (2) is paid and 8 tokens are back, but
        // the bucket holds no more than its burst.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(b.reserve_at(1.0, t1), Duration::ZERO);
        }
        assert!(b.reserve_at(1.0, t1) > Duration::ZERO);
    }

    #[test]
    fn a_transfer_larger_than_the_burst_waits_its_share() {
        let b = TokenBucket::new(1000.0, 250.0);
        let d = b.reserve_at(4250.0, Instant::now());
        assert!((d.as_secs_f64() - 4.0).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff_cap(0), Duration::from_millis(100));
        assert_eq!(backoff_cap(3), Duration::from_millis(800));
        assert_eq!(backoff_cap(40), Duration::from_secs(10));
        for a in 0..12 {
            let d = backoff(a);
            assert!(d <= backoff_cap(a) && d >= backoff_cap(a) / 2, "{a}: {d:?}");
        }
    }
}
