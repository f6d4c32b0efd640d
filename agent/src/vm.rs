//! VMs: inspection of their disks without booting (`cdm_inspect`), read
//! from image files or through NBD (our exports, `qemu-nbd` serving raw or
//! qcow2, VMDK, VHD and VHDX files, a hypervisor's backup export).

use std::path::Path;
use std::time::Instant;

use crate::error::{Context as _, ErrorKind, Result};
use cdm_inspect::{Disk, FileDisk, Inspection};
use nbd_proto::client::{Client, ClientOptions};
use serde_json::{json, Value};

/// An NBD export as a disk.
pub struct NbdDisk(Client);

impl NbdDisk {
    pub fn connect(uri: &str) -> Result<NbdDisk> {
        let opts = ClientOptions {
            allocation: false,
            timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        Ok(NbdDisk(
            Client::connect(uri, None, &opts).context_with(ErrorKind::Host, || uri)?,
        ))
    }
}

impl Disk for NbdDisk {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(off, buf).map_err(|e| e.to_string())
    }
}

/// Opens `spec`: `nbd://…`, `nbd+unix://…`, or a raw image / block device.
pub fn open_disk(spec: &str) -> Result<Box<dyn Disk>> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        return Ok(Box::new(NbdDisk::connect(spec)?));
    }
    let p = Path::new(spec);
    let f = FileDisk::open(p).context_with(ErrorKind::Io, || spec)?;
    Ok(Box::new(f))
}

/// Inspects one disk; an unreadable one is "unknown" with the reason.
pub fn inspect_one(spec: &str) -> (Inspection, f64) {
    let t = Instant::now();
    let i = match open_disk(spec) {
        Ok(d) => cdm_inspect::inspect(d),
        Err(e) => Inspection::unknown(format!("{e:#}")),
    };
    (i, t.elapsed().as_secs_f64())
}

pub fn inspect_cmd(disks: &[String]) -> Result<Value> {
    let mut out = Vec::new();
    for d in disks {
        let (i, secs) = inspect_one(d);
        let mut v = serde_json::to_value(&i)?;
        v["disk"] = json!(d);
        v["seconds"] = json!(secs);
        out.push(v);
    }
    Ok(Value::Array(out))
}

/// A disk made readable: a path or NBD URI, and the `qemu-nbd` serving an
/// image file (stopped when this is dropped).
pub struct Opened {
    pub spec: String,
    server: Option<std::process::Child>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            // SIGTERM: qemu-nbd stores persistent bitmaps as it exits.
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Serves a qcow2, VMDK (sparse or flat), VHD (`vpc`) or VHDX file through
/// `qemu-nbd` (read-only, on a socket in the
/// state directory, exporting `bitmap` if given); raw files and NBD URIs
/// are used as they are.
pub fn open_vm_disk(
    ctx: &crate::Ctx,
    d: &cdm_inspect::inventory::VmDisk,
    bitmap: Option<&str>,
) -> Result<Opened> {
    if d.format == "raw" || d.source.contains("://") {
        return Ok(Opened {
            spec: d.source.clone(),
            server: None,
        });
    }
    if !cdm_inspect::inventory::QEMU_FORMATS.contains(&d.format.as_str()) {
        crate::fail!(
            Host,
            "{}: disk format {} is not supported (raw, {})",
            d.source,
            d.format,
            cdm_inspect::inventory::QEMU_FORMATS.join(", ")
        );
    }
    let dir = ctx.state_dir.join("qemu-nbd");
    std::fs::create_dir_all(&dir)?;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sock = dir.join(format!(
        "{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = std::process::Command::new("qemu-nbd");
    // A flat VMDK's descriptor names its raw extent beside it: qemu-nbd
    // opens that itself with `-f vmdk`.
    cmd.args(["-r", "-t", "-f", &d.format, "-k"]).arg(&sock);
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    cmd.arg(&d.source)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // It is stopped with SIGTERM: whatever mask this process inherited
    // (a daemon that waits for signals blocks them), qemu-nbd gets none.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            cdm_common::signals::clear_mask();
            // Never outlive the agent (killed, interrupted): it holds the
            // image open.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context_with(ErrorKind::Host, || format!("qemu-nbd for {}", d.source))?;
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            crate::fail!(
                Host,
                "qemu-nbd could not serve {} ({st}): {}",
                d.source,
                err.trim()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            crate::fail!(Host, "qemu-nbd did not start for {}", d.source);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(Opened {
        spec: format!("nbd+unix:///?socket={}", sock.display()),
        server: Some(child),
    })
}

/// Inspection results by disk identity: a file's path, inode, size and
/// modification time (any write changes it). NBD sources are inspected
/// every time (only metadata is read).
struct Cache {
    path: std::path::PathBuf,
    map: std::collections::BTreeMap<String, Inspection>,
    hits: u64,
}

impl Cache {
    fn load(ctx: &crate::Ctx) -> Cache {
        let path = ctx.state_dir.join("inspect-cache.json");
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Cache { path, map, hits: 0 }
    }

    fn key(d: &cdm_inspect::inventory::VmDisk) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        if d.source.contains("://") {
            return None;
        }
        let m = std::fs::metadata(&d.source).ok()?;
        if m.file_type().is_file() {
            // ctime too: `cp -p`/`rsync --inplace` can keep size and
            // mtime; the inspector's version: a newer one may find more.
            Some(format!(
                "{}|{}|{}|{}|{}|{}.{}|{}.{}|{}",
                std::fs::canonicalize(&d.source).ok()?.display(),
                d.format,
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                env!("CARGO_PKG_VERSION"),
            ))
        } else {
            None
        }
    }

    fn save(&self) {
        let tmp = self.path.with_extension("json.tmp");
        if let Ok(b) = serde_json::to_vec(&self.map) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

/// Inspects every disk of every VM (cached by disk identity).
pub fn classify(
    ctx: &crate::Ctx,
    vms: Vec<cdm_inspect::inventory::Vm>,
) -> (Vec<cdm_inspect::category::Classified>, u64) {
    let mut cache = Cache::load(ctx);
    let mut out = Vec::new();
    for vm in vms {
        let mut inspections = Vec::new();
        for d in &vm.disks {
            let key = Cache::key(d);
            if let Some(i) = key.as_ref().and_then(|k| cache.map.get(k)) {
                cache.hits += 1;
                inspections.push(i.clone());
                continue;
            }
            // Only what the disk itself said is cached: a disk that could
            // not be opened (locked by a running VM, qemu-nbd failing) is
            // tried again next time.
            let i = match open_vm_disk(ctx, d, None) {
                Ok(o) => {
                    let i = inspect_one(&o.spec).0;
                    if let Some(k) = key {
                        cache.map.insert(k, i.clone());
                    }
                    i
                }
                Err(e) => Inspection::unknown(format!("{e:#}")),
            };
            inspections.push(i);
        }
        out.push(cdm_inspect::category::Classified { vm, inspections });
    }
    cache.save();
    (out, cache.hits)
}

fn load_inventory(path: &Path) -> Result<Vec<cdm_inspect::inventory::Vm>> {
    cdm_inspect::inventory::load(path)
        .context_with(ErrorKind::Host, || "listing the VMs failed, nothing done")
}

pub fn list_cmd(inventory: &Path) -> Result<Value> {
    Ok(serde_json::to_value(load_inventory(inventory)?)?)
}

/// What the appliance's API keeps of a classified VM.
pub fn record(c: &cdm_inspect::category::Classified) -> cdm_api::types::VmRecord {
    cdm_api::types::VmRecord {
        name: c.vm.name.clone(),
        uuid: c.vm.uuid.clone(),
        os_family: c.os().map(|o| o.family.clone()).unwrap_or_default(),
        os: c.os_name(),
        apps: c.apps(),
        storage_path: c.vm.storage_path.clone(),
        pool: c.vm.pool.clone(),
        disks: c.vm.disks.iter().map(|d| d.source.clone()).collect(),
        details: json!({ "os": c.os(), "inspections": c.inspections }),
    }
}

pub fn tree_cmd(ctx: &crate::Ctx, inventory: &Path, by_s: &str, publish: bool) -> Result<Value> {
    let by = cdm_api::vms::By::parse(by_s).map_err(|e| crate::err!(Invalid, "{e}"))?;
    let (vms, hits) = classify(ctx, load_inventory(inventory)?);
    let records: Vec<cdm_api::types::VmRecord> = vms.iter().map(record).collect();
    let tree = cdm_api::vms::tree(&records, &by);
    if publish {
        ctx.api
            .put_vms(&records)
            .context_with(ErrorKind::Host, || {
                "publishing the inventory to the appliance"
            })?;
    }
    Ok(json!({
        "by": by_s,
        "published": publish,
        "groups": tree,
        "vms": vms.iter().map(|c| json!({
            "name": c.vm.name,
            "os": c.os(),
            "apps": c.apps(),
            "storage_path": c.vm.storage_path,
            "pool": c.vm.pool,
            "disks": c.inspections.iter().zip(&c.vm.disks).map(|(i, d)| json!({
                "source": d.source, "status": i.status, "reason": i.reason, "bytes_read": i.bytes_read,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "cache_hits": hits,
    }))
}

/// The stage volumes' prefix of `vm backup` run by hand.
pub const DEFAULT_PREFIX: &str = "vm";
/// Longest prefix: room is left for the VM's name and the disk.
pub const PREFIX_MAX: usize = 96;

/// A volume name for disk `i` of VM `name`: `PREFIX-NAME-diskI` when that
/// is a valid volume name as it is, else the cleaned name with a hash of
/// the real one (two names never share a stage volume). `prefix` is a
/// valid name of at most [`PREFIX_MAX`] bytes (checked by the caller).
pub fn volume_for(prefix: &str, name: &str, i: usize) -> String {
    cdm_api::vm_recovery::volume_for(prefix, name, i)
}

/// Checks a `--volume-prefix`.
pub fn check_prefix(prefix: &str) -> Result<()> {
    crate::ops::check_name(prefix)?;
    if prefix.len() > PREFIX_MAX {
        crate::fail!(
            Invalid,
            "volume prefix {prefix:?} is {} bytes long (at most {PREFIX_MAX})",
            prefix.len()
        );
    }
    Ok(())
}

/// Backs up every VM of a category: each disk into its own stage volume
/// (only allocated blocks; incremental on later runs), a snapshot per disk
/// with the VM's inspection in its metadata; `parallel` VMs at a time; a
/// VM that fails is reported and the others go on.
pub fn backup_cmd(
    ctx: &crate::Ctx,
    inventory: &Path,
    category: &str,
    parallel: usize,
    bitmap: Option<&str>,
    prefix: &str,
    live: &crate::vm_live::LiveOptions,
) -> Result<Value> {
    check_prefix(prefix)?;
    let t0 = Instant::now();
    let (vms, _) = classify(ctx, load_inventory(inventory)?);
    let mut chosen = Vec::new();
    for c in vms {
        if cdm_api::vms::selects(&record(&c), category).map_err(|e| crate::err!(Invalid, "{e}"))? {
            chosen.push(c);
        }
    }
    if chosen.is_empty() {
        crate::fail!(Host, "no VM is in category {category}");
    }
    let mut vols = std::collections::HashMap::new();
    for c in &chosen {
        for i in 0..c.vm.disks.len() {
            if let Some(other) = vols.insert(volume_for(prefix, &c.vm.name, i), c.vm.name.clone()) {
                crate::fail!(
                    Host,
                    "VMs {other:?} and {:?} would share stage volume {}",
                    c.vm.name,
                    volume_for(prefix, &c.vm.name, i)
                );
            }
        }
    }
    let queue = std::sync::Mutex::new(chosen.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((idx, c)) = next else { break };
                let t = Instant::now();
                let r = backup_vm(ctx, &c, bitmap, prefix, live);
                let v = match r {
                    Ok(disks) => json!({"vm": c.vm.name, "ok": true, "disks": disks, "seconds": t.elapsed().as_secs_f64()}),
                    Err(e) => json!({"vm": c.vm.name, "ok": false, "error": format!("{e:#}"), "seconds": t.elapsed().as_secs_f64()}),
                };
                if let Ok(mut r) = results.lock() {
                    r.push((idx, v));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<Value> = results.into_iter().map(|(_, v)| v).collect();
    let failed = results.iter().filter(|v| v["ok"] == false).count();
    let v = json!({
        "category": category,
        "vms": results,
        "failed": failed,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if failed > 0 {
        // The summary is the error: every VM's outcome, and which failed.
        crate::fail!(Host, "{failed} VM(s) of category {category} failed: {v}");
    }
    Ok(v)
}

fn backup_vm(
    ctx: &crate::Ctx,
    c: &cdm_inspect::category::Classified,
    bitmap: Option<&str>,
    prefix: &str,
    live: &crate::vm_live::LiveOptions,
) -> Result<Vec<Value>> {
    // The run's id: the disks' snapshots of this backup form one point
    // (`cdm_api::vm_recovery::points`); with `disks`, a point whose disk
    // failed shows as incomplete.
    let point = format!(
        "{:x}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
        std::process::id()
    );
    let meta = |i: usize| {
        let d = &c.vm.disks[i];
        json!({
            "vm": {
                "name": c.vm.name,
                "uuid": c.vm.uuid,
                "disk": i,
                "disks": c.vm.disks.len(),
                "point": point,
                "source": d.source,
                "format": d.format,
                "target": d.target,
                "bus": d.bus,
                "storage_path": c.vm.storage_path,
                "pool": c.vm.pool,
                "shape": c.vm.shape,
            },
            "inspection": c.inspections.get(i),
            "os": c.os(),
            "apps": c.apps(),
        })
    };
    let volumes: Vec<String> = (0..c.vm.disks.len())
        .map(|i| volume_for(prefix, &c.vm.name, i))
        .collect();
    // A running VM holds its images locked: its qemu makes the point.
    if let Some(sock) = live.qmp_socket(&c.vm) {
        return crate::vm_live::backup(ctx, c, &sock, live, &volumes, &meta);
    }
    let mut out = Vec::new();
    for (i, d) in c.vm.disks.iter().enumerate() {
        let opened = open_vm_disk(ctx, d, bitmap)?;
        let r = crate::ops::backup_block(
            ctx,
            &volumes[i],
            &opened.spec,
            bitmap,
            65536,
            Some(format!("vm {} disk {i}", c.vm.name)),
            Some(meta(i)),
        )
        .context_with(ErrorKind::Host, || format!("disk {i} ({})", d.source))?;
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_valid_and_distinct() {
        assert_eq!(volume_for(DEFAULT_PREFIX, "db1", 0), "vm-db1-disk0");
        assert_eq!(volume_for("h-vm-linux", "db1", 1), "h-vm-linux-db1-disk1");
        let v = |n: &str, i| volume_for(DEFAULT_PREFIX, n, i);
        let (a, b) = (v("web 1", 0), v("web/1", 0));
        assert_ne!(a, b);
        let long = "p".repeat(PREFIX_MAX);
        for n in [
            a,
            b,
            v(&"x".repeat(300), 2),
            v("../..", 0),
            v("ä", 1),
            volume_for(&long, &"x".repeat(300), 12),
            volume_for(&long, "db1", 0),
        ] {
            assert!(crate::ops::check_name(&n).is_ok(), "{n}");
        }
        assert!(check_prefix(&long).is_ok());
        assert!(check_prefix(&format!("{long}p")).is_err());
        assert!(check_prefix("a/b").is_err());
    }
}
