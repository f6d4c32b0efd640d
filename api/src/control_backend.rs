//! What the control plane's routes need from the appliance (a part of
//! [`crate::backend::Backend`]): hosts and enrolment, the agent protocol,
//! applications, protection policies, points, restores, job logs, cancel.

use crate::auth::Caller;
use crate::control::*;
use crate::error::ApiResult;
use crate::types::Job;

/// The control plane (`docs/control-plane.md`): hosts and their agents,
/// applications, protection policies, agent jobs, points and restores.
/// `caller` of the `agent_*` methods is a host credential (`host:NAME`).
pub trait ControlBackend {
    fn create_enrolment(&self, caller: &Caller, req: EnrolmentCreate) -> ApiResult<EnrolmentToken>;
    fn list_hosts(&self) -> ApiResult<Vec<Host>>;
    fn host(&self, name: &str) -> ApiResult<Host>;
    /// Revokes the host's credential at once; its queued jobs are
    /// cancelled and its running ones fail.
    fn retire_host(&self, caller: &Caller, name: &str) -> ApiResult<()>;

    /// 401 `invalid_token` for an unknown, used or expired token.
    fn agent_enrol(&self, req: AgentEnrol) -> ApiResult<AgentEnrolled>;
    fn agent_heartbeat(&self, caller: &Caller, req: Heartbeat) -> ApiResult<HeartbeatReply>;
    /// Blocks up to `wait` seconds for work; hands jobs out as `running`.
    fn agent_jobs(&self, caller: &Caller, wait: u64) -> ApiResult<Vec<AgentJob>>;
    fn agent_progress(
        &self,
        caller: &Caller,
        id: u64,
        req: AgentProgress,
    ) -> ApiResult<ProgressReply>;
    /// Idempotent for the same outcome.
    fn agent_finish(&self, caller: &Caller, id: u64, req: AgentFinish) -> ApiResult<Job>;

    fn list_applications(&self, host: Option<String>) -> ApiResult<Vec<Application>>;
    fn create_application(&self, caller: &Caller, req: ApplicationCreate)
        -> ApiResult<Application>;
    fn application(&self, id: u64) -> ApiResult<Application>;
    /// Keeps the volume and its points.
    fn delete_application(&self, caller: &Caller, id: u64) -> ApiResult<()>;
    fn assign_policy(&self, caller: &Caller, id: u64, req: PolicyAssign) -> ApiResult<Application>;
    fn points(&self, id: u64) -> ApiResult<Vec<Point>>;
    /// 409 `busy` while a backup of the application is queued or running.
    fn start_backup(&self, caller: &Caller, id: u64) -> ApiResult<Job>;
    fn start_restore(&self, caller: &Caller, id: u64, req: RestoreCreate) -> ApiResult<Job>;

    fn create_protection_policy(
        &self,
        caller: &Caller,
        p: ProtectionPolicy,
    ) -> ApiResult<ProtectionPolicy>;
    fn list_protection_policies(&self) -> ApiResult<Vec<ProtectionPolicy>>;
    fn protection_policy(&self, name: &str) -> ApiResult<ProtectionPolicy>;
    fn update_protection_policy(
        &self,
        caller: &Caller,
        name: &str,
        p: ProtectionPolicy,
    ) -> ApiResult<ProtectionPolicy>;
    /// 409 while assigned.
    fn delete_protection_policy(&self, caller: &Caller, name: &str) -> ApiResult<()>;

    fn job_log(&self, id: u64) -> ApiResult<JobLog>;
    /// 409 if finished or not cancellable.
    fn cancel_job(&self, caller: &Caller, id: u64) -> ApiResult<Job>;
}
