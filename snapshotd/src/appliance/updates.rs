//! The appliance image's status and updates (issue 18, `--appliance`).
//! snapshotd stays unprivileged and holds no crypto: it reads the status
//! file the root tool `cdm-update` writes, spools an uploaded bundle into
//! `DATA/updates`, has `cdm-update verify` check it and links it to
//! `DATA/updates/pending.cdmb`, where the root unit `cdm-update.path`
//! picks it up (and verifies it again before writing anything).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdm_api::appliance::{
    ApplianceBackend, ApplianceStatus, UpdateAccepted, Upload, NOT_AN_APPLIANCE,
};
use cdm_api::auth::Caller;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::users::random_hex;
use super::Appliance;

/// The spooled bundle the installer takes (`DATA/updates/pending.cdmb`).
pub const PENDING: &str = "pending.cdmb";
/// How long `cdm-update verify` may take (it hashes up to 4 GiB).
const VERIFY_LIMIT: Duration = Duration::from_secs(600);
/// Free space an upload must leave on the data partition (it holds the
/// pool and snapshotd's state, which must never run out because of an
/// update).
pub const SPOOL_RESERVE: u64 = 256 << 20;
/// A status file larger than this is not one.
const STATUS_MAX: u64 = 1 << 20;

/// Where the appliance mode finds its files and tool (set by main with
/// `--appliance`; without it both routes answer 404).
#[derive(Clone, Debug)]
pub struct UpdateSetup {
    /// `cdm-update status --write`'s file (`/run/cdm-update/status.json`).
    pub status_file: PathBuf,
    /// The `cdm-update` binary.
    pub tool: PathBuf,
    /// The trusted public keys' directory (`/etc/cdm/update-keys`).
    pub keys: PathBuf,
    /// `DATA/updates`.
    pub spool: PathBuf,
    /// Set while an upload streams: one at a time.
    pub busy: Arc<AtomicBool>,
}

impl UpdateSetup {
    /// Removes uploads an earlier run left half-written (it stopped
    /// during a request): no request can finish them now. The pending
    /// bundle stays, for the installer.
    pub fn clear_stale_uploads(&self) {
        let Ok(dir) = std::fs::read_dir(&self.spool) else {
            return;
        };
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with("upload-") {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(file = %e.path().display(), "removed an unfinished update upload")
                    }
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "cannot remove an unfinished update upload")
                    }
                }
            }
        }
    }
}

impl Appliance {
    fn update_setup(&self) -> ApiResult<&UpdateSetup> {
        self.updates
            .get()
            .ok_or_else(|| ApiError::not_found(NOT_AN_APPLIANCE))
    }

    fn status_read(&self) -> ApiResult<ApplianceStatus> {
        let p = &self.update_setup()?.status_file;
        let unavailable = |why: String| {
            ApiError::unavailable(format!(
                "no appliance status: {} {why} (cdm-update status --write makes it at boot)",
                p.display()
            ))
        };
        let mut text = String::new();
        std::fs::File::open(p)
            .and_then(|f| f.take(STATUS_MAX + 1).read_to_string(&mut text))
            .map_err(|e| unavailable(format!("cannot be read: {e}")))?;
        if text.len() as u64 > STATUS_MAX {
            return Err(unavailable(format!("is over {STATUS_MAX} bytes")));
        }
        serde_json::from_str(&text).map_err(|e| unavailable(format!("is not a status: {e}")))
    }

    /// A new upload file in `DATA/updates` (the directory made 0700: only
    /// snapshotd and root look inside).
    fn upload_open(&self, c: &Caller, length: u64) -> ApiResult<Upload> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let s = self.update_setup()?;
        pending_free(&s.spool)?;
        if s.busy.swap(true, Ordering::AcqRel) {
            return Err(ApiError::conflict(
                "another update upload is streaming: wait for it to finish",
            ));
        }
        // From here the flag is ours; a failure below must clear it.
        let release = |e: ApiError| {
            s.busy.store(false, Ordering::Release);
            e
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&s.spool)
            .map_err(|e| {
                release(ApiError::unavailable(format!(
                    "cannot make {}: {e}",
                    s.spool.display()
                )))
            })?;
        room_for(&s.spool, length).map_err(release)?;
        let path = s.spool.join(format!("upload-{}", random_hex(8)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                release(ApiError::unavailable(format!(
                    "cannot create {}: {e}",
                    path.display()
                )))
            })?;
        tracing::info!(file = %path.display(), by = %c.user, length, "update upload started");
        Ok(Upload::exclusive(path, file, s.busy.clone()))
    }

    fn update_accept(&self, c: &Caller, upload: &Path, bytes: u64) -> ApiResult<UpdateAccepted> {
        let s = self.update_setup()?;
        let version = match verify(s, upload) {
            Ok(v) => v,
            Err(e) => {
                if e.status == 400 {
                    self.update_refused(c, &e.message);
                }
                return Err(e);
            }
        };
        let pending = s.spool.join(PENDING);
        // A link, not a rename: it fails if a bundle is pending already
        // (two uploads racing), and the installer never sees a partial file.
        std::fs::hard_link(upload, &pending).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => pending_conflict(),
            _ => ApiError::unavailable(format!("cannot make {}: {e}", pending.display())),
        })?;
        if let Err(e) = std::fs::File::open(&s.spool).and_then(|d| d.sync_all()) {
            tracing::warn!(error = %e, "cannot sync the update spool directory");
        }
        tracing::info!(%version, bytes, by = %c.user, "update bundle verified and pending");
        self.events.emit(
            "appliance.update_pending",
            "appliance",
            &c.user,
            json!({"version": version, "bytes": bytes}),
        );
        Ok(UpdateAccepted {
            version,
            state: "pending".into(),
        })
    }

    fn update_refused(&self, c: &Caller, reason: &str) {
        tracing::warn!(%reason, by = %c.user, "update bundle refused");
        self.events.emit(
            "appliance.update_refused",
            "appliance",
            &c.user,
            json!({"reason": reason}),
        );
    }
}

fn pending_conflict() -> ApiError {
    ApiError::conflict(
        "an update bundle is pending already: the installer has not taken it yet \
         (GET /v1/appliance shows its progress)",
    )
}

/// 507 unless the spool's filesystem has `length` bytes free plus
/// [`SPOOL_RESERVE`].
fn room_for(spool: &Path, length: u64) -> ApiResult<()> {
    let free = cdm_common::fs::free_bytes(spool).map_err(|e| {
        ApiError::unavailable(format!(
            "cannot tell the free space of {}: {e}",
            spool.display()
        ))
    })?;
    if free < length.saturating_add(SPOOL_RESERVE) {
        return Err(ApiError::new(
            507,
            "insufficient_storage",
            format!(
                "not enough space for the update: the bundle is {length} bytes, {} has {free} bytes free \
                 and keeps {SPOOL_RESERVE} bytes in reserve for the pool",
                spool.display()
            ),
        ));
    }
    Ok(())
}

/// 409 while `SPOOL/pending.cdmb` exists (as anything, a symlink too).
fn pending_free(spool: &Path) -> ApiResult<()> {
    match std::fs::symlink_metadata(spool.join(PENDING)) {
        Ok(_) => Err(pending_conflict()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::unavailable(format!(
            "cannot look at {}: {e}",
            spool.join(PENDING).display()
        ))),
    }
}

/// `cdm-update verify --keys KEYS FILE`: the bundle's version, or 400 with
/// the tool's reason (exit 2 is a refusal; anything else is the tool's
/// failure, 500).
fn verify(s: &UpdateSetup, file: &Path) -> ApiResult<String> {
    let mut cmd = Command::new(&s.tool);
    cmd.arg("verify")
        .arg("--keys")
        .arg(&s.keys)
        .arg(file)
        .stdin(Stdio::null());
    cdm_common::signals::clear_mask_on_exec(&mut cmd);
    let out = run_limited(&mut cmd, VERIFY_LIMIT).map_err(|e| {
        ApiError::unavailable(format!(
            "cannot run the update tool {}: {e}",
            s.tool.display()
        ))
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no reason given")
        .chars()
        .take(1024)
        .collect::<String>();
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Err(ApiError::bad_request(format!("bundle refused: {reason}"))),
        _ => {
            return Err(ApiError::internal(format!(
                "{} verify failed ({}): {reason}",
                s.tool.display(),
                out.status
            )))
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        ApiError::internal(format!(
            "{} verify printed no manifest: {e}",
            s.tool.display()
        ))
    })?;
    manifest["version"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::internal("the verified manifest has no version"))
}

/// Runs `cmd` to its end, or kills it after `limit`. Its output is read by
/// threads while it runs (a full pipe cannot stall it).
fn run_limited(cmd: &mut Command, limit: Duration) -> std::io::Result<std::process::Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                // At most 16 MiB of it: a manifest is 64 KiB.
                let _ = r.by_ref().take(16 << 20).read_to_end(&mut v);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("still running after {} s: stopped", limit.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let join = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

impl ApplianceBackend for Appliance {
    fn appliance_status(&self) -> ApiResult<ApplianceStatus> {
        self.status_read()
    }
    fn open_update_upload(&self, c: &Caller, length: u64) -> ApiResult<Upload> {
        self.upload_open(c, length)
    }
    fn accept_update(&self, c: &Caller, upload: &Path, bytes: u64) -> ApiResult<UpdateAccepted> {
        self.update_accept(c, upload, bytes)
    }
    fn update_upload_failed(&self, c: &Caller, reason: &str) {
        self.update_refused(c, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_overruns_its_limit_is_stopped() {
        let t = Instant::now();
        let e =
            run_limited(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(10));
        let o = run_limited(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 2"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }

    #[test]
    fn unfinished_uploads_are_cleared_at_start_and_the_pending_bundle_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = UpdateSetup {
            status_file: d.path().join("status.json"),
            tool: "/bin/false".into(),
            keys: d.path().into(),
            spool: d.path().join("updates"),
            busy: Default::default(),
        };
        s.clear_stale_uploads();
        std::fs::create_dir(&s.spool).unwrap();
        for f in ["upload-1a2b", "upload-ffff", PENDING] {
            std::fs::write(s.spool.join(f), b"x").unwrap();
        }
        s.clear_stale_uploads();
        let left: Vec<_> = std::fs::read_dir(&s.spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![PENDING.to_string()]);
    }

    #[test]
    fn a_pending_bundle_of_any_kind_blocks_the_next() {
        let d = tempfile::tempdir().unwrap();
        assert!(pending_free(d.path()).is_ok());
        std::os::unix::fs::symlink("/nowhere", d.path().join(PENDING)).unwrap();
        assert_eq!(pending_free(d.path()).unwrap_err().status, 409);
    }
}
