//! Test fixtures shared by the modules' unit tests: a key pair, payload
//! files and a signed bundle in a temporary directory.

use std::path::{Path, PathBuf};

use crate::bundle::{self, Inputs, Manifest};
use crate::keys::{self, PublicKey, SecretKey};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub secret: SecretKey,
    pub trusted: Vec<PublicKey>,
    #[allow(dead_code)] // for the install tests
    pub keys_dir: PathBuf,
}

/// Bytes that differ at every offset, so a misplaced copy shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        std::fs::create_dir(&keys_dir).unwrap();
        keys::generate(&dir.path().join("secret"), &keys_dir.join("test.pub")).unwrap();
        let secret = keys::read_secret(&dir.path().join("secret")).unwrap();
        let trusted = keys::read_trusted(&keys_dir).unwrap();
        Fixture {
            dir,
            secret,
            trusted,
            keys_dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A bundle of `version` with a rootfs of `rootfs_len` bytes and
    /// rollback index 100.
    pub fn bundle(
        &self,
        name: &str,
        version: &str,
        arch: &str,
        rootfs_len: usize,
    ) -> (PathBuf, Manifest) {
        self.bundle_at(name, version, arch, rootfs_len, 100)
    }

    /// A bundle with the given rollback index.
    pub fn bundle_at(
        &self,
        name: &str,
        version: &str,
        arch: &str,
        rootfs_len: usize,
        rollback_index: u64,
    ) -> (PathBuf, Manifest) {
        let w = |n: &str, data: Vec<u8>| -> PathBuf {
            let p = self.path(&format!("{name}.{n}"));
            std::fs::write(&p, data).unwrap();
            p
        };
        let seed = version.len() as u8;
        let rootfs = w("rootfs", pattern(rootfs_len, seed));
        let kernel = w("kernel", pattern(3000, seed ^ 1));
        let initrd = w("initrd", pattern(5000, seed ^ 2));
        let out = self.path(name);
        let m = bundle::create(
            &self.secret,
            &Inputs {
                version,
                arch,
                rootfs: &rootfs,
                kernel: &kernel,
                initrd: &initrd,
                rollback_index,
            },
            &out,
        )
        .unwrap();
        (out, m)
    }
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}
