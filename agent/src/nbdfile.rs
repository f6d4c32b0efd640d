//! An NBD export as one file, `DIR/disk`, through FUSE: the agent's way to
//! give the host a block device on a machine without the kernel's NBD
//! client (a loop device goes on top of the file). Each of a few worker
//! threads owns one NBD connection (the appliance advertises
//! CAN_MULTI_CONN, so a flush on one covers the writes completed on all).
//! The file is opened with direct I/O: what the loop device reads is what
//! the appliance holds, with no second page cache in between.
//!
//! Faults: when a connection breaks (appliance gone, network down, no
//! answer within the timeout) the disk goes *failed* — every later request
//! gets EIO. It never reconnects by itself: writes the appliance had not
//! made durable may be lost with it, and a filesystem must not carry on as
//! if nothing happened. Errors the server reports (ENOSPC, EIO…) pass
//! through as they are.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
};
use nbd_proto::client::{Client, ClientError, ClientOptions};

const ROOT: u64 = 1;
const DISK: u64 = 2;
pub const DISK_NAME: &str = "disk";
const TTL: Duration = Duration::from_secs(3600);

type Job = Box<dyn FnOnce(&mut Client) + Send>;

pub struct NbdFile {
    size: u64,
    read_only: bool,
    work: Sender<Job>,
    failed: Arc<AtomicBool>,
    started: SystemTime,
}

/// Opens `connections` connections to `export` at `addr`.
pub fn connect(
    addr: &str,
    export: &str,
    connections: usize,
    timeout: Duration,
) -> Result<Vec<Client>, ClientError> {
    let opts = ClientOptions {
        allocation: false,
        timeout: Some(timeout),
        ..Default::default()
    };
    (0..connections.max(1))
        .map(|_| Client::connect(addr, Some(export), &opts))
        .collect()
}

/// errno for a failed request; marks the disk failed when the connection
/// itself is gone.
fn errno(e: &ClientError, failed: &AtomicBool) -> i32 {
    match e {
        ClientError::Errno { errno, .. } => match *errno as i32 {
            0 => libc::EIO,
            n => n,
        },
        other => {
            if !failed.swap(true, Ordering::SeqCst) {
                tracing::error!(error = %other, "NBD connection lost: the disk fails every request from now on");
            }
            libc::EIO
        }
    }
}

/// Serves the clients at `dir` until the file system is unmounted; then
/// flushes and disconnects. An error if the mount fails or the final flush
/// does.
pub fn serve(clients: Vec<Client>, dir: &Path) -> anyhow::Result<()> {
    let size = clients.first().map(|c| c.size).unwrap_or(0);
    let read_only = clients.first().map(|c| c.read_only()).unwrap_or(true);
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let rx = rx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("nbd-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => break,
                        };
                        match job {
                            Ok(j) => j(&mut c),
                            Err(_) => break,
                        }
                    }
                    c
                })?,
        );
    }
    cdm_recovery::fuse::clear_stale(dir);
    std::fs::create_dir_all(dir)?;
    let fs = NbdFile {
        size,
        read_only,
        work: tx,
        failed: failed.clone(),
        started: SystemTime::now(),
    };
    let mut opts = vec![
        MountOption::FSName("cdm".into()),
        MountOption::Subtype("cdm-agent".into()),
        MountOption::CUSTOM("max_read=1048576".into()),
    ];
    if read_only {
        opts.push(MountOption::RO);
    }
    // Blocks until unmounted (fusermount -u, umount, or detach).
    fuser::mount2(fs, dir, &opts)?;
    // The FUSE session dropped its Sender: workers end and hand back their
    // connections.
    let mut clients = Vec::new();
    for h in handles {
        if let Ok(c) = h.join() {
            clients.push(c);
        }
    }
    if failed.load(Ordering::SeqCst) {
        anyhow::bail!("the NBD connection was lost while attached");
    }
    if let Some(c) = clients.first_mut() {
        if !read_only {
            c.flush()?;
        }
    }
    for c in clients {
        let _ = c.disconnect();
    }
    Ok(())
}

impl NbdFile {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            ROOT => (FileType::Directory, 0, 0o755, 2),
            DISK => (
                FileType::RegularFile,
                self.size,
                if self.read_only { 0o400 } else { 0o600 },
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        })
    }

    /// Runs `f` on a worker's connection, unless the disk has failed.
    fn submit<R: 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, ClientError> + Send + 'static,
        done: impl FnOnce(Result<R, i32>) + Send + 'static,
    ) {
        if self.failed.load(Ordering::SeqCst) {
            return done(Err(libc::EIO));
        }
        let failed = self.failed.clone();
        let job: Job = Box::new(move |c| {
            if failed.load(Ordering::SeqCst) {
                return done(Err(libc::EIO));
            }
            done(f(c).map_err(|e| errno(&e, &failed)))
        });
        if let Err(e) = self.work.send(job) {
            // Workers are gone (only at teardown): answer here.
            let job = e.0;
            drop(job);
        }
    }
}

impl Filesystem for NbdFile {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (ROOT, Some(DISK_NAME)) => reply.entry(&TTL, &self.attr(DISK).expect("disk"), 0),
            _ => reply.error(libc::ENOENT),
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
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let all = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (k, t, n)) in all.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*k, (i + 1) as i64, *t, n) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != DISK {
            return reply.error(libc::EISDIR);
        }
        if self.read_only && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != DISK {
            return reply.error(libc::EISDIR);
        }
        let off = offset.max(0) as u64;
        let n = (size as u64).min(self.size.saturating_sub(off)) as usize;
        if n == 0 {
            return reply.data(&[]);
        }
        self.submit(
            move |c| {
                let mut buf = vec![0u8; n];
                c.read(off, &mut buf).map(|_| buf)
            },
            move |r| match r {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _wflags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != DISK || self.read_only {
            return reply.error(libc::EROFS);
        }
        let off = offset.max(0) as u64;
        if off.saturating_add(data.len() as u64) > self.size {
            return reply.error(libc::ENOSPC);
        }
        let data = data.to_vec();
        self.submit(
            move |c| {
                let n = data.len() as u32;
                c.write(off, &data, false).map(|_| n)
            },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            },
        );
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // A loop device turns discards into hole punches: trim them on the
        // appliance, which frees the space.
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if ino != DISK || self.read_only {
            return reply.error(libc::EROFS);
        }
        let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(PUNCH | libc::FALLOC_FL_ZERO_RANGE) != 0
            || (mode & PUNCH != PUNCH && !zero && mode != 0)
        {
            return reply.error(libc::EOPNOTSUPP);
        }
        if mode == 0 {
            // Preallocation of an already fixed-size file.
            return if off.saturating_add(len) <= self.size {
                reply.ok()
            } else {
                reply.error(libc::ENOSPC)
            };
        }
        let len = len.min(self.size.saturating_sub(off));
        if len == 0 {
            return reply.ok();
        }
        self.submit(
            move |c| {
                if zero {
                    c.write_zeroes(off, len, 0)
                } else {
                    c.trim(off, len)
                }
            },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.read_only {
            return reply.ok();
        }
        self.submit(
            |c| c.flush(),
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
        );
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(self.size / 4096, 0, 0, 1, 0, 4096, 255, 4096)
    }
}
