//! Recovery on the appliance: instant mounts (FUSE file → loop device →
//! kernel mount) and file-level restore (a snapshot's ext4, XFS or NTFS
//! read in process). The FUSE view itself is `cdm_recovery::fuse`, mounted by
//! `main` with `--mount DIR`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use cdm_disk::browse::{self as disk_browse, BrowseError as DiskError};
use cdm_disk::host::{self, is_mounted};
use cdm_recovery::browse::{self, BrowseError};
use cdmfs::{Pool, Target};
use serde_json::json;

use crate::appliance::{engine, Appliance};
use crate::error::Error;
use crate::state::{State, Sync, MOUNTS};

/// Where the FUSE view is and where instant mounts go.
pub struct Mounts {
    pub fuse: PathBuf,
    pub root: PathBuf,
    /// Serializes mount changes (losetup/mount are not atomic).
    lock: Mutex<()>,
}

pub fn browse_err(e: impl Into<BrowseError>) -> ApiError {
    match e.into() {
        BrowseError::Disk(DiskError::NotFound(m)) => ApiError::not_found(m),
        BrowseError::Disk(DiskError::Invalid(m)) => ApiError::bad_request(m),
        BrowseError::Disk(DiskError::Unreadable(m)) => ApiError::new(422, "unreadable", m),
        BrowseError::Engine(e) => engine(e),
    }
}

fn to_entry(e: disk_browse::Entry) -> FileEntry {
    FileEntry {
        name: e.name,
        path: e.path,
        kind: e.kind,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        target: e.target,
    }
}

/// Parses `VOLUME@ID`.
fn parse_source(s: &str) -> ApiResult<(String, u64)> {
    let (v, id) = s
        .split_once('@')
        .ok_or_else(|| ApiError::bad_request(format!("snapshot {s:?} must be VOLUME@ID")))?;
    let id = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("snapshot id {id:?} is not a number")))?;
    Ok((v.to_string(), id))
}

impl Mounts {
    pub fn new(fuse: PathBuf, root: PathBuf) -> Mounts {
        Mounts {
            fuse,
            root,
            lock: Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        cdm_common::lock::lock(&self.lock)
    }

    /// Loop device + kernel mount of `m` (its FUSE file); fills device and fstype.
    fn attach(&self, pool: &Pool, m: &mut Mount) -> crate::error::Result<()> {
        let (vol, id) = parse_source(&m.snapshot)?;
        let (file, target) = match &m.clone {
            Some(c) => {
                let vid = pool.volume_id(c)?;
                (
                    self.fuse.join("volumes").join(c).join("disk"),
                    Target::Volume(vid),
                )
            }
            None => (
                self.fuse
                    .join("snapshots")
                    .join(&vol)
                    .join(id.to_string())
                    .join("disk"),
                Target::Snapshot(id),
            ),
        };
        let range = self.range(pool, target, m.partition)?;
        let dev = host::loop_attach(&file, !m.writable, range)?;
        let detach = |why: String| {
            host::loop_detach_if_ours(&dev, &self.fuse);
            Error::NoFilesystem(why)
        };
        let fstype = host::fs_type(&dev)
            .ok_or_else(|| detach(format!("no filesystem found on {} (blkid)", m.snapshot)))?;
        host::mount(&dev, &fstype, m.writable, Path::new(&m.path))
            .map_err(|e| detach(e.to_string()))?;
        m.device = dev;
        m.fstype = fstype;
        m.state = "mounted".into();
        m.message = None;
        Ok(())
    }

    /// Byte range of the partition to mount: `None` = the whole disk.
    fn range(
        &self,
        pool: &Pool,
        target: Target,
        partition: Option<u32>,
    ) -> crate::error::Result<Option<(u64, u64)>> {
        if partition == Some(0) {
            return Ok(None);
        }
        let parts = partition_table(pool, target)?;
        match partition {
            None => Ok(parts.first().map(|p| (p.start, p.size))),
            Some(n) => parts
                .iter()
                .find(|p| p.number == n)
                .map(|p| Some((p.start, p.size)))
                .ok_or_else(|| Error::Failed(format!("partition {n} not found"))),
        }
    }

    fn detach(&self, m: &Mount) -> crate::error::Result<()> {
        let path = Path::new(&m.path);
        host::unmount(path)?;
        host::loop_detach_if_ours(&m.device, &self.fuse);
        let _ = std::fs::remove_dir(path);
        Ok(())
    }

    /// At start: mounts recorded before a restart are mounted again, or
    /// reported failed with the reason — never left looking mounted.
    pub fn restore(&self, pool: &Pool, state: &State) {
        let _g = self.guard();
        let recs: Vec<Mount> = state.all(MOUNTS).unwrap_or_default();
        for mut m in recs {
            let _ = self.detach(&m);
            if let Err(why) = self.attach(pool, &mut m) {
                tracing::warn!(mount = %m.name, %why, "mount not re-established");
                m.state = "failed".into();
                m.message = Some(format!("not re-established after restart: {why}"));
                m.device.clear();
            }
            let _ = state.put(MOUNTS, m.name.as_str(), &m, Sync::Now);
        }
    }

    /// At shutdown: unmount everything (records stay, for [`Mounts::restore`]).
    pub fn unmount_all(&self, state: &State) {
        let _g = self.guard();
        for m in state.all::<Mount>(MOUNTS).unwrap_or_default() {
            if let Err(e) = self.detach(&m) {
                tracing::warn!(mount = %m.name, error = %e, "cannot unmount");
            }
        }
    }
}

/// The partition table of a target as the API shows it (one reader:
/// `cdm_recovery::browse::partitions`).
pub fn partition_table(pool: &Pool, target: Target) -> ApiResult<Vec<PartitionInfo>> {
    Ok(browse::partitions(pool, target)
        .map_err(browse_err)?
        .into_iter()
        .map(|p| PartitionInfo {
            number: p.number,
            start: p.start,
            size: p.len,
            kind: p.kind,
            bootable: p.bootable,
        })
        .collect())
}

/// Writes to the download channel in 1 MiB pieces; fails once the client
/// has gone.
struct ChanWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChanWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            self.tx
                .blocking_send(Ok(b))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        }
        Ok(())
    }
}

impl Appliance {
    fn mounts(&self) -> ApiResult<&Mounts> {
        self.mounts.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "instant mounts need the FUSE view: start snapshotd with --mount DIR",
            )
        })
    }

    fn snapshot_target(&self, volume: &str, id: u64) -> ApiResult<Target> {
        let s = self.pool.snapshot(id).map_err(engine)?;
        if s.volume != volume {
            return Err(ApiError::not_found(format!(
                "snapshot {id} of volume {volume} not found"
            )));
        }
        // Say why a sealed point cannot be mounted or browsed before
        // trying to (409 `key_required`, not a failed read).
        let what = format!("snapshot {volume}@{id}");
        crate::replication::keys::require_key(s.seal.as_ref(), s.seal_key_loaded, &what)?;
        Ok(Target::Snapshot(id))
    }

    pub fn mount_create(&self, c: &Caller, req: MountCreate) -> ApiResult<Mount> {
        let mounts = self.mounts()?;
        let (vol, id) = parse_source(&req.snapshot)?;
        self.snapshot_target(&vol, id)?;
        let name = match (&req.clone, req.writable) {
            (Some(n), true) => n.clone(),
            (Some(_), false) => {
                return Err(ApiError::bad_request("clone is only for writable mounts"))
            }
            (None, true) => format!("{vol}-{id}-rw"),
            (None, false) => format!("{vol}-{id}-ro"),
        };
        cdm_api::routes::check_name("mount", &name)?;
        let _g = mounts.guard();
        if self
            .state
            .get::<_, Mount>(MOUNTS, name.as_str())
            .map_err(crate::appliance::st)?
            .is_some()
        {
            return Err(ApiError::conflict(format!("mount {name} exists")));
        }
        let mut m = Mount {
            name: name.clone(),
            snapshot: format!("{vol}@{id}"),
            clone: None,
            writable: req.writable,
            partition: req.partition,
            path: mounts.root.join(&name).to_string_lossy().into_owned(),
            device: String::new(),
            fstype: String::new(),
            state: "mounting".into(),
            message: None,
            created_unix: self.clock.now(),
        };
        if req.writable {
            self.pool.clone_snapshot(id, &name).map_err(engine)?;
            self.pool.flush().map_err(engine)?;
            self.events.emit(
                "clone.created",
                &name,
                &c.user,
                json!({"origin": m.snapshot, "for": "mount"}),
            );
            m.clone = Some(name.clone());
        }
        if let Err(why) = mounts.attach(&self.pool, &mut m) {
            if let Some(cl) = &m.clone {
                let _ = self.pool.delete_volume(cl, true);
                let _ = self.pool.flush();
            }
            return Err(ApiError::new(422, "mount_failed", why.to_string()));
        }
        self.state
            .put(MOUNTS, name.as_str(), &m, Sync::Now)
            .map_err(crate::appliance::st)?;
        self.events.emit(
            "mount.created",
            &name,
            &c.user,
            json!({"snapshot": m.snapshot, "writable": m.writable, "path": m.path, "fstype": m.fstype}),
        );
        Ok(m)
    }

    pub fn mount_list(&self) -> ApiResult<Vec<Mount>> {
        let mut v: Vec<Mount> = self.state.all(MOUNTS).map_err(crate::appliance::st)?;
        for m in &mut v {
            if m.state == "mounted" && !is_mounted(Path::new(&m.path)) {
                m.state = "gone".into();
                m.message = Some("not mounted any more (unmounted outside the appliance?)".into());
            }
        }
        Ok(v)
    }

    pub fn mount_delete(&self, c: &Caller, name: &str, delete_clone: bool) -> ApiResult<()> {
        let m: Mount = self
            .state
            .get(MOUNTS, name)
            .map_err(crate::appliance::st)?
            .ok_or_else(|| ApiError::not_found(format!("mount {name} not found")))?;
        if let Some(mounts) = self.mounts.as_ref() {
            let _g = mounts.guard();
            mounts
                .detach(&m)
                .map_err(|e| ApiError::conflict(format!("cannot unmount {name}: {e}")))?;
        }
        self.state
            .remove(MOUNTS, name)
            .map_err(crate::appliance::st)?;
        self.events.emit(
            "mount.deleted",
            name,
            &c.user,
            json!({"delete_clone": delete_clone}),
        );
        if let (true, Some(cl)) = (delete_clone, &m.clone) {
            self.remove_volume(&c.user, cl, true, "clone")?;
        }
        Ok(())
    }

    /// Mounts using a volume (its clone) or one of its snapshots.
    pub fn mounts_of(&self, volume: &str, snapshot: Option<u64>) -> Vec<String> {
        self.state
            .all::<Mount>(MOUNTS)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| match snapshot {
                Some(id) => m.snapshot == format!("{volume}@{id}") && !m.writable,
                None => {
                    m.clone.as_deref() == Some(volume)
                        || m.snapshot.starts_with(&format!("{volume}@")) && !m.writable
                }
            })
            .map(|m| m.name)
            .collect()
    }

    pub fn files_partitions(&self, volume: &str, id: u64) -> ApiResult<Vec<PartitionInfo>> {
        let t = self.snapshot_target(volume, id)?;
        partition_table(&self.pool, t)
    }

    pub fn files_list(&self, volume: &str, id: u64, q: FilesQuery) -> ApiResult<Vec<FileEntry>> {
        let t = self.snapshot_target(volume, id)?;
        let fs = browse::open(&self.pool, t, q.partition).map_err(browse_err)?;
        let limit = q.limit.unwrap_or(10_000).min(100_000);
        Ok(
            disk_browse::list(&*fs, &q.path, q.offset.unwrap_or(0), limit)
                .map_err(browse_err)?
                .into_iter()
                .map(to_entry)
                .collect(),
        )
    }

    pub fn files_stat(&self, volume: &str, id: u64, q: FilesQuery) -> ApiResult<FileEntry> {
        let t = self.snapshot_target(volume, id)?;
        let fs = browse::open(&self.pool, t, q.partition).map_err(browse_err)?;
        disk_browse::stat(&*fs, &q.path)
            .map(to_entry)
            .map_err(browse_err)
    }

    pub fn files_download(
        &self,
        volume: &str,
        id: u64,
        q: FilesQuery,
        tar: bool,
    ) -> ApiResult<Download> {
        let t = self.snapshot_target(volume, id)?;
        let pool = self.pool.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (first_tx, first_rx) = std::sync::mpsc::channel::<ApiResult<Option<u64>>>();
        let name = q
            .path
            .rsplit('/')
            .find(|s| !s.is_empty())
            .unwrap_or("root")
            .to_string();
        std::thread::Builder::new()
            .name("file-restore".into())
            .spawn(move || {
                let fs = match browse::open(&pool, t, q.partition) {
                    Ok(fs) => fs,
                    Err(e) => {
                        let _ = first_tx.send(Err(browse_err(e)));
                        return;
                    }
                };
                let mut w = ChanWriter {
                    tx: tx.clone(),
                    buf: Vec::new(),
                };
                let r = if tar {
                    match disk_browse::stat(&*fs, &q.path) {
                        Ok(_) => {
                            let _ = first_tx.send(Ok(None));
                            disk_browse::tar_tree(&*fs, &q.path, &mut w).map(|_| ())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    let ft = first_tx.clone();
                    disk_browse::copy_file(
                        &*fs,
                        &q.path,
                        &mut |n| {
                            let _ = ft.send(Ok(Some(n)));
                        },
                        &mut w,
                    )
                    .map(|_| ())
                };
                let r = r.and_then(|_| {
                    std::io::Write::flush(&mut w).map_err(|e| DiskError::Unreadable(e.to_string()))
                });
                if let Err(e) = r {
                    // Before the first byte: an ordinary error answer;
                    // after it: abort the stream.
                    let msg = e.to_string();
                    let _ = first_tx.send(Err(browse_err(e)));
                    let _ = tx.blocking_send(Err(msg));
                }
            })
            .map_err(|e| ApiError::internal(format!("cannot start the restore: {e}")))?;
        let size = first_rx
            .recv()
            .map_err(|_| ApiError::internal("the restore ended before it started"))??;
        Ok(Download {
            size,
            name: if tar { format!("{name}.tar") } else { name },
            chunks: rx,
        })
    }
}
