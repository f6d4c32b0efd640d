//! The one rule for the names of volumes, snapshots, clones, mounts, users
//! and tokens: 1–128 characters of `A-Z a-z 0-9 . _ -`, not starting with
//! `.` or `-`. Such names are safe as NBD export names, file names, path
//! components and URL segments (no `/`, `..`, `@`, spaces or controls).

/// Longest name, in bytes (every allowed character is one byte).
pub const MAX_LEN: usize = 128;

/// The rule in words, for error messages.
pub const RULE: &str = "1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or -";

/// Why a name is refused; reads after "the name" (`it contains '/'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long (at most {MAX_LEN})")]
    TooLong(usize),
    #[error("starts with {0:?}")]
    BadStart(char),
    #[error("contains {0:?}")]
    BadChar(char),
}

/// Checks `name` against the rule; says why it is refused.
pub fn check(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar(c));
    }
    if name.len() > MAX_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    match name.chars().next() {
        Some(c @ ('.' | '-')) => Err(NameError::BadStart(c)),
        _ => Ok(()),
    }
}

/// Whether `name` follows the rule.
pub fn is_valid(name: &str) -> bool {
    check(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case the three former copies (engine `validate_name`, API
    /// `check_name`, agent `check_name`) decided, with their common answer.
    #[test]
    fn accept_refuse_table() {
        let long_ok = "a".repeat(128);
        let long_bad = "a".repeat(129);
        let accept = [
            "a",
            "A",
            "0",
            "db-1.stage_2",
            "vm-web01-disk0",
            "_x",
            "a.",
            "a-",
            "a..b",
            long_ok.as_str(),
        ];
        for n in accept {
            assert_eq!(check(n), Ok(()), "{n:?}");
            assert!(is_valid(n));
        }
        let refuse: [(&str, NameError); 14] = [
            ("", NameError::Empty),
            (".x", NameError::BadStart('.')),
            ("..", NameError::BadStart('.')),
            (".", NameError::BadStart('.')),
            ("-x", NameError::BadStart('-')),
            ("a/b", NameError::BadChar('/')),
            ("../x", NameError::BadChar('/')),
            ("a@b", NameError::BadChar('@')),
            ("a b", NameError::BadChar(' ')),
            ("a\nb", NameError::BadChar('\n')),
            ("a\0", NameError::BadChar('\0')),
            ("é", NameError::BadChar('é')),
            ("a:b", NameError::BadChar(':')),
            (long_bad.as_str(), NameError::TooLong(129)),
        ];
        for (n, why) in refuse {
            assert_eq!(check(n), Err(why), "{n:?}");
            assert!(!is_valid(n));
        }
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(check("a/b").unwrap_err().to_string(), "contains '/'");
        assert_eq!(
            check(&"x".repeat(200)).unwrap_err().to_string(),
            "is 200 bytes long (at most 128)"
        );
    }
}
