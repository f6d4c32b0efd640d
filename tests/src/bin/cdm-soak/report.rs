//! The summary table and the "flat" judgement of snapshotd's memory and
//! descriptors.
//!
//! Rule: samples taken in the first 60 s after a (re)start are warm-up
//! and left out; of the rest, the median of the last quarter may exceed
//! the median of the first quarter by at most 25% + 32 MiB (RSS) and by at
//! most 16 descriptors. The slack is half the engine's node cache (16,384
//! nodes of 4 KiB), which fills over a process's first minutes, so older
//! and younger processes differ by up to that much. A kill resets the
//! process, so this compares processes of the same age range under the
//! same load: what grows with the pool's history (snapshots, events,
//! clones made and deleted, connections) shows as a later quarter above an
//! earlier one. Fewer than 8 samples after warm-up: not judged.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::ctl::{get, Ctx};
use crate::daemon::{Daemon, Sample};

/// `keep_last` of the retention volume's policy.
pub const KEEP_LAST: u32 = 2;
const WARM_UP_SECS: f64 = 60.0;
const MIN_SAMPLES: usize = 8;
const RSS_RATIO: f64 = 1.25;
const RSS_SLACK_KIB: f64 = 32.0 * 1024.0;
const FD_SLACK: f64 = 16.0;

static RETAINED: AtomicUsize = AtomicUsize::new(0);

pub fn set_retained(_ctx: &Ctx, n: usize) {
    RETAINED.store(n, Ordering::Relaxed);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// First-quarter and last-quarter medians of `f` over the samples after
/// warm-up, or `None` when there are too few.
fn quarters(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Option<(f64, f64)> {
    let warm: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.uptime >= WARM_UP_SECS)
        .collect();
    if warm.len() < MIN_SAMPLES {
        return None;
    }
    let q = warm.len() / 4;
    let first = warm[..q].iter().map(|s| f(s)).collect();
    let last = warm[warm.len() - q..].iter().map(|s| f(s)).collect();
    Some((median(first), median(last)))
}

/// Judges flatness; `Err` names what grew.
pub fn flat(samples: &[Sample]) -> Result<Option<String>, String> {
    let Some((r0, r1)) = quarters(samples, |s| s.rss_kib as f64) else {
        return Ok(None);
    };
    let Some((f0, f1)) = quarters(samples, |s| s.fds as f64) else {
        return Ok(None);
    };
    let verdict = format!(
        "RSS median {:.0}→{:.0} MiB (limit {:.0}), fds median {f0:.0}→{f1:.0} (limit {:.0})",
        r0 / 1024.0,
        r1 / 1024.0,
        (r0 * RSS_RATIO + RSS_SLACK_KIB) / 1024.0,
        f0 + FD_SLACK
    );
    if r1 > r0 * RSS_RATIO + RSS_SLACK_KIB || f1 > f0 + FD_SLACK {
        return Err(verdict);
    }
    Ok(Some(verdict))
}

/// Prints the summary; returns whether the soak passed.
pub fn summary(ctx: &Ctx, samples: &[Sample], d: &Daemon, minutes: f64) -> bool {
    let s = &ctx.stats;
    let csv: String = std::iter::once("at_s,uptime_s,rss_kib,fds\n".to_string())
        .chain(
            samples
                .iter()
                .map(|s| format!("{:.0},{:.0},{},{}\n", s.at, s.uptime, s.rss_kib, s.fds)),
        )
        .collect();
    let csv_path = d.work.join("resources.csv");
    if let Err(e) = std::fs::write(&csv_path, csv) {
        eprintln!("soak: cannot write {}: {e}", csv_path.display());
    }
    let flat = flat(samples);
    if let Err(v) = &flat {
        ctx.fail(format!("snapshotd's resources grew: {v}"));
    }
    let first = samples.first();
    let last = samples.last();
    let rs = |x: Option<&Sample>| {
        x.map(|s| format!("{}", s.rss_kib / 1024))
            .unwrap_or("-".into())
    };
    let fs = |x: Option<&Sample>| x.map(|s| format!("{}", s.fds)).unwrap_or("-".into());
    let rows = [
        ("minutes of load", format!("{minutes}")),
        (
            "run time (s)",
            format!("{:.0}", ctx.started.elapsed().as_secs_f64()),
        ),
        (
            "NBD writes acknowledged",
            format!("{} ({} MiB)", get(&s.writes), get(&s.write_bytes) >> 20),
        ),
        ("flushes", get(&s.flushes).to_string()),
        ("verified reads under load", get(&s.reads).to_string()),
        (
            "sectors verified (512 B)",
            get(&s.verified_sectors).to_string(),
        ),
        ("snapshots (tracked)", get(&s.snapshots).to_string()),
        (
            "snapshots of the retention volume",
            format!(
                "{} made, {} left",
                get(&s.retention_snapshots),
                RETAINED.load(Ordering::Relaxed)
            ),
        ),
        ("clones", get(&s.clones).to_string()),
        (
            "deletes (snapshots, clones)",
            format!("{}, {}", get(&s.snapshot_deletes), get(&s.clone_deletes)),
        ),
        (
            "deletes refused while in use (409)",
            get(&s.busy_deletes).to_string(),
        ),
        ("API reads", get(&s.api_reads).to_string()),
        ("kill -9", get(&s.kills).to_string()),
        ("snapshotd starts", d.starts.to_string()),
        ("full-disk episodes", get(&s.episodes).to_string()),
        (
            "ENOSPC replies, 507 no_space",
            format!("{}, {}", get(&s.enospc_replies), get(&s.no_space_answers)),
        ),
        (
            "RSS MiB first→last sample",
            format!("{}→{}", rs(first), rs(last)),
        ),
        (
            "open fds first→last sample",
            format!("{}→{}", fs(first), fs(last)),
        ),
        (
            "resource samples",
            format!("{} (every 30 s: {})", samples.len(), csv_path.display()),
        ),
        (
            "flat",
            match &flat {
                Ok(Some(v)) => format!("yes: {v}"),
                Ok(None) => format!("not judged (fewer than {MIN_SAMPLES} samples after warm-up)"),
                Err(v) => format!("NO: {v}"),
            },
        ),
    ];
    println!("\n| soak | |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    let failures = ctx.failures();
    if failures.is_empty() {
        println!("\nsoak: PASSED");
        return true;
    }
    let checks: Vec<&String> = failures
        .iter()
        .filter(|(c, _)| *c)
        .map(|(_, t)| t)
        .collect();
    let loads: Vec<&String> = failures
        .iter()
        .filter(|(c, _)| !*c)
        .map(|(_, t)| t)
        .collect();
    println!(
        "\nsoak: FAILED: {} failed check(s), {} failed load request(s)",
        checks.len(),
        loads.len()
    );
    for f in checks.iter().take(40) {
        println!("  check: {f}");
    }
    for f in loads.iter().take(15) {
        println!("  load: {f}");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(uptime: f64, rss_mib: u64, fds: u64) -> Sample {
        Sample {
            at: 0.0,
            uptime,
            rss_kib: rss_mib * 1024,
            fds,
        }
    }

    #[test]
    fn growth_after_warm_up_is_judged_and_warm_up_is_not() {
        let steady: Vec<Sample> = (0..12)
            .map(|i| s(60.0 + i as f64 * 30.0, 100, 30))
            .collect();
        assert!(flat(&steady).unwrap().is_some());
        let mut leak = steady.clone();
        for (i, x) in leak.iter_mut().enumerate() {
            x.rss_kib = (100 + i as u64 * 10) * 1024;
        }
        assert!(flat(&leak).is_err());
        let mut fds = steady.clone();
        for (i, x) in fds.iter_mut().enumerate() {
            x.fds = 30 + i as u64 * 3;
        }
        assert!(flat(&fds).is_err());
        // A big warm-up sample (the cache filling) does not count.
        let mut warm = steady.clone();
        warm.insert(0, s(10.0, 10, 5));
        assert!(flat(&warm).unwrap().is_some());
        assert!(flat(&steady[..5]).unwrap().is_none());
    }
}
