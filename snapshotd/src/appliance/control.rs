//! The control plane's routes (`crate::control`), and what it needs of
//! the appliance: host credentials made and revoked with the other tokens.

use cdm_api::auth::Caller;
use cdm_api::control::*;
use cdm_api::control_backend::ControlBackend;
use cdm_api::types::Job;
use cdm_api::ApiResult;

use super::users::TokenRec;
use super::{st, Appliance};
use crate::control::host_user;
use crate::state::TOKENS;

impl ControlBackend for Appliance {
    fn create_enrolment(&self, c: &Caller, req: EnrolmentCreate) -> ApiResult<EnrolmentToken> {
        self.control.create_enrolment(c, req)
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
    fn agent_jobs(&self, c: &Caller, wait: u64) -> ApiResult<Vec<AgentJob>> {
        self.control.pull(c, wait)
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
        self.control.cancel(c, id)
    }
}
