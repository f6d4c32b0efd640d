//! A disk image from outside (a snapshot of anything a host wrote): the
//! partition table parser, then ext4 through the file-level restore code
//! (list, stat, symlinks). Must return errors, never panic or hang.
//! `browse` catches panics only around ext4-view calls, and not at all
//! under `cfg(fuzzing)` (set by cargo-fuzz): any panic, ours or the
//! library's, reaches libFuzzer. Such runs showed three bugs in ext4-view
//! 0.9.3 (two panics, one multi-GB allocation) that `browse::load` now
//! screens (seeds `regression-*`).
#![no_main]

use cdm_disk::{browse, partition};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let parts = partition::read_table(
        &mut |off, dst| {
            let o = off as usize;
            data.get(o..o + dst.len())
                .map(|s| dst.copy_from_slice(s))
                .ok_or_else(|| "short".to_string())
        },
        size,
    );
    let mut ranges = vec![(0usize, data.len())];
    if let Ok(p) = parts {
        for p in p {
            assert!(p.start + p.len <= size);
            ranges.push((p.start as usize, (p.start + p.len) as usize));
        }
    }
    for (a, b) in ranges {
        let Ok(fs) = browse::load(Box::new(data[a..b].to_vec()), (b - a) as u64) else {
            continue;
        };
        if let Ok(entries) = browse::list(&fs, "/", 0, 64) {
            for e in entries {
                let _ = browse::stat(&fs, &e.path);
                if e.kind == "dir" {
                    let _ = browse::list(&fs, &e.path, 0, 16);
                }
            }
        }
    }
});
