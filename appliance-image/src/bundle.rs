//! The update bundle, format v1 (`.cdmb`):
//!
//! ```text
//! 0     8 bytes   magic b"CDMBNDL\x01"
//! 8     u32 LE    manifest length M (1..=65536)
//! 12    M bytes   manifest, JSON
//! 12+M  64 bytes  Ed25519 signature over b"cdm-bundle-v1\0" || manifest
//! ...   payloads in the manifest's `files` order, each exactly `size` bytes
//! ```
//!
//! The file ends exactly after the last payload. Payloads are hashed with
//! a bounded buffer through positioned reads (`read_at`) on one open file,
//! so a root filesystem image is never held in memory and the installer
//! can read again from the very fd it verified.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{PublicKey, SecretKey};

pub const MAGIC: &[u8; 8] = b"CDMBNDL\x01";
/// The largest manifest accepted (it is read into memory).
pub const MAX_MANIFEST: u32 = 65536;
/// Domain separation: a signature over a bundle manifest means nothing else.
pub const SIG_DOMAIN: &[u8] = b"cdm-bundle-v1\0";
pub const SIG_LEN: usize = 64;
/// The payloads, in the order they appear in every bundle.
pub const FILE_NAMES: [&str; 3] = ["rootfs", "kernel", "initrd"];
/// Reads and copies go through a buffer of this size.
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub compatible: String,
    pub arch: String,
    pub version: String,
    pub key_id: String,
    /// Downgrade protection: an install refuses a bundle whose index is
    /// below the one the appliance stored when it blessed its last update.
    /// Required (no serde default): a manifest without it is refused.
    pub rollback_index: u64,
    pub files: Vec<FileEntry>,
}

/// Why a bundle is refused (or could not be made). Each message is one
/// line: `cdm-update verify` prints it as the reason.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    // The I/O error is part of the message, not a `source`: printed as a
    // chain it would say the same thing twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("not a cdm update bundle (bad magic)")]
    BadMagic,
    #[error("truncated bundle: it ends inside the {0}")]
    Truncated(String),
    #[error("manifest length {0} is outside 1..={MAX_MANIFEST}")]
    ManifestLength(u32),
    #[error("manifest is not valid JSON: {0}")]
    ManifestJson(String),
    #[error("unsupported bundle format {0} (this tool reads format 1)")]
    Format(u32),
    #[error("manifest files: {0}")]
    Files(String),
    #[error("manifest: {0}")]
    Field(String),
    #[error("bundle is signed by an unknown key {0}")]
    UnknownKey(String),
    #[error("bad signature on the bundle manifest (key {0})")]
    BadSignature(String),
    #[error("bundle is for {bundle}, this appliance is {here}")]
    WrongArch { bundle: String, here: String },
    #[error("bundle is for {bundle:?}, this appliance is {here:?} (wrong compatible)")]
    WrongCompatible { bundle: String, here: String },
    #[error("hash mismatch of {0}")]
    HashMismatch(String),
    #[error("trailing bytes after the last payload ({0} bytes)")]
    Trailing(u64),
    #[error("{0} changed while it was being read")]
    Changed(String),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |err| BundleError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// The parsed (not yet trusted) start of a bundle.
#[derive(Debug, Clone)]
pub struct Header {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: [u8; SIG_LEN],
}

impl Header {
    /// Bytes before the first payload.
    pub fn len(&self) -> u64 {
        12 + self.manifest_bytes.len() as u64 + SIG_LEN as u64
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIG_DOMAIN.len() + manifest.len());
    m.extend_from_slice(SIG_DOMAIN);
    m.extend_from_slice(manifest);
    m
}

/// Parses the header (magic, manifest, signature) from the start of `buf`.
/// Everything a manifest must hold is checked here (format, exactly the
/// three file names once each, sizes whose sum with the header fits in
/// u64), so this is the whole parser of outside bytes before the crypto;
/// the `bundle_header` fuzz target drives it.
pub fn parse_header(buf: &[u8]) -> Result<Header, BundleError> {
    if buf.len() < 8 {
        // A prefix of the magic is a truncated bundle; anything else is not one.
        return Err(if MAGIC.starts_with(buf) {
            BundleError::Truncated("header".into())
        } else {
            BundleError::BadMagic
        });
    }
    if &buf[..8] != MAGIC {
        return Err(BundleError::BadMagic);
    }
    let Some(len) = buf.get(8..12) else {
        return Err(BundleError::Truncated("header".into()));
    };
    let m = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    if m == 0 || m > MAX_MANIFEST {
        return Err(BundleError::ManifestLength(m));
    }
    let end = 12 + m as usize;
    let Some(manifest_bytes) = buf.get(12..end) else {
        return Err(BundleError::Truncated("manifest".into()));
    };
    let Some(sig) = buf.get(end..end + SIG_LEN) else {
        return Err(BundleError::Truncated("signature".into()));
    };
    let manifest: Manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| BundleError::ManifestJson(e.to_string()))?;
    if manifest.format != 1 {
        return Err(BundleError::Format(manifest.format));
    }
    check_names(&manifest)?;
    check_files(&manifest.files, 12 + m as u64 + SIG_LEN as u64)?;
    let mut signature = [0u8; SIG_LEN];
    signature.copy_from_slice(sig);
    Ok(Header {
        manifest,
        manifest_bytes: manifest_bytes.to_vec(),
        signature,
    })
}

/// The version goes into the boot entry's title line and the key id into
/// one-line refusals: neither may carry a line break or odd bytes, even
/// from a trusted signer.
fn check_names(m: &Manifest) -> Result<(), BundleError> {
    let v = &m.version;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    if !ok {
        return Err(BundleError::Field(format!(
            "version {v:?} is not 1-128 characters of A-Z a-z 0-9 . _ + - ~"
        )));
    }
    let k = &m.key_id;
    if k.len() != 16 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BundleError::Field(format!(
            "key_id {k:?} is not 16 hex digits"
        )));
    }
    Ok(())
}

fn check_files(files: &[FileEntry], header_len: u64) -> Result<(), BundleError> {
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    for (i, n) in names.iter().enumerate() {
        if !FILE_NAMES.contains(n) {
            return Err(BundleError::Files(format!("unknown file {n:?}")));
        }
        if names[..i].contains(n) {
            return Err(BundleError::Files(format!("file {n:?} is listed twice")));
        }
    }
    for n in FILE_NAMES {
        if !names.contains(&n) {
            return Err(BundleError::Files(format!("file {n:?} is missing")));
        }
    }
    let mut total = header_len;
    for f in files {
        total = total
            .checked_add(f.size)
            .ok_or_else(|| BundleError::Files("payload sizes overflow".into()))?;
        let ok = f.sha256.len() == 64 && f.sha256.bytes().all(|c| c.is_ascii_hexdigit());
        if !ok {
            return Err(BundleError::Files(format!(
                "sha256 of {} is not 64 hex digits",
                f.name
            )));
        }
    }
    Ok(())
}

/// Reads the header from an open bundle.
pub fn read_header(f: &File, path: &Path) -> Result<Header, BundleError> {
    let mut head = [0u8; 12];
    let n = read_full_at(f, &mut head, 0).map_err(io_at(path))?;
    if n < 12 {
        return parse_header(&head[..n]);
    }
    let m = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if &head[..8] != MAGIC || m == 0 || m > MAX_MANIFEST {
        return parse_header(&head);
    }
    let mut buf = vec![0u8; 12 + m as usize + SIG_LEN];
    let n = read_full_at(f, &mut buf, 0).map_err(io_at(path))?;
    parse_header(&buf[..n])
}

/// Fills `buf` from `off` until it is full or the file ends; returns how
/// many bytes were read.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads `len` bytes of `f` from `off` through a bounded buffer, handing
/// each chunk to `sink`, and returns their SHA-256. Fewer bytes than `len`
/// (the file shrank) is `Truncated(what)`. The one streaming loop for
/// verification, installation and the read-back check.
pub fn stream_range(
    f: &File,
    path: &Path,
    off: u64,
    len: u64,
    what: &str,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<[u8; 32], BundleError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = read_full_at(f, &mut buf[..want], off + done).map_err(io_at(path))?;
        if n == 0 {
            return Err(BundleError::Truncated(what.into()));
        }
        h.update(&buf[..n]);
        sink(&buf[..n]).map_err(io_at(path))?;
        done += n as u64;
    }
    Ok(h.finalize().into())
}

/// A bundle whose signature, target and payload hashes all checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    pub header: Header,
}

impl Verified {
    pub fn manifest(&self) -> &Manifest {
        &self.header.manifest
    }

    /// The entry of payload `name` and its offset in the bundle.
    pub fn payload(&self, name: &str) -> Option<(&FileEntry, u64)> {
        let mut off = self.header.len();
        for f in &self.header.manifest.files {
            if f.name == name {
                return Some((f, off));
            }
            off += f.size;
        }
        None
    }
}

/// Trust checks on a parsed header: a known key, a valid signature, then
/// this appliance's compatible and architecture.
pub fn check_header(h: &Header, trusted: &[PublicKey]) -> Result<(), BundleError> {
    let id = &h.manifest.key_id;
    let key = trusted
        .iter()
        .find(|k| &k.id == id)
        .ok_or_else(|| BundleError::UnknownKey(id.clone()))?;
    if !key.verify(&signed_message(&h.manifest_bytes), &h.signature) {
        return Err(BundleError::BadSignature(id.clone()));
    }
    if h.manifest.compatible != crate::COMPATIBLE {
        return Err(BundleError::WrongCompatible {
            bundle: h.manifest.compatible.clone(),
            here: crate::COMPATIBLE.into(),
        });
    }
    if h.manifest.arch != crate::ARCH {
        return Err(BundleError::WrongArch {
            bundle: h.manifest.arch.clone(),
            here: crate::ARCH.into(),
        });
    }
    Ok(())
}

/// Full verification of an open bundle: header, trust, exact length, and
/// every payload's hash (streamed).
pub fn verify(f: &File, path: &Path, trusted: &[PublicKey]) -> Result<Verified, BundleError> {
    let header = read_header(f, path)?;
    check_header(&header, trusted)?;
    let v = Verified { header };
    // Exact length first: a short or long file is refused before hashing
    // gigabytes. (parse_header already proved the sum cannot overflow.)
    let size = f.metadata().map_err(io_at(path))?.len();
    let mut end = v.header.len();
    for e in &v.header.manifest.files {
        if size < end + e.size {
            return Err(BundleError::Truncated(format!("payload {}", e.name)));
        }
        end += e.size;
    }
    if size > end {
        return Err(BundleError::Trailing(size - end));
    }
    let mut off = v.header.len();
    for e in &v.header.manifest.files {
        let got = stream_range(f, path, off, e.size, &format!("payload {}", e.name), |_| {
            Ok(())
        })?;
        if hex::encode(got) != e.sha256.to_ascii_lowercase() {
            return Err(BundleError::HashMismatch(e.name.clone()));
        }
        off += e.size;
    }
    Ok(v)
}

/// Opens and verifies a bundle file.
pub fn verify_path(path: &Path, trusted: &[PublicKey]) -> Result<Verified, BundleError> {
    let f = File::open(path).map_err(io_at(path))?;
    verify(&f, path, trusted)
}

/// The inputs of a new bundle.
pub struct Inputs<'a> {
    pub version: &'a str,
    pub arch: &'a str,
    pub rootfs: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub rollback_index: u64,
}

/// Writes the header bytes for `manifest_bytes`, signed with `key`.
pub fn encode_header(manifest_bytes: &[u8], key: &SecretKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + manifest_bytes.len() + SIG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(manifest_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(manifest_bytes);
    out.extend_from_slice(&key.sign(&signed_message(manifest_bytes)));
    out
}

/// Makes a bundle at `out`: hashes the inputs (streamed), signs the
/// manifest, then copies the payloads through a temporary file that is
/// synced and renamed. An input that changes between hashing and copying
/// is an error rather than a bundle that fails verification later.
pub fn create(key: &SecretKey, inp: &Inputs, out: &Path) -> Result<Manifest, BundleError> {
    let paths = [inp.rootfs, inp.kernel, inp.initrd];
    let mut files = Vec::new();
    for (name, p) in FILE_NAMES.iter().zip(paths) {
        let f = File::open(p).map_err(io_at(p))?;
        let size = f.metadata().map_err(io_at(p))?.len();
        let sum = stream_range(&f, p, 0, size, name, |_| Ok(()))?;
        files.push(FileEntry {
            name: name.to_string(),
            size,
            sha256: hex::encode(sum),
        });
    }
    let manifest = Manifest {
        format: 1,
        compatible: crate::COMPATIBLE.into(),
        arch: inp.arch.into(),
        version: inp.version.into(),
        key_id: key.public().id,
        rollback_index: inp.rollback_index,
        files,
    };
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| BundleError::ManifestJson(e.to_string()))?;
    if bytes.len() > MAX_MANIFEST as usize {
        return Err(BundleError::ManifestLength(bytes.len() as u32));
    }
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut w = File::create(&tmp).map_err(io_at(&tmp))?;
    w.write_all(&encode_header(&bytes, key))
        .map_err(io_at(&tmp))?;
    for (e, p) in manifest.files.iter().zip(paths) {
        let f = File::open(p).map_err(io_at(p))?;
        let sum = stream_range(&f, p, 0, e.size, &e.name, |b| w.write_all(b))?;
        let now = f.metadata().map_err(io_at(p))?.len();
        if hex::encode(sum) != e.sha256 || now != e.size {
            let _ = std::fs::remove_file(&tmp);
            return Err(BundleError::Changed(p.display().to_string()));
        }
    }
    w.sync_all().map_err(io_at(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io_at(out))?;
    Ok(manifest)
}

#[cfg(test)]
#[path = "bundle_tests.rs"]
mod tests;
