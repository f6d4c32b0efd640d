//! Signing keys: Ed25519 from `ring`. The secret key file holds ring's
//! PKCS#8 v2 DER bytes (mode 0600); a public key file (`NAME.pub`) holds
//! 64 hex digits and a newline. A key is named in a manifest by its key id,
//! the first 8 bytes of SHA-256 over the 32 public key bytes, in hex.

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};

/// Errors reading, writing or using keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The I/O error is part of the message, not a `source`: printed as a
    // chain it would say the same thing twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Write(#[from] cdm_common::fs::FileError),
    #[error("{}: not an Ed25519 PKCS#8 secret key", path.display())]
    BadSecret { path: PathBuf },
    #[error("{}: a public key file holds 64 hex digits (32 bytes)", path.display())]
    BadPublic { path: PathBuf },
    #[error("{}: already exists (not replaced)", path.display())]
    Exists { path: PathBuf },
    #[error("key generation failed (no system randomness)")]
    Generate,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |err| KeyError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// A trusted public key and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub bytes: [u8; 32],
    pub id: String,
}

impl PublicKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        PublicKey {
            id: key_id(&bytes),
            bytes,
        }
    }

    /// Checks an Ed25519 signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(msg, sig)
            .is_ok()
    }
}

/// A key's id: hex of the first 8 bytes of SHA-256 over its public bytes.
pub fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// A loaded secret key.
pub struct SecretKey {
    pair: Ed25519KeyPair,
}

impl SecretKey {
    pub fn public(&self) -> PublicKey {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey::new(b)
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.pair.sign(msg).as_ref());
        s
    }

    pub fn from_pkcs8(der: &[u8]) -> Option<Self> {
        Ed25519KeyPair::from_pkcs8(der)
            .ok()
            .map(|pair| SecretKey { pair })
    }
}

/// Makes a new key pair: the secret (PKCS#8, mode 0600) and the public key
/// file (hex, mode 0644). Both are written atomically.
/// An existing secret key is never replaced (losing a release key strands
/// every appliance that trusts it).
pub fn generate(secret: &Path, public: &Path) -> Result<PublicKey, KeyError> {
    for p in [secret, public] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(KeyError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    let der =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
    let key = SecretKey::from_pkcs8(der.as_ref()).ok_or(KeyError::Generate)?;
    cdm_common::fs::write_atomic(secret, der.as_ref(), 0o600)?;
    let pk = key.public();
    let text = format!("{}\n", hex::encode(pk.bytes));
    cdm_common::fs::write_atomic(public, text.as_bytes(), 0o644)?;
    Ok(pk)
}

/// Reads a secret key file.
pub fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    let der = std::fs::read(path).map_err(io_at(path))?;
    SecretKey::from_pkcs8(&der).ok_or_else(|| KeyError::BadSecret {
        path: path.to_path_buf(),
    })
}

/// Reads one public key file.
pub fn read_public(path: &Path) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io_at(path))?;
    let bad = || KeyError::BadPublic {
        path: path.to_path_buf(),
    };
    let raw = hex::decode(text.trim()).map_err(|_| bad())?;
    let bytes: [u8; 32] = raw.try_into().map_err(|_| bad())?;
    Ok(PublicKey::new(bytes))
}

/// Every `*.pub` file in `dir`, sorted by file name. A malformed key file
/// is an error (an operator's mistake should be seen, not skipped).
pub fn read_trusted(dir: &Path) -> Result<Vec<PublicKey>, KeyError> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let p = e.map_err(io_at(dir))?.path();
        if p.extension().is_some_and(|x| x == "pub") && p.is_file() {
            names.push(p);
        }
    }
    names.sort();
    names.iter().map(|p| read_public(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_read_sign_verify() {
        let d = tempfile::tempdir().unwrap();
        let pk = generate(&d.path().join("k"), &d.path().join("k.pub")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(d.path().join("k.pub")).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(pk.id.len(), 16);
        let sk = read_secret(&d.path().join("k")).unwrap();
        assert_eq!(sk.public(), pk);
        let sig = sk.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellp", &sig));
        let trusted = read_trusted(d.path()).unwrap();
        assert_eq!(trusted, vec![pk]);
        let e = generate(&d.path().join("k"), &d.path().join("k2.pub")).unwrap_err();
        assert!(
            e.to_string().ends_with("k: already exists (not replaced)"),
            "{e}"
        );
        assert_eq!(
            read_secret(&d.path().join("k")).unwrap().public(),
            trusted[0]
        );
    }

    #[test]
    fn bad_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.pub"), "abcd\n").unwrap();
        let e = read_trusted(d.path()).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        std::fs::write(d.path().join("s"), b"not der").unwrap();
        let e = read_secret(&d.path().join("s")).err().unwrap();
        assert!(e.to_string().contains("not an Ed25519"), "{e}");
    }
}
