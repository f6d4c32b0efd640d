//! Points in time as restores name them: RFC 3339 in, Unix microseconds
//! inside, and the UTC text PostgreSQL and MariaDB read back out. One home
//! for the calendar arithmetic (the inverse of [`crate::cron::civil_from_days`]).

use crate::cron::civil_from_days;

/// Days since 1970-01-01 of a civil date (H. Hinnant's days_from_civil).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Unix microseconds of an RFC 3339 time (`2026-11-30T19:40:05Z`,
/// `2026-11-30 19:40:05.250+01:00`; a space may stand for the `T`). A time
/// without a zone is refused: a restore target must not depend on the
/// zone of whoever reads it.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.len() < 20 || !s.is_char_boundary(10) || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let sep = rest.as_bytes()[0];
    if !matches!(sep, b'T' | b't' | b' ') {
        return None;
    }
    if !rest.is_ascii() {
        return None;
    }
    let (clock, zone) = rest[1..].split_at(8);
    let d: Vec<&str> = date.split('-').collect();
    let c: Vec<&str> = clock.split(':').collect();
    if d.len() != 3 || c.len() != 3 || d[0].len() != 4 || d[1].len() != 2 || d[2].len() != 2 {
        return None;
    }
    let (y, mo, da) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (h, mi, se) = (num(c[0])?, num(c[1])?, num(c[2])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || da == 0 || da > month_days[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || se > 59 || c.iter().any(|p| p.len() != 2) {
        return None;
    }
    let (frac, zone) = match zone.strip_prefix('.') {
        Some(z) => {
            let end = z.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(z.len());
            let digits = &z[..end];
            if digits.is_empty() || digits.len() > 9 {
                return None;
            }
            let mut us = 0u32;
            for (i, b) in digits.bytes().take(6).enumerate() {
                us += u32::from(b - b'0') * 10u32.pow(5 - i as u32);
            }
            (us, &z[end..])
        }
        None => (0, zone),
    };
    let offset_secs: i64 = match zone {
        "Z" | "z" => 0,
        z if z.len() == 6 && (z.starts_with('+') || z.starts_with('-')) && &z[3..4] == ":" => {
            let (oh, om) = (num(&z[1..3])?, num(&z[4..6])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3600 + om * 60);
            if z.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(y), mo, da);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + se) - offset_secs;
    Some(secs * 1_000_000 + i64::from(frac))
}

/// `YYYY-MM-DD HH:MM:SS.ffffff+00` of Unix microseconds: what PostgreSQL's
/// `recovery_target_time` reads without a doubt about the zone.
pub fn pg_utc(us: i64) -> String {
    let (secs, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{frac:06}+00",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// RFC 3339 (UTC, microseconds) of Unix microseconds, for messages and
/// results.
pub fn rfc3339_us(us: i64) -> String {
    let t = pg_utc(us);
    format!("{}Z", t.trim_end_matches("+00").replacen(' ', "T", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_zones() {
        let t = parse_rfc3339("2026-11-30T19:40:05Z").unwrap();
        assert_eq!(t, 1_796_067_605_000_000);
        assert_eq!(rfc3339_us(t), "2026-11-30T19:40:05.000000Z");
        assert_eq!(
            parse_rfc3339("2026-11-30 20:40:05.25+01:00"),
            Some(t + 250_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-30T19:40:05.1234567-00:30"),
            Some(t + 1800 * 1_000_000 + 123_456)
        );
        assert_eq!(pg_utc(t + 7), "2026-11-30 19:40:05.000007+00");
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z").map(|_| ()), Some(()));
        for bad in [
            "",
            "2026-11-30",
            "2026-11-30T19:40:05",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T19:40:05+0100",
            "2026-11-30T19:40:05.Z",
            "2026-11-30T19:4é:05Z",
            "2026-11-30T19:40:05+0é00",
            "２０２６-11-30T19:40:05Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn days_invert_civil_dates() {
        for z in (-800_000i64..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}
