//! Recovery drills' routes (`crate::control::drills` keeps the reports)
//! and the scrub of one point that a drill asks for: every mapped block of
//! the snapshot read back through the engine, which checks each extent's
//! checksum.

use std::sync::{Arc, Weak};
use std::time::Instant;

use cdm_api::auth::{Caller, Role};
use cdm_api::drills::*;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use cdmfs::Target;

use super::{engine, Appliance};
use crate::control::Control;

/// Bytes read at a time while verifying a snapshot.
const VERIFY_CHUNK: u64 = 4 << 20;

/// Lets the control plane delete drill clones as the appliance does (NBD
/// clients of the clone disconnected, the host's record of it dropped).
pub(super) fn hook(control: &Control, me: Weak<Appliance>) {
    let me2 = me.clone();
    control.set_drill_starter(Arc::new(move |c: &Caller, id: u64, req: DrillCreate| {
        me2.upgrade()
            .ok_or_else(|| ApiError::unavailable("appliance is shutting down"))?
            .drill_any(c, id, req)
    }));
    control.set_clone_remover(Arc::new(move |name: &str| {
        let a = me
            .upgrade()
            .ok_or_else(|| ApiError::unavailable("appliance is shutting down"))?;
        let c = Caller {
            user: "appliance".into(),
            role: Role::Admin,
            grants: Vec::new(),
            token_id: String::new(),
            token_name: String::new(),
        };
        a.clone_delete(&c, name, true)
    }));
}

impl Appliance {
    /// A drill of any kind: PostgreSQL by an agent, the rest here.
    pub(super) fn drill_any(&self, c: &Caller, id: u64, req: DrillCreate) -> ApiResult<Job> {
        let app = self.control.application(id)?;
        if crate::control::drills::LOCAL_KINDS.contains(&app.kind.as_str()) {
            self.start_local_drill(c, id, req)
        } else {
            self.control.start_drill(c, id, req)
        }
    }

    /// Reads every mapped run of snapshot `id` of `volume`; a read that
    /// fails (a checksum mismatch, an I/O error) is retried block by block
    /// so each bad spot is named.
    pub(super) fn verify_point(&self, volume: &str, id: u64) -> ApiResult<SnapshotVerify> {
        let t0 = Instant::now();
        let info = self.snapshot_of(volume, id)?;
        let t = Target::Snapshot(id);
        // A sealed point whose key is not loaded here is checked as
        // stored (its ciphertext, read and checksummed without the key):
        // a replica host verifies it holds intact data it cannot read.
        let sealed = info.seal.filter(|_| !info.seal_key_loaded);
        let read = |off: u64, buf: &mut [u8]| match &sealed {
            Some(seal) => self.pool.read_sealed(t, off, buf, seal),
            None => self.pool.read(t, off, buf),
        };
        let (size, bs) = self.pool.geometry(t).map_err(engine)?;
        let runs = self.pool.block_status(t, 0, size).map_err(engine)?;
        let mut out = SnapshotVerify {
            volume: volume.to_string(),
            snapshot: id,
            ..SnapshotVerify::default()
        };
        let mut buf = vec![0u8; VERIFY_CHUNK as usize];
        for r in runs.iter().filter(|r| r.allocated) {
            let mut off = r.offset;
            let end = r.offset + r.len;
            while off < end {
                let n = (end - off).min(VERIFY_CHUNK);
                match read(off, &mut buf[..n as usize]) {
                    Ok(()) => out.bytes_checked += n,
                    Err(_) => verify_blocks(&read, off, n, bs as u64, &mut out),
                }
                off += n;
            }
        }
        out.seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// Reads `from..from + len` block by block, recording each block that
/// fails.
fn verify_blocks(
    read: &dyn Fn(u64, &mut [u8]) -> cdmfs::Result<()>,
    from: u64,
    len: u64,
    bs: u64,
    out: &mut SnapshotVerify,
) {
    let mut b = vec![0u8; bs as usize];
    let mut off = from;
    while off < from + len {
        let n = (from + len - off).min(bs);
        match read(off, &mut b[..n as usize]) {
            Ok(()) => out.bytes_checked += n,
            Err(e) => {
                if out.errors.len() < 1000 {
                    out.errors.push(format!("offset {off}: {e}"));
                }
            }
        }
        off += n;
    }
}

impl DrillBackend for Appliance {
    fn start_drill(&self, c: &Caller, application: u64, req: DrillCreate) -> ApiResult<Job> {
        self.drill_any(c, application, req)
    }
    fn list_drills(&self, application: Option<u64>) -> ApiResult<Vec<Drill>> {
        self.control.drills(application)
    }
    fn drill(&self, id: u64) -> ApiResult<Drill> {
        self.control.drill(id)
    }
    fn verify_snapshot(&self, volume: &str, snapshot: u64) -> ApiResult<SnapshotVerify> {
        self.verify_point(volume, snapshot)
    }
}
