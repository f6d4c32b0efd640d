//! VM inspection without booting (libguestfs's method, in process): the
//! partition table, LVM2 logical volumes (`lvm.rs`), each partition's or
//! volume's filesystem (ext2/3/4 with `ext4-view`, NTFS with the `ntfs`
//! crate, XFS and btrfs with our own readers), `/etc/fstab`'s `/usr` and
//! `/var` mounts (`fstab.rs`), the operating system from its
//! configuration files (`/etc/os-release` and the distributions' release
//! files; the Windows registry's `SOFTWARE` and `SYSTEM` hives) and the
//! applications it holds, each with the file or key that gave it away.
//! Disks are anything that reads at an offset ([`Disk`]): an image file,
//! an NBD export. Only metadata is read; [`Inspection::bytes_read`] says
//! how much. Bad disks are "unknown" with a reason, never a panic.

pub mod browse;
pub mod btrfs;
pub mod category;
pub mod detect;
pub mod fstab;
pub mod fsview;
pub mod inventory;
pub mod lvm;
#[cfg(any(test, feature = "test-utils"))]
pub mod regf_write;
pub mod registry;
pub mod xfs;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Something that reads at an offset.
pub trait Disk: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// An image file (raw).
pub struct FileDisk {
    f: std::fs::File,
    size: u64,
}

impl FileDisk {
    pub fn open(p: &std::path::Path) -> std::io::Result<FileDisk> {
        let f = std::fs::File::open(p)?;
        let size = f.metadata()?.len();
        Ok(FileDisk { f, size })
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.f.read_exact_at(buf, off).map_err(|e| e.to_string())
    }
}

/// A disk in memory (fuzz targets and the readers' tests): reads past its
/// end are errors, never panics.
pub struct MemDisk(pub Vec<u8>);

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        let s = usize::try_from(off).map_err(|_| "offset past the end of the disk")?;
        let src = s
            .checked_add(buf.len())
            .and_then(|e| self.0.get(s..e))
            .ok_or_else(|| format!("read past the end of the disk at {off}"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A disk shared by the filesystem readers, counting what they read.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<(Box<dyn Disk>, u64)>>);

impl Shared {
    pub fn new(d: Box<dyn Disk>) -> Shared {
        Shared(Arc::new(Mutex::new((d, 0))))
    }
    pub fn size(&self) -> u64 {
        self.0.lock().map(|g| g.0.size()).unwrap_or(0)
    }
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut g = self
            .0
            .lock()
            .map_err(|_| "disk lock poisoned".to_string())?;
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= g.0.size())
            .ok_or_else(|| format!("read past the end of the disk at {off}"))?;
        let _ = end;
        g.1 += buf.len() as u64;
        g.0.read_at(off, buf)
    }
    pub fn bytes_read(&self) -> u64 {
        self.0.lock().map(|g| g.1).unwrap_or(0)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartInfo {
    /// 0 = the whole disk (no partition table).
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub kind: String,
    pub bootable: bool,
    /// ext4, ntfs, xfs, … or none.
    pub filesystem: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Os {
    /// linux, windows or unix.
    pub family: String,
    /// debian, ubuntu, centos, rhel, sles, opensuse, windows, …
    pub distro: String,
    pub version: String,
    pub product_name: String,
    pub hostname: Option<String>,
    /// The file or registry key it was read from.
    pub evidence: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct App {
    /// Oracle, MySQL, PostgreSQL, SQL Server, DB2, Sybase, Exchange, Domino.
    pub name: String,
    pub evidence: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Inspection {
    /// `ok` (an operating system was found) or `unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub size: u64,
    /// mbr, gpt, none, or invalid (a table that cannot be right).
    pub partition_table: String,
    pub partitions: Vec<PartInfo>,
    /// The partition holding the operating system (0 = whole disk).
    pub root: Option<u32>,
    pub os: Option<Os>,
    pub apps: Vec<App>,
    pub bytes_read: u64,
    /// LVM2 logical volumes in physical volumes on this disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeInfo>,
    /// The logical volume holding the operating system ("vg/lv"); `root`
    /// is then the partition of its physical volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<String>,
    /// Filesystems the root's `/etc/fstab` mounts where applications live
    /// (`/usr`, `/var`, …), searched as part of the root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    /// "vg/lv".
    pub name: String,
    pub size: u64,
    /// The partition holding its (first) physical volume (0 = whole disk).
    pub partition: u32,
    pub filesystem: Option<String>,
    /// Why it could not be read (unsupported segments, a PV elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MountInfo {
    /// The mount point.
    pub path: String,
    /// The device as `/etc/fstab` names it.
    pub device: String,
    pub partition: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

impl Inspection {
    /// A disk that could not be read at all.
    pub fn unknown(reason: String) -> Inspection {
        Inspection {
            status: "unknown".into(),
            reason: Some(reason),
            size: 0,
            partition_table: "none".into(),
            partitions: Vec::new(),
            root: None,
            os: None,
            apps: Vec::new(),
            bytes_read: 0,
            volumes: Vec::new(),
            root_volume: None,
            mounts: Vec::new(),
        }
    }
}

/// What a filesystem's superblock says: its type, UUID and label (what
/// `/etc/fstab` names it by).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FsId {
    pub(crate) kind: String,
    pub(crate) uuid: Option<String>,
    pub(crate) label: Option<String>,
}

fn uuid(b: &[u8]) -> Option<String> {
    let b = b.get(..16)?;
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn label(b: &[u8]) -> Option<String> {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let l = String::from_utf8_lossy(&b[..n]).trim().to_string();
    (!l.is_empty()).then_some(l)
}

/// The btrfs superblock's place (the first copy).
pub(crate) const BTRFS_SB: u64 = 64 << 10;

fn probe(d: &Shared, start: u64, len: u64) -> Option<FsId> {
    let mut b = vec![0u8; 2048];
    if len < 2048 || d.read_at(start, &mut b).is_err() {
        return None;
    }
    let id = |kind: &str, uuid: Option<String>, label: Option<String>| {
        Some(FsId {
            kind: kind.into(),
            uuid,
            label,
        })
    };
    if &b[3..11] == b"NTFS    " {
        return id("ntfs", None, None);
    }
    if &b[..4] == b"XFSB" {
        return id("xfs", uuid(&b[32..48]), label(&b[108..120]));
    }
    if u16::from_le_bytes([b[1024 + 0x38], b[1024 + 0x39]]) == 0xef53 {
        return id(
            "ext4",
            uuid(&b[1024 + 0x68..]),
            label(&b[1024 + 0x78..1024 + 0x88]),
        );
    }
    if &b[..6] == b"LUKS\xba\xbe" {
        return id("luks", None, None);
    }
    if lvm::is_pv(&b) {
        return id("lvm2", None, None);
    }
    let mut s = vec![0u8; 4096];
    if len >= BTRFS_SB + 4096
        && d.read_at(start + BTRFS_SB, &mut s).is_ok()
        && &s[0x40..0x48] == b"_BHRfS_M"
    {
        return id("btrfs", uuid(&s[0x20..0x30]), label(&s[0x12b..0x22b]));
    }
    None
}

/// A filesystem of the disk: in a partition or a logical volume.
pub(crate) struct Found {
    /// "partition 2", "LV vg0/root": how reasons name it.
    pub(crate) name: String,
    pub(crate) part: u32,
    /// "vg/lv" for a logical volume.
    pub(crate) lv: Option<String>,
    pub(crate) d: Shared,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) id: FsId,
}

fn open_view(f: &Found) -> Result<Box<dyn fsview::FsView>, String> {
    match f.id.kind.as_str() {
        "ext4" => fsview::ext4(f.d.clone(), f.start, f.len),
        "ntfs" => fsview::ntfs(f.d.clone(), f.start, f.len),
        "xfs" => fsview::xfs(f.d.clone(), f.start, f.len),
        "btrfs" => fsview::btrfs(f.d.clone(), f.start, f.len),
        other => Err(format!("{other} is not readable here")),
    }
}

/// What the disk's partitions and logical volumes hold so far.
#[derive(Default)]
struct Layout {
    found: Vec<Found>,
    /// Physical volumes and the partition holding each.
    pvs: Vec<(u32, lvm::Pv)>,
    /// Why parts of the disk could not be read.
    why: Vec<String>,
}

impl Layout {
    /// Sorts a probed container: a filesystem to read, a PV, or a reason.
    fn sort_out(
        &mut self,
        d: &Shared,
        (name, part): (String, u32),
        lv: Option<String>,
        (start, len): (u64, u64),
        id: Option<FsId>,
    ) {
        match id {
            Some(id) if id.kind == "luks" => self.why.push(format!("{name} is encrypted (LUKS)")),
            Some(id) if id.kind == "lvm2" && lv.is_none() => match lvm::read_pv(d, start, len) {
                Ok(pv) => self.pvs.push((part, pv)),
                Err(e) => self.why.push(format!("{name}: {e}")),
            },
            Some(id) => self.found.push(Found {
                name,
                part,
                lv,
                d: d.clone(),
                start,
                len,
                id,
            }),
            None => self.why.push(format!("{name}: no filesystem recognised")),
        }
    }

    /// The logical volumes of the volume groups whose PVs are on this
    /// disk: each readable one is probed like a partition.
    fn logical_volumes(&mut self, d: &Shared, out: &mut Vec<VolumeInfo>) {
        let here: Vec<(String, u64, u64)> = self
            .pvs
            .iter()
            .map(|(_, p)| (p.uuid.clone(), p.start, p.len))
            .collect();
        let pvs = std::mem::take(&mut self.pvs);
        let mut seen: Vec<String> = Vec::new();
        for (part, pv) in &pvs {
            let vg = match &pv.vg {
                Some(Ok(vg)) => vg,
                Some(Err(e)) => {
                    self.why.push(format!("partition {part}: {e}"));
                    continue;
                }
                // Its VG's metadata is kept on the group's other PVs
                // only: said below unless one of them is on this disk.
                None => continue,
            };
            if seen.contains(&vg.name) {
                continue;
            }
            seen.push(vg.name.clone());
            for lv in &vg.lvs {
                let name = format!("{}/{}", vg.name, lv.name);
                let mut info = VolumeInfo {
                    name: name.clone(),
                    size: lv.size,
                    partition: *part,
                    filesystem: None,
                    reason: None,
                };
                match lvm::LvDisk::new(d.clone(), vg, lv, &here) {
                    Ok(disk) => {
                        let sd = Shared::new(Box::new(disk));
                        let id = probe(&sd, 0, lv.size);
                        info.filesystem = id.as_ref().map(|i| i.kind.clone());
                        self.sort_out(
                            &sd,
                            (format!("LV {name}"), *part),
                            Some(name.clone()),
                            (0, lv.size),
                            id,
                        );
                    }
                    Err(e) => {
                        self.why.push(format!("LV {name}: {e}"));
                        info.reason = Some(e);
                    }
                }
                out.push(info);
            }
        }
        for (part, pv) in pvs.iter().filter(|(_, p)| p.vg.is_none()) {
            let described = pvs.iter().any(|(_, o)| {
                matches!(&o.vg, Some(Ok(vg)) if vg.pvs.iter().any(|(_, u, _)| *u == pv.uuid))
            });
            if !described {
                self.why.push(format!(
                    "partition {part}: LVM: PV {} holds no metadata and no PV on this disk describes it",
                    pv.uuid
                ));
            }
        }
        self.pvs = pvs;
    }
}

/// Inspects a disk.
pub fn inspect(disk: Box<dyn Disk>) -> Inspection {
    let d = Shared::new(disk);
    let size = d.size();
    let mut out = Inspection {
        reason: None,
        size,
        ..Inspection::unknown(String::new())
    };
    let mut read = |off: u64, buf: &mut [u8]| d.read_at(off, buf);
    let parts = match cdm_disk::partition::read_table(&mut read, size) {
        Ok(p) => p,
        Err(e) => {
            out.partition_table = "invalid".into();
            out.reason = Some(e.to_string());
            out.bytes_read = d.bytes_read();
            return out;
        }
    };
    if let Some(p) = parts.first() {
        out.partition_table = if p.kind.starts_with("gpt") {
            "gpt"
        } else {
            "mbr"
        }
        .into();
    }
    let list: Vec<PartInfo> = if parts.is_empty() {
        vec![PartInfo {
            number: 0,
            start: 0,
            len: size,
            kind: "disk".into(),
            bootable: false,
            filesystem: None,
        }]
    } else {
        parts
            .iter()
            .map(|p| PartInfo {
                number: p.number,
                start: p.start,
                len: p.len,
                kind: p.kind.clone(),
                bootable: p.bootable,
                filesystem: None,
            })
            .collect()
    };
    let mut lay = Layout::default();
    for mut p in list {
        let end = p.start.checked_add(p.len);
        if end.is_none_or(|e| e > size) {
            lay.why.push(format!(
                "partition {} runs past the end of the disk",
                p.number
            ));
            out.partitions.push(p);
            continue;
        }
        let id = probe(&d, p.start, p.len);
        p.filesystem = id.as_ref().map(|i| i.kind.clone());
        lay.sort_out(
            &d,
            (format!("partition {}", p.number), p.number),
            None,
            (p.start, p.len),
            id,
        );
        out.partitions.push(p);
    }
    lay.logical_volumes(&d, &mut out.volumes);
    let Layout { found, mut why, .. } = lay;
    let mut views: Vec<Option<Box<dyn fsview::FsView>>> = found
        .iter()
        .map(|f| {
            open_view(f)
                .map_err(|e| why.push(format!("{}: {e}", f.name)))
                .ok()
        })
        .collect();
    // The root: the first filesystem showing an operating system, with
    // what its /etc/fstab mounts where the OS and applications live.
    let mut root: Option<(usize, fstab::Mounted)> = None;
    for i in 0..views.len() {
        let Some(v) = views[i].take() else {
            continue;
        };
        let mut m = fstab::Mounted::new(v, &found, &mut views, i);
        if let Some(os) = detect::os(&mut m) {
            out.root = Some(found[i].part);
            out.root_volume = found[i].lv.clone();
            out.os = Some(os);
            out.mounts = m.info(&found);
            root = Some((i, m));
            break;
        }
        views[i] = Some(m.unmount(&mut views));
    }
    for (i, view) in views.iter_mut().enumerate() {
        let found_apps = match (&mut root, view.as_mut()) {
            (Some((r, m)), _) if *r == i => detect::apps(m),
            (_, Some(v)) => detect::apps(v.as_mut()),
            _ => continue,
        };
        for a in found_apps {
            if !out.apps.iter().any(|x| x.name == a.name) {
                out.apps.push(a);
            }
        }
    }
    out.apps.sort_by(|a, b| a.name.cmp(&b.name));
    if out.os.is_some() {
        out.status = "ok".into();
    } else {
        out.reason = Some(if why.is_empty() {
            "no operating system found".into()
        } else {
            format!("no operating system found: {}", why.join("; "))
        });
    }
    out.bytes_read = d.bytes_read();
    out
}
