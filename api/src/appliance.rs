//! The appliance image's own routes (issue 18): its A/B slots and update
//! state (`GET /v1/appliance`, the status file `cdm-update` writes) and
//! the upload of a signed update bundle (`POST /v1/appliance/updates`).
//! snapshotd only spools and verifies (through `cdm-update verify`); the
//! root-owned installer picks the pending bundle up. The resource types,
//! the routes and what they need of the appliance ([`ApplianceBackend`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::routes::{run, AppState};
use crate::types::ErrorBody;

/// The upload route, whose body limit is [`MAX_BUNDLE`] rather than the
/// API's 1 MiB.
pub const UPLOAD_PATH: &str = "/v1/appliance/updates";
/// Largest update bundle accepted (413 above): 4 GiB.
pub const MAX_BUNDLE: u64 = 4 << 30;
/// The answer of both routes on a snapshotd started without `--appliance`.
pub const NOT_AN_APPLIANCE: &str = "not an appliance (snapshotd runs without --appliance)";

/// What a slot holds, from its boot entry's name (boot counting).
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Blessed: booted and found healthy (`cdm-a.conf`).
    Good,
    /// Installed, being tried (`cdm-a+N[-M].conf`, N > 0 tries left).
    Trying,
    /// Out of tries (`cdm-a+0-M.conf`): the boot loader skips it.
    Bad,
    /// No boot entry.
    Empty,
}

/// One root slot (`a` or `b`).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct SlotStatus {
    pub slot: String,
    pub state: SlotState,
    /// Boot attempts left while `trying`.
    #[serde(default)]
    pub tries_left: Option<u32>,
    /// The installed bundle's version.
    #[serde(default)]
    pub version: Option<String>,
    /// Its boot entry's generation (the newest boots first).
    #[serde(default)]
    pub generation: Option<u64>,
    /// The installed bundle's rollback index (null: empty slot). The
    /// appliance refuses uploads below the index of its last blessed slot.
    #[serde(default)]
    pub rollback_index: Option<u64>,
    /// The running system booted from it.
    #[serde(default)]
    pub booted: bool,
}

/// Where the last install got to.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpdateState {
    Verifying,
    Writing,
    Installed,
    Failed,
}

/// The last install's progress or result.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct UpdateProgress {
    pub state: UpdateState,
    #[serde(default)]
    pub version: Option<String>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When it got there (RFC 3339, UTC).
    pub at: String,
}

/// `GET /v1/appliance`: the status file `cdm-update status --write`
/// keeps (`/run/cdm-update/status.json`).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ApplianceStatus {
    pub appliance: bool,
    /// The running version (`/usr/lib/cdm/version` in the root image).
    pub version: String,
    /// `a` or `b`, from the kernel command line (`cdm.slot=`).
    #[serde(default)]
    pub booted_slot: Option<String>,
    pub slots: Vec<SlotStatus>,
    #[serde(default)]
    pub update: Option<UpdateProgress>,
}

impl ApplianceStatus {
    /// The slot the running system booted from.
    pub fn booted(&self) -> Option<&SlotStatus> {
        self.slots.iter().find(|s| s.booted)
    }
}

/// `POST /v1/appliance/updates` accepted a bundle: it waits in
/// `DATA/updates/pending.cdmb` for the installer.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct UpdateAccepted {
    /// The bundle's version (from its verified manifest).
    pub version: String,
    /// `pending`.
    pub state: String,
}

/// A new upload file the appliance made for one request. Dropping it
/// removes the file under its upload name: a refused, cut or abandoned
/// upload leaves nothing behind, and an accepted one has been linked to
/// its pending name before.
pub struct Upload {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Set while this upload lives (one upload at a time); cleared on drop.
    busy: Option<Arc<AtomicBool>>,
}

impl Upload {
    pub fn new(path: PathBuf, file: std::fs::File) -> Upload {
        Upload {
            path,
            file: Some(file),
            busy: None,
        }
    }

    /// As [`Upload::new`], for the holder of `busy` (already set by the
    /// caller): dropping the upload clears it, after its file is removed.
    pub fn exclusive(path: PathBuf, file: std::fs::File, busy: Arc<AtomicBool>) -> Upload {
        Upload {
            path,
            file: Some(file),
            busy: Some(busy),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.file = None;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot remove an update upload")
            }
        }
        if let Some(b) = &self.busy {
            b.store(false, Ordering::Release);
        }
    }
}

/// What the appliance routes need from the appliance.
pub trait ApplianceBackend {
    /// The status file, typed: 404 without `--appliance`, 503 while it is
    /// missing or unreadable.
    fn appliance_status(&self) -> ApiResult<ApplianceStatus>;
    /// A new, empty upload file for a body of `length` bytes (404 without
    /// `--appliance`; 409 while a bundle is pending or another upload
    /// streams; 507 when the spool's filesystem lacks `length` plus a
    /// reserve), before any byte is read.
    fn open_update_upload(&self, caller: &Caller, length: u64) -> ApiResult<Upload>;
    /// Verifies the complete upload of `bytes` bytes with `cdm-update
    /// verify` (400 with its reason) and makes it the pending bundle (409
    /// if one is pending already).
    fn accept_update(
        &self,
        caller: &Caller,
        upload: &Path,
        bytes: u64,
    ) -> ApiResult<UpdateAccepted>;
    /// Records an upload that ended before it was complete (too large, cut).
    fn update_upload_failed(&self, caller: &Caller, reason: &str);
}

/// The appliance routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/appliance", get(appliance_status))
        .route("/appliance/updates", post(upload_update))
}

#[utoipa::path(get, path = "/v1/appliance", responses((status = 200, body = ApplianceStatus), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
async fn appliance_status(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<ApplianceStatus>> {
    c.require(Action::Read)?;
    Ok(Json(run(&s, |b| b.appliance_status()).await?))
}

/// Admin only: the bundle replaces the appliance's whole system.
#[utoipa::path(post, path = "/v1/appliance/updates", request_body(content = Vec<u8>, description = "the update bundle (.cdmb)", content_type = "application/octet-stream"), responses((status = 202, body = UpdateAccepted), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 411, body = ErrorBody), (status = 413, body = ErrorBody), (status = 507, body = ErrorBody)), security(("bearer" = [])))]
async fn upload_update(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    // The declared length is what the free space is checked against
    // before a byte is stored; a chunked body could not be checked.
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::new(
                411,
                "length_required",
                "an update upload needs a Content-Length header (the appliance checks its free space first)",
            )
        })?;
    let c2 = c.clone();
    let mut up = match run(&s, move |b| b.open_update_upload(&c2, length)).await {
        Ok(u) => u,
        // An admin's upload while one is pending or streams, or without
        // the room for it: read (and drop) the body so that the client,
        // still sending, gets the reason rather than a connection reset.
        Err(e) if e.status == 409 || e.status == 507 => {
            discard(body, MAX_BUNDLE).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let Some(file) = up.file.take() else {
        return Err(ApiError::internal("upload file already taken"));
    };
    let bytes = match spool(body, file, MAX_BUNDLE).await {
        Ok(n) => n,
        Err(e) => {
            let (c2, m) = (c.clone(), e.message.clone());
            run(&s, move |b| {
                drop(up);
                b.update_upload_failed(&c2, &m);
                Ok(())
            })
            .await?;
            return Err(e);
        }
    };
    let accepted = run(&s, move |b| {
        let r = b.accept_update(&c, up.path(), bytes);
        drop(up);
        r
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// Reads and drops up to `cap` bytes of `body`.
async fn discard(body: Body, cap: u64) {
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(Ok(b)) = stream.next().await {
        total += b.len() as u64;
        if total > cap {
            break;
        }
    }
}

/// Streams `body` into `file` (a blocking thread writes, at most a few
/// chunks behind: the body is never held whole) and syncs it; the bytes
/// written. 413 past `cap`, 400 if the body is cut.
async fn spool(body: Body, file: std::fs::File, cap: u64) -> ApiResult<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut file = file;
        let mut n = 0u64;
        while let Some(b) = rx.blocking_recv() {
            file.write_all(&b)?;
            n += b.len() as u64;
        }
        // The installer may read it after a crash of ours.
        file.sync_all()?;
        Ok(n)
    });
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut refused = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                total += b.len() as u64;
                if total > cap {
                    refused = Some(ApiError::new(
                        413,
                        "payload_too_large",
                        format!("an update bundle is at most {cap} bytes"),
                    ));
                    break;
                }
                // A closed channel: the writer failed (its error below).
                if tx.send(b).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                refused = Some(ApiError::bad_request(format!(
                    "the upload was cut after {total} bytes: {e}"
                )));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("upload writer failed: {e}")))?;
    if let Some(e) = refused {
        return Err(e);
    }
    let n = written.map_err(|e| {
        if e.kind() == std::io::ErrorKind::StorageFull {
            ApiError::new(507, "no_space", format!("cannot store the upload: {e}"))
        } else {
            ApiError::unavailable(format!("cannot store the upload: {e}"))
        }
    })?;
    if n != total {
        return Err(ApiError::internal(format!(
            "wrote {n} of the {total} bytes received"
        )));
    }
    Ok(n)
}

/// The appliance routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(appliance_status, upload_update),
    components(schemas(
        SlotState,
        SlotStatus,
        UpdateState,
        UpdateProgress,
        ApplianceStatus,
        UpdateAccepted
    )),
    modifiers(&BearerAuth)
)]
pub struct ApplianceDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_status_file_parses_as_the_contract_writes_it() {
        let v = json!({"appliance": true, "version": "0.1.0+g1", "booted_slot": "a",
            "slots": [
                {"slot": "a", "state": "good", "tries_left": null, "version": "0.1.0+g1", "generation": 1, "booted": true},
                {"slot": "b", "state": "trying", "tries_left": 3, "version": "0.2.0", "generation": 2, "rollback_index": 1764558000, "booted": false}],
            "update": {"state": "installed", "version": "0.2.0", "error": null, "at": "2026-12-01T03:00:00Z"}});
        let s: ApplianceStatus = serde_json::from_value(v).unwrap();
        assert_eq!(s.booted().unwrap().slot, "a");
        assert_eq!(s.slots[1].state, SlotState::Trying);
        assert_eq!(s.slots[1].tries_left, Some(3));
        assert_eq!(s.slots[1].rollback_index, Some(1764558000));
        assert_eq!(s.slots[0].rollback_index, None);
        assert_eq!(s.update.as_ref().unwrap().state, UpdateState::Installed);
        let e = json!({"appliance": true, "version": "x", "booted_slot": null, "slots": [], "update": null});
        assert!(serde_json::from_value::<ApplianceStatus>(e)
            .unwrap()
            .update
            .is_none());
        let bad =
            json!({"appliance": true, "version": "x", "slots": [{"slot": "a", "state": "weird"}]});
        assert!(serde_json::from_value::<ApplianceStatus>(bad).is_err());
    }

    #[test]
    fn a_dropped_upload_removes_its_file() {
        let d = std::env::temp_dir().join(format!("cdm-upload-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("upload-x");
        let f = std::fs::File::create(&p).unwrap();
        let u = Upload::new(p.clone(), f);
        assert!(p.exists());
        drop(u);
        assert!(!p.exists());
        // Gone already (linked and removed by the appliance): no error.
        drop(Upload::new(p.clone(), std::fs::File::create(&p).unwrap()));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
