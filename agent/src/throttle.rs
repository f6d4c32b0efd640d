//! Bandwidth limits (3.5 of the brief): a maximum rate in MiB/s, with
//! other limits for windows of the day ("08:00-18:00=20": 20 MiB/s during
//! office hours). A token bucket holding at most a quarter second of
//! traffic paces the writes to the appliance; the limit in force is looked
//! up again at every call, so a backup that runs into a window slows down
//! (or speeds up) there.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// A window of the day with its own limit; `end` before `start` wraps
/// past midnight ("22:00-06:00").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// "HH:MM" local time, inclusive.
    pub start: String,
    /// "HH:MM" local time, exclusive.
    pub end: String,
    /// MiB/s in the window; 0 = unlimited.
    pub limit_mibps: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bandwidth {
    /// MiB/s outside every window; absent or 0 = unlimited.
    #[serde(default)]
    pub limit_mibps: Option<f64>,
    #[serde(default, rename = "window")]
    pub windows: Vec<Window>,
}

fn minute(s: &str) -> Result<u32, Error> {
    let bad = |why: &str| Error::invalid(format!("{s:?}: {why}"));
    let (h, m) = s.split_once(':').ok_or_else(|| bad("want HH:MM"))?;
    let h: u32 = h.parse().map_err(|_| bad("bad hour"))?;
    let m: u32 = m.parse().map_err(|_| bad("bad minute"))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(bad("not a time of day"));
    }
    Ok(h * 60 + m)
}

impl Window {
    /// Parses "HH:MM-HH:MM=MIBPS".
    pub fn parse(s: &str) -> Result<Window, Error> {
        let want = || Error::invalid(format!("{s:?}: want HH:MM-HH:MM=MIBPS"));
        let (range, rate) = s.split_once('=').ok_or_else(want)?;
        let (a, b) = range.split_once('-').ok_or_else(want)?;
        let w = Window {
            start: a.trim().into(),
            end: b.trim().into(),
            limit_mibps: rate
                .trim()
                .parse()
                .map_err(|_| Error::invalid(format!("{s:?}: bad rate {rate:?}")))?,
        };
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> Result<(u32, u32), Error> {
        if !(self.limit_mibps >= 0.0 && self.limit_mibps.is_finite()) {
            return Err(Error::invalid(format!(
                "window rate {} is not a rate",
                self.limit_mibps
            )));
        }
        let (a, b) = (minute(&self.start)?, minute(&self.end)?);
        if a == b {
            return Err(Error::invalid(format!(
                "window {}-{} is empty",
                self.start, self.end
            )));
        }
        Ok((a, b))
    }

    fn contains(&self, m: u32) -> bool {
        match self.check() {
            Ok((a, b)) if a < b => (a..b).contains(&m),
            Ok((a, b)) => m >= a || m < b,
            Err(_) => false,
        }
    }
}

impl Bandwidth {
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(l) = self.limit_mibps {
            if !(l >= 0.0 && l.is_finite()) {
                return Err(Error::invalid(format!("limit {l} is not a rate")));
            }
        }
        for w in &self.windows {
            w.check()?;
        }
        Ok(())
    }

    /// Bytes per second at `minute` of the day; `None` = unlimited. The
    /// first window that holds the minute wins.
    pub fn rate_at(&self, minute: u32) -> Option<f64> {
        let mibps = self
            .windows
            .iter()
            .find(|w| w.contains(minute))
            .map(|w| w.limit_mibps)
            .or(self.limit_mibps)?;
        (mibps > 0.0).then_some(mibps * 1048576.0)
    }
}

/// Minutes since local midnight.
pub fn local_minute() -> u32 {
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u32
    }
}

/// Paces a stream of bytes to the limit in force.
pub struct Throttle {
    bw: Bandwidth,
    tokens: f64,
    last: Instant,
    clock: fn() -> u32,
    /// Time spent waiting.
    pub waited: Duration,
}

impl Throttle {
    pub fn new(bw: Bandwidth) -> Throttle {
        Throttle::with_clock(bw, local_minute)
    }

    pub fn with_clock(bw: Bandwidth, clock: fn() -> u32) -> Throttle {
        Throttle {
            bw,
            tokens: 0.0,
            last: Instant::now(),
            clock,
            waited: Duration::ZERO,
        }
    }

    /// Accounts for `bytes` about to be sent; sleeps as long as the limit
    /// needs.
    pub fn consume(&mut self, bytes: u64) {
        if let Some(d) = self.pace(bytes, Instant::now()) {
            std::thread::sleep(d);
            self.waited += d;
            self.last = Instant::now();
        }
    }

    /// The bucket's arithmetic at time `now`, without sleeping (so tests
    /// can drive it with made-up instants): how long `bytes` must wait, if
    /// at all. The caller sleeps that long and sets `last` after.
    fn pace(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        let Some(rate) = self.bw.rate_at((self.clock)()) else {
            self.last = now;
            return None;
        };
        let burst = rate / 4.0;
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate)
            .min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            let d = Duration::from_secs_f64(-self.tokens / rate);
            self.tokens = 0.0;
            // The bucket refills from the end of the wait.
            self.last = now + d;
            return Some(d);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw() -> Bandwidth {
        Bandwidth {
            limit_mibps: Some(100.0),
            windows: vec![
                Window::parse("08:00-18:00=20").unwrap(),
                Window::parse("22:00-06:00=0").unwrap(),
            ],
        }
    }

    #[test]
    fn windows_pick_the_rate() {
        let b = bw();
        assert_eq!(b.rate_at(7 * 60 + 59), Some(100.0 * 1048576.0));
        assert_eq!(b.rate_at(8 * 60), Some(20.0 * 1048576.0));
        assert_eq!(b.rate_at(17 * 60 + 59), Some(20.0 * 1048576.0));
        assert_eq!(b.rate_at(18 * 60), Some(100.0 * 1048576.0));
        // Wraps midnight; 0 = unlimited.
        assert_eq!(b.rate_at(23 * 60), None);
        assert_eq!(b.rate_at(3 * 60), None);
        assert_eq!(b.rate_at(6 * 60), Some(100.0 * 1048576.0));
        assert_eq!(Bandwidth::default().rate_at(600), None);
    }

    #[test]
    fn bad_windows_are_refused() {
        for s in [
            "8-9=1",
            "08:00=1",
            "08:00-09:00",
            "25:00-26:00=1",
            "08:00-08:00=1",
            "08:00-09:00=x",
            "08:00-09:00=-1",
        ] {
            assert!(Window::parse(s).is_err(), "{s}");
        }
        let b = Bandwidth {
            limit_mibps: Some(f64::NAN),
            windows: vec![],
        };
        assert!(b.validate().is_err());
    }

    #[test]
    fn throttle_paces_to_the_rate() {
        // 8 MiB/s all day, on made-up instants (no sleeping, no load
        // sensitivity): 4 MiB sent at once must wait exactly half a second
        // in total, since the bucket starts empty.
        let b = Bandwidth {
            limit_mibps: Some(8.0),
            windows: vec![],
        };
        let mut t = Throttle::with_clock(b.clone(), || 600);
        let t0 = t.last;
        let mut waited = Duration::ZERO;
        let mut now = t0;
        for _ in 0..64 {
            if let Some(d) = t.pace(65536, now) {
                waited += d;
                now += d;
            }
        }
        assert!((waited.as_secs_f64() - 0.5).abs() < 1e-6, "{waited:?}");
        // A sender slower than the limit never waits.
        let mut slow = Throttle::with_clock(b.clone(), || 600);
        let mut now = slow.last;
        for _ in 0..64 {
            now += Duration::from_millis(10); // 64 KiB per 10 ms = 6.25 MiB/s
            assert_eq!(slow.pace(65536, now), None);
        }
        // An idle sender saves at most a quarter second of traffic (2 MiB):
        // after a long pause, 3 MiB at once waits for the third MiB.
        let mut idle = Throttle::with_clock(b, || 600);
        let later = idle.last + Duration::from_secs(3600);
        let d = idle.pace(3 << 20, later).expect("must wait");
        assert!((d.as_secs_f64() - 0.125).abs() < 1e-6, "{d:?}");
        // Unlimited window: no wait at all.
        let mut u = Throttle::with_clock(bw(), || 23 * 60);
        let now = u.last;
        assert_eq!(u.pace(1 << 30, now), None);
        u.consume(1 << 30);
        assert_eq!(u.waited, Duration::ZERO);
    }

    #[test]
    fn consume_is_never_faster_than_the_limit() {
        // Real sleeping: a lower bound on elapsed time holds however loaded
        // the machine is (a limiter must not be faster than its limit). 1 MiB
        // at 8 MiB/s from an empty bucket takes at least 1/8 s.
        let b = Bandwidth {
            limit_mibps: Some(8.0),
            windows: vec![],
        };
        let mut t = Throttle::with_clock(b, || 600);
        let start = Instant::now();
        for _ in 0..16 {
            t.consume(65536);
        }
        let s = start.elapsed().as_secs_f64();
        assert!(s >= 0.125, "{s}");
        assert!(t.waited.as_secs_f64() <= s, "{:?} > {s}", t.waited);
    }
}
