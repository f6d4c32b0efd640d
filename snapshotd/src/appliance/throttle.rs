//! Login rate limiting: failed `POST /v1/login` attempts per user name and
//! per client address, with an exponential lockout.
//!
//! The state lives in memory only: a restart forgets it, which at worst
//! grants one more round of [`USER_FREE`] guesses per restart — far too few
//! for guessing an Argon2id-hashed password, and restarts are not something
//! an API client can cause. The map is bounded ([`MAX_ENTRIES`]) so a flood
//! of made-up user names cannot grow it without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cdm_common::lock::lock;

/// Failures of one user name before the first lockout.
pub const USER_FREE: u32 = 5;
/// Failures from one address before its first lockout: higher than per
/// user, since one address (a NAT, a jump host) may serve several people.
pub const ADDR_FREE: u32 = 20;
/// Failures are forgotten this long after the last one.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The first lockout; each further failure doubles it up to [`MAX_DELAY`].
pub const BASE_DELAY: Duration = Duration::from_secs(60);
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// Entries kept at most (user names and addresses together).
pub const MAX_ENTRIES: usize = 10_000;

/// What the failures are counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    User(String),
    Addr(IpAddr),
}

impl Key {
    fn free(&self) -> u32 {
        match self {
            Key::User(_) => USER_FREE,
            Key::Addr(_) => ADDR_FREE,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// How long the lockout lasts after `failures` failures with `free`
/// allowed: none below `free`, then [`BASE_DELAY`] doubling per further
/// failure, capped at [`MAX_DELAY`].
pub fn lockout(failures: u32, free: u32) -> Option<Duration> {
    let extra = failures.checked_sub(free)?;
    // 2^5 minutes already passes the cap; a bounded shift cannot overflow.
    let delay = BASE_DELAY.saturating_mul(1u32 << extra.min(10));
    Some(delay.min(MAX_DELAY))
}

impl Entry {
    /// The moment the lockout ends, if there is one.
    fn locked_until(&self, free: u32) -> Option<Instant> {
        lockout(self.failures, free).map(|d| self.last + d)
    }
}

/// A lockout that a failure just started: whom it locks and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lockout {
    pub key: Key,
    pub failures: u32,
    pub delay: Duration,
}

#[derive(Default)]
pub struct LoginThrottle {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl LoginThrottle {
    /// `Err(wait)` while any of `keys` is locked out.
    pub fn check(&self, keys: &[Key], now: Instant) -> Result<(), Duration> {
        let map = lock(&self.entries);
        let wait = keys
            .iter()
            .filter_map(|k| {
                let until = map.get(k)?.locked_until(k.free())?;
                until.checked_duration_since(now).filter(|d| !d.is_zero())
            })
            .max();
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// Counts a failed attempt against each key; returns the lockouts it
    /// started (each is one alert).
    pub fn failed(&self, keys: &[Key], now: Instant) -> Vec<Lockout> {
        let mut map = lock(&self.entries);
        if map.len() + keys.len() > MAX_ENTRIES {
            evict(&mut map, now);
        }
        let mut started = Vec::new();
        for k in keys {
            let e = map.entry(k.clone()).or_insert(Entry {
                failures: 0,
                last: now,
            });
            if now.saturating_duration_since(e.last) > WINDOW {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last = now;
            if let Some(delay) = lockout(e.failures, k.free()) {
                started.push(Lockout {
                    key: k.clone(),
                    failures: e.failures,
                    delay,
                });
            }
        }
        started
    }

    /// A successful login clears the user name's failures (not the
    /// address's: one valid account must not unlock guessing at others).
    pub fn succeeded(&self, user: &str) {
        lock(&self.entries).remove(&Key::User(user.to_string()));
    }
}

/// Makes room: drops entries whose window has passed, then, if a flood
/// still fills the map, the least recently failed half.
fn evict(map: &mut HashMap<Key, Entry>, now: Instant) {
    map.retain(|_, e| now.saturating_duration_since(e.last) <= WINDOW);
    if map.len() < MAX_ENTRIES / 2 {
        return;
    }
    let mut lasts: Vec<Instant> = map.values().map(|e| e.last).collect();
    lasts.sort_unstable();
    let cut = lasts[lasts.len() / 2];
    map.retain(|_, e| e.last > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_doubles_and_caps() {
        assert_eq!(lockout(4, 5), None);
        assert_eq!(lockout(5, 5), Some(Duration::from_secs(60)));
        assert_eq!(lockout(6, 5), Some(Duration::from_secs(120)));
        assert_eq!(lockout(8, 5), Some(Duration::from_secs(480)));
        assert_eq!(lockout(9, 5), Some(MAX_DELAY));
        assert_eq!(lockout(u32::MAX, 5), Some(MAX_DELAY));
    }

    fn user(n: &str) -> Key {
        Key::User(n.into())
    }

    #[test]
    fn five_failures_lock_the_user_and_only_the_fifth_alerts() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..4 {
            assert!(t.failed(&[user("a")], now).is_empty(), "failure {i}");
            assert_eq!(t.check(&[user("a")], now), Ok(()));
        }
        let l = t.failed(&[user("a")], now);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].delay, BASE_DELAY);
        assert_eq!(t.check(&[user("a")], now), Err(BASE_DELAY));
        assert_eq!(t.check(&[user("b")], now), Ok(()));
        // Refused attempts are not failures: after the minute, one more try.
        let later = now + BASE_DELAY;
        assert_eq!(t.check(&[user("a")], later), Ok(()));
        let l = t.failed(&[user("a")], later);
        assert_eq!(l[0].delay, 2 * BASE_DELAY);
        assert_eq!(t.check(&[user("a")], later), Err(2 * BASE_DELAY));
    }

    #[test]
    fn success_and_time_clear_the_user() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..4 {
            t.failed(&[user("a")], now);
        }
        t.succeeded("a");
        assert!(t.failed(&[user("a")], now).is_empty());
        for _ in 0..4 {
            t.failed(&[user("b")], now);
        }
        // Past the window the count starts over.
        assert!(t.failed(&[user("b")], now + WINDOW * 2).is_empty());
    }

    #[test]
    fn an_address_has_a_larger_allowance() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let addr = Key::Addr("192.0.2.7".parse().unwrap());
        for i in 0..ADDR_FREE - 1 {
            let keys = [user(&format!("u{i}")), addr.clone()];
            assert!(t.failed(&keys, now).is_empty());
        }
        let l = t.failed(&[user("x"), addr.clone()], now);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, addr);
        assert!(t.check(&[user("fresh"), addr], now).is_err());
    }

    #[test]
    fn the_map_stays_bounded() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_ENTRIES + 10) {
            t.failed(
                &[user(&i.to_string())],
                now + Duration::from_millis(i as u64),
            );
        }
        assert!(lock(&t.entries).len() <= MAX_ENTRIES);
    }
}
