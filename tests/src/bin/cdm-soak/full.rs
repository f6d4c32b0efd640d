//! The full-disk episode. The host filesystem under the data directory is
//! filled with a file, then a volume as large as the pool is written
//! through NBD until a write answers ENOSPC: with a sparse pool the host
//! runs out, with a preallocated one the pool does; either way the pool is
//! full. While it is: reads and snapshot exports work, writes get an
//! ENOSPC reply on a connection that stays up, a mutation answers 507
//! `no_space` (or 201 when the pool's reserve still commits it), and
//! `/health` says so. Then the file is removed and the volume deleted
//! through the API, and writes, commits and mutations must resume with the
//! same snapshotd process (no restart).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nbd_proto::ClientError;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use serde_json::{json, Value};

use crate::ctl::{add, get, Ctx, Phase};
use crate::daemon::{Api, Daemon};
use crate::load::{connect, read, ENOSPC};
use crate::model::{self, Lower};

const FILLER: &str = "soak-filler";
const PROBE: &str = "soak-probe";
/// Bound for a hung recovery (not a deadline for a slow one).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs(3) into a zeroed struct with a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Fills the filesystem of `path`'s directory with the file `path` until
/// even a 4 KiB write fails with ENOSPC; returns its size.
pub fn fill_host(path: &Path) -> Result<u64> {
    let dir = path.parent().context("filler path")?;
    let mut f = std::fs::File::create(path)?;
    let mut at = 0u64;
    let mut chunk = free_bytes(dir)?;
    while chunk >= 1 << 20 {
        // SAFETY: fallocate(2) on our open file.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, at as i64, chunk as i64) };
        if r == 0 {
            at += chunk;
            chunk = free_bytes(dir)?;
        } else {
            chunk /= 2;
        }
    }
    f.set_len(at)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(at))?;
    // What fallocate left (it needs room for its own extent records):
    // plain writes, which ext4 refuses with ENOSPC at write time.
    let block = vec![0xa5u8; 1 << 20];
    for size in [1 << 20, 4096] {
        loop {
            match f.write_all(&block[..size]) {
                Ok(()) => at += size as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => bail!("filling {}: {e}", path.display()),
            }
        }
    }
    match f.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        Err(e) => bail!("filling {}: {e}", path.display()),
    }
    Ok(at)
}

/// `/health` says the pool cannot take writes for lack of space (a state
/// or message naming the space, or a full pool).
fn health_says_full(v: &Value) -> bool {
    let text = v.to_string().to_lowercase();
    v["status"].as_str().is_some_and(|s| s != "ok")
        && (text.contains("space") || text.contains("full"))
}

/// `/health` says the pool itself is back: its state where it reports one
/// (the appliance may stay "degraded" a while for recent device errors),
/// else the status.
fn pool_ok(v: &Value) -> bool {
    match v["pool"]["state"].as_str() {
        Some(s) => s == "ok",
        None => v["status"] == "ok",
    }
}

fn generation(api: &Api) -> Option<u64> {
    match api.get("/v1/pool") {
        Ok((200, v)) => v["generation"].as_u64(),
        _ => None,
    }
}

/// Polls `f` every 200 ms until it returns Some or `timeout` passes.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the episode. `Ok(true)`: recovered without a restart; `Ok(false)`:
/// it did not (failures recorded; the caller restarts to go on).
pub fn episode(ctx: &Ctx, d: &Daemon, fs: &Path, rng: &mut StdRng) -> Result<bool> {
    add(&ctx.stats.episodes, 1);
    let api = ctx.api();
    let pid = d.pid();
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": FILLER, "size": d.pool_size})),
    )?;
    ctx.gate.set(Phase::Full);
    let filler = fs.join("filler");
    let host = fill_host(&filler)?;
    ctx.log(&format!(
        "full disk: host filesystem filled with {} MiB",
        host >> 20
    ));
    // A pool that cannot even be written to is a failure, but the checks
    // of what must still work go on: they say what the outage takes away.
    match fill_pool(ctx, d, rng) {
        Ok(n) => ctx.log(&format!(
            "full disk: ENOSPC after {} MiB through NBD",
            n >> 20
        )),
        Err(e) => ctx.fail(format!("full disk: filling the pool: {e:#}")),
    }
    checks_while_full(ctx, rng);
    // Commits after this one are commits after the space came back.
    let gen_full = generation(&api);
    std::fs::remove_file(&filler)?;
    let deleted = poll(RECOVERY_TIMEOUT, || {
        match api.call("DELETE", &format!("/v1/volumes/{FILLER}?force=true"), None) {
            Ok((204, _)) => Some(()),
            _ => None,
        }
    });
    if deleted.is_none() {
        ctx.fail(format!(
            "full disk: DELETE /v1/volumes/{FILLER} never succeeded after the host file was removed ({RECOVERY_TIMEOUT:?})"
        ));
        return Ok(false);
    }
    let ok = recovered(ctx, &api, gen_full);
    if d.pid() != pid {
        bail!("snapshotd was restarted during the episode");
    }
    if ok {
        ctx.log("full disk: writes, commits and mutations resumed without a restart");
        ctx.gate.set(Phase::Run);
    }
    Ok(ok)
}

/// After an episode that did not recover: the host file goes, `restart`
/// (a kill round) brings snapshotd back, and the episode's volumes are
/// deleted so that the soak goes on (and a later episode can run).
pub fn clean_up_after_failure(
    ctx: &Ctx,
    fs: &Path,
    restart: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match std::fs::remove_file(fs.join("filler")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove the filler file: {e}"),
    }
    restart()?;
    let api = ctx.api();
    for name in [FILLER, PROBE] {
        match api.call("DELETE", &format!("/v1/volumes/{name}?force=true"), None) {
            Ok((204 | 404, _)) => {}
            Ok((s, v)) => ctx.fail(format!(
                "DELETE /v1/volumes/{name} after the restart answered {s}: {v}"
            )),
            Err(e) => ctx.fail(e),
        }
    }
    Ok(())
}

/// Writes the filler volume through NBD until ENOSPC; checks the answer is
/// an error reply on a live connection. Returns the bytes written.
fn fill_pool(ctx: &Ctx, d: &Daemon, rng: &mut StdRng) -> Result<u64> {
    let mut c = connect(&ctx.endpoint, FILLER).context("connect to the filler volume")?;
    let mut buf = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut buf);
    let first = {
        let mut b = buf.clone();
        b[..8].copy_from_slice(&0u64.to_le_bytes());
        b[..4096].to_vec()
    };
    let mut off = 0u64;
    loop {
        if off + buf.len() as u64 > d.pool_size {
            ctx.fail(
                "full disk: the whole filler volume (the pool's size) was written without ENOSPC",
            );
            return Ok(off);
        }
        // A different first word in every 4 KiB: no block repeats (dedup).
        for (i, b) in buf.chunks_mut(4096).enumerate() {
            b[..8].copy_from_slice(&(off + i as u64 * 4096).to_le_bytes());
        }
        match c.write(off, &buf, false) {
            Ok(()) => off += buf.len() as u64,
            Err(ClientError::Errno { errno, .. }) if errno == ENOSPC => break,
            Err(e) => {
                ctx.fail(format!(
                    "full disk: filler write at {off}: {e} (wanted an ENOSPC reply)"
                ));
                return Ok(off);
            }
        }
    }
    add(&ctx.stats.enospc_replies, 1);
    // The connection is still up: it reads, and the next write gets
    // ENOSPC again.
    let mut b = vec![0u8; 4096];
    match c.read(0, &mut b) {
        Ok(()) if off == 0 || b == first => {}
        Ok(()) => ctx.fail("full disk: the filler's first block reads back wrong"),
        Err(e) => ctx.fail(format!(
            "full disk: read on the connection that got ENOSPC: {e}"
        )),
    }
    match c.write(off, &buf[..65536], false) {
        Err(ClientError::Errno { errno, .. }) if errno == ENOSPC => {
            add(&ctx.stats.enospc_replies, 1)
        }
        Ok(()) => ctx.log("full disk: a 64 KiB write after ENOSPC was taken (space reserve)"),
        Err(e) => ctx.fail(format!(
            "full disk: second write after ENOSPC: {e} (wanted an ENOSPC reply)"
        )),
    }
    let _ = c.disconnect();
    Ok(off)
}

/// Reads, snapshot exports, a mutation and `/health` while the pool is full.
fn checks_while_full(ctx: &Ctx, rng: &mut StdRng) {
    let api = ctx.api();
    let vi = ctx.snap_vols[0];
    let v = &ctx.vols[vi];
    let (lo, _) = v.bounds(0, (v.size / model::SECTOR) as usize, Lower::Acked);
    match read(&ctx.endpoint, &v.name, 0, v.size) {
        Ok(buf) => {
            let (_, hi) = v.bounds(0, lo.len(), Lower::Acked);
            if let Err(e) = model::check(&buf, v.tag, 0, &lo, &hi) {
                ctx.fail(format!("full disk: read of {}: {e}", v.name));
            }
        }
        Err(e) => ctx.fail(format!("full disk: read of {}: {e}", v.name)),
    }
    let snap = {
        let s = ctx.snaps();
        let live: Vec<_> = s.iter().filter(|e| !e.maybe_gone).collect();
        (!live.is_empty()).then(|| live[rng.gen_range(0..live.len())].snap.clone())
    };
    if let Some(s) = snap {
        let sv = &ctx.vols[s.volume];
        let export = s.export(&ctx.vols);
        match read(&ctx.endpoint, &export, 0, sv.size) {
            Ok(buf) => {
                if let Err(e) = model::check(&buf, sv.tag, 0, &s.lo, &s.hi) {
                    ctx.fail(format!("full disk: snapshot export {export}: {e}"));
                }
            }
            Err(e) => ctx.fail(format!("full disk: snapshot export {export}: {e}")),
        }
    }
    let path = format!("/v1/volumes/{}/snapshots", v.name);
    match api.call("POST", &path, Some(json!({"label": "soak-while-full"}))) {
        Ok((507, b)) if b["error"]["code"] == "no_space" => add(&ctx.stats.no_space_answers, 1),
        Ok((201, b)) => {
            ctx.log("full disk: a snapshot was still committed (space reserve)");
            // Into the model like the loop's own: verified and pruned later.
            if let Some(id) = b["id"].as_u64() {
                let (_, hi) = v.bounds(0, lo.len(), Lower::Acked);
                let snap = std::sync::Arc::new(model::Snapshot {
                    volume: vi,
                    id,
                    lo,
                    hi,
                });
                ctx.snaps().push(crate::ctl::SnapEntry {
                    snap,
                    maybe_gone: false,
                });
                add(&ctx.stats.snapshots, 1);
            }
        }
        Ok((s, b)) => ctx.fail(format!(
            "full disk: POST {path} answered {s} (wanted 507 no_space): {b}"
        )),
        Err(e) => ctx.fail(format!("full disk: {e}")),
    }
    let said = poll(Duration::from_secs(60), || match api.get("/health") {
        Ok((_, v)) if health_says_full(&v) => Some(()),
        _ => None,
    });
    if said.is_none() {
        let last = api
            .get("/health")
            .map(|(s, v)| format!("{s} {v}"))
            .unwrap_or_else(|e| e);
        // Under the load's overwrites and deletes a full pool's next commit
        // can free room at once: then "ok" is the truth, and a write shows it.
        if room_again(ctx) {
            ctx.log("full disk: the pool had room again (frees of the running load) before /health was read; it says ok and a write is taken");
        } else {
            ctx.fail(format!(
                "full disk: /health does not say the pool is out of space: {last}"
            ));
        }
    }
}

/// Whether the pool takes a 64 KiB write again (to the filler's start).
fn room_again(ctx: &Ctx) -> bool {
    let Ok(mut c) = connect(&ctx.endpoint, FILLER) else {
        return false;
    };
    let ok = c.write(0, &[0x5au8; 65536], false).is_ok() && c.flush().is_ok();
    let _ = c.disconnect();
    ok
}

/// After the space came back: `/health` ok, a commit, a new volume written
/// and flushed, the writers' writes acknowledged again.
fn recovered(ctx: &Ctx, api: &Api, gen_full: Option<u64>) -> bool {
    let writes = get(&ctx.stats.writes);
    let healthy = poll(RECOVERY_TIMEOUT, || match api.get("/health") {
        Ok((200, v)) if pool_ok(&v) => Some(v),
        _ => None,
    });
    let Some(h) = healthy else {
        let last = api
            .get("/health")
            .map(|(s, v)| format!("{s} {v}"))
            .unwrap_or_else(|e| e);
        ctx.fail(format!(
            "full disk: /health does not say the pool is ok after space came back: {last}"
        ));
        return false;
    };
    if h["status"] != "ok" {
        ctx.log(&format!(
            "full disk: pool ok again; /health status {} (recent device errors, lost records: {})",
            h["status"], h["logs"]
        ));
    }
    let committed = poll(RECOVERY_TIMEOUT, || {
        generation(api).filter(|g| gen_full.is_none_or(|f| *g > f))
    });
    if committed.is_none() {
        ctx.fail("full disk: no commit after space came back");
        return false;
    }
    if let Err(e) = probe(ctx, api) {
        ctx.fail(format!("full disk: after space came back: {e}"));
        return false;
    }
    if poll(RECOVERY_TIMEOUT, || {
        (get(&ctx.stats.writes) > writes).then_some(())
    })
    .is_none()
    {
        ctx.fail("full disk: the writers' writes were not acknowledged again");
        return false;
    }
    true
}

/// Creates a volume, writes and flushes it, deletes it.
fn probe(ctx: &Ctx, api: &Api) -> Result<()> {
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": PROBE, "size": 16u64 << 20})),
    )?;
    let mut c = connect(&ctx.endpoint, PROBE)?;
    c.write(0, &vec![0x5au8; 1 << 20], false)?;
    c.flush()?;
    let _ = c.disconnect();
    api.expect(
        204,
        "DELETE",
        &format!("/v1/volumes/{PROBE}?force=true"),
        None,
    )?;
    Ok(())
}
