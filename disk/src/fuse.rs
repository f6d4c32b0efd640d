//! Disks as files through FUSE: one server for every "disk as a file"
//! view. A [`Catalog`] describes a small tree of directories and disk
//! files (it names the inodes; the root is [`ROOT`]); each open file is a
//! [`DiskFile`]. The appliance's pool view (`volumes/NAME/disk`,
//! `snapshots/VOL/ID/disk`) and the agent's NBD attachment (`DIR/disk`)
//! are two catalogs served by it.
//!
//! Reads, writes, fsync and hole punches run on a pool of worker threads
//! (the FUSE session thread only reads `/dev/fuse` and dispatches, so one
//! slow request does not hold up the others, and as many requests are in
//! flight as there are workers); requests are up to 1 MiB; fsync calls
//! [`DiskFile::flush`]. A file that can start reads and writes without
//! blocking ([`DiskFile::start_read`], [`DiskFile::start_write`]: the
//! agent's NBD file) takes them straight from the session thread and
//! answers from its own, with no worker in between. Asynchronous direct I/O is negotiated (a loop
//! device in direct-I/O mode keeps many requests in flight) with the
//! kernel's background limit sized to the workers.
//!
//! One thread reads `/dev/fuse`: fuser 0.15 has no multi-threaded session
//! (a `FUSE_DEV_IOC_CLONE`d channel needs a session that saw INIT, which
//! fuser keeps private) and no FUSE-over-io_uring; reading and dispatching
//! a request is a few microseconds against the NBD round trip the worker
//! then waits for.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
};

/// The root directory's inode number (FUSE's fixed root id).
pub const ROOT: u64 = fuser::FUSE_ROOT_ID;

/// An errno value (`libc::EIO`, …), passed to the kernel as it is.
pub type Errno = i32;

/// Largest read or write request (and the kernel's readahead per request).
const MAX_IO: u32 = 1 << 20;

/// Where a read started with [`DiskFile::start_read`] answers (the data,
/// short only at the end of the disk).
pub type ReadDone = Box<dyn FnOnce(Result<Vec<u8>, Errno>) + Send>;
/// Where a write started with [`DiskFile::start_write`] answers.
pub type WriteDone = Box<dyn FnOnce(Result<(), Errno>) + Send>;

/// A disk seen as one fixed-size file. Calls come from several worker
/// threads at once.
pub trait DiskFile: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes, hole punches and opens for writing are refused
    /// (EROFS).
    fn read_only(&self) -> bool;
    /// Reads at `off` into `buf`; the number of bytes read, short only at
    /// the end of the disk.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, Errno>;
    /// Writes all of `data` at `off`.
    fn write_at(&self, data: &[u8], off: u64) -> Result<(), Errno>;
    /// Makes completed writes durable (what fsync asks for).
    fn flush(&self) -> Result<(), Errno>;
    /// Whether the file takes fallocate (hole punch, zero range,
    /// preallocation within its size). When not, fallocate answers ENOSYS
    /// and the kernel stops asking this mount.
    fn can_punch(&self) -> bool {
        false
    }
    /// Frees `[off, off + len)` (reads return zeroes afterwards).
    fn punch(&self, _off: u64, _len: u64) -> Result<(), Errno> {
        Err(libc::EOPNOTSUPP)
    }
    /// Writes zeroes over `[off, off + len)`.
    fn zero(&self, _off: u64, _len: u64) -> Result<(), Errno> {
        Err(libc::EOPNOTSUPP)
    }
    /// Starts a read of `len` bytes at `off` without blocking; `done`
    /// answers from any thread. Called on the FUSE session thread, so it
    /// must not wait: a file that cannot start one hands `done` back
    /// (`Err`) and the read runs on a worker with [`DiskFile::read_at`].
    fn start_read(&self, _off: u64, _len: usize, done: ReadDone) -> Result<(), ReadDone> {
        Err(done)
    }
    /// Starts a write like [`DiskFile::start_read`] (`data` is copied
    /// before it returns); `Err` hands `done` back for a worker.
    fn start_write(&self, _data: &[u8], _off: u64, done: WriteDone) -> Result<(), WriteDone> {
        Err(done)
    }
}

/// A node of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// What `stat` shows of a node: directories are 0755, files 0600 or (read
/// only) 0400, all owned by root; the one time is atime, mtime and ctime.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub read_only: bool,
    pub time: SystemTime,
}

/// One entry of a directory.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// What `statfs` answers (counts in `bsize` blocks).
#[derive(Clone, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The tree a mount serves. Called from the FUSE session thread only.
pub trait Catalog: Send + 'static {
    /// A node's attributes; `None` if there is no such node (ENOENT).
    fn attr(&self, ino: u64) -> Option<Attr>;
    /// A directory's entries (without `.` and `..`); `None` if `dir` is
    /// not a directory (ENOTDIR).
    fn list(&self, dir: u64) -> Option<Vec<DirEntry>>;
    /// The node called `name` in `dir`.
    fn lookup(&self, dir: u64, name: &OsStr) -> Option<Attr> {
        self.list(dir)?
            .into_iter()
            .find(|e| OsStr::new(&e.name) == name)
            .and_then(|e| self.attr(e.ino))
    }
    /// Opens a disk file (EISDIR for anything else).
    fn open(&self, ino: u64) -> Result<Arc<dyn DiskFile>, Errno>;
    fn statfs(&self) -> Result<StatFs, Errno>;
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mount's subtype (`fuse.SUBTYPE`); the source is always `cdm`.
    pub subtype: String,
    /// I/O worker threads.
    pub workers: usize,
    /// How long the kernel may cache attributes and names.
    pub ttl: Duration,
    /// Mount read-only.
    pub read_only: bool,
    /// Let other users in (`allow_other`), with the kernel checking the
    /// files' permissions (`default_permissions`).
    pub allow_other: bool,
    /// Open files with `FOPEN_DIRECT_IO`: no page cache in this process's
    /// view, every read reaches the disk.
    pub direct_io: bool,
    /// The mount's read_ahead_kb (`None`: the kernel's default).
    pub readahead_kb: Option<u32>,
    /// `st_blksize` of every node.
    pub block_size: u32,
}

/// A mount served in the background; unmounts when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    workers: Vec<JoinHandle<()>>,
    pub dir: PathBuf,
}

impl Mounted {
    /// Unmounts and waits for the session and its workers to end.
    pub fn unmount(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(s) = self.session.take() {
            s.join();
        }
        // The session's end dropped the work queue: the workers finish
        // what they hold and stop.
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.end();
    }
}

/// Mounts `catalog` at `dir` (an absolute path; created if missing, a
/// stale mount left there by a dead process detached first) and serves it
/// in the background.
pub fn mount<C: Catalog>(catalog: C, dir: &Path, opts: &Options) -> io::Result<Mounted> {
    let (fs, workers) = prepare(catalog, dir, opts)?;
    let session = fuser::spawn_mount2(fs, dir, &mount_options(opts))?;
    if let Some(kb) = opts.readahead_kb {
        set_readahead(dir, kb);
    }
    Ok(Mounted {
        session: Some(session),
        workers,
        dir: dir.to_path_buf(),
    })
}

/// Mounts `catalog` at `dir` like [`mount`] and serves it on this thread
/// until the file system is unmounted (fusermount -u, umount, a detach);
/// returns once every request has been answered.
pub fn serve<C: Catalog>(catalog: C, dir: &Path, opts: &Options) -> io::Result<()> {
    let (fs, workers) = prepare(catalog, dir, opts)?;
    let mut session = fuser::Session::new(fs, dir, &mount_options(opts))?;
    if let Some(kb) = opts.readahead_kb {
        // Stat'ing the mount needs the session loop running.
        let dir = dir.to_path_buf();
        std::thread::spawn(move || set_readahead(&dir, kb));
    }
    let r = session.run();
    // Dropping the session drops the work queue: the workers end.
    drop(session);
    for w in workers {
        let _ = w.join();
    }
    r
}

fn prepare<C: Catalog>(
    catalog: C,
    dir: &Path,
    opts: &Options,
) -> io::Result<(Server<C>, Vec<JoinHandle<()>>)> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for i in 0..opts.workers.max(1) {
        let rx = rx.clone();
        workers.push(
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
                })?,
        );
    }
    clear_stale(dir);
    std::fs::create_dir_all(dir)?;
    let fs = Server {
        catalog,
        work: tx,
        files: HashMap::new(),
        next_fh: 1,
        ttl: opts.ttl,
        direct_io: opts.direct_io,
        block_size: opts.block_size,
        workers: opts.workers.max(1),
    };
    Ok((fs, workers))
}

fn mount_options(opts: &Options) -> Vec<MountOption> {
    let mut v = vec![
        MountOption::FSName("cdm".into()),
        MountOption::Subtype(opts.subtype.clone()),
    ];
    if opts.allow_other {
        v.push(MountOption::DefaultPermissions);
        v.push(MountOption::AllowOther);
    }
    v.push(MountOption::CUSTOM(format!("max_read={MAX_IO}")));
    if opts.read_only {
        v.push(MountOption::RO);
    }
    v
}

/// A mount left by a process that died (SIGKILL, crash) answers every
/// access with ENOTCONN and blocks a new mount there: detach it.
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

/// A catalog of one disk file, `NAME`, in the root directory.
pub struct OneFile {
    name: String,
    file: Arc<dyn DiskFile>,
    time: SystemTime,
}

const ONE_FILE: u64 = ROOT + 1;

impl OneFile {
    /// `time`: the file's and the directory's times.
    pub fn new(name: &str, file: Arc<dyn DiskFile>, time: SystemTime) -> Self {
        OneFile {
            name: name.to_string(),
            file,
            time,
        }
    }
}

impl Catalog for OneFile {
    fn attr(&self, ino: u64) -> Option<Attr> {
        let (kind, size) = match ino {
            ROOT => (Kind::Dir, 0),
            ONE_FILE => (Kind::File, self.file.size()),
            _ => return None,
        };
        Some(Attr {
            ino,
            kind,
            size,
            read_only: self.file.read_only(),
            time: self.time,
        })
    }

    fn list(&self, dir: u64) -> Option<Vec<DirEntry>> {
        (dir == ROOT).then(|| {
            vec![DirEntry {
                ino: ONE_FILE,
                name: self.name.clone(),
                kind: Kind::File,
            }]
        })
    }

    fn open(&self, ino: u64) -> Result<Arc<dyn DiskFile>, Errno> {
        match ino {
            ONE_FILE => Ok(self.file.clone()),
            _ => Err(libc::EISDIR),
        }
    }

    /// The disk's size, nothing free: the file cannot grow.
    fn statfs(&self) -> Result<StatFs, Errno> {
        Ok(StatFs {
            blocks: self.file.size() / 4096,
            bfree: 0,
            bavail: 0,
            files: 1,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The FUSE file system over a catalog.
struct Server<C> {
    catalog: C,
    work: Sender<Job>,
    /// Open files by handle.
    files: HashMap<u64, Arc<dyn DiskFile>>,
    next_fh: u64,
    ttl: Duration,
    direct_io: bool,
    block_size: u32,
    workers: usize,
}

/// The kernel's max_background and congestion_threshold for `workers`
/// worker threads: twice the workers in flight (so a worker finds the next
/// request queued when it answers one), congestion at three quarters.
fn background_limits(workers: usize) -> (u16, u16) {
    let bg = (workers.max(1) * 2).clamp(16, 1024) as u16;
    (bg, bg / 4 * 3)
}

impl<C: Catalog> Server<C> {
    fn file_attr(&self, a: &Attr) -> FileAttr {
        let (kind, perm, nlink) = match a.kind {
            Kind::Dir => (FileType::Directory, 0o755, 2),
            Kind::File if a.read_only => (FileType::RegularFile, 0o400, 1),
            Kind::File => (FileType::RegularFile, 0o600, 1),
        };
        FileAttr {
            ino: a.ino,
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.time,
            mtime: a.time,
            ctime: a.time,
            crtime: a.time,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.block_size,
            flags: 0,
        }
    }

    /// Runs `job` on a worker. Should the workers be gone (only at
    /// teardown), the job is dropped and with it its reply, which answers
    /// EIO.
    fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.work.send(Box::new(job));
    }
}

fn type_of(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

impl<C: Catalog> Filesystem for Server<C> {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Direct I/O submitted asynchronously (a loop device in direct-I/O
        // mode, fio with libaio): without it the kernel sends one request
        // of a file at a time and waits for each answer.
        if config
            .add_capabilities(fuser::consts::FUSE_ASYNC_DIO)
            .is_err()
        {
            tracing::warn!(
                "the kernel's FUSE has no asynchronous direct I/O: one request at a time"
            );
        }
        // Asynchronous requests (readahead, async direct I/O) beyond
        // max_background wait in the kernel: allow as many as the workers
        // can take, and some queued behind them.
        let (bg, congested) = background_limits(self.workers);
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold(congested);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.catalog.lookup(parent, name) {
            Some(a) => reply.entry(&self.ttl, &self.file_attr(&a), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.catalog.attr(ino) {
            Some(a) => reply.attr(&self.ttl, &self.file_attr(&a)),
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
        let Some(kids) = self.catalog.list(ino) else {
            return reply.error(libc::ENOTDIR);
        };
        let dot = |ino, name: &str| DirEntry {
            ino,
            name: name.into(),
            kind: Kind::Dir,
        };
        let all = [dot(ino, "."), dot(ROOT, "..")].into_iter().chain(kids);
        for (i, e) in all.enumerate().skip(offset.max(0) as usize) {
            if reply.add(e.ino, (i + 1) as i64, type_of(e.kind), e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let file = match self.catalog.open(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if file.read_only() && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(fh, file);
        let how = if self.direct_io {
            fuser::consts::FOPEN_DIRECT_IO
        } else {
            0
        };
        reply.opened(fh, how);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(&fh);
        reply.ok();
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(f) = self.files.get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        let off = offset.max(0) as u64;
        let done: ReadDone = Box::new(move |r| match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        });
        // Handed on without a thread switch when the file can; else on a
        // worker.
        if let Err(done) = f.start_read(off, size as usize, done) {
            self.submit(move || {
                let mut buf = vec![0u8; size as usize];
                done(f.read_at(&mut buf, off).map(|n| {
                    buf.truncate(n);
                    buf
                }))
            });
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.files.get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        if f.read_only() {
            return reply.error(libc::EROFS);
        }
        let off = offset.max(0) as u64;
        let n = data.len() as u32;
        let done: WriteDone = Box::new(move |r| match r {
            Ok(()) => reply.written(n),
            Err(e) => reply.error(e),
        });
        if let Err(done) = f.start_write(data, off, done) {
            let data = data.to_vec();
            self.submit(move || done(f.write_at(&data, off)));
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // A loop device turns discards into hole punches (and
        // write-zeroes into zero ranges).
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let Some(f) = self.files.get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        if !f.can_punch() {
            return reply.error(libc::ENOSYS);
        }
        if f.read_only() {
            return reply.error(libc::EROFS);
        }
        let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(PUNCH | libc::FALLOC_FL_ZERO_RANGE) != 0
            || (mode & PUNCH != PUNCH && !zero && mode != 0)
        {
            return reply.error(libc::EOPNOTSUPP);
        }
        let size = f.size();
        if mode == 0 {
            // Preallocation of an already fixed-size file.
            return if off.saturating_add(len) <= size {
                reply.ok()
            } else {
                reply.error(libc::ENOSPC)
            };
        }
        let len = len.min(size.saturating_sub(off));
        if len == 0 {
            return reply.ok();
        }
        self.submit(move || {
            let r = if zero {
                f.zero(off, len)
            } else {
                f.punch(off, len)
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.files.get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        self.submit(move || match f.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    /// close(): nothing to do; durability is fsync's job.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        match self.catalog.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(u64, bool);

    impl DiskFile for Mem {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, Errno> {
            let n = (buf.len() as u64).min(self.0.saturating_sub(off)) as usize;
            buf[..n].fill(0);
            Ok(n)
        }
        fn write_at(&self, _data: &[u8], _off: u64) -> Result<(), Errno> {
            Ok(())
        }
        fn flush(&self) -> Result<(), Errno> {
            Ok(())
        }
    }

    #[test]
    fn one_file_tree() {
        let c = OneFile::new("disk", Arc::new(Mem(1 << 20, true)), SystemTime::UNIX_EPOCH);
        let root = c.attr(ROOT).expect("root");
        assert_eq!((root.kind, root.size), (Kind::Dir, 0));
        let f = c.lookup(ROOT, OsStr::new("disk")).expect("disk");
        assert_eq!((f.kind, f.size, f.read_only), (Kind::File, 1 << 20, true));
        assert!(c.lookup(ROOT, OsStr::new("other")).is_none());
        assert!(c.list(f.ino).is_none());
        assert_eq!(c.open(ROOT).err(), Some(libc::EISDIR));
        assert!(c.open(f.ino).is_ok());
        let s = c.statfs().expect("statfs");
        assert_eq!((s.blocks, s.bfree, s.files), (256, 0, 1));
    }

    #[test]
    fn background_limits_follow_the_workers() {
        assert_eq!(background_limits(0), (16, 12));
        assert_eq!(background_limits(32), (64, 48));
        assert_eq!(background_limits(100_000), (1024, 768));
    }

    #[test]
    fn options_become_mount_flags() {
        let mut o = Options {
            subtype: "x".into(),
            workers: 1,
            ttl: Duration::from_secs(1),
            read_only: false,
            allow_other: false,
            direct_io: false,
            readahead_kb: None,
            block_size: 4096,
        };
        let has = |o: &Options, m: MountOption| mount_options(o).contains(&m);
        assert!(!has(&o, MountOption::RO) && !has(&o, MountOption::AllowOther));
        assert!(has(&o, MountOption::CUSTOM("max_read=1048576".into())));
        o.read_only = true;
        o.allow_other = true;
        assert!(has(&o, MountOption::RO) && has(&o, MountOption::AllowOther));
        assert!(has(&o, MountOption::DefaultPermissions));
    }
}
