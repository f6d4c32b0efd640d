//! What a point-in-time restore reads that others wrote: the archived
//! binlog files (the source host writes the log volume), `pg_waldump`'s
//! output over archived WAL, WAL file names found in the archive, and the
//! restore target a caller sends (RFC 3339, GTID). Nothing may panic; a
//! binlog walk never reports a transaction outside the file, nor an end
//! beyond it.
#![no_main]

use std::io::Write;

use cdm_agent::{maria_pitr, pitr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(_) => return,
    };
    if f.write_all(data).and_then(|_| f.flush()).is_err() {
        return;
    }
    let size = data.len() as u64;
    if let Ok(end) = maria_pitr::walk(f.path(), 0, |t| {
        assert!(t.start < t.end && t.end <= size);
        true
    }) {
        assert!(end.valid_end <= size && end.size == size);
    }
    let text = String::from_utf8_lossy(data);
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let (a, b) = text.split_at(mid);
    let _ = pitr::parse_waldump(a, b);
    let _ = pitr::parse_wal_name(&text, 16 << 20);
    let _ = maria_pitr::parse_binlog_name(&text);
    let _ = pitr::parse_gtid(&text);
    if let Some(us) = cdm_api::instant::parse_rfc3339(&text) {
        let back = cdm_api::instant::rfc3339_us(us);
        assert_eq!(cdm_api::instant::parse_rfc3339(&back), Some(us));
    }
});
