//! `cdm-soak`: the fault soak that `scripts/soak` runs (see its header and
//! docs/operations.md). Mixed load against a real snapshotd whose data
//! directory is on a small filesystem of its own: NBD writers with a model
//! of what was acknowledged and flushed, a verifying reader, snapshots,
//! clones, deletes, a retention policy, API readers; `kill -9` every few
//! minutes with a verification after each restart; full-disk episodes;
//! then a clean stop, fsck and a full verification, and a judgement of
//! snapshotd's memory and descriptors over the run.
//!
//! Usage: `cdm-soak --fs DIR --work DIR [--minutes N] [--seed S] [--pool
//! sparse|preallocated]`; DIR of `--fs` is the mount point of the
//! filesystem to fill (it must hold nothing else of value), `--work` takes
//! the log and the socket. The pool is sparse by default: then the full
//! host filesystem reaches the pool's own commits, the outage issue 23
//! started from; a preallocated pool runs full inside instead.

mod ctl;
mod daemon;
mod full;
mod load;
mod model;
mod report;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use ctl::{add, Ctx, Phase};
use daemon::Daemon;
use model::Volume;

/// Load threads: three writers, the verifier, the snapshot loop, the API reader.
const THREADS: usize = 6;
/// Bound for load threads to notice a kill (a hang, not a deadline).
const PARK_TIMEOUT: Duration = Duration::from_secs(300);
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

struct Args {
    fs: PathBuf,
    work: PathBuf,
    minutes: f64,
    seed: u64,
    sparse: bool,
}

fn args() -> Result<Args> {
    let mut fs = None;
    let mut work = None;
    let mut minutes: f64 = 60.0;
    let mut seed = None;
    let mut sparse = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--fs" => fs = Some(PathBuf::from(val()?)),
            "--work" => work = Some(PathBuf::from(val()?)),
            "--minutes" => minutes = val()?.parse().context("--minutes N")?,
            "--seed" => seed = Some(val()?.parse().context("--seed S")?),
            "--pool" => {
                sparse = match val()?.as_str() {
                    "sparse" => true,
                    "preallocated" => false,
                    v => bail!("--pool sparse|preallocated, not {v}"),
                }
            }
            _ => bail!(
                "usage: cdm-soak --fs DIR --work DIR [--minutes N] [--seed S] [--pool sparse|preallocated] (unknown {a})"
            ),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    if minutes.is_nan() || minutes <= 0.0 {
        bail!("--minutes must be positive");
    }
    Ok(Args {
        fs: fs.context("--fs DIR is required")?,
        work: work.context("--work DIR is required")?,
        minutes,
        seed,
        sparse,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Kill,
    Full,
}

/// When the kills (every ~3.5 minutes, at least one) and full-disk
/// episodes (one per ~20 minutes, at least one) happen: evenly spread
/// slots, each moved by up to ±30% of a slot, episodes spread among them.
fn plan(minutes: f64, rng: &mut StdRng) -> Vec<(f64, Event)> {
    let secs = minutes * 60.0;
    let kills = ((minutes / 3.5).round() as usize).max(1);
    let fulls = ((minutes / 20.0).round() as usize).max(1);
    let n = kills + fulls;
    let slot = secs / n as f64;
    let full_at: Vec<usize> = (0..fulls)
        .map(|j| (((j as f64 + 0.5) * n as f64 / fulls as f64) - 0.5).round() as usize)
        .collect();
    (0..n)
        .map(|i| {
            let t = slot * (i as f64 + 0.5) + slot * rng.gen_range(-0.3..0.3);
            let e = if full_at.contains(&i) {
                Event::Full
            } else {
                Event::Kill
            };
            (t, e)
        })
        .collect()
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: FAILED: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<bool> {
    let a = args()?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let data = a.fs.join("data");
    // Three quarters of the filesystem: a preallocated pool fits, a sparse
    // one can outgrow what is left once the filler file takes the rest.
    let pool_size = (full::free_bytes(&a.fs)? * 3 / 4) & !((1 << 20) - 1);
    let mut d = Daemon::new(&bin_dir, &data, &a.work, pool_size, a.sparse)?;
    d.start()?;
    eprintln!(
        "soak: seed {} ({:.1} minutes), {} pool of {} MiB on {}, snapshotd log {}",
        a.seed,
        a.minutes,
        if a.sparse { "sparse" } else { "preallocated" },
        pool_size >> 20,
        a.fs.display(),
        d.log_path().display()
    );
    let vols = setup(&d)?;
    let ctx = Ctx::new(d.endpoint(), d.api(), vols, 2);
    let mut rng = StdRng::seed_from_u64(a.seed);
    let seeds: [u64; 8] = rng.gen();
    let mut samples = Vec::new();
    let res = std::thread::scope(|s| -> Result<()> {
        for (vi, &seed) in seeds.iter().enumerate().take(ctx.vols.len()) {
            let ctx = &ctx;
            s.spawn(move || load::writer(ctx, vi, seed));
        }
        let c = &ctx;
        s.spawn(move || load::verifier(c, seeds[4]));
        s.spawn(move || load::snapshotter(c, seeds[5]));
        s.spawn(move || load::api_reader(c));
        let res = control(&ctx, &mut d, &a, &mut rng, &mut samples);
        // Whatever happened, the load threads must end.
        ctx.gate.set(Phase::Stop);
        res
    });
    if let Err(e) = &res {
        ctx.fail(format!("the soak could not go on: {e:#}"));
    }
    Ok(report::summary(&ctx, &samples, &d, a.minutes))
}

/// Creates the writer volumes and the retention policy.
fn setup(d: &Daemon) -> Result<Vec<Arc<Volume>>> {
    let api = d.api();
    let specs = [
        ("soak-a", 32u64 << 20, json!({})),
        ("soak-b", 32 << 20, json!({"block_size": 4096})),
        ("soak-c", 16 << 20, json!({"compression": 3})),
    ];
    let mut vols = Vec::new();
    for (name, size, extra) in specs {
        let mut body = json!({"name": name, "size": size});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        api.expect(201, "POST", "/v1/volumes", Some(body))?;
        vols.push(Arc::new(Volume::new(name, size)));
    }
    api.expect(
        200,
        "PUT",
        "/v1/volumes/soak-c/policy",
        Some(json!({"schedule": {"interval_secs": 60}, "retention": {"keep_last": report::KEEP_LAST, "min_keep": 1}})),
    )?;
    Ok(vols)
}

/// The timeline: kills and episodes as planned, resource samples every
/// 30 s, then the final checks.
fn control(
    ctx: &Ctx,
    d: &mut Daemon,
    a: &Args,
    rng: &mut StdRng,
    samples: &mut Vec<daemon::Sample>,
) -> Result<()> {
    let events = plan(a.minutes, rng);
    eprintln!(
        "soak: plan: {}",
        events
            .iter()
            .map(|(t, e)| format!("{e:?} at {t:.0}s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let t0 = ctx.started;
    let end = t0 + Duration::from_secs_f64(a.minutes * 60.0);
    let mut started_at = Instant::now();
    let mut next_sample = Instant::now();
    let mut todo = events.into_iter().peekable();
    loop {
        let now = Instant::now();
        if now >= next_sample {
            if let Some((rss, fds)) = d.pid().and_then(daemon::sample) {
                samples.push(daemon::Sample {
                    at: (now - t0).as_secs_f64(),
                    uptime: (now - started_at).as_secs_f64(),
                    rss_kib: rss,
                    fds,
                });
            }
            next_sample = now + SAMPLE_EVERY;
        }
        let due = todo.peek().map(|(t, _)| t0 + Duration::from_secs_f64(*t));
        if due.is_some_and(|t| now >= t) {
            let Some((_, e)) = todo.next() else { break };
            match e {
                Event::Kill => {
                    kill_round(ctx, d, rng)?;
                    started_at = Instant::now();
                }
                Event::Full => {
                    ctx.log("full-disk episode");
                    let recovered = full::episode(ctx, d, &a.fs, rng).unwrap_or_else(|e| {
                        ctx.fail(format!("full disk: {e:#}"));
                        false
                    });
                    if !recovered {
                        ctx.log("full disk: no recovery without a restart; restarting to go on");
                        full::clean_up_after_failure(ctx, &a.fs, || kill_round(ctx, d, rng))?;
                        started_at = Instant::now();
                    }
                }
            }
            continue;
        }
        if due.is_none() && now >= end {
            break;
        }
        let wake = [Some(next_sample), due, Some(end)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
        // Pacing the timeline, not synchronisation: nothing waits on it.
        std::thread::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(SAMPLE_EVERY),
        );
    }
    finish(ctx, d, rng)
}

/// kill -9 while the load runs, restart, verify, resume.
fn kill_round(ctx: &Ctx, d: &mut Daemon, rng: &mut StdRng) -> Result<()> {
    ctx.log("kill -9");
    ctx.gate.set(Phase::Down);
    d.kill();
    add(&ctx.stats.kills, 1);
    if !ctx.gate.wait_parked(THREADS, PARK_TIMEOUT) {
        bail!("the load threads did not stop within {PARK_TIMEOUT:?} after a kill");
    }
    let t = Instant::now();
    let sectors = ctl::get(&ctx.stats.verified_sectors);
    d.start()?;
    ctx.set_api(d.api());
    verify::after_restart(ctx, model::Lower::Flushed, rng, Some(2));
    ctx.log(&format!(
        "restarted and verified {} MiB in {:.1}s",
        ((ctl::get(&ctx.stats.verified_sectors) - sectors) * model::SECTOR) >> 20,
        t.elapsed().as_secs_f64()
    ));
    ctx.gate.set(Phase::Run);
    Ok(())
}

/// Quiesce; verify on the running daemon; clean stop; fsck; start again
/// and verify everything acknowledged (a clean stop keeps unflushed
/// writes too); stop.
fn finish(ctx: &Ctx, d: &mut Daemon, rng: &mut StdRng) -> Result<()> {
    ctx.log("final checks");
    ctx.gate.set(Phase::Quiesce);
    if !ctx.gate.wait_parked(THREADS, PARK_TIMEOUT) {
        bail!("the load threads did not stop within {PARK_TIMEOUT:?}");
    }
    verify::volumes(ctx, model::Lower::Acked, false);
    d.stop()?;
    match d.fsck() {
        Ok(_) => ctx.log("fsck clean"),
        Err(e) => ctx.fail(format!("{e:#}")),
    }
    d.start()?;
    ctx.set_api(d.api());
    verify::after_restart(ctx, model::Lower::Acked, rng, None);
    verify::retention(ctx);
    d.stop()?;
    Ok(())
}
