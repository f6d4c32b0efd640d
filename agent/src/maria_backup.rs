//! A MariaDB backup into its stage volume: the first one full
//! (`mariadb-backup --backup` straight into the stage disk, then
//! `--prepare`), each next one incremental: the pages changed since the
//! last point's `to_lsn` (kept in its snapshot's metadata) copied into a
//! directory beside the data directory on the stage disk, then prepared into the stage disk's
//! live contents — which, right after a point, are that point's tree
//! shared copy-on-write, i.e. a clone of it — and snapshotted.
//!
//! The previous point is an immutable snapshot: nothing the prepare does
//! reaches it. A prepare that fails leaves a marker on the stage disk;
//! right after, with the disk detached, the agent asks the appliance to
//! revert the stage volume to the last point (`POST
//! /v1/volumes/{name}/revert`), which drops the half-prepared pages and
//! the marker with them, so the next backup is an incremental from that
//! point again. When the revert fails (or the agent was killed during the
//! prepare) the marker stays: the next backup sees it (or a data
//! directory whose `to_lsn` is not the last point's) and makes a full
//! copy instead of preparing another delta onto a half-prepared one, so
//! no delta is ever prepared twice nor onto anything but its own base.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cdm_disk::host::run;
use serde_json::{json, Value};

use crate::error::{Context as _, ErrorKind, Result};
use crate::maria::{self, Conn, Point, DATADIR};
use crate::ops::{self, Mounted, Stage};
use crate::Ctx;

/// On the stage disk while a prepare writes its data directory.
const MARKER: &str = ".cdm-mariadb-preparing";

/// The last point of the volume if it is a MariaDB point of this server:
/// its snapshot id and the checkpoints of the backup that made it.
fn last_point(
    ctx: &Ctx,
    volume: &str,
    datadir: &Path,
    server_id: u64,
) -> Result<Option<(u64, Value)>> {
    let snaps = ctx.api.list_snapshots(volume)?;
    let Some(s) = snaps.iter().max_by_key(|s| s.id) else {
        return Ok(None);
    };
    let m = &s.metadata;
    let same = m["kind"] == "mariadb"
        && m["database"]["datadir"].as_str() == Some(&datadir.to_string_lossy())
        && m["database"]["server_id"].as_u64() == Some(server_id)
        && m["checkpoints"]["to_lsn"].is_string();
    Ok(same.then(|| (s.id, m["checkpoints"].clone())))
}

/// Sectors written to the stage disk's block device so far: what went
/// to the appliance.
fn written_bytes(dev: &str) -> Option<u64> {
    let name = dev.trim_start_matches("/dev/");
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
    let f: Vec<&str> = stat.split_whitespace().collect();
    f.get(6)?.parse::<u64>().ok().map(|s| s * 512)
}

fn dir_size(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        _ => 0,
    }
}

fn remove_dir(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context_with(ErrorKind::Io, || p.display().to_string()),
    }
}

/// Writes `p` durably (the marker must be on the stage disk before the
/// prepare changes a page).
fn write_synced(p: &Path, text: &str) -> Result<()> {
    std::fs::write(p, text).context_with(ErrorKind::Io, || p.display().to_string())?;
    std::fs::File::open(p)?.sync_all()?;
    Ok(())
}

/// What the next backup does and why.
enum Plan {
    Full(String),
    Incremental {
        base_snapshot: u64,
        checkpoints: Value,
    },
}

fn plan(mount: &Path, last: Option<(u64, Value)>) -> Plan {
    let Some((id, cp)) = last else {
        return Plan::Full("no earlier point of this server on the volume".into());
    };
    if mount.join(MARKER).exists() {
        return Plan::Full(format!(
            "a prepare after point {id} did not finish: the stage disk is not that point"
        ));
    }
    let head = maria::read_point(&mount.join(DATADIR)).ok();
    let head_lsn = head
        .as_ref()
        .and_then(|p| p.checkpoints.get("to_lsn").cloned());
    if head_lsn.as_deref() != cp["to_lsn"].as_str() {
        return Plan::Full(format!(
            "the stage disk's data directory (to_lsn {head_lsn:?}) is not point {id}'s"
        ));
    }
    Plan::Incremental {
        base_snapshot: id,
        checkpoints: cp,
    }
}

/// The delta of an incremental, on the stage disk.
const DELTA: &str = ".cdm-mariadb-delta";

/// Host-side scratch of a volume's backups: the base's checkpoints and
/// the tools' logs.
fn scratch(ctx: &Ctx, volume: &str) -> PathBuf {
    ctx.state_dir.join("mariadb").join(volume)
}

/// What one run copied and prepared.
struct Made {
    /// What the backup itself recorded (before prepare): its binlog
    /// position, and its checkpoints — the next incremental's base.
    point: Point,
    /// The data directory's checkpoints once prepared.
    prepared: Point,
    kind: &'static str,
    why_full: Option<String>,
    base_snapshot: Option<u64>,
    delta_bytes: u64,
    backup_secs: f64,
    prepare_secs: f64,
}

fn full(c: &Conn, datadir: &Path, mount: &Path, logs: &Path, why: String) -> Result<Made> {
    let dd = mount.join(DATADIR);
    write_synced(&mount.join(MARKER), "full\n")?;
    remove_dir(&dd)?;
    remove_dir(&mount.join(DELTA))?;
    let b = maria::backup(c, datadir, &dd, None, &logs.join("backup.log"))?;
    let point = maria::read_point(&dd)?;
    let p = maria::prepare(&dd, None, &logs.join("prepare.log"))?;
    Ok(Made {
        point,
        prepared: maria::read_point(&dd)?,
        kind: "full",
        why_full: Some(why),
        base_snapshot: None,
        delta_bytes: dir_size(&dd),
        backup_secs: b.as_secs_f64(),
        prepare_secs: p.as_secs_f64(),
    })
}

fn incremental(
    c: &Conn,
    datadir: &Path,
    mount: &Path,
    work: &Path,
    base_snapshot: u64,
    base: &Value,
) -> Result<Made> {
    let dd = mount.join(DATADIR);
    let basedir = work.join("base");
    // On the stage disk, beside the data directory: the prepare *moves*
    // the tables created since the base (`*.new` files) into it with
    // rename(2), which fails with EXDEV across filesystems. Removed before
    // the snapshot; a run killed half way leaves it for the next to remove.
    let delta = mount.join(DELTA);
    remove_dir(&basedir)?;
    remove_dir(&delta)?;
    std::fs::create_dir_all(&basedir)?;
    let cp: std::collections::BTreeMap<String, String> = serde_json::from_value(base.clone())?;
    std::fs::write(
        basedir.join("xtrabackup_checkpoints"),
        maria::checkpoints_text(&cp),
    )?;
    let r = (|| -> Result<Made> {
        let b = maria::backup(c, datadir, &delta, Some(&basedir), &work.join("backup.log"))?;
        let point = maria::read_point(&delta)?;
        let delta_bytes = dir_size(&delta);
        write_synced(
            &mount.join(MARKER),
            &format!("incremental on {base_snapshot}\n"),
        )?;
        let p = maria::prepare(&dd, Some(&delta), &work.join("prepare.log"))?;
        Ok(Made {
            point,
            prepared: maria::read_point(&dd)?,
            kind: "incremental",
            why_full: None,
            base_snapshot: Some(base_snapshot),
            delta_bytes,
            backup_secs: b.as_secs_f64(),
            prepare_secs: p.as_secs_f64(),
        })
    })();
    // The delta is applied (or failed to be): never again.
    let _ = remove_dir(&delta);
    r
}

/// The prepared copy belongs to the server's own user, so a restore runs
/// `mariadbd` as that user, as production does.
fn chown_like(dd: &Path, datadir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(datadir)?;
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", m.uid(), m.gid()))
        .arg(dd))
    .context_with(ErrorKind::Host, || format!("chown of {}", dd.display()))?;
    Ok(())
}

/// Online backup of a running MariaDB into its stage volume.
pub fn backup_mariadb(
    ctx: &Ctx,
    stage: &Stage,
    conn: &Conn,
    datadir: Option<&Path>,
) -> Result<Value> {
    let t0 = Instant::now();
    // The server first: one that is down or refuses us costs nothing.
    let si = maria::info(conn)?;
    let datadir = datadir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| si.datadir.clone());
    if !datadir.join("mysql").is_dir() {
        crate::fail!(
            Host,
            "{} is not the server's data directory as this host sees it (give --datadir)",
            datadir.display()
        );
    }
    ops::check_name(&stage.volume)?;
    let _lock = ops::lock(ctx, &stage.volume)?;
    let (vol, _) = ops::ensure_stage_volume(
        ctx,
        &stage.volume,
        stage.size,
        ops::STAGE_BLOCK_SIZE,
        &stage.settings,
    )?;
    let last = last_point(ctx, &stage.volume, &datadir, si.server_id)?;
    let last_id = last.as_ref().map(|l| l.0);
    let work = scratch(ctx, &stage.volume);
    std::fs::create_dir_all(&work)?;
    let m = Mounted::open(ctx, &stage.volume, vol.allocated_bytes == 0)?;
    let label = stage
        .label
        .clone()
        .unwrap_or_else(|| ops::now_label("mariadb"));
    let r = (|| -> Result<Value> {
        let mount = m.a.mount.clone();
        let sent0 = written_bytes(&m.a.device);
        let made = match plan(&mount, last) {
            Plan::Full(why) => full(conn, &datadir, &mount, &work, why),
            Plan::Incremental {
                base_snapshot,
                checkpoints,
            } => incremental(conn, &datadir, &mount, &work, base_snapshot, &checkpoints),
        }
        .map_err(|e| {
            crate::err!(
                Host,
                "backup failed, no point taken (the previous point is intact): {e:#}"
            )
        })?;
        chown_like(&mount.join(DATADIR), &datadir)?;
        std::fs::remove_file(mount.join(MARKER))
            .context_with(ErrorKind::Io, || "removing the prepare marker")?;
        crate::merge::syncfs(&mount)?;
        let sent = written_bytes(&m.a.device)
            .zip(sent0)
            .map(|(a, b)| a.saturating_sub(b));
        let mut meta = json!({
            "agent": format!("cdm-agent {}", env!("CARGO_PKG_VERSION")),
            "kind": "mariadb",
            "host": ops::hostname(),
            "database": {
                "version": si.version,
                "datadir": datadir,
                "server_id": si.server_id,
                "socket": conn.socket,
                "log_bin": si.log_bin,
            },
            "backup": made.kind,
            "base_snapshot": made.base_snapshot,
            "why_full": made.why_full,
            "checkpoints": made.point.checkpoints,
            "prepared": made.prepared.checkpoints,
            "binlog": made.point.binlog,
            "delta_bytes": made.delta_bytes,
            "bytes_written": sent,
            "backup_seconds": made.backup_secs,
            "prepare_seconds": made.prepare_secs,
        });
        ops::merge_meta(&mut meta, stage.metadata.as_ref());
        let snap = ops::snapshot_frozen(ctx, &mount, &stage.volume, label.clone(), meta)
            .context_with(ErrorKind::Host, || "backup prepared but not snapshotted")?;
        Ok(json!({
            "kind": "mariadb",
            "backup": made.kind,
            "why_full": made.why_full,
            "volume": stage.volume,
            "snapshot": snap.id,
            "export": snap.export,
            "label": snap.label,
            "seconds": t0.elapsed().as_secs_f64(),
            "backup_seconds": made.backup_secs,
            "prepare_seconds": made.prepare_secs,
            "delta_bytes": made.delta_bytes,
            "bytes_written": sent,
            "binlog": made.point.binlog,
            "checkpoints": made.point.checkpoints,
        }))
    })();
    // A prepare that failed left its marker (and half-prepared pages).
    let half_prepared = r.is_err() && m.a.mount.join(MARKER).exists();
    let closed = m.close(ctx);
    let v = match (r, last_id) {
        (Err(e), Some(id)) if half_prepared && closed.is_ok() => {
            return Err(roll_back(ctx, &stage.volume, id, e));
        }
        (r, _) => r?,
    };
    closed?;
    Ok(v)
}

/// Reverts the stage volume to point `id` after a failed prepare (the
/// stage disk detached): the next backup is then incremental from it.
/// `e`, the backup's error, says which it will be.
fn roll_back(ctx: &Ctx, volume: &str, id: u64, e: crate::error::Error) -> crate::error::Error {
    // The appliance refuses (409) while it still counts the stage disk's
    // connection, which the detach just closed: wait for that to end.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let r = loop {
        match ctx.api.revert_volume(volume, id) {
            Err(cdm_api::client::ClientError::Api { status: 409, .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => break r,
        }
    };
    match r {
        Ok(_) => {
            tracing::info!(
                volume,
                snapshot = id,
                "stage volume rolled back after the failed prepare"
            );
            crate::err!(
                Host,
                "{e:#} (the stage volume was rolled back to point {id}: the next backup is incremental from it)"
            )
        }
        Err(re) => {
            tracing::warn!(volume, snapshot = id, error = %re, "stage volume not rolled back");
            crate::err!(
                Host,
                "{e:#} (rolling the stage volume back to point {id} failed: {re}; the next backup is a full one)"
            )
        }
    }
}
