//! Byte sizes: reading them from people (`20GiB`, `1.5G`, `64k`) and
//! printing them back (`1.5 GiB`). Units are binary multiples whatever
//! their spelling, because every size in cdm is one of a device or volume.

/// Why a size is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("no number in size {0:?}")]
    NoNumber(String),
    #[error("unknown size unit {unit:?} in {input:?}")]
    UnknownUnit { unit: String, input: String },
    #[error("bad size {0:?}")]
    BadNumber(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
    #[error("size {0:?} is zero")]
    Zero(String),
}

/// The multiple a unit stands for: `K`, `KB`, `KiB` are all 1024, in any
/// case; no unit or `B` is bytes.
fn unit_multiple(unit: &str) -> Option<u64> {
    let u = unit.to_ascii_lowercase();
    let stem = u
        .strip_suffix("ib")
        .or_else(|| u.strip_suffix('b'))
        .unwrap_or(&u);
    let shift = match stem {
        "" if u != "ib" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    Some(1 << shift)
}

/// Parses `123`, `64K`, `64k`, `64KB`, `64KiB`, `10M`, `1.5G`, `20GiB`,
/// `2T`, `1P` (binary multiples; whitespace around the number and between
/// it and the unit is allowed). Whole numbers are exact; a fraction is
/// rounded down to a byte. Zero is a size; see [`parse_nonzero`].
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult = unit_multiple(unit).ok_or_else(|| SizeError::UnknownUnit {
        unit: unit.to_string(),
        input: s.to_string(),
    })?;
    if num.is_empty() {
        return Err(SizeError::NoNumber(s.to_string()));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| SizeError::TooLarge(s.to_string()));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| SizeError::BadNumber(s.to_string()))?;
    let v = f * mult as f64;
    // 2^64 is exactly representable; anything at or above it is not a u64.
    if !v.is_finite() || v >= 18_446_744_073_709_551_616.0 {
        return Err(SizeError::TooLarge(s.to_string()));
    }
    Ok(v as u64)
}

/// [`parse_size`], refusing zero (where a size must hold something: a new
/// volume, a stage disk).
pub fn parse_nonzero(s: &str) -> Result<u64, SizeError> {
    match parse_size(s)? {
        0 => Err(SizeError::Zero(s.to_string())),
        n => Ok(n),
    }
}

/// `1.5 GiB`-style rendering: bytes below 1 KiB, else one decimal in the
/// largest binary unit up to PiB.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the former parsers (cdmfs `units`, `cdmctl`, the agent's
    /// `ops`) accepted: each is still accepted, with the same value.
    #[test]
    fn accepted() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            (" 4096 ", 4096),
            ("1B", 1),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KB", 64 << 10),
            ("64kb", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("64KIB", 64 << 10),
            ("512mb", 512 << 20),
            ("8M", 8 << 20),
            ("10G", 10 << 30),
            ("8G", 8 << 30),
            ("20GiB", 20 << 30),
            ("20gib", 20 << 30),
            ("20 GiB", 20 << 30),
            ("1T", 1 << 40),
            ("2TiB", 2 << 40),
            ("1P", 1 << 50),
            ("3PB", 3 << 50),
            ("1.5G", 3 << 29),
            ("1.5 GiB", 3 << 29),
            (".5K", 512),
            ("0.5k", 512),
            ("16383P", 16383 << 50),
            ("18446744073709551615", u64::MAX),
        ];
        for &(s, v) in cases {
            assert_eq!(parse_size(s), Ok(v), "{s:?}");
        }
    }

    #[test]
    fn refused() {
        for bad in [
            "", " ", "G", "GiB", "iB", "x", "10X", "12Q", "5Q", "-1G", "+1G", "1e400", "1e3",
            "1.2.3", ".", "1 2", "1KK", "1KiBB", "inf", "NaN", "0x10",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        // Overflow, whole and fractional.
        for big in [
            "16384P",
            "99999999999P",
            "99999999999T",
            "18446744073709551616",
            "17179869184.5G",
        ] {
            assert!(
                matches!(parse_size(big), Err(SizeError::TooLarge(_))),
                "{big:?}"
            );
        }
        assert_eq!(
            parse_size("12Q").unwrap_err().to_string(),
            "unknown size unit \"Q\" in \"12Q\""
        );
    }

    #[test]
    fn nonzero() {
        assert_eq!(parse_nonzero("8G"), Ok(8 << 30));
        assert!(matches!(parse_nonzero("0"), Err(SizeError::Zero(_))));
        assert!(matches!(parse_nonzero("0K"), Err(SizeError::Zero(_))));
        assert!(parse_nonzero("x").is_err());
    }

    #[test]
    fn human_output() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1.0 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1 << 50), "1.0 PiB");
        assert_eq!(human(u64::MAX), "16384.0 PiB");
    }
}
