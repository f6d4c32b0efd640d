//! Secrets the appliance must store to use later (the object store's
//! secret key), sealed at rest. The state database holds only
//! AES-256-GCM ciphertext; the key is `DATA/secrets.key`, 32 random bytes
//! made once, mode 0600 (read by root-run snapshotd only). A copy of the
//! state database alone (a backup, a support bundle) reveals no secret.
//!
//! Sealed form: hex of `nonce (12 bytes) || ciphertext || tag (16)`; the
//! associated data names the secret's purpose, so a ciphertext moved to
//! another record does not open there.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

pub const KEY_FILE: &str = "secrets.key";
/// Version tag inside the associated data (a format change bumps it).
const AAD_PREFIX: &str = "cdm-secret-v1:";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secrets key: {0}")]
    Key(#[from] cdm_common::fs::FileError),
    #[error("a sealed {0} secret is corrupt or was sealed under another key")]
    Open(String),
    #[error("cannot seal the {0} secret")]
    Seal(String),
}

pub struct SecretBox {
    key: LessSafeKey,
}

impl SecretBox {
    /// The key next to the state database (`DATA/secrets.key`).
    pub fn path_for(state_db: &Path) -> PathBuf {
        state_db
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(KEY_FILE)
    }

    /// Reads the key, making it on first use.
    pub fn load_or_create(path: &Path) -> Result<SecretBox, SecretError> {
        let (raw, made) = cdm_common::fs::private_key(path, rand::random)?;
        if made {
            tracing::info!(path = %path.display(), "secrets key created");
        }
        // 32 bytes is AES-256-GCM's key length: new() cannot refuse it.
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| SecretError::Seal("key setup".into()))?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
        })
    }

    /// `plain` sealed for `purpose` (a fresh random nonce each time).
    pub fn seal(&self, purpose: &str, plain: &str) -> Result<String, SecretError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.as_bytes().to_vec();
        let aad = format!("{AAD_PREFIX}{purpose}");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SecretError::Seal(purpose.into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(hex::encode(out))
    }

    /// The secret `sealed` holds, if it was sealed for `purpose` under
    /// this key and is intact.
    pub fn open(&self, purpose: &str, sealed: &str) -> Result<String, SecretError> {
        let bad = || SecretError::Open(purpose.into());
        let raw = hex::decode(sealed).map_err(|_| bad())?;
        if raw.len() < NONCE_LEN {
            return Err(bad());
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| bad())?;
        let mut buf = ct.to_vec();
        let aad = format!("{AAD_PREFIX}{purpose}");
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(KEY_FILE);
        let b = SecretBox::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let s = b.seal("tier", "s3cr3t-value").unwrap();
        assert!(!s.contains("s3cr3t"));
        // Fresh nonce: the same secret seals differently each time.
        assert_ne!(s, b.seal("tier", "s3cr3t-value").unwrap());
        // The same key on the next load opens it.
        let again = SecretBox::load_or_create(&p).unwrap();
        assert_eq!(again.open("tier", &s).unwrap(), "s3cr3t-value");
        // Another purpose, a flipped byte, garbage, another key: refused.
        assert!(again.open("webhook", &s).is_err());
        let mut t = hex::decode(&s).unwrap();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(again.open("tier", &hex::encode(t)).is_err());
        assert!(again.open("tier", "zz").is_err());
        assert!(again.open("tier", "00").is_err());
        let other = SecretBox::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("tier", &s).is_err());
        // A key others may read is refused.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(SecretBox::load_or_create(&p).is_err());
    }
}
