//! Incremental-forever merge of a file tree into the mounted stage disk.
//!
//! Every run reads every source file in blocks, hashes each block (BLAKE3,
//! first 128 bits) and compares it with the fingerprint file the last run
//! left; only blocks whose hash differs are written (and of those only the
//! 4 KiB units whose bytes differ from the stage's), new files are written
//! without their zero blocks (holes), shrunk files are truncated, files and
//! directories that are gone are removed, and owner, mode and mtime follow
//! the source.
//!
//! Where: the fingerprint file is kept on the host, in the agent's state
//! directory (`STATE/merge/VOLUME.fp`), and the stage disk holds only its
//! BLAKE3 hash (`.cdm/fingerprints.id`, 72 bytes). The fingerprints change
//! at scattered places on every run (one hash per changed block), so a copy
//! on the stage disk was rewritten whole into every snapshot (16 bytes per
//! 8 KiB of source: 2 MB per point for a 1 GB database). A stage disk of
//! the previous layout (`.cdm/fingerprints` on the stage) is still read,
//! and moved to the host by the next run.
//!
//! Trust: the run first writes and syncs `.cdm/in-progress`, and removes it
//! only after the new fingerprint file is in place (written aside, synced,
//! renamed) and its hash recorded on the stage. A run that finds the
//! marker, a fingerprint file that fails its checksum, is missing here (the
//! last run was made from another host, or the state directory was lost),
//! does not hash to what the stage records, or was made with another block
//! size, does not trust it: it compares against the bytes on the stage disk
//! instead (slower: it reads them back), so a backup cut half way never
//! leaves a stale block behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::throttle::Throttle;

pub const MAGIC: &[u8; 8] = b"CDMFP001";
pub const META_DIR: &str = ".cdm";
const FINGERPRINTS: &str = "fingerprints";
const FINGERPRINTS_ID: &str = "fingerprints.id";
const ID_MAGIC: &[u8; 8] = b"CDMFPID1";
const MARKER: &str = "in-progress";
const IO_BYTES: usize = 1 << 20;
/// The block a stage filesystem (ext4, xfs) writes: the unit of what a
/// merge rewrites.
const UNIT: u64 = 4096;

pub use crate::statefile::Hash;
use crate::statefile::{self, hash, DecodeError, Untrusted};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the stage disk is full while writing {0} (grow the volume and its filesystem, or back up to a larger stage disk)")]
    NoSpace(PathBuf),
    #[error("{0}")]
    Unsupported(String),
    /// Whatever stopped the caller's part (a database refusing to end
    /// its backup).
    #[error("{0}")]
    Other(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            MergeError::NoSpace(path.to_path_buf())
        } else {
            MergeError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    }
}

/// Owner, mode and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_ns: u32,
}

impl Meta {
    pub fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
        }
    }
}

/// Where an entry's content comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Dir,
    Symlink(PathBuf),
    /// A file; with `keep`, only those byte ranges are read and the rest
    /// of the file is zeros (WAL segments: only the part a restore needs).
    File {
        path: PathBuf,
        keep: Option<Vec<(u64, u64)>>,
    },
    /// Bytes made by the agent (backup_label, a summary).
    Data(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// Relative to the stage root; no `..`, not absolute.
    pub rel: PathBuf,
    pub source: Source,
    pub meta: Meta,
}

/// What the fingerprint file records of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    kind: u8,
    meta: Meta,
    size: u64,
    link: Vec<u8>,
    hashes: Vec<Hash>,
}

const K_DIR: u8 = 0;
const K_FILE: u8 = 1;
const K_LINK: u8 = 2;

#[derive(Clone, Debug, Default, Serialize)]
pub struct MergeStats {
    pub files: u64,
    pub dirs: u64,
    pub new_files: u64,
    pub changed_files: u64,
    pub removed: u64,
    pub vanished: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes of stage files that became zeros, made holes.
    pub bytes_punched: u64,
    pub blocks: u64,
    pub changed_blocks: u64,
    pub block_size: u32,
    /// "trusted", or why the last fingerprints were not used.
    pub fingerprints: String,
    /// Seconds spent waiting for the bandwidth limit.
    pub throttled_seconds: f64,
}

type Manifest = HashMap<PathBuf, Record>;

fn encode(block_size: u32, m: &[(PathBuf, Record)]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut w = statefile::Writer::new(MAGIC, 64 + m.len() * 64);
    w.u32(block_size);
    w.u64(m.len() as u64);
    for (p, r) in m {
        let pb = p.as_os_str().as_bytes();
        w.u32(pb.len() as u32);
        w.bytes(pb);
        w.u8(r.kind);
        w.u32(r.meta.mode);
        w.u32(r.meta.uid);
        w.u32(r.meta.gid);
        w.i64(r.meta.mtime);
        w.u32(r.meta.mtime_ns);
        w.u64(r.size);
        w.u32(r.link.len() as u32);
        w.bytes(&r.link);
        w.u32(r.hashes.len() as u32);
        w.hashes(&r.hashes);
    }
    w.finish()
}

/// Parses a fingerprint file (outside bytes: a damaged stage disk can hold
/// anything). The block size and the number of entries.
pub fn decode(b: &[u8]) -> Result<(u32, usize), DecodeError> {
    decode_records(b).map(|(bs, m)| (bs, m.len()))
}

fn decode_records(b: &[u8]) -> Result<(u32, Vec<(PathBuf, Record)>), DecodeError> {
    use std::os::unix::ffi::OsStrExt;
    let mut c = statefile::Reader::open(b, MAGIC, 4 + 8, "fingerprint file")?;
    let bs = c.u32()?;
    let n = c.u64()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let pl = c.u32()? as usize;
        let p = PathBuf::from(std::ffi::OsStr::from_bytes(c.take(pl)?));
        let kind = c.u8()?;
        let meta = Meta {
            mode: c.u32()?,
            uid: c.u32()?,
            gid: c.u32()?,
            mtime: c.i64()?,
            mtime_ns: c.u32()?,
        };
        let size = c.u64()?;
        let ll = c.u32()? as usize;
        let link = c.take(ll)?.to_vec();
        let nh = c.u32()?;
        let hashes = c.hashes(u64::from(nh))?;
        out.push((
            p,
            Record {
                kind,
                meta,
                size,
                link,
                hashes,
            },
        ));
    }
    c.finish()?;
    Ok((bs, out))
}

fn sync_dir(p: &Path) -> Result<(), MergeError> {
    File::open(p).and_then(|f| f.sync_all()).map_err(io(p))
}

/// Writes `b` to `p` durably: aside, synced, renamed, directory synced.
fn replace(p: &Path, b: &[u8]) -> Result<(), MergeError> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(b).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, p).map_err(io(p))?;
    sync_dir(p.parent().unwrap_or(Path::new("/")))
}

/// Where the agent keeps the fingerprints of the file-tree merges into
/// stage volume `volume` (state directory `state`).
pub fn host_fingerprints(state: &Path, volume: &str) -> PathBuf {
    state.join("merge").join(format!("{volume}.fp"))
}

/// The last run's fingerprints, or why they cannot be trusted: the host's
/// file when it hashes to what the stage records, or a stage of the
/// previous layout's own file.
fn load(root: &Path, host_fp: &Path, block_size: u32) -> Result<Manifest, Untrusted> {
    let meta = root.join(META_DIR);
    let marker = meta.join(MARKER);
    let b = match std::fs::read(meta.join(FINGERPRINTS_ID)) {
        Ok(id) => {
            if marker.exists() {
                return Err(Untrusted::Unfinished);
            }
            let mut r = statefile::Reader::open(&id, ID_MAGIC, 32, "fingerprint id file")?;
            let want = r.take(32)?.to_vec();
            r.finish()?;
            let b = std::fs::read(host_fp).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Untrusted::NotOnThisHost
                } else {
                    Untrusted::Io(e)
                }
            })?;
            if blake3::hash(&b).as_bytes()[..] != want[..] {
                return Err(Untrusted::NotTheLastRun);
            }
            b
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            statefile::read_unless_cut(&marker, &meta.join(FINGERPRINTS))?
        }
        Err(e) => return Err(Untrusted::Io(e)),
    };
    let (bs, m) = decode_records(&b)?;
    if bs != block_size {
        return Err(Untrusted::OtherBlockSize(bs));
    }
    Ok(m.into_iter().collect())
}

/// Walks the stage tree (what is there when fingerprints are not trusted).
fn scan(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, u8)>) -> Result<(), MergeError> {
    let dir = root.join(rel);
    let rd = std::fs::read_dir(&dir).map_err(io(&dir))?;
    for e in rd {
        let e = e.map_err(io(&dir))?;
        let r = rel.join(e.file_name());
        if rel.as_os_str().is_empty()
            && (e.file_name() == META_DIR || e.file_name() == "lost+found")
        {
            continue;
        }
        let ft = e.file_type().map_err(io(&r))?;
        if ft.is_dir() {
            out.push((r.clone(), K_DIR));
            scan(root, &r, out)?;
        } else if ft.is_symlink() {
            out.push((r, K_LINK));
        } else {
            out.push((r, K_FILE));
        }
    }
    Ok(())
}

fn kind_of(s: &Source) -> u8 {
    match s {
        Source::Dir => K_DIR,
        Source::Symlink(_) => K_LINK,
        Source::File { .. } | Source::Data(_) => K_FILE,
    }
}

fn remove(p: &Path) -> Result<(), MergeError> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(io(p))
}

fn set_meta(p: &Path, m: &Meta, link: bool) -> Result<(), MergeError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| MergeError::Unsupported(format!("{}: NUL in path", p.display())))?;
    let last = || MergeError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: valid C string; plain syscalls.
    unsafe {
        if libc::lchown(c.as_ptr(), m.uid, m.gid) != 0 {
            return Err(last());
        }
        if !link && libc::chmod(c.as_ptr(), m.mode as libc::mode_t) != 0 {
            return Err(last());
        }
        let ts = [
            libc::timespec {
                tv_sec: m.mtime as libc::time_t,
                tv_nsec: m.mtime_ns as _,
            },
            libc::timespec {
                tv_sec: m.mtime as libc::time_t,
                tv_nsec: m.mtime_ns as _,
            },
        ];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(last());
        }
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `off` of a source; with `keep`, bytes
/// outside the ranges read as zeros. Fewer bytes only at the end.
fn read_src(
    f: &File,
    off: u64,
    buf: &mut [u8],
    keep: Option<&[(u64, u64)]>,
    size: u64,
) -> std::io::Result<usize> {
    match keep {
        None => {
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], off + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(n)
        }
        Some(ranges) => {
            let n = (size.saturating_sub(off)).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            for &(a, b) in ranges {
                let (s, e) = (a.max(off), b.min(off + n as u64));
                if s < e {
                    f.read_exact_at(&mut buf[(s - off) as usize..(e - off) as usize], s)?;
                }
            }
            Ok(n)
        }
    }
}

pub struct Merger<'a> {
    /// Directories whose entries this run added, replaced or removed.
    touched: std::collections::HashSet<PathBuf>,
    pub root: PathBuf,
    /// The fingerprint file on the host ([`host_fingerprints`]).
    pub host_fp: PathBuf,
    pub block_size: u32,
    pub throttle: &'a mut Throttle,
    pub progress: Option<&'a indicatif::ProgressBar>,
}

impl<'a> Merger<'a> {
    pub fn new(
        root: PathBuf,
        host_fp: PathBuf,
        block_size: u32,
        throttle: &'a mut Throttle,
        progress: Option<&'a indicatif::ProgressBar>,
    ) -> Merger<'a> {
        Merger {
            touched: Default::default(),
            root,
            host_fp,
            block_size,
            throttle,
            progress,
        }
    }

    /// Makes the tree under the stage root equal to `entries` plus what
    /// `more` returns once they are in place (a database's backup-end
    /// label and WAL). Files that vanish while being read are left out (a
    /// database drops a table during its backup). What the stage held and
    /// neither names is removed at the end.
    pub fn merge(
        &mut self,
        entries: Vec<Entry>,
        more: &mut dyn FnMut() -> Result<Vec<Entry>, MergeError>,
    ) -> Result<MergeStats, MergeError> {
        let meta_dir = self.root.join(META_DIR);
        let old = load(&self.root, &self.host_fp, self.block_size);
        let mut st = MergeStats {
            block_size: self.block_size,
            fingerprints: match &old {
                Ok(_) => "trusted".into(),
                Err(why) => format!("not used: {why}"),
            },
            ..Default::default()
        };
        let (old, trusted) = match old {
            Ok(m) => (m, true),
            Err(why) => {
                tracing::info!(%why, "comparing with the stage disk's own bytes");
                (Manifest::new(), false)
            }
        };
        std::fs::create_dir_all(&meta_dir).map_err(io(&meta_dir))?;
        let marker = meta_dir.join(MARKER);
        {
            let mut f = File::create(&marker).map_err(io(&marker))?;
            f.write_all(b"a backup is merging into this stage disk\n")
                .map_err(io(&marker))?;
            f.sync_all().map_err(io(&marker))?;
        }
        sync_dir(&meta_dir)?;
        sync_dir(&self.root)?;

        let mut records: Vec<(PathBuf, Record)> = Vec::with_capacity(entries.len());
        let mut bufs = (vec![0u8; IO_BYTES], vec![0u8; IO_BYTES]);
        let mut all = self.apply(entries, &old, trusted, &mut records, &mut st, &mut bufs)?;
        let extra = more()?;
        all.extend(self.apply(extra, &old, trusted, &mut records, &mut st, &mut bufs)?);

        // Removals: what was there and is not wanted. Never below a path
        // that is now a symlink or a file (apply replaced that subtree, and
        // following the new link would reach outside the stage), and not a
        // path that apply replaced in place with another kind.
        let want: HashMap<&Path, u8> = all.iter().map(|(p, k)| (p.as_path(), *k)).collect();
        let mut present: Vec<(PathBuf, u8)> = if trusted {
            old.iter().map(|(p, r)| (p.clone(), r.kind)).collect()
        } else {
            let mut v = Vec::new();
            scan(&self.root, Path::new(""), &mut v)?;
            v
        };
        present.sort();
        for (p, k) in present.iter().rev() {
            if want.contains_key(p.as_path()) {
                continue;
            }
            let replaced_above = p
                .ancestors()
                .skip(1)
                .any(|a| want.get(a).is_some_and(|&w| w != K_DIR));
            if replaced_above {
                continue;
            }
            let _ = k;
            remove(&self.root.join(p))?;
            if let Some(parent) = p.parent() {
                self.touched.insert(parent.to_path_buf());
            }
            st.removed += 1;
        }
        // Directory owners, modes and mtimes last: adding and removing
        // entries changed the mtimes.
        for (rel, rec) in records.iter().rev().filter(|(_, r)| r.kind == K_DIR) {
            let prev = old.get(rel).map(|p| (p.meta, p.kind));
            if !trusted || prev != Some((rec.meta, K_DIR)) || self.touched.contains(rel) {
                set_meta(&self.root.join(rel), &rec.meta, false)?;
            }
        }

        // The fingerprints on the host, then their hash on the stage: a cut
        // between the two leaves the marker, so neither is trusted.
        let fp = encode(self.block_size, &records);
        let host_dir = self.host_fp.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(host_dir).map_err(io(host_dir))?;
        replace(&self.host_fp, &fp)?;
        let mut w = statefile::Writer::new(ID_MAGIC, 32);
        w.bytes(blake3::hash(&fp).as_bytes());
        replace(&meta_dir.join(FINGERPRINTS_ID), &w.finish())?;
        let legacy = meta_dir.join(FINGERPRINTS);
        match std::fs::remove_file(&legacy) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io(&legacy)(e)),
            _ => {}
        }
        sync_dir(&meta_dir)?;
        std::fs::remove_file(&marker).map_err(io(&marker))?;
        sync_dir(&meta_dir)?;
        st.throttled_seconds = self.throttle.waited.as_secs_f64();
        Ok(st)
    }

    /// Writes `entries` into the stage; the paths and kinds it kept.
    fn apply(
        &mut self,
        mut entries: Vec<Entry>,
        old: &Manifest,
        trusted: bool,
        records: &mut Vec<(PathBuf, Record)>,
        st: &mut MergeStats,
        bufs: &mut (Vec<u8>, Vec<u8>),
    ) -> Result<Vec<(PathBuf, u8)>, MergeError> {
        for e in &entries {
            if e.rel.is_absolute()
                || e.rel.as_os_str().is_empty()
                || e.rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                || e.rel.starts_with(META_DIR)
            {
                return Err(MergeError::Unsupported(format!(
                    "{}: not a relative path inside the stage",
                    e.rel.display()
                )));
            }
        }
        entries.sort_by(|a, b| a.rel.cmp(&b.rel));
        let mut kept = Vec::with_capacity(entries.len());
        for e in &entries {
            let dst = self.root.join(&e.rel);
            let prev = old.get(&e.rel);
            let mut rec = Record {
                kind: kind_of(&e.source),
                meta: e.meta,
                size: 0,
                link: Vec::new(),
                hashes: Vec::new(),
            };
            let touched = match &e.source {
                Source::Dir => {
                    st.dirs += 1;
                    match std::fs::symlink_metadata(&dst) {
                        Ok(m) if m.is_dir() => false,
                        Ok(_) => {
                            remove(&dst)?;
                            std::fs::create_dir(&dst).map_err(io(&dst))?;
                            true
                        }
                        Err(_) => {
                            std::fs::create_dir(&dst).map_err(io(&dst))?;
                            true
                        }
                    }
                }
                Source::Symlink(t) => {
                    use std::os::unix::ffi::OsStrExt;
                    rec.link = t.as_os_str().as_bytes().to_vec();
                    let same = std::fs::read_link(&dst).map(|x| x == *t).unwrap_or(false);
                    if !same {
                        remove(&dst)?;
                        std::os::unix::fs::symlink(t, &dst).map_err(io(&dst))?;
                    }
                    !same
                }
                Source::File { path, keep } => {
                    let f = match File::open(path) {
                        Ok(f) => f,
                        // A file the database dropped during the backup;
                        // but a range source (WAL) is required.
                        Err(x) if x.kind() == ErrorKind::NotFound && keep.is_none() => {
                            st.vanished += 1;
                            continue;
                        }
                        Err(x) => return Err(io(path)(x)),
                    };
                    let size = f.metadata().map_err(io(path))?.len();
                    let src = Src::File(&f, keep.as_deref(), size);
                    self.file(&src, &dst, prev, trusted, &mut rec, st, bufs)?
                }
                Source::Data(d) => {
                    self.file(&Src::Bytes(d), &dst, prev, trusted, &mut rec, st, bufs)?
                }
            };
            if touched {
                if let Some(parent) = e.rel.parent() {
                    self.touched.insert(parent.to_path_buf());
                }
            }
            let meta_changed = prev.map(|p| (p.meta, p.kind)) != Some((e.meta, rec.kind));
            if rec.kind != K_DIR && (!trusted || touched || meta_changed) {
                set_meta(&dst, &e.meta, rec.kind == K_LINK)?;
            }
            kept.push((e.rel.clone(), rec.kind));
            records.push((e.rel.clone(), rec));
        }
        Ok(kept)
    }

    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        src: &Src,
        dst: &Path,
        prev: Option<&Record>,
        trusted: bool,
        rec: &mut Record,
        st: &mut MergeStats,
        bufs: &mut (Vec<u8>, Vec<u8>),
    ) -> Result<bool, MergeError> {
        let (buf, tbuf) = (&mut bufs.0, &mut bufs.1);
        let bs = self.block_size as usize;
        st.files += 1;
        if matches!(std::fs::symlink_metadata(dst), Ok(m) if !m.is_file()) {
            remove(dst)?;
        }
        let existed = std::fs::symlink_metadata(dst).is_ok();
        let tgt = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dst)
            .map_err(io(dst))?;
        let tlen = tgt.metadata().map_err(io(dst))?.len();
        let old_hashes = if trusted && existed {
            prev.filter(|p| p.kind == K_FILE)
                .map(|p| p.hashes.as_slice())
        } else {
            None
        };
        let mut off = 0u64;
        let mut changed_any = !existed;
        loop {
            let n = src.read(off, buf).map_err(io(dst))?;
            if n == 0 {
                break;
            }
            st.bytes_read += n as u64;
            if let Some(p) = self.progress {
                p.inc(n as u64);
            }
            // What the stage holds there, when the fingerprints are not trusted.
            let tn = if old_hashes.is_none() && existed && off < tlen {
                let want = n.min((tlen - off) as usize);
                read_src(&tgt, off, &mut tbuf[..want], None, tlen).map_err(io(dst))?
            } else {
                0
            };
            let mut run: Option<(usize, usize)> = None;
            for (i, blk) in buf[..n].chunks(bs).enumerate() {
                let idx = (off as usize / bs) + i;
                let h = hash(blk);
                rec.hashes.push(h);
                st.blocks += 1;
                let at = i * bs;
                let changed = match old_hashes {
                    Some(o) => match o.get(idx) {
                        Some(oh) => *oh != h,
                        None => !(blk.iter().all(|&b| b == 0) && off + at as u64 >= tlen),
                    },
                    None => {
                        if at < tn {
                            let end = (at + blk.len()).min(tn);
                            tbuf[at..end] != blk[..end - at]
                                || end - at < blk.len() && !blk[end - at..].iter().all(|&b| b == 0)
                        } else {
                            !(blk.iter().all(|&b| b == 0) && off + at as u64 >= tlen)
                        }
                    }
                };
                if changed {
                    st.changed_blocks += 1;
                    run = Some(match run {
                        Some((s, _)) => (s, at + blk.len()),
                        None => (at, at + blk.len()),
                    });
                } else if let Some((s, e)) = run.take() {
                    let old = &mut tbuf[s..e];
                    self.write(&tgt, dst, &buf[s..e], off + s as u64, tlen, old, st)?;
                    changed_any = true;
                }
            }
            if let Some((s, e)) = run.take() {
                let old = &mut tbuf[s..e];
                self.write(&tgt, dst, &buf[s..e], off + s as u64, tlen, old, st)?;
                changed_any = true;
            }
            off += n as u64;
            if n < buf.len() {
                break;
            }
        }
        if tlen != off {
            tgt.set_len(off).map_err(io(dst))?;
            changed_any = true;
        }
        rec.size = off;
        if !existed {
            st.new_files += 1;
        } else if changed_any {
            st.changed_files += 1;
        }
        Ok(changed_any)
    }

    /// Writes the changed blocks `data` at `off`, but only the
    /// filesystem blocks ([`UNIT`]) whose bytes differ from what the stage
    /// file holds (`old` is scratch space as long as `data`): a database
    /// page of 8 KiB often changes in one of its 4 KiB halves only, and
    /// every unit written is one the next snapshot stores anew. A unit
    /// that became zeros is punched out instead (a WAL segment's tail past
    /// the stop LSN): a hole costs the snapshot nothing, written zeros do.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        f: &File,
        p: &Path,
        data: &[u8],
        off: u64,
        tlen: u64,
        old: &mut [u8],
        st: &mut MergeStats,
    ) -> Result<(), MergeError> {
        // What the file holds in the range (shorter past its end: the
        // rest is new and written whole).
        let have = tlen.saturating_sub(off).min(data.len() as u64) as usize;
        let have = if have > 0 {
            read_src(f, off, &mut old[..have], None, tlen).map_err(io(p))?
        } else {
            0
        };
        #[derive(Clone, Copy, PartialEq)]
        enum U {
            Same,
            Hole,
            Data,
        }
        let mut run: Option<(usize, U)> = None;
        let mut at = 0usize;
        while at <= data.len() {
            // Units are aligned to the file, not to the range.
            let pos = off + at as u64;
            let end = (((pos / UNIT) + 1) * UNIT - off).min(data.len() as u64) as usize;
            // Past the end, Same flushes the last run.
            let u = if at == data.len() || (end <= have && data[at..end] == old[at..end]) {
                U::Same
            } else if end <= have && data[at..end].iter().all(|&b| b == 0) {
                U::Hole
            } else {
                U::Data
            };
            if let Some((s, k)) = run {
                if k != u {
                    if k == U::Hole {
                        self.punch(f, p, &data[s..at], off + s as u64, st)?;
                    } else {
                        self.put(f, p, &data[s..at], off + s as u64, st)?;
                    }
                    run = None;
                }
            }
            if run.is_none() && u != U::Same {
                run = Some((at, u));
            }
            if at == data.len() {
                break;
            }
            at = end;
        }
        Ok(())
    }

    /// Makes `zeros` (at `off`) a hole; writes them where the stage
    /// filesystem cannot punch.
    fn punch(
        &mut self,
        f: &File,
        p: &Path,
        zeros: &[u8],
        off: u64,
        st: &mut MergeStats,
    ) -> Result<(), MergeError> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the range is inside the file.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                zeros.len() as libc::off_t,
            )
        };
        if r == 0 {
            st.bytes_punched += zeros.len() as u64;
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => self.put(f, p, zeros, off, st),
            _ => Err(io(p)(e)),
        }
    }

    fn put(
        &mut self,
        f: &File,
        p: &Path,
        data: &[u8],
        off: u64,
        st: &mut MergeStats,
    ) -> Result<(), MergeError> {
        self.throttle.consume(data.len() as u64);
        f.write_all_at(data, off).map_err(io(p))?;
        st.bytes_written += data.len() as u64;
        Ok(())
    }
}

/// A file's content: an open source file (with the ranges to read), or
/// bytes the agent made.
enum Src<'a> {
    File(&'a File, Option<&'a [(u64, u64)]>, u64),
    Bytes(&'a [u8]),
}

impl Src<'_> {
    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Src::File(f, keep, size) => read_src(f, off, buf, *keep, *size),
            Src::Bytes(b) => {
                let s = (off as usize).min(b.len());
                let n = (b.len() - s).min(buf.len());
                buf[..n].copy_from_slice(&b[s..s + n]);
                Ok(n)
            }
        }
    }
}

/// Lists a source tree as entries under `prefix`. `skip(rel)` drops an
/// entry (and, for a directory, what is in it); `empty(rel)` keeps a
/// directory but not its contents. Sockets, FIFOs and devices are left out.
pub fn walk(
    src: &Path,
    prefix: &Path,
    skip: &dyn Fn(&Path) -> bool,
    empty: &dyn Fn(&Path) -> bool,
    out: &mut Vec<Entry>,
) -> Result<(), MergeError> {
    fn rec(
        src: &Path,
        rel: &Path,
        prefix: &Path,
        skip: &dyn Fn(&Path) -> bool,
        empty: &dyn Fn(&Path) -> bool,
        out: &mut Vec<Entry>,
    ) -> Result<(), MergeError> {
        let dir = src.join(rel);
        let rd = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                return Ok(())
            }
            Err(e) => return Err(io(&dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io(&dir))?;
            let r = rel.join(e.file_name());
            if skip(&r) {
                continue;
            }
            let p = src.join(&r);
            let m = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(x) if x.kind() == ErrorKind::NotFound => continue,
                Err(x) => return Err(io(&p)(x)),
            };
            let ft = m.file_type();
            let source = if ft.is_dir() {
                Source::Dir
            } else if ft.is_symlink() {
                Source::Symlink(std::fs::read_link(&p).map_err(io(&p))?)
            } else if ft.is_file() {
                Source::File {
                    path: p.clone(),
                    keep: None,
                }
            } else {
                continue;
            };
            let is_dir = ft.is_dir();
            out.push(Entry {
                rel: prefix.join(&r),
                source,
                meta: Meta::of(&m),
            });
            if is_dir && !empty(&r) {
                rec(src, &r, prefix, skip, empty, out)?;
            }
        }
        Ok(())
    }
    rec(src, Path::new(""), prefix, skip, empty, out)
}

/// Flushes the filesystem of `path` to its device.
pub fn syncfs(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a whole file (small files: labels, configuration).
pub fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
