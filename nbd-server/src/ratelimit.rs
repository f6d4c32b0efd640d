//! Rate limiting of a connection's per-request log lines: a client that
//! keeps failing (a dying disk, a full pool) would otherwise write a line
//! per request, tens of thousands a second.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::server::lock;

/// Lets through at most `burst` events per `window`; counts the rest, and
/// reports that count with the next event let through.
pub(crate) struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            burst,
            window,
            state: Mutex::new(Window {
                start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Some(events suppressed since the last one let through) if this one
    /// should be logged, None if it should not.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut g = lock(&self.state);
        let expired = match g.start {
            None => true,
            Some(s) => now.saturating_duration_since(s) >= self.window,
        };
        if expired {
            g.start = Some(now);
            g.passed = 0;
        }
        if g.passed >= self.burst {
            g.suppressed += 1;
            return None;
        }
        g.passed += 1;
        Some(std::mem::take(&mut g.suppressed))
    }

    /// Events suppressed and not yet reported (for a last line when the
    /// connection ends); resets the count.
    pub(crate) fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut lock(&self.state).suppressed)
    }
}

impl Default for LogLimiter {
    /// A few lines a second: enough to see what fails, not a flood.
    fn default() -> Self {
        LogLimiter::new(5, Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_what_it_dropped() {
        let l = LogLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit(t0), Some(0));
        }
        for i in 1..=10 {
            assert_eq!(l.admit(t0 + Duration::from_millis(i * 10)), None);
        }
        // A new window: the first line carries the count of those dropped.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.admit(t1), Some(10));
        assert_eq!(l.admit(t1), Some(0));
        assert_eq!(l.admit(t1), Some(0));
        assert_eq!(l.admit(t1), None);
        assert_eq!(l.take_suppressed(), 1);
        assert_eq!(l.take_suppressed(), 0);
        // Time going backwards (another thread's older `now`) is no new window.
        assert_eq!(l.admit(t0), None);
    }

    #[test]
    fn a_quiet_connection_logs_every_error() {
        let l = LogLimiter::new(2, Duration::from_millis(100));
        let t0 = Instant::now();
        for i in 0..20 {
            assert_eq!(l.admit(t0 + Duration::from_millis(i * 100)), Some(0));
        }
    }
}
