//! The pool as files: `volumes/NAME/disk` (read-write) and
//! `snapshots/VOLUME/ID/disk` (read-only), for loop devices, instant
//! mounts and tools that want a file. Reads and writes run on a pool of
//! worker threads (the FUSE session thread only dispatches), requests are
//! up to 1 MiB, and fsync commits the pool.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cdmfs::{Pool, Target};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
};

const ROOT: u64 = 1;
const VOLUMES: u64 = 2;
const SNAPSHOTS: u64 = 3;
const KIND_SHIFT: u64 = 56;
const VOL_DIR: u64 = 1;
const VOL_DISK: u64 = 2;
const SNAPVOL_DIR: u64 = 3;
const SNAP_DIR: u64 = 4;
const SNAP_DISK: u64 = 5;
/// Attributes may change (volumes grow, snapshots come and go): cache briefly.
const TTL: Duration = Duration::from_secs(1);

fn ino(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | id
}
fn split(ino: u64) -> (u64, u64) {
    (ino >> KIND_SHIFT, ino & ((1 << KIND_SHIFT) - 1))
}
fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

type Job = Box<dyn FnOnce() + Send>;

/// The filesystem. Mount it with [`mount`].
pub struct PoolFs {
    pool: Arc<Pool>,
    work: Sender<Job>,
}

/// A mounted view; unmounts when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    pub dir: std::path::PathBuf,
}

impl Mounted {
    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) {
        if let Some(s) = self.session.take() {
            s.join();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            s.join();
        }
    }
}

/// Mounts the view of `pool` at `dir` (an absolute path; created if
/// missing, a stale view left there by a dead process detached first) with
/// `threads` I/O workers.
pub fn mount(pool: Arc<Pool>, dir: &Path, threads: usize) -> std::io::Result<Mounted> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads.max(1) {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("fuse-io-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(j) => j(),
                    Err(_) => return,
                }
            })?;
    }
    clear_stale(dir);
    std::fs::create_dir_all(dir)?;
    let fs = PoolFs { pool, work: tx };
    let opts = [
        MountOption::FSName("cdm".into()),
        MountOption::Subtype("cdm".into()),
        MountOption::DefaultPermissions,
        MountOption::AllowOther,
        MountOption::CUSTOM("max_read=1048576".into()),
    ];
    let session = fuser::spawn_mount2(fs, dir, &opts)?;
    set_readahead(dir, READAHEAD_KB);
    Ok(Mounted {
        session: Some(session),
        dir: dir.to_path_buf(),
    })
}

/// A view left mounted by a process that died (SIGKILL, crash) answers
/// every access with ENOTCONN and blocks a new mount there: detach it.
pub fn clear_stale(dir: &Path) {
    let p = dir.to_string_lossy();
    let ours = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(4) == Some(&&*p) && l.contains(" - fuse cdm ")
            })
        })
        .unwrap_or(false);
    if ours {
        tracing::warn!(dir = %p, "detaching a FUSE view left by an earlier process");
        if let Ok(c) = std::ffi::CString::new(p.as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Readahead for the view's files. The kernel gives a FUSE mount 128 KiB,
/// which caps buffered sequential reads (dd, cp, a loop device) at about a
/// third of what NBD reaches; 4 MiB lets them match it
/// (docs/benchmarks.md).
const READAHEAD_KB: u32 = 4096;

/// Sets the read_ahead_kb of the backing device of the mount at `dir`
/// (best effort: logged if /sys is read-only).
pub fn set_readahead(dir: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dir) else {
        return;
    };
    let dev = m.dev();
    let p = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&p, kb.to_string()) {
        tracing::warn!(path = %p, error = %e, "cannot raise FUSE readahead; sequential reads will be slower");
    }
}

impl PoolFs {
    fn dir_attr(&self, ino: u64, ns: u64) -> FileAttr {
        FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: time(ns),
            mtime: time(ns),
            ctime: time(ns),
            crtime: time(ns),
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, size: u64, ns: u64, writable: bool, allocated: u64) -> FileAttr {
        FileAttr {
            kind: FileType::RegularFile,
            perm: if writable { 0o600 } else { 0o400 },
            nlink: 1,
            size,
            blocks: allocated.div_ceil(512),
            ..self.dir_attr(ino, ns)
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (vols, snaps) = self.pool.catalog().ok()?;
        let (kind, id) = split(ino);
        match (kind, ino) {
            (0, ROOT | VOLUMES | SNAPSHOTS) => Some(self.dir_attr(ino, 0)),
            (VOL_DIR, _) | (SNAPVOL_DIR, _) => vols
                .iter()
                .find(|v| v.id == id)
                .map(|v| self.dir_attr(ino, v.created_ns)),
            (VOL_DISK, _) => vols
                .iter()
                .find(|v| v.id == id)
                .map(|v| self.file_attr(ino, v.size, v.created_ns, true, v.size)),
            (SNAP_DIR, _) => snaps
                .iter()
                .find(|s| s.id == id)
                .map(|s| self.dir_attr(ino, s.created_ns)),
            (SNAP_DISK, _) => snaps
                .iter()
                .find(|s| s.id == id)
                .map(|s| self.file_attr(ino, s.size, s.created_ns, false, s.size)),
            _ => None,
        }
    }

    /// (inode, name, is_dir) of a directory's children.
    fn children(&self, ino: u64) -> Option<Vec<(u64, String, bool)>> {
        let (vols, snaps) = self.pool.catalog().ok()?;
        let (kind, id) = split(ino);
        Some(match (kind, ino) {
            (0, ROOT) => vec![
                (VOLUMES, "volumes".into(), true),
                (SNAPSHOTS, "snapshots".into(), true),
            ],
            (0, VOLUMES) => vols
                .iter()
                .map(|v| (ino_of(VOL_DIR, v.id), v.name.clone(), true))
                .collect(),
            (0, SNAPSHOTS) => vols
                .iter()
                .filter(|v| snaps.iter().any(|s| s.volume_id == v.id))
                .map(|v| (ino_of(SNAPVOL_DIR, v.id), v.name.clone(), true))
                .collect(),
            (VOL_DIR, _) => vec![(ino_of(VOL_DISK, id), "disk".into(), false)],
            (SNAPVOL_DIR, _) => snaps
                .iter()
                .filter(|s| s.volume_id == id)
                .map(|s| (ino_of(SNAP_DIR, s.id), s.id.to_string(), true))
                .collect(),
            (SNAP_DIR, _) => vec![(ino_of(SNAP_DISK, id), "disk".into(), false)],
            _ => return None,
        })
    }

    fn target(ino: u64) -> Option<(Target, bool)> {
        match split(ino) {
            (VOL_DISK, id) => Some((Target::Volume(id), true)),
            (SNAP_DISK, id) => Some((Target::Snapshot(id), false)),
            _ => None,
        }
    }
}

fn ino_of(kind: u64, id: u64) -> u64 {
    ino(kind, id)
}

impl Filesystem for PoolFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(kids) = self.children(parent) else {
            return reply.error(libc::ENOENT);
        };
        let found = kids
            .into_iter()
            .find(|(_, n, _)| OsStr::new(n) == name)
            .and_then(|(i, _, _)| self.attr(i));
        match found {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(kids) = self.children(ino) else {
            return reply.error(libc::ENOTDIR);
        };
        let mut all = vec![(ino, ".".to_string(), true), (ROOT, "..".to_string(), true)];
        all.extend(kids);
        for (i, (k, name, dir)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            let t = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(k, (i + 1) as i64, t, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match Self::target(ino) {
            Some((_, false)) if flags & libc::O_ACCMODE != libc::O_RDONLY => {
                reply.error(libc::EROFS)
            }
            Some(_) => reply.opened(0, 0),
            None => reply.error(libc::EISDIR),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((t, _)) = Self::target(ino) else {
            return reply.error(libc::EISDIR);
        };
        let pool = self.pool.clone();
        let _ = self.work.send(Box::new(move || {
            let r = pool.geometry(t).and_then(|(len, _)| {
                let off = offset.max(0) as u64;
                let n = (size as u64).min(len.saturating_sub(off)) as usize;
                let mut buf = vec![0u8; n];
                pool.read(t, off, &mut buf).map(|_| buf)
            });
            match r {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e.errno()),
            }
        }));
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some((Target::Volume(v), true)) = Self::target(ino) else {
            return reply.error(libc::EROFS);
        };
        let pool = self.pool.clone();
        let data = data.to_vec();
        let _ = self.work.send(Box::new(move || {
            match pool.write(v, offset.max(0) as u64, &data) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e.errno()),
            }
        }));
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let pool = self.pool.clone();
        let _ = self.work.send(Box::new(move || match pool.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }));
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        match self.pool.space() {
            Ok(s) => {
                let free = s.free_bytes / 4096;
                reply.statfs(s.total_bytes / 4096, free, free, 0, 0, 4096, 255, 4096)
            }
            Err(e) => reply.error(e.errno()),
        }
    }
}
