//! The appliance's clock: real time, or real time plus an offset that tests
//! move forward (`--fake-clock`) to exercise schedules and retention.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Clock {
    fake: bool,
    offset_secs: AtomicU64,
}

impl Clock {
    pub fn new(fake: bool) -> Clock {
        Clock {
            fake,
            offset_secs: AtomicU64::new(0),
        }
    }

    pub fn is_fake(&self) -> bool {
        self.fake
    }

    pub fn now_ns(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        real.saturating_add(
            self.offset_secs
                .load(Ordering::Relaxed)
                .saturating_mul(1_000_000_000),
        )
    }

    pub fn now(&self) -> u64 {
        self.now_ns() / 1_000_000_000
    }

    /// Moves a fake clock forward; false for the real clock.
    pub fn advance(&self, secs: u64) -> bool {
        if !self.fake {
            return false;
        }
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
        true
    }
}

/// `YYYYMMDD-HHMMSS` in UTC, for labels.
pub fn stamp(unix: u64) -> String {
    cdm_api::cron::utc(unix)
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | ':' => None,
            c => Some(c),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(stamp(1_795_484_096), "20261124-013456");
    }

    #[test]
    fn fake_clock_moves() {
        let c = Clock::new(true);
        let a = c.now();
        assert!(c.advance(3600));
        assert!(c.now() >= a + 3600);
        assert!(!Clock::new(false).advance(1));
    }
}
