//! An NBD export as one file, `DIR/disk`, through FUSE: the agent's way to
//! give the host a block device on a machine without the kernel's NBD
//! client (a loop device goes on top of the file). A one-file catalog
//! served by `cdm_disk::fuse` through the pipelined NBD client
//! ([`nbd_proto::Pipelined`]): reads and writes are sent straight from the
//! FUSE session thread and answered from the connections' reader threads
//! (no worker, no limit but the kernel's on requests in flight); flush,
//! trim and zeroing run on the worker threads. Requests are spread over
//! several connections (the appliance advertises CAN_MULTI_CONN; the
//! client's flush waits for the writes issued before it, so an fsync
//! covers every write it follows).
//! The file is opened with direct I/O: what the loop device reads is what
//! the appliance holds, with no second page cache in between.
//!
//! Faults: when a connection breaks (appliance gone, network down, no
//! answer within the timeout) the disk goes *failed* — every later request
//! gets EIO. It never reconnects by itself: writes the appliance had not
//! made durable may be lost with it, and a filesystem must not carry on as
//! if nothing happened. Errors the server reports (ENOSPC, EIO…) pass
//! through as they are.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use cdm_disk::fuse::{self, DiskFile, Errno, OneFile, ReadDone, WriteDone};
use nbd_proto::client::{ClientError, ClientOptions};
use nbd_proto::Pipelined;

pub const DISK_NAME: &str = "disk";
const TTL: Duration = Duration::from_secs(3600);

/// Opens up to `connections` pipelined connections to `export` at `addr`
/// (one if the server does not advertise CAN_MULTI_CONN); with `tls`,
/// STARTTLS on each (TCP) connection against that pinned CA.
pub fn connect(
    addr: &str,
    export: &str,
    connections: usize,
    timeout: Duration,
    tls: Option<nbd_proto::ClientTls>,
) -> Result<Pipelined, ClientError> {
    let opts = ClientOptions {
        allocation: false,
        timeout: Some(timeout),
        tls,
        ..Default::default()
    };
    Pipelined::connect(addr, Some(export), &opts, connections)
}

/// Serves the export at `dir` (reads and writes straight from the FUSE
/// session thread, flushes, trims and zeroing on `workers` threads) until
/// the file system is unmounted; then flushes and disconnects. An error if
/// the mount fails or the final flush does.
pub fn serve(client: Pipelined, dir: &Path, workers: usize) -> Result<()> {
    tracing::info!(
        connections = client.connections(),
        workers,
        "serving the NBD export as a FUSE file"
    );
    let disk = Arc::new(NbdDisk::new(client));
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
    if !disk.read_only {
        disk.client.flush()?;
    }
    Ok(())
}

/// The export behind its pipelined connections.
struct NbdDisk {
    size: u64,
    read_only: bool,
    client: Pipelined,
    failed: Arc<AtomicBool>,
}

impl NbdDisk {
    fn new(client: Pipelined) -> Self {
        NbdDisk {
            size: client.size,
            read_only: client.read_only(),
            client,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `f` on the client, unless the disk has failed.
    fn call<R>(&self, f: impl FnOnce(&Pipelined) -> Result<R, ClientError>) -> Result<R, Errno> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        f(&self.client).map_err(|e| errno(&e, &self.failed))
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

    /// Sent from the FUSE session thread; the answer comes back on the
    /// connection's reader thread.
    fn start_read(&self, off: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        if self.failed.load(Ordering::SeqCst) {
            done(Err(libc::EIO));
            return Ok(());
        }
        let n = (len as u64).min(self.size.saturating_sub(off)) as usize;
        if n == 0 {
            done(Ok(Vec::new()));
            return Ok(());
        }
        if n > self.client.max_payload() {
            return Err(done);
        }
        let failed = self.failed.clone();
        self.client
            .start_read(off, n, move |r| done(r.map_err(|e| errno(&e, &failed))));
        Ok(())
    }

    fn start_write(&self, data: &[u8], off: u64, done: WriteDone) -> Result<(), WriteDone> {
        if self.failed.load(Ordering::SeqCst) {
            done(Err(libc::EIO));
            return Ok(());
        }
        if off.saturating_add(data.len() as u64) > self.size {
            done(Err(libc::ENOSPC));
            return Ok(());
        }
        if data.len() > self.client.max_payload() {
            return Err(done);
        }
        let failed = self.failed.clone();
        self.client.start_write(off, data, false, move |r| {
            done(r.map_err(|e| errno(&e, &failed)))
        });
        Ok(())
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
