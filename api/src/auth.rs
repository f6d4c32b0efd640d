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
    }
}
