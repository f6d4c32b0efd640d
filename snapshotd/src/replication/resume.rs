//! Resume tokens: the sender's proof that a session the target holds is
//! the one it was sending, at the batch the target says it acknowledged.
//!
//! A token for a session at batch `k` is HMAC-SHA256 under the sender's
//! replication key (`DATA/replication.key`, 32 random bytes, 0600, made
//! once) of the target's identity, the volume, the base and new point, the
//! session id and `k`. The target only stores tokens; it cannot make one.
//! After a cut the sender verifies the token the target hands back before
//! going on from `k + 1`: a token made up by the target (or anyone on the
//! way), or left by another sender, does not verify, and a session for
//! another base or point is stale — both are discarded, never resumed.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::ReplError;

pub const KEY_FILE: &str = "replication.key";

/// What a token binds.
#[derive(Clone, Copy, Debug)]
pub struct Bound<'a> {
    pub target: &'a str,
    pub volume: &'a str,
    pub base: Option<&'a str>,
    pub point: &'a str,
    pub session: &'a str,
    /// The id of the seal a raw transfer's data is under: a session
    /// opened for other bytes never resumes as this one.
    pub seal: Option<&'a str>,
}

pub struct ResumeKey([u8; 32]);

fn key_err(path: &Path, e: impl std::fmt::Display) -> ReplError {
    ReplError::new("resume_key", format!("{}: {e}", path.display()))
}

impl ResumeKey {
    /// The key next to the state database (`DATA/replication.key`).
    pub fn path_for(state_db: &Path) -> PathBuf {
        state_db
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(KEY_FILE)
    }

    /// Reads the key, making it on first use (written atomically with mode
    /// 0600: no one else ever reads it, and a crash leaves no half key).
    pub fn load_or_create(path: &Path) -> Result<ResumeKey, ReplError> {
        let (key, made) = cdm_common::fs::private_key(path, rand::random)
            .map_err(|e| key_err(&e.path, e.source))?;
        if made {
            tracing::info!(path = %path.display(), "replication resume key created");
        }
        Ok(ResumeKey(key))
    }

    fn mac(&self, b: &Bound<'_>, k: u64) -> Hmac<Sha256> {
        // new_from_slice takes a key of any length: 32 bytes cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(b"cdm-repl-resume-v1");
        // Length-prefixed: no two different field lists hash alike.
        for f in [b.target, b.volume, b.base.unwrap_or(""), b.point, b.session] {
            m.update(&(f.len() as u64).to_le_bytes());
            m.update(f.as_bytes());
        }
        m.update(&[b.base.is_some() as u8]);
        m.update(&k.to_le_bytes());
        // Only raw sessions bind a seal, so the tokens of sessions opened
        // before raw sends existed still verify.
        if let Some(s) = b.seal {
            m.update(b"seal");
            m.update(&(s.len() as u64).to_le_bytes());
            m.update(s.as_bytes());
        }
        m
    }

    /// The token for `b` at batch `k`, in hex.
    pub fn token(&self, b: &Bound<'_>, k: u64) -> String {
        hex::encode(self.mac(b, k).finalize().into_bytes())
    }

    /// True if `token` is this key's for `b` at `k` (constant time).
    pub fn verify(&self, token: &str, b: &Bound<'_>, k: u64) -> bool {
        match hex::decode(token) {
            Ok(t) => self.mac(b, k).verify_slice(&t).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const B: Bound<'static> = Bound {
        target: "t",
        volume: "v",
        base: Some("a:1"),
        point: "a:2",
        session: "s1",
        seal: None,
    };

    #[test]
    fn forged_stale_and_foreign_tokens_do_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(KEY_FILE);
        let k = ResumeKey::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Made once: the same key on the next load.
        let again = ResumeKey::load_or_create(&p).unwrap();
        let t = k.token(&B, 3);
        assert!(again.verify(&t, &B, 3));
        // Another batch, base, point, session, volume or target: refused.
        assert!(!k.verify(&t, &B, 4));
        for other in [
            Bound { base: None, ..B },
            Bound {
                base: Some("a:0"),
                ..B
            },
            Bound { point: "a:3", ..B },
            Bound { session: "s2", ..B },
            Bound { volume: "w", ..B },
            Bound { target: "u", ..B },
            Bound {
                seal: Some("s"),
                ..B
            },
        ] {
            assert!(!k.verify(&t, &other, 3), "{other:?}");
        }
        // A forged token (one flipped digit, garbage, empty).
        let mut forged = t.clone().into_bytes();
        forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
        assert!(!k.verify(&String::from_utf8(forged).unwrap(), &B, 3));
        assert!(!k.verify("zz", &B, 3));
        assert!(!k.verify("", &B, 3));
        // Another sender's key.
        let q = dir.path().join("other.key");
        let foreign = ResumeKey::load_or_create(&q).unwrap();
        assert!(!foreign.verify(&t, &B, 3));
        // A key others may read, or of the wrong size, stops the sender.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ResumeKey::load_or_create(&p).is_err());
        std::fs::write(&q, b"short").unwrap();
        assert!(ResumeKey::load_or_create(&q).is_err());
    }
}
