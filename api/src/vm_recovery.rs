//! VMs brought back from their points (`docs/vm-recovery.md`): a VM's
//! points (its disks' snapshots of one backup run, grouped), instant
//! recovery (the VM booted on the appliance from clones of a point) and
//! restores of its disks to image files or block devices. The resource
//! types, the routes and what they need of the appliance
//! ([`VmRecoveryBackend`]); the grouping of snapshots into points is
//! shared with `cdm-agent`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::routes::{check_name, run, ApiJson, ApiQuery, AppState};
use crate::types::{ErrorBody, Job};

/// Prefix of the clones an instant recovery boots from
/// (`vmrec-RECOVERY-diskN`).
pub const CLONE_PREFIX: &str = "vmrec-";

/// One disk of a VM point.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct VmPointDisk {
    /// The disk's index in the VM's listing.
    pub disk: usize,
    /// Its stage volume and the snapshot of this point.
    pub volume: String,
    pub snapshot: u64,
    /// Where the disk was read from at backup, its format and bus.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}

/// A VM's point: the snapshots one backup run made of its disks.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct VmPoint {
    pub vm: String,
    /// The run's id (shared by the disks' snapshots' metadata).
    pub point: String,
    /// The newest of its disks' snapshot times (RFC 3339, and Unix seconds).
    pub created: String,
    pub created_unix: u64,
    pub disks: Vec<VmPointDisk>,
    /// How many disks the VM had at the backup.
    pub expected_disks: usize,
    /// Every disk is here: a point that is not cannot be recovered.
    pub complete: bool,
    /// Indexes of the disks that are missing (their backup failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<usize>,
    /// CPU, memory, firmware and NICs at the backup.
    #[serde(default)]
    pub shape: Value,
}

/// The stage volume of disk `i` of VM `name` under `prefix`:
/// `PREFIX-NAME-diskI` when that is a valid volume name as it is, else the
/// cleaned name with a hash of the real one (two names never share a stage
/// volume). `prefix` is a valid name (checked by the caller).
pub fn volume_for(prefix: &str, name: &str, i: usize) -> String {
    let plain = format!("{prefix}-{name}-disk{i}");
    if cdm_common::names::check(&plain).is_ok() {
        return plain;
    }
    let room = cdm_common::names::MAX_LEN
        .saturating_sub(prefix.len() + format!("--12345678-disk{i}").len())
        .min(80);
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(room)
        .collect();
    let h = blake3::hash(name.as_bytes()).to_hex();
    format!(
        "{prefix}-{}-{}-disk{i}",
        clean.trim_start_matches(['.', '-']),
        &h[..8]
    )
}

/// The prefix under which `volume` is the stage volume of disk `i` of VM
/// `name`, if it is one: snapshots on volumes not named for the VM (a
/// host's own volume with made-up metadata) are not its points.
pub fn prefix_of(volume: &str, name: &str, i: usize) -> Option<String> {
    volume
        .match_indices('-')
        .map(|(at, _)| &volume[..at])
        .filter(|p| !p.is_empty())
        .find(|p| volume_for(p, name, i) == volume)
        .map(str::to_string)
}

/// What the grouping needs of a snapshot.
pub struct SnapRef<'a> {
    pub volume: &'a str,
    pub id: u64,
    pub created_unix: u64,
    pub metadata: &'a Value,
}

/// The points of VM `vm` among `snaps`, oldest first. A disk snapshot
/// names its VM, its index, the VM's disk count and the run (`point`) in
/// its metadata's `vm` object; snapshots of backups made before runs had
/// ids are points of their own.
pub fn points<'a>(vm: &str, snaps: impl IntoIterator<Item = SnapRef<'a>>) -> Vec<VmPoint> {
    let mut by_run: BTreeMap<String, VmPoint> = BTreeMap::new();
    for s in snaps {
        let m = &s.metadata["vm"];
        if m["name"].as_str() != Some(vm) {
            continue;
        }
        let Some(disk) = m["disk"].as_u64().map(|d| d as usize) else {
            continue;
        };
        let Some(prefix) = prefix_of(s.volume, vm, disk) else {
            continue;
        };
        // The run and the stage volumes' prefix: a run id seen on volumes
        // of another prefix (another backup of the same VM name) is
        // another point, never a disk of this one.
        let run = match m["point"].as_str() {
            Some(p) if !p.is_empty() => format!("{prefix}/{p}"),
            _ => format!("snapshot-{}-{}", s.volume, s.id),
        };
        let expected = m["disks"].as_u64().map(|n| n as usize).unwrap_or(1);
        let p = by_run.entry(run.clone()).or_insert_with(|| VmPoint {
            vm: vm.to_string(),
            point: run,
            created: String::new(),
            created_unix: 0,
            disks: Vec::new(),
            expected_disks: expected,
            complete: false,
            missing: Vec::new(),
            shape: m["shape"].clone(),
        });
        p.created_unix = p.created_unix.max(s.created_unix);
        p.expected_disks = p.expected_disks.max(expected);
        let str_of = |k: &str| m[k].as_str().map(str::to_string);
        p.disks.push(VmPointDisk {
            disk,
            volume: s.volume.to_string(),
            snapshot: s.id,
            source: str_of("source").unwrap_or_default(),
            format: str_of("format").unwrap_or_default(),
            target: str_of("target"),
            bus: str_of("bus"),
        });
    }
    let mut out: Vec<VmPoint> = by_run
        .into_values()
        .map(|mut p| {
            p.disks.sort_by_key(|d| (d.disk, d.snapshot));
            // One snapshot per disk index: a repeated index (a disk backed
            // up twice in one run cannot happen, but a hand-made
            // snapshot's metadata can say anything) keeps the newest.
            p.disks.reverse();
            p.disks.dedup_by_key(|d| d.disk);
            p.disks.reverse();
            p.missing = (0..p.expected_disks)
                .filter(|i| !p.disks.iter().any(|d| d.disk == *i))
                .collect();
            p.complete = p.missing.is_empty() && p.disks.len() == p.expected_disks;
            p.created = crate::control::rfc3339(p.created_unix);
            p
        })
        .collect();
    out.sort_by(|a, b| (a.created_unix, &a.point).cmp(&(b.created_unix, &b.point)));
    out
}

/// The point a recovery or restore asked for: by run id, by any of its
/// disks' snapshot ids, or the newest complete one.
pub fn choose<'p>(points: &'p [VmPoint], want: Option<&str>) -> Result<&'p VmPoint, String> {
    let Some(w) = want else {
        return points
            .iter()
            .rev()
            .find(|p| p.complete)
            .ok_or_else(|| match points.last() {
                None => "the VM has no point: back it up first".to_string(),
                Some(p) => format!(
                    "the VM has no complete point (its newest, {}, lacks disk(s) {:?})",
                    p.point, p.missing
                ),
            });
    };
    let id: Option<u64> = w.parse().ok();
    let p = points
        .iter()
        .find(|p| p.point == w || id.is_some_and(|id| p.disks.iter().any(|d| d.snapshot == id)))
        .ok_or_else(|| format!("the VM has no point {w:?}"))?;
    if !p.complete {
        return Err(format!(
            "point {} is incomplete: disk(s) {:?} of {} failed at backup",
            p.point, p.missing, p.expected_disks
        ));
    }
    Ok(p)
}

/// Networks a recovered VM can have.
pub const NETWORKS: [&str; 2] = ["none", "user"];
/// Accelerators: KVM, software emulation, or KVM where `/dev/kvm` opens.
pub const ACCELS: [&str; 3] = ["auto", "kvm", "tcg"];
/// Most memory a recovered VM may ask for (MiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most vCPUs a recovered VM may ask for.
pub const MAX_VCPUS: u32 = 256;

/// `POST /v1/vms/{name}/recoveries`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct VmRecoveryCreate {
    /// The point: a snapshot id of one of its disks (default: the newest
    /// complete point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    /// The point by its run id (`GET /v1/vms/{name}/points`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// `none` (default: no NIC) or `user` (the VM's NICs on a private
    /// user-mode network that reaches nothing outside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `auto` (default: KVM where `/dev/kvm` can be used), `kvm` or `tcg`
    /// (software emulation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Replace the VM's memory (MiB) and vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// The recovery's name (default `VM-N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl VmRecoveryCreate {
    /// What is wrong with the request, if anything.
    pub fn check(&self) -> Result<(), String> {
        if self.snapshot.is_some() && self.point.is_some() {
            return Err("give \"snapshot\" or \"point\", not both".into());
        }
        if let Some(n) = &self.network {
            if !NETWORKS.contains(&n.as_str()) {
                return Err(format!("network {n:?}: none or user"));
            }
        }
        if let Some(a) = &self.accel {
            if !ACCELS.contains(&a.as_str()) {
                return Err(format!("accel {a:?}: auto, kvm or tcg"));
            }
        }
        if let Some(m) = self.memory_mib {
            if !(16..=MAX_MEMORY_MIB).contains(&m) {
                return Err(format!("memory_mib {m}: 16 to {MAX_MEMORY_MIB}"));
            }
        }
        if let Some(c) = self.vcpus {
            if !(1..=MAX_VCPUS).contains(&c) {
                return Err(format!("vcpus {c}: 1 to {MAX_VCPUS}"));
            }
        }
        Ok(())
    }
}

/// A VM running on the appliance from clones of one of its points.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct VmRecovery {
    pub name: String,
    pub vm: String,
    /// The point's run id and its disks' snapshots.
    pub point: String,
    pub snapshots: Vec<u64>,
    /// The writable clones it runs on (`vmrec-NAME-diskN`), exported over NBD.
    pub clones: Vec<String>,
    /// `starting`, `running`, `stopped` (qemu ended: the guest powered off,
    /// or it was stopped) or `failed` (qemu could not start or died).
    pub state: String,
    /// Why it stopped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub accel: String,
    pub network: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub firmware: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub started: String,
    pub started_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_unix: Option<u64>,
    /// Who asked for it.
    pub by: String,
}

/// `DELETE /v1/vm-recoveries/{name}?keep=true|false`.
#[derive(Deserialize, utoipa::IntoParams, Default)]
#[serde(deny_unknown_fields)]
pub struct VmStopQuery {
    /// Keep the clones as volumes of their own (promoted), instead of
    /// deleting them.
    #[serde(default)]
    pub keep: bool,
}

/// `GET /v1/vm-recoveries/{name}/console?bytes=N`.
#[derive(Deserialize, utoipa::IntoParams, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// The last N bytes of the serial log (default 65536, at most 4 MiB).
    #[serde(default)]
    pub bytes: Option<u64>,
}

/// The largest console tail one request reads.
pub const CONSOLE_MAX: u64 = 4 << 20;

/// What the VM routes need of the appliance.
pub trait VmRecoveryBackend {
    /// The points of a VM (404 when it has none and is not in the inventory).
    fn vm_points(&self, vm: &str) -> ApiResult<Vec<VmPoint>>;
    /// Checks the request (the point complete, qemu there, the name free)
    /// and starts a job that clones the point and boots the VM.
    fn start_vm_recovery(&self, caller: &Caller, vm: &str, req: VmRecoveryCreate)
        -> ApiResult<Job>;
    fn list_vm_recoveries(&self) -> ApiResult<Vec<VmRecovery>>;
    fn vm_recovery(&self, name: &str) -> ApiResult<VmRecovery>;
    /// The tail of its serial console log.
    fn vm_console(&self, name: &str, bytes: u64) -> ApiResult<Vec<u8>>;
    /// A libvirt domain XML that runs it from the same NBD exports.
    fn vm_domain_xml(&self, name: &str) -> ApiResult<String>;
    /// Stops the VM; deletes its clones, or keeps them promoted.
    fn stop_vm_recovery(&self, caller: &Caller, name: &str, keep: bool) -> ApiResult<VmRecovery>;
    /// Starts a restore of a VM's point to image files on the appliance
    /// (a job running `cdm-agent vm restore`), checked before it is queued.
    fn vm_restore(
        &self,
        c: &crate::auth::Caller,
        vm: &str,
        req: VmRestoreCreate,
    ) -> ApiResult<crate::types::Job>;
}

/// The VM routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms/{name}/points", get(vm_points))
        .route("/vms/{name}/recoveries", post(start_vm_recovery))
        .route("/vm-recoveries", get(list_vm_recoveries))
        .route(
            "/vm-recoveries/{name}",
            get(vm_recovery).delete(stop_vm_recovery),
        )
        .route("/vm-recoveries/{name}/console", get(vm_console))
        .route("/vm-recoveries/{name}/domain.xml", get(vm_domain_xml))
        .route("/vms/{name}/restores", post(vm_restore))
}

fn check_vm(name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.len() > 256 {
        return Err(ApiError::bad_request(
            "a VM name is empty or longer than 256 bytes",
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/vms/{name}/points", params(("name" = String, Path)), responses((status = 200, body = [VmPoint]), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_points(State(s): S, Path(name): Path<String>) -> ApiResult<Json<Vec<VmPoint>>> {
    check_vm(&name)?;
    Ok(Json(run(&s, move |b| b.vm_points(&name)).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/recoveries", params(("name" = String, Path)), request_body = VmRecoveryCreate, responses((status = 202, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
async fn start_vm_recovery(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VmRecoveryCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_vm(&name)?;
    req.check().map_err(ApiError::bad_request)?;
    if let Some(n) = &req.name {
        check_name("recovery", n)?;
    }
    let j = run(&s, move |b| b.start_vm_recovery(&c, &name, req)).await?;
    Ok((StatusCode::ACCEPTED, Json(j)).into_response())
}

#[utoipa::path(get, path = "/v1/vm-recoveries", responses((status = 200, body = [VmRecovery])), security(("bearer" = [])))]
async fn list_vm_recoveries(State(s): S) -> ApiResult<Json<Vec<VmRecovery>>> {
    Ok(Json(run(&s, |b| b.list_vm_recoveries()).await?))
}

#[utoipa::path(get, path = "/v1/vm-recoveries/{name}", params(("name" = String, Path)), responses((status = 200, body = VmRecovery), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_recovery(State(s): S, Path(name): Path<String>) -> ApiResult<Json<VmRecovery>> {
    check_name("recovery", &name)?;
    Ok(Json(run(&s, move |b| b.vm_recovery(&name)).await?))
}

#[utoipa::path(get, path = "/v1/vm-recoveries/{name}/console", params(("name" = String, Path), ConsoleQuery), responses((status = 200, description = "the serial console's log (text)", content_type = "text/plain"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_console(
    State(s): S,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> ApiResult<Response> {
    check_name("recovery", &name)?;
    let n = q.bytes.unwrap_or(65536).min(CONSOLE_MAX);
    let b = run(&s, move |b| b.vm_console(&name, n)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], b).into_response())
}

#[utoipa::path(get, path = "/v1/vm-recoveries/{name}/domain.xml", params(("name" = String, Path)), responses((status = 200, description = "a libvirt domain XML for the recovered VM", content_type = "application/xml"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_domain_xml(State(s): S, Path(name): Path<String>) -> ApiResult<Response> {
    check_name("recovery", &name)?;
    let x = run(&s, move |b| b.vm_domain_xml(&name)).await?;
    Ok(([(header::CONTENT_TYPE, "application/xml")], x).into_response())
}

#[utoipa::path(delete, path = "/v1/vm-recoveries/{name}", params(("name" = String, Path), VmStopQuery), responses((status = 200, body = VmRecovery), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn stop_vm_recovery(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<VmStopQuery>,
) -> ApiResult<Json<VmRecovery>> {
    // Without `keep` the clones go, with what the VM wrote in them.
    c.require(if q.keep {
        Action::Write
    } else {
        Action::Delete
    })?;
    check_name("recovery", &name)?;
    Ok(Json(
        run(&s, move |b| b.stop_vm_recovery(&c, &name, q.keep)).await?,
    ))
}

type S = State<AppState>;
type C = Extension<Caller>;

/// The VM routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        vm_points,
        start_vm_recovery,
        list_vm_recoveries,
        vm_recovery,
        vm_console,
        vm_domain_xml,
        stop_vm_recovery,
        vm_restore
    ),
    components(schemas(VmPointDisk, VmPoint, VmRecoveryCreate, VmRecovery, VmRestoreCreate)),
    modifiers(&BearerAuth)
)]
pub struct VmRecoveryDoc;

// ---------------------------------------------------------------------
// VM restore: a point's disks written back to image files on the
// appliance by a job (`cdm-agent vm restore`).

/// `POST /v1/vms/{name}/restores`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmRestoreCreate {
    /// The point's run id or one of its disks' snapshot ids; the newest
    /// complete point when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// A directory on the appliance (absolute) for `VM-diskN.raw|qcow2`.
    pub to: String,
    /// `raw` (default) or `qcow2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Only this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<usize>,
    /// Replace existing image files.
    #[serde(default)]
    pub force: bool,
}

impl VmRestoreCreate {
    /// The request's own rules (the point is the appliance's to check).
    pub fn check(&self) -> ApiResult<()> {
        let to = std::path::Path::new(&self.to);
        if !to.is_absolute() || self.to.contains('\0') || self.to.len() > 4096 {
            return Err(ApiError::bad_request(format!(
                "\"to\" must be an absolute directory on the appliance, not {:?}",
                self.to
            )));
        }
        if to
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(ApiError::bad_request("\"to\" must not contain \"..\""));
        }
        match self.format.as_deref() {
            None | Some("raw") | Some("qcow2") => {}
            Some(f) => {
                return Err(ApiError::bad_request(format!(
                    "format {f:?}: use raw or qcow2"
                )))
            }
        }
        if let Some(p) = &self.point {
            if p.is_empty() || p.len() > 256 {
                return Err(ApiError::bad_request("a point id is 1 to 256 bytes"));
            }
        }
        Ok(())
    }
}

#[utoipa::path(post, path = "/v1/vms/{name}/restores", params(("name" = String, Path)), request_body = VmRestoreCreate, responses((status = 202, body = crate::types::Job), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_restore(
    State(s): S,
    axum::Extension(c): axum::Extension<crate::auth::Caller>,
    Path(name): Path<String>,
    crate::routes::ApiJson(req): crate::routes::ApiJson<VmRestoreCreate>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    // The appliance writes image files as root into the directory the
    // request names: admin only, as for vm-backup jobs.
    c.require(crate::auth::Action::Admin)?;
    check_vm(&name)?;
    req.check()?;
    let j = run(&s, move |b| b.vm_restore(&c, &name, req)).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(j)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(vm: &str, disk: u64, disks: u64, point: &str) -> Value {
        json!({"vm": {"name": vm, "disk": disk, "disks": disks, "point": point, "source": format!("/img/{vm}-{disk}.raw"), "format": "raw", "shape": {"memory_mib": 512}}})
    }

    #[test]
    fn snapshots_group_into_points_and_incomplete_ones_are_refused() {
        let m = [
            ("vm-a-disk0", 1, 100, meta("a", 0, 2, "r1")),
            ("vm-a-disk1", 2, 101, meta("a", 1, 2, "r1")),
            ("vm-a-disk0", 3, 200, meta("a", 0, 2, "r2")),
            ("vm-b-disk0", 4, 150, meta("b", 0, 1, "r9")),
            ("vm-a-disk0", 5, 50, json!({"vm": {"name": "a", "disk": 0}})),
            ("other", 6, 300, json!({"label": "x"})),
            // Made-up metadata on a volume not named for the VM: ignored.
            ("evil-disk0", 7, 400, meta("a", 0, 1, "r3")),
            // The same run id under another prefix: another point.
            ("h-vm-x-a-disk1", 8, 90, meta("a", 1, 2, "r1")),
        ];
        let snaps = m.iter().map(|(v, id, t, md)| SnapRef {
            volume: v,
            id: *id,
            created_unix: *t,
            metadata: md,
        });
        let p = points("a", snaps);
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(p[0].point, "snapshot-vm-a-disk0-5");
        assert!(p[0].complete);
        assert_eq!(p[1].point, "h-vm-x/r1");
        assert!(!p[1].complete);
        let p = p[..1].iter().chain(&p[2..]).cloned().collect::<Vec<_>>();
        assert_eq!(p[1].point, "vm/r1");
        assert_eq!(p[1].created_unix, 101);
        assert!(p[1].complete);
        assert_eq!(p[1].disks.len(), 2);
        assert_eq!(p[1].shape["memory_mib"], 512);
        assert_eq!(p[2].point, "vm/r2");
        assert!(!p[2].complete);
        assert_eq!(p[2].missing, vec![1]);
        // The newest complete point by default; the incomplete one refused
        // by name or by its disk's snapshot id, with the reason.
        assert_eq!(choose(&p, None).unwrap().point, "vm/r1");
        assert_eq!(choose(&p, Some("2")).unwrap().point, "vm/r1");
        let e = choose(&p, Some("vm/r2")).unwrap_err();
        assert!(e.contains("incomplete") && e.contains("[1]"), "{e}");
        assert!(choose(&p, Some("3")).is_err());
        assert!(choose(&p, Some("nope")).unwrap_err().contains("no point"));
        assert!(choose(&[], None).unwrap_err().contains("back it up"));
        let only_bad = &p[2..];
        assert!(choose(only_bad, None)
            .unwrap_err()
            .contains("no complete point"));
    }

    #[test]
    fn restore_requests_are_checked() {
        let r = |v: Value| serde_json::from_value::<VmRestoreCreate>(v).map(|r| r.check());
        assert!(r(json!({"to": "/srv/restore"})).unwrap().is_ok());
        assert!(r(
            json!({"to": "/srv", "format": "qcow2", "disk": 1, "point": "r1", "force": true})
        )
        .unwrap()
        .is_ok());
        for bad in [
            json!({"to": "srv"}),
            json!({"to": ""}),
            json!({"to": "/srv/../etc"}),
            json!({"to": "/srv", "format": "vmdk"}),
            json!({"to": "/srv", "point": ""}),
        ] {
            assert!(r(bad.clone()).unwrap().is_err(), "{bad}");
        }
        assert!(r(json!({"to": "/srv", "extra": 1})).is_err());
        assert!(r(json!({"format": "raw"})).is_err());
    }
}
