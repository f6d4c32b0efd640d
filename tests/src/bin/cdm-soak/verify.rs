//! Verification with the load parked: every volume read whole against the
//! model, every acknowledged snapshot and clone present (the ones whose
//! delete or create answer a kill swallowed are settled), snapshot and
//! clone contents, and the retention volume's snapshots.

use std::collections::HashSet;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::ctl::{add, Ctx};
use crate::load::read;
use crate::model::{self, Lower, Snapshot, SECTOR};

/// Reads every writer volume whole. `Lower::Flushed` (after a kill):
/// flushed writes must be there, unflushed ones may be old or new;
/// `Lower::Acked` (running, or after a clean stop): every acknowledged
/// write. With `reset`, what was read becomes the model.
pub fn volumes(ctx: &Ctx, lower: Lower, reset: bool) {
    for v in &ctx.vols {
        let n = (v.size / SECTOR) as usize;
        let (lo, hi) = v.bounds(0, n, lower);
        let buf = match read(&ctx.endpoint, &v.name, 0, v.size) {
            Ok(b) => b,
            Err(e) => {
                ctx.fail(format!("full read of {}: {e}", v.name));
                continue;
            }
        };
        match model::check(&buf, v.tag, 0, &lo, &hi) {
            Ok(seen) => {
                add(&ctx.stats.verified_sectors, n as u64);
                if reset {
                    v.reset_to(&seen);
                }
            }
            Err(e) => {
                ctx.fail(format!("full read of {}: {e}", v.name));
                if reset {
                    // Go on from what is there, so one loss is reported once.
                    v.reset_to(&observed(&buf, v.tag));
                }
            }
        }
    }
}

/// The generation of each sector as far as it is ours (0 otherwise).
fn observed(buf: &[u8], tag: u64) -> Vec<u32> {
    buf.chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, s)| match cdm_e2e::stamp::decode(s) {
            Some((t, o, g)) if t == tag && o == i as u64 * SECTOR => g as u32,
            _ => 0,
        })
        .collect()
}

fn names(v: &Value, key: &str) -> Vec<Value> {
    v.as_array()
        .map(|a| a.iter().map(|e| e[key].clone()).collect())
        .unwrap_or_default()
}

/// After a (re)start: volumes, then snapshots and clones reconciled and
/// `sample` of each verified (all with `None`).
pub fn after_restart(ctx: &Ctx, lower: Lower, rng: &mut StdRng, sample: Option<usize>) {
    volumes(ctx, lower, true);
    reconcile_snapshots(ctx);
    reconcile_clones(ctx);
    let mut snaps: Vec<Arc<Snapshot>> = ctx.snaps().iter().map(|e| e.snap.clone()).collect();
    let mut clones: Vec<(String, Arc<Snapshot>)> = ctx
        .clones()
        .iter()
        .map(|c| (c.name.clone(), c.origin.clone()))
        .collect();
    snaps.shuffle(rng);
    clones.shuffle(rng);
    let ns = sample.unwrap_or(snaps.len());
    let nc = sample.map(|n| n / 2).unwrap_or(clones.len());
    for s in snaps.iter().take(ns) {
        content(ctx, &s.export(&ctx.vols), s);
    }
    for (name, s) in clones.iter().take(nc) {
        content(ctx, name, s);
    }
}

/// Reads a snapshot or clone whole against its origin's bounds.
fn content(ctx: &Ctx, export: &str, s: &Snapshot) {
    let v = &ctx.vols[s.volume];
    match read(&ctx.endpoint, export, 0, v.size) {
        Ok(buf) => match model::check(&buf, v.tag, 0, &s.lo, &s.hi) {
            Ok(_) => add(&ctx.stats.verified_sectors, v.size / SECTOR),
            Err(e) => ctx.fail(format!("{export}: {e}")),
        },
        Err(e) => ctx.fail(format!("read of {export}: {e}")),
    }
}

/// Every acknowledged snapshot must exist; one whose delete answer was
/// lost may be gone; ones whose create answer was lost are deleted.
fn reconcile_snapshots(ctx: &Ctx) {
    let api = ctx.api();
    for &vi in &ctx.snap_vols {
        let name = &ctx.vols[vi].name;
        let list = match api.expect(200, "GET", &format!("/v1/volumes/{name}/snapshots"), None) {
            Ok(v) => v,
            Err(e) => {
                ctx.fail(format!("{e:#}"));
                continue;
            }
        };
        let ids: HashSet<u64> = names(&list, "id")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        let mut known = HashSet::new();
        ctx.snaps().retain_mut(|e| {
            if e.snap.volume != vi {
                return true;
            }
            known.insert(e.snap.id);
            if ids.contains(&e.snap.id) {
                e.maybe_gone = false;
                return true;
            }
            if !e.maybe_gone {
                ctx.fail(format!(
                    "acknowledged snapshot {name}@{} is missing after the restart",
                    e.snap.id
                ));
            }
            false
        });
        for id in ids.difference(&known) {
            let path = format!("/v1/volumes/{name}/snapshots/{id}?force=true");
            if let Err(e) = api.expect(204, "DELETE", &path, None) {
                ctx.fail(format!(
                    "removing a snapshot whose create answer was lost: {e:#}"
                ));
            }
        }
    }
}

fn reconcile_clones(ctx: &Ctx) {
    let api = ctx.api();
    let list = match api.expect(200, "GET", "/v1/clones", None) {
        Ok(v) => v,
        Err(e) => return ctx.fail(format!("{e:#}")),
    };
    let there: HashSet<String> = names(&list, "name")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut known = HashSet::new();
    ctx.clones().retain_mut(|c| {
        known.insert(c.name.clone());
        if there.contains(&c.name) {
            c.maybe_gone = false;
            return true;
        }
        if !c.maybe_gone {
            ctx.fail(format!(
                "acknowledged clone {} is missing after the restart",
                c.name
            ));
        }
        false
    });
    for name in there.difference(&known) {
        if let Err(e) = api.expect(
            204,
            "DELETE",
            &format!("/v1/clones/{name}?force=true"),
            None,
        ) {
            ctx.fail(format!(
                "removing a clone whose create answer was lost: {e:#}"
            ));
        }
    }
}

/// The retention volume: its snapshots (scheduled and the loop's) stay
/// within the policy, and each holds only this volume's data.
pub fn retention(ctx: &Ctx) {
    let api = ctx.api();
    let v = &ctx.vols[ctx.retention_vol];
    let list = match api.expect(
        200,
        "GET",
        &format!("/v1/volumes/{}/snapshots", v.name),
        None,
    ) {
        Ok(l) => l,
        Err(e) => return ctx.fail(format!("{e:#}")),
    };
    let ids: Vec<u64> = names(&list, "id")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let made = crate::ctl::get(&ctx.stats.retention_snapshots);
    // One tick may not have run since the last snapshot of each kind.
    let limit = crate::report::KEEP_LAST as usize + 2;
    if made as usize > limit && ids.len() > limit {
        ctx.fail(format!(
            "retention: {} snapshots of {} remain (keep_last {}; {made} made by the loop)",
            ids.len(),
            v.name,
            crate::report::KEEP_LAST
        ));
    }
    let n = (v.size / SECTOR) as usize;
    let lo = vec![0u32; n];
    let hi = v.bounds(0, n, Lower::Acked).1;
    for id in ids {
        let export = format!("{}@{id}", v.name);
        match read(&ctx.endpoint, &export, 0, v.size) {
            Ok(buf) => match model::check(&buf, v.tag, 0, &lo, &hi) {
                Ok(_) => add(&ctx.stats.verified_sectors, n as u64),
                Err(e) => ctx.fail(format!("{export}: {e}")),
            },
            Err(e) => ctx.fail(format!("read of {export}: {e}")),
        }
    }
    crate::report::set_retained(ctx, list.as_array().map(|a| a.len()).unwrap_or(0));
}
