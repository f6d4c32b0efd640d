//! VM restore: a point's disks written back from the appliance as image
//! files (raw or qcow2, sparse) or onto a block device. Each disk's
//! snapshot is read over NBD (`VOLUME@SNAPSHOT`), only the extents its
//! `base:allocation` marks allocated, by several connections at once;
//! holes are never read, and never written to a file (they stay holes).
//! qcow2 images are written by `crate::qcow2` and checked by `qemu-img
//! check`. A file is written under a temporary name, its data synced, and renamed
//! last, so a failed restore leaves no half image under the final name.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cdm_api::vm_recovery::{choose, VmPoint, VmPointDisk};
use serde_json::{json, Value};

use crate::error::{Context as _, Error, ErrorKind, Result};
use crate::Ctx;

/// Largest piece of an extent one connection reads at a time: big enough
/// for the link, small enough that the connections share a large extent.
const CHUNK: u64 = 4 << 20;
/// A file restore leaves all-zero runs of this size unwritten (holes).
const ZERO_GRAIN: usize = 64 << 10;
/// Connections to the appliance (and to `qemu-nbd`) by default.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// The image format of a restored disk file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => crate::fail!(Invalid, "format {s:?}: use raw or qcow2"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Where the disks go.
pub enum Target {
    /// Image files `DIR/VM-diskN.{raw,qcow2}`.
    Dir { dir: PathBuf, format: Format },
    /// One disk onto a block device, written whole.
    Device(PathBuf),
}

/// What `cdm-agent vm restore` was asked.
pub struct Restore<'a> {
    pub vm: &'a str,
    pub target: Target,
    /// A point's run id, or any of its disks' snapshot ids; the newest
    /// complete point when `None`.
    pub point: Option<&'a str>,
    pub disk: Option<usize>,
    /// Replace existing image files.
    pub force: bool,
    pub connections: usize,
}

/// Refuses a restore directory that someone else could redirect (we run as
/// root and write where the request says): one that is a symbolic link,
/// that is reached through a link not owned by root, or (once `made`) that
/// is not a directory or is world-writable. The images inside are then
/// created with O_EXCL and renamed within it, so no link is followed.
fn check_dir(dir: &Path, made: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::path::absolute(dir).map_err(crate::error::io_at(dir))?;
    let n = abs.components().count();
    let mut p = PathBuf::new();
    for (i, c) in abs.components().enumerate() {
        p.push(c);
        // What does not exist yet is made by us, below what did.
        let Ok(m) = p.symlink_metadata() else { break };
        let last = i + 1 == n;
        if m.file_type().is_symlink() && (last || m.uid() != 0) {
            crate::fail!(
                Invalid,
                "restore directory {}: {} is a symbolic link{}; nothing restored",
                dir.display(),
                p.display(),
                if last { "" } else { " not owned by root" }
            );
        }
        if last && made {
            if !m.is_dir() {
                crate::fail!(
                    Invalid,
                    "restore directory {} is not a directory; nothing restored",
                    dir.display()
                );
            }
            if m.mode() & 0o002 != 0 {
                crate::fail!(
                    Invalid,
                    "restore directory {} is world-writable: anyone could replace the images in it; nothing restored",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Restores the disks of a VM's point; the JSON result names each disk's
/// file or device with its bytes read and written and the throughput.
pub fn restore_cmd(ctx: &Ctx, r: &Restore<'_>) -> Result<Value> {
    let t0 = Instant::now();
    let points = ctx
        .api
        .vm_points(r.vm)
        .context_with(ErrorKind::Host, || format!("the points of VM {}", r.vm))?;
    let p = choose(&points, r.point)
        .map_err(|e| crate::err!(Invalid, "VM {}: {e}; nothing restored", r.vm))?;
    let disks = pick_disks(p, r.disk)?;
    let conns = r.connections.clamp(1, 16);
    let mut out = Vec::new();
    match &r.target {
        Target::Dir { dir, format } => {
            check_dir(dir, false)?;
            std::fs::create_dir_all(dir).map_err(crate::error::io_at(dir))?;
            // Again now it exists: it may have been swapped meanwhile.
            check_dir(dir, true)?;
            let plans: Vec<(&VmPointDisk, PathBuf)> = disks
                .iter()
                .map(|d| (*d, dir.join(file_name(r.vm, d.disk, *format))))
                .collect();
            // Every refusal before the first byte is written.
            if !r.force {
                if let Some((_, p)) = plans.iter().find(|(_, p)| p.symlink_metadata().is_ok()) {
                    crate::fail!(
                        Invalid,
                        "{} exists: nothing restored (--force replaces it)",
                        p.display()
                    );
                }
            }
            for (d, path) in plans {
                out.push(restore_to_file(ctx, d, &path, *format, conns)?);
            }
        }
        Target::Device(dev) => {
            let [d] = disks.as_slice() else {
                crate::fail!(
                    Invalid,
                    "point {} of VM {} has {} disks: name the one to write onto {} with --disk N",
                    p.point,
                    r.vm,
                    disks.len(),
                    dev.display()
                );
            };
            out.push(restore_to_device(ctx, d, dev, conns)?);
        }
    }
    let sum = |k: &str| out.iter().filter_map(|v| v[k].as_u64()).sum::<u64>();
    let (read, written, size) = (sum("bytes_read"), sum("bytes_written"), sum("size"));
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({
        "vm": r.vm,
        "point": p.point,
        "created": p.created,
        "disks": out,
        "size": size,
        "bytes_read": read,
        "bytes_written": written,
        "seconds": secs,
        "mb_per_s": mb_per_s(read, secs),
    }))
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// The point's disks, or only disk `want`.
fn pick_disks(p: &VmPoint, want: Option<usize>) -> Result<Vec<&VmPointDisk>> {
    match want {
        None => Ok(p.disks.iter().collect()),
        Some(n) => match p.disks.iter().find(|d| d.disk == n) {
            Some(d) => Ok(vec![d]),
            None => crate::fail!(
                Invalid,
                "point {} of VM {} has no disk {n} (its disks: {:?})",
                p.point,
                p.vm,
                p.disks.iter().map(|d| d.disk).collect::<Vec<_>>()
            ),
        },
    }
}

/// `VM-diskN.EXT`: the VM's name as it is when it is a plain file name,
/// else cleaned with a hash of the real one (two VMs never share a file).
pub fn file_name(vm: &str, disk: usize, f: Format) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-+".contains(c);
    let stem = if !vm.is_empty() && !vm.starts_with('.') && vm.len() <= 200 && vm.chars().all(ok) {
        vm.to_string()
    } else {
        let clean: String = vm
            .chars()
            .map(|c| if ok(c) { c } else { '-' })
            .take(120)
            .collect();
        let h = blake3::hash(vm.as_bytes()).to_hex();
        format!("{}-{}", clean.trim_start_matches('.'), &h[..8])
    };
    format!("{stem}-disk{disk}.{}", f.name())
}

/// A disk's snapshot as read: its export, size and the allocated extents
/// cut into pieces of at most [`CHUNK`]; and the holes.
struct Plan {
    export: String,
    size: u64,
    chunks: Vec<(u64, u64)>,
    holes: Vec<(u64, u64)>,
}

impl Plan {
    /// With `align` > 1 (qcow2 clusters), each allocated extent is widened
    /// to whole units (clamped to the disk's end), so a piece never
    /// shares a unit with another piece.
    fn of(ctx: &Ctx, d: &VmPointDisk, align: u64) -> Result<Plan> {
        let export = format!("{}@{}", d.volume, d.snapshot);
        let c = crate::ops::connect_export(ctx, &export, true)
            .context_with(ErrorKind::Host, || {
                format!("disk {} ({export}) over NBD {}", d.disk, ctx.nbd)
            })?;
        let mut src = crate::block::Source::Nbd { c, bitmap: None };
        // The export is the stage volume, whose size is rounded up to its
        // block; the disk's own size is in the snapshot's metadata.
        let meta = ctx
            .api
            .snapshot(&d.volume, d.snapshot)
            .context_with(ErrorKind::Host, || format!("snapshot {export}"))?;
        let size = match meta.metadata["size"].as_u64() {
            Some(s) if s <= src.size() => s,
            _ => src.size(),
        };
        // qcow2 sizes are whole 512-byte sectors (as qemu-img rounds).
        let size = if align > 1 {
            size.div_ceil(512) * 512
        } else {
            size
        };
        let (mut extents, mut holes): (Vec<(u64, u64)>, _) = (Vec::new(), Vec::new());
        for (off, len, allocated) in src.allocation()? {
            let len = len.min(size.saturating_sub(off));
            if len == 0 {
                continue;
            }
            if !allocated {
                holes.push((off, len));
                continue;
            }
            let start = off / align * align;
            let end = (off + len).div_ceil(align).saturating_mul(align).min(size);
            match extents.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => extents.push((start, end)),
            }
        }
        let mut chunks = Vec::new();
        for (start, end) in extents {
            let mut o = start;
            while o < end {
                let n = CHUNK.min(end - o);
                chunks.push((o, n));
                o += n;
            }
        }
        Ok(Plan {
            export,
            size,
            chunks,
            holes,
        })
    }

    fn allocated(&self) -> u64 {
        self.chunks.iter().map(|c| c.1).sum()
    }
}

/// Where one connection's data goes.
trait Sink: Send {
    /// Writes `data` at `off`; the bytes actually written.
    fn put(&mut self, off: u64, data: &[u8]) -> Result<u64>;
    /// Everything written is durable where it went (or handed on to what
    /// makes it so).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// A file or device written with pwrite; zero runs skipped for files.
struct FileSink<'a> {
    f: &'a File,
    skip_zeros: bool,
}

impl Sink for FileSink<'_> {
    fn put(&mut self, off: u64, data: &[u8]) -> Result<u64> {
        if !self.skip_zeros {
            self.f.write_all_at(data, off)?;
            return Ok(data.len() as u64);
        }
        nonzero_runs(data, |at, run| {
            self.f.write_all_at(run, off + at as u64)?;
            Ok(())
        })
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// The qcow2 image being written (`crate::qcow2`).
struct Qcow2Sink<'a>(&'a crate::qcow2::Writer<'a>);

impl Sink for Qcow2Sink<'_> {
    fn put(&mut self, off: u64, data: &[u8]) -> Result<u64> {
        Ok(self.0.put(off, data, is_zero)?)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Calls `put(offset, run)` for each run of `data` that is not all zeros
/// (in [`ZERO_GRAIN`] steps); the bytes it was given.
fn nonzero_runs(data: &[u8], mut put: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<u64> {
    let mut written = 0u64;
    let mut start: Option<usize> = None;
    let mut at = 0;
    while at < data.len() {
        let end = (at + ZERO_GRAIN).min(data.len());
        if is_zero(&data[at..end]) {
            if let Some(s) = start.take() {
                put(s, &data[s..at])?;
                written += (at - s) as u64;
            }
        } else if start.is_none() {
            start = Some(at);
        }
        at = end;
    }
    if let Some(s) = start {
        put(s, &data[s..])?;
        written += (data.len() - s) as u64;
    }
    Ok(written)
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; align_to splits off the unaligned
    // ends.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Copies the plan's chunks: one appliance connection per sink, each
/// taking the next chunk until none is left; the bytes read and written.
fn copy(ctx: &Ctx, plan: &Plan, sinks: Vec<Box<dyn Sink + '_>>, what: &str) -> Result<(u64, u64)> {
    let mut sources = Vec::new();
    for _ in 0..sinks.len() {
        sources.push(
            crate::ops::connect_export(ctx, &plan.export, false)
                .context_with(ErrorKind::Host, || {
                    format!("{} over NBD {}", plan.export, ctx.nbd)
                })?,
        );
    }
    let pb = crate::ops::bar(ctx, plan.allocated(), what);
    let next = AtomicUsize::new(0);
    let (read, written) = (AtomicU64::new(0), AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for (mut src, mut sink) in sources.into_iter().zip(sinks) {
            let (next, read, written, stop, first_err, pb) =
                (&next, &read, &written, &stop, &first_err, pb.as_ref());
            s.spawn(move || {
                let mut buf = vec![0u8; CHUNK as usize];
                let r = (|| -> Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(&(off, len)) =
                            plan.chunks.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            break;
                        };
                        let b = &mut buf[..len as usize];
                        src.read(off, b).context_with(ErrorKind::Host, || {
                            format!("reading {} at {off}", plan.export)
                        })?;
                        read.fetch_add(len, Ordering::Relaxed);
                        written.fetch_add(sink.put(off, b)?, Ordering::Relaxed);
                        if let Some(pb) = pb {
                            pb.inc(len);
                        }
                    }
                    sink.finish()
                })();
                let _ = src.disconnect();
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    if let Ok(mut f) = first_err.lock() {
                        f.get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok((read.into_inner(), written.into_inner()))
}

/// A temporary file removed unless it was renamed to its final name.
struct Partial {
    tmp: PathBuf,
    done: bool,
}

impl Partial {
    fn new(path: &Path) -> Partial {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Partial {
            tmp: path.with_file_name(format!(".{name}.partial-{}", std::process::id())),
            done: false,
        }
    }

    /// Syncs the file's data, renames it to `path`, syncs the directory.
    fn commit(mut self, path: &Path) -> Result<()> {
        File::open(&self.tmp)
            .and_then(|f| f.sync_data())
            .map_err(crate::error::io_at(&self.tmp))?;
        std::fs::rename(&self.tmp, path).map_err(crate::error::io_at(path))?;
        self.done = true;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(crate::error::io_at(dir))?;
        }
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// One disk into an image file at `path`.
fn restore_to_file(
    ctx: &Ctx,
    d: &VmPointDisk,
    path: &Path,
    format: Format,
    conns: usize,
) -> Result<Value> {
    let t = Instant::now();
    let align = match format {
        Format::Raw => 1,
        Format::Qcow2 => crate::qcow2::CLUSTER,
    };
    let plan = Plan::of(ctx, d, align)?;
    let part = Partial::new(path);
    let _ = std::fs::remove_file(&part.tmp);
    let what = format!("disk {}", d.disk);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part.tmp)
        .map_err(crate::error::io_at(&part.tmp))?;
    let (read, written) = match format {
        Format::Raw => {
            f.set_len(plan.size)
                .map_err(crate::error::io_at(&part.tmp))?;
            let sinks = (0..conns)
                .map(|_| {
                    Box::new(FileSink {
                        f: &f,
                        skip_zeros: true,
                    }) as Box<dyn Sink + '_>
                })
                .collect();
            copy(ctx, &plan, sinks, &what)?
        }
        Format::Qcow2 => {
            let w = crate::qcow2::Writer::new(&f, plan.size);
            let sinks = (0..conns)
                .map(|_| Box::new(Qcow2Sink(&w)) as Box<dyn Sink + '_>)
                .collect();
            let r = copy(ctx, &plan, sinks, &what)?;
            w.finish().map_err(crate::error::io_at(&part.tmp))?;
            qemu_img(&[
                "check".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                part.tmp.as_os_str(),
            ])
            .context_with(ErrorKind::Host, || {
                format!("the restored {} is not clean", path.display())
            })?;
            r
        }
    };
    part.commit(path)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({
        "disk": d.disk,
        "volume": d.volume,
        "snapshot": d.snapshot,
        "path": path,
        "format": format.name(),
        "size": plan.size,
        "allocated": plan.allocated(),
        "bytes_read": read,
        "bytes_written": written,
        "seconds": secs,
        "mb_per_s": mb_per_s(read, secs),
    }))
}

/// Runs `qemu-img` with `args`; its stderr is the error.
fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context_with(ErrorKind::Host, || {
            "cannot run qemu-img (install qemu-utils)"
        })?;
    if !out.status.success() {
        crate::fail!(
            Host,
            "qemu-img {} ({}): {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One disk onto a block device: allocated extents written, holes zeroed,
/// the device synced. Refused when the device is smaller than the disk or
/// in use (mounted, or held by another exclusive opener).
fn restore_to_device(ctx: &Ctx, d: &VmPointDisk, dev: &Path, conns: usize) -> Result<Value> {
    let t = Instant::now();
    let m = std::fs::metadata(dev).map_err(crate::error::io_at(dev))?;
    if !m.file_type().is_block_device() {
        crate::fail!(
            Invalid,
            "{} is not a block device (use --to DIR for image files)",
            dev.display()
        );
    }
    if let Some(at) = mounted_at(m.rdev())? {
        crate::fail!(
            Invalid,
            "{} is mounted on {at}: nothing restored",
            dev.display()
        );
    }
    // O_EXCL on a block device: EBUSY while anything else holds it
    // exclusively (a mounted filesystem, a device-mapper table, md).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Host,
                format!(
                    "{} cannot be opened for writing alone (in use?)",
                    dev.display()
                ),
                e,
            )
        })?;
    let dev_size = crate::block::device_size(&f).map_err(crate::error::io_at(dev))?;
    let plan = Plan::of(ctx, d, 1)?;
    if dev_size < plan.size {
        crate::fail!(
            Invalid,
            "{} holds {dev_size} bytes, less than disk {} ({} bytes): nothing restored",
            dev.display(),
            d.disk,
            plan.size
        );
    }
    let sinks = (0..conns)
        .map(|_| {
            Box::new(FileSink {
                f: &f,
                skip_zeros: false,
            }) as Box<dyn Sink + '_>
        })
        .collect();
    let (read, written) = copy(ctx, &plan, sinks, &format!("disk {}", d.disk))?;
    let mut zeroed = 0;
    for &(off, len) in &plan.holes {
        zero_range(&f, off, len).map_err(crate::error::io_at(dev))?;
        zeroed += len;
    }
    f.sync_all().map_err(crate::error::io_at(dev))?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({
        "disk": d.disk,
        "volume": d.volume,
        "snapshot": d.snapshot,
        "device": dev,
        "device_size": dev_size,
        "size": plan.size,
        "allocated": plan.allocated(),
        "bytes_read": read,
        "bytes_written": written,
        "bytes_zeroed": zeroed,
        "seconds": secs,
        "mb_per_s": mb_per_s(read, secs),
    }))
}

/// Where the device `rdev` is mounted, from /proc/self/mountinfo (its
/// third field is the mounted device's major:minor).
fn mounted_at(rdev: u64) -> Result<Option<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(crate::error::io_at(Path::new("/proc/self/mountinfo")))?;
    let want = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    Ok(text.lines().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let at = f.nth(1)?;
        (dev == want).then(|| at.to_string())
    }))
}

/// Zeroes `[off, off+len)` of a block device: FALLOC_FL_ZERO_RANGE (the
/// device's write-zeroes or discard-zeroes, no data sent), else writes of
/// zeros.
fn zero_range(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    ) {
        return Err(e);
    }
    tracing::debug!("zero range not supported ({e}): writing zeros");
    let zeros = vec![0u8; CHUNK as usize];
    let mut o = off;
    while o < off + len {
        let n = CHUNK.min(off + len - o);
        f.write_all_at(&zeros[..n as usize], o)?;
        o += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// Review L6: a restore directory that is a symbolic link, or is
    /// world-writable, is refused; an ordinary one is not.
    #[test]
    fn redirectable_restore_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = check_dir(&link, false).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        check_dir(&real, true).unwrap();
        check_dir(&real.join("new/sub"), false).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(&real, true).unwrap_err().to_string();
        assert!(e.contains("world-writable"), "{e}");
    }
    use super::*;

    #[test]
    fn file_names_are_plain_and_distinct() {
        assert_eq!(file_name("db1", 0, Format::Raw), "db1-disk0.raw");
        assert_eq!(file_name("db1", 2, Format::Qcow2), "db1-disk2.qcow2");
        let (a, b) = (
            file_name("web/1", 0, Format::Raw),
            file_name("web 1", 0, Format::Raw),
        );
        assert_ne!(a, b);
        for n in [
            a,
            b,
            file_name("..", 0, Format::Raw),
            file_name("", 1, Format::Raw),
        ] {
            assert!(!n.contains('/') && !n.starts_with('.'), "{n}");
        }
    }

    #[test]
    fn zero_runs_are_skipped() {
        let mut data = vec![0u8; 4 * ZERO_GRAIN + 10];
        data[ZERO_GRAIN + 5] = 1;
        data[4 * ZERO_GRAIN + 3] = 7;
        let mut runs = Vec::new();
        let n = nonzero_runs(&data, |at, r| {
            runs.push((at, r.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(ZERO_GRAIN, ZERO_GRAIN), (4 * ZERO_GRAIN, 10)]);
        assert_eq!(n, (ZERO_GRAIN + 10) as u64);
        assert_eq!(nonzero_runs(&[0u8; 100], |_, _| Ok(())).unwrap(), 0);
    }
}
