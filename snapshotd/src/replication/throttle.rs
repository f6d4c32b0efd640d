//! The bandwidth limit of a link: a token bucket on the bytes written to
//! the socket, refilled at the rate in force (the control side's function
//! of the link's limit and windows of the day, read again every second),
//! holding at most one second of rate.
//!
//! The bucket may go into debt: a sender that writes more than the bucket
//! holds waits until the debt is paid, and so does anyone writing after it
//! (one limit per link, however many threads send).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the rate in force is asked again.
const REREAD: Duration = Duration::from_secs(1);

type Rate = Box<dyn Fn() -> Option<u64> + Send + Sync>;

pub struct Throttle {
    rate: Rate,
    bucket: Mutex<Bucket>,
}

#[derive(Default)]
struct Bucket {
    /// Bytes that may go now; negative: owed.
    tokens: f64,
    last: Option<Instant>,
    rate: Option<u64>,
    read_at: Option<Instant>,
}

impl Throttle {
    /// `rate()`: bytes per second in force now; None or 0 = unlimited.
    pub fn new(rate: Rate) -> Throttle {
        Throttle {
            rate,
            bucket: Mutex::new(Bucket::default()),
        }
    }

    pub fn unlimited() -> Throttle {
        Throttle::new(Box::new(|| None))
    }

    /// Accounts for `bytes` about to be written; sleeps as long as the
    /// limit needs.
    pub fn consume(&self, bytes: u64) {
        let wait = self.pace(bytes, Instant::now());
        if let Some(d) = wait {
            std::thread::sleep(d);
        }
    }

    /// The bucket's arithmetic at `now` without sleeping (tests drive it
    /// with made-up instants): how long the caller must wait.
    fn pace(&self, bytes: u64, now: Instant) -> Option<Duration> {
        let mut b = cdm_common::lock::lock(&self.bucket);
        if b.read_at
            .is_none_or(|t| now.saturating_duration_since(t) >= REREAD)
        {
            b.rate = (self.rate)().filter(|r| *r > 0);
            b.read_at = Some(now);
        }
        let Some(rate) = b.rate else {
            // Unlimited: nothing saved up for when a limit starts.
            b.tokens = 0.0;
            b.last = Some(now);
            return None;
        };
        let rate = rate as f64;
        let elapsed = b
            .last
            .map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        // Burst: at most one second of rate saved up.
        b.tokens = (b.tokens + elapsed * rate).min(rate) - bytes as f64;
        b.last = Some(now);
        (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Sends `total` bytes in 64 KiB writes on made-up time from `start`
    /// (waiting exactly as told); returns the time taken.
    fn run(t: &Throttle, start: Instant, total: u64) -> Duration {
        let mut now = start;
        let mut sent = 0;
        while sent < total {
            if let Some(d) = t.pace(65536, now) {
                now += d;
            }
            sent += 65536;
        }
        now - start
    }

    #[test]
    fn the_rate_holds_within_five_percent() {
        let mib = 1u64 << 20;
        let t = Throttle::new(Box::new(move || Some(20 * mib)));
        // 30 s worth of 20 MiB/s from an empty bucket: the bucket starts
        // empty, so the first second is not a free burst.
        let took = run(&t, Instant::now(), 600 * mib).as_secs_f64();
        let rate = 600.0 / took;
        assert!((rate - 20.0).abs() <= 1.0, "{rate} MiB/s");
        // Same over a few seconds.
        let t = Throttle::new(Box::new(move || Some(4 * mib)));
        let took = run(&t, Instant::now(), 12 * mib).as_secs_f64();
        assert!((12.0 / took - 4.0).abs() <= 0.2, "{took}");
    }

    #[test]
    fn an_idle_sender_saves_at_most_one_second() {
        let mib = 1u64 << 20;
        let t = Throttle::new(Box::new(move || Some(8 * mib)));
        let t0 = Instant::now();
        assert!(t.pace(1, t0).is_some(), "empty bucket at the start");
        // After an hour idle: 8 MiB go at once, the 9th waits 1/8 s.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(t.pace(8 * mib - 1, later), None);
        let d = t.pace(mib, later).expect("the burst is spent");
        assert!((d.as_secs_f64() - 0.125).abs() < 1e-3, "{d:?}");
    }

    #[test]
    fn a_new_rate_applies_within_a_second() {
        let mib = 1u64 << 20;
        let rate = Arc::new(AtomicU64::new(8 * mib));
        let r = rate.clone();
        let t = Throttle::new(Box::new(move || Some(r.load(Ordering::SeqCst))));
        let t0 = Instant::now();
        let took = run(&t, t0, 16 * mib);
        assert!((took.as_secs_f64() - 2.0).abs() < 0.01, "{took:?}");
        // A window opens (unlimited): once re-read, nothing waits.
        rate.store(0, Ordering::SeqCst);
        let now = t0 + took + REREAD;
        assert_eq!(t.pace(1 << 30, now), None);
        // And closes again at 2 MiB/s, one idle second later: that second
        // is saved up (2 MiB), the other 6 MiB take 3 s.
        rate.store(2 * mib, Ordering::SeqCst);
        let now = now + REREAD;
        let took = run(&t, now, 8 * mib);
        assert!((took.as_secs_f64() - 3.0).abs() < 0.01, "{took:?}");
    }

    #[test]
    fn consume_is_never_faster_than_the_limit() {
        // Real sleeping: a lower bound on the time holds however loaded
        // the machine is. 2 MiB at 8 MiB/s from an empty bucket: ≥ 1/4 s.
        let t = Throttle::new(Box::new(|| Some(8 << 20)));
        let start = Instant::now();
        for _ in 0..32 {
            t.consume(65536);
        }
        assert!(start.elapsed().as_secs_f64() >= 0.25);
        let u = Throttle::unlimited();
        assert_eq!(u.pace(u64::MAX / 2, Instant::now()), None);
    }
}
