//! VM inspection without booting (libguestfs's method, in process): the
//! partition table, each partition's filesystem (ext2/3/4 with
//! `ext4-view`, NTFS with the `ntfs` crate, XFS with our own reader), the operating system from its
//! configuration files (`/etc/os-release` and the distributions' release
//! files; the Windows registry's `SOFTWARE` and `SYSTEM` hives) and the
//! applications it holds, each with the file or key that gave it away.
//! Disks are anything that reads at an offset ([`Disk`]): an image file,
//! an NBD export. Only metadata is read; [`Inspection::bytes_read`] says
//! how much. Bad disks are "unknown" with a reason, never a panic.

pub mod browse;
pub mod category;
pub mod detect;
pub mod fsview;
pub mod inventory;
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
        }
    }
}

fn probe(d: &Shared, start: u64, len: u64) -> Option<String> {
    let mut b = vec![0u8; 2048];
    if len < 2048 || d.read_at(start, &mut b).is_err() {
        return None;
    }
    if &b[3..11] == b"NTFS    " {
        return Some("ntfs".into());
    }
    if &b[..4] == b"XFSB" {
        return Some("xfs".into());
    }
    if u16::from_le_bytes([b[1024 + 0x38], b[1024 + 0x39]]) == 0xef53 {
        return Some("ext4".into());
    }
    if &b[..6] == b"LUKS\xba\xbe" {
        return Some("luks".into());
    }
    None
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
    let mut why: Vec<String> = Vec::new();
    for mut p in list {
        let end = p.start.checked_add(p.len);
        if end.is_none_or(|e| e > size) {
            why.push(format!(
                "partition {} runs past the end of the disk",
                p.number
            ));
            out.partitions.push(p);
            continue;
        }
        p.filesystem = probe(&d, p.start, p.len);
        let view: Option<Result<Box<dyn fsview::FsView>, String>> = match p.filesystem.as_deref() {
            Some("ext4") => Some(fsview::ext4(d.clone(), p.start, p.len)),
            Some("ntfs") => Some(fsview::ntfs(d.clone(), p.start, p.len)),
            Some("xfs") => Some(fsview::xfs(d.clone(), p.start, p.len)),
            Some("luks") => {
                why.push(format!("partition {} is encrypted (LUKS)", p.number));
                None
            }
            Some(other) => {
                why.push(format!(
                    "partition {}: {other} is not readable here",
                    p.number
                ));
                None
            }
            None => {
                why.push(format!("partition {}: no filesystem recognised", p.number));
                None
            }
        };
        match view {
            Some(Ok(mut v)) => {
                if out.os.is_none() {
                    if let Some(os) = detect::os(v.as_mut()) {
                        out.root = Some(p.number);
                        out.os = Some(os);
                    }
                }
                for a in detect::apps(v.as_mut()) {
                    if !out.apps.iter().any(|x| x.name == a.name) {
                        out.apps.push(a);
                    }
                }
            }
            Some(Err(e)) => why.push(format!("partition {}: {e}", p.number)),
            None => {}
        }
        out.partitions.push(p);
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
