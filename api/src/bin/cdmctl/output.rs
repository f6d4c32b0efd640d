//! How cdmctl prints: tables and `key: value` lines for people, the API's
//! JSON with `--json`.

use serde::Serialize;

pub(crate) fn time(unix: u64) -> String {
    cdm_api::cron::utc(unix)
}

/// A table of `items`, one row each.
pub(crate) fn table_of<T>(items: &[T], header: &[&str], row: impl Fn(&T) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(header, &rows)
}

/// Columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
    }
    out
}

pub(crate) fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

pub(crate) struct Out {
    pub(crate) json: bool,
}

impl Out {
    /// A confirmation for people; nothing with `--json`.
    pub(crate) fn say(&self, msg: String) {
        if !self.json {
            println!("{msg}");
        }
    }

    pub(crate) fn show<T: Serialize>(&self, v: &T, human: impl FnOnce(&T) -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("\"{e}\""))
            );
        } else {
            print!("{}", human(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(time(1_795_484_096), "2026-11-24 01:34:56");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME    SIZE\na       1\nlonger  22\n");
    }
}
