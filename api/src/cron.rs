//! Dates in UTC and five-field cron expressions (`MIN HOUR DOM MON DOW`, UTC) for snapshot
//! schedules: `*`, `N`, `A-B`, `*/S`, `A-B/S` and comma lists; day of week
//! 0-7 (0 and 7 are Sunday). As in Vixie cron, when both day fields are
//! restricted a day matches if either does.

use crate::error::{InputError, InputKind};

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (H. Hinnant's civil_from_days).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds.
pub fn utc(unix: u64) -> String {
    let (y, m, d) = civil_from_days((unix / 86_400) as i64);
    let s = unix % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    doms: u64,
    months: u64,
    dows: u64,
    dom_star: bool,
    dow_star: bool,
}

fn field(s: &str, lo: u32, hi: u32, name: &str) -> Result<(u64, bool), InputError> {
    let bad = |m: String| InputError::new(InputKind::Cron, m);
    let mut bits = 0u64;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u32 = st
                    .parse()
                    .map_err(|_| bad(format!("bad step {st:?} in {name} field")))?;
                if st == 0 {
                    return Err(bad(format!("step 0 in {name} field")));
                }
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a.parse().map_err(|_| bad(format!("bad {name} {a:?}")))?;
            let b: u32 = b.parse().map_err(|_| bad(format!("bad {name} {b:?}")))?;
            (a, b)
        } else {
            let a: u32 = range
                .parse()
                .map_err(|_| bad(format!("bad {name} {range:?}")))?;
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(bad(format!("{name} {range:?} outside {lo}-{hi}")));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, s == "*"))
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, InputError> {
        let f: Vec<&str> = expr.split_whitespace().collect();
        if f.len() != 5 {
            return Err(InputError::new(
                InputKind::Cron,
                format!("cron expression {expr:?} needs 5 fields: MIN HOUR DOM MON DOW"),
            ));
        }
        let (minutes, _) = field(f[0], 0, 59, "minute")?;
        let (hours, _) = field(f[1], 0, 23, "hour")?;
        let (doms, dom_star) = field(f[2], 1, 31, "day of month")?;
        let (months, _) = field(f[3], 1, 12, "month")?;
        let (mut dows, dow_star) = field(f[4], 0, 7, "day of week")?;
        if dows & (1 << 7) != 0 {
            dows |= 1;
        }
        Ok(Cron {
            minutes,
            hours,
            doms,
            months,
            dows,
            dom_star,
            dow_star,
        })
    }

    pub fn day_matches(&self, days: i64) -> bool {
        let (_, m, d) = civil_from_days(days);
        if self.months & (1 << m) == 0 {
            return false;
        }
        let dow = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday
        let dom_ok = self.doms & (1 << d) != 0;
        let dow_ok = self.dows & (1 << dow) != 0;
        match (self.dom_star, self.dow_star) {
            (true, true) => true,
            (false, true) => dom_ok,
            (true, false) => dow_ok,
            (false, false) => dom_ok || dow_ok,
        }
    }

    /// The first matching minute strictly after `unix` (seconds), within
    /// five years; None if the expression never matches (`0 0 31 2 *`).
    pub fn next_after(&self, unix: u64) -> Option<u64> {
        let mut t = (unix / 60 + 1) * 60;
        let end = unix + 5 * 366 * 86_400;
        while t <= end {
            let days = (t / 86_400) as i64;
            if !self.day_matches(days) {
                t = (t / 86_400 + 1) * 86_400;
                continue;
            }
            let h = (t % 86_400 / 3600) as u32;
            if self.hours & (1 << h) == 0 {
                t = (t / 3600 + 1) * 3600;
                continue;
            }
            let m = (t % 3600 / 60) as u32;
            if self.minutes & (1 << m) != 0 {
                return Some(t);
            }
            t += 60;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-24 00:00:00 UTC, a Tuesday.
    const T0: u64 = 1_795_478_400;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(utc(1_795_484_096), "2026-11-24 01:34:56");
    }

    #[test]
    fn daily_and_steps() {
        let c = Cron::parse("0 2 * * *").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 2 * 3600));
        assert_eq!(c.next_after(T0 + 2 * 3600), Some(T0 + 86_400 + 2 * 3600));
        let c = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 900));
        assert_eq!(c.next_after(T0 + 901), Some(T0 + 1800));
        let c = Cron::parse("30 8-10/2 * * *").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 8 * 3600 + 1800));
        assert_eq!(
            c.next_after(T0 + 8 * 3600 + 1800),
            Some(T0 + 10 * 3600 + 1800)
        );
    }

    #[test]
    fn weekdays_months_and_or_rule() {
        // Sundays (0 and 7) at midnight: next is 2026-11-29.
        for e in ["0 0 * * 0", "0 0 * * 7"] {
            assert_eq!(
                Cron::parse(e).unwrap().next_after(T0),
                Some(T0 + 5 * 86_400)
            );
        }
        // 1st of the month OR Wednesday: Wednesday 25th comes first.
        let c = Cron::parse("0 0 1 * 3").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 86_400));
        // January 1st.
        let c = Cron::parse("0 0 1 1 *").unwrap();
        assert_eq!(c.next_after(T0), Some(1_798_761_600));
        assert_eq!(Cron::parse("0 0 31 2 *").unwrap().next_after(T0), None);
    }

    #[test]
    fn random_input_never_panics_and_matches_are_real() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"0123456789*/,- x";
        for _ in 0..20_000 {
            let n = r.gen_range(0..24);
            let e: String = (0..n)
                .map(|_| alphabet[r.gen_range(0..alphabet.len())] as char)
                .collect();
            if let Ok(c) = Cron::parse(&e) {
                if let Some(t) = c.next_after(T0) {
                    assert!(t > T0 && t % 60 == 0, "{e}");
                    assert!(c.day_matches((t / 86_400) as i64), "{e}");
                }
            }
        }
        // Leap day: found within the five-year horizon.
        let c = Cron::parse("0 0 29 2 *").unwrap();
        assert_eq!(c.next_after(T0), Some(1_835_395_200)); // 2028-02-29
    }

    #[test]
    fn rejects_bad_expressions() {
        for e in [
            "",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "*/0 * * * *",
            "a * * * *",
            "5-1 * * * *",
            "* * * 13 *",
            "* * * * 8",
        ] {
            assert!(Cron::parse(e).is_err(), "{e}");
        }
    }
}
