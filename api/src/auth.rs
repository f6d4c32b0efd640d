//! Roles and what each may do. Authentication (token lookup, Argon2id
//! verification) is the backend's; the API decides what a caller may do.

use crate::error::{ApiError, ApiResult};

/// A user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything, including users and deletions.
    Admin,
    /// Day-to-day operations; deletes only with the `delete` grant; no users.
    Operator,
    /// Reads everything, including the audit log; changes nothing.
    Auditor,
    /// An enrolled host's agent (`host:NAME`): the agent protocol and what
    /// its own backups and restores need ([`host_may`]). No user has it.
    Host,
}

impl Role {
    pub fn parse(s: &str) -> ApiResult<Role> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "auditor" => Ok(Role::Auditor),
            _ => Err(ApiError::bad_request(format!(
                "unknown role {s:?}: use admin, operator or auditor"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Host => "host",
        }
    }
}

/// What a request wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read volumes, snapshots, exports, jobs, events, metrics.
    Read,
    /// Create or change volumes, snapshots, clones, policies, jobs, webhooks.
    Write,
    /// Delete volumes, snapshots or clones.
    Delete,
    /// Read the audit log.
    ReadAudit,
    /// Users, other users' tokens, pool-wide policy, the test clock.
    Admin,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: String,
    pub role: Role,
    pub grants: Vec<String>,
    /// Id of the token used.
    pub token_id: String,
    /// Name of the token used.
    pub token_name: String,
}

impl Caller {
    pub fn may(&self, a: Action) -> bool {
        match (self.role, a) {
            (Role::Admin, _) => true,
            // What a host may touch is narrowed per route by `host_may`.
            (Role::Host, Action::Read | Action::Write) => true,
            (Role::Host, _) => false,
            (_, Action::Read) => true,
            (Role::Auditor, Action::ReadAudit) => true,
            (Role::Operator, Action::Write) => true,
            (Role::Operator, Action::Delete) => self.grants.iter().any(|g| g == "delete"),
            _ => false,
        }
    }

    /// 403 unless the caller may do `a`.
    pub fn require(&self, a: Action) -> ApiResult<()> {
        if self.may(a) {
            Ok(())
        } else {
            let what = match a {
                Action::Read => "read",
                Action::Write => "make changes",
                Action::Delete => "delete data (an operator needs the `delete` grant)",
                Action::ReadAudit => "read the audit log",
                Action::Admin => "do this (admin only)",
            };
            Err(ApiError::forbidden(format!(
                "user {} with role {} may not {what}",
                self.user,
                self.role.as_str()
            )))
        }
    }

    /// 403 unless the caller is `user` or an admin.
    pub fn require_self_or_admin(&self, user: &str) -> ApiResult<()> {
        if self.user == user || self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "user {} may only manage their own tokens",
                self.user
            )))
        }
    }
}

/// Whether a host credential may make this request: the agent protocol,
/// reads (not users, webhooks or the audit log), creating volumes,
/// snapshots and clones, and reverting a volume to its snapshot; deleting a clone is allowed here and checked
/// against who made it by the backend. Everything else is 403.
pub fn host_may(method: &str, path: &str) -> bool {
    let p: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    if p.first() != Some(&"v1") {
        // /health, /metrics.
        return method == "GET";
    }
    let p = &p[1..];
    // Recovered VMs' consoles and domain XML can show what a guest prints
    // (logins, secrets): not for hosts; nor is the object store's
    // configuration (its endpoint and key id are no agent's business).
    let secret = matches!(
        p.first(),
        Some(&"users" | &"webhooks" | &"audit" | &"vm-recoveries" | &"tier")
    ) || (p.first() == Some(&"hosts") && p.get(1) == Some(&"enrolments"));
    match (method, p) {
        (_, ["agent", ..]) => true,
        ("GET" | "HEAD", _) => !secret,
        ("POST", ["logout"]) => true,
        ("POST", ["volumes"]) => true,
        ("POST", ["volumes", _, "snapshots"]) => true,
        // A MariaDB stage volume rolled back after a failed prepare (the
        // appliance checks the volume is the host's own).
        ("POST", ["volumes", _, "revert"]) => true,
        ("POST", ["volumes", _, "snapshots", _, "clones"]) => true,
        // A drill's scrub of its point (the appliance checks the grant).
        ("POST", ["volumes", _, "snapshots", _, "verify"]) => true,
        ("DELETE", ["clones", _]) => true,
        // A point-in-time restore's own read snapshot of a log volume, and
        // nothing else: the appliance checks (never a point).
        ("DELETE", ["volumes", _, "snapshots", _]) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role, grants: &[&str]) -> Caller {
        Caller {
            user: "u".into(),
            role,
            grants: grants.iter().map(|s| s.to_string()).collect(),
            token_id: "t".into(),
            token_name: "t".into(),
        }
    }

    #[test]
    fn role_matrix() {
        use Action::*;
        let admin = caller(Role::Admin, &[]);
        let op = caller(Role::Operator, &[]);
        let op_del = caller(Role::Operator, &["delete"]);
        let aud = caller(Role::Auditor, &["delete"]);
        for a in [Read, Write, Delete, ReadAudit, Admin] {
            assert!(admin.may(a));
        }
        assert!(op.may(Read) && op.may(Write));
        assert!(!op.may(Delete) && !op.may(ReadAudit) && !op.may(Admin));
        assert!(op_del.may(Delete) && !op_del.may(Admin));
        assert!(aud.may(Read) && aud.may(ReadAudit));
        assert!(!aud.may(Write) && !aud.may(Delete) && !aud.may(Admin));
        assert_eq!(op.require(Delete).unwrap_err().status, 403);
        assert!(op.require_self_or_admin("u").is_ok());
        assert!(op.require_self_or_admin("v").is_err());
        assert!(admin.require_self_or_admin("v").is_ok());
    }

    #[test]
    fn roles_parse() {
        for r in crate::types::ROLES {
            assert_eq!(Role::parse(r).unwrap().as_str(), r);
        }
        assert_eq!(Role::parse("root").unwrap_err().status, 400);
        // No user may be made a host.
        assert_eq!(Role::parse("host").unwrap_err().status, 400);
    }

    #[test]
    fn hosts_may_only_what_agents_need() {
        let h = caller(Role::Host, &[]);
        assert!(h.may(Action::Read) && h.may(Action::Write));
        assert!(!h.may(Action::Delete) && !h.may(Action::Admin) && !h.may(Action::ReadAudit));
        for (m, p) in [
            ("POST", "/v1/agent/heartbeat"),
            ("GET", "/v1/agent/jobs"),
            ("GET", "/v1/volumes/a/snapshots"),
            ("POST", "/v1/volumes"),
            ("POST", "/v1/volumes/a/snapshots"),
            ("POST", "/v1/volumes/a/revert"),
            ("POST", "/v1/volumes/a/snapshots/3/clones"),
            ("DELETE", "/v1/clones/c"),
            ("DELETE", "/v1/volumes/a-log/snapshots/9"),
            ("GET", "/health"),
        ] {
            assert!(host_may(m, p), "{m} {p}");
        }
        for (m, p) in [
            ("GET", "/v1/users"),
            ("GET", "/v1/audit"),
            ("GET", "/v1/webhooks"),
            ("POST", "/v1/hosts/enrolments"),
            ("GET", "/v1/hosts/enrolments"),
            ("DELETE", "/v1/hosts/h"),
            ("POST", "/v1/protection-policies"),
            ("PUT", "/v1/applications/1/policy"),
            ("POST", "/v1/webhooks"),
            ("POST", "/v1/jobs"),
            ("DELETE", "/v1/volumes/a"),
            ("POST", "/v1/clock"),
            ("GET", "/v1/vm-recoveries"),
            ("GET", "/v1/tier"),
            ("PUT", "/v1/tier"),
            ("GET", "/v1/vm-recoveries/r/console"),
            ("GET", "/v1/vm-recoveries/r/domain.xml"),
            ("POST", "/v1/vms/v/recoveries"),
            ("POST", "/v1/vms/v/restores"),
            ("DELETE", "/v1/vm-recoveries/r"),
        ] {
            assert!(!host_may(m, p), "{m} {p}");
        }
    }
}
