//! When the last job poll of this state directory may still be open on
//! the appliance. A long poll outlives an agent that dies during it: the
//! appliance may still hand a job to the dead connection until the poll's
//! wait ends, and that job would be marked running on a host that never
//! got it. So each poll first writes its end time here, and a new run
//! waits for that time before its first heartbeat: by then the appliance
//! has given that job (if any) to the dead poll, and the first heartbeat,
//! which lists no running job, makes it fail with the reason instead of
//! leaving it running.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Added to a poll's wait: the appliance wakes its waiters each second.
pub const MARGIN: Duration = Duration::from_secs(3);

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("serve").join("poll-until")
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records that a poll of `wait` starts now. Best effort: a failure only
/// loses the wait of the next start (logged).
pub fn mark(state_dir: &Path, now: SystemTime, wait: Duration) {
    let until = unix(now + wait + MARGIN);
    let p = path(state_dir);
    if let Err(e) = std::fs::write(&p, until.to_string()) {
        tracing::warn!(file = %p.display(), error = %e, "cannot record the job poll's end");
    }
}

/// How long the last run's poll may still be open (none when it ended; at
/// most `max`, whatever a wrong clock says).
pub fn pending(state_dir: &Path, now: SystemTime, max: Duration) -> Option<Duration> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    let until: u64 = text.trim().parse().ok()?;
    let left = until.checked_sub(unix(now)).filter(|s| *s > 0)?;
    Some(Duration::from_secs(left).min(max))
}

/// Forgets the mark (a stop that saw its poll end).
pub fn clear(state_dir: &Path) {
    let _ = std::fs::remove_file(path(state_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_is_waited_for_until_it_ends_and_no_longer() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("serve")).unwrap();
        let max = Duration::from_secs(40);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(pending(d.path(), t0, max), None, "no poll yet");
        mark(d.path(), t0, Duration::from_secs(25));
        assert_eq!(pending(d.path(), t0, max), Some(Duration::from_secs(28)));
        let later = t0 + Duration::from_secs(20);
        assert_eq!(pending(d.path(), later, max), Some(Duration::from_secs(8)));
        assert_eq!(pending(d.path(), t0 + Duration::from_secs(28), max), None);
        // A clock set back cannot make a start wait for ever.
        let back = t0 - Duration::from_secs(3600);
        assert_eq!(pending(d.path(), back, max), Some(max));
        clear(d.path());
        assert_eq!(pending(d.path(), t0, max), None);
        std::fs::write(d.path().join("serve/poll-until"), "garbage").unwrap();
        assert_eq!(pending(d.path(), t0, max), None);
    }
}
