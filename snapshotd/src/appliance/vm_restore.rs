//! VM restore on the appliance: a point's disks written to image files in
//! a directory of the appliance by the appliance-local `cdm-agent vm
//! restore`, run as a job acting as its caller. The point is chosen and
//! checked here, before the job is queued, and pinned by its run id.

use cdm_api::auth::Caller;
use cdm_api::types::Job;
use cdm_api::vm_recovery::{choose, VmRestoreCreate};
use cdm_api::{ApiError, ApiResult};

use super::Appliance;

impl Appliance {
    /// 404 for an unknown VM or point, 409 for a point that cannot be
    /// restored (incomplete, or none yet), 400 for a disk it does not have.
    pub(super) fn vm_restore_start(
        &self,
        c: &Caller,
        vm: &str,
        req: VmRestoreCreate,
    ) -> ApiResult<Job> {
        req.check()?;
        let points = self.vm_points_of(vm)?;
        let p = choose(&points, req.point.as_deref()).map_err(|e| {
            let known = req.point.as_deref().is_none_or(|w| {
                points
                    .iter()
                    .any(|p| p.point == w || p.disks.iter().any(|d| d.snapshot.to_string() == w))
            });
            if known {
                ApiError::conflict(format!("VM {vm}: {e}"))
            } else {
                ApiError::not_found(format!("VM {vm}: {e}"))
            }
        })?;
        if let Some(n) = req.disk {
            if !p.disks.iter().any(|d| d.disk == n) {
                return Err(ApiError::bad_request(format!(
                    "point {} of VM {vm} has no disk {n} (its disks: {:?})",
                    p.point,
                    p.disks.iter().map(|d| d.disk).collect::<Vec<_>>()
                )));
            }
        }
        let mut args: Vec<String> = [
            "vm".to_string(),
            "restore".to_string(),
            // `--opt=VALUE`: a value that starts with '-' is not an option.
            format!("--vm={vm}"),
            format!("--to={}", req.to),
            format!("--format={}", req.format.as_deref().unwrap_or("raw")),
            format!("--point={}", p.point),
        ]
        .to_vec();
        if let Some(n) = req.disk {
            args.extend(["--disk".to_string(), n.to_string()]);
        }
        if req.force {
            args.push("--force".into());
        }
        self.start_agent_job(c, "vm-restore", args)
    }
}
