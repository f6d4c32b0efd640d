//! The load threads: one NBD writer per volume (stamped writes and
//! FLUSHes, the model updated with what was acknowledged), a verifying
//! reader (volumes, snapshots, clones), the snapshot/clone/delete loop and
//! an API reader. An error is a failure unless a kill or quiesce explains
//! it, or the disk is full and it is the right answer to that (ENOSPC,
//! 507 `no_space`).

use std::sync::Arc;
use std::time::Duration;

use cdm_e2e::stamp;
use nbd_proto::{Client, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::ctl::{add, Clone, Ctx, Phase, SnapEntry};
use crate::daemon::Answer;
use crate::model::{self, Lower, Snapshot, Volume, SECTOR};

/// NBD's ENOSPC.
pub const ENOSPC: u32 = 28;
/// Snapshots the loop keeps per volume, clones it keeps in all.
const KEEP_SNAPSHOTS: usize = 6;
const KEEP_CLONES: usize = 3;

pub fn connect(endpoint: &str, export: &str) -> Result<Client, ClientError> {
    let opts = nbd_proto::ClientOptions {
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    Client::connect(endpoint, Some(export), &opts)
}

fn full(ctx: &Ctx, started: Phase) -> bool {
    started == Phase::Full || ctx.gate.phase().0 == Phase::Full
}

/// Classifies an NBD error; returns whether the connection is to be dropped.
fn nbd_error(ctx: &Ctx, started: Phase, epoch: u64, e: &ClientError, what: &str) -> bool {
    match e {
        ClientError::Errno { errno, .. } if *errno == ENOSPC && full(ctx, started) => {
            add(&ctx.stats.enospc_replies, 1);
            ctx.gate.pause(Duration::from_millis(200));
            false
        }
        _ if ctx.gate.disturbed(epoch) => true,
        ClientError::Errno { .. } => {
            ctx.fail_load(format!("{what}: {e}"));
            ctx.gate.pause(Duration::from_secs(1));
            false
        }
        _ => {
            let on_full = if full(ctx, started) {
                " (on a full disk: an error reply was due, not a lost connection)"
            } else {
                ""
            };
            ctx.fail_load(format!("{what}: {e}{on_full}"));
            ctx.gate.pause(Duration::from_secs(1));
            true
        }
    }
}

/// One writer: random 4 KiB-aligned writes of 4–256 KiB, a FLUSH every
/// 4–12 writes, 20–60 ms apart (the machine is shared).
pub fn writer(ctx: &Ctx, vi: usize, seed: u64) {
    let v = &ctx.vols[vi];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn: Option<(Client, u64)> = None;
    let mut until_flush = rng.gen_range(4..12);
    let blocks = v.size / 4096;
    while let Some((phase, epoch)) = ctx.gate.checkpoint() {
        if conn.as_ref().is_some_and(|(_, e)| *e != epoch) {
            conn = None;
        }
        let c = match &mut conn {
            Some((c, _)) => c,
            None => match connect(&ctx.endpoint, &v.name) {
                Ok(c) => &mut conn.insert((c, epoch)).0,
                Err(e) => {
                    if !ctx.gate.disturbed(epoch) {
                        ctx.fail_load(format!("connect to {}: {e}", v.name));
                        ctx.gate.pause(Duration::from_secs(1));
                    }
                    continue;
                }
            },
        };
        let res = if until_flush == 0 {
            until_flush = rng.gen_range(4..12);
            match c.flush() {
                Ok(()) => {
                    v.flushed();
                    add(&ctx.stats.flushes, 1);
                    Ok(())
                }
                Err(e) => Err((e, format!("flush {}", v.name))),
            }
        } else {
            until_flush -= 1;
            let n = rng.gen_range(1..=64u64).min(blocks);
            let off = rng.gen_range(0..=blocks - n) * 4096;
            let len = n * 4096;
            let gen = v.issue(off, len);
            let data = stamp::random(v.tag, off, len as usize, gen as u64);
            match c.write(off, &data, false) {
                Ok(()) => {
                    v.ack(off, len, gen);
                    add(&ctx.stats.writes, 1);
                    add(&ctx.stats.write_bytes, len);
                    Ok(())
                }
                Err(e) => Err((e, format!("write {} at {off}+{len}", v.name))),
            }
        };
        if let Err((e, what)) = res {
            if nbd_error(ctx, phase, epoch, &e, &what) {
                conn = None;
            }
        }
        ctx.gate.pause(Duration::from_millis(rng.gen_range(20..60)));
    }
}

/// What the verifier reads: an export and the bounds of its sectors.
enum Target {
    Live(usize),
    Snap(Arc<Snapshot>),
    Clone(String, Arc<Snapshot>),
}

/// Reads `len` bytes at `off` of `export` over a fresh connection.
pub fn read(endpoint: &str, export: &str, off: u64, len: u64) -> Result<Vec<u8>, ClientError> {
    let mut c = connect(endpoint, export)?;
    let mut buf = vec![0u8; len as usize];
    for (i, chunk) in buf.chunks_mut(4 << 20).enumerate() {
        c.read(off + i as u64 * (4 << 20), chunk)?;
    }
    let _ = c.disconnect();
    Ok(buf)
}

/// The verifying reader: a random range of a volume (against what was
/// acknowledged before and issued after the read), a snapshot or a clone.
pub fn verifier(ctx: &Ctx, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while let Some((phase, epoch)) = ctx.gate.checkpoint() {
        ctx.gate
            .pause(Duration::from_millis(rng.gen_range(100..300)));
        let pick = rng.gen_range(0..10);
        let target = if pick < 5 {
            Target::Live(rng.gen_range(0..ctx.vols.len()))
        } else if pick < 8 {
            let s = ctx.snaps();
            let live: Vec<&SnapEntry> = s.iter().filter(|e| !e.maybe_gone).collect();
            if live.is_empty() {
                continue;
            }
            Target::Snap(live[rng.gen_range(0..live.len())].snap.clone())
        } else {
            let c = ctx.clones();
            let live: Vec<&Clone> = c.iter().filter(|e| !e.maybe_gone).collect();
            if live.is_empty() {
                continue;
            }
            let c = live[rng.gen_range(0..live.len())];
            Target::Clone(c.name.clone(), c.origin.clone())
        };
        let vi = match &target {
            Target::Live(vi) => *vi,
            Target::Snap(s) | Target::Clone(_, s) => s.volume,
        };
        let v = &ctx.vols[vi];
        let blocks = v.size / 4096;
        let n = rng.gen_range(1..=256u64).min(blocks);
        let off = rng.gen_range(0..=blocks - n) * 4096;
        let len = n * 4096;
        let (a, b) = model::range(off, len);
        let (export, lo) = match &target {
            Target::Live(_) => (v.name.clone(), v.bounds(a, b, Lower::Acked).0),
            Target::Snap(s) => (s.export(&ctx.vols), s.lo[a..b].to_vec()),
            Target::Clone(name, s) => (name.clone(), s.lo[a..b].to_vec()),
        };
        let res = read(&ctx.endpoint, &export, off, len);
        let hi = match &target {
            Target::Live(_) => v.bounds(a, b, Lower::Acked).1,
            Target::Snap(s) | Target::Clone(_, s) => s.hi[a..b].to_vec(),
        };
        match res {
            Ok(buf) => match model::check(&buf, v.tag, off, &lo, &hi) {
                Ok(_) => {
                    add(&ctx.stats.reads, 1);
                    add(&ctx.stats.verified_sectors, len / SECTOR);
                }
                Err(e) => ctx.fail_load(format!("read of {export} at {off}+{len}: {e}")),
            },
            Err(_) if ctx.gate.disturbed(epoch) => {}
            Err(_) if !still_there(ctx, &target) => {}
            Err(e) => {
                let on_full = if full(ctx, phase) {
                    " (disk full: reads must go on)"
                } else {
                    ""
                };
                ctx.fail_load(format!("read of {export} at {off}+{len}: {e}{on_full}"));
                ctx.gate.pause(Duration::from_secs(1));
            }
        }
    }
}

/// Whether a snapshot or clone is still in the model and not being
/// deleted (one deleted while it was being read is no failure).
fn still_there(ctx: &Ctx, t: &Target) -> bool {
    match t {
        Target::Live(_) => true,
        Target::Snap(s) => ctx
            .snaps()
            .iter()
            .any(|e| Arc::ptr_eq(&e.snap, s) && !e.maybe_gone),
        Target::Clone(n, _) => ctx.clones().iter().any(|c| &c.name == n && !c.maybe_gone),
    }
}

/// How a mutation's answer went.
enum Outcome {
    Done(Value),
    /// Refused for a reason that is right now (507 on a full disk, 409 in use).
    Refused,
    /// No answer or a wrong one; already recorded when it was a failure.
    Lost,
}

fn mutation(
    ctx: &Ctx,
    phase: Phase,
    epoch: u64,
    res: Result<Answer, String>,
    want: u16,
    what: &str,
) -> Outcome {
    match res {
        Ok((s, v)) if s == want => Outcome::Done(v),
        Ok((507, v)) if full(ctx, phase) && v["error"]["code"] == "no_space" => {
            add(&ctx.stats.no_space_answers, 1);
            Outcome::Refused
        }
        Ok((409, _)) if what.starts_with("DELETE") => {
            add(&ctx.stats.busy_deletes, 1);
            Outcome::Refused
        }
        _ if ctx.gate.disturbed(epoch) => Outcome::Lost,
        Ok((s, v)) => {
            ctx.fail_load(format!("{what} answered {s}: {v}"));
            Outcome::Lost
        }
        Err(e) => {
            ctx.fail_load(e);
            Outcome::Lost
        }
    }
}

/// The snapshot loop: every 2–5 s a snapshot (of a tracked volume, or
/// every fourth of the retention volume), every third a clone of a random
/// snapshot; the oldest snapshots and clones beyond a few are deleted.
pub fn snapshotter(ctx: &Ctx, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while ctx.gate.checkpoint().is_some() {
        ctx.gate
            .pause(Duration::from_millis(rng.gen_range(2000..5000)));
        let Some((phase, epoch)) = ctx.gate.checkpoint() else {
            break;
        };
        n += 1;
        let api = ctx.api();
        if n.is_multiple_of(4) {
            let name = &ctx.vols[ctx.retention_vol].name;
            let what = format!("POST /v1/volumes/{name}/snapshots");
            let res = api.call(
                "POST",
                &format!("/v1/volumes/{name}/snapshots"),
                Some(json!({"label": format!("soak-{n}")})),
            );
            if let Outcome::Done(_) = mutation(ctx, phase, epoch, res, 201, &what) {
                add(&ctx.stats.retention_snapshots, 1);
            }
        } else {
            let vi = ctx.snap_vols[rng.gen_range(0..ctx.snap_vols.len())];
            snapshot(ctx, phase, epoch, vi, n);
        }
        if n.is_multiple_of(3) {
            clone(ctx, phase, epoch, &mut rng, n);
        }
        prune(ctx, phase, epoch);
    }
}

fn snapshot(ctx: &Ctx, phase: Phase, epoch: u64, vi: usize, n: u64) {
    let v: &Volume = &ctx.vols[vi];
    let sectors = (v.size / SECTOR) as usize;
    let lo = v.bounds(0, sectors, Lower::Acked).0;
    let path = format!("/v1/volumes/{}/snapshots", v.name);
    let res = ctx
        .api()
        .call("POST", &path, Some(json!({"label": format!("soak-{n}")})));
    let hi = v.bounds(0, sectors, Lower::Acked).1;
    if let Outcome::Done(body) = mutation(ctx, phase, epoch, res, 201, &format!("POST {path}")) {
        match body["id"].as_u64() {
            Some(id) => {
                let snap = Arc::new(Snapshot {
                    volume: vi,
                    id,
                    lo,
                    hi,
                });
                ctx.snaps().push(SnapEntry {
                    snap,
                    maybe_gone: false,
                });
                add(&ctx.stats.snapshots, 1);
            }
            None => ctx.fail_load(format!("POST {path}: no id in {body}")),
        }
    }
}

fn clone(ctx: &Ctx, phase: Phase, epoch: u64, rng: &mut StdRng, n: u64) {
    let origin = {
        let s = ctx.snaps();
        let live: Vec<&SnapEntry> = s.iter().filter(|e| !e.maybe_gone).collect();
        if live.is_empty() {
            return;
        }
        live[rng.gen_range(0..live.len())].snap.clone()
    };
    let name = format!("soak-clone-{n}");
    let path = format!(
        "/v1/volumes/{}/snapshots/{}/clones",
        ctx.vols[origin.volume].name, origin.id
    );
    let res = ctx.api().call("POST", &path, Some(json!({"name": name})));
    if let Outcome::Done(_) = mutation(ctx, phase, epoch, res, 201, &format!("POST {path}")) {
        ctx.clones().push(Clone {
            name,
            origin,
            maybe_gone: false,
        });
        add(&ctx.stats.clones, 1);
    }
}

/// Deletes the oldest clone beyond [`KEEP_CLONES`] and, per volume, the
/// oldest snapshot without clones beyond [`KEEP_SNAPSHOTS`]. The victim is
/// marked `maybe_gone` before the request goes out: a read of it that
/// fails meanwhile is no failure; a refusal (in use, no space) clears the
/// mark, a lost answer (a kill) leaves it for the restart to settle.
fn prune(ctx: &Ctx, phase: Phase, epoch: u64) {
    let victim = {
        let mut c = ctx.clones();
        let mut live = c.iter_mut().filter(|c| !c.maybe_gone);
        match (live.next(), live.count() >= KEEP_CLONES) {
            (Some(first), true) => {
                first.maybe_gone = true;
                Some(first.name.clone())
            }
            _ => None,
        }
    };
    if let Some(name) = victim {
        let path = format!("/v1/clones/{name}");
        let res = ctx.api().call("DELETE", &path, None);
        match mutation(ctx, phase, epoch, res, 204, &format!("DELETE {path}")) {
            Outcome::Done(_) => {
                ctx.clones().retain(|c| c.name != name);
                add(&ctx.stats.clone_deletes, 1);
            }
            Outcome::Refused => {
                if let Some(c) = ctx.clones().iter_mut().find(|c| c.name == name) {
                    c.maybe_gone = false;
                }
            }
            Outcome::Lost => {}
        }
    }
    for &vi in &ctx.snap_vols {
        let victim = {
            let mut s = ctx.snaps();
            let c = ctx.clones();
            let mut mine: Vec<&mut SnapEntry> = s
                .iter_mut()
                .filter(|e| e.snap.volume == vi && !e.maybe_gone)
                .collect();
            if mine.len() <= KEEP_SNAPSHOTS {
                continue;
            }
            mine.iter_mut()
                .find(|e| !c.iter().any(|c| Arc::ptr_eq(&c.origin, &e.snap)))
                .map(|e| {
                    e.maybe_gone = true;
                    e.snap.clone()
                })
        };
        let Some(snap) = victim else { continue };
        let path = format!("/v1/volumes/{}/snapshots/{}", ctx.vols[vi].name, snap.id);
        let res = ctx.api().call("DELETE", &path, None);
        match mutation(ctx, phase, epoch, res, 204, &format!("DELETE {path}")) {
            Outcome::Done(_) => {
                ctx.snaps().retain(|e| !Arc::ptr_eq(&e.snap, &snap));
                add(&ctx.stats.snapshot_deletes, 1);
            }
            Outcome::Refused => {
                if let Some(e) = ctx.snaps().iter_mut().find(|e| Arc::ptr_eq(&e.snap, &snap)) {
                    e.maybe_gone = false;
                }
            }
            Outcome::Lost => {}
        }
    }
}

/// The API reader: lists and metrics in a loop; each must answer 200,
/// a full disk included.
pub fn api_reader(ctx: &Ctx) {
    let vol = ctx.vols[ctx.snap_vols[0]].name.clone();
    let paths = [
        "/v1/volumes".to_string(),
        format!("/v1/volumes/{vol}/snapshots"),
        "/v1/clones".to_string(),
        "/v1/events?limit=50".to_string(),
        "/metrics".to_string(),
        "/v1/pool".to_string(),
        "/v1/exports".to_string(),
    ];
    let mut i = 0;
    while let Some((phase, epoch)) = ctx.gate.checkpoint() {
        let path = &paths[i % paths.len()];
        i += 1;
        match ctx.api().get(path) {
            Ok((200, _)) => add(&ctx.stats.api_reads, 1),
            _ if ctx.gate.disturbed(epoch) => {}
            Ok((s, v)) => {
                let on_full = if full(ctx, phase) {
                    " (disk full: reads must go on)"
                } else {
                    ""
                };
                ctx.fail_load(format!("GET {path} answered {s}{on_full}: {v}"));
                ctx.gate.pause(Duration::from_secs(1));
            }
            Err(e) => {
                ctx.fail_load(e);
                ctx.gate.pause(Duration::from_secs(1));
            }
        }
        ctx.gate.pause(Duration::from_millis(250));
    }
}
