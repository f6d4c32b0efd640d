//! The control plane's routes (`crate::control`), and what it needs of
//! the appliance: host credentials made and revoked with the other tokens.

use cdm_api::auth::Caller;
use cdm_api::control::*;
use cdm_api::control_backend::{ControlBackend, PollWait};
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};

use super::users::TokenRec;
use super::{st, Appliance};
use crate::control::host_user;
use crate::state::{HOST_CLONES, TOKENS};

/// SHA-256 (hex) of the DER of the first certificate in `pem`.
pub fn ca_sha256(pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    use sha2::{Digest, Sha256};
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(hex::encode(Sha256::digest(der.as_ref())))
}

/// What a host asks of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostUse {
    /// `GET` of the volume itself.
    Volume,
    /// `GET` of a snapshot (or its files), or of the snapshot list (`None`).
    Read(Option<u64>),
    /// A snapshot made, the volume created or changed.
    Write,
    /// A clone of this snapshot.
    Clone(u64),
    /// `POST …/snapshots`: a snapshot made.
    SnapshotCreate,
    /// `DELETE …/snapshots/{id}`.
    SnapshotDelete(u64),
}

impl Appliance {
    /// A host's credential reaches its own data only: the volumes of its
    /// applications, the clones it made, and, while it runs a restore of
    /// another host's point, that point (read it, clone it).
    pub(super) fn host_path_access(&self, c: &Caller, method: &str, path: &str) -> ApiResult<()> {
        let p: Vec<&str> = path.trim_end_matches('/').split('/').skip(2).collect();
        let Some(["volumes", vol, rest @ ..]) = Some(p.as_slice()) else {
            return Ok(());
        };
        let snap = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("snapshot id {s:?} is not a number")))
        };
        let what = match (method, rest) {
            ("GET" | "HEAD", []) => HostUse::Volume,
            ("GET" | "HEAD", ["snapshots"]) => HostUse::Read(None),
            ("GET" | "HEAD", ["snapshots", id, ..]) => HostUse::Read(Some(snap(id)?)),
            ("POST", ["snapshots", id, "clones"]) => HostUse::Clone(snap(id)?),
            // Reads the point only (a drill's scrub).
            ("POST", ["snapshots", id, "verify"]) => HostUse::Read(Some(snap(id)?)),
            ("POST", ["snapshots"]) => HostUse::SnapshotCreate,
            ("DELETE", ["snapshots", id]) => HostUse::SnapshotDelete(snap(id)?),
            _ => HostUse::Write,
        };
        self.host_volume_access(c, vol, what, None)
    }

    /// 403 unless host caller `c` may do `what` with volume `vol`; for a
    /// clone, `clone_name` is the clone's.
    pub(super) fn host_volume_access(
        &self,
        c: &Caller,
        vol: &str,
        what: HostUse,
        clone_name: Option<&str>,
    ) -> ApiResult<()> {
        let host = c.user.strip_prefix("host:").unwrap_or(&c.user);
        if let HostUse::SnapshotDelete(id) = what {
            // A host never deletes a point, even of its own applications
            // (a compromised host must not destroy its backups): only the
            // read snapshot a point-in-time restore made of a log volume.
            let read = self
                .pool
                .snapshot(id)
                .is_ok_and(|s| s.volume == vol && s.metadata["kind"] == "log-read");
            if !read {
                return Err(ApiError::forbidden(format!(
                    "{} may not delete snapshot {id} of {vol}: a host deletes only the read \
                     snapshots its point-in-time restores made of a log volume",
                    c.user
                )));
            }
        }
        if self.control.host_owns_volume(host, vol)? {
            return Ok(());
        }
        let maker: Option<String> = self.state.get(HOST_CLONES, vol).map_err(st)?;
        if maker.as_deref() == Some(c.user.as_str()) {
            return Ok(());
        }
        let grants = self.control.restore_grants(host, vol);
        let granted = grants.iter().any(|(s, name)| match what {
            HostUse::Volume => true,
            HostUse::Read(Some(id)) => id == *s,
            HostUse::Clone(id) => {
                id == *s
                    && match (name, clone_name) {
                        (Some(n), Some(m)) => n == m,
                        _ => true,
                    }
            }
            HostUse::Read(None)
            | HostUse::Write
            | HostUse::SnapshotCreate
            | HostUse::SnapshotDelete(_) => false,
        });
        if granted || self.pitr_granted(host, vol, &what, clone_name)? {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "{} may not {} volume {vol}: it is no volume of an application of host {host}, \
             nor a clone it made, nor the point of a restore it runs",
            c.user,
            match what {
                HostUse::Volume | HostUse::Read(_) => "read",
                HostUse::Write | HostUse::SnapshotCreate | HostUse::SnapshotDelete(_) => "change",
                HostUse::Clone(_) => "clone",
            }
        )))
    }
}

impl Appliance {
    /// What a host running a point-in-time restore of another host's
    /// application may do while the job runs: read the application's
    /// points and clone one (under the job's clone name); read its log
    /// volume, snapshot it, clone that snapshot and delete it again (the
    /// restore's own read of the archive, `kind: log-read`). Nothing else:
    /// no write to either volume, no other snapshot deleted.
    fn pitr_granted(
        &self,
        host: &str,
        vol: &str,
        what: &HostUse,
        clone_name: Option<&str>,
    ) -> ApiResult<bool> {
        let Some(g) = self.control.pitr_grant(host, vol) else {
            return Ok(false);
        };
        let named = |want: Option<String>| match (want, clone_name) {
            (Some(n), Some(m)) => n == m,
            _ => true,
        };
        Ok(match what {
            HostUse::Volume | HostUse::Read(_) => true,
            HostUse::Clone(_) if !g.log => named(g.name.clone()),
            HostUse::Clone(_) => named(g.name.map(|n| format!("{n}-logread"))),
            HostUse::SnapshotCreate => g.log,
            // Its own read only (named for the job's clone), not another
            // restore's.
            HostUse::SnapshotDelete(id) if g.log => self.pool.snapshot(*id).is_ok_and(|s| {
                s.volume == vol
                    && s.metadata["kind"] == "log-read"
                    && g.name
                        .as_deref()
                        .is_some_and(|n| s.metadata["restore"] == n)
            }),
            _ => false,
        })
    }
}

impl ControlBackend for Appliance {
    /// With the SHA-256 of the CA's certificate, which the agent checks
    /// against the CA it fetches before pinning it.
    fn create_enrolment(&self, c: &Caller, req: EnrolmentCreate) -> ApiResult<EnrolmentToken> {
        let mut t = self.control.create_enrolment(c, req)?;
        t.ca_sha256 = self.tls_ca.get().and_then(|pem| ca_sha256(pem));
        Ok(t)
    }
    fn list_hosts(&self) -> ApiResult<Vec<Host>> {
        self.control.hosts()
    }
    fn host(&self, name: &str) -> ApiResult<Host> {
        self.control.host(name)
    }
    /// The credential goes first: the agent's next request is refused
    /// whatever happens to its jobs.
    fn retire_host(&self, c: &Caller, name: &str) -> ApiResult<()> {
        self.control.host(name)?;
        let user = host_user(name);
        let gone: Vec<TokenRec> = self
            .state
            .remove_where(TOKENS, |t: &TokenRec| t.user == user)
            .map_err(st)?;
        let ids: Vec<String> = gone.into_iter().map(|t| t.id).collect();
        self.forget_verified(&ids);
        self.control.retire(c, name)
    }
    fn agent_enrol(&self, req: AgentEnrol) -> ApiResult<AgentEnrolled> {
        self.control
            .enrol(req, |user| self.make_token(user, "agent", None))
    }
    fn agent_heartbeat(&self, c: &Caller, req: Heartbeat) -> ApiResult<HeartbeatReply> {
        self.control.heartbeat(c, req)
    }
    fn agent_poll(&self, c: &Caller) -> ApiResult<PollWait> {
        self.control.poll(c)
    }
    fn agent_jobs(&self, c: &Caller, slots: Option<usize>) -> ApiResult<Vec<AgentJob>> {
        self.control.pull(c, slots)
    }
    fn agent_progress(&self, c: &Caller, id: u64, req: AgentProgress) -> ApiResult<ProgressReply> {
        self.control.progress(c, id, req)
    }
    fn agent_finish(&self, c: &Caller, id: u64, req: AgentFinish) -> ApiResult<Job> {
        self.control.finish(c, id, req)
    }
    fn list_applications(&self, host: Option<String>) -> ApiResult<Vec<Application>> {
        self.control.applications(host)
    }
    fn create_application(&self, c: &Caller, req: ApplicationCreate) -> ApiResult<Application> {
        self.control.create_application(c, req)
    }
    fn application(&self, id: u64) -> ApiResult<Application> {
        self.control.application(id)
    }
    fn delete_application(&self, c: &Caller, id: u64) -> ApiResult<()> {
        self.control.delete_application(c, id)
    }
    fn assign_policy(&self, c: &Caller, id: u64, req: PolicyAssign) -> ApiResult<Application> {
        self.control.assign_policy(c, id, req)
    }
    fn points(&self, id: u64) -> ApiResult<Vec<Point>> {
        self.control.points(id)
    }
    fn start_backup(&self, c: &Caller, id: u64) -> ApiResult<Job> {
        self.control.start_backup(c, id)
    }
    fn start_restore(&self, c: &Caller, id: u64, req: RestoreCreate) -> ApiResult<Job> {
        self.control.start_restore(c, id, req)
    }
    fn create_protection_policy(
        &self,
        c: &Caller,
        p: ProtectionPolicy,
    ) -> ApiResult<ProtectionPolicy> {
        self.control.create_policy(c, p)
    }
    fn list_protection_policies(&self) -> ApiResult<Vec<ProtectionPolicy>> {
        self.control.policies()
    }
    fn protection_policy(&self, name: &str) -> ApiResult<ProtectionPolicy> {
        self.control.policy(name)
    }
    fn update_protection_policy(
        &self,
        c: &Caller,
        name: &str,
        p: ProtectionPolicy,
    ) -> ApiResult<ProtectionPolicy> {
        self.control.update_policy(c, name, p)
    }
    fn delete_protection_policy(&self, c: &Caller, name: &str) -> ApiResult<()> {
        self.control.delete_policy(c, name)
    }
    fn job_log(&self, id: u64) -> ApiResult<JobLog> {
        self.control.job_log(id)
    }
    fn cancel_job(&self, c: &Caller, id: u64) -> ApiResult<Job> {
        // A link's run (a local job) stops at its next batch.
        if let Some(j) = self.replication.get().and_then(|r| r.cancel_job(id)) {
            return j;
        }
        self.control.cancel(c, id)
    }
}
