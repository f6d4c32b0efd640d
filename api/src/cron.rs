//! Dates in UTC and five-field cron expressions (`MIN HOUR DOM MON DOW`, UTC) for snapshot
//! schedules: `*`, `N`, `A-B`, `*/S`, `A-B/S` and comma lists; day of week
//! 0-7 (0 and 7 are Sunday). As in Vixie cron, a day matches if its day
//! of month OR its day of week does when both day fields are restricted,
//! and if both do when either field starts with `*` (so `*/2` counts as
//! unrestricted for this rule: "0 0 */2 * 1" is odd days that are Mondays,
//! as Vixie's DOM_STAR/DOW_STAR flags make it).

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
    // Vixie cron sets DOM_STAR/DOW_STAR when the field starts with '*'.
    Ok((bits, s.starts_with('*')))
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
        if self.dom_star || self.dow_star {
            dom_ok && dow_ok
        } else {
            dom_ok || dow_ok
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

    // ---- An independent reference, written from the crontab(5) text and
    // Vixie cron's code, sharing nothing with the parser above: each field
    // is generated from parts whose meaning is known (so the expected set
    // is built directly, not parsed), dates come from stepping a calendar
    // one day at a time, and matching is a brute-force scan.

    /// One comma-separated part of a field, as generated.
    #[derive(Clone, Copy, Debug)]
    enum Part {
        Star,
        Num(u32),
        Range(u32, u32),
        StarStep(u32),
        RangeStep(u32, u32, u32),
    }

    impl Part {
        fn text(self) -> String {
            match self {
                Part::Star => "*".into(),
                Part::Num(a) => a.to_string(),
                Part::Range(a, b) => format!("{a}-{b}"),
                Part::StarStep(s) => format!("*/{s}"),
                Part::RangeStep(a, b, s) => format!("{a}-{b}/{s}"),
            }
        }

        /// The values the part stands for, or None if it is invalid.
        fn values(self, lo: u32, hi: u32) -> Option<Vec<u32>> {
            let (a, b, s) = match self {
                Part::Star => (lo, hi, 1),
                Part::Num(a) => (a, a, 1),
                Part::Range(a, b) => (a, b, 1),
                Part::StarStep(s) => (lo, hi, s),
                Part::RangeStep(a, b, s) => (a, b, s),
            };
            if s == 0 || a < lo || b > hi || a > b {
                return None;
            }
            Some((a..=b).step_by(s as usize).collect())
        }
    }

    /// A generated field: its text, its set (None: the field is invalid),
    /// and whether it starts with `*` (Vixie's DOM_STAR/DOW_STAR flags).
    struct RefField {
        text: String,
        set: Option<std::collections::BTreeSet<u32>>,
        star: bool,
    }

    fn gen_field(r: &mut impl rand::Rng, lo: u32, hi: u32) -> RefField {
        // Mostly valid values, some just outside the range.
        let v = |r: &mut dyn rand::RngCore| {
            use rand::Rng;
            if r.gen_range(0..20) == 0 {
                if r.gen_bool(0.5) {
                    lo.saturating_sub(1)
                } else {
                    hi + 1
                }
            } else {
                r.gen_range(lo..=hi)
            }
        };
        let n = if r.gen_range(0..3) == 0 {
            r.gen_range(2..=3)
        } else {
            1
        };
        let mut parts = Vec::new();
        for _ in 0..n {
            let step = if r.gen_range(0..30) == 0 {
                0
            } else {
                r.gen_range(1..=hi - lo + 2)
            };
            let (a, b) = (v(r), v(r));
            let (a, b) = if r.gen_range(0..10) == 0 {
                (a.max(b), a.min(b))
            } else {
                (a.min(b), a.max(b))
            };
            parts.push(match r.gen_range(0..6) {
                0 | 1 => Part::Star,
                2 => Part::Num(a),
                3 => Part::Range(a, b),
                4 => Part::StarStep(step),
                _ => Part::RangeStep(a, b, step),
            });
        }
        let text: Vec<String> = parts.iter().map(|p| p.text()).collect();
        let text = text.join(",");
        let mut set = Some(std::collections::BTreeSet::new());
        for p in &parts {
            match (p.values(lo, hi), set.as_mut()) {
                (Some(vals), Some(s)) => s.extend(vals),
                _ => set = None,
            }
        }
        RefField {
            star: text.starts_with('*'),
            text,
            set,
        }
    }

    /// The reference's view of a cron expression.
    struct RefCron {
        fields: [RefField; 5],
    }

    impl RefCron {
        fn valid(&self) -> bool {
            self.fields.iter().all(|f| f.set.is_some())
        }

        fn has(&self, i: usize, v: u32) -> bool {
            self.fields[i].set.as_ref().is_some_and(|s| s.contains(&v))
        }

        /// Vixie cron: minute, hour and month must match; the day matches
        /// on day of month AND day of week if either field starts with `*`,
        /// else on day of month OR day of week. Sunday is 0 or 7.
        fn day_ok(&self, month: u32, dom: u32, dow: u32) -> bool {
            if !self.has(3, month) {
                return false;
            }
            let dom_ok = self.has(2, dom);
            let dow_ok = self.has(4, dow) || (dow == 0 && self.has(4, 7));
            if self.fields[2].star || self.fields[4].star {
                dom_ok && dow_ok
            } else {
                dom_ok || dow_ok
            }
        }

        /// Brute force: every day from `start`'s day on (a calendar stepped
        /// one day at a time), every hour and minute of a matching day in
        /// order; the first minute strictly after `start` and within the
        /// five-year horizon.
        fn next_after(&self, start: u64) -> Option<u64> {
            let end = start + 5 * 366 * 86_400;
            let (mut y, mut m, mut d, mut dow) = (2026u32, 11u32, 24u32, 2u32); // T0: a Tuesday
            let mut day = T0 / 86_400;
            let leap =
                |y: u32| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
            let len = |y: u32, m: u32| match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            while day * 86_400 <= end {
                if day >= start / 86_400 && self.day_ok(m, d, dow) {
                    for h in 0..24u64 {
                        for min in 0..60u64 {
                            let t = day * 86_400 + h * 3600 + min * 60;
                            if t > start
                                && t <= end
                                && self.has(1, h as u32)
                                && self.has(0, min as u32)
                            {
                                return Some(t);
                            }
                        }
                    }
                }
                day += 1;
                dow = (dow + 1) % 7;
                d += 1;
                if d > len(y, m) {
                    d = 1;
                    m += 1;
                    if m > 12 {
                        m = 1;
                        y += 1;
                    }
                }
            }
            None
        }
    }

    #[test]
    fn matches_an_independent_brute_force_reference() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(25);
        let limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
        let (mut parsed, mut refused, mut matched, mut never) = (0, 0, 0, 0);
        let mut or_rule = 0;
        for _ in 0..3000 {
            let fields = limits.map(|(lo, hi)| gen_field(&mut r, lo, hi));
            let reference = RefCron { fields };
            let texts: Vec<&str> = reference.fields.iter().map(|f| f.text.as_str()).collect();
            let expr = texts.join(" ");
            let got = Cron::parse(&expr);
            assert_eq!(got.is_ok(), reference.valid(), "{expr:?}: {got:?}");
            let Ok(c) = got else {
                refused += 1;
                continue;
            };
            parsed += 1;
            if !reference.fields[2].star && !reference.fields[4].star {
                or_rule += 1;
            }
            for _ in 0..3 {
                // Anywhere in the four years after T0, at any second.
                let start = T0 + r.gen_range(0..4 * 366 * 86_400);
                let want = reference.next_after(start);
                assert_eq!(c.next_after(start), want, "{expr:?} after {}", utc(start));
                match want {
                    Some(_) => matched += 1,
                    None => never += 1,
                }
            }
        }
        // The comparison must have had something to compare: enough valid
        // expressions, enough invalid ones, matches found and not, and
        // expressions where Vixie's OR rule applies.
        assert!(parsed >= 1500, "only {parsed} expressions parsed");
        assert!(refused >= 300, "only {refused} expressions refused");
        assert!(
            matched >= 3000 && never >= 1,
            "{matched} matched, {never} never"
        );
        assert!(or_rule >= 300, "only {or_rule} expressions use the OR rule");
        // Days that never come, and near misses, by hand through the same
        // reference (random fields rarely hit these).
        let by_hand = [
            ("0 0 31 2 *", false),
            ("0 0 30,31 2 *", false),
            ("0 0 31 4,6,9,11 *", false),
            ("0 0 31 2 1", true),    // OR: any Monday in February
            ("0 0 31 2 */1", false), // AND: '*' first, and no Feb 31st
            ("0 0 29 2 *", true),    // 2028
        ];
        for (expr, some) in by_hand {
            let f: Vec<&str> = expr.split(' ').collect();
            let field = |i: usize, lo: u32, hi: u32| {
                let mut set = std::collections::BTreeSet::new();
                for p in f[i].split(',') {
                    let part = match p.split_once('/') {
                        Some(("*", s)) => Part::StarStep(s.parse().unwrap()),
                        None if p == "*" => Part::Star,
                        None => Part::Num(p.parse().unwrap()),
                        _ => unreachable!("{p}"),
                    };
                    set.extend(part.values(lo, hi).unwrap());
                }
                RefField {
                    text: f[i].into(),
                    set: Some(set),
                    star: f[i].starts_with('*'),
                }
            };
            let reference = RefCron {
                fields: [
                    field(0, 0, 59),
                    field(1, 0, 23),
                    field(2, 1, 31),
                    field(3, 1, 12),
                    field(4, 0, 7),
                ],
            };
            let want = reference.next_after(T0);
            assert_eq!(want.is_some(), some, "{expr}: the reference itself");
            assert_eq!(Cron::parse(expr).unwrap().next_after(T0), want, "{expr}");
        }
    }

    #[test]
    fn vixie_day_rule_by_hand() {
        // 2026-11-24 is a Tuesday (dow 2). Both day fields restricted: OR.
        // "1st of the month OR Monday": Monday the 30th comes first.
        let c = Cron::parse("0 0 1 * 1").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 6 * 86_400));
        // A day field that starts with '*' (even "*/2") makes it AND, as in
        // Vixie cron: odd days that are Mondays. Nov 30 (even) is not one;
        // the first odd Monday after T0 is 2026-12-07.
        let c = Cron::parse("0 0 */2 * 1").unwrap();
        assert_eq!(c.next_after(T0), Some(T0 + 13 * 86_400));
        // AND again ('*' first): the 1st of a month that falls on a Sunday,
        // Wednesday or Saturday. Dec 1 is a Tuesday, then Fri, Mon, Mon,
        // Thu: 2027-05-01, a Saturday.
        let c = Cron::parse("0 0 1 * */3").unwrap();
        let t = c.next_after(T0).unwrap();
        assert_eq!(utc(t), "2027-05-01 00:00:00");
    }

    #[test]
    fn random_input_never_panics_and_matches_are_real() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        // Digits, the operators, spaces; a few of each field's shapes so
        // that a good share of the strings are valid expressions.
        let pieces = [
            "*", "*/5", "1", "7", "12", "30", "1-5", "0-23/6", ",", "/", "-", " ", "x", "60",
        ];
        let (mut parsed, mut matched) = (0, 0);
        for _ in 0..20_000 {
            let n = r.gen_range(0..12);
            let mut e: String = (0..n)
                .map(|_| pieces[r.gen_range(0..pieces.len())])
                .collect();
            if r.gen_bool(0.5) {
                // Five space-separated chunks: shaped like an expression.
                e = (0..5)
                    .map(|_| pieces[r.gen_range(0..8)])
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            if let Ok(c) = Cron::parse(&e) {
                parsed += 1;
                if let Some(t) = c.next_after(T0) {
                    matched += 1;
                    assert!(t > T0 && t % 60 == 0, "{e}");
                    assert!(c.day_matches((t / 86_400) as i64), "{e}");
                }
            }
        }
        assert!(parsed >= 2000, "only {parsed} of the random strings parsed");
        assert!(matched >= 1000, "only {matched} matched");
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
