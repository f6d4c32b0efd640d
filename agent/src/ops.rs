//! The agent's commands, put together from the pieces: stage disks,
//! merges, the database, the appliance's API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cdm_api::types::{SnapshotCreate, Volume, VolumeCreate};
use cdm_disk::host::run;
use serde_json::{json, Value};

use crate::attach::{self, AttachRequest, Attachment};
use crate::error::{Context as _, Result};
use crate::merge::{Entry, MergeError, MergeStats, Merger, Meta, Source};
use crate::throttle::Throttle;
use crate::{block, maria, pg, Ctx, Error, ErrorKind};

/// Names of volumes, clones and attachments ([`cdm_common::names`]).
pub fn check_name(n: &str) -> Result<(), Error> {
    cdm_common::names::check(n).map_err(|e| {
        Error::with_source(
            ErrorKind::Invalid,
            format!("{n:?}: names are {}", cdm_common::names::RULE),
            e,
        )
    })
}

/// "VOLUME@ID".
pub fn parse_snapshot(s: &str) -> Result<(String, u64)> {
    let (v, id) = s
        .rsplit_once('@')
        .ok_or_else(|| crate::err!(Invalid, "{s:?}: want VOLUME@ID"))?;
    check_name(v)?;
    let id = id
        .parse()
        .map_err(|_| crate::err!(Invalid, "{s:?}: snapshot id is not a number"))?;
    Ok((v.to_string(), id))
}

/// The stage volume; created with `size` if missing and a size is given.
pub fn ensure_volume(
    ctx: &Ctx,
    name: &str,
    size: Option<u64>,
    block_size: u32,
) -> Result<(Volume, bool)> {
    ensure_stage_volume(ctx, name, size, block_size, &VolumeSettings::default())
}

/// The block size of a new stage volume (unless its settings say). The
/// engine's default: a database's 8 KiB page writes cost only what they
/// write (pieces), while the volume's tree holds one entry per 64 KiB
/// instead of per 4 KiB, so the tree leaves a point copies on write are
/// 16× fewer (measured on a 1 GB pgbench database with 1% of its pages
/// changed per point: 6.0 MB of tree nodes per point at 4 KiB, 0.2–0.3 MB
/// at 64 KiB; docs/benchmarks.md, issue 14).
pub const STAGE_BLOCK_SIZE: u32 = 65536;

/// How a missing stage volume is made (a protection policy's settings);
/// an existing one is used as it is.
#[derive(Clone, Debug, Default)]
pub struct VolumeSettings {
    /// Overrides the command's default block size.
    pub block_size: Option<u32>,
    pub dedup: Option<bool>,
    pub compression: Option<u8>,
    pub encryption: Option<String>,
}

/// [`ensure_volume`] with the settings a new volume gets.
pub fn ensure_stage_volume(
    ctx: &Ctx,
    name: &str,
    size: Option<u64>,
    block_size: u32,
    settings: &VolumeSettings,
) -> Result<(Volume, bool)> {
    check_name(name)?;
    match ctx.api.volume(name) {
        Ok(v) => Ok((v, false)),
        Err(cdm_api::client::ClientError::Api { status: 404, .. }) => match size {
            Some(size) => {
                let v = ctx.api.create_volume(&VolumeCreate {
                    name: name.to_string(),
                    size,
                    block_size: Some(settings.block_size.unwrap_or(block_size)),
                    dedup: settings.dedup,
                    compression: settings.compression,
                    encryption: settings.encryption.clone(),
                })?;
                Ok((v, true))
            }
            None => crate::fail!(
                Host,
                "volume {name} does not exist on the appliance: give --size to create it"
            ),
        },
        Err(e) => Err(e.into()),
    }
}

/// Marks the block fingerprints of `volume` (if any) as not to be trusted:
/// the volume is about to be written by something else than a block
/// backup.
pub fn invalidate_block_fingerprints(ctx: &Ctx, volume: &str) -> Result<()> {
    let p = block::Paths::new(&ctx.state_dir, volume);
    if p.fp.exists() {
        std::fs::write(&p.marker, b"attached read-write outside a block backup\n")?;
    }
    Ok(())
}

/// One backup per stage volume at a time on this host: an exclusive
/// `flock` on `STATE/locks/VOLUME.lock`, released when the file closes.
pub fn lock(ctx: &Ctx, volume: &str) -> Result<std::fs::File> {
    let d = ctx.state_dir.join("locks");
    std::fs::create_dir_all(&d)?;
    let f = std::fs::File::create(d.join(format!("{volume}.lock")))?;
    match cdm_common::lock::try_lock_exclusive(&f) {
        Ok(true) => Ok(f),
        Ok(false) => crate::fail!(Host, "another backup of {volume} is running on this host"),
        Err(e) => Err(Error::with_source(
            ErrorKind::Host,
            format!("cannot lock the backups of {volume} on this host"),
            e,
        )),
    }
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub volume: String,
    pub size: Option<u64>,
    pub block_size: u32,
    pub label: Option<String>,
    /// Merged into the snapshot's metadata (a job's application, policy).
    pub metadata: Option<Value>,
    pub settings: VolumeSettings,
}

/// `extra`'s keys added to (or replacing) those of `meta`.
pub(crate) fn merge_meta(meta: &mut Value, extra: Option<&Value>) {
    if let (Some(Value::Object(x)), Value::Object(o)) = (extra, meta) {
        o.extend(x.clone());
    }
}

/// A stage disk mounted for a backup; detached at the end if the backup
/// attached it.
pub(crate) struct Mounted {
    pub(crate) a: Attachment,
    child: Option<Child>,
    ours: bool,
}

impl Mounted {
    /// The stage disk of `volume`, mounted: the attachment someone made
    /// with `attach`, or a new one that [`Mounted::close`] detaches (also
    /// one an interrupted backup left behind).
    pub(crate) fn open(ctx: &Ctx, volume: &str, blank: bool) -> Result<Mounted> {
        let name = attach::name_of(volume);
        if let Some(a) = attach::record(ctx, &name) {
            if a.writable && a.export == volume && cdm_disk::host::is_mounted(&a.mount) {
                let ours = a.temporary;
                if ours {
                    // A backup killed between freeze and thaw left it
                    // frozen: writes would hang. Not frozen: a no-op error.
                    let _ = run(Command::new("fsfreeze").arg("-u").arg(&a.mount));
                }
                return Ok(Mounted {
                    a,
                    child: None,
                    ours,
                });
            }
        }
        let (a, child) = attach::attach(
            ctx,
            &AttachRequest {
                name: name.clone(),
                export: volume.to_string(),
                writable: true,
                mount: ctx.state_dir.join("mnt").join(&name),
                mkfs: blank.then(|| "ext4".into()),
            },
        )?;
        let mut m = Mounted {
            a,
            child,
            ours: true,
        };
        m.a.temporary = true;
        if let Err(e) = attach::save(ctx, &m.a) {
            let _ = m.close(ctx);
            return Err(e);
        }
        Ok(m)
    }

    pub(crate) fn close(mut self, ctx: &Ctx) -> Result<()> {
        if self.ours {
            Ok(attach::detach(ctx, &self.a, self.child.as_mut())?)
        } else {
            Ok(())
        }
    }
}

pub(crate) fn bar(ctx: &Ctx, total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !ctx.progress {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_prefix(what.to_string());
    Some(b)
}

fn total_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match &e.source {
            Source::File { path, .. } => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            Source::Data(d) => d.len() as u64,
            _ => 0,
        })
        .sum()
}

/// Freezes the filesystem (its journal checkpointed: the snapshot mounts
/// clean), takes the snapshot, thaws — whatever happens.
pub(crate) fn snapshot_frozen(
    ctx: &Ctx,
    mount: &Path,
    volume: &str,
    label: String,
    metadata: Value,
) -> Result<cdm_api::types::Snapshot> {
    crate::merge::syncfs(mount).context_with(ErrorKind::Host, || "flushing the stage disk")?;
    run(Command::new("fsfreeze").arg("-f").arg(mount))
        .context_with(ErrorKind::Host, || "freezing the stage disk")?;
    let r = ctx.api.create_snapshot(
        volume,
        &SnapshotCreate {
            label: Some(label),
            metadata: Some(metadata),
        },
    );
    let thaw = run(Command::new("fsfreeze").arg("-u").arg(mount));
    let s = r.context_with(ErrorKind::Host, || format!("snapshot of {volume}"))?;
    thaw.map_err(|e| {
        crate::err!(
            Host,
            "thawing the stage disk (snapshot {} taken): {e}",
            s.id
        )
    })?;
    Ok(s)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn now_label(kind: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("cdm-agent {kind} {t}")
}

fn summary(
    kind: &str,
    volume: &str,
    snap: &cdm_api::types::Snapshot,
    st: &MergeStats,
    secs: f64,
) -> Value {
    json!({
        "kind": kind,
        "volume": volume,
        "snapshot": snap.id,
        "export": snap.export,
        "label": snap.label,
        "seconds": secs,
        "bytes_read": st.bytes_read,
        "bytes_written": st.bytes_written,
        "changed_blocks": st.changed_blocks,
        "blocks": st.blocks,
        "merge": st,
    })
}

/// Online backup of a PostgreSQL cluster into its stage volume.
pub fn backup_postgres(
    ctx: &Ctx,
    stage: &Stage,
    conn: &pg::Conn,
    pgdata: Option<&Path>,
) -> Result<Value> {
    let t0 = Instant::now();
    check_block_size(stage.block_size)?;
    // The database first: a server that is down or refuses us costs nothing.
    let mut client = conn.connect()?;
    let si = pg::info(&mut client)?;
    let pgdata = pgdata
        .map(Path::to_path_buf)
        .unwrap_or_else(|| si.data_directory.clone());
    if !pgdata.join("PG_VERSION").exists() {
        crate::fail!(
            Host,
            "{} is not the server's data directory as this host sees it (give --pgdata)",
            pgdata.display()
        );
    }
    // Checked now (tablespaces), listed only after
    // pg_backup_start: a file created before the start checkpoint must be
    // in the copy, WAL replay will not recreate it.
    pg::check_layout(&pgdata)?;
    check_name(&stage.volume)?;
    let _lock = lock(ctx, &stage.volume)?;
    let (vol, _) = ensure_stage_volume(
        ctx,
        &stage.volume,
        stage.size,
        STAGE_BLOCK_SIZE,
        &stage.settings,
    )?;
    let m = Mounted::open(ctx, &stage.volume, vol.allocated_bytes == 0)?;
    let label = stage.label.clone().unwrap_or_else(|| now_label("postgres"));
    let r = (|| -> Result<Value> {
        let mut bk = pg::Backup::start(client, &label)?;
        let start = bk.start_lsn;
        let entries = pg::entries(&si, &pgdata)?;
        let mut stopped: Option<pg::Stopped> = None;
        let mut throttle = Throttle::new(ctx.bandwidth.clone());
        let pb = bar(ctx, total_bytes(&entries), "postgres");
        let mut merger = Merger::new(
            m.a.mount.clone(),
            crate::merge::host_fingerprints(&ctx.state_dir, &stage.volume),
            stage.block_size,
            &mut throttle,
            pb.as_ref(),
        );
        let mut more = || -> Result<Vec<Entry>, MergeError> {
            let s = bk
                .stop(&si)
                .map_err(|e| MergeError::Other(format!("{e:#}")))?;
            let e = pg::final_entries(&si, &pgdata, &s, start)
                .map_err(|e| MergeError::Other(format!("{e:#}")))?;
            stopped = Some(s);
            Ok(e)
        };
        let merged = merger.merge(entries, &mut more);
        if let Some(b) = &pb {
            b.finish_and_clear();
        }
        let st = match merged {
            Ok(st) => st,
            Err(e) => {
                let called = if bk.stopped() {
                    ""
                } else {
                    "; pg_backup_stop called"
                };
                drop(bk);
                crate::fail!(Host, "backup failed, no snapshot taken{called}: {e}");
            }
        };
        let s = stopped.ok_or_else(|| crate::err!(Host, "the backup did not stop"))?;
        let mut meta = postgres_meta(&si, &pgdata, &s, &st);
        merge_meta(&mut meta, stage.metadata.as_ref());
        let snap = snapshot_frozen(ctx, &m.a.mount, &stage.volume, label.clone(), meta)
            .context_with(ErrorKind::Host, || "backup copied but not snapshotted")?;
        let mut v = summary(
            "postgres",
            &stage.volume,
            &snap,
            &st,
            t0.elapsed().as_secs_f64(),
        );
        v["postgres"] = json!({
            "start_lsn": s.start_lsn,
            "stop_lsn": s.stop_lsn,
            "timeline": s.timeline,
            "wal": s.wal,
        });
        Ok(v)
    })();
    let closed = m.close(ctx);
    let v = r?;
    closed?;
    Ok(v)
}

/// What a PostgreSQL backup's snapshot records: the server, the backup's
/// LSNs and WAL, and what the merge copied.
fn postgres_meta(si: &pg::ServerInfo, pgdata: &Path, s: &pg::Stopped, st: &MergeStats) -> Value {
    json!({
        "agent": format!("cdm-agent {}", env!("CARGO_PKG_VERSION")),
        "kind": "postgres",
        "host": hostname(),
        "database": {
            "version": si.version,
            "system_identifier": si.system_identifier,
            "data_directory": pgdata,
            "port": si.port,
            "wal_segment_size": si.wal_segment_size,
        },
        "start_lsn": s.start_lsn,
        "stop_lsn": s.stop_lsn,
        "timeline": s.timeline,
        "backup_label": s.backup_label,
        "wal": s.wal,
        "bytes_read": st.bytes_read,
        "bytes_written": st.bytes_written,
        "changed_blocks": st.changed_blocks,
    })
}

pub(crate) fn check_block_size(bs: u32) -> Result<()> {
    if !(512..=1 << 20).contains(&bs) || !bs.is_power_of_two() {
        crate::fail!(
            Invalid,
            "block size {bs}: a power of two from 512 to 1048576"
        );
    }
    Ok(())
}

/// A directory tree into its stage volume (under `files/`).
pub fn backup_files(ctx: &Ctx, stage: &Stage, source: &Path) -> Result<Value> {
    let t0 = Instant::now();
    check_block_size(stage.block_size)?;
    let src = std::fs::canonicalize(source)
        .context_with(ErrorKind::Io, || source.display().to_string())?;
    let sm = std::fs::metadata(&src)?;
    if !sm.is_dir() {
        crate::fail!(Invalid, "{}: not a directory", src.display());
    }
    let mut entries = vec![Entry {
        rel: "files".into(),
        source: Source::Dir,
        meta: Meta::of(&sm),
    }];
    crate::merge::walk(
        &src,
        Path::new("files"),
        &|_| false,
        &|_| false,
        &mut entries,
    )?;
    check_name(&stage.volume)?;
    let _lock = lock(ctx, &stage.volume)?;
    let (vol, _) = ensure_stage_volume(
        ctx,
        &stage.volume,
        stage.size,
        STAGE_BLOCK_SIZE,
        &stage.settings,
    )?;
    let m = Mounted::open(ctx, &stage.volume, vol.allocated_bytes == 0)?;
    let label = stage.label.clone().unwrap_or_else(|| now_label("files"));
    let r = (|| -> Result<Value> {
        let mut throttle = Throttle::new(ctx.bandwidth.clone());
        let pb = bar(ctx, total_bytes(&entries), "files");
        let st = Merger::new(
            m.a.mount.clone(),
            crate::merge::host_fingerprints(&ctx.state_dir, &stage.volume),
            stage.block_size,
            &mut throttle,
            pb.as_ref(),
        )
        .merge(entries, &mut || Ok(Vec::new()))
        .map_err(|e| crate::err!(Host, "backup failed, no snapshot taken: {e}"))?;
        if let Some(b) = &pb {
            b.finish_and_clear();
        }
        let mut meta = json!({
            "agent": format!("cdm-agent {}", env!("CARGO_PKG_VERSION")),
            "kind": "files",
            "host": hostname(),
            "source": src,
            "files": st.files,
            "bytes_read": st.bytes_read,
            "bytes_written": st.bytes_written,
            "changed_blocks": st.changed_blocks,
        });
        merge_meta(&mut meta, stage.metadata.as_ref());
        let snap = snapshot_frozen(ctx, &m.a.mount, &stage.volume, label.clone(), meta)?;
        Ok(summary(
            "files",
            &stage.volume,
            &snap,
            &st,
            t0.elapsed().as_secs_f64(),
        ))
    })();
    let closed = m.close(ctx);
    let v = r?;
    closed?;
    Ok(v)
}

/// A block device, image file or NBD export into its stage volume.
pub fn backup_block(
    ctx: &Ctx,
    volume: &str,
    source: &str,
    bitmap: Option<&str>,
    block_size: u32,
    label: Option<String>,
    extra: Option<Value>,
) -> Result<Value> {
    let b = BlockBackup {
        volume,
        source,
        bitmap,
        block_size,
        settings: &VolumeSettings::default(),
    };
    backup_block_with(ctx, &b, label, extra)
}

/// What a block backup copies where.
pub struct BlockBackup<'a> {
    pub volume: &'a str,
    pub source: &'a str,
    pub bitmap: Option<&'a str>,
    /// Fingerprint block size.
    pub block_size: u32,
    /// A new stage volume's dedup, compression, encryption (its block
    /// size follows the fingerprints').
    pub settings: &'a VolumeSettings,
}

/// [`backup_block`] with the settings of a new stage volume.
pub fn backup_block_with(
    ctx: &Ctx,
    b: &BlockBackup<'_>,
    label: Option<String>,
    extra: Option<Value>,
) -> Result<Value> {
    let (volume, source, bitmap, block_size) = (b.volume, b.source, b.bitmap, b.block_size);
    let t0 = Instant::now();
    check_block_size(block_size)?;
    let mut src = block::Source::open(source, bitmap)?;
    if let (Some(b), None) = (bitmap, src.bitmap()) {
        tracing::warn!(
            bitmap = b,
            "the source does not offer this dirty bitmap: using fingerprints"
        );
    }
    let size = src.size();
    check_name(volume)?;
    let _lock = lock(ctx, volume)?;
    let vb = if block_size >= 4096 {
        block_size.min(65536)
    } else {
        4096
    };
    let settings = VolumeSettings {
        block_size: None,
        ..b.settings.clone()
    };
    let (vol, created) = ensure_stage_volume(
        ctx,
        volume,
        Some(size.div_ceil(vb as u64) * vb as u64),
        vb,
        &settings,
    )?;
    let paths = block::Paths::new(&ctx.state_dir, volume);
    std::fs::create_dir_all(paths.fp.parent().unwrap_or(&ctx.state_dir))?;
    let latest = ctx.api.list_snapshots(volume)?.iter().map(|s| s.id).max();
    let old = block::load(&paths, block_size, size, latest);
    let why = old
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut stage = connect_stage(ctx, volume)?;
    std::fs::write(
        &paths.marker,
        b"a block backup is writing this stage volume\n",
    )?;
    let mut throttle = Throttle::new(ctx.bandwidth.clone());
    let pb = bar(ctx, size, "block");
    let (hashes, st) = block::Copy {
        src: &mut src,
        stage: &mut stage,
        block_size,
        throttle: &mut throttle,
        progress: pb.as_ref(),
        stage_blank: created || (vol.allocated_bytes == 0 && latest.is_none()),
    }
    .run(old.ok(), why)
    .context_with(ErrorKind::Host, || "backup failed, no snapshot taken")?;
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    let _ = stage.disconnect();
    let meta = BlockMeta {
        source,
        bitmap: src.bitmap(),
        size,
        st: &st,
    };
    let snap = block_snapshot(ctx, volume, &meta, label, extra)?;
    save_fingerprints(
        &paths,
        &block::Fingerprints {
            block_size,
            snapshot: snap.id,
            size,
            bitmap: src.bitmap().map(str::to_string),
            hashes,
        },
    )?;
    Ok(json!({
        "kind": "block",
        "volume": volume,
        "snapshot": snap.id,
        "export": snap.export,
        "label": snap.label,
        "seconds": t0.elapsed().as_secs_f64(),
        "bytes_read": st.bytes_read,
        "bytes_written": st.bytes_written,
        "changed_blocks": st.changed_blocks,
        "blocks": st.blocks,
        "block": st,
    }))
}

/// The stage volume's NBD export, written by a block backup.
fn connect_stage(ctx: &Ctx, volume: &str) -> Result<nbd_proto::client::Client> {
    connect_export(ctx, volume, false).context_with(ErrorKind::Host, || {
        format!("stage volume {volume} over NBD {}", ctx.nbd)
    })
}

/// An export of the appliance (`VOLUME` or `VOLUME@SNAPSHOT`), with
/// `base:allocation` selected if `allocation`.
pub(crate) fn connect_export(
    ctx: &Ctx,
    export: &str,
    allocation: bool,
) -> std::result::Result<nbd_proto::client::Client, nbd_proto::client::ClientError> {
    nbd_proto::client::Client::connect(
        &ctx.nbd,
        Some(export),
        &nbd_proto::client::ClientOptions {
            allocation,
            timeout: Some(Duration::from_secs(60)),
            tls: ctx.nbd_tls.clone(),
            ..Default::default()
        },
    )
}

/// What a block backup's snapshot records of its source and copy.
struct BlockMeta<'a> {
    source: &'a str,
    bitmap: Option<&'a str>,
    size: u64,
    st: &'a block::BlockStats,
}

/// Asks the appliance for the snapshot of a copied block stage.
fn block_snapshot(
    ctx: &Ctx,
    volume: &str,
    b: &BlockMeta<'_>,
    label: Option<String>,
    extra: Option<Value>,
) -> Result<cdm_api::types::Snapshot> {
    let label = label.unwrap_or_else(|| now_label("block"));
    let mut m = json!({
        "agent": format!("cdm-agent {}", env!("CARGO_PKG_VERSION")),
        "kind": "block",
        "host": hostname(),
        "source": b.source,
        "mode": b.st.mode,
        "bitmap": b.bitmap,
        "size": b.size,
        "bytes_read": b.st.bytes_read,
        "bytes_written": b.st.bytes_written,
        "changed_blocks": b.st.changed_blocks,
    });
    if let (Some(Value::Object(x)), Value::Object(o)) = (extra, &mut m) {
        o.extend(x);
    }
    ctx.api
        .create_snapshot(
            volume,
            &SnapshotCreate {
                label: Some(label),
                metadata: Some(m),
            },
        )
        .context_with(ErrorKind::Host, || "backup copied but not snapshotted")
}

/// Saves the fingerprints of the snapshot just taken (durably, then in
/// place), and removes the marker that said the stage was being written.
fn save_fingerprints(paths: &block::Paths, fp: &block::Fingerprints) -> Result<()> {
    let tmp = paths.fp.with_extension("fp.tmp");
    std::fs::write(&tmp, fp.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &paths.fp)?;
    std::fs::remove_file(&paths.marker)?;
    Ok(())
}

/// Copies a snapshot's files to `target` (new or empty); prepares a
/// PostgreSQL copy and starts it on `start_port` if asked.
pub fn restore_regular(
    ctx: &Ctx,
    snapshot: &str,
    target: &Path,
    start_port: Option<u16>,
) -> Result<Value> {
    let t0 = Instant::now();
    let (vol, id) = parse_snapshot(snapshot)?;
    if std::fs::read_dir(target)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        crate::fail!(Invalid, "{} is not empty", target.display());
    }
    std::fs::create_dir_all(target)?;
    let target = std::fs::canonicalize(target)?;
    ctx.api.snapshot(&vol, id)?;
    let name = format!("restore-{vol}-{id}-{}", std::process::id());
    let (a, mut child) = attach::attach(
        ctx,
        &AttachRequest {
            name,
            export: format!("{vol}@{id}"),
            writable: false,
            mount: ctx
                .state_dir
                .join("mnt")
                .join(format!("restore-{vol}-{id}-{}", std::process::id())),
            mkfs: None,
        },
    )?;
    let copied = (|| -> Result<u64> {
        let mut n = 0;
        for e in std::fs::read_dir(&a.mount)? {
            let e = e?;
            let fname = e.file_name();
            if fname == crate::merge::META_DIR || fname == "lost+found" {
                continue;
            }
            run(Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(e.path())
                .arg(&target))
            .map_err(|e| crate::err!(Host, "{e}"))?;
            n += dir_bytes(&e.path());
        }
        Ok(n)
    })();
    let detached = attach::detach(ctx, &a, child.as_mut());
    let copied = copied?;
    detached?;
    let copy_secs = t0.elapsed().as_secs_f64();
    let mut v = json!({
        "kind": "regular",
        "snapshot": snapshot,
        "target": target,
        "bytes_copied": copied,
        "copy_seconds": copy_secs,
    });
    if target.join(maria::DATADIR).exists() {
        let r = maria::ready_copy(&target, start_port.unwrap_or(3306))?;
        v["datadir"] = json!(r.datadir);
        if start_port.is_some() {
            let ready = maria::start(&r)?;
            v["mariadb"] = json!(r);
            v["seconds_to_first_query"] = json!(t0.elapsed().as_secs_f64());
            v["startup_seconds"] = json!(ready.as_secs_f64());
        }
    } else if target.join("pgdata").exists() {
        let r = pg::prepare(
            &target,
            start_port.unwrap_or(5432),
            &format!("cdm-restore-{vol}-{id}"),
        )?;
        v["pgdata"] = json!(r.pgdata);
        if start_port.is_some() {
            let ready = pg::start(&r)?;
            v["postgres"] = json!(r);
            v["seconds_to_first_query"] = json!(t0.elapsed().as_secs_f64());
            v["startup_seconds"] = json!(ready.as_secs_f64());
        }
    }
    v["seconds"] = json!(t0.elapsed().as_secs_f64());
    Ok(v)
}

fn dir_bytes(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| dir_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// A writable clone of the snapshot, attached; PostgreSQL started on it
/// when it holds one. Nothing is copied.
pub fn restore_clone(
    ctx: &Ctx,
    snapshot: &str,
    name: &str,
    port: u16,
    mount: Option<PathBuf>,
) -> Result<Value> {
    restore_clone_with(ctx, snapshot, name, port, mount, &mut NoRecovery)
}

/// What a restore does to a started copy beyond starting it: replaying
/// archived logs onto it (a point-in-time restore).
pub trait Recover {
    /// After the copy is made ready, before PostgreSQL starts.
    fn pg_before_start(&mut self, _r: &pg::Running) -> Result<()> {
        Ok(())
    }
    /// Once the server answers; what it adds to the result.
    fn pg_started(&mut self, _r: &pg::Running) -> Result<Value> {
        Ok(Value::Null)
    }
    fn maria_started(&mut self, _r: &maria::Running) -> Result<Value> {
        Ok(Value::Null)
    }
}

struct NoRecovery;
impl Recover for NoRecovery {}

/// [`restore_clone`], `rec` run on the started copy.
pub fn restore_clone_with(
    ctx: &Ctx,
    snapshot: &str,
    name: &str,
    port: u16,
    mount: Option<PathBuf>,
    rec: &mut dyn Recover,
) -> Result<Value> {
    let t0 = Instant::now();
    let (vol, id) = parse_snapshot(snapshot)?;
    check_name(name)?;
    ctx.api.create_clone(&vol, id, name)?;
    let clone_secs = t0.elapsed().as_secs_f64();
    let undo_clone = |e: Error| {
        let _ = ctx.api.delete_clone(name, true);
        e
    };
    let mount = mount.unwrap_or_else(|| ctx.state_dir.join("mnt").join(name));
    let (mut a, mut child) = attach::attach(
        ctx,
        &AttachRequest {
            name: name.to_string(),
            export: name.to_string(),
            writable: true,
            mount,
            mkfs: None,
        },
    )
    .map_err(undo_clone)?;
    a.clone = Some(name.to_string());
    let attach_secs = t0.elapsed().as_secs_f64();
    let r = (|| -> Result<Value> {
        let mut v = json!({
            "kind": "clone",
            "snapshot": snapshot,
            "clone": name,
            "mount": a.mount,
            "bytes_copied": 0,
            "clone_seconds": clone_secs,
            "attach_seconds": attach_secs,
        });
        if a.mount.join(maria::DATADIR).exists() {
            let r = maria::ready_copy(&a.mount, port)?;
            a.mariadb = Some(r.clone());
            attach::save(ctx, &a)?;
            let ready = maria::start(&r)?;
            v["mariadb_start_seconds"] = json!(ready.as_secs_f64());
            let x = rec.maria_started(&r)?;
            if !x.is_null() {
                v["recovery"] = x;
            }
            v["mariadb"] = json!(r);
            v["seconds_to_first_query"] = json!(t0.elapsed().as_secs_f64());
        } else if a.mount.join("pgdata").exists() {
            let r = pg::prepare(&a.mount, port, name)?;
            a.postgres = Some(r.clone());
            attach::save(ctx, &a)?;
            rec.pg_before_start(&r)?;
            let ready = pg::start(&r)?;
            v["postgres_start_seconds"] = json!(ready.as_secs_f64());
            let x = rec.pg_started(&r)?;
            if !x.is_null() {
                v["recovery"] = x;
            }
            v["postgres"] = json!(r);
            v["seconds_to_first_query"] = json!(t0.elapsed().as_secs_f64());
        } else {
            attach::save(ctx, &a)?;
        }
        Ok(v)
    })();
    match r {
        Ok(mut v) => {
            v["seconds"] = json!(t0.elapsed().as_secs_f64());
            Ok(v)
        }
        Err(e) => {
            if let Some(p) = &a.postgres {
                let _ = pg::stop(p);
            }
            if let Some(m) = &a.mariadb {
                let _ = maria::stop(m);
            }
            let _ = attach::detach(ctx, &a, child.as_mut());
            Err(undo_clone(e))
        }
    }
}

/// Stops what runs on an attachment, detaches it, deletes its clone if
/// asked.
pub fn detach(ctx: &Ctx, name: &str, delete_clone: bool) -> Result<Value> {
    let a = attach::record(ctx, name).ok_or_else(|| crate::err!(Host, "{name} is not attached"))?;
    if let Some(p) = &a.postgres {
        pg::stop(p)?;
    }
    if let Some(m) = &a.mariadb {
        maria::stop(m)?;
    }
    attach::detach(ctx, &a, None)?;
    let mut deleted = None;
    if delete_clone {
        if let Some(c) = &a.clone {
            ctx.api.delete_clone(c, false)?;
            deleted = Some(c.clone());
        }
    }
    Ok(json!({"detached": name, "deleted_clone": deleted}))
}

/// Prints a result: one JSON object, or `key: value` lines.
pub fn print(json_out: bool, v: &Value, took: Duration) {
    if json_out {
        println!("{v}");
        return;
    }
    // The regrouped VM tree, as a tree.
    if let (Some(Value::Array(groups)), Some(by)) =
        (v.get("groups"), v.get("by").and_then(Value::as_str))
    {
        fn show(g: &Value, depth: usize) {
            let name = g["name"].as_str().unwrap_or("");
            let vms: Vec<&str> = g["vms"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let pad = "  ".repeat(depth);
            if vms.is_empty() {
                println!("{pad}{name}");
            } else {
                println!("{pad}{name}: {}", vms.join(", "));
            }
            for sub in g["groups"].as_array().into_iter().flatten() {
                show(sub, depth + 1);
            }
        }
        println!("VMs by {by}:");
        for g in groups {
            show(g, 1);
        }
        return;
    }
    if let Value::Array(items) = v {
        if items.is_empty() {
            println!("(none)");
        }
        for (i, x) in items.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print(false, x, took);
        }
        return;
    }
    fn line(prefix: &str, v: &Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if k == "backup_label" {
                        continue;
                    }
                    line(&p, x);
                }
            }
            Value::Array(a) if a.iter().all(|x| x.is_object()) && !a.is_empty() => {
                for (i, x) in a.iter().enumerate() {
                    line(&format!("{prefix}[{i}]"), x);
                }
            }
            Value::Null => {}
            Value::String(s) => println!("{prefix}: {s}"),
            x => println!("{prefix}: {x}"),
        }
    }
    line("", v);
    if v.is_object() && v.get("seconds").is_none() {
        println!("seconds: {:.2}", took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdm_common::size::parse_nonzero as parse_size;

    #[test]
    fn sizes_names_snapshots() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        for bad in ["", "0", "x", "5Q", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(check_name("db-1.stage_2").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a@b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_snapshot("db@12").unwrap(), ("db".into(), 12));
        assert!(parse_snapshot("db").is_err());
        assert!(parse_snapshot("db@x").is_err());
        assert!(parse_snapshot("../x@1").is_err());
    }
}
