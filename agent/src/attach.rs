//! Stage disks on the host: an NBD export → block device → filesystem →
//! mount point. The block device is the kernel's NBD client (`/dev/nbdN`,
//! connected over netlink with several sockets: [`crate::kernel_nbd`])
//! where the host has `nbd.ko`, else a FUSE file (a `serve-disk` process
//! of this binary, [`crate::nbdfile`]) under a loop device in direct-I/O
//! mode. `CDM_AGENT_TRANSPORT=fuse|kernel` forces one (unset: `auto`). The
//! record of each attachment lives in `STATE/attach/NAME/record.json`, so
//! `detach` (or the next backup) finds what an earlier command attached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdm_disk::host::{self, run};
use serde::{Deserialize, Serialize};

use crate::error::io_at;
use crate::nbdfile::DISK_NAME;
use crate::{Ctx, Error, ErrorKind};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub name: String,
    /// NBD export: a volume, a clone, or `VOLUME@ID` (read-only).
    pub export: String,
    pub writable: bool,
    /// The block device: a loop device over the FUSE file, or `/dev/nbdN`.
    pub device: String,
    pub fstype: String,
    pub mount: PathBuf,
    /// The `serve-disk` process (0 through the kernel's NBD client).
    pub pid: u32,
    /// The kernel NBD device's index when attached through `nbd.ko`.
    #[serde(default)]
    pub nbd_index: Option<u32>,
    /// A clone this attachment made (deleted with `detach --delete-clone`).
    #[serde(default)]
    pub clone: Option<String>,
    /// A PostgreSQL started on it.
    #[serde(default)]
    pub postgres: Option<crate::pg::Running>,
    /// A MariaDB (`mariadbd`) started on it.
    #[serde(default)]
    pub mariadb: Option<crate::maria::Running>,
    /// Made by a backup for its own use (detached when it ends, or by the
    /// next backup if it was interrupted).
    #[serde(default)]
    pub temporary: bool,
    /// A drill's (`cdm-agent drill`): a restarted agent tears it down.
    #[serde(default)]
    pub drill: bool,
}

#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub name: String,
    pub export: String,
    pub writable: bool,
    pub mount: PathBuf,
    /// Make this filesystem when the disk has none (first use).
    pub mkfs: Option<String>,
}

fn dir(ctx: &Ctx, name: &str) -> PathBuf {
    ctx.state_dir.join("attach").join(name)
}

fn fuse_dir(ctx: &Ctx, name: &str) -> PathBuf {
    dir(ctx, name).join("fuse")
}

pub fn record(ctx: &Ctx, name: &str) -> Option<Attachment> {
    let t = std::fs::read(dir(ctx, name).join("record.json")).ok()?;
    serde_json::from_slice(&t).ok()
}

pub fn save(ctx: &Ctx, a: &Attachment) -> Result<(), Error> {
    let d = dir(ctx, &a.name);
    std::fs::create_dir_all(&d).map_err(io_at(&d))?;
    let tmp = d.join("record.json.tmp");
    let json = serde_json::to_vec_pretty(a)
        .map_err(|e| Error::with_source(ErrorKind::Io, "encoding the attachment record", e))?;
    std::fs::write(&tmp, json).map_err(io_at(&tmp))?;
    let rec = d.join("record.json");
    std::fs::rename(&tmp, &rec).map_err(io_at(&rec))?;
    Ok(())
}

pub fn list(ctx: &Ctx) -> Vec<Attachment> {
    let mut v: Vec<Attachment> = std::fs::read_dir(ctx.state_dir.join("attach"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| record(ctx, &e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// A name for files and directories from an export name.
pub fn name_of(export: &str) -> String {
    export.replace('@', "_")
}

fn alive(pid: u32) -> bool {
    // Not a zombie and still there.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Starts the FUSE file for `export`; waits until `FUSE/disk` is there.
fn start_server(ctx: &Ctx, name: &str, export: &str) -> Result<Child, Error> {
    let d = dir(ctx, name);
    std::fs::create_dir_all(&d).map_err(io_at(&d))?;
    let fuse = fuse_dir(ctx, name);
    let _ = host::unmount(&fuse);
    std::fs::create_dir_all(&fuse).map_err(io_at(&fuse))?;
    let log = d.join("serve.log");
    let _ = std::fs::remove_file(d.join("status"));
    let out = std::fs::File::create(&log).map_err(io_at(&log))?;
    let exe = std::env::current_exe().map_err(|e| {
        Error::with_source(ErrorKind::Host, "cannot find the agent's executable", e)
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve-disk")
        .args(["--nbd", &ctx.nbd, "--export", export])
        .args(
            ctx.ca_file
                .iter()
                .flat_map(|c| [std::ffi::OsStr::new("--ca-file"), c.as_os_str()]),
        )
        .arg("--dir")
        .arg(&fuse)
        .arg("--status")
        .arg(d.join("status"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(io_at(&log))?)
        .stderr(out);
    // Its own session: it outlives this command and a terminal's signals.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::with_source(ErrorKind::Host, "cannot start the disk server", e))?;
    let disk = fuse.join(DISK_NAME);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if host::is_mounted(&fuse) && disk.exists() {
            return Ok(child);
        }
        let exited = child
            .try_wait()
            .map_err(|e| Error::with_source(ErrorKind::Host, "waiting for the disk server", e))?;
        if let Some(st) = exited {
            return Err(Error::host(format!(
                "cannot serve {export} from {}: {} ({st})",
                ctx.nbd,
                tail(&log)
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = host::unmount(&fuse);
            return Err(Error::host(format!(
                "the FUSE file for {export} did not appear within 20 s: {}",
                tail(&log)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a `serve-disk` process by unmounting its FUSE file; waits for it
/// and returns what it reported.
fn stop_server(ctx: &Ctx, name: &str, pid: u32, child: Option<&mut Child>) -> Result<(), Error> {
    let fuse = fuse_dir(ctx, name);
    host::unmount_strict(&fuse)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    loop {
        let running = match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => alive(pid),
        };
        if !running {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::host(format!(
                "the disk server (pid {pid}) did not exit within 60 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::fs::read_to_string(dir(ctx, name).join("status")).unwrap_or_default();
    match status.trim() {
        "ok" => Ok(()),
        "" => Err(Error::host(format!(
            "the disk server ended without a report: {}",
            tail(&dir(ctx, name).join("serve.log"))
        ))),
        s => Err(Error::host(s)),
    }
}

/// How attachments reach their export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A `serve-disk` FUSE file under a loop device.
    Fuse,
    /// The kernel's NBD client, connected over netlink.
    Kernel,
}

/// The transport for a new attachment: `CDM_AGENT_TRANSPORT` (`fuse`,
/// `kernel`, `auto`); `auto` (the default) takes the kernel's NBD client
/// when it is there.
pub fn transport() -> Result<Transport, Error> {
    let want = std::env::var("CDM_AGENT_TRANSPORT").unwrap_or_default();
    match want.as_str() {
        "fuse" => Ok(Transport::Fuse),
        "kernel" if crate::kernel_nbd::available() => Ok(Transport::Kernel),
        "kernel" => Err(Error::host(
            "CDM_AGENT_TRANSPORT=kernel, but the kernel has no NBD client (nbd.ko)",
        )),
        "" | "auto" if crate::kernel_nbd::available() => Ok(Transport::Kernel),
        "" | "auto" => Ok(Transport::Fuse),
        other => Err(Error::host(format!(
            "CDM_AGENT_TRANSPORT={other}: fuse, kernel or auto"
        ))),
    }
}

/// Sockets handed to the kernel's NBD client (when the server advertises
/// CAN_MULTI_CONN).
const KERNEL_SOCKETS: usize = 4;
const KERNEL_TIMEOUT: Duration = Duration::from_secs(60);

/// The block device of an attachment being made.
struct Device {
    dev: String,
    child: Option<Child>,
    nbd_index: Option<u32>,
}

/// Connects `export` as a block device.
fn open_device(ctx: &Ctx, req: &AttachRequest) -> Result<Device, Error> {
    let tls = ctx.nbd_tls.is_some() && !ctx.nbd.starts_with("unix:");
    match transport()? {
        // The kernel's client cannot keep a TLS session (it would live in
        // this short-lived process): a serve-disk process keeps it instead.
        Transport::Kernel if tls => {
            tracing::info!("NBD over TLS: attaching through a FUSE file, not the kernel's client");
            fuse_device(ctx, req)
        }
        Transport::Kernel => {
            let index = kernel_attach(ctx, &req.export, req.writable)?;
            tracing::info!(export = %req.export, index, "attached through the kernel's NBD client");
            Ok(Device {
                dev: format!("/dev/nbd{index}"),
                child: None,
                nbd_index: Some(index),
            })
        }
        Transport::Fuse => fuse_device(ctx, req),
    }
}

/// A `serve-disk` FUSE file under a loop device.
fn fuse_device(ctx: &Ctx, req: &AttachRequest) -> Result<Device, Error> {
    let mut child = start_server(ctx, &req.name, &req.export)?;
    let fuse = fuse_dir(ctx, &req.name);
    let dev = match host::loop_attach(&fuse.join(DISK_NAME), !req.writable, None) {
        Ok(d) => d,
        Err(e) => {
            let _ = stop_server(ctx, &req.name, child.id(), Some(&mut child));
            return Err(e.into());
        }
    };
    // Direct I/O: the filesystem's page cache is the only one, and
    // the loop device submits many requests at once (buffered, it
    // sends one at a time). Refused: logged, and it works buffered.
    host::loop_direct_io(&dev);
    Ok(Device {
        dev,
        child: Some(child),
        nbd_index: None,
    })
}

/// Undoes [`open_device`] (nothing mounted on it).
fn close_device(ctx: &Ctx, name: &str, d: &mut Device) {
    match d.nbd_index {
        Some(i) => {
            let _ = crate::kernel_nbd::disconnect(i);
        }
        None => {
            host::loop_detach_if_ours(&d.dev, &fuse_dir(ctx, name));
            if let Some(c) = d.child.as_mut() {
                let _ = stop_server(ctx, name, c.id(), Some(c));
            }
        }
    }
}

/// Handshakes on up to [`KERNEL_SOCKETS`] sockets and connects them as
/// one kernel NBD device; its index.
fn kernel_attach(ctx: &Ctx, export: &str, writable: bool) -> Result<u32, Error> {
    use nbd_proto::codec::{TF_CAN_MULTI_CONN, TF_READ_ONLY};
    use nbd_proto::Client;
    let (first, size, flags) =
        Client::handshake_socket(&ctx.nbd, Some(export), Some(KERNEL_TIMEOUT), None)?;
    let n = if flags & TF_CAN_MULTI_CONN != 0 {
        KERNEL_SOCKETS
    } else {
        1
    };
    let mut socks = vec![first];
    for _ in 1..n {
        socks.push(Client::handshake_socket(&ctx.nbd, Some(export), Some(KERNEL_TIMEOUT), None)?.0);
    }
    let c = crate::kernel_nbd::Connect {
        size,
        block_size: 4096,
        // A read-only attachment of a writable export: the kernel makes
        // the device read-only when the server says so.
        server_flags: if writable {
            flags
        } else {
            flags | TF_READ_ONLY
        },
        timeout: KERNEL_TIMEOUT,
        dead_conn_timeout: KERNEL_TIMEOUT,
    };
    let index = crate::kernel_nbd::connect(&c, &socks).map_err(|e| {
        Error::with_source(
            ErrorKind::Host,
            format!("kernel NBD connect of {export}"),
            e,
        )
    })?;
    // No udev: devtmpfs makes the node; wait for the size to show.
    let sys = PathBuf::from(format!("/sys/block/nbd{index}/size"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&sys)
        .map(|t| t.trim() == "0")
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            let _ = crate::kernel_nbd::disconnect(index);
            return Err(Error::host(format!(
                "/dev/nbd{index} did not come up within 20 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(index)
}

/// Attaches and mounts. On failure, undoes what it did.
pub fn attach(ctx: &Ctx, req: &AttachRequest) -> Result<(Attachment, Option<Child>), Error> {
    if let Some(a) = record(ctx, &req.name) {
        if alive(a.pid) || host::is_mounted(&a.mount) {
            return Err(Error::host(format!(
                "{} is already attached at {} (detach it first)",
                req.name,
                a.mount.display()
            )));
        }
        // Left by a crash: clear it.
        let _ = cleanup(ctx, &a, None);
    }
    if host::is_mounted(&req.mount) {
        return Err(Error::host(format!(
            "{} is already a mount point",
            req.mount.display()
        )));
    }
    let mut device = open_device(ctx, req)?;
    let dev = device.dev.clone();
    let fstype = match (host::fs_type(&dev), &req.mkfs) {
        (Some(t), _) => t,
        (None, Some(fs)) if req.writable => {
            let r = match fs.as_str() {
                "ext4" => {
                    run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "cdm-stage", &dev]))
                }
                "xfs" => run(Command::new("mkfs.xfs").args(["-q", "-f", "-L", "cdm-stage", &dev])),
                other => {
                    close_device(ctx, &req.name, &mut device);
                    return Err(Error::host(format!(
                        "cannot make a {other} filesystem (ext4 or xfs)"
                    )));
                }
            };
            if let Err(e) = r {
                close_device(ctx, &req.name, &mut device);
                return Err(e.into());
            }
            fs.clone()
        }
        (None, _) => {
            close_device(ctx, &req.name, &mut device);
            return Err(Error::host(format!(
                "{} holds no filesystem the agent can mount{}",
                req.export,
                if req.writable {
                    " (and it is not blank: a filesystem is only made on a volume nothing was written to)"
                } else {
                    ""
                }
            )));
        }
    };
    let mounted = if fstype == "ext4" && req.writable {
        // The stage disk starts zeroed: no need for ext4's background
        // inode-table zeroing, which would write the whole table.
        host::make_dir(&req.mount)
            .and_then(|_| {
                run(Command::new("mount")
                    .args(["-t", "ext4", "-o", "rw,noinit_itable,nosuid,nodev", &dev])
                    .arg(&req.mount))
            })
            .map(|_| ())
    } else {
        host::mount(&dev, &fstype, req.writable, &req.mount)
    };
    if let Err(e) = mounted {
        close_device(ctx, &req.name, &mut device);
        return Err(Error::host(format!("cannot mount {}: {e}", req.export)));
    }
    let a = Attachment {
        name: req.name.clone(),
        export: req.export.clone(),
        writable: req.writable,
        device: dev,
        fstype,
        mount: req.mount.clone(),
        pid: device.child.as_ref().map(|c| c.id()).unwrap_or(0),
        nbd_index: device.nbd_index,
        clone: None,
        postgres: None,
        mariadb: None,
        temporary: false,
        drill: false,
    };
    if let Err(e) = save(ctx, &a) {
        let _ = cleanup(ctx, &a, device.child.as_mut());
        return Err(e);
    }
    Ok((a, device.child))
}

/// Unmounts, detaches the loop device, stops the disk server (which
/// flushes). A busy filesystem stops it at the first step, leaving
/// everything attached; after that every step is tried and the first
/// failure is reported.
fn cleanup(ctx: &Ctx, a: &Attachment, child: Option<&mut Child>) -> Result<(), Error> {
    let mut first: Option<Error> = None;
    if host::is_mounted(&a.mount) {
        let _ = run(Command::new("sync").arg("-f").arg(&a.mount));
        // Busy: stop here, everything stays attached and recorded.
        host::unmount_strict(&a.mount)?;
    }
    if let Some(i) = a.nbd_index {
        // The kernel flushes, sends NBD_CMD_DISC and frees the device.
        if let Err(e) = crate::kernel_nbd::disconnect(i) {
            first.get_or_insert(Error::with_source(
                ErrorKind::Host,
                format!("kernel NBD disconnect of /dev/nbd{i}"),
                e,
            ));
        }
        return first.map_or(Ok(()), Err);
    }
    host::loop_detach_if_ours(&a.device, &fuse_dir(ctx, &a.name));
    if let Err(e) = stop_server(ctx, &a.name, a.pid, child) {
        first.get_or_insert(e);
    }
    match first {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Detaches `a`. The record goes unless the filesystem or the FUSE file
/// is still mounted (busy): then `detach` can be run again later.
pub fn detach(ctx: &Ctx, a: &Attachment, child: Option<&mut Child>) -> Result<(), Error> {
    let r = cleanup(ctx, a, child);
    if !host::is_mounted(&a.mount) && !host::is_mounted(&fuse_dir(ctx, &a.name)) {
        let _ = std::fs::remove_dir_all(dir(ctx, &a.name));
    }
    r.map_err(|e| Error::with_source(ErrorKind::Host, format!("detach {}", a.name), e))
}
