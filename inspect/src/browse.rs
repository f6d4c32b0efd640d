//! The file-level restore's readers for XFS and NTFS, behind
//! `cdm_disk::browse::Browsable` (ext4's is in `cdm_disk`), and [`open`],
//! which finds which of the three a partition holds. NTFS goes through
//! the `ntfs` crate (third-party: every call guarded, a panic on a
//! crafted volume becomes an "unreadable" error); XFS through our own
//! reader (`xfs.rs`), which must not panic on any bytes.

use std::cell::RefCell;
use std::io::{BufReader, Read, SeekFrom};

use cdm_disk::browse::{Browsable, BrowseError, Entry};
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsFile, NtfsReadSeek};

use crate::fsview::Part;
use crate::xfs::{Inode, Xfs, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use crate::Shared;

fn unreadable(m: impl Into<String>) -> BrowseError {
    BrowseError::Unreadable(m.into())
}

/// Opens the filesystem in `[start, start + len)` of `d`, whichever of
/// ext4, XFS and NTFS it is (by its superblock's magic).
pub fn open(d: Shared, start: u64, len: u64) -> Result<Box<dyn Browsable>, BrowseError> {
    let mut b = vec![0u8; 2048];
    if len < 2048 {
        return Err(unreadable(format!(
            "{len} bytes is too small for a filesystem"
        )));
    }
    d.read_at(start, &mut b)
        .map_err(|e| unreadable(format!("cannot read the first sectors: {e}")))?;
    let part = Part {
        d: d.clone(),
        start,
        len,
        pos: 0,
    };
    if &b[3..11] == b"NTFS    " {
        return Ok(Box::new(NtfsFs::open(part)?));
    }
    if &b[..4] == b"XFSB" {
        let x = Xfs::open(d, start, len).map_err(|e| unreadable(e.to_string()))?;
        // Downloads read whole files and tars whole trees: allow reading
        // the filesystem a few times over, still bounded against loops.
        x.set_budget(len.saturating_mul(4).max(1 << 30));
        return Ok(Box::new(XfsFs(x)));
    }
    if u16::from_le_bytes([b[1024 + 0x38], b[1024 + 0x39]]) == 0xef53 {
        return Ok(Box::new(cdm_disk::browse::load(Box::new(part), len)?));
    }
    Err(unreadable(
        "no ext4, XFS or NTFS filesystem (unknown superblock)",
    ))
}

fn parent_and_name(path: &str) -> Option<(&str, &str)> {
    let p = path.trim_end_matches('/');
    let (parent, name) = p.rsplit_once('/')?;
    Some((if parent.is_empty() { "/" } else { parent }, name))
}

/// An XFS filesystem as the file browser reads it.
pub struct XfsFs(Xfs);

fn xfs_kind(mode: u16) -> &'static str {
    match mode & S_IFMT {
        S_IFREG => "file",
        S_IFDIR => "dir",
        S_IFLNK => "symlink",
        0o060000 => "block",
        0o020000 => "char",
        0o010000 => "fifo",
        _ => "socket",
    }
}

impl XfsFs {
    /// A directory (symlinks followed).
    fn dir(&self, path: &str) -> Result<Inode, BrowseError> {
        let i = self
            .0
            .resolve(path)
            .ok_or_else(|| BrowseError::NotFound(format!("path {path}")))?;
        if i.mode & S_IFMT != S_IFDIR {
            return Err(BrowseError::Invalid(format!("{path}: not a directory")));
        }
        Ok(i)
    }

    /// The inode at `path`, the last component not followed.
    fn lstat(&self, path: &str) -> Result<Inode, BrowseError> {
        let Some((parent, name)) = parent_and_name(path) else {
            return self
                .0
                .inode(self.0.root)
                .map_err(|e| unreadable(e.to_string()));
        };
        if name.is_empty() {
            return self
                .0
                .inode(self.0.root)
                .map_err(|e| unreadable(e.to_string()));
        }
        let dir = self.dir(parent)?;
        let ino = self
            .0
            .dir(&dir)
            .map_err(|e| unreadable(format!("{parent}: {e}")))?
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BrowseError::NotFound(format!("path {path}")))?
            .1;
        self.0
            .inode(ino)
            .map_err(|e| unreadable(format!("{path}: {e}")))
    }
}

impl Browsable for XfsFs {
    fn fs_type(&self) -> &'static str {
        "xfs"
    }

    fn entry(&self, path: &str, name: String) -> Result<Entry, BrowseError> {
        let i = self.lstat(path)?;
        let target = if i.mode & S_IFMT == S_IFLNK {
            Some(
                self.0
                    .symlink_target(&i)
                    .map_err(|e| unreadable(format!("{path}: {e}")))?,
            )
        } else {
            None
        };
        Ok(Entry {
            name,
            path: path.to_string(),
            kind: xfs_kind(i.mode).into(),
            size: i.size,
            mode: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            target,
        })
    }

    fn names(&self, path: &str) -> Result<Vec<String>, BrowseError> {
        let dir = self.dir(path)?;
        Ok(self
            .0
            .dir(&dir)
            .map_err(|e| unreadable(format!("{path}: {e}")))?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "." && n != "..")
            .collect())
    }

    fn open(&self, path: &str) -> Result<(u64, Box<dyn Read + '_>), BrowseError> {
        let i = self
            .0
            .resolve(path)
            .ok_or_else(|| BrowseError::NotFound(format!("path {path}")))?;
        if i.mode & S_IFMT != S_IFREG {
            return Err(BrowseError::Invalid(format!("{path}: not a regular file")));
        }
        let extents = self
            .0
            .extents(&i)
            .map_err(|e| unreadable(format!("{path}: {e}")))?;
        Ok((
            i.size,
            Box::new(XfsReader {
                x: &self.0,
                extents,
                size: i.size,
                pos: 0,
            }),
        ))
    }
}

/// An XFS file read extent by extent; holes and unwritten extents read as
/// zeros.
struct XfsReader<'a> {
    x: &'a Xfs,
    /// (file offset, disk offset or `None`, length), sorted and disjoint.
    extents: Vec<(u64, Option<u64>, u64)>,
    size: u64,
    pos: u64,
}

impl Read for XfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.size.saturating_sub(self.pos);
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = left.min(buf.len() as u64);
        let pos = self.pos;
        let here = self
            .extents
            .iter()
            .find(|&&(off, _, len)| off <= pos && pos < off.saturating_add(len));
        let n = match here {
            Some(&(off, disk, len)) => {
                let n = want.min(off + len - pos) as usize;
                match disk {
                    Some(d) => self
                        .x
                        .read(d + (pos - off), &mut buf[..n])
                        .map_err(std::io::Error::other)?,
                    None => buf[..n].fill(0),
                }
                n
            }
            None => {
                // A hole: zeros up to the next extent.
                let next = self
                    .extents
                    .iter()
                    .map(|&(off, _, _)| off)
                    .filter(|&off| off > pos)
                    .min()
                    .unwrap_or(u64::MAX);
                let n = want.min(next - pos) as usize;
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// An NTFS filesystem as the file browser reads it. Names are compared as
/// Windows does (case-insensitively); NTFS has no POSIX modes or owners,
/// so entries show 0755 for directories, 0644 for files and owner 0.
pub struct NtfsFs {
    ntfs: Ntfs,
    fs: RefCell<Part>,
}

/// Runs a call into the `ntfs` crate, turning a panic into an error.
/// Under `cfg(fuzzing)` nothing is caught, so the fuzzer sees them.
#[cfg(not(fuzzing))]
fn guard<T>(f: impl FnOnce() -> Result<T, BrowseError>) -> Result<T, BrowseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(unreadable(
            "the NTFS reader failed on this volume (a damaged filesystem)",
        ))
    })
}

#[cfg(fuzzing)]
fn guard<T>(f: impl FnOnce() -> Result<T, BrowseError>) -> Result<T, BrowseError> {
    f()
}

fn ntfs_err(path: &str) -> impl Fn(ntfs::NtfsError) -> BrowseError + '_ {
    move |e| unreadable(format!("NTFS: {path}: {e}"))
}

/// Records below 24 are NTFS's own metadata ($MFT, $Bitmap, the root's
/// "." …), not the user's files.
const FIRST_USER_RECORD: u64 = 24;

impl NtfsFs {
    fn open(mut part: Part) -> Result<NtfsFs, BrowseError> {
        let ntfs = guard(|| {
            let mut n = Ntfs::new(&mut part).map_err(ntfs_err("/"))?;
            n.read_upcase_table(&mut part).map_err(ntfs_err("/"))?;
            Ok(n)
        })?;
        Ok(NtfsFs {
            ntfs,
            fs: RefCell::new(part),
        })
    }

    /// The file at `path` (call inside [`guard`]).
    fn lookup(&self, fs: &mut Part, path: &str) -> Result<NtfsFile<'_>, BrowseError> {
        let mut file = self.ntfs.root_directory(fs).map_err(ntfs_err(path))?;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !file.is_directory() {
                return Err(BrowseError::NotFound(format!("path {path}")));
            }
            let index = file.directory_index(fs).map_err(ntfs_err(path))?;
            let mut finder = index.finder();
            let entry = NtfsFileNameIndex::find(&mut finder, &self.ntfs, fs, comp)
                .ok_or_else(|| BrowseError::NotFound(format!("path {path}")))?
                .map_err(ntfs_err(path))?;
            if entry.file_reference().file_record_number() < FIRST_USER_RECORD {
                return Err(BrowseError::NotFound(format!("path {path}")));
            }
            file = entry.to_file(&self.ntfs, fs).map_err(ntfs_err(path))?;
        }
        Ok(file)
    }
}

impl Browsable for NtfsFs {
    fn fs_type(&self) -> &'static str {
        "ntfs"
    }

    fn entry(&self, path: &str, name: String) -> Result<Entry, BrowseError> {
        let fs = &mut *self.fs.borrow_mut();
        guard(|| {
            let file = self.lookup(fs, path)?;
            let dir = file.is_directory();
            let size = if dir {
                0
            } else {
                match file.data(fs, "") {
                    Some(item) => item
                        .map_err(ntfs_err(path))?
                        .to_attribute()
                        .map_err(ntfs_err(path))?
                        .value_length(),
                    None => 0,
                }
            };
            Ok(Entry {
                name,
                path: path.to_string(),
                kind: if dir { "dir" } else { "file" }.into(),
                size,
                mode: if dir { 0o755 } else { 0o644 },
                uid: 0,
                gid: 0,
                target: None,
            })
        })
    }

    fn names(&self, path: &str) -> Result<Vec<String>, BrowseError> {
        let fs = &mut *self.fs.borrow_mut();
        guard(|| {
            let dir = self.lookup(fs, path)?;
            if !dir.is_directory() {
                return Err(BrowseError::Invalid(format!("{path}: not a directory")));
            }
            let index = dir.directory_index(fs).map_err(ntfs_err(path))?;
            let mut it = index.entries();
            let mut names = Vec::new();
            while let Some(e) = it.next(fs) {
                let e = e.map_err(ntfs_err(path))?;
                if e.file_reference().file_record_number() < FIRST_USER_RECORD {
                    continue;
                }
                let Some(k) = e.key() else { continue };
                let k = k.map_err(ntfs_err(path))?;
                // A long name may have a DOS 8.3 alias: list it once.
                if k.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                names.push(k.name().to_string_lossy());
            }
            Ok(names)
        })
    }

    fn open(&self, path: &str) -> Result<(u64, Box<dyn Read + '_>), BrowseError> {
        let e = self.entry(path, String::new())?;
        if e.kind != "file" {
            return Err(BrowseError::Invalid(format!("{path}: not a regular file")));
        }
        let r = NtfsReader {
            fs: self,
            path: path.to_string(),
            pos: 0,
            len: e.size,
        };
        // Each read finds the file again (its attribute borrows it): read
        // in large pieces so that costs little.
        Ok((e.size, Box::new(BufReader::with_capacity(1 << 20, r))))
    }
}

struct NtfsReader<'a> {
    fs: &'a NtfsFs,
    path: String,
    pos: u64,
    len: u64,
}

impl Read for NtfsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let this = self.fs;
        let path = self.path.as_str();
        let pos = self.pos;
        let fs = &mut *this.fs.borrow_mut();
        let n = guard(|| {
            let file = this.lookup(fs, path)?;
            let item = file
                .data(fs, "")
                .ok_or_else(|| unreadable(format!("{path}: no data stream")))?
                .map_err(ntfs_err(path))?;
            let attr = item.to_attribute().map_err(ntfs_err(path))?;
            let mut v = attr.value(fs).map_err(ntfs_err(path))?;
            v.seek(fs, SeekFrom::Start(pos)).map_err(ntfs_err(path))?;
            v.read(fs, buf).map_err(ntfs_err(path))
        })
        .map_err(std::io::Error::other)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "{path}: the data stream ends at {pos}, before its length {}",
                self.len
            )));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    //! Real XFS and NTFS images made by mkfs.xfs (from a protofile) and
    //! mkntfs + ntfs-3g, read back through the file browser's functions.
    use super::*;
    use cdm_disk::browse::{copy_file, list, stat, tar_tree};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn run(c: &mut Command) {
        let out = c.output().expect("tool runs");
        assert!(out.status.success(), "{c:?}: {out:?}");
    }

    /// 3 MiB that are not all alike (so a misplaced read shows).
    fn big() -> Vec<u8> {
        (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    fn open_image(p: &Path) -> Box<dyn Browsable> {
        let d = Shared::new(Box::new(crate::FileDisk::open(p).unwrap()));
        let len = d.size();
        open(d, 0, len).unwrap()
    }

    fn xfs_image(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("etc/sub")).unwrap();
        std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
        std::fs::write(src.join("etc/sub/big.bin"), big()).unwrap();
        let proto = format!(
            "/dev/null\n0 0\nd--755 0 0\n etc d--750 7 8\n  hosts ---640 7 8 {}\n  sub d--755 0 0\n   big.bin ---644 0 0 {}\n  $\n  link l--777 0 0 hosts\n $\n$\n",
            src.join("etc/hosts").display(),
            src.join("etc/sub/big.bin").display()
        );
        // 3000 entries: a directory whose extents are in B+tree format.
        let mut proto = proto.strip_suffix("$\n").unwrap().to_string();
        proto.push_str(" many d--755 0 0\n");
        for k in 0..3000 {
            proto.push_str(&format!(
                "  entry-with-a-long-name-{k:05} ---644 0 0 {}\n",
                src.join("etc/hosts").display()
            ));
        }
        proto.push_str(" $\n$\n");
        let pf = dir.join("proto");
        std::fs::write(&pf, proto).unwrap();
        let img = dir.join("xfs.img");
        run(Command::new("truncate").args(["-s", "320M"]).arg(&img));
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-p"])
            .arg(&pf)
            .arg(&img));
        img
    }

    fn ntfs_image(dir: &Path) -> PathBuf {
        let img = dir.join("ntfs.img");
        run(Command::new("truncate").args(["-s", "32M"]).arg(&img));
        run(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&img));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("ntfs-3g").arg(&img).arg(&mnt));
        let fill = || -> std::io::Result<()> {
            std::fs::create_dir_all(mnt.join("Users/Public/Documents"))?;
            std::fs::write(mnt.join("Users/Public/readme.txt"), b"hello from NTFS\n")?;
            std::fs::write(
                mnt.join("Users/Public/Documents/Quarterly Report.bin"),
                big(),
            )?;
            Ok(())
        };
        let r = fill();
        // ntfs-3g may still be busy with the last writes: wait until the
        // unmount is accepted (polling, generous bound).
        let mut tries = 0;
        while !Command::new("umount").arg(&mnt).status().unwrap().success() {
            tries += 1;
            assert!(tries < 600, "cannot unmount {mnt:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        r.unwrap();
        img
    }

    fn tar_names(fs: &dyn Browsable, path: &str, dir: &Path) -> Vec<String> {
        let mut t = Vec::new();
        tar_tree(fs, path, &mut t).unwrap();
        let tp = dir.join("out.tar");
        std::fs::write(&tp, &t).unwrap();
        let out = Command::new("tar").arg("-tf").arg(&tp).output().unwrap();
        assert!(out.status.success());
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    fn download(fs: &dyn Browsable, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut size = 0;
        let n = copy_file(fs, path, &mut |s| size = s, &mut out).unwrap();
        assert_eq!((n, size), (out.len() as u64, out.len() as u64));
        out
    }

    #[test]
    fn xfs_lists_stats_streams_and_tars() {
        let dir = tempfile::tempdir().unwrap();
        let fs = open_image(&xfs_image(dir.path()));
        assert_eq!(fs.fs_type(), "xfs");
        let root: Vec<_> = list(&*fs, "/", 0, 100).unwrap();
        assert_eq!(root.len(), 2);
        assert_eq!(
            (root[0].name.as_str(), root[0].kind.as_str()),
            ("etc", "dir")
        );
        let many = list(&*fs, "/many", 0, 5000).unwrap();
        assert_eq!(many.len(), 3000);
        assert_eq!(many[2999].name, "entry-with-a-long-name-02999");
        assert_eq!(many[2999].size, 20);
        assert_eq!(root[0].mode, 0o750);
        let etc: Vec<_> = list(&*fs, "/etc", 0, 100).unwrap();
        let names: Vec<_> = etc
            .iter()
            .map(|e| (e.name.as_str(), e.kind.as_str()))
            .collect();
        assert_eq!(
            names,
            [("hosts", "file"), ("link", "symlink"), ("sub", "dir")]
        );
        let hosts = stat(&*fs, "/etc/hosts").unwrap();
        assert_eq!(
            (hosts.size, hosts.mode, hosts.uid, hosts.gid),
            (20, 0o640, 7, 8)
        );
        assert_eq!(
            stat(&*fs, "/etc/link").unwrap().target.as_deref(),
            Some("hosts")
        );
        assert_eq!(download(&*fs, "/etc/hosts"), b"127.0.0.1 localhost\n");
        assert_eq!(download(&*fs, "/etc/link"), b"127.0.0.1 localhost\n");
        assert!(download(&*fs, "/etc/sub/big.bin") == big());
        assert_eq!(
            tar_names(&*fs, "/etc", dir.path()),
            ["./", "hosts", "link", "sub/", "sub/big.bin"]
        );
        assert!(matches!(
            stat(&*fs, "/etc/nope"),
            Err(BrowseError::NotFound(_))
        ));
        assert!(matches!(
            list(&*fs, "/etc/hosts", 0, 9),
            Err(BrowseError::Invalid(_))
        ));
    }

    #[test]
    fn ntfs_lists_stats_streams_and_tars() {
        let dir = tempfile::tempdir().unwrap();
        let fs = open_image(&ntfs_image(dir.path()));
        assert_eq!(fs.fs_type(), "ntfs");
        // NTFS's own files ($MFT, …) are not shown.
        let root: Vec<_> = list(&*fs, "/", 0, 100).unwrap();
        assert!(root.iter().all(|e| !e.name.starts_with('$')), "{root:?}");
        assert!(root.iter().any(|e| e.name == "Users" && e.kind == "dir"));
        let p: Vec<_> = list(&*fs, "/Users/Public", 0, 100).unwrap();
        let names: Vec<_> = p
            .iter()
            .map(|e| (e.name.as_str(), e.kind.as_str(), e.size))
            .collect();
        assert_eq!(names, [("Documents", "dir", 0), ("readme.txt", "file", 16)]);
        // Windows compares names without case.
        assert_eq!(
            download(&*fs, "/users/public/README.TXT"),
            b"hello from NTFS\n"
        );
        assert!(download(&*fs, "/Users/Public/Documents/Quarterly Report.bin") == big());
        assert_eq!(
            tar_names(&*fs, "/Users/Public", dir.path()),
            [
                "./",
                "Documents/",
                "Documents/Quarterly Report.bin",
                "readme.txt"
            ]
        );
        assert!(matches!(
            stat(&*fs, "/Users/nope"),
            Err(BrowseError::NotFound(_))
        ));
        assert!(matches!(stat(&*fs, "/$MFT"), Err(BrowseError::NotFound(_))));
    }

    #[test]
    fn damaged_or_unknown_filesystems_are_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        for img in [xfs_image(dir.path()), ntfs_image(dir.path())] {
            // Wipe everything after the first sector's magic: the
            // superblock's numbers are gone.
            let mut b = std::fs::read(&img).unwrap();
            b.truncate(8 << 20);
            b[64..8 << 20].fill(0xff);
            let bad = dir.path().join("bad.img");
            std::fs::write(&bad, &b).unwrap();
            let d = Shared::new(Box::new(crate::FileDisk::open(&bad).unwrap()));
            let len = d.size();
            let r = open(d, 0, len).and_then(|fs| list(&*fs, "/", 0, 10).map(|_| ()));
            assert!(matches!(r, Err(BrowseError::Unreadable(_))), "{r:?}");
        }
        let zeros = dir.path().join("zeros.img");
        std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
        let d = Shared::new(Box::new(crate::FileDisk::open(&zeros).unwrap()));
        assert!(matches!(
            open(d, 0, 1 << 20),
            Err(BrowseError::Unreadable(_))
        ));
    }
}
