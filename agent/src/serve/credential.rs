//! The host's credential, kept in the state directory: written once at
//! enrolment (mode 0600, atomically: a crash leaves the old file or the
//! new one, never half of one) and read at every start afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ServeError;

/// What enrolment gave this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The appliance it was made by (a credential is no use elsewhere).
    pub url: String,
    /// The host's name on the appliance.
    pub host: String,
    /// The bearer token of role `host`.
    pub credential: String,
    pub heartbeat_seconds: u64,
    pub enrolled_unix: u64,
}

/// `STATE/serve/credential.json`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("serve").join("credential.json")
}

/// `STATE/serve/ca.crt`: the appliance's CA, pinned.
pub fn ca_path(state_dir: &Path) -> PathBuf {
    state_dir.join("serve").join("ca.crt")
}

/// Pins `src` (the CA given with `--ca-file`): copied into the state
/// directory, which the service and its jobs use from then on, whatever
/// happens to `src`. Returns whether the pinned CA changed.
pub fn pin_ca(state_dir: &Path, src: &Path) -> Result<bool, ServeError> {
    let pem = std::fs::read(src).map_err(|e| ServeError::io(src, e))?;
    let p = ca_path(state_dir);
    if std::fs::read(&p).ok().as_deref() == Some(&pem[..]) {
        return Ok(false);
    }
    write_private(&p, &pem)?;
    Ok(true)
}

/// The stored credential; `None` when the host was never enrolled.
pub fn load(state_dir: &Path) -> Result<Option<Credential>, ServeError> {
    let p = path(state_dir);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ServeError::io(&p, e)),
    };
    let c: Credential = serde_json::from_slice(&text).map_err(|e| {
        ServeError::Invalid(format!(
            "{}: not a credential ({e}); remove it and enrol again",
            p.display()
        ))
    })?;
    if c.credential.is_empty() {
        return Err(ServeError::Invalid(format!(
            "{}: the credential is empty; remove it and enrol again",
            p.display()
        )));
    }
    Ok(Some(c))
}

/// Writes the credential: a temporary file made 0600 from its creation,
/// synced, renamed over the old one, and the directory synced.
pub fn save(state_dir: &Path, c: &Credential) -> Result<(), ServeError> {
    let p = path(state_dir);
    let body = serde_json::to_vec_pretty(c)
        .map_err(|e| ServeError::Invalid(format!("encoding the credential: {e}")))?;
    write_private(&p, &body)
}

/// Writes `p` atomically, mode 0600 from its creation, in a 0700
/// directory.
fn write_private(p: &Path, body: &[u8]) -> Result<(), ServeError> {
    let dir = p.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ServeError::io(dir, e))?;
    // Only root (the agent) reads what is in it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ServeError::io(dir, e))?;
    cdm_common::fs::write_atomic(p, body, 0o600).map_err(|e| ServeError::io(&e.path, e.source))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn cred(token: &str) -> Credential {
        Credential {
            url: "https://appliance:8443".into(),
            host: "db1".into(),
            credential: token.into(),
            heartbeat_seconds: 10,
            enrolled_unix: 1_700_000_000,
        }
    }

    #[test]
    fn saved_private_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), None);
        save(d.path(), &cred("cdm_one")).unwrap();
        let m = std::fs::metadata(path(d.path())).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        let dm = std::fs::metadata(path(d.path()).parent().unwrap()).unwrap();
        assert_eq!(dm.mode() & 0o777, 0o700);
        assert_eq!(load(d.path()).unwrap(), Some(cred("cdm_one")));
        // Replaced whole, no temporary left behind.
        save(d.path(), &cred("cdm_two")).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(cred("cdm_two")));
        let names: Vec<_> = std::fs::read_dir(path(d.path()).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("credential.json")]);
    }

    #[test]
    fn a_stale_temporary_does_not_stop_a_save() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p.with_extension("json.tmp"), b"half").unwrap();
        // Pinning a CA: copied, private, replaced only when it differs.
        let ca = d.path().join("given.pem");
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(pin_ca(d.path(), &ca).unwrap());
        assert!(!pin_ca(d.path(), &ca).unwrap());
        std::fs::remove_file(&ca).unwrap();
        assert_eq!(
            std::fs::read(ca_path(d.path())).unwrap(),
            b"-----BEGIN CERTIFICATE-----\n"
        );
        assert!(pin_ca(d.path(), &ca).is_err(), "a missing file is an error");
        save(d.path(), &cred("cdm_x")).unwrap();
        assert_eq!(load(d.path()).unwrap().unwrap().credential, "cdm_x");
    }

    #[test]
    fn damaged_or_empty_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{\"url\":").unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a credential"), "{e}");
        save(d.path(), &cred("")).unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
