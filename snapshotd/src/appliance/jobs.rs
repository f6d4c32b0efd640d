//! Long operations: scrub, retention, volume deletion, VM backups and
//! the runner of the appliance-local agent's jobs
//! (defragmentation is in `defrag.rs`).

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::{json, Value};

use super::{engine, st, AgentSetup, Appliance};
use crate::error::Error;
use crate::state::TOKENS;

/// Runs `cdm-agent ARGS` (next to this binary, else on PATH) against this
/// appliance as the holder of `token`; its JSON result, or its error.
pub(super) fn run_agent(
    setup: &AgentSetup,
    nbd: &str,
    token: &str,
    args: &[String],
) -> crate::error::Result<Value> {
    let exe = std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("cdm-agent"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| std::path::PathBuf::from("cdm-agent"));
    let mut cmd = std::process::Command::new(&exe);
    // This daemon blocks SIGTERM and SIGINT in every thread (it waits for
    // them with sigwait), and a blocked mask survives exec: give the agent,
    // and the qemu-nbd it stops with SIGTERM, a clean one.
    cdm_common::signals::clear_mask_on_exec(&mut cmd);
    let out = cmd
        .args([
            "--json",
            "--url",
            &setup.api_url,
            "--nbd",
            nbd,
            "--state-dir",
        ])
        .arg(&setup.state_dir)
        .args(args)
        .env("CDM_TOKEN", token)
        .env_remove("CDM_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::from(e).context(format!("cannot run {}", exe.display())))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        Error::Failed(format!(
            "cdm-agent ({}) answered no JSON: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })?;
    if out.status.success() {
        Ok(v)
    } else {
        Err(Error::Failed(
            v["error"]
                .as_str()
                .unwrap_or("cdm-agent failed")
                .to_string(),
        ))
    }
}

impl Appliance {
    pub(super) fn job_start(&self, c: &Caller, req: JobCreate) -> ApiResult<Job> {
        if let Some(job) = cdm_api::tier::TierJob::from_request(&req) {
            return self.job_tier(&c.user, job?);
        }
        match req.kind.as_str() {
            "scrub" => self.job_scrub(c),
            "retention" => self.job_retention(c),
            "delete-volume" => self.job_delete_volume(c, &req),
            "vm-backup" => self.job_vm_backup(c, &req),
            "defrag" => self.job_defrag(c, &req),
            k => Err(ApiError::bad_request(format!(
                "unknown job kind {k:?}: use scrub, retention, delete-volume, vm-backup, defrag, \
                 tier, recall or tier-gc"
            ))),
        }
    }

    /// Checks every checksum in the pool; raises an alert on errors.
    fn job_scrub(&self, c: &Caller) -> ApiResult<Job> {
        let pool = self.pool.clone();
        let events = self.events.clone();
        let who = c.user.clone();
        self.jobs
            .start("scrub", &c.user, move |p| {
                let rep = pool
                    .scrub_with(&|d, t| p.set(d, t))
                    .map_err(|e| Error::from(e).context("scrub failed"))?;
                let errors: Vec<Value> = rep
                    .errors
                    .iter()
                    .take(1000)
                    .map(|e| json!({"target": e.target, "offset": e.offset, "pool_block": e.pool_block, "what": e.what}))
                    .collect();
                if !rep.errors.is_empty() {
                    events.emit(
                        "alert.raised",
                        "pool",
                        &who,
                        json!({"message": format!("scrub found {} checksum error(s)", rep.errors.len()), "errors": errors}),
                    );
                }
                Ok(json!({
                    "nodes_checked": rep.nodes_checked,
                    "extents_checked": rep.extents_checked,
                    "bytes_checked": rep.bytes_checked,
                    "errors": errors,
                    "error_count": rep.errors.len(),
                }))
            })
            .map_err(st)
    }

    /// Applies every volume's retention now.
    fn job_retention(&self, c: &Caller) -> ApiResult<Job> {
        let sched = self.scheduler.clone();
        let who = c.user.clone();
        self.jobs
            .start("retention", &c.user, move |p| {
                let gone = sched.apply_retention(&who)?;
                p.set(1, 1);
                Ok(json!({"expired": gone}))
            })
            .map_err(st)
    }

    /// Deletes a volume (or clone) in the background.
    fn job_delete_volume(&self, c: &Caller, req: &JobCreate) -> ApiResult<Job> {
        let Some(v) = req.volume.clone() else {
            return Err(ApiError::bad_request("delete-volume needs \"volume\""));
        };
        let kind = if self.pool.volume(&v).map_err(engine)?.origin.is_some() {
            "clone"
        } else {
            "volume"
        };
        let me = self.self_arc()?;
        let who = c.user.clone();
        let force = req.force;
        self.jobs
            .start("delete-volume", &c.user, move |p| {
                me.remove_volume(&who, &v, force, kind)?;
                p.set(1, 1);
                Ok(json!({"deleted": v}))
            })
            .map_err(st)
    }

    /// Backs up the VMs of a category with `cdm-agent`, acting as the caller.
    fn job_vm_backup(&self, c: &Caller, req: &JobCreate) -> ApiResult<Job> {
        let (Some(inventory), Some(category)) = (req.inventory.clone(), req.category.clone())
        else {
            return Err(ApiError::bad_request(
                "vm-backup needs \"inventory\" (a path on the appliance) and \"category\"",
            ));
        };
        cdm_api::vms::selects(&VmRecord::default(), &category)?;
        let parallel = req.parallel.unwrap_or(2).clamp(1, 16);
        let args = [
            "vm",
            "backup",
            "--inventory",
            &inventory,
            "--category",
            &category,
            "--parallel",
            &parallel.to_string(),
        ];
        self.start_agent_job(c, "vm-backup", args.map(str::to_string).to_vec())
    }

    /// Starts a job of kind `kind` that runs `cdm-agent ARGS` on this
    /// appliance acting as the caller; its result is the agent's JSON.
    pub(super) fn start_agent_job(
        &self,
        c: &Caller,
        kind: &'static str,
        args: Vec<String>,
    ) -> ApiResult<Job> {
        let setup = self
            .agent
            .get()
            .cloned()
            .ok_or_else(|| ApiError::new(503, "unavailable", "the appliance is starting"))?;
        let nbd = self
            .nbd_addrs
            .first()
            .cloned()
            .ok_or_else(|| ApiError::new(503, "unavailable", "no NBD listener"))?;
        // The job acts as its caller, with a token that lives as long
        // as the job (revoked when it ends, expiring in a day anyway).
        let tok = self.make_token(&c.user, &format!("{kind} job"), Some(86_400))?;
        let me = self.self_arc()?;
        self.jobs
            .start(kind, &c.user, move |p| {
                let r = run_agent(&setup, &nbd, &tok.token, &args);
                let _ = me.state.remove(TOKENS, tok.id.as_str());
                me.forget_verified(std::slice::from_ref(&tok.id));
                p.set(1, 1);
                r
            })
            .map_err(st)
    }

    pub(super) fn job_get(&self, id: u64) -> ApiResult<Job> {
        self.jobs
            .get(id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
    }
}
