//! An NBD export as one file, `DIR/disk`, through FUSE: the agent's way to
//! give the host a block device on a machine without the kernel's NBD
//! client (a loop device goes on top of the file). A one-file catalog
//! served by `cdm_disk::fuse`, with one worker thread per NBD connection
//! and each connection used by one request at a time (the appliance
//! advertises CAN_MULTI_CONN, so a flush on one covers the writes
//! completed on all). The file is opened with direct I/O: what the loop
//! device reads is what the appliance holds, with no second page cache in
//! between.
//!
//! Faults: when a connection breaks (appliance gone, network down, no
//! answer within the timeout) the disk goes *failed* — every later request
//! gets EIO. It never reconnects by itself: writes the appliance had not
//! made durable may be lost with it, and a filesystem must not carry on as
//! if nothing happened. Errors the server reports (ENOSPC, EIO…) pass
//! through as they are.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime};

use crate::error::Result;
use cdm_disk::fuse::{self, DiskFile, Errno, OneFile};
use nbd_proto::client::{Client, ClientError, ClientOptions};

pub const DISK_NAME: &str = "disk";
const TTL: Duration = Duration::from_secs(3600);

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

/// Serves the clients at `dir` until the file system is unmounted; then
/// flushes and disconnects. An error if the mount fails or the final flush
/// does.
pub fn serve(clients: Vec<Client>, dir: &Path) -> Result<()> {
    let workers = clients.len();
    let disk = Arc::new(NbdDisk::new(clients));
    let opts = fuse::Options {
        subtype: "cdm-agent".into(),
        workers,
        ttl: TTL,
        read_only: disk.read_only,
        allow_other: false,
        direct_io: true,
        readahead_kb: None,
        block_size: 65536,
    };
    let file = OneFile::new(DISK_NAME, disk.clone(), SystemTime::now());
    // Blocks until unmounted (fusermount -u, umount, or detach), and
    // until every request taken has been answered.
    fuse::serve(file, dir, &opts)?;
    if disk.failed.load(Ordering::SeqCst) {
        crate::fail!(Host, "the NBD connection was lost while attached");
    }
    disk.close()?;
    Ok(())
}

/// The export behind its connections. A request takes a free connection
/// (there are as many as worker threads, so one is free), or `None` once
/// closed.
struct NbdDisk {
    size: u64,
    read_only: bool,
    conns: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
    failed: AtomicBool,
}

impl NbdDisk {
    fn new(clients: Vec<Client>) -> Self {
        NbdDisk {
            size: clients.first().map(|c| c.size).unwrap_or(0),
            read_only: clients.first().map(|c| c.read_only()).unwrap_or(true),
            conns: clients.into_iter().map(|c| Mutex::new(Some(c))).collect(),
            next: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// A connection no other request is using, if there is one; else
    /// waits for one.
    fn take(&self) -> Option<MutexGuard<'_, Option<Client>>> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match self.conns[(start + i) % n].try_lock() {
                Ok(g) => return Some(g),
                // A request panicked holding it: the client is still whole
                // or broken, and a broken one fails the disk below.
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let m = self.conns.get(start % n.max(1))?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` on a connection, unless the disk has failed.
    fn call<R>(&self, f: impl FnOnce(&mut Client) -> Result<R, ClientError>) -> Result<R, Errno> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        let mut guard = self.take().ok_or(libc::EIO)?;
        // It may have failed while we waited for the connection.
        if self.failed.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        let c = guard.as_mut().ok_or(libc::EIO)?;
        f(c).map_err(|e| errno(&e, &self.failed))
    }

    /// After the unmount: flushes (a writable disk) and disconnects every
    /// connection.
    fn close(&self) -> Result<(), ClientError> {
        let mut clients: Vec<Client> = self
            .conns
            .iter()
            .filter_map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).take())
            .collect();
        if let Some(c) = clients.first_mut() {
            if !self.read_only {
                c.flush()?;
            }
        }
        for c in clients {
            let _ = c.disconnect();
        }
        Ok(())
    }
}

/// errno for a failed request; marks the disk failed when the connection
/// itself is gone.
fn errno(e: &ClientError, failed: &AtomicBool) -> Errno {
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

impl DiskFile for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, Errno> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(off)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.call(|c| c.read(off, &mut buf[..n]))?;
        Ok(n)
    }

    fn write_at(&self, data: &[u8], off: u64) -> Result<(), Errno> {
        if off.saturating_add(data.len() as u64) > self.size {
            return Err(libc::ENOSPC);
        }
        self.call(|c| c.write(off, data, false))
    }

    fn flush(&self) -> Result<(), Errno> {
        if self.read_only {
            return Ok(());
        }
        self.call(|c| c.flush())
    }

    /// A loop device turns discards into hole punches: trim them on the
    /// appliance, which frees the space.
    fn can_punch(&self) -> bool {
        true
    }

    fn punch(&self, off: u64, len: u64) -> Result<(), Errno> {
        self.call(|c| c.trim(off, len))
    }

    fn zero(&self, off: u64, len: u64) -> Result<(), Errno> {
        self.call(|c| c.write_zeroes(off, len, 0))
    }
}
